"""The provisioning engine against sim clouds whose VMs boot real agents (real NATS)."""

from __future__ import annotations

import dataclasses
from typing import Any

from controller.provision.contract import TAG_INFRA, TAG_MANAGED, InstanceState
from controller.provision.engine import Engine
from controller.provision.limits import ApiLimits
from controller.provision.model import InfraAction, InfraSpec, InfraView
from controller.provision.spec import spec_from_obj
from tests.fixtures.provision import FAST_ENGINE, INSTALLATION, SimLab
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


FAST_SIM = {"latency_max": 0.003, "boot_time": 0.03, "boot_jitter": 0.02}


async def test_networks_start_together_one_per_provider_and_region(simlab: SimLab) -> None:
    # Two groups share sim-a/east-1, a third is on sim-b: one ensure_network per provider
    # and region (two in flight at once could each make a network), and all of them
    # started at the pass's start, side by side (not each at its group's first launch).
    slow = {"latency_min": 0.2, "latency_max": 0.2, "boot_time": 0.03, "boot_jitter": 0.0}
    a = await simlab.sim("sim-a", **slow)
    b = await simlab.sim("sim-b", **slow)
    async with simlab.engine({"sim-a": a, "sim-b": b}) as engine:
        await engine.create(spec(
            engine, "nets",
            {"name": "fe", "provider": "sim-a", "regions": ["east-1"], "size": "small",
             "count": 2},
            {"name": "be", "provider": "sim-a", "regions": ["east-1/east-1b"],
             "size": "small", "count": 1},
            {"name": "db", "provider": "sim-b", "regions": ["eu-1"], "size": "small",
             "count": 1}))
        view = await settled(engine, "nets")
        assert view.status == "ready", view.summary
        assert a.stats.calls["ensure_network"] == 1 and b.stats.calls["ensure_network"] == 1
        assert len(a.networks) == 1 and len(b.networks) == 1
        starts = [t for s in (a, b) for t, op, _r in s.stats.log if op == "ensure_network"]
        assert max(starts) - min(starts) < 0.15, starts  # less than one call's latency
        await engine.delete("nets")
        assert (await settled(engine, "nets")).status == "deleted"
        assert a.networks == {} and b.networks == {}


