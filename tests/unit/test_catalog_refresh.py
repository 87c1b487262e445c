"""The pure parts of `barista catalog refresh`: the AWS Price List and Azure Retail Prices
parsers (on answers in their documented shapes), the merge of an overlay on the shipped
catalog, and the shipped price data (every price has a known size and region)."""

from __future__ import annotations

import json
from pathlib import Path

from controller.provision.contract import Catalog, Region, Size
from controller.provision.providers import aws_catalog, azure_catalog
from controller.provision.providers.prices import PRICES, SOURCES
from controller.provision.refresh import CatalogStore, Fetched, Overlay, OverlaySize, merge


def _product(itype: str, region: str, usd: str, unit: str = "Hrs") -> str:
    """One GetProducts PriceList entry (a JSON string), as the Price List API documents."""
    return json.dumps({
        "product": {"productFamily": "Compute Instance", "sku": "SKU1",
                    "attributes": {"instanceType": itype, "regionCode": region,
                                   "operatingSystem": "Linux", "tenancy": "Shared"}},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {"SKU1.JRTCKXETXF": {
            "priceDimensions": {"SKU1.JRTCKXETXF.6YS6EN2CT7": {
                "unit": unit, "pricePerUnit": {"USD": usd},
                "description": f"$ {usd} per On Demand Linux {itype} Instance Hour"}},
            "sku": "SKU1", "offerTermCode": "JRTCKXETXF"}}}})


def test_aws_price_list_parsing() -> None:
    got = aws_catalog.prices_of([
        _product("t3.micro", "eu-west-1", "0.0114000000"),
        _product("t3.small", "eu-west-1", "0.0000000000"),  # a zero price: not a price
        _product("t3.large", "eu-west-1", "0.5", unit="Quantity"),  # not hourly
        "not json", json.dumps({"product": {}}),
    ])
    assert got == {("t3.micro", "eu-west-1"): 0.0114}


def test_aws_instance_type_parsing() -> None:
    s = aws_catalog.size_of({
        "InstanceType": "g4dn.xlarge", "VCpuInfo": {"DefaultVCpus": 4},
        "MemoryInfo": {"SizeInMiB": 16384},
        "ProcessorInfo": {"SupportedArchitectures": ["x86_64"]},
        "GpuInfo": {"Gpus": [{"Name": "T4", "Manufacturer": "NVIDIA", "Count": 1}]}})
    assert s is not None
    assert (s.vcpus, s.memory_gb, s.arch, s.gpus, s.gpu_model) == (4, 16.0, "x86_64", 1,
                                                                   "NVIDIA T4")
    assert aws_catalog.size_of({"InstanceType": "m1.small", "ProcessorInfo": {
        "SupportedArchitectures": ["i386"]}}) is None


def test_azure_retail_price_filtering() -> None:
    base = {"type": "Consumption", "unitOfMeasure": "1 Hour", "currencyCode": "USD",
            "armSkuName": "Standard_B1s", "productName": "Virtual Machines BS Series",
            "skuName": "B1s", "retailPrice": 0.0104}
    assert azure_catalog.linux_price(base) == ("Standard_B1s", 0.0104)
    for bad in ({"productName": "Virtual Machines BS Series Windows"}, {"skuName": "B1s Spot"},
                {"skuName": "B1s Low Priority"}, {"type": "Reservation"},
                {"unitOfMeasure": "1 Month"}, {"retailPrice": 0}):
        assert azure_catalog.linux_price({**base, **bad}) is None, bad


SHIPPED = Catalog("aws", {
    "r1": Region("r1", 1.0, 2.0, ("r1a",)), "r2": Region("r2", 3.0, 4.0, ("r2a",))},
    {"a": Size("a", 2, 4.0, {"r1": 0.1, "r2": 0.2})}, {})


def test_merge_prices_fetched_then_shipped_then_unknown() -> None:
    overlay = Overlay(provider="aws", source="t", fetched_at=1.0,
                      zones={"r1": ("r1a", "r1b")}, cloud_regions=("r1", "r2", "r9"),
                      sizes=(OverlaySize("a", 2, 4.0, regions=("r1", "r2"),
                                         price_hour={"r1": 0.15}),
                             OverlaySize("b", 8, 32.0, regions=("r2", "r9")),
                             OverlaySize("c", 1, 1.0, regions=("r9",))))
    cat = merge(SHIPPED, overlay)
    assert cat.regions["r1"].zones == ("r1a", "r1b") and cat.regions["r2"].zones == ("r2a",)
    assert set(cat.regions) == {"r1", "r2"}  # r9 is listed, not added
    assert (cat.price("a", "r1"), cat.price("a", "r2")) == (0.15, 0.2)
    assert cat.sizes["b"].regions == ("r2",) and cat.price("b", "r2") is None
    assert "c" not in cat.sizes  # offered only outside the catalog's regions


def test_store_keeps_previous_prices_when_prices_failed(tmp_path: Path) -> None:
    store = CatalogStore(tmp_path)
    first = Fetched("aws", "t", {}, (), (OverlaySize("a", 2, 4.0, regions=("r1",),
                                                     price_hour={"r1": 0.15}),), True)
    store.save("aws", first, now=100.0)
    second = Fetched("aws", "t", {}, (), (OverlaySize("a", 2, 4.0, regions=("r1",)),), False,
                     notes=("prices not refreshed: x",))
    kept = store.save("aws", second)
    assert kept.sizes[0].price_hour == {"r1": 0.15}
    assert kept.notes == ("prices not refreshed: x",
                          "prices kept from the refresh of 1970-01-01T00:01:40Z")


def test_shipped_prices_name_known_sizes_and_regions_with_a_source() -> None:
    from controller.provision.providers import aws, azure, gcp

    for mod in (aws, gcp, azure):
        cat = mod.default_catalog()
        assert SOURCES[cat.provider]
        for size, by_region in PRICES[cat.provider].items():
            assert size in cat.sizes, size
            assert set(by_region) <= set(cat.regions), (size, by_region)
            assert all(0 < p < 1 for p in by_region.values())
            assert cat.sizes[size].price_hour == by_region
    aws_cat = aws.default_catalog()
    assert all(aws_cat.price(s, r) is not None for s in aws_cat.sizes for r in aws_cat.regions)
    assert gcp.default_catalog().price("e2-micro", "europe-west1") is None  # not known
