"""Engine parts that need no NATS: the token bucket (fake clock), failure reasons and the
status summary."""

from __future__ import annotations

import itertools

from controller.provision.contract import CapacityError, CredentialsError, QuotaError
from controller.provision.engine import _summary, reason_of
from controller.provision.limits import TokenBucket
from controller.provision.model import GroupView


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


async def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 3, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(13):
        await bucket.acquire()
        times.append(clock.now)
    assert times[:3] == [0.0, 0.0, 0.0]
    # Then one every 0.1 s: 10 more calls take a second.
    assert abs(times[-1] - 1.0) < 0.01
    gaps = [b - a for a, b in itertools.pairwise(times[3:])]
    assert all(abs(g - 0.1) < 0.01 for g in gaps)


async def test_rate_zero_is_unlimited() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0.0, 1, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        await bucket.acquire()
    assert clock.slept == []


def test_reasons_follow_the_error_scope() -> None:
    assert reason_of(CapacityError("x", provider="p", region="r", zone="r-b")) == (
        "capacity in zone r-b")
    assert reason_of(CapacityError("x", provider="p", region="r", scope="region")) == (
        "capacity in region r")
    assert reason_of(QuotaError("x", provider="p", region="r")) == "quota in region r"
    assert reason_of(CredentialsError("x", provider="aws")) == (
        "credentials refused by provider aws")


def test_summary() -> None:
    groups = [GroupView(name="a", provider="p", desired=60, ready=60, running=60),
              GroupView(name="b", provider="p", desired=40, ready=38, running=38, failed=2,
                        reasons={"capacity in zone zone-b": 2})]
    assert _summary(groups) == "Running 98/100, Failed 2 (capacity in zone zone-b)"
    mixed = [GroupView(name="a", provider="p", desired=10, ready=5, running=7, pending=1,
                       failed=2, reasons={"capacity in zone z": 1, "quota in region r": 1})]
    assert _summary(mixed) == ("Running 7/10, Ready 5, Pending 1, Failed 2 (1 capacity in "
                               "zone z, 1 quota in region r)")


async def test_one_ensure_network_in_flight_per_provider_and_region() -> None:
    # Batches and groups needing the same network share one call (two could each make a
    # VPC); one started ahead that failed is tried once more by the launch that needs it.
    import asyncio
    from typing import Any

    from controller.provision.engine import Engine, _Infra
    from controller.provision.providers.sim import FailureRule, SimProvider, SimSettings
    from controller.provision.spec import spec_from_obj

    sim = SimProvider(SimSettings(latency_min=0.05, latency_max=0.05, failures=[
        FailureRule(op="ensure_network", error="quota", region="eu-1")]), name="sim-a")
    none: Any = None
    engine = Engine(infras=none, ops=none, nodes=none, providers={"sim-a": sim},
                    renderer=none, installation="t")
    spec = spec_from_obj({"name": "n", "groups": [
        {"name": "g", "provider": "sim-a", "regions": ["east-1"], "size": "small",
         "count": 1}]}, catalogs=engine.catalogs())
    g = spec.groups[0]
    inf = _Infra("n", none)
    try:
        nets = await asyncio.gather(*(engine._network(inf, sim, g, "east-1")
                                      for _ in range(3)))
        assert len({n.id for n in nets}) == 1
        assert sim.stats.calls["ensure_network"] == 1 and len(sim.networks) == 1
        assert await engine._network(inf, sim, g, "east-1") == nets[0]  # made: not asked
        assert sim.stats.calls["ensure_network"] == 1
        engine._network_task(inf, sim, g, "eu-1", ahead=True)  # fails (quota, once)
        await asyncio.sleep(0.2)
        net = await engine._network(inf, sim, g, "eu-1")
        assert net.region == "eu-1" and sim.stats.calls["ensure_network"] == 3
        engine._drop_network_tasks(inf)
        assert inf.net_tasks == {}
    finally:
        await sim.aclose()
