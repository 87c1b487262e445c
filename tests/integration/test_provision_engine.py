"""The provisioning engine against sim clouds whose VMs boot real agents (real NATS)."""

from __future__ import annotations

from controller.provision.contract import TAG_INFRA, TAG_MANAGED, InstanceState
from controller.provision.engine import ApiLimits, Engine
from controller.provision.model import InfraAction, InfraSpec, InfraView
from controller.provision.spec import spec_from_obj
from tests.fixtures.provision import INSTALLATION, SimLab
from tests.fixtures.wait import wait_for


def spec(engine: Engine, name: str, *groups: dict) -> InfraSpec:
    return spec_from_obj({"name": name, "groups": list(groups)}, catalogs=engine.catalogs())


async def settled(engine: Engine, name: str, timeout: float = 30.0) -> InfraView:
    await wait_for(lambda: (v := engine.get(name)) is not None and v.status not in (
        "creating", "pending", "deleting", "suspending", "resuming"), timeout,
        f"infra {name} to settle")
    await engine.wait_idle(name)
    view = engine.get(name)
    assert view is not None
    return view


async def test_create_two_providers_ready_and_rerun_creates_nothing(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", latency_max=0.005, boot_time=0.05, boot_jitter=0.03)
    b = await simlab.sim("sim-b", latency_max=0.005, boot_time=0.05)
    async with simlab.engine({"sim-a": a, "sim-b": b}) as engine:
        s = spec(engine, "web", {"name": "fe", "provider": "sim-a", "regions": ["east-1"],
                                 "size": "small", "count": 3},
                 {"name": "db", "provider": "sim-b", "regions": ["eu-1/eu-1b"],
                  "size": {"vcpus": 2, "memory_gb": 4}, "count": 2})
        await engine.create(s)
        view = await settled(engine, "web")
        assert view.status == "ready", view.summary
        assert view.summary == "Running 5/5"
        nodes = [n for g in view.groups for n in g.nodes]
        assert all(n.phase == "ready" and n.node_id and n.vm_id for n in nodes)
        # The node records link back to infra, group and VM.
        recs = {r.infra_node: r for r in simlab.controller.nodes if r.infra == "web"}
        await wait_for(lambda: all(r.vm_id for r in simlab.controller.nodes
                                   if r.infra == "web"), 10, "vm ids linked")
        recs = {r.infra_node: r for r in simlab.controller.nodes if r.infra == "web"}
        assert sorted(recs) == sorted(n.name for n in nodes)
        for n in nodes:
            assert recs[n.name].vm_id == n.vm_id and recs[n.name].group == n.group
            assert recs[n.name].labels["infra"] == "web"
        assert {n.zone for n in nodes if n.group == "db"} == {"eu-1b"}
        assert b.live()[0].size == "medium"  # the cheapest with 2 vCPUs / 4 GB
        launches = a.stats.launches.total() + b.stats.launches.total()
        calls_before = a.stats.total + b.stats.total
        assert launches == 5
        # A re-run creates only the gap: none.
        await engine.create(s)
        view = await settled(engine, "web")
        assert view.status == "ready"
        assert a.stats.launches.total() + b.stats.launches.total() == 5
        assert a.stats.calls["run_instances"] + b.stats.calls["run_instances"] == 2
        assert a.stats.total + b.stats.total - calls_before <= 4  # queries only
    # A fresh engine adopts what exists.
    async with simlab.engine({"sim-a": a, "sim-b": b}) as engine:
        view = await settled(engine, "web")
        assert view.status == "ready" and not view.leaks
        assert await engine.gc(confirm=False) == []
        await engine.delete("web")
        view = await settled(engine, "web")
        assert view.status == "deleted"
        assert a.live() == [] and b.live() == []
        assert not [r for r in simlab.controller.nodes if r.infra == "web"]
        assert a.networks == {} and b.networks == {}
