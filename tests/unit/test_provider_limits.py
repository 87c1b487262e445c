"""Each SDK provider's documented API limits (``API_LIMITS``, the source in its module)
are what the engine's token buckets and concurrency for that provider are set from, and
what the provider's request meter holds every cloud request to."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from controller.provision.engine import Engine
from controller.provision.limits import ApiLimits, RequestMeter
from controller.provision.providers import aws, azure, gcp
from controller.provision.registry import create_provider

SETTINGS: dict[str, dict[str, Any]] = {"aws": {}, "gcp": {"project": "p"},
                                       "azure": {"subscription_id": "s"}}
REGION = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus"}


def test_documented_figures() -> None:
    # EC2: per account and region; mutating actions 50 refilled at 5/s (the smallest class).
    assert (aws.API_LIMITS.region_rate, aws.API_LIMITS.region_burst) == (5.0, 50)
    assert aws.API_LIMITS.rate == 0.0  # no account-wide bucket across regions
    # GCE: 1,500 requests per minute per project ("Queries", "Read requests").
    assert gcp.API_LIMITS.rate == 1500 / 60 and gcp.API_LIMITS.region_rate == 0.0
    # ARM: per subscription and region; writes and deletes 200 refilled at 10/s.
    assert (azure.API_LIMITS.region_rate, azure.API_LIMITS.region_burst) == (10.0, 200)


def _engine(providers: dict[str, Any], limits: dict[str, ApiLimits] | None = None) -> Engine:
    # The tables are not touched before start(): only the limits are looked at here.
    none: Any = None
    return Engine(infras=none, ops=none, nodes=none, providers=providers,
                  renderer=none, installation="t", limits=limits)


@pytest.mark.parametrize("kind", ["aws", "gcp", "azure"])
async def test_engine_buckets_are_set_from_the_documented_limits(kind: str) -> None:
    module = {"aws": aws, "gcp": gcp, "azure": azure}[kind]
    prov = create_provider(kind, settings=SETTINGS[kind])
    documented = module.API_LIMITS
    assert prov.api_limits == documented  # type: ignore[attr-defined]
    engine = _engine({kind: prov})
    assert engine._limit(kind) == documented

    async def answer() -> str:
        return "ok"

    assert await engine._call(prov, REGION[kind], "probe", answer) == "ok"
    whole = engine._buckets[(kind, "")]
    assert (whole.rate, whole.size) == (documented.rate, float(max(1, documented.burst)))
    if documented.region_rate:
        region = engine._buckets[(kind, REGION[kind])]
        assert (region.rate, region.size) == (documented.region_rate,
                                              float(documented.region_burst))
    else:
        assert (kind, REGION[kind]) not in engine._buckets
    slots = engine._slots[(kind, REGION[kind])]
    assert slots._value == documented.concurrency  # none in flight now
    # The provider's own meter (every SDK request) holds the same figures.
    assert prov._meter.limits == documented  # type: ignore[attr-defined]
    # Limits given by the operator win over the documented ones.
    mine = ApiLimits(rate=1.0, burst=1)
    assert _engine({kind: prov}, {kind: mine})._limit(kind) == mine


async def test_meter_paces_requests_and_bounds_concurrency() -> None:
    meter = RequestMeter(ApiLimits(rate=0.0, burst=0, region_rate=20.0, region_burst=2,
                                   concurrency=2), name="t")
    inflight = [0, 0]

    def request() -> None:
        inflight[0] += 1
        inflight[1] = max(inflight[1], inflight[0])
        time.sleep(0.02)
        inflight[0] -= 1

    t0 = time.monotonic()
    await asyncio.gather(*(meter.run("r1", request) for _ in range(6)))
    took = time.monotonic() - t0
    meter.close()
    assert meter.sent == 6
    assert took >= (6 - 2) / 20 - 0.01  # 2 at once from the burst, then 20/s
    assert inflight[1] <= 2
