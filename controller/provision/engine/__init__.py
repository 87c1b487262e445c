"""The provisioning engine: reconciles each infra's desired state (KV ``infras``) against
what the providers report, and implements ``model.Infras`` for the API.

What it guarantees, and how:
- no duplicate: VMs are found by tags before anything is created (a re-run creates only
  the gap), and each create/delete call is journaled before it is made (``journal.py``);
- no leak: a delete is done only after ``confirmations`` consecutive provider answers that
  the VM is gone; VMs beyond the spec are reported (``InfraView.leaks``), and ``gc``
  removes VMs with our tag that the state does not know;
- the provider's limits are never exceeded: a token bucket per provider (and optionally
  per region) and a concurrency limit per provider+region sit in front of every call;
- errors decide: transient -> retry with backoff and jitter; capacity/quota -> fail over
  to the group's next zone/region (blocked by the error's scope); credentials -> that
  provider's groups stop with the provider's message;
- a node is Ready when its VM runs *and* its agent is online (the ``nodes`` table, linked
  at enrollment by the labels of the node's join token).

The parts, each a mixin of ``Engine`` on the state in ``base.py``: ``records.py`` (types),
``calls.py`` (provider calls: limits, retries), ``views.py`` (views, progress),
``observe.py`` (VMs by tag, agents online, Ready), ``launch.py`` (networks, placement
and failover, launches, the wait for Ready), ``remove.py`` (confirmed terminate, rollback,
scale-in, delete, gc), ``power.py`` (suspend, resume, reboot), ``reconcile.py`` (a pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import msgspec
from nats.js import JetStreamContext

from controller.errors import BadRequest, Conflict
from controller.models import NodeRecord
from controller.provision.contract import Catalog, Provider
from controller.provision.engine.power import Power
from controller.provision.engine.reconcile import Reconciler
from controller.provision.engine.records import (
    GC_JOURNAL,
    EngineSettings,
    ForgetNode,
    InfraRecord,
    UserDataRenderer,
    _index,
    installation_id,
    node_name,
    reason_of,
)
from controller.provision.engine.records import _Infra as _Infra  # (tests use it)
from controller.provision.engine.views import _summary as _summary  # (tests use it)
from controller.provision.journal import OpRecord
from controller.provision.limits import ApiLimits
from controller.provision.model import InfraAction, InfraSpec, InfraView, Plan, PlanItem, Progress
from controller.provision.spec import parse_spec, resolve_size, validate_spec
from controller.state.streams import INFRA_OPS_BUCKET, INFRAS_BUCKET, open_bucket
from controller.state.table import Table

log = logging.getLogger("barista.controller.provision")


class Engine(Reconciler, Power):
    """Implements ``controller.provision.model.Infras``. An async context manager: entering
    it loads the desired state, observes every infra at its providers and resumes what was
    in flight; leaving it cancels its work and writes nothing (a kill is the same)."""

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        for rec in self._nodes:
            self._on_node(rec.id, rec)
        self._unsubscribe = self._nodes.subscribe(self._on_node)
        for key in list(self._table_keys()):
            found = self._table.get(key)
            if found is not None:
                self._infras[key] = _Infra(key, found)
        # Know what exists before anything (gc, a create) can ask.
        results = await asyncio.gather(
            *(self._observe_all(inf) for inf in self._infras.values()), return_exceptions=True)
        for inf, res in zip(list(self._infras.values()), results, strict=True):
            if isinstance(res, BaseException):
                log.warning("infra %s: not observed at start: %s", inf.name, res)
        if self._journal.open(GC_JOURNAL):
            self._spawn(self._finish_gc())
        for inf in self._infras.values():
            if inf.record.status == "deleting":
                self._run(inf, functools.partial(self._delete_run, inf))
            elif inf.record.status in ("suspending",):
                self._run(inf, functools.partial(self._power_run, inf, "stop", ""))
            elif inf.record.status in ("resuming",):
                self._run(inf, functools.partial(self._power_run, inf, "start", ""))
            elif not inf.record.suspended:
                self._run(inf, functools.partial(self._reconcile, inf))

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _table_keys(self) -> list[str]:
        return [r.spec.name for r in self._table]

    def _run(self, inf: _Infra, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        old = inf.task
        if old is not None and not old.done():
            old.cancel()

        async def run() -> None:
            if old is not None and not old.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await old
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("infra %s: run failed", inf.name)
                self._emit(inf, phase="failed", message="internal error; see the log")

        task = asyncio.create_task(run(), name=f"infra-{inf.name}")
        inf.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self, inf: _Infra) -> None:
        task = inf.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait_idle(self, name: str) -> None:
        """Wait until the infra's current run is over (tests, the bench)."""
        inf = self._infras.get(name)
        while inf is not None and inf.task is not None and not inf.task.done():
            task = inf.task
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)
            if inf.task is task:
                break

    def catalogs(self) -> dict[str, Catalog]:
        return {name: p.catalog() for name, p in self._providers.items()}

    def parse(self, raw: bytes, *, yaml_text: bool) -> InfraSpec:
        return parse_spec(raw, catalogs=self.catalogs(), yaml_text=yaml_text)

    async def review(self, spec: InfraSpec) -> Plan:
        spec = validate_spec(spec, catalogs=self.catalogs())
        inf = self._infras.get(spec.name)
        items: list[PlanItem] = []
        total = 0.0
        warnings: list[str] = []
        for g in spec.groups:
            cat = self._providers[g.provider].catalog()
            first = self._placements(g)[0]
            size = resolve_size(cat, g.size, first.region)
            existing = 0
            if inf is not None:
                existing = sum(1 for n in inf.nodes.values()
                               if n.group == g.name and n.vm_id and n.index < g.count)
            price = size.price_hour
            if price is None:
                warnings.append(f"group {g.name}: no price for {size.size.name} in "
                                f"{first.region}")
            else:
                total += price * g.count
            items.append(PlanItem(
                group=g.name, provider=g.provider, region=first.region, zone=first.zone,
                size=size.size.name, vcpus=size.size.vcpus, memory_gb=size.size.memory_gb,
                image=g.image, count=max(0, g.count - existing), existing=existing,
                price_hour=price))
            if inf is not None:
                beyond = sum(1 for n in inf.nodes.values()
                             if n.group == g.name and n.vm_id and n.index >= g.count)
                if beyond:
                    warnings.append(f"group {g.name}: {beyond} node(s) beyond count "
                                    f"{g.count} will be removed")
        return Plan(infra=spec.name, items=items, total_hour=round(total, 4), warnings=warnings)

    async def create(self, spec: InfraSpec) -> InfraView:
        spec = validate_spec(spec, catalogs=self.catalogs())
        now = self._wall()
        inf = self._infras.get(spec.name)
        for g in spec.groups:
            self._refused.pop(g.provider, None)
        if inf is not None and inf.record.status == "deleting":
            raise Conflict(f"infra {spec.name!r} is being deleted; create it again when "
                           "the delete is done")
        if inf is None or inf.record.status == "deleted":
            rec = InfraRecord(spec=spec, status="creating", created_at=now, updated_at=now)
            try:
                await self._table.create(spec.name, rec)
            except Conflict:
                rec = await self._update_spec(spec)
            inf = self._infras[spec.name] = _Infra(spec.name, rec)
        else:
            old = {g.name: g for g in inf.record.spec.groups}
            gone = sorted(set(old) - {g.name for g in spec.groups})
            if gone:
                raise BadRequest(f"infra {spec.name!r}: groups {', '.join(gone)} are not in "
                                 "the new spec; scale them to 0 first")
            for g in spec.groups:
                if g.name in old and (g.provider != old[g.name].provider):
                    raise BadRequest(f"groups[{g.name}].provider cannot change "
                                     f"({old[g.name].provider} -> {g.provider})")
            inf.record = await self._update_spec(spec)
        self._emit(inf, phase="creating", message="reconciling")
        self._run(inf, functools.partial(self._reconcile, inf))
        return self._view(inf)

    async def _update_spec(self, spec: InfraSpec) -> InfraRecord:
        now = self._wall()

        def apply(cur: InfraRecord) -> InfraRecord:
            retire = {k: list(v) for k, v in cur.retire.items()}
            old = {g.name: g for g in cur.spec.groups}
            for g in spec.groups:
                if g.name in old and g.count < old[g.name].count:
                    names = [node_name(spec.name, g.name, i)
                             for i in range(g.count, old[g.name].count)]
                    retire[g.name] = sorted(set(retire.get(g.name, [])) | set(names))
                if g.name in retire:  # scaled out again over names being retired
                    keep = [n for n in retire[g.name] if _index(n) >= g.count]
                    retire[g.name] = keep
            return msgspec.structs.replace(
                cur, spec=spec, status="creating", updated_at=now, halted={}, suspended=False,
                retire={k: v for k, v in retire.items() if v},
                created_at=cur.created_at if cur.status != "deleted" else now)

        rec = await self._table.mutate(spec.name, apply)
        assert rec is not None
        return rec

    async def delete(self, name: str) -> InfraView:
        inf = self._get(name)
        await self._cancel(inf)  # a reconcile finishing now must not write over "deleting"
        if inf.record.status != "deleting":
            inf.record = await self._set_status(inf, "deleting")
        self._emit(inf, phase="deleting", message="deleting every VM of the infra")
        self._run(inf, functools.partial(self._delete_run, inf))
        return self._view(inf)

    async def act(self, name: str, action: InfraAction) -> InfraView:
        inf = self._get(name)
        if inf.record.status == "deleting":
            raise Conflict(f"infra {name!r} is being deleted")
        groups = {g.name: g for g in inf.record.spec.groups}
        if action.group and action.group not in groups:
            raise BadRequest(f"infra {name!r} has no group {action.group!r}")
        for g in groups.values():
            self._refused.pop(g.provider, None)
        if action.action == "scale":
            if action.count is None or action.count < 0 or not action.group:
                raise BadRequest("scale needs a group and a count >= 0")
            spec = msgspec.structs.replace(inf.record.spec, groups=[
                msgspec.structs.replace(g, count=action.count) if g.name == action.group else g
                for g in inf.record.spec.groups])
            return await self.create(spec)
        if action.action == "suspend":
            inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
                r, suspended=True, status="suspending"))
            self._run(inf, functools.partial(self._power_run, inf, "stop", action.group))
        elif action.action == "resume":
            inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
                r, suspended=False, status="resuming"))
            self._run(inf, functools.partial(self._power_run, inf, "start", action.group))
        elif action.action == "reboot":
            self._run(inf, functools.partial(self._power_run, inf, "reboot", action.group))
        return self._view(inf)

    def get(self, name: str) -> InfraView | None:
        inf = self._infras.get(name)
        return None if inf is None else self._view(inf)

    def infras(self) -> list[InfraView]:
        now = self._clock()
        for name, inf in list(self._infras.items()):
            if inf.deleted_at and now - inf.deleted_at > self.settings.keep_deleted:
                del self._infras[name]
        return [self._view(i) for i in sorted(self._infras.values(), key=lambda i: i.name)]

    def subscribe(self, fn: Callable[[Progress], None]) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None