async def test_scale_out_and_in_removes_highest_index_after_confirmations(
        simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", terminate_time=0.02, gone_after=0.05, **FAST_SIM)
    async with simlab.engine({"sim-a": a}) as engine:
        await engine.create(spec(engine, "app", {"name": "w", "provider": "sim-a",
                                                 "regions": ["west-1"], "size": "small",
                                                 "count": 2}))
        assert (await settled(engine, "app")).status == "ready"
        await engine.act("app", InfraAction(action="scale", group="w", count=5))
        view = await settled(engine, "app")
        assert view.status == "ready" and view.groups[0].ready == 5
        assert a.stats.launches.total() == 5  # the gap only
        ids = {n.name: n.vm_id for n in view.groups[0].nodes}
        await engine.act("app", InfraAction(action="scale", group="w", count=2))
        view = await settled(engine, "app")
        assert view.status == "ready", view.summary
        assert [n.name for n in view.groups[0].nodes] == ["app-w-0", "app-w-1"]
        assert {i.id for i in a.live()} == {ids["app-w-0"], ids["app-w-1"]}
        # Deleted only after 3 consecutive "gone" answers: at least 3 queries after.
        assert a.stats.calls["terminate_instances"] >= 1
        assert not [r for r in simlab.controller.nodes if r.infra_node in
                    ("app-w-2", "app-w-3", "app-w-4")]
        assert engine._table.get("app").retire == {}  # type: ignore[union-attr]
        await engine.delete("app")
        assert (await settled(engine, "app")).status == "deleted"
        assert a.live() == []


async def test_partial_failure_continue_reports_capacity(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", capacity={"east-1/east-1a": 2}, **FAST_SIM)
    async with simlab.engine({"sim-a": a}, limits={"sim-a": ApiLimits(batch=2)}) as engine:
        await engine.create(spec(engine, "pf", {"name": "g", "provider": "sim-a",
                                                "regions": ["east-1/east-1a"],
                                                "size": "small", "count": 4}))
        view = await settled(engine, "pf")
        assert view.status == "degraded"
        assert view.summary == "Running 2/4, Failed 2 (capacity in zone east-1a)"
        assert view.groups[0].reasons == {"capacity in zone east-1a": 2}
        assert len(a.live()) == 2
        await engine.delete("pf")
        await settled(engine, "pf")
        assert a.live() == []


async def test_partial_failure_rollback_removes_the_group(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", capacity={"east-1/east-1a": 2}, **FAST_SIM)
    async with simlab.engine({"sim-a": a}, limits={"sim-a": ApiLimits(batch=2)}) as engine:
        await engine.create(spec(
            engine, "rb",
            {"name": "g", "provider": "sim-a", "regions": ["east-1/east-1a"],
             "size": "small", "count": 4, "on_partial_failure": "rollback"},
            {"name": "ok", "provider": "sim-a", "regions": ["west-1"], "size": "small",
             "count": 1}))
        view = await settled(engine, "rb")
        g, ok = view.groups
        assert g.failed == 4 and g.ready == 0 and ok.ready == 1
        assert view.status == "degraded"
        assert [i.name for i in a.live()] == ["rb-ok-0"]  # the failed group rolled back
        assert "rolled back" in g.nodes[0].error
        # A rolled-back group stays down until the next create.
        assert engine._table.get("rb").halted  # type: ignore[union-attr]
        await engine.delete("rb")
        await settled(engine, "rb")
        assert a.live() == []


async def test_failover_on_capacity_and_quota(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", capacity={"east-1/east-1a": 0, "east-1/east-1b": 1},
                         failures=[{"op": "run_instances", "error": "quota",
                                    "region": "east-1", "zone": "east-1c", "times": 0}],
                         **FAST_SIM)
    async with simlab.engine({"sim-a": a}, limits={"sim-a": ApiLimits(batch=3)}) as engine:
        await engine.create(spec(engine, "fo", {"name": "g", "provider": "sim-a",
                                                "regions": ["east-1", "eu-1/eu-1b"],
                                                "size": "small", "count": 3}))
        view = await settled(engine, "fo")
        assert view.status == "ready", view.summary
        zones = sorted(n.zone for n in view.groups[0].nodes)
        # 1a full, 1b too small for a batch of 3, 1c over quota (blocks the region):
        # everything lands in the next region.
        assert zones == ["eu-1b"] * 3
        assert a.stats.calls["run_instances"] == 4
        await engine.delete("fo")
        await settled(engine, "fo")


async def test_rate_and_concurrency_limits_are_never_exceeded(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", rate=20, burst=4, latency_min=0.01, latency_max=0.03,
                         boot_time=0.05)
    lim = ApiLimits(rate=20, burst=4, concurrency=2, batch=1)
    async with simlab.engine({"sim-a": a}, limits={"sim-a": lim}) as engine:
        await engine.create(spec(
            engine, "rl", *({"name": f"g{i}", "provider": "sim-a", "regions": ["east-1"],
                             "size": "small", "count": 4} for i in range(3))))
        view = await settled(engine, "rl")
        assert view.status == "ready", view.summary
        assert a.stats.throttled == 0
        assert a.stats.max_concurrent <= 2
        # A token bucket of 20/s with bursts of 4: never more than 4 + 20 in a second,
        # never more than 4 + 2 in 0.1 s.
        assert a.stats.max_in_window(1.0) <= 24
        assert a.stats.max_in_window(0.1) <= 6
        assert a.stats.total >= 16  # enough calls for the limit to matter
        await engine.delete("rl")
        await settled(engine, "rl")
        assert a.stats.throttled == 0 and a.stats.max_concurrent <= 2


async def test_throttling_is_retried_with_backoff(simlab: SimLab) -> None:
    # The engine believes in a higher rate than the sim allows: throttled, retried.
    a = await simlab.sim("sim-a", rate=5, burst=1, **FAST_SIM)
    lim = ApiLimits(rate=1000, burst=100, concurrency=8, batch=1)
    patient = dataclasses.replace(FAST_ENGINE, backoff=0.1, backoff_max=0.5, attempts=10)
    async with simlab.engine({"sim-a": a}, limits={"sim-a": lim},
                             settings=patient) as engine:
        await engine.create(spec(engine, "th", {"name": "g", "provider": "sim-a",
                                                "regions": ["east-1"], "size": "small",
                                                "count": 3}))
        view = await settled(engine, "th")
        assert view.status == "ready", view.summary
        assert a.stats.throttled > 0
        assert a.stats.launches.total() == 3
        await engine.delete("th")
        await settled(engine, "th")


async def test_credentials_error_stops_that_providers_groups(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", **FAST_SIM)
    b = await simlab.sim("sim-b", **FAST_SIM)
    b.credentials_ok = False
    async with simlab.engine({"sim-a": a, "sim-b": b}) as engine:
        await engine.create(spec(
            engine, "cr",
            {"name": "good", "provider": "sim-a", "regions": ["east-1"], "size": "small",
             "count": 2},
            {"name": "bad", "provider": "sim-b", "regions": ["east-1"], "size": "small",
             "count": 2}))
        view = await settled(engine, "cr")
        good, bad = view.groups
        assert good.ready == 2 and bad.failed == 2
        assert view.status == "degraded"
        assert "credentials refused by provider sim-b" in view.summary
        assert "AuthFailure" in bad.nodes[0].error
        calls = b.stats.total
        # Fixed credentials + a re-run: the gap is created.
        b.credentials_ok = True
        await engine.create(view.spec)
        view = await settled(engine, "cr")
        assert view.status == "ready", view.summary
        assert b.stats.total > calls
        await engine.delete("cr")
        await settled(engine, "cr")


async def test_leaks_reported_and_gc_removes_unknown_vms(simlab: SimLab) -> None:

    from controller.provision.contract import LaunchRequest, Network, Placement

    a = await simlab.sim("sim-a", idempotent_names=False, gone_after=0.0, **FAST_SIM)
    async with simlab.engine({"sim-a": a}) as engine:
        await engine.create(spec(engine, "lk", {"name": "g", "provider": "sim-a",
                                                "regions": ["east-1/east-1a"],
                                                "size": "small", "count": 1}))
        assert (await settled(engine, "lk")).status == "ready"
        net = Network(id="n", region="east-1", cidr="10.0.0.0/16")
        pl = Placement("sim-a", "east-1", "east-1a")
        img = a.catalog().images["ubuntu-24.04"].id
        # A duplicate of a node, a node beyond the count, and an infra nobody knows.
        base = {TAG_MANAGED: INSTALLATION, TAG_INFRA: "lk", "barista-group": "g"}
        dup, extra = await a.run_instances(pl, net, [
            LaunchRequest(name="lk-g-0", size="small", image=img, user_data="",
                          tags={**base, "barista-node": "lk-g-0"}),
            LaunchRequest(name="lk-g-7", size="small", image=img, user_data="",
                          tags={**base, "barista-node": "lk-g-7"})])
        (orphan,) = await a.run_instances(pl, net, [LaunchRequest(
            name="ghost-g-0", size="small", image=img, user_data="",
            tags={TAG_MANAGED: INSTALLATION, TAG_INFRA: "ghost", "barista-group": "g"})])
        # Someone else's VM (not our installation) is never touched.
        (foreign,) = await a.run_instances(pl, net, [LaunchRequest(
            name="x", size="small", image=img, user_data="",
            tags={TAG_MANAGED: "another-controller", TAG_INFRA: "ghost"})])
        await engine.create(engine.get("lk").spec)  # type: ignore[union-attr]
        view = await settled(engine, "lk")
        assert sorted(view.leaks) == sorted([dup.id, extra.id])  # reported, not deleted
        assert view.status == "ready"
        listed = await engine.gc(confirm=False)
        assert sorted(v.vm_id for v in listed) == sorted([dup.id, extra.id, orphan.id])
        assert {i.id for i in a.live()} >= {dup.id, extra.id, orphan.id}
        removed = await engine.gc(confirm=True, vm_ids=[orphan.id, dup.id])
        assert {v.vm_id for v in removed if v.phase == "deleted"} == {orphan.id, dup.id}
        live = {i.id for i in a.live()}
        assert orphan.id not in live and dup.id not in live and extra.id in live
        assert foreign.id in live
        await engine.gc(confirm=True)
        assert await engine.gc(confirm=False) == []
        await engine.delete("lk")
        await settled(engine, "lk")
        assert [i.id for i in a.live()] == [foreign.id]


async def test_suspend_resume_reboot(simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", stop_time=0.02, **FAST_SIM)
    async with simlab.engine({"sim-a": a}) as engine:
        await engine.create(spec(engine, "pw", {"name": "g", "provider": "sim-a",
                                                "regions": ["east-1"], "size": "small",
                                                "count": 2}))
        assert (await settled(engine, "pw")).status == "ready"
        await engine.act("pw", InfraAction(action="suspend"))
        view = await settled(engine, "pw")
        assert view.status == "suspended"
        assert {i.state for i in a.live()} == {InstanceState.STOPPED}
        assert not simlab.agents  # the agents stopped with their VMs
        await engine.act("pw", InfraAction(action="resume"))
        view = await settled(engine, "pw")
        assert view.status == "ready", view.summary
        assert len(simlab.agents) == 2
        boots = a.stats.boots
        await engine.act("pw", InfraAction(action="reboot", group="g"))
        view = await settled(engine, "pw")
        assert view.status == "ready", view.summary
        assert a.stats.boots == boots + 2
        assert a.stats.launches.total() == 2
        await engine.delete("pw")
        await settled(engine, "pw")


async def test_review_plans_the_gap_with_cost_and_progress_is_streamed(
        simlab: SimLab) -> None:
    a = await simlab.sim("sim-a", **FAST_SIM)
    async with simlab.engine({"sim-a": a}) as engine:
        s = spec(engine, "rv", {"name": "g", "provider": "sim-a", "regions": ["eu-1"],
                                "size": {"vcpus": 2, "memory_gb": 2}, "count": 3})
        plan = await engine.review(s)
        (item,) = plan.items
        assert (item.size, item.region, item.count, item.existing) == ("medium", "eu-1", 3, 0)
        assert item.price_hour == 0.0466 and plan.total_hour == round(3 * 0.0466, 4)
        assert a.stats.total == 0  # a review calls no provider
        assert engine.get("rv") is None
        events: list[Any] = []
        unsubscribe = engine.subscribe(events.append)
        await engine.create(s)
        assert (await settled(engine, "rv")).status == "ready"
        unsubscribe()
        phases = {(e.node, e.phase) for e in events}
        assert {("rv-g-0", "booting"), ("rv-g-0", "ready")} <= phases
        assert events[-1].phase == "ready" and events[-1].message == "Running 3/3"
        bigger = spec(engine, "rv", {"name": "g", "provider": "sim-a", "regions": ["eu-1"],
                                     "size": {"vcpus": 2, "memory_gb": 2}, "count": 5})
        (item,) = (await engine.review(bigger)).items
        assert (item.count, item.existing) == (2, 3)
        smaller = spec(engine, "rv", {"name": "g", "provider": "sim-a", "regions": ["eu-1"],
                                      "size": "medium", "count": 1})
        plan = await engine.review(smaller)
        assert plan.items[0].count == 0 and "2 node(s) beyond count 1" in plan.warnings[0]
        assert [v.name for v in engine.infras()] == ["rv"]
        await engine.delete("rv")
        await settled(engine, "rv")
        assert [v.status for v in engine.infras()] == ["deleted"]
