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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from nats.js import JetStreamContext

from controller.errors import BadRequest, Conflict, NotFound
from controller.models import NodeRecord
from controller.provision.contract import (
    TAG_GROUP,
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    CapacityError,
    Catalog,
    CredentialsError,
    Instance,
    InstanceState,
    LaunchRequest,
    Network,
    NetworkRequest,
    NotFoundError,
    Placement,
    Provider,
    ProvisionError,
    QuotaError,
    TransientError,
)
from controller.provision.journal import Journal, OpKind, OpRecord
from controller.provision.limits import ApiLimits, TokenBucket
from controller.provision.model import (
    LABEL_GROUP,
    LABEL_INFRA,
    GroupSpec,
    GroupView,
    InfraAction,
    InfraSpec,
    InfraStatus,
    InfraView,
    NodePhase,
    NodeView,
    Plan,
    PlanItem,
    Progress,
)
from controller.provision.spec import parse_spec, resolve_size, validate_spec
from controller.state.streams import INFRA_OPS_BUCKET, INFRAS_BUCKET, open_bucket
from controller.state.table import Table

log = logging.getLogger("barista.controller.provision")

T = TypeVar("T")

# (infra, group, node name, labels) -> the node's cloud-init user-data (a secret: it
# carries a join token bound to that node, whose labels link the node record to the infra).
# (infra, group, node name, labels, the network it is launched in) -> user-data
UserDataRenderer = Callable[[InfraSpec, GroupSpec, str, Mapping[str, str], Network],
                            Awaitable[str]]
# Forget an enrolled node whose VM is gone (the controller revokes its NATS user first).
ForgetNode = Callable[[str], Awaitable[None]]


class InfraRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One infra's desired state, as kept in KV ``infras``."""

    spec: InfraSpec
    status: InfraStatus = "pending"
    created_at: float = 0.0
    updated_at: float = 0.0
    # group -> node names to remove (a scale-in), until the provider confirmed them gone.
    retire: dict[str, list[str]] = {}
    # group -> why it is not reconciled any more (rolled back, credentials refused) until
    # the next create or action.
    halted: dict[str, str] = {}
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class EngineSettings:
    attempts: int = 8  # tries of one call on transient errors
    backoff: float = 0.5  # first retry delay (doubles, with +-50 % jitter)
    backoff_max: float = 20.0
    poll_interval: float = 0.5  # provider queries while agents come online
    slow_poll: float = 15.0  # and at most this far apart otherwise
    ready_timeout: float = 600.0  # launch -> agent online
    confirmations: int = 3  # consecutive "gone" answers before a delete is done
    confirm_interval: float = 2.0
    delete_timeout: float = 900.0
    state_timeout: float = 600.0  # stop/start reaching the state asked
    keep_deleted: float = 3600.0  # a deleted infra's view stays this long (memory)


@dataclass
class _Node:
    name: str
    group: str
    index: int
    phase: NodePhase = "planned"
    placement: Placement | None = None
    vm_id: str = ""
    vm_state: InstanceState | None = None
    private_ip: str = ""
    public_ip: str = ""
    node_id: str = ""
    online: bool = False
    error: str = ""
    reason: str = ""  # aggregated failure reason ("capacity in zone east-1b")
    launched_at: float = 0.0
    linked_vm: str = ""  # the vm id written into the node record
    trying: Placement | None = None  # where a create of it is in flight


