"""The catalog calls of the Azure fakes, in the documented shapes:

- ARM ``GET /subscriptions/{id}/locations`` (``value`` of Location: name, displayName,
  metadata.latitude/longitude as strings, regionType) and
  ``GET /subscriptions/{id}/providers/Microsoft.Compute/skus`` (``value`` of ResourceSku:
  resourceType, name, locations, locationInfo[].zones, capabilities[] name/value strings,
  restrictions[]), with ``$filter=location eq '...'``;
- the public Retail Prices API, ``GET /api/retail/prices?$filter=...``: ``Items`` of
  {currencyCode, retailPrice, unitPrice, armRegionName, armSkuName, skuName, productName,
  serviceName, type, unitOfMeasure, meterName}, ``NextPageLink`` until the last page, plus
  ``Count``; plain HTTP on loopback here (the real one is public HTTPS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from tests.fakes.http import JsonServer, Reply, Request

LOCATIONS = {  # name -> (displayName, latitude, longitude) as `az account list-locations`
    "eastus": ("East US", "37.3719", "-79.8164"),
    "westeurope": ("West Europe", "52.3667", "4.9"),
    "koreacentral": ("Korea Central", "37.5665", "126.978"),
    "westus2": ("West US 2", "47.233", "-119.852"),
}
# name -> (vCPUs, MemoryGB, arch, GPUs)
SKUS: dict[str, tuple[str, str, str, str]] = {
    "Standard_B1s": ("1", "1", "x64", "0"),
    "Standard_B2s": ("2", "4", "x64", "0"),
    "Standard_D2s_v5": ("2", "8", "x64", "0"),
    "Standard_F2s_v2": ("2", "4", "x64", "0"),
    "Standard_D2ps_v5": ("2", "8", "Arm64", "0"),
    "Standard_NC4as_T4_v3": ("4", "28", "x64", "1"),
}
RESTRICTED = {("Standard_NC4as_T4_v3", "koreacentral")}  # NotAvailableForSubscription
PRICES: dict[tuple[str, str], float] = {  # Linux pay-as-you-go, for the fake's answers
    ("Standard_B1s", "eastus"): 0.0104, ("Standard_B2s", "eastus"): 0.0416,
    ("Standard_D2s_v5", "eastus"): 0.096, ("Standard_F2s_v2", "eastus"): 0.0846,
    ("Standard_B1s", "westeurope"): 0.0114, ("Standard_B2s", "westeurope"): 0.0456,
    ("Standard_D2ps_v5", "westeurope"): 0.0845,
}


def locations(sub: str) -> dict[str, Any]:
    return {"value": [{"id": f"/subscriptions/{sub}/locations/{n}", "name": n,
                       "displayName": d, "regionalDisplayName": f"(Region) {d}",
                       "metadata": {"regionType": "Physical", "latitude": lat,
                                    "longitude": lon}}
                      for n, (d, lat, lon) in sorted(LOCATIONS.items())]}


def skus(flt: str) -> dict[str, Any]:
    m = re.search(r"location eq '([^']+)'", flt or "")
    where = [m.group(1)] if m else sorted(LOCATIONS)
    out = []
    for loc in where:
        for name, (cpu, mem, arch, gpus) in sorted(SKUS.items()):
            sku: dict[str, Any] = {
                "resourceType": "virtualMachines", "name": name, "tier": "Standard",
                "size": name.split("_", 1)[1], "locations": [loc],
                "locationInfo": [{"location": loc, "zones": ["3", "1", "2"]}],
                "capabilities": [{"name": "vCPUs", "value": cpu},
                                 {"name": "MemoryGB", "value": mem},
                                 {"name": "CpuArchitectureType", "value": arch},
                                 {"name": "GPUs", "value": gpus}],
                "restrictions": []}
            if (name, loc) in RESTRICTED:
                sku["restrictions"] = [{"type": "Location", "values": [loc],
                                        "reasonCode": "NotAvailableForSubscription"}]
            out.append(sku)
        out.append({"resourceType": "disks", "name": "Premium_LRS", "locations": [loc],
                    "capabilities": [], "restrictions": []})
    return {"value": out}


def catalog_route(sub: str, method: str, low: list[str], q: dict[str, list[str]]) -> Any:
    """The JSON answer for an ARM catalog path (below /subscriptions/{id}), or None."""
    if method != "GET":
        return None
    if low == ["locations"]:
        return locations(sub)
    if low == ["providers", "microsoft.compute", "skus"]:
        return skus((q.get("$filter") or [""])[0])
    return None


@dataclass
class PricesState:
    page_size: int = 3
    fail_next: int = 0  # the next N requests answer 500
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    # Items the fake also returns, to be filtered out by the client: Windows, Spot.
    extra: list[dict[str, Any]] = field(default_factory=lambda: [
        _item("Standard_B1s", "eastus", 0.0156, product="Virtual Machines BS Series Windows"),
        _item("Standard_B1s", "eastus", 0.0031, sku="B1s Spot"),
    ])


def _item(arm: str, region: str, price: float, *, product: str = "",
          sku: str = "") -> dict[str, Any]:
    short = arm.split("_", 1)[1].replace("_", " ")
    return {"currencyCode": "USD", "tierMinimumUnits": 0.0, "retailPrice": price,
            "unitPrice": price, "armRegionName": region, "location": region,
            "effectiveStartDate": "2024-01-01T00:00:00Z", "meterName": short,
            "productName": product or "Virtual Machines Series", "skuName": sku or short,
            "serviceName": "Virtual Machines", "serviceFamily": "Compute",
            "unitOfMeasure": "1 Hour", "type": "Consumption", "isPrimaryMeterRegion": True,
            "armSkuName": arm}


class FakeRetailPrices:
    """The Retail Prices API on a loopback port; ``url`` is what prices_url is set to."""

    def __init__(self) -> None:
        self.state = PricesState()
        self._http = JsonServer(self._handle)

    def _handle(self, req: Request) -> Reply:
        self.state.requests.append(req.query)
        if req.path != "/api/retail/prices":
            return Reply(404, {"error": {"code": "NotFound", "message": req.path}})
        if self.state.fail_next > 0:
            self.state.fail_next -= 1
            return Reply(500, {"error": {"code": "InternalError", "message": "try again"}})
        flt = (req.query.get("$filter") or [""])[0]
        m = re.search(r"armRegionName eq '([^']+)'", flt)
        items = [_item(a, r, p) for (a, r), p in sorted(PRICES.items())
                 if not m or r == m.group(1)]
        items += [i for i in self.state.extra if not m or i["armRegionName"] == m.group(1)]
        skip = int((req.query.get("$skip") or ["0"])[0])
        page = items[skip:skip + self.state.page_size]
        body: dict[str, Any] = {"BillingCurrency": "USD", "CustomerEntityId": "Default",
                                "CustomerEntityType": "Retail", "Items": page,
                                "Count": len(page), "NextPageLink": None}
        if skip + self.state.page_size < len(items):
            body["NextPageLink"] = (f"{self.url}?" + urlencode(
                {"$filter": flt, "$skip": skip + self.state.page_size}))
        return Reply(200, body)

    @property
    def url(self) -> str:
        return f"{self._http.url}/api/retail/prices"

    def __enter__(self) -> FakeRetailPrices:
        self._http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.__exit__(*exc)
