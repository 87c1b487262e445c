"""The latency and loss matrix: what members report about each peer (MeshHealth), kept
per network for all pairs and aggregated per region pair; written to InfluxDB by
publishing it into ``METRICS`` as one batch per network and interval (ingest writes it)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from controller.mesh.deltas import MAX_MESH_MESSAGE, MeshState, Reject
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import MeshHealth, MeshPeerHealth, MetricBatch, MetricPoint
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.mesh.matrix")

MEASUREMENT = "mesh_latency"
REGION_MEASUREMENT = "mesh_region_latency"
# A pair not reported for this long is left out of the matrix.
DEFAULT_MAX_AGE = 120.0
# The METRICS subject's node token for the matrix of a network: node ids never hold "_".
PSEUDO_NODE = "_mesh_{}"
# About 150 bytes a point: a batch of this many is ~150 kB, under METRIC_BATCH_MAX.
POINTS_PER_BATCH = 1000


@dataclass(frozen=True, slots=True)
class PairStats:
    src: str
    dst: str
    src_region: str
    dst_region: str
    rtt_ms: float  # -1: no probe answered
    loss: float
    handshake_age: float
    rx_bytes: int
    tx_bytes: int
    relayed: bool
    ts: float

    def public(self) -> dict[str, object]:
        return {"src": self.src, "dst": self.dst, "src_region": self.src_region,
                "dst_region": self.dst_region,
                "rtt_ms": self.rtt_ms if self.rtt_ms >= 0 else None, "loss": self.loss,
                "handshake_age": self.handshake_age if self.handshake_age >= 0 else None,
                "rx_bytes": self.rx_bytes, "tx_bytes": self.tx_bytes,
                "relayed": self.relayed, "ts": self.ts}


def aggregate(pairs: list[PairStats]) -> list[dict[str, object]]:
    """Per (src region, dst region): pair count, median / min / max RTT over the pairs that
    answered, mean loss."""
    groups: dict[tuple[str, str], list[PairStats]] = {}
    for p in pairs:
        groups.setdefault((p.src_region or "?", p.dst_region or "?"), []).append(p)
    out: list[dict[str, object]] = []
    for (a, b), items in sorted(groups.items()):
        rtts = [p.rtt_ms for p in items if p.rtt_ms >= 0]
        out.append({
            "src_region": a, "dst_region": b, "pairs": len(items),
            "answered": len(rtts),
            "rtt_ms": statistics.median(rtts) if rtts else None,
            "rtt_min_ms": min(rtts) if rtts else None,
            "rtt_max_ms": max(rtts) if rtts else None,
            "loss": sum(p.loss for p in items) / len(items),
        })
    return out


class Matrix:
    """All pairs of every network from the members' MeshHealth reports.

    ``states``: the published state of a network (its members and their regions); a
    report of a node that is not a member, or about a peer that is not one, is refused
    (the pair) and counted."""

    def __init__(
        self,
        *,
        states: Callable[[str], MeshState | None],
        nc: NATS,
        js: JetStreamContext | None,
        subjects: Subjects,
        reject: Reject,
        interval: float = 10.0,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = states
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._reject = reject
        self.interval = interval
        self.max_age = max_age
        self._clock = clock
        self._pairs: dict[str, dict[tuple[str, str], PairStats]] = {}
        self._dirty: set[str] = set()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = {"reports": 0, "points_published": 0, "batches_published": 0}

    async def __aenter__(self) -> Matrix:
        # No queue group: every controller keeps the whole matrix (any can answer the API);
        # the points carry the report's time, so two controllers write the same points.
        self._sub = await self._nc.subscribe(self._subjects.mesh_health_any, cb=self._on_health)
        if self._js is not None and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="mesh-matrix")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    # -- intake ----------------------------------------------------------------------

    async def _on_health(self, msg: Msg) -> None:
        try:
            report = codec.decode(msg.data, MeshHealth, max_size=MAX_MESH_MESSAGE)
            if report.node_id != self._subjects.node_id_of(msg.subject):
                raise ProtocolError("mesh health node_id does not match its subject")
        except ProtocolError as exc:
            self._reject("mesh_health", msg.subject, exc)
            return
        self.record(report, subject=msg.subject)

    def record(self, report: MeshHealth, *, subject: str = "") -> int:
        """Take one report in; returns how many pairs it updated."""
        state = self._states(report.network)
        where = subject or self._subjects.mesh_health(report.node_id)
        if state is None:
            self._reject("mesh_health", where,
                         ProtocolError(f"health for unknown network {report.network!r}"))
            return 0
        own = state.peers.get(report.node_id)
        if own is None:
            self._reject("mesh_health", where, ProtocolError(
                f"node {report.node_id} is no member of network {report.network}"))
            return 0
        if report.generation > state.generation:
            self._reject("mesh_health", where, ProtocolError(
                f"health at generation {report.generation}, ahead of the network's "
                f"{state.generation}"))
            return 0
        now = self._clock()
        ts = report.ts if abs(report.ts - now) < 300 else now  # a skewed clock: our time
        pairs = self._pairs.setdefault(report.network, {})
        n = 0
        bad = 0
        for ph in report.peers[:4096]:
            peer = state.peers.get(ph.node_id)
            if peer is None or ph.node_id == report.node_id or not _sane(ph):
                bad += 1
                continue
            pairs[(report.node_id, ph.node_id)] = PairStats(
                src=report.node_id, dst=ph.node_id, src_region=own.region,
                dst_region=peer.region, rtt_ms=float(ph.rtt_ms), loss=float(ph.loss),
                handshake_age=float(ph.handshake_age), rx_bytes=ph.rx_bytes,
                tx_bytes=ph.tx_bytes, relayed=ph.relayed, ts=ts)
            n += 1
        if bad:
            self._reject("mesh_health", where, ProtocolError(
                f"{bad} peer report(s) about non-members or out of range"))
        self.stats["reports"] += 1
        self._dirty.add(report.network)
        return n

    # -- reads -----------------------------------------------------------------------

    def pairs(self, network: str) -> list[PairStats]:
        """The current pairs of a network (members only, reported within max_age)."""
        state = self._states(network)
        horizon = self._clock() - self.max_age
        stored = self._pairs.get(network, {})
        if state is None:
            return []
        # Drop pairs whose ends left the network.
        for key in [k for k in stored if k[0] not in state.peers or k[1] not in state.peers]:
            del stored[key]
        return sorted((p for p in stored.values() if p.ts >= horizon),
                      key=lambda p: (p.src, p.dst))

    def view(self, network: str, *, by: str = "",
             visible: Callable[[str], bool] | None = None) -> dict[str, object]:
        """The matrix of a network; ``visible``: which members the caller may see (a
        scoped API token), pairs with an end outside it are left out."""
        pairs = self.pairs(network)
        state = self._states(network)
        members = sorted(state.peers) if state else []
        if visible is not None:
            members = [m for m in members if visible(m)]
            pairs = [p for p in pairs if visible(p.src) and visible(p.dst)]
        out: dict[str, object] = {"network": network, "members": members,
                                  "expected_pairs": len(members) * (len(members) - 1),
                                  "reported_pairs": len(pairs)}
        if by == "region":
            out["regions"] = aggregate(pairs)
        else:
            out["pairs"] = [p.public() for p in pairs]
        return out

    def region_rtt(self, network: str) -> Callable[[str, str], float | None]:
        """Median measured RTT between two regions (for the relay choice), if known."""
        def rtt(a: str, b: str) -> float | None:
            vals = [p.rtt_ms for p in self._pairs.get(network, {}).values()
                    if p.rtt_ms >= 0 and {p.src_region, p.dst_region} == {a, b}]
            return statistics.median(vals) if vals else None
        return rtt

    # -- into InfluxDB ---------------------------------------------------------------

    def points(self, network: str) -> list[MetricPoint]:
        pairs = self.pairs(network)
        out: list[MetricPoint] = []
        for p in pairs:
            fields: dict[str, float | int | bool | str] = {
                "loss": p.loss, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
                "relayed": p.relayed}
            if p.rtt_ms >= 0:
                fields["rtt_ms"] = p.rtt_ms
            if p.handshake_age >= 0:
                fields["handshake_age"] = p.handshake_age
            out.append(MetricPoint(
                measurement=MEASUREMENT, fields=fields,
                tags={"src": p.src, "dst": p.dst, "src_region": p.src_region or "?",
                      "dst_region": p.dst_region or "?"},
                ts=int(p.ts * 1e9)))
        now_ns = int(self._clock() * 1e9)
        for agg in aggregate(pairs):
            afields: dict[str, float | int | bool | str] = {
                "pairs": int(agg["pairs"]),  # type: ignore[call-overload]
                "loss": float(agg["loss"])}  # type: ignore[arg-type]
            if agg["rtt_ms"] is not None:
                afields["rtt_ms"] = float(agg["rtt_ms"])  # type: ignore[arg-type]
            out.append(MetricPoint(
                measurement=REGION_MEASUREMENT, fields=afields,
                tags={"src_region": str(agg["src_region"]), "dst_region": str(agg["dst_region"])},
                ts=now_ns))
        return out

    async def publish(self, network: str) -> int:
        """The network's matrix into METRICS as MetricBatches of at most POINTS_PER_BATCH
        points (a batch stays far below the stream's size limit); returns the points."""
        if self._js is None:
            return 0
        points = self.points(network)
        node = PSEUDO_NODE.format(network)
        seq = int(self._clock() * 1000)
        for i in range(0, len(points), POINTS_PER_BATCH):
            batch = MetricBatch(node_id=node, seq=seq + i, ts=int(self._clock() * 1e9),
                                points=points[i:i + POINTS_PER_BATCH],
                                tags={"network": network, "source": "mesh"})
            await self._js.publish(self._subjects.metrics(node), codec.encode(batch))
            self.stats["batches_published"] += 1
        self.stats["points_published"] += len(points)
        return len(points)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            dirty, self._dirty = self._dirty, set()
            for network in sorted(dirty):
                try:
                    await self.publish(network)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("network %s: matrix not written to METRICS: %s", network, exc)


def _sane(ph: MeshPeerHealth) -> bool:
    return (-1.0 <= ph.rtt_ms <= 600_000.0 and 0.0 <= ph.loss <= 1.0
            and ph.handshake_age >= -1.0 and ph.rx_bytes >= 0 and ph.tx_bytes >= 0)