@contextlib.asynccontextmanager
async def provision_engine(
    *,
    js: JetStreamContext,
    nodes: Table[NodeRecord],
    providers: Mapping[str, Provider],
    renderer: UserDataRenderer,
    installation: str,
    limits: Mapping[str, ApiLimits] | None = None,
    settings: EngineSettings | None = None,
    forget_node: ForgetNode | None = None,
    replicas: int = 1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[Engine]:
    """The engine with its two KV tables (``infras``, ``infra_ops``) opened and watched;
    ``nodes`` is the controller's (already started) nodes table."""
    infras = Table(await open_bucket(js, INFRAS_BUCKET, replicas=replicas), InfraRecord,
                   name=INFRAS_BUCKET.name)
    ops = Table(await open_bucket(js, INFRA_OPS_BUCKET, replicas=replicas), OpRecord,
                name=INFRA_OPS_BUCKET.name)
    await infras.start()
    await ops.start()
    try:
        async with Engine(infras=infras, ops=ops, nodes=nodes, providers=providers,
                          renderer=renderer, installation=installation, limits=limits,
                          settings=settings, forget_node=forget_node, clock=clock,
                          sleep=sleep) as engine:
            yield engine
    finally:
        await ops.stop()
        await infras.stop()


__all__ = ["Engine", "EngineSettings", "ForgetNode", "InfraRecord", "UserDataRenderer",
           "installation_id", "provision_engine", "reason_of"]
