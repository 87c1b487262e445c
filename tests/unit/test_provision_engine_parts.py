"""Engine parts that need no NATS: the token bucket (fake clock), failure reasons and the
status summary."""

from __future__ import annotations

import itertools

from controller.provision.contract import CapacityError, CredentialsError, QuotaError
from controller.provision.engine import TokenBucket, _summary, reason_of
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
