"""`barista catalog refresh` for AWS: EC2 DescribeRegions, DescribeAvailabilityZones and
DescribeInstanceTypes per catalog region, and on-demand Linux prices from the Price List
Query API (``pricing`` GetProducts, served from us-east-1).

Prices are the documented GetProducts answer: ``PriceList`` is a list of JSON strings, one
product each, with ``product.attributes`` (instanceType, regionCode, operatingSystem...)
and ``terms.OnDemand.<offer>.priceDimensions.<dim>.pricePerUnit.USD`` per ``Hrs``. Only
shared-tenancy Linux without pre-installed software and with capacitystatus Used is asked
for, which is the plain on-demand price of the instance type. A failed price call is not a
failed refresh: the sizes come, the prices stay as they were, a note says why.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from controller.provision.contract import ProvisionError
from controller.provision.refresh import Fetched, OverlaySize, Progress

Call = Callable[..., Awaitable[Any]]
PRICING_REGION = "us-east-1"  # the Price List Query API's endpoint (also ap-south-1)
# Bounds on paging, so that a misbehaving endpoint cannot keep a refresh going for ever.
MAX_PAGES = 200

PRICE_FILTERS: tuple[tuple[str, str], ...] = (
    ("operatingSystem", "Linux"), ("tenancy", "Shared"), ("preInstalledSw", "NA"),
    ("capacitystatus", "Used"), ("licenseModel", "No License required"),
)


def size_of(raw: Mapping[str, Any]) -> OverlaySize | None:
    """One DescribeInstanceTypes entry as a size (None for an architecture we do not run)."""
    archs = raw.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    arch = "arm64" if "arm64" in archs else "x86_64" if "x86_64" in archs else ""
    if not arch:
        return None
    gpus = raw.get("GpuInfo", {}).get("Gpus", [])
    model = " ".join(f"{g.get('Manufacturer', '')} {g.get('Name', '')}".strip()
                     for g in gpus[:1])
    return OverlaySize(
        name=str(raw["InstanceType"]),
        vcpus=int(raw.get("VCpuInfo", {}).get("DefaultVCpus", 0)),
        memory_gb=round(int(raw.get("MemoryInfo", {}).get("SizeInMiB", 0)) / 1024, 3),
        arch="arm64" if arch == "arm64" else "x86_64",
        gpus=sum(int(g.get("Count", 0)) for g in gpus), gpu_model=model)


def prices_of(price_list: Sequence[str]) -> dict[tuple[str, str], float]:
    """(instance type, region) -> USD per hour from GetProducts' ``PriceList`` strings;
    products without an hourly USD on-demand price are skipped."""
    out: dict[tuple[str, str], float] = {}
    for text in price_list:
        try:
            item = json.loads(text)
            attrs = item["product"]["attributes"]
            itype, region = str(attrs["instanceType"]), str(attrs["regionCode"])
        except (ValueError, KeyError, TypeError):
            continue
        for offer in item.get("terms", {}).get("OnDemand", {}).values():
            for dim in offer.get("priceDimensions", {}).values():
                usd = dim.get("pricePerUnit", {}).get("USD")
                if dim.get("unit") != "Hrs" or usd is None:
                    continue
                try:
                    price = float(usd)
                except ValueError:
                    continue
                if price > 0:
                    out[(itype, region)] = price
    return out


async def _paged(call: Call, region: str, op: str, key: str, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    token = ""
    for _ in range(MAX_PAGES):
        resp = await call(region, op, **kwargs, **({"NextToken": token} if token else {}))
        out.extend(resp.get(key, []))
        token = str(resp.get("NextToken") or "")
        if not token:
            return out
    raise ProvisionError(f"aws: {op} in {region} still paging after {MAX_PAGES} pages",
                         provider="aws", region=region)


async def fetch(call: Call, pricing: Call | None, regions: Sequence[str],
                progress: Progress) -> Fetched:
    """``call(region, op, **kw)``: EC2; ``pricing(region, op, **kw)``: the pricing client
    (None: prices not asked)."""
    home = regions[0]
    progress("aws: DescribeRegions")
    listed = (await call(home, "describe_regions", AllRegions=False))["Regions"]
    cloud_regions = tuple(sorted(str(r["RegionName"]) for r in listed))
    zones: dict[str, tuple[str, ...]] = {}
    sizes: dict[str, OverlaySize] = {}
    offered: dict[str, list[str]] = {}
    notes: list[str] = []
    async def one(region: str) -> tuple[str, tuple[str, ...], list[OverlaySize]]:
        progress(f"aws {region}: DescribeAvailabilityZones")
        azs = (await call(region, "describe_availability_zones", Filters=[
            {"Name": "zone-type", "Values": ["availability-zone"]}]))["AvailabilityZones"]
        progress(f"aws {region}: DescribeInstanceTypes")
        types = await _paged(call, region, "describe_instance_types", "InstanceTypes",
                             MaxResults=100)
        return (region, tuple(sorted(str(z["ZoneName"]) for z in azs
                                     if z.get("State") == "available")),
                [s for s in map(size_of, types) if s is not None])

    notes += [f"{r}: not an enabled region of this account (skipped)"
              for r in regions if r not in cloud_regions]
    # One region after the other: a refresh is rare, and DescribeInstanceTypes answers are
    # large (at once, six of them made a loaded moto miss the 30 s read timeout).
    for r in regions:
        if r not in cloud_regions:
            continue
        region, region_zones, found = await one(r)
        zones[region] = region_zones
        for s in found:
            sizes.setdefault(s.name, s)
            offered.setdefault(s.name, []).append(region)
    prices: dict[tuple[str, str], float] = {}
    refreshed = False
    if pricing is None:
        notes.append("prices not asked (pricing = false)")
    else:
        try:
            for region in zones:
                progress(f"aws {region}: pricing GetProducts (on-demand Linux)")
                filters = [{"Type": "TERM_MATCH", "Field": f, "Value": v}
                           for f, v in (("regionCode", region), *PRICE_FILTERS)]
                got = prices_of(await _paged(
                    pricing, PRICING_REGION, "get_products", "PriceList",
                    ServiceCode="AmazonEC2", Filters=filters, FormatVersion="aws_v1",
                    MaxResults=100))
                prices.update(got)
            refreshed = True
        except ProvisionError as exc:
            notes.append(f"prices not refreshed: the Price List API failed ({exc.kind} "
                         f"{exc.code}: {exc.message})")
            prices = {}
    out = tuple(
        OverlaySize(name=s.name, vcpus=s.vcpus, memory_gb=s.memory_gb, arch=s.arch,
                    gpus=s.gpus, gpu_model=s.gpu_model, regions=tuple(offered[s.name]),
                    price_hour={r: prices[(s.name, r)] for r in offered[s.name]
                                if (s.name, r) in prices})
        for s in sorted(sizes.values(), key=lambda s: s.name))
    return Fetched(provider="aws", source="aws ec2 DescribeRegions, DescribeAvailabilityZones,"
                   " DescribeInstanceTypes; pricing GetProducts (AmazonEC2, us-east-1)",
                   zones=zones, cloud_regions=cloud_regions, sizes=out,
                   prices_refreshed=refreshed, notes=tuple(notes))
