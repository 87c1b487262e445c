"""Creating VMs: the networks (one ``ensure_network`` in flight per provider and region),
placement with failover (capacity and quota errors block their scope), the journaled
launch of a batch, and the wait until the launched nodes are Ready."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from controller.provision.contract import (
    TAG_NODE,
    CapacityError,
    CredentialsError,
    InstanceState,
    LaunchRequest,
    Network,
    NetworkRequest,
    Placement,
    Provider,
    ProvisionError,
    QuotaError,
)
from controller.provision.engine.observe import Observation
from controller.provision.engine.records import _Infra, _Node, reason_of
from controller.provision.model import LABEL_GROUP, LABEL_INFRA, GroupSpec
from controller.provision.spec import resolve_size

log = logging.getLogger("barista.controller.provision")


class Launching(Observation):
    """Networks, placement and failover, launch batches, the wait for Ready."""

    def _network_regions(self, inf: _Infra, g: GroupSpec) -> list[str]:
        """Where the group's launches go first: its first placement's region, and the
        regions of its open create intents (a killed engine's names are tried there
        first). Failover regions get their network when a batch fails over to them."""
        regions = self._regions(g)  # (cleanup removes networks in these only)
        hinted = [op.region for op in self._journal.open(inf.name, op="create", group=g.name)
                  if op.provider == g.provider and op.region in regions]
        return list(dict.fromkeys([regions[0], *hinted]))

    def _network_task(self, inf: _Infra, prov: Provider, g: GroupSpec, region: str, *,
                      ahead: bool = False) -> asyncio.Task[Network]:
        """The ensure_network of (provider, region) in flight, else a new one."""
        key = (prov.name, region)
        running = inf.net_tasks.get(key)
        if running is not None and not (running[0].done() and (
                running[0].cancelled() or running[0].exception() is not None)):
            return running[0]
        req = NetworkRequest(infra=inf.name, region=region, ssh_from=tuple(g.ssh_from),
                             ssh_public_key=g.ssh_public_key, tags=self._tags(inf.name))

        async def make() -> Network:
            net = await self._call(prov, region, "ensure_network",
                                   lambda: prov.ensure_network(req))
            inf.networks[key] = net
            return net

        task = asyncio.ensure_future(make())
        inf.net_tasks[key] = (task, ahead)
        return task

    def _drop_network_tasks(self, inf: _Infra) -> None:
        """At a pass's end: what was started ahead and not needed (its group halted) is
        cancelled; failures nobody awaited are read (they were retried or reported)."""
        for task, _ in inf.net_tasks.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()
        inf.net_tasks.clear()

    async def _network(self, inf: _Infra, prov: Provider, g: GroupSpec, region: str
                       ) -> Network:
        key = (prov.name, region)
        net = inf.networks.get(key)
        if net is not None:
            return net
        task = self._network_task(inf, prov, g, region)
        ahead = inf.net_tasks[key] == (task, True)
        try:
            return await task
        except ProvisionError:
            if not ahead:
                raise
        # Started ahead and failed (retries exhausted before any launch needed it): the
        # launch tries once more on its own, as it would have without the head start.
        return await self._network_task(inf, prov, g, region)

    async def _launch(self, inf: _Infra, g: GroupSpec, nodes: list[_Node]) -> None:
        prov = self._providers[g.provider]
        placements = self._placements(g)
        lim = self._limit(g.provider)
        blocked: set[str] = set()
        reasons: dict[str, str] = {}
        # Open create intents (a kill before their answer): try those names there first.
        hint: dict[str, Placement] = {}
        for op in self._journal.open(inf.name, op="create", group=g.name):
            for name in op.names:
                hint[name] = op.placement
        batches: list[list[_Node]] = []
        by_hint: dict[Placement | None, list[_Node]] = {}
        for n in nodes:
            by_hint.setdefault(hint.get(n.name), []).append(n)
        for _, ns in sorted(by_hint.items(), key=lambda kv: kv[0] is None):
            for i in range(0, len(ns), max(1, lim.batch)):
                batches.append(ns[i:i + lim.batch])
        for n in nodes:
            n.phase, n.error, n.reason = "creating", "", ""
        self._emit_group(inf, g)

        def block_key(p: Placement, scope: str) -> list[str]:
            return {"zone": [f"z:{p.region}/{p.zone}"], "region": [f"r:{p.region}"],
                    "provider": ["p:"]}.get(scope, [f"r:{p.region}"])

        def is_blocked(p: Placement) -> bool:
            return (f"z:{p.region}/{p.zone}" in blocked or f"r:{p.region}" in blocked
                    or "p:" in blocked)

        async def place(batch: list[_Node]) -> None:
            first = hint.get(batch[0].name)
            order = ([first] if first in placements else []) + [
                p for p in placements if p != first]
            last_reason = "no placement left"
            for p in order:
                if is_blocked(p):
                    last_reason = reasons.get(str(p), last_reason)
                    continue
                try:
                    await self._launch_batch(inf, prov, g, p, batch)
                    return
                except (CapacityError, QuotaError) as exc:
                    for k in block_key(p, exc.scope):
                        blocked.add(k)
                    last_reason = reasons[str(p)] = reason_of(exc)
                    self._emit(inf, group=g.name, phase="creating",
                               message=f"{reason_of(exc)}: failing over")
                    continue
                except CredentialsError:
                    raise
                except ProvisionError as exc:
                    self._fail(inf, batch, reason_of(exc), exc.message)
                    return
            self._fail(inf, batch, last_reason)

        await asyncio.gather(*(place(b) for b in batches))

    async def _launch_batch(self, inf: _Infra, prov: Provider, g: GroupSpec, p: Placement,
                            batch: list[_Node]) -> None:
        cat = prov.catalog()
        size = resolve_size(cat, g.size, p.region).size
        image = cat.images[g.image].id
        network = await self._network(inf, prov, g, p.region)
        spec = inf.record.spec
        labels_base = {**spec.labels, **g.labels, LABEL_INFRA: inf.name, LABEL_GROUP: g.name,
                       "provider": g.provider, "region": p.region}
        if p.zone:
            labels_base["zone"] = p.zone

        async def request(n: _Node) -> LaunchRequest:
            labels = {**labels_base, TAG_NODE: n.name}
            text = await self._renderer(spec, g, n.name, labels, network)
            return LaunchRequest(name=n.name, size=size.name, image=image, user_data=text,
                                 tags=self._tags(inf.name, g.name, n.name))

        reqs = list(await asyncio.gather(*(request(n) for n in batch)))
        op = await self._journal.intent(infra=inf.name, group=g.name, op="create",
                                        placement=p, names=[n.name for n in batch])
        for n in batch:
            n.trying = p
        try:
            made = await self._call(prov, p.region, "run_instances",
                                    lambda: prov.run_instances(p, network, reqs))
        except ProvisionError as exc:
            await self._journal.finish(op, error=f"{exc.kind}: {exc.message}")
            raise
        finally:
            for n in batch:
                n.trying = None
        await self._journal.finish(op, ids=[i.id for i in made])
        now = self._clock()
        by_name = {n.name: n for n in batch}
        for inst in made:
            node = by_name.get(inst.name)
            if node is None:
                inf.leaks[inst.id] = inst
                continue
            node.launched_at = now
            self._adopt(inf, node, inst)
            self._emit(inf, group=g.name, node=node.name, phase=node.phase,
                       message=f"{inst.id} in {p}")
        for n in batch:
            if not n.vm_id:
                self._fail(inf, [n], f"not created by {prov.name}",
                           f"{prov.name} did not return a VM for {n.name}")
        self._emit_group(inf, g)

    async def _await_ready(self, inf: _Infra, g: GroupSpec,
                           launching: asyncio.Future[None] | None = None) -> None:
        """Until every launched node of ``g`` is Ready (or failed). While ``launching`` (the
        group's launches) runs, it returns when they failed, and nodes whose create is in
        flight count too once their agent is online: their VM is looked up by a query
        (adopted by tags, as any), not waited for until their batch is answered."""
        s = self.settings
        start = self._clock()
        while True:
            if launching is not None and launching.done():
                if launching.cancelled() or launching.exception() is not None:
                    return  # the caller raises it
                launching = None
            nodes = [n for n in self._group_nodes(inf, g) if n.vm_id or (
                launching is not None and n.trying is not None and n.online)]
            pending = [n for n in nodes if n.phase not in ("ready", "failed", "stopped")]
            if not pending and launching is None:
                return
            now = self._clock()
            late = [n for n in pending if n.vm_id
                    and now - (n.launched_at or start) > s.ready_timeout]
            if late:
                self._fail(inf, late, "agent not online",
                           f"agent not online within {s.ready_timeout:g}s of launch")
                continue
            # The VM state is only asked for when an agent came online before we saw its
            # VM running (that is when the answer matters), or rarely otherwise.
            want = any(n.online and n.vm_state is not InstanceState.RUNNING for n in pending)
            regions = {n.placement.region for n in pending if n.placement and n.vm_id}
            regions |= {n.trying.region for n in pending if n.trying and not n.vm_id}
            due = set()
            for r in regions:
                since = now - self._last_query.get((g.provider, r, inf.name), 0.0)
                if (want and since >= s.poll_interval) or since >= s.slow_poll:
                    due.add(r)
            if due:
                try:
                    await self._observe(inf, g, due)
                except ProvisionError as exc:
                    log.warning("infra %s group %s: query failed: %s", inf.name, g.name, exc)
                self._emit_group(inf, g)
                continue
            inf.changed.clear()
            changed: asyncio.Future[Any] = asyncio.ensure_future(inf.changed.wait())
            waits = [changed] if launching is None else [changed, launching]
            try:
                await asyncio.wait(waits, timeout=s.poll_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
