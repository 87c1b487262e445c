"""The fleet inventory (selector queries over the node index) and liveness from heartbeats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from controller.errors import BadRecord, Conflict, NotFound
from controller.models import NodeRecord, NodeStatus
from controller.state.table import Table
from protocol.messages import Heartbeat
from protocol.selectors import Selector

log = logging.getLogger("barista.controller.fleet")


@dataclass
class Live:
    """What the controller knows about a node from its heartbeats (memory only)."""

    last_seen: float
    seq: int = 0
    buffered_batches: int = 0
    dropped_batches: int = 0
    running_jobs: int = 0
    uptime: float = 0.0


class Fleet:
    """Node inventory plus liveness: online -> stale -> offline, transitions persisted."""

    def __init__(
        self,
        nodes: Table[NodeRecord],
        *,
        stale_after: float,
        offline_after: float,
        on_transition: Callable[[NodeRecord, NodeStatus, NodeStatus], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nodes = nodes
        self.stale_after = stale_after
        self.offline_after = offline_after
        self._on_transition = on_transition
        self._clock = clock
        self._live: dict[str, Live] = {}
        self._started = clock()
        self._wake = asyncio.Event()
        # node id -> the last reason its transition could not be made; logged only when it
        # changes, so a node that fails every sweep does not flood the log.
        self._stuck: dict[str, str] = {}

    # -- queries ---------------------------------------------------------------------

    def select(self, selector: Selector | str | None = None) -> list[NodeRecord]:
        sel = selector if isinstance(selector, Selector) else Selector.parse(selector)
        return sorted((n for n in self.nodes if sel.matches(n.labels)), key=lambda n: n.id)

    def get(self, node_id: str) -> NodeRecord:
        node = self.nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} not found")
        return node

    def view(self, node: NodeRecord) -> dict[str, object]:
        out = node.public()
        live = self._live.get(node.id)
        if live is not None:
            out["last_seen"] = max(live.last_seen, node.last_seen)
            out["agent"] = {
                "buffered_batches": live.buffered_batches,
                "dropped_batches": live.dropped_batches,
                "running_jobs": live.running_jobs,
                "uptime": live.uptime,
            }
        return out

    def last_beat(self, node_id: str) -> float | None:
        """When this controller last received a heartbeat of the node (None: not yet)."""
        live = self._live.get(node_id)
        return live.last_seen if live is not None else None

    def last_seen(self, node_id: str) -> float:
        live = self._live.get(node_id)
        node = self.nodes.get(node_id)
        return max(live.last_seen if live else 0.0, node.last_seen if node else 0.0)

    # -- heartbeats ------------------------------------------------------------------

    def beat(self, hb: Heartbeat) -> bool:
        """Record a heartbeat; False when the node is unknown (deleted or never enrolled)."""
        node = self.nodes.get(hb.node_id)
        if node is None:
            return False
        now = self._clock()
        live = self._live.get(hb.node_id)
        if live is None:
            live = self._live[hb.node_id] = Live(last_seen=now)
        live.last_seen = now
        live.seq = hb.seq
        live.buffered_batches = hb.buffered_batches
        live.dropped_batches = hb.dropped_batches
        live.running_jobs = hb.running_jobs
        live.uptime = hb.uptime
        if node.status != "online":
            self._wake.set()  # come back online at once, not at the next sweep
        return True

    def status_for(self, node: NodeRecord, now: float) -> NodeStatus:
        live = self._live.get(node.id)
        # After a controller restart, give nodes a full stale window to report in.
        seen = max(live.last_seen if live else 0.0, node.last_seen, self._started)
        if node.status == "offline" and live is None:
            return "offline"
        age = now - seen
        if age < self.stale_after:
            return "online"
        if age < self.offline_after:
            return "stale"
        return "offline"

    async def sweep(self) -> int:
        """Apply every due transition; returns how many were made.

        One node's failure (a bad stored record, a conflict, an error) skips that node only:
        the sweep goes on with every other node.
        """
        now = self._clock()
        changed = 0
        for gone in [k for k in self._stuck if self.nodes.get(k) is None]:
            del self._stuck[gone]
        for node in self.nodes:
            new = self.status_for(node, now)
            if new == node.status:
                self._stuck.pop(node.id, None)
                continue
            try:
                if await self._transition(node, new, now):
                    changed += 1
                self._stuck.pop(node.id, None)
            except asyncio.CancelledError:
                raise
            except BadRecord as exc:
                # Counted and reported by the table; the node keeps its cached status.
                self._skip(node.id, exc.message, exc_info=False)
            except (NotFound, Conflict) as exc:
                self._skip(node.id, str(exc), exc_info=False)
            except Exception as exc:
                self._skip(node.id, f"{type(exc).__name__}: {exc}", exc_info=True)
        return changed

    def _skip(self, node_id: str, reason: str, *, exc_info: bool) -> None:
        if self._stuck.get(node_id) != reason:
            self._stuck[node_id] = reason
            log.warning("status of node %s not updated: %s", node_id, reason, exc_info=exc_info)

    async def _transition(self, node: NodeRecord, new: NodeStatus, now: float) -> bool:
        old = node.status
        seen = self.last_seen(node.id)

        def apply(cur: NodeRecord) -> NodeRecord | None:
            if cur.status == new:
                return None  # another controller got there first
            return msgspec.structs.replace(
                cur, status=new, status_changed_at=now, last_seen=max(cur.last_seen, seen)
            )

        updated = await self.nodes.mutate(node.id, apply)
        if updated is None or updated.status != new or old == new:
            return False
        log.info("node %s: %s -> %s", node.id, old, new)
        try:
            await self._on_transition(updated, old, new)
        except Exception:
            log.exception("publishing the transition of node %s failed", node.id)
        return True

    def stuck(self) -> dict[str, str]:
        """Nodes whose due transition could not be made, with the reason."""
        return dict(self._stuck)

    async def run(self) -> None:
        period = max(0.05, min(1.0, self.stale_after / 4))
        me = asyncio.current_task()
        while True:
            # A cancel that arrived inside a NATS call can be swallowed there (nats-py):
            # honour it here, or the controller's shutdown waits for this loop forever.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("liveness sweep failed")
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
            # arrives as the wake-up does, and the loop then never ends (a hung shutdown).
            try:
                async with asyncio.timeout(period):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def counts(self) -> dict[str, int]:
        out = {"online": 0, "stale": 0, "offline": 0, "pending": 0}
        for n in self.nodes:
            out[n.status] = out.get(n.status, 0) + 1
        return out
