"""The engine's state (every mixin of ``Engine`` works on it) and the small lookups
they share: an infra by name, its record's writes, a group's nodes, tags, placements."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import msgspec

from controller.errors import NotFound
from controller.models import NodeRecord
from controller.provision.contract import (
    TAG_GROUP,
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    Placement,
    Provider,
)
from controller.provision.engine.records import (
    EngineSettings,
    ForgetNode,
    InfraRecord,
    UserDataRenderer,
    _Infra,
    _Node,
    node_name,
)
from controller.provision.journal import Journal, OpRecord
from controller.provision.limits import ApiLimits, TokenBucket
from controller.provision.model import GroupSpec, InfraStatus, Progress
from controller.state.table import Table


class EngineBase:
    """The state of an ``Engine``, made by its constructor; the other parts of the
    package add its behaviour as mixins."""

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

    def _group_nodes(self, inf: _Infra, g: GroupSpec) -> list[_Node]:
        out = []
        for i in range(g.count):
            name = node_name(inf.name, g.name, i)
            out.append(inf.nodes.setdefault(name, _Node(name, g.name, i)))
        return out

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

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_node_record(self, node_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._nodes.delete(node_id)
