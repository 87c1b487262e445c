"""`barista catalog refresh` for Azure: the subscription's locations (ARM
``GET /subscriptions/{id}/locations``, with coordinates), the Compute resource SKUs per
catalog region (``resource_skus.list``: vCPUs, MemoryGB, CpuArchitectureType, GPUs, zones,
restrictions) and pay-as-you-go Linux prices from the public Retail Prices API
(``GET https://prices.azure.com/api/retail/prices`` with an OData ``$filter``; pages
follow ``NextPageLink``). A Linux VM price is the item with ``type`` Consumption, unit
``1 Hour``, and neither "Windows" in its productName nor "Spot"/"Low Priority" in its
skuName.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from controller.provision.contract import ProvisionError
from controller.provision.refresh import Fetched, OverlaySize, Progress

ListCall = Callable[..., Awaitable[list[Any]]]
GetJson = Callable[[str], Awaitable[Any]]
MAX_PAGES = 200
LOCATIONS_API = "2022-12-01"


def _cap(sku: Any, name: str) -> str:
    for c in sku.capabilities or []:
        if c.name == name:
            return str(c.value)
    return ""


def size_of(sku: Any, region: str) -> tuple[OverlaySize, tuple[str, ...]] | None:
    """A resource SKU as a size with its zones in ``region`` (None: not a VM size we can
    use there: another resource type, or restricted for this subscription)."""
    if str(sku.resource_type).lower() != "virtualmachines":
        return None
    for r in sku.restrictions or []:
        if str(getattr(r.type, "value", r.type)).lower() == "location":
            return None
    try:
        vcpus, mem = int(_cap(sku, "vCPUs") or 0), float(_cap(sku, "MemoryGB") or 0)
    except ValueError:
        return None
    arm = _cap(sku, "CpuArchitectureType").lower() == "arm64"
    try:
        gpus = int(_cap(sku, "GPUs") or 0)
    except ValueError:
        gpus = 0
    zones: tuple[str, ...] = ()
    for info in sku.location_info or []:
        if str(info.location).lower() == region.lower():
            zones = tuple(f"{region}-{z}" for z in sorted(info.zones or []))
    return OverlaySize(name=str(sku.name), vcpus=vcpus, memory_gb=mem,
                       arch="arm64" if arm else "x86_64", gpus=gpus), zones


def linux_price(item: Mapping[str, Any]) -> tuple[str, float] | None:
    """(armSkuName, USD/hour) of a Retail Prices item when it is a plain Linux VM price."""
    if (item.get("type") != "Consumption" or item.get("unitOfMeasure") != "1 Hour"
            or item.get("currencyCode", "USD") != "USD"):
        return None
    if "Windows" in str(item.get("productName", "")):
        return None
    sku = str(item.get("skuName", ""))
    if "Spot" in sku or "Low Priority" in sku:
        return None
    try:
        price = float(item["retailPrice"])
    except (KeyError, TypeError, ValueError):
        return None
    return (str(item.get("armSkuName", "")), price) if price > 0 else None


async def prices(get_json: GetJson, url: str, region: str) -> dict[str, float]:
    """armSkuName -> USD/hour of Linux VMs in ``region`` (every page)."""
    from urllib.parse import urlencode

    flt = (f"serviceName eq 'Virtual Machines' and priceType eq 'Consumption' and "
           f"armRegionName eq '{region}'")
    nxt: str | None = f"{url}?{urlencode({'$filter': flt})}"
    out: dict[str, float] = {}
    for _ in range(MAX_PAGES):
        if not nxt:
            return out
        page = await get_json(nxt)
        for item in page.get("Items", []):
            got = linux_price(item)
            if got and got[0]:
                out[got[0]] = min(got[1], out.get(got[0], got[1]))
        nxt = page.get("NextPageLink") or None
    raise ProvisionError(f"azure: the Retail Prices API still paging after {MAX_PAGES} pages",
                         provider="azure", region=region)


async def fetch(list_call: ListCall, arm_json: GetJson, prices_json: GetJson | None,
                prices_url: str, subscription: str, regions: Sequence[str],
                progress: Progress) -> Fetched:
    progress("azure: subscriptions locations")
    locs = (await arm_json(f"/subscriptions/{subscription}/locations"
                           f"?api-version={LOCATIONS_API}")).get("value", [])
    cloud: dict[str, tuple[float, float] | None] = {}
    for loc in locs:
        meta = loc.get("metadata") or {}
        try:
            cloud[str(loc["name"])] = (float(meta["latitude"]), float(meta["longitude"]))
        except (KeyError, TypeError, ValueError):
            cloud[str(loc.get("name", ""))] = None
    notes = [f"{r}: not a location of subscription {subscription} (skipped)"
             for r in regions if r not in cloud]
    wanted = [r for r in regions if r in cloud]
    sizes: dict[str, OverlaySize] = {}
    offered: dict[str, list[str]] = {}
    zones: dict[str, set[str]] = {}
    for region in wanted:
        progress(f"azure {region}: resource SKUs")
        for sku in await list_call("compute", "resource_skus.list",
                                   filter=f"location eq '{region}'"):
            got = size_of(sku, region)
            if got is None:
                continue
            s, z = got
            sizes.setdefault(s.name, s)
            offered.setdefault(s.name, []).append(region)
            zones.setdefault(region, set()).update(z)
    found: dict[tuple[str, str], float] = {}
    refreshed = False
    if prices_json is None:
        notes.append("prices not asked (prices_url = \"\")")
    else:
        try:
            for region in wanted:
                progress(f"azure {region}: retail prices")
                found.update({(k, region): v for k, v in
                              (await prices(prices_json, prices_url, region)).items()})
            refreshed = True
        except ProvisionError as exc:
            notes.append(f"prices not refreshed: the Retail Prices API failed ({exc.kind}: "
                         f"{exc.message})")
            found = {}
    out = tuple(OverlaySize(name=s.name, vcpus=s.vcpus, memory_gb=s.memory_gb, arch=s.arch,
                            gpus=s.gpus, regions=tuple(offered[s.name]),
                            price_hour={r: found[(s.name, r)] for r in offered[s.name]
                                        if (s.name, r) in found})
                for s in sorted(sizes.values(), key=lambda s: s.name))
    return Fetched(provider="azure", source="azure ARM locations, Microsoft.Compute resource "
                   f"SKUs (subscription {subscription}); retail prices {prices_url}",
                   zones={r: tuple(sorted(zones.get(r, set()))) for r in wanted},
                   cloud_regions=tuple(sorted(cloud)), sizes=out, prices_refreshed=refreshed,
                   notes=tuple(notes),
                   coordinates={r: c for r in wanted if (c := cloud.get(r)) is not None})
