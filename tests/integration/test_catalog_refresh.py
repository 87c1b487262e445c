"""`barista catalog refresh PROVIDER` through the real SDKs: AWS against moto (EC2
DescribeRegions/AvailabilityZones/InstanceTypes; moto has no Price List API, so prices are
not refreshed and the refresh says so), GCP and Azure against the REST fakes (regions,
zones, machine types / resource SKUs, the Retail Prices API); the overlay file, its source
and time, the merge with the shipped catalog, and failures that must leave the existing
catalog as it was. Then the same through the API and the CLI of a real controller."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.api.app import ApiServer
from controller.provision.contract import CredentialsError, TransientError
from controller.provision.refresh import CatalogStore, Fetched, OverlaySize, merge, refresh
from controller.service import Controller
from tests.fakes.clouds import StaticToken
from tests.fixtures.controller import controller_config, run_cli
from tests.integration.test_provider_contract import _aws


@pytest.fixture
def aws(moto_url: str) -> Iterator[Any]:
    """The contract suite's moto harness, its catalog cut to two regions (a refresh reads
    every region of the catalog, and moto's DescribeInstanceTypes answers are large)."""
    from dataclasses import replace

    for h in _aws(moto_url):
        cat = h.provider.catalog()
        two = replace(cat, regions={r: cat.regions[r] for r in ("us-east-1", "eu-west-1")})
        prov: Any = h.provider  # the AWS provider's own catalog fields
        prov._catalog = prov._shipped = two
        yield h


async def test_aws_refresh_from_ec2_keeps_prices_moto_cannot_give(aws: Any,
                                                                  tmp_path: Path) -> None:
    p, store = aws.provider, CatalogStore(tmp_path / "catalog")
    said: list[str] = []
    overlay = await refresh("aws", p, store, said.append)
    assert "DescribeInstanceTypes" in overlay.source and overlay.fetched_at > 0
    on_disk = json.loads(store.path("aws").read_text())
    assert on_disk["source"] == overlay.source and on_disk["provider"] == "aws"
    assert (store.path("aws").stat().st_mode & 0o777) == 0o600
    assert any("us-east-1: DescribeInstanceTypes" in m for m in said), said
    zones = {z["ZoneName"] for z in aws.ec2.describe_availability_zones()["AvailabilityZones"]}
    cat = p.catalog()
    assert set(cat.regions["us-east-1"].zones) == zones
    assert "us-east-1" in overlay.cloud_regions and "sa-east-1" in overlay.cloud_regions
    # Sizes from moto's instance types, beyond the shipped seven.
    m5 = cat.sizes["m5.large"]
    assert (m5.vcpus, m5.memory_gb, m5.arch) == (2, 8.0, "x86_64")
    assert cat.sizes["t4g.small"].arch == "arm64"
    assert any(s.gpus > 0 and s.gpu_model for s in cat.sizes.values())
    # moto implements no Price List API: prices are not refreshed, the shipped ones stay,
    # sizes without a shipped price are unpriced (never made up).
    assert not overlay.prices_refreshed
    assert any("prices not refreshed" in n for n in overlay.notes), overlay.notes
    assert cat.price("t3.micro", "eu-west-1") == 0.0114
    assert cat.price("m5.large", "us-east-1") is None


async def test_failed_refresh_writes_nothing_and_keeps_the_catalog(aws: Any,
                                                                   tmp_path: Path) -> None:
    from controller.provision.providers.aws import AwsProvider, AwsSettings, default_catalog

    store = CatalogStore(tmp_path / "catalog")
    store.save("aws", Fetched(provider="aws", source="test", zones={}, cloud_regions=(),
                              sizes=(OverlaySize("m5.large", 2, 8.0, regions=("us-east-1",)),),
                              prices_refreshed=False))
    before = store.path("aws").read_bytes()
    broken = AwsProvider(settings=AwsSettings(endpoint_url=aws.provider._settings.endpoint_url,
                                              profile="no-such-profile"),
                         catalog=default_catalog())
    broken.use_catalog(merge(default_catalog(), store.load("aws")))  # type: ignore[arg-type]
    in_use = broken.catalog()
    with pytest.raises(CredentialsError):
        await refresh("aws", broken, store, lambda m: None)
    assert store.path("aws").read_bytes() == before
    assert broken.catalog() is in_use and "m5.large" in in_use.sizes
    # A damaged overlay is ignored (logged), never fatal: the shipped catalog serves.
    store.path("aws").write_text("{not json")
    assert store.load("aws") is None


