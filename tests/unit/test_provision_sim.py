"""The sim provider's own behaviour: counts, rate limit, capacity, injected failures,
idempotency by name, the terminate lifecycle (with a fake clock: no waiting)."""

from __future__ import annotations

import pytest

from controller.provision.contract import (
    CapacityError,
    CredentialsError,
    InstanceState,
    LaunchRequest,
    Network,
    NotFoundError,
    Placement,
    Provider,
    QuotaError,
    TransientError,
)
from controller.provision.providers.sim import FailureRule, SimProvider, SimSettings
from controller.provision.registry import PROVIDERS, ProviderConfigError, create_provider


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s


NET = Network(id="n", region="east-1", cidr="10.0.0.0/16")
PL = Placement("sim", "east-1", "east-1a")


def req(name: str, infra: str = "i") -> LaunchRequest:
    return LaunchRequest(name=name, size="small", image="sim-img-ubuntu-2404", user_data="",
                         tags={"barista-infra": infra, "barista-node": name})


def sim(**kw: object) -> tuple[SimProvider, FakeClock]:
    clock = FakeClock()
    return SimProvider(SimSettings(**kw), clock=clock, sleep=clock.sleep), clock  # type: ignore[arg-type]


def test_registry_builds_a_typed_sim_and_names_bad_settings() -> None:
    p = create_provider("sim", name="sim-b", settings={"rate": 5, "max_batch": 10})
    assert isinstance(p, Provider) and p.name == "sim-b"
    assert isinstance(p, SimProvider) and p.settings.rate == 5
    assert "sim" in PROVIDERS
    with pytest.raises(ProviderConfigError, match="unknown field `rat`"):
        create_provider("sim", settings={"rat": 5})
    with pytest.raises(ProviderConfigError, match="unknown provider kind 'nope'"):
        create_provider("nope")


async def test_rate_limit_throttles_beyond_the_bucket() -> None:
    p, clock = sim(rate=2, burst=2)
    await p.query_instances({})
    await p.query_instances({})
    with pytest.raises(TransientError, match="throttled") as info:
        await p.query_instances({})
    assert info.value.code == "RequestLimitExceeded" and info.value.retryable
    clock.now += 0.5  # one token back
    await p.query_instances({})
    assert p.stats.calls["query_instances"] == 4 and p.stats.throttled == 1


async def test_capacity_per_zone_and_idempotent_names() -> None:
    p, _ = sim(capacity={"east-1/east-1a": 2})
    a = await p.run_instances(PL, NET, [req("a"), req("b")])
    again = await p.run_instances(PL, NET, [req("a")])  # exists: returned, not created
    assert again[0].id == a[0].id and p.stats.launches.total() == 2
    with pytest.raises(CapacityError) as info:
        await p.run_instances(PL, NET, [req("c")])
    assert info.value.zone == "east-1a" and info.value.scope == "zone"
    assert info.value.where == "zone east-1a"
    other = await p.run_instances(Placement("sim", "east-1", "east-1b"), NET, [req("c")])
    assert other[0].placement.zone == "east-1b"


async def test_injected_failures_by_op_count_and_probability() -> None:
    rules = [FailureRule(op="run_instances", error="quota", after=1, times=2),
             FailureRule(op="stop_instances", error="credentials"),
             FailureRule(op="query_instances", error="transient", times=0, probability=0.5)]
    p, _ = sim(failures=rules, seed=7)
    await p.run_instances(PL, NET, [req("a")])  # skipped by after=1
    for _ in range(2):
        with pytest.raises(QuotaError):
            await p.run_instances(PL, NET, [req("b")])
    await p.run_instances(PL, NET, [req("b")])  # times=2 used up
    with pytest.raises(CredentialsError):
        await p.stop_instances("east-1", [])
    failed = 0
    for _ in range(200):
        try:
            await p.query_instances({})
        except TransientError:
            failed += 1
    assert 70 < failed < 130  # seeded: the same every run


async def test_terminate_lifecycle_and_not_found() -> None:
    p, clock = sim(terminate_time=1.0, gone_after=5.0, boot_time=2.0)
    (vm,) = await p.run_instances(PL, NET, [req("a")])
    assert vm.state is InstanceState.PENDING
    await clock.sleep(0)
    await p.terminate_instances("east-1", [vm.id])
    states = [i.state for i in await p.query_instances({"barista-infra": "i"})]
    assert states == [InstanceState.TERMINATING]
    with pytest.raises(NotFoundError):
        await p.terminate_instances("east-1", ["i-nope"])
    assert p.live() == []
    await p.aclose()


def test_max_in_window() -> None:
    from controller.provision.providers.sim import SimStats

    st = SimStats(log=[(t, "q", "r") for t in (0.0, 0.1, 0.2, 1.15, 1.2, 3.0)])
    assert st.max_in_window(1.0) == 3
    assert st.max_in_window(0.15) == 2


def test_providers_from_config_and_installation_id(tmp_path) -> None:
    from controller.provision.engine import installation_id
    from controller.provision.registry import providers_from_config

    got = providers_from_config({"sim-a": {"kind": "sim", "rate": 3}, "sim": {}})
    assert sorted(got) == ["sim", "sim-a"] and got["sim-a"].name == "sim-a"
    first = installation_id(tmp_path / "data")
    assert first == installation_id(tmp_path / "data") and first.startswith("b-")
