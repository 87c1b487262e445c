"""Kill the engine at random points of a create and of a delete; a fresh engine on the
same KV must finish the job with no duplicate VM, no leak, and nothing for gc.

The sim here does *not* dedupe by name (``idempotent_names=False``, a harsher cloud than
the contract promises), so only the engine's own journal and tag queries prevent
duplicates. A kill lands inside a provider call, either after its intent was journaled but
before it had any effect ("before") or after its effect but before the engine saw the
answer ("after"); other calls in flight at that moment are cut wherever they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from controller.provision.contract import TAG_INFRA
from controller.provision.engine import Engine
from controller.provision.limits import ApiLimits
from controller.provision.providers.sim import SimProvider
from controller.provision.spec import spec_from_obj
from tests.fixtures.provision import SimLab, settled_in
from tests.fixtures.wait import wait_for

SIM = {"latency_min": 0.001, "latency_max": 0.004, "boot_time": 0.03, "boot_jitter": 0.02,
       "terminate_time": 0.01, "gone_after": 0.02, "idempotent_names": False}
LIMITS = {"sim-a": ApiLimits(batch=2), "sim-b": ApiLimits(batch=2)}
POINTS = 10


def infra(engine: Engine, name: str) -> object:
    return spec_from_obj({"name": name, "groups": [
        {"name": "a", "provider": "sim-a", "regions": ["east-1"], "size": "small",
         "count": 3},
        {"name": "b", "provider": "sim-b", "regions": ["eu-1/eu-1b", "west-1"],
         "size": "small", "count": 2}]}, catalogs=engine.catalogs())


class Killer:
    """A sim hook that counts call events and hangs the k-th one until the test kills."""

    def __init__(self) -> None:
        self.events = 0
        self.at = 0
        self.hit = asyncio.Event()
        self.where = ""

    async def __call__(self, when: str, op: str) -> None:
        self.events += 1
        if self.at and self.events == self.at:
            self.where = f"{when} {op}"
            self.hit.set()
            await asyncio.Event().wait()  # cancelled with the engine


async def settled(engine: Engine, name: str, statuses: tuple[str, ...]) -> None:
    await settled_in(engine, name, statuses, 30)


def live(sims: list[SimProvider], name: str) -> list[str]:
    return sorted(i.name for s in sims for i in s.live() if i.tags.get(TAG_INFRA) == name)


async def check_clean(engine: Engine, sims: list[SimProvider], name: str, expect: list[str]
                      ) -> None:
    assert live(sims, name) == expect, f"{name}: live VMs {live(sims, name)}"
    for s in sims:
        dups = {n: c for n, c in s.stats.launches.items() if n.startswith(f"{name}-")
                and c > 1}
        assert not dups, f"{name}: created twice: {dups}"
    assert await engine.gc(confirm=False) == []


async def run_killed(simlab: SimLab, sims: dict[str, SimProvider], killer: Killer,
                     action) -> tuple[str, bool]:
    """Start an engine, run ``action`` on it, kill it at the killer's point. Returns where,
    and whether the action had returned (the request was answered) before the kill."""
    done = asyncio.Event()

    async def run() -> None:
        async with simlab.engine(sims, limits=LIMITS) as engine:
            killer.events = 0  # count from the action on (start-up queries are not in it)
            await action(engine)
            done.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(run())
    waiter = asyncio.create_task(killer.hit.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return killer.where or "not reached", done.is_set()


async def count_events(simlab: SimLab, sims: dict[str, SimProvider], name: str,
                       delete: bool) -> int:
    """Hook events of one uninterrupted run (to draw the kill points from)."""
    counter = Killer()
    for s in sims.values():
        s.hook = counter
    async with simlab.engine(sims, limits=LIMITS) as engine:
        await engine.create(infra(engine, name))  # type: ignore[arg-type]
        await settled(engine, name, ("ready",))
        if delete:
            counter.events = 0
            await engine.delete(name)
            await settled(engine, name, ("deleted",))
        else:
            counter.events, n = 0, counter.events
            await engine.delete(name)
            await settled(engine, name, ("deleted",))
            return n
    return counter.events


@pytest.mark.slow
async def test_killed_during_create_resumes_without_duplicate_or_leak(simlab: SimLab) -> None:
    sims = {"sim-a": await simlab.sim("sim-a", **SIM), "sim-b": await simlab.sim("sim-b", **SIM)}
    total = await count_events(simlab, sims, "probe", delete=False)
    assert total >= 20
    rng = random.Random(1101)
    points = sorted(rng.sample(range(1, total + 1), POINTS))
    seen = []
    for i, k in enumerate(points):
        name = f"kc{i}"
        killer = Killer()
        killer.at = k
        for s in sims.values():
            s.hook = killer
        where, answered = await run_killed(simlab, sims, killer,
                                           lambda e, n=name: e.create(infra(e, n)))
        seen.append(where)
        for s in sims.values():
            s.hook = None
        async with simlab.engine(sims, limits=LIMITS) as engine:
            if not answered:  # killed before it answered: the client sends it again
                await engine.create(infra(engine, name))  # type: ignore[arg-type]
            await settled(engine, name, ("ready",))
            view = engine.get(name)
            assert view is not None and view.status == "ready", (where, view)
            assert not view.leaks, (where, view.leaks)
            expect = sorted([f"{name}-a-{j}" for j in range(3)] +
                            [f"{name}-b-{j}" for j in range(2)])
            await check_clean(engine, list(sims.values()), name, expect)
            await wait_for(lambda n=name: sum(1 for r in simlab.controller.nodes
                                              if r.infra == n) == 5, 10, "5 nodes enrolled")
            await engine.delete(name)
            await settled(engine, name, ("deleted",))
            await check_clean(engine, list(sims.values()), name, [])
    assert len([w for w in seen if w != "not reached"]) >= POINTS, seen


@pytest.mark.slow
async def test_killed_during_delete_finishes_without_leak(simlab: SimLab) -> None:
    sims = {"sim-a": await simlab.sim("sim-a", **SIM), "sim-b": await simlab.sim("sim-b", **SIM)}
    total = await count_events(simlab, sims, "probe", delete=True)
    assert total >= 10
    rng = random.Random(1102)
    points = sorted(rng.sample(range(1, total + 1), min(POINTS, total)))
    while len(points) < POINTS:
        points.append(rng.randint(1, total))
    seen = []
    for i, k in enumerate(points):
        name = f"kd{i}"
        for s in sims.values():
            s.hook = None
        async with simlab.engine(sims, limits=LIMITS) as engine:
            await engine.create(infra(engine, name))  # type: ignore[arg-type]
            await settled(engine, name, ("ready",))
        killer = Killer()
        killer.at = k
        for s in sims.values():
            s.hook = killer
        where, answered = await run_killed(simlab, sims, killer,
                                           lambda e, n=name: e.delete(n))
        seen.append(where)
        for s in sims.values():
            s.hook = None
        async with simlab.engine(sims, limits=LIMITS) as engine:
            if not answered:
                await engine.delete(name)
            await settled(engine, name, ("deleted",))
            await check_clean(engine, list(sims.values()), name, [])
            left = [(r.id, r.hostname, r.infra_node, r.vm_id, r.token_id)
                    for r in simlab.controller.nodes if r.infra == name]
            assert not left, (where, left, engine.get(name))
            assert engine.get(name) is not None
        for s in sims.values():
            assert not [k for k in s.networks if k[0] == name], s.networks
    assert len([w for w in seen if w != "not reached"]) >= POINTS, seen


async def test_gc_killed_after_its_terminate_is_finished_by_the_next_engine(
        simlab: SimLab) -> None:
    from controller.provision.contract import TAG_MANAGED, LaunchRequest, Network, Placement
    from tests.fixtures.provision import INSTALLATION

    a = await simlab.sim("sim-a", **SIM)
    sims = {"sim-a": a}
    (orphan,) = await a.run_instances(
        Placement("sim-a", "east-1", "east-1a"), Network(id="n", region="east-1", cidr=""),
        [LaunchRequest(name="ghost-g-0", size="small", image="sim-img-ubuntu-2404",
                       user_data="", tags={TAG_MANAGED: INSTALLATION, TAG_INFRA: "ghost"})])
    killer = Killer()
    a.hook = killer

    async def gc(engine: Engine) -> None:
        # Hang inside the terminate, before its effect: the journal has the intent.
        killer.at = killer.events + 3  # the query (before, after), then the terminate
        await engine.gc(confirm=True)

    where, answered = await run_killed(simlab, sims, killer, gc)
    assert where == "before terminate_instances" and not answered
    a.hook = None
    assert [i.id for i in a.live()] == [orphan.id]  # not terminated yet
    async with simlab.engine(sims, limits=LIMITS) as engine:
        await wait_for(lambda: a.live() == [], 10, "the gc's delete finished")
        await wait_for(lambda: not engine._journal.open("_gc"), 10, "gc journal pruned")
        assert await engine.gc(confirm=False) == []