@pytest.fixture
def gce() -> Iterator[Any]:
    pytest.importorskip("google.cloud.compute_v1")
    from tests.fakes.gcp import FakeGce

    with FakeGce() as fake:
        yield fake


def _gcp(fake: Any) -> Any:
    from controller.provision.providers.gcp import GcpProvider, GcpSettings, default_catalog

    return GcpProvider(settings=GcpSettings(project=fake.state.project, api_endpoint=fake.url,
                                            anonymous=True), catalog=default_catalog())


async def test_gcp_refresh_reads_regions_zones_and_machine_types(gce: Any,
                                                                 tmp_path: Path) -> None:
    p, store = _gcp(gce), CatalogStore(tmp_path)
    overlay = await refresh("gcp", p, store, lambda m: None)
    cat = p.catalog()
    assert cat.regions["us-central1"].zones == ("us-central1-a", "us-central1-b",
                                                "us-central1-c")  # f is DOWN
    assert "us-west1" in overlay.cloud_regions and "us-west1" not in cat.regions
    t2a = cat.sizes["t2a-standard-1"]
    assert t2a.arch == "arm64" and not t2a.offered_in("asia-northeast3")
    g2 = cat.sizes["g2-standard-4"]
    assert (g2.vcpus, g2.memory_gb, g2.gpus, g2.gpu_model) == (4, 16.0, 1, "nvidia-l4")
    assert g2.regions == ("europe-west4", "us-central1")
    assert not overlay.prices_refreshed and "Cloud Billing" in " ".join(overlay.notes)
    assert cat.price("e2-standard-2", "europe-west1") == 0.07372  # shipped, kept
    gets = [path for m, path, _q, _b in gce.state.requests if m == "GET"]
    assert any(path.endswith("/aggregated/machineTypes") for path in gets), gets


async def test_gcp_refresh_failure_leaves_the_file(gce: Any, tmp_path: Path) -> None:
    p, store = _gcp(gce), CatalogStore(tmp_path)
    await refresh("gcp", p, store, lambda m: None)
    before, in_use = store.path("gcp").read_bytes(), p.catalog()
    gce.state.catalog.fail_machine_types = 1
    with pytest.raises(TransientError):
        await refresh("gcp", p, store, lambda m: None)
    assert store.path("gcp").read_bytes() == before and p.catalog() is in_use