@dataclass
class _Infra:
    name: str
    record: InfraRecord
    nodes: dict[str, _Node] = field(default_factory=dict)
    leaks: dict[str, Instance] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    networks: dict[tuple[str, str], Network] = field(default_factory=dict)
    # ensure_network in flight per (provider, region), shared by every group and batch
    # that needs it (two concurrent ones could each make a VPC); True: started ahead.
    net_tasks: dict[tuple[str, str], tuple[asyncio.Task[Network], bool]] = field(
        default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    deleted_at: float = 0.0


class _Halt(Exception):
    """A group stops (credentials refused): its remaining work is failed with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The journal's "infra" for gc's deletes (no infra name has "_").
GC_JOURNAL = "_gc"


def node_name(infra: str, group: str, index: int) -> str:
    return f"{infra}-{group}-{index}"


def reason_of(exc: ProvisionError) -> str:
    if isinstance(exc, CapacityError):
        return f"capacity in {exc.where}"
    if isinstance(exc, QuotaError):
        return f"quota in {exc.where}"
    if isinstance(exc, CredentialsError):
        return f"credentials refused by provider {exc.provider}"
    if isinstance(exc, TransientError):
        return f"provider {exc.provider} unavailable ({exc.code or 'transient'})"
    return f"{exc.kind} at {exc.where}"


class Engine:
    """Implements ``controller.provision.model.Infras``. An async context manager: entering
    it loads the desired state, observes every infra at its providers and resumes what was
    in flight; leaving it cancels its work and writes nothing (a kill is the same)."""

    def __init__(
        self,
        *,
        infras: Table[InfraRecord],
        ops: Table[OpRecord],
        nodes: Table[NodeRecord],
        providers: Mapping[str, Provider],
        renderer: UserDataRenderer,
        installation: str,
        limits: Mapping[str, ApiLimits] | None = None,
        settings: EngineSettings | None = None,
        forget_node: ForgetNode | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        seed: int | None = None,
    ) -> None:
        self._table = infras
        self._journal = Journal(ops, clock=wall_clock)
        self._nodes = nodes
        self._providers = dict(providers)
        self._renderer = renderer
        self._installation = installation
        self._limits = dict(limits or {})
        self.settings = settings or EngineSettings()
        self._forget = forget_node or self._delete_node_record
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._infras: dict[str, _Infra] = {}
        self._listeners: list[Callable[[Progress], None]] = []
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._slots: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._refused: dict[str, str] = {}  # provider -> credentials message
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._by_node: dict[tuple[str, str], NodeRecord] = {}
        self._last_query: dict[tuple[str, str, str], float] = {}

    # -- lifecycle -------------------------------------------------------------------

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

    # -- the Infras protocol ---------------------------------------------------------

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

    async def gc(self, *, confirm: bool, vm_ids: Collection[str] | None = None
                 ) -> list[NodeView]:
        found: list[tuple[Provider, Instance]] = []
        for prov in self._providers.values():
            if prov.name in self._refused:
                continue
            instances = await self._call(prov, "", "query_instances",
                                         lambda p=prov: p.query_instances(  # type: ignore[misc]
                                             {TAG_MANAGED: self._installation}))
            for inst in instances:
                if inst.state.gone or inst.state is InstanceState.TERMINATING:
                    continue
                if not self._known(inst):
                    found.append((prov, inst))
        views = [NodeView(name=i.name, group=i.tags.get(TAG_GROUP, ""), phase="running"
                          if i.state is InstanceState.RUNNING else "booting",
                          provider=p.name, region=i.placement.region, zone=i.placement.zone,
                          vm_id=i.id, error=f"infra {i.tags.get(TAG_INFRA, '?')}: unknown "
                          "to the state") for p, i in found]
        if not confirm:
            return views
        chosen = [(p, i) for p, i in found if vm_ids is None or i.id in vm_ids]
        by_prov: dict[str, list[Instance]] = {}
        for p, i in chosen:
            by_prov.setdefault(p.name, []).append(i)
        await asyncio.gather(*(self._terminate_confirmed(
            self._providers[p], {TAG_MANAGED: self._installation}, insts, infra=GC_JOURNAL,
            group="")
            for p, insts in by_prov.items()))
        await self._journal.prune(GC_JOURNAL, keep_open=False)
        for _, i in chosen:
            inf = self._infras.get(i.tags.get(TAG_INFRA, ""))
            if inf is not None:
                inf.leaks.pop(i.id, None)
        chosen_ids = {i.id for _, i in chosen}
        return [msgspec.structs.replace(v, phase="deleted") if v.vm_id in chosen_ids else v
                for v in views]

    async def _finish_gc(self) -> None:
        """A gc confirmed by the operator and cut short by a restart: finish its deletes."""
        for op in self._journal.open(GC_JOURNAL):
            prov = self._providers.get(op.provider)
            if prov is None:
                continue
            insts = [Instance(id=i, name=n, placement=op.placement, state=InstanceState.UNKNOWN,
                              size="") for i, n in zip(op.ids, op.names, strict=False)]
            try:
                await self._terminate_confirmed(prov, {TAG_MANAGED: self._installation},
                                                insts, infra=GC_JOURNAL, group="")
            except (ProvisionError, TimeoutError) as exc:
                log.warning("gc: resuming the delete of %s failed: %s", op.ids, exc)
                return
        await self._journal.prune(GC_JOURNAL, keep_open=False)

    def _known(self, inst: Instance) -> bool:
        inf = self._infras.get(inst.tags.get(TAG_INFRA, ""))
        if inf is None or inf.record.status == "deleted":
            return False
        if inf.record.status == "deleting":
            return True  # being removed right now
        node = inf.nodes.get(inst.name)
        if node is not None and node.vm_id == inst.id:
            return True
        if any(inst.name in op.names or inst.id in op.ids
               for op in self._journal.open(inf.name)):
            return True  # a create in flight: its answer has not arrived yet
        return False

    # -- the nodes table (agents online) ---------------------------------------------

    def _on_node(self, node_id: str, rec: NodeRecord | None) -> None:
        if rec is None:
            for key, old in list(self._by_node.items()):
                if old.id == node_id:
                    del self._by_node[key]
                    self._node_changed(key, None)
            return
        if not rec.infra or not rec.infra_node:
            return
        key = (rec.infra, rec.infra_node)
        self._by_node[key] = rec
        self._node_changed(key, rec)

    def _node_changed(self, key: tuple[str, str], rec: NodeRecord | None) -> None:
        inf = self._infras.get(key[0])
        if inf is None:
            return
        node = inf.nodes.get(key[1])
        if node is None:
            return
        node.node_id = rec.id if rec is not None else ""
        node.online = rec is not None and rec.status == "online" and not rec.revoked
        self._check_ready(inf, node)
        inf.changed.set()

    def _check_ready(self, inf: _Infra, node: _Node) -> None:
        if node.phase in ("deleting", "deleted", "stopping", "stopped", "failed"):
            return
        if node.online and node.vm_state is InstanceState.RUNNING:
            if node.phase != "ready":
                node.phase = "ready"
                node.error = ""
                self._emit(inf, group=node.group, node=node.name, phase="ready")
                if node.linked_vm != node.vm_id and node.node_id:
                    node.linked_vm = node.vm_id
                    self._spawn(self._link(node.node_id, node.vm_id))
        elif node.phase == "ready":
            node.phase = "running" if node.vm_state is InstanceState.RUNNING else "booting"

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _link(self, node_id: str, vm_id: str) -> None:
        def apply(cur: NodeRecord) -> NodeRecord | None:
            return None if cur.vm_id == vm_id else msgspec.structs.replace(cur, vm_id=vm_id)

        try:
            await self._nodes.mutate(node_id, apply)
        except (NotFound, Conflict) as exc:
            log.info("node %s: vm id not linked: %s", node_id, exc)
        except Exception as exc:
            log.warning("node %s: vm id not linked: %s", node_id, exc)

    async def _delete_node_record(self, node_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._nodes.delete(node_id)

    # -- observation -----------------------------------------------------------------

    def _tags(self, infra: str, group: str = "", name: str = "") -> dict[str, str]:
        tags = {TAG_MANAGED: self._installation, TAG_INFRA: infra}
        if group:
            tags[TAG_GROUP] = group
        if name:
            tags[TAG_NODE] = name
        return tags

    def _placements(self, g: GroupSpec) -> list[Placement]:
        cat = self._providers[g.provider].catalog()
        out: list[Placement] = []
        for where in g.regions:
            region, _, zone = where.partition("/")
            zones = [zone] if zone else list(cat.regions[region].zones) or [""]
            for z in zones:
                p = Placement(g.provider, region, z)
                if p not in out:
                    out.append(p)
        return out

    def _regions(self, g: GroupSpec) -> list[str]:
        return list(dict.fromkeys(p.region for p in self._placements(g)))

    async def _observe_all(self, inf: _Infra) -> None:
        await asyncio.gather(*(self._observe(inf, g) for g in inf.record.spec.groups
                               if g.provider not in self._refused))

    async def _observe(self, inf: _Infra, g: GroupSpec, regions: Collection[str] | None = None
                       ) -> list[Instance]:
        """Query the group's VMs (in ``regions`` only when given) and absorb the answer."""
        prov = self._providers[g.provider]
        tags = self._tags(inf.name, g.name)
        found: list[Instance] = []
        asked = [r for r in self._regions(g) if regions is None or r in regions]

        async def one(region: str) -> list[Instance]:
            self._last_query[(g.provider, region, inf.name)] = self._clock()
            return await self._call(prov, region, "query_instances",
                                    lambda: prov.query_instances(tags, region=region))

        for part in await asyncio.gather(*(one(r) for r in asked)):
            found += part
        self._absorb(inf, g, found, None if regions is None else set(asked))
        return found

    def _absorb(self, inf: _Infra, g: GroupSpec, found: Sequence[Instance],
                regions: Collection[str] | None = None) -> None:
        """Take what the provider reports as the truth for group ``g`` (in ``regions``)."""
        retire = set(inf.record.retire.get(g.name, []))
        for i in range(g.count):
            name = node_name(inf.name, g.name, i)
            inf.nodes.setdefault(name, _Node(name, g.name, i))
        by_name: dict[str, list[Instance]] = {}
        for inst in found:
            if inst.state.gone:
                continue
            by_name.setdefault(inst.name, []).append(inst)
        for vm_id in [k for k, v in inf.leaks.items() if v.tags.get(TAG_GROUP) == g.name
                      and (regions is None or v.placement.region in regions)]:
            del inf.leaks[vm_id]
        for name, insts in by_name.items():
            node = inf.nodes.get(name)
            idx = _index(name)
            if node is None and name in retire:
                node = inf.nodes[name] = _Node(name, g.name, idx, phase="deleting")
            if node is None:
                for inst in insts:
                    inf.leaks[inst.id] = inst
                continue
            # One VM per name: the one we know, else the oldest; any other one is a leak.
            known = node.vm_id
            insts.sort(key=lambda i: (i.id != known, i.launched_at, i.id))
            keep, extra = insts[0], insts[1:]
            for inst in extra:
                inf.leaks[inst.id] = inst
            self._adopt(inf, node, keep)
        for node in inf.nodes.values():
            if regions is not None and (node.placement is None
                                        or node.placement.region not in regions):
                continue
            if node.group == g.name and node.vm_id and node.name not in by_name:
                # The VM is gone (or its create never happened).
                node.vm_id, node.vm_state = "", None
                if node.phase not in ("deleting", "deleted", "failed"):
                    node.phase = "planned"
        inf.changed.set()

    def _adopt(self, inf: _Infra, node: _Node, inst: Instance) -> None:
        node.vm_id = inst.id
        node.vm_state = inst.state
        node.placement = inst.placement
        node.private_ip, node.public_ip = inst.private_ip, inst.public_ip
        rec = self._by_node.get((inf.name, node.name))
        if rec is not None:
            node.node_id = rec.id
            node.online = rec.status == "online" and not rec.revoked
        if node.phase in ("deleting", "deleted"):
            return
        if inst.state is InstanceState.STOPPED:
            node.phase = "stopped"
        elif inst.state is InstanceState.STOPPING:
            node.phase = "stopping"
        elif node.phase in ("planned", "creating", "failed"):
            node.phase = "running" if inst.state is InstanceState.RUNNING else "booting"
            node.error = node.reason = ""
        self._check_ready(inf, node)

    # -- provider calls: limits, retries ---------------------------------------------

    def _limit(self, provider: str) -> ApiLimits:
        """The limits given for ``provider``, else the ones its cloud documents (an SDK
        provider's ``api_limits``, with the source in its module), else the defaults."""
        given = self._limits.get(provider)
        if given is not None:
            return given
        documented = getattr(self._providers.get(provider), "api_limits", None)
        return documented if isinstance(documented, ApiLimits) else ApiLimits()

    def _bucket(self, provider: str, region: str, rate: float, burst: int) -> TokenBucket:
        key = (provider, region)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(rate, burst, clock=self._clock,
                                                 sleep=self._sleep)
        return b

    async def _call(self, prov: Provider, region: str, what: str,
                    fn: Callable[[], Awaitable[T]]) -> T:
        lim = self._limit(prov.name)
        key = (prov.name, region)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(max(1, lim.concurrency))
        last: TransientError | None = None
        for attempt in range(max(1, self.settings.attempts)):
            if prov.name in self._refused:
                raise CredentialsError(self._refused[prov.name], provider=prov.name)
            async with slots:
                await self._bucket(prov.name, "", lim.rate, lim.burst).acquire()
                if lim.region_rate > 0 and region:
                    await self._bucket(prov.name, region, lim.region_rate,
                                       lim.region_burst).acquire()
                try:
                    return await fn()
                except TransientError as exc:
                    last = exc
                except CredentialsError as exc:
                    self._refused[prov.name] = exc.message
                    log.error("provider %s refused our credentials: %s", prov.name, exc.message)
                    raise
            delay = min(self.settings.backoff_max, self.settings.backoff * 2 ** attempt)
            delay *= self._rng.uniform(0.5, 1.5)
            log.info("%s %s at %s/%s: %s; retry %d in %.2fs", prov.name, what, prov.name,
                     region, last.message, attempt + 1, delay)
            await self._sleep(delay)
        assert last is not None
        raise last

    # -- reconcile -------------------------------------------------------------------

    async def _reconcile(self, inf: _Infra) -> None:
        if inf.record.status != "creating":
            inf.record = await self._set_status(inf, "creating")
        # Every network the pass will likely need, started now and side by side (they
        # are idempotent): each cloud's and region's setup overlaps the others' and the
        # groups' queries, instead of starting at each group's first launch.
        for g in inf.record.spec.groups:
            if g.count and g.provider not in self._refused and not inf.record.halted.get(
                    g.name):
                for region in self._network_regions(inf, g):
                    if (g.provider, region) in inf.networks:
                        continue  # made by an earlier pass
                    self._network_task(inf, self._providers[g.provider], g, region,
                                       ahead=True)
        try:
            await asyncio.gather(*(self._reconcile_group(inf, g)
                                   for g in inf.record.spec.groups))
        finally:
            self._drop_network_tasks(inf)
        # Every call of this pass was answered, and what older open intents (a killed
        # engine's) may have made was observed and adopted at its start: none is needed.
        await self._journal.prune(inf.name, keep_open=False)
        status = self._outcome(inf)
        inf.record = await self._set_status(inf, status)
        self._emit(inf, phase=status, message=self._summary(inf))

    async def _reconcile_group(self, inf: _Infra, g: GroupSpec) -> None:
        try:
            halted = inf.record.halted.get(g.name)
            if halted:
                self._fail(inf, [n for n in self._group_nodes(inf, g) if not n.vm_id], halted)
                return
            if g.provider in self._refused:
                raise _Halt(f"credentials refused by provider {g.provider}: "
                            f"{self._refused[g.provider]}")
            await self._observe(inf, g)  # while the networks started ahead are made
            retire = inf.record.retire.get(g.name, [])
            if retire:
                await self._retire(inf, g, retire)
            want = [n for n in self._group_nodes(inf, g)]
            missing = [n for n in want if not n.vm_id]
            if missing:
                # Nodes are watched for Ready while their creates are in flight: a cloud
                # whose create answers only when the VM booted (ARM) has each node Ready
                # when it is, not when its whole batch is answered.
                launch = asyncio.ensure_future(self._launch(inf, g, missing))
                try:
                    await self._await_ready(inf, g, launch)
                finally:
                    if not launch.done():
                        launch.cancel()
                    await asyncio.wait([launch])
                launch.result()
            await self._await_ready(inf, g)
            failed = [n for n in self._group_nodes(inf, g) if n.phase == "failed"]
            if failed and g.on_partial_failure == "rollback":
                await self._rollback(inf, g, failed)
            else:
                self._emit_group(inf, g)
        except CredentialsError as exc:
            await self._halt_group(inf, g, f"credentials refused by provider {g.provider}: "
                                           f"{exc.message}")
        except _Halt as exc:
            await self._halt_group(inf, g, exc.reason)
        except (ProvisionError, TimeoutError) as exc:
            # Retries exhausted, a delete not confirmed...: this pass of the group is over;
            # the next create or action tries again.
            reason = reason_of(exc) if isinstance(exc, ProvisionError) else str(exc)
            log.warning("infra %s group %s: %s", inf.name, g.name, reason)
            self._fail(inf, [n for n in self._group_nodes(inf, g) if n.phase != "ready"
                             and not n.vm_id], reason)
            self._emit(inf, group=g.name, phase="failed", message=reason)

    def _group_nodes(self, inf: _Infra, g: GroupSpec) -> list[_Node]:
        out = []
        for i in range(g.count):
            name = node_name(inf.name, g.name, i)
            out.append(inf.nodes.setdefault(name, _Node(name, g.name, i)))
        return out

    async def _halt_group(self, inf: _Infra, g: GroupSpec, reason: str) -> None:
        self._fail(inf, [n for n in self._group_nodes(inf, g) if n.phase != "ready"], reason)
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, halted={**r.halted, g.name: reason}))
        self._emit(inf, group=g.name, phase="failed", message=reason)

    def _fail(self, inf: _Infra, nodes: Sequence[_Node], reason: str, error: str = "") -> None:
        for n in nodes:
            n.phase = "failed"
            n.reason = reason
            n.error = error or reason
            self._emit(inf, group=n.group, node=n.name, phase="failed", message=n.error)

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

    async def _rollback(self, inf: _Infra, g: GroupSpec, failed: list[_Node]) -> None:
        reasons = Counter(n.reason for n in failed)
        why = ", ".join(f"{k} x{v}" for k, v in reasons.items())
        msg = f"rolled back: {len(failed)} of {g.count} failed ({why})"
        self._emit(inf, group=g.name, phase="deleting", message=msg)
        victims = [n for n in self._group_nodes(inf, g) if n.vm_id]
        await self._remove(inf, g, victims)
        for n in self._group_nodes(inf, g):
            n.phase = "failed"
            n.reason = n.reason or "rolled back"
            n.error = msg
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, halted={**r.halted, g.name: msg}))
        self._emit(inf, group=g.name, phase="failed", message=msg)

    async def _retire(self, inf: _Infra, g: GroupSpec, names: list[str]) -> None:
        nodes = [inf.nodes[n] for n in names if n in inf.nodes]
        # Highest index first: what is left is always 0..count-1.
        nodes.sort(key=lambda n: -n.index)
        await self._remove(inf, g, nodes)
        for n in nodes:
            inf.nodes.pop(n.name, None)
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, retire={k: v for k, v in r.retire.items() if k != g.name}))

    async def _remove(self, inf: _Infra, g: GroupSpec, nodes: Sequence[_Node]) -> None:
        prov = self._providers[g.provider]
        for n in nodes:
            n.phase = "deleting"
            self._emit(inf, group=g.name, node=n.name, phase="deleting")
        insts = [Instance(id=n.vm_id, name=n.name, placement=n.placement, state=InstanceState
                          .UNKNOWN, size="") for n in nodes if n.vm_id and n.placement]
        await self._terminate_confirmed(prov, self._tags(inf.name, g.name), insts,
                                        infra=inf.name, group=g.name)
        await self._forget_nodes(inf, {n.name for n in nodes})
        for n in nodes:
            n.phase = "deleted"
            n.vm_id, n.vm_state = "", None
            n.node_id, n.online = "", False
            self._emit(inf, group=g.name, node=n.name, phase="deleted")

    async def _forget_nodes(self, inf: _Infra, names: Collection[str] | None) -> None:
        """Forget the node records of ``names`` (None: every node of the infra), found by
        their link, not by memory: after a restart a VM already gone left no trace here."""
        slots = asyncio.Semaphore(32)  # each one revokes a NATS user: done side by side

        async def forget(rec: NodeRecord) -> None:
            async with slots:
                try:
                    await self._forget(rec.id)
                except NotFound:
                    pass
                except Exception as exc:
                    log.warning("infra %s: node %s not forgotten: %s", inf.name, rec.id, exc)

        await asyncio.gather(*(forget(rec) for (infra, name), rec in list(self._by_node.items())
                               if infra == inf.name and (names is None or name in names)))

    async def _terminate_confirmed(self, prov: Provider, tags: Mapping[str, str],
                                   insts: Sequence[Instance], *, infra: str, group: str
                                   ) -> None:
        """Terminate ``insts`` and return once the provider said ``confirmations`` times
        in a row that each is gone (re-terminating any that comes back alive)."""
        s = self.settings
        by_region: dict[str, list[Instance]] = {}
        for i in insts:
            by_region.setdefault(i.placement.region, []).append(i)

        async def region_run(region: str, targets: list[Instance]) -> None:
            ids = [i.id for i in targets]
            await self._journaled_power(prov, "terminate", region, ids, infra=infra,
                                        group=group, names=[i.name for i in targets])
            streak = dict.fromkeys(ids, 0)
            start = self._clock()
            while min(streak.values(), default=s.confirmations) < s.confirmations:
                if self._clock() - start > s.delete_timeout:
                    raise TimeoutError(f"{prov.name}/{region}: VMs still present after "
                                       f"{s.delete_timeout:g}s: {sorted(streak)[:5]}")
                await self._sleep(s.confirm_interval)
                seen = {i.id: i for i in await self._call(
                    prov, region, "query_instances",
                    lambda: prov.query_instances(tags, region=region))}
                alive = []
                for vm_id in ids:
                    inst = seen.get(vm_id)
                    if inst is None or inst.state.gone:
                        streak[vm_id] += 1
                    else:
                        streak[vm_id] = 0
                        if inst.state is not InstanceState.TERMINATING:
                            alive.append(vm_id)
                if alive:  # the terminate was lost (or the VM came back): again
                    await self._journaled_power(prov, "terminate", region, alive,
                                                infra=infra, group=group)

        await asyncio.gather(*(region_run(r, t) for r, t in by_region.items()))

    async def _journaled_power(self, prov: Provider, op: OpKind, region: str,
                               ids: Sequence[str], *, infra: str, group: str,
                               names: Sequence[str] = ()) -> None:
        fn = {"terminate": prov.terminate_instances, "stop": prov.stop_instances,
              "start": prov.start_instances, "reboot": prov.reboot_instances}[op]
        if not ids:
            return
        rec = None
        if infra:  # every delete is journaled; gc's under GC_JOURNAL
            rec = await self._journal.intent(infra=infra, group=group, op=op,
                                             placement=Placement(prov.name, region),
                                             names=names, ids=ids)
        try:
            await self._call(prov, region, f"{op}_instances", lambda: fn(region, list(ids)))
        except NotFoundError:
            # One of them is already gone: do the others one by one.
            for vm_id in ids:
                with contextlib.suppress(NotFoundError):
                    await self._call(prov, region, f"{op}_instances",
                                     lambda v=vm_id: fn(region, [v]))  # type: ignore[misc]
        except ProvisionError as exc:
            if rec is not None:
                await self._journal.finish(rec, error=exc.message)
            raise
        if rec is not None:
            await self._journal.finish(rec)

    # -- delete, power ----------------------------------------------------------------

    async def _delete_run(self, inf: _Infra) -> None:
        spec = inf.record.spec
        try:
            await asyncio.gather(*(self._delete_group(inf, g) for g in spec.groups))
        except (ProvisionError, TimeoutError) as exc:
            msg = exc.message if isinstance(exc, ProvisionError) else str(exc)
            self._emit(inf, phase="deleting", message=f"delete not finished: {msg}; "
                       "delete again to retry")
            log.error("infra %s: delete not finished: %s", inf.name, msg)
            return
        # Networks, firewalls... once no VM of the infra is left.
        for prov_name, region in sorted({(g.provider, r) for g in spec.groups
                                         for r in self._regions(g)}):
            prov = self._providers[prov_name]
            with contextlib.suppress(NotFoundError):
                await self._call(prov, region, "cleanup",
                                 lambda p=prov, r=region: p.cleanup(  # type: ignore[misc]
                                     self._tags(inf.name), region=r))
        await self._forget_nodes(inf, None)
        await self._journal.prune(inf.name, keep_open=False)
        with contextlib.suppress(NotFound):
            await self._table.delete(inf.name)
        inf.record = msgspec.structs.replace(inf.record, status="deleted",
                                             updated_at=self._wall())
        inf.deleted_at = self._clock()
        inf.leaks.clear()
        self._emit(inf, phase="deleted", message="every VM confirmed gone")

    async def _delete_group(self, inf: _Infra, g: GroupSpec) -> None:
        found = await self._observe(inf, g)
        alive = [i for i in found if not i.state.gone]
        for n in self._group_nodes(inf, g):
            if n.vm_id:
                n.phase = "deleting"
        self._emit(inf, group=g.name, phase="deleting", message=f"{len(alive)} VM(s)")
        await self._terminate_confirmed(self._providers[g.provider],
                                        self._tags(inf.name, g.name), alive,
                                        infra=inf.name, group=g.name)
        names = [n.name for n in inf.nodes.values() if n.group == g.name]
        names += [name for (infra, name), rec in self._by_node.items()
                  if infra == inf.name and rec.group == g.name]
        await self._forget_nodes(inf, set(names))
        for n in list(inf.nodes.values()):
            if n.group != g.name:
                continue
            n.phase, n.vm_id, n.vm_state, n.node_id, n.online = "deleted", "", None, "", False
        for vm_id in [k for k, v in inf.leaks.items() if v.tags.get(TAG_GROUP) == g.name]:
            del inf.leaks[vm_id]
        self._emit_group(inf, g)

    async def _power_run(self, inf: _Infra, op: OpKind, group: str) -> None:
        groups = [g for g in inf.record.spec.groups if not group or g.name == group]
        await asyncio.gather(*(self._power_group(inf, g, op) for g in groups),
                             return_exceptions=False)
        if op == "stop":
            status: InfraStatus = "suspended"
        else:
            status = self._outcome(inf)
        inf.record = await self._set_status(inf, status)
        self._emit(inf, phase=status, message=self._summary(inf))

    async def _power_group(self, inf: _Infra, g: GroupSpec, op: OpKind) -> None:
        prov = self._providers[g.provider]
        await self._observe(inf, g)
        nodes = [n for n in self._group_nodes(inf, g) if n.vm_id and n.placement]
        phases: dict[str, NodePhase] = {"stop": "stopping", "start": "booting",
                                        "reboot": "rebooting"}
        phase = phases[op]
        by_region: dict[str, list[_Node]] = {}
        for n in nodes:
            by_region.setdefault(n.placement.region, []).append(n)  # type: ignore[union-attr]
            n.phase = phase
            if op != "stop":
                n.online = False  # it must come online again to be Ready
        self._emit(inf, group=g.name, phase=phase, message=f"{op} {len(nodes)} VM(s)")
        try:
            for region, ns in by_region.items():
                await self._journaled_power(prov, op, region, [n.vm_id for n in ns],
                                            infra=inf.name, group=g.name,
                                            names=[n.name for n in ns])
        except ProvisionError as exc:
            self._fail(inf, nodes, reason_of(exc), exc.message)
            return
        if op == "stop":
            start = self._clock()
            while any(n.vm_state is not InstanceState.STOPPED for n in nodes if n.vm_id):
                if self._clock() - start > self.settings.state_timeout:
                    self._fail(inf, [n for n in nodes if n.vm_state is not InstanceState
                                     .STOPPED], "did not stop")
                    return
                await self._sleep(self.settings.poll_interval)
                await self._observe(inf, g)
            for n in nodes:
                n.phase = "stopped"
            self._emit_group(inf, g)
            return
        for n in nodes:
            n.launched_at = self._clock()
            n.vm_state = InstanceState.PENDING
        await self._await_ready(inf, g)
        self._emit_group(inf, g)

    # -- state -----------------------------------------------------------------------

    def _get(self, name: str) -> _Infra:
        inf = self._infras.get(name)
        if inf is None or inf.record.status == "deleted":
            raise NotFound(f"no infra named {name!r}")
        return inf

    async def _mutate(self, inf: _Infra, fn: Callable[[InfraRecord], InfraRecord]
                      ) -> InfraRecord:
        now = self._wall()
        rec = await self._table.mutate(
            inf.name, lambda r: msgspec.structs.replace(fn(r), updated_at=now))
        assert rec is not None
        return rec

    async def _set_status(self, inf: _Infra, status: InfraStatus) -> InfraRecord:
        def apply(r: InfraRecord) -> InfraRecord:
            if r.status == "deleting" and status != "deleting":
                return r  # only the end of the delete moves on from here
            return msgspec.structs.replace(r, status=status)

        return await self._mutate(inf, apply)

    def _outcome(self, inf: _Infra) -> InfraStatus:
        want = sum(g.count for g in inf.record.spec.groups)
        nodes = [n for n in inf.nodes.values() if n.index < self._count(inf, n.group)]
        ready = sum(1 for n in nodes if n.phase == "ready")
        if ready == want:
            return "ready"
        if ready == 0 and want:
            return "failed"
        return "degraded"

    def _count(self, inf: _Infra, group: str) -> int:
        for g in inf.record.spec.groups:
            if g.name == group:
                return g.count
        return 0

    # -- views and progress ----------------------------------------------------------

    def _group_view(self, inf: _Infra, g: GroupSpec) -> GroupView:
        nodes = sorted((n for n in inf.nodes.values() if n.group == g.name),
                       key=lambda n: n.index)
        mine = [n for n in nodes if n.index < g.count]
        reasons = Counter(n.reason or n.error for n in mine if n.phase == "failed")
        return GroupView(
            name=g.name, provider=g.provider, desired=g.count,
            ready=sum(1 for n in mine if n.phase == "ready"),
            running=sum(1 for n in mine if n.vm_state is InstanceState.RUNNING
                        and n.phase not in ("deleting", "deleted", "failed")),
            pending=sum(1 for n in mine if n.phase in ("planned", "creating", "booting",
                                                       "rebooting")),
            failed=sum(1 for n in mine if n.phase == "failed"),
            reasons=dict(reasons),
            nodes=[self._node_view(n, g) for n in nodes])

    @staticmethod
    def _node_view(n: _Node, g: GroupSpec) -> NodeView:
        p = n.placement
        return NodeView(name=n.name, group=n.group, phase=n.phase, provider=g.provider,
                        region=p.region if p else "", zone=p.zone if p else "",
                        vm_id=n.vm_id, node_id=n.node_id, private_ip=n.private_ip,
                        public_ip=n.public_ip, error=n.error)

    def _view(self, inf: _Infra) -> InfraView:
        groups = [self._group_view(inf, g) for g in inf.record.spec.groups]
        return InfraView(name=inf.name, status=inf.record.status, spec=inf.record.spec,
                         groups=groups, created_at=inf.record.created_at,
                         updated_at=inf.record.updated_at, summary=_summary(groups),
                         leaks=sorted(inf.leaks))

    def _summary(self, inf: _Infra) -> str:
        return _summary([self._group_view(inf, g) for g in inf.record.spec.groups])

    def _emit_group(self, inf: _Infra, g: GroupSpec) -> None:
        v = self._group_view(inf, g)
        self._emit(inf, group=g.name, phase=inf.record.status,
                   message=_summary([v]), done=v.ready, total=v.desired)

    def _emit(self, inf: _Infra, *, phase: NodePhase | InfraStatus, group: str = "",
              node: str = "", message: str = "", done: int = 0, total: int = 0) -> None:
        ev = Progress(infra=inf.name, group=group, node=node, phase=phase, message=message,
                      done=done, total=total, at=self._wall())
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("progress listener failed")


def _summary(groups: Sequence[GroupView]) -> str:
    desired = sum(g.desired for g in groups)
    running = sum(g.running for g in groups)
    ready = sum(g.ready for g in groups)
    failed = sum(g.failed for g in groups)
    pending = sum(g.pending for g in groups)
    parts = [f"Running {running}/{desired}"]
    if ready != running:
        parts.append(f"Ready {ready}")
    if pending:
        parts.append(f"Pending {pending}")
    if failed:
        reasons: Counter[str] = Counter()
        for g in groups:
            reasons.update(g.reasons)
        why = ", ".join(k if v == failed and len(reasons) == 1 else f"{v} {k}"
                        for k, v in reasons.most_common())
        parts.append(f"Failed {failed} ({why})")
    return ", ".join(parts)


def installation_id(data_dir: Path) -> str:
    """This controller installation's TAG_MANAGED value, made once and kept in
    ``data_dir/installation``: VMs carrying another value are never touched (not even by
    gc), so two installations can share a cloud account."""
    path = data_dir / "installation"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"b-{secrets.token_hex(6)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return value


def _index(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


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