@pytest.fixture
def arm(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    pytest.importorskip("azure.mgmt.compute")
    from tests.fakes.azure import FakeArm
    from tests.fakes.azure_catalog import FakeRetailPrices

    with FakeArm(tmp_path) as fake, FakeRetailPrices() as prices:
        yield fake, prices


def _azure(fake: Any, prices_url: str) -> Any:
    from controller.provision.providers.azure import (
        AzureProvider,
        AzureSettings,
        default_catalog,
    )

    return AzureProvider(settings=AzureSettings(
        subscription_id=fake.state.subscription, base_url=fake.url,
        connection_verify=str(fake.ca), polling_interval=0, prices_url=prices_url),
        catalog=default_catalog(), credential_factory=StaticToken)


async def test_azure_refresh_skus_locations_and_retail_prices(arm: tuple[Any, Any],
                                                              tmp_path: Path) -> None:
    fake, prices = arm
    p, store = _azure(fake, prices.url), CatalogStore(tmp_path)
    overlay = await refresh("azure", p, store, lambda m: None)
    cat = p.catalog()
    assert overlay.prices_refreshed and "prices.azure" not in overlay.source
    assert (cat.regions["eastus"].latitude, cat.regions["eastus"].longitude) == \
        (37.3719, -79.8164)
    assert cat.regions["westeurope"].zones == ("westeurope-1", "westeurope-2", "westeurope-3")
    assert cat.sizes["Standard_D2ps_v5"].arch == "arm64"
    nc = cat.sizes["Standard_NC4as_T4_v3"]
    assert nc.gpus == 1 and not nc.offered_in("koreacentral") and nc.offered_in("eastus")
    assert "Premium_LRS" not in cat.sizes  # a disk SKU, not a VM size
    # The Linux pay-as-you-go price, not the Windows (0.0156) or Spot (0.0031) items.
    assert cat.price("Standard_B1s", "eastus") == 0.0104
    assert cat.price("Standard_B1s", "westeurope") == 0.0114
    assert cat.price("Standard_D2ps_v5", "westeurope") == 0.0845
    assert cat.price("Standard_F2s_v2", "koreacentral") is None  # unknown stays unknown
    assert any("$skip" in q for q in prices.state.requests)  # NextPageLink was followed
    # southeastasia is in the catalog but not a location of the fake's subscription.
    assert any(n.startswith("southeastasia:") for n in overlay.notes), overlay.notes


async def test_azure_price_failure_keeps_the_previous_prices(arm: tuple[Any, Any],
                                                             tmp_path: Path) -> None:
    fake, prices = arm
    p, store = _azure(fake, prices.url), CatalogStore(tmp_path)
    await refresh("azure", p, store, lambda m: None)
    prices.state.fail_next = 1000
    overlay = await refresh("azure", p, store, lambda m: None)
    assert not overlay.prices_refreshed
    assert any("prices not refreshed" in n for n in overlay.notes)
    assert any("prices kept from the refresh of" in n for n in overlay.notes)
    assert p.catalog().price("Standard_D2ps_v5", "westeurope") == 0.0845
    assert json.loads(store.path("azure").read_text())["prices_refreshed"] is False


# -- through the API and the CLI -------------------------------------------------------


@pytest.fixture
async def api_url(tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[str, str, Path]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = controller_config(tmp_path / "ctl", providers={
        "sim-a": {"kind": "sim"}, "aws": {"endpoint_url": moto_url},
        "aws-nocreds": {"kind": "aws", "endpoint_url": moto_url, "profile": "no-such"}})
    async with Controller(cfg) as c, ApiServer(c, host="127.0.0.1", port=0) as api:
        yield api.url, c.secrets.api_token, tmp_path / "ctl"


async def test_cli_refresh_shows_progress_and_serves_the_new_catalog(
        api_url: tuple[str, str, Path], moto_url: str) -> None:
    url, token, data_dir = api_url
    code, out, err = await run_cli("catalog", "refresh", "aws", url=url, token=token,
                                   timeout=300)
    assert code == 0, (out, err)
    assert "DescribeInstanceTypes" in out and "sizes in 6 regions" in out, out
    assert "note" in out and "prices not refreshed" in out, out
    assert (data_dir / "catalog" / "aws.json").exists()
    code, out, err = await run_cli("catalog", "sizes", "--provider", "aws", "--vcpus", "96",
                                   "-o", "json", "--limit", "500", url=url, token=token)
    big = json.loads(out)["sizes"]
    assert big and all(s["vcpus"] >= 96 for s in big), big[:3]
    assert any(s["price_hour"] is None for s in big)  # unpriced, shown as such
    unpriced = next(s for s in big if s["price_hour"] is None)
    code, out, err = await run_cli("catalog", "sizes", "--provider", "aws", "--vcpus", "96",
                                   "--limit", "500", url=url, token=token)
    rows = [line.rstrip().rstrip("│").rstrip() for line in out.splitlines()
            if f" {unpriced['size']} " in line and f" {unpriced['region']} " in line]
    assert code == 0 and rows and rows[0].endswith("-"), out
    # What to do when it fails; nothing written.
    code, out, err = await run_cli("catalog", "refresh", "aws-nocreds", url=url, token=token)
    assert code == 1 and "credentials" in out and "Nothing was written" in out, (out, err)
    assert not (data_dir / "catalog" / "aws-nocreds.json").exists()
    code, out, err = await run_cli("catalog", "refresh", "sim-a", url=url, token=token)
    assert code == 1 and "no catalog API" in err, (out, err)
    code, out, err = await run_cli("catalog", "refresh", "gcp", url=url, token=token)
    assert code == 1 and "no provider 'gcp'" in err, (out, err)


async def test_overlay_is_served_after_a_restart(tmp_path: Path, moto_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = controller_config(tmp_path / "ctl", providers={"aws": {"endpoint_url": moto_url}})
    async with Controller(cfg) as c:
        assert "m5.large" not in c.provisioning.providers["aws"].catalog().sizes
        c.provisioning.catalogs.save("aws", Fetched(
            provider="aws", source="test", zones={"us-east-1": ("us-east-1a",)},
            cloud_regions=("us-east-1",), prices_refreshed=False,
            sizes=(OverlaySize("m5.large", 2, 8.0, regions=("us-east-1",)),)))
    async with Controller(cfg) as c:
        cat = c.provisioning.providers["aws"].catalog()
        assert "m5.large" in cat.sizes and cat.regions["us-east-1"].zones == ("us-east-1a",)
