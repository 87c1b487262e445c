"""Peer distribution: what each network's members should have (from the networks, the
nodes, what each node told in its MeshJoin, and IPAM), published as a full snapshot to a
node on join or resync and as network-wide versioned deltas through JetStream ``MESH``.

One membership change is one delta on the network's subject (each member receives one
peer entry): O(N) bytes across the fleet. Deltas go out as plain core NATS messages that
the stream also keeps (see _publish_delta); a joiner's snapshot is zlib-compressed when its
MeshJoin says it reads that. Changes within ``window`` seconds are coalesced into one
delta. Two controllers compute the same deltas; the published state in KV
``mesh_state`` is written by compare-and-set, so only one of them publishes a generation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from controller.errors import Conflict, ControllerError, NotFound
from controller.mesh.invites import Invites, Unjoined
from controller.mesh.ipam import Ipam
from controller.mesh.networks import (
    LABEL_REGION,
    Membership,
    NetworkRecord,
    VpcRange,
    node_ranges,
)
from controller.mesh.rotation import RotationAcks
from controller.models import NodeRecord
from controller.state.streams import MESH as MESH_STREAM
from controller.state.table import Table
from protocol import codec
from protocol.errors import MeshPeerInvalid, ProtocolError
from protocol.mesh import (
    check_endpoint,
    check_peer,
    endpoints_with_underlay,
    key_bytes,
    public_endpoint,
)
from protocol.messages import (
    MeshDelta,
    MeshEndpoint,
    MeshJoin,
    MeshKeyRotation,
    MeshPeer,
    MeshResyncRequest,
    MeshRotateKey,
    MeshSnapshot,
)
from protocol.subjects import Subjects, check_token

log = logging.getLogger("barista.controller.mesh")

DEFAULT_WINDOW = 0.05
DEFAULT_BEACON = 30.0
MAX_MESH_MESSAGE = 64 * 1024
STORE_CHECKS = 40  # ~1.6 s in all of waiting for the stream to have kept a delta
Reject = Callable[[str, str, ProtocolError], None]


class MeshNode(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """What a node told about its WireGuard side (KV ``mesh_nodes``, key: node id)."""

    node_id: str
    public_key: str
    endpoints: list[MeshEndpoint] = []
    region: str = ""
    next_public_key: str = ""
    joined_at: float = 0.0
    updated_at: float = 0.0
    # The node reads zlib-compressed snapshots (MeshJoin ``accepts``).
    zlib: bool = False


class MeshState(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """A network as last published (KV ``mesh_state``, key: network name)."""

    network: str
    epoch: str
    generation: int = 0
    peers: dict[str, MeshPeer] = {}
    updated_at: float = 0.0


# -- pure parts: relay choice and the diff ---------------------------------------------


def choose_relays(
    peers: Sequence[MeshPeer], *, current: dict[str, str] | None = None,
    region_rtt: Callable[[str, str], float | None] | None = None,
) -> dict[str, str]:
    """A relay for every member without a public endpoint: a member with one, in the same
    region if there is such, else the one nearest by measured region RTT, else any; among
    equals the least loaded (fewest relayed members), then the smallest node id. A member
    keeps its current relay while that one is still among the best choices (no churn)."""
    public = sorted((p for p in peers if public_endpoint(p.endpoints) is not None),
                    key=lambda p: p.node_id)
    if not public:
        return {}
    current = current or {}
    load: dict[str, int] = {p.node_id: 0 for p in public}
    out: dict[str, str] = {}

    def tier(member: MeshPeer, relay: MeshPeer) -> tuple[int, float]:
        if member.region and member.region == relay.region:
            return (0, 0.0)
        rtt = region_rtt(member.region, relay.region) if region_rtt and member.region \
            and relay.region else None
        return (1, rtt) if rtt is not None else (2, 0.0)

    for member in sorted(peers, key=lambda p: p.node_id):
        if public_endpoint(member.endpoints) is not None:
            continue
        tiers = {r.node_id: tier(member, r) for r in public if r.node_id != member.node_id}
        if not tiers:
            continue
        best = min(tiers.values())
        held = current.get(member.node_id, "")
        if held in tiers and tiers[held][0] == best[0] and (best[0] != 1 or
                                                          tiers[held][1] <= best[1] * 1.2):
            choice = held
        else:
            choice = min((rid for rid, t in tiers.items() if t == best),
                         key=lambda rid: (load[rid], rid))
        out[member.node_id] = choice
        load[choice] += 1
    return out


@dataclass
class Diff:
    added: list[MeshPeer] = field(default_factory=list)
    changed: list[MeshPeer] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff(published: dict[str, MeshPeer], desired: dict[str, MeshPeer]) -> Diff:
    d = Diff()
    for node_id in sorted(desired):
        entry = desired[node_id]
        old = published.get(node_id)
        if old is None:
            d.added.append(entry)
        elif old != entry:
            d.changed.append(entry)
    d.removed = sorted(set(published) - set(desired))
    return d


def snapshot_of(net: NetworkRecord, state: MeshState, node_id: str) -> MeshSnapshot | None:
    own = state.peers.get(node_id)
    if own is None:
        return None
    return MeshSnapshot(
        network=net.name, generation=state.generation, own=own, cidr=net.cidr,
        peers=[p for nid, p in sorted(state.peers.items()) if nid != node_id],
        epoch=state.epoch, mtu=net.mtu, port=net.port, keepalive=net.keepalive)


# -- the distributor ---------------------------------------------------------------------


class MeshDistributor:
    """Keeps every network's members in step: node changes, joins, resyncs and key
    rotations mark networks dirty; a loop publishes one coalesced delta per dirty network
    and the snapshots asked for meanwhile. ``async with`` owns the loop and the
    subscriptions."""

    def __init__(
        self,
        *,
        networks: Table[NetworkRecord],
        nodes: Table[NodeRecord],
        mesh_nodes: Table[MeshNode],
        states: Table[MeshState],
        ipam: Ipam,
        membership: Membership,
        nc: NATS,
        js: JetStreamContext,
        subjects: Subjects,
        reject: Reject,
        window: float = DEFAULT_WINDOW,
        beacon_interval: float = DEFAULT_BEACON,
        max_state: int = 1024 * 1024 - 4096,
        region_rtt: Callable[[str, str], float | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.networks = networks
        self.nodes = nodes
        self.mesh_nodes = mesh_nodes
        self.states = states
        self.ipam = ipam
        self.membership = membership
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._reject = reject
        self.window = window
        # Every beacon_interval each network's current generation goes out as an empty
        # delta (from = to = it; core NATS, kept by the stream too): members that have it
        # ignore it as stale, a member that missed a delta (a subscription made late, a
        # reconnect) sees the gap and resyncs. N x ~110 bytes (75 of payload) a period,
        # whatever the network's size.
        self.beacon_interval = beacon_interval
        # The published state is one KV record and a snapshot one message: both must
        # fit in NATS' max_payload (about 250 bytes a member: ~4,000 members at 1 MiB).
        self.max_state = max_state
        self._region_rtt = region_rtt
        self._clock = clock
        self._dirty: set[str] = set()
        # node id -> networks it asked a snapshot of ("" = every network it is in)
        self._pending: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._beacon_task: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._unsubscribe: list[Callable[[], None]] = []
        # network -> node id -> why it cannot be a member (VPC overlap, invalid entry)
        self.conflicts: dict[str, dict[str, str]] = {}
        self.stats: dict[str, int] = {
            "deltas": 0, "delta_bytes": 0, "snapshots": 0, "snapshot_bytes": 0,
            "cas_conflicts": 0, "joins": 0, "resyncs": 0, "rotations": 0, "flushes": 0,
            "beacons": 0, "store_misses": 0, "underlay_changes": 0,
        }
        self._flushed = asyncio.Condition()
        self._failures: dict[str, int] = {}
        # network -> the delta of a generation written to the state but not yet sent
        self._unsent: dict[str, MeshDelta] = {}
        # Members that have not joined are invited (their agents run no overlay till then).
        self.invites = Invites(nc=nc, subjects=subjects)
        self.rotation = RotationAcks()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> MeshDistributor:
        self._unsubscribe += [
            self.nodes.subscribe(lambda _k, _r: self.mark_all()),
            self.mesh_nodes.subscribe(lambda _k, _r: self.mark_all()),
            self.networks.subscribe(lambda key, _r: self.mark(key)),
        ]
        s = self._subjects
        # Queue group: with several controllers one of them answers each request.
        for subject, cb in ((s.mesh_join_any, self._on_join),
                            (s.mesh_resync_any, self._on_resync),
                            (s.mesh_key_any, self._on_key)):
            self._subs.append(await self._nc.subscribe(subject, queue="controllers", cb=cb))
        self._task = asyncio.create_task(self._run(), name="mesh-distributor")
        self._beacon_task = asyncio.create_task(self._beacon(), name="mesh-beacon")
        self.mark_all()  # catch up with whatever changed while no controller ran
        return self

    async def __aexit__(self, *exc: object) -> None:
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe.clear()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()
        for task in (self._task, self._beacon_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._task = self._beacon_task = None

    async def _beacon(self) -> None:
        last = time.monotonic()
        while True:
            # Short ticks: a changed beacon_interval takes effect at once.
            await asyncio.sleep(min(1.0, self.beacon_interval))
            await self._send_invites()
            if time.monotonic() - last < self.beacon_interval:
                continue
            last = time.monotonic()
            for state in list(self.states):
                if self.networks.get(state.network) is None:
                    continue
                try:
                    await self._nc.publish(self._subjects.mesh_delta(state.network),
                                           codec.encode(MeshDelta(
                                               network=state.network,
                                               generation=state.generation,
                                               from_generation=state.generation,
                                               epoch=state.epoch)))
                    self.stats["beacons"] += 1
                except Exception as exc:  # a disconnect: the next period tries again
                    log.debug("mesh beacon for %s not sent: %s", state.network, exc)

    def mark(self, network: str) -> None:
        self._dirty.add(network)
        self._wake.set()

    def mark_all(self) -> None:
        for net in self.networks:
            self._dirty.add(net.name)
        self._wake.set()

    async def settled(self) -> None:
        """Wait until nothing is dirty (tests and the API's read-your-write); callers
        bound it (asyncio.timeout)."""
        async with self._flushed:
            await self._flushed.wait_for(lambda: not self._dirty and not self._pending
                                         and not self._wake.is_set() and not self._busy)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # Coalesce: whatever else changes within the window goes into the same delta.
            await asyncio.sleep(self.window)
            self._wake.clear()
            self._busy = True  # a round in flight is not settled (its sets are swapped out)
            dirty, self._dirty = self._dirty, set()
            pending, self._pending = self._pending, {}
            asked = {n for nets in pending.values() for n in nets}
            if "" in asked:
                dirty |= {n.name for n in self.networks}
            dirty |= asked - {""}
            for name in sorted(dirty):
                try:
                    await self._flush(name, pending)
                    self._failures.pop(name, None)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    n = self._failures[name] = self._failures.get(name, 0) + 1
                    if n == 1 or n % 20 == 0:
                        log.error("network %s: publishing its changes failed (%d times so "
                                  "far): %s; retrying", name, n, exc,
                                  exc_info=n == 1)
                    self._dirty.add(name)
                    # Keep the asked-for snapshots for the next round.
                    for node_id, nets in pending.items():
                        if name in nets or "" in nets:
                            self._pending.setdefault(node_id, set()).update(nets)
                    self._wake.set()
                    await asyncio.sleep(min(10.0, 0.5 * n))
            for node_id, nets in pending.items():
                for name in nets - {""}:
                    if self.networks.get(name) is None:
                        self._reject("mesh_resync", self._subjects.mesh_resync(node_id),
                                     ProtocolError(f"resync of unknown network {name!r}"))
            await self._send_invites()
            self.stats["flushes"] += 1
            self._busy = False
            async with self._flushed:
                self._flushed.notify_all()

    async def _send_invites(self) -> None:
        try:
            await self.invites.send_due()
        except Exception:  # never end the loop that called it
            log.exception("sending mesh invitations failed")

    # -- what a network should be ------------------------------------------------------

    def vpc_ranges(self) -> list[VpcRange]:
        """Every known node's VPC ranges (facts) and private endpoint addresses."""
        out: list[VpcRange] = []
        for node in self.nodes:
            out += node_ranges(node)
            mn = self.mesh_nodes.get(node.id)
            if mn is None:
                continue
            for ep in mn.endpoints:
                if ep.kind != "private":
                    continue
                try:
                    out.append((f"the private address of node {node.id} ({node.hostname})",
                                ipaddress.ip_network(ep.host)))
                except ValueError:
                    continue
        return out

    def _ranges_of(self, node: NodeRecord, mn: MeshNode) -> list[VpcRange]:
        out = node_ranges(node)
        for ep in mn.endpoints:
            if ep.kind == "private":
                try:
                    out.append((f"the private address of node {node.id}",
                                ipaddress.ip_network(ep.host)))
                except ValueError:
                    pass
        return out

    def members(self, net: NetworkRecord) -> list[tuple[NodeRecord, MeshNode]]:
        """Nodes in the network that have joined the mesh (their agent sent MeshJoin) and
        whose VPC does not overlap it (those are listed in ``conflicts``)."""
        out = []
        conflicts: dict[str, str] = {}
        unjoined: dict[str, Unjoined] = {}
        for node in self.membership.members(net, self.nodes):
            mn = self.mesh_nodes.get(node.id)
            if mn is None:
                unjoined[node.id] = Unjoined(status=node.status,
                                             status_changed_at=node.status_changed_at)
                continue
            why = Membership.conflicting(net, self._ranges_of(node, mn))
            if why:
                conflicts[node.id] = why
                continue
            out.append((node, mn))
        self.conflicts[net.name] = conflicts
        self.invites.update(net.name, unjoined)
        return out

    def _entry(self, net: NetworkRecord, node: NodeRecord, mn: MeshNode,
               address: str) -> MeshPeer:
        region = mn.region or node.labels.get(LABEL_REGION, "")
        # The network's port; an endpoint's region only where it differs from the peer's
        # (every member receives every entry: bytes saved here are saved N times).
        endpoints = [msgspec.structs.replace(ep, port=net.port,
                                             region="" if ep.region == region else ep.region)
                     for ep in mn.endpoints]
        return MeshPeer(node_id=node.id, public_key=mn.public_key, address=address,
                        endpoints=endpoints, next_public_key=mn.next_public_key,
                        region=region)

    async def desired(self, net: NetworkRecord, published: MeshState | None) -> dict[str, MeshPeer]:
        members = self.members(net)
        entries: list[MeshPeer] = []
        netw = net.network()
        for node, mn in members:
            address = self.ipam.address_of(net.name, node.id)
            if address is None:
                address = await self.ipam.assign(net, node.id)
            entry = self._entry(net, node, mn, address)
            try:
                check_peer(entry, netw)
            except MeshPeerInvalid as exc:
                self.conflicts[net.name][node.id] = f"invalid entry: {exc.reason or exc}"
                continue
            entries.append(entry)
        current = {nid: p.relay for nid, p in (published.peers if published else {}).items()
                   if p.relay}
        relays = choose_relays(entries, current=current, region_rtt=self._region_rtt)
        return {e.node_id: (msgspec.structs.replace(e, relay=relays[e.node_id])
                            if e.node_id in relays else e) for e in entries}

    # -- publishing ----------------------------------------------------------------------

    async def _flush(self, name: str, pending: dict[str, set[str]]) -> None:
        net = self.networks.get(name)
        unsent = self._unsent.pop(name, None)
        if unsent is not None and (net is None or net.epoch == unsent.epoch):
            # Written to the state but not (known to be) sent: send it again before
            # anything newer, or members would wait for the beacon to see the gap.
            await self._publish_delta(unsent)
        if net is None:
            await self._retire(name)
            return
        for _ in range(10):
            try:
                state, rev = await self.states.fetch(name)
            except NotFound:
                state, rev = None, 0
            if state is not None and state.epoch != net.epoch:
                # The network was made again under the same name: a new incarnation.
                await self.states.delete(name)
                state, rev = None, 0
            desired = await self.desired(net, state)
            d = diff(state.peers if state else {}, desired)
            base = state.generation if state else 0
            if state is not None and not d:
                break
            new = MeshState(network=name, epoch=net.epoch, generation=base + 1,
                            peers=desired, updated_at=self._clock())
            size = len(msgspec.msgpack.encode(new))
            if size > self.max_state:
                raise MeshTooLarge(name, len(desired), size, self.max_state)
            try:
                if state is None:
                    await self.states.create(name, new)
                else:
                    await self.states.update(name, new, revision=rev)
            except Conflict:
                self.stats["cas_conflicts"] += 1  # another controller published it
                continue
            await self._publish_delta(MeshDelta(
                network=name, generation=new.generation, from_generation=base,
                added=d.added, changed=d.changed, removed=d.removed, epoch=net.epoch))
            for node_id in d.removed:
                await self.ipam.release(name, node_id)
            state = new
            break
        else:
            raise Conflict(f"network {name}: too many concurrent publishers")
        if state is None:
            return
        asked = [node_id for node_id, nets in pending.items()
                 if name in nets or ("" in nets and node_id in state.peers)]
        # A member added without asking (the network was made, or came to take it in,
        # after it joined) has no view to apply the delta to, nor a subscription to this
        # network's deltas: it gets the snapshot (O(N) once, like a joiner's).
        added = [p.node_id for p in (d.added if d else []) if p.node_id not in pending]
        for node_id in asked + added:
            await self._send_snapshot(net, state, node_id)

    async def _stored(self, subject: str, delta: MeshDelta) -> None:
        """Wait (bounded) until the stream's last message on ``subject`` is ``delta`` or a
        later one of its network (stream ingestion runs apart from the fan-out)."""
        for attempt in range(STORE_CHECKS):
            try:
                last = await self._js.get_last_msg(MESH_STREAM, subject)
                kept = codec.decode(last.data or b"", MeshDelta)
                if kept.epoch != delta.epoch or kept.generation >= delta.generation:
                    return
            except (NotFoundError, ProtocolError):
                pass
            await asyncio.sleep(0.002 * (attempt + 1))
        self.stats["store_misses"] += 1
        raise ControllerError(f"network {delta.network}: generation {delta.generation} was "
                              f"sent but the stream {MESH_STREAM} did not keep it")

    async def _retire(self, name: str) -> None:
        """A removed network: one last delta takes every member out, then its state and
        addresses go."""
        try:
            state, _ = await self.states.fetch(name)
        except NotFound:
            state = None
        if state is not None:
            await self._publish_delta(MeshDelta(
                network=name, generation=state.generation + 1,
                from_generation=state.generation, removed=sorted(state.peers),
                epoch=state.epoch))
            await self.states.delete(name)
        self.conflicts.pop(name, None)
        self.invites.update(name, {})
        await self.ipam.drop_network(name)

    async def _publish_delta(self, delta: MeshDelta) -> None:
        """One delta to every member, as a plain core NATS message: a JetStream publish is a
        request, and its reply inbox (and a Nats-Msg-Id header) would go to each of the N
        subscribers with it (~90 bytes each, a third of a one-peer delta). The stream MESH
        still keeps it (it captures the subject); that it did is checked here, and a delta
        not kept is an error (the round is retried and the delta sent again: members take a
        repeat as stale)."""
        data = codec.encode(delta)
        subject = self._subjects.mesh_delta(delta.network)
        self._unsent[delta.network] = delta
        await self._nc.publish(subject, data)
        await self._stored(subject, delta)
        del self._unsent[delta.network]
        self.stats["deltas"] += 1
        self.stats["delta_bytes"] += len(data)
        log.info("network %s: generation %d (+%d ~%d -%d)", delta.network, delta.generation,
                 len(delta.added), len(delta.changed), len(delta.removed))

    async def _send_snapshot(self, net: NetworkRecord, state: MeshState, node_id: str) -> None:
        snap = snapshot_of(net, state, node_id)
        if snap is None:
            self._reject("mesh_resync", self._subjects.mesh_resync(node_id), ProtocolError(
                f"node {node_id} asked for network {net.name}, of which it is no member"
                + (f" ({self.conflicts.get(net.name, {}).get(node_id)})"
                   if node_id in self.conflicts.get(net.name, {}) else "")))
            return
        # N entries that share most of their structure (field names, regions, VPC ids,
        # ports, address prefixes): compressed to about a quarter, for a node that reads it.
        mn = self.mesh_nodes.get(node_id)
        data = codec.encode(snap, compress=mn is not None and mn.zlib)
        await self._nc.publish(self._subjects.mesh_snapshot(node_id), data)
        self.stats["snapshots"] += 1
        self.stats["snapshot_bytes"] += len(data)

    def request_snapshot(self, node_id: str, network: str = "") -> None:
        self._pending.setdefault(node_id, set()).add(network)
        self._wake.set()

    # -- what nodes send -------------------------------------------------------------

    def _known_node(self, where: str, msg: Msg, claimed: str) -> NodeRecord | None:
        node_id = self._subjects.node_id_of(msg.subject)
        if node_id is None or claimed != node_id:
            self._reject(where, msg.subject, ProtocolError(
                f"node id {claimed!r} does not match its subject"))
            return None
        node = self.nodes.get(node_id)
        if node is None or node.revoked:
            self._reject(where, msg.subject, ProtocolError(
                f"{'revoked' if node else 'unknown'} node {node_id}"))
            return None
        return node

    async def _on_join(self, msg: Msg) -> None:
        try:
            join = codec.decode(msg.data, MeshJoin, max_size=MAX_MESH_MESSAGE)
            key_bytes(join.public_key, node_id=join.node_id)
            if join.next_public_key:
                key_bytes(join.next_public_key, node_id=join.node_id, field="next_public_key")
            for ep in join.endpoints:
                check_endpoint(ep, node_id=join.node_id)
            if len(join.endpoints) > 16 or len(join.region) > 64:
                raise ProtocolError("too many endpoints or region too long")
            if len(join.accepts) > 8 or any(len(a) > 32 for a in join.accepts):
                raise ProtocolError("too many or too long accepted encodings")
        except ProtocolError as exc:
            self._reject("mesh_join", msg.subject, exc)
            return
        node = self._known_node("mesh_join", msg, join.node_id)
        if node is None:
            return
        now = self._clock()
        old = self.mesh_nodes.get(node.id)
        next_key = join.next_public_key
        if old is not None and old.next_public_key and join.public_key == old.next_public_key:
            next_key = ""  # the node restarted after switching: the rotation is done
        record = MeshNode(node_id=node.id, public_key=join.public_key,
                          endpoints=list(join.endpoints), region=join.region,
                          next_public_key=next_key,
                          joined_at=old.joined_at if old else now, updated_at=now,
                          zlib=codec.ZLIB in join.accepts)
        self.stats["joins"] += 1
        if old is None or msgspec.structs.replace(old, updated_at=now) != record:
            await self.mesh_nodes.put(node.id, record)
        self.request_snapshot(node.id)
        if node.wg_public_key != join.public_key:
            # The node record names the key in use (made when the node joined a network).
            def with_key(cur: NodeRecord) -> NodeRecord | None:
                return None if cur.wg_public_key == join.public_key else \
                    msgspec.structs.replace(cur, wg_public_key=join.public_key)
            try:
                await self.nodes.mutate(node.id, with_key)
            except ControllerError as exc:  # removed meanwhile, or contended: not needed
                log.debug("node %s: wireguard key not recorded: %s", node.id, exc)

    async def _on_resync(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, MeshResyncRequest, max_size=MAX_MESH_MESSAGE)
            if req.network:
                from protocol.subjects import check_token

                check_token(req.network, "network name")
        except (ProtocolError, ValueError) as exc:
            self._reject("mesh_resync", msg.subject, exc if isinstance(exc, ProtocolError)
                         else ProtocolError(str(exc)))
            return
        node = self._known_node("mesh_resync", msg, req.node_id)
        if node is None:
            return
        if req.network and self.networks.get(req.network) is None:
            self._reject("mesh_resync", msg.subject,
                         ProtocolError(f"resync of unknown network {req.network!r}"))
            return
        self.stats["resyncs"] += 1
        self.request_snapshot(node.id, req.network)

    async def _on_key(self, msg: Msg) -> None:
        try:
            step = codec.decode(msg.data, MeshKeyRotation, max_size=MAX_MESH_MESSAGE)
            key_bytes(step.public_key, node_id=step.node_id)
            key_bytes(step.next_public_key, node_id=step.node_id, field="next_public_key")
            if step.public_key == step.next_public_key:
                raise ProtocolError("next_public_key equals public_key")
            if step.phase == "ready":
                check_token(step.peer, "node id")
        except (ProtocolError, ValueError) as exc:
            self._reject("mesh_key", msg.subject, exc if isinstance(exc, ProtocolError)
                         else ProtocolError(str(exc)))
            return
        node = self._known_node("mesh_key", msg, step.node_id)
        if node is None:
            return
        if step.phase == "ready":
            await self._on_ready(node.id, step)
            return
        now = self._clock()

        def apply(cur: MeshNode) -> MeshNode | None:
            if step.phase == "announce":
                if cur.public_key != step.public_key:
                    raise _StaleStep(f"announce for key {step.public_key[:8]}..., but the "
                                     f"node's key is {cur.public_key[:8]}...")
                if cur.next_public_key == step.next_public_key:
                    return None
                return msgspec.structs.replace(cur, next_public_key=step.next_public_key,
                                               updated_at=now)
            if cur.public_key == step.next_public_key and not cur.next_public_key:
                return None  # already switched (a repeat)
            if cur.public_key != step.public_key or cur.next_public_key != step.next_public_key:
                raise _StaleStep("switched to a key that was not announced")
            return msgspec.structs.replace(cur, public_key=step.next_public_key,
                                           next_public_key="", updated_at=now)

        try:
            await self.mesh_nodes.mutate(node.id, apply)
        except NotFound:
            self._reject("mesh_key", msg.subject, ProtocolError(
                f"key rotation of node {node.id}, which has not joined the mesh"))
            return
        except _StaleStep as exc:
            self._reject("mesh_key", msg.subject, ProtocolError(str(exc)))
            return
        self.stats["rotations"] += 1
        log.info("node %s: key rotation step %s", node.id, step.phase)
        if step.phase == "announce":
            self.rotation.announced(node.id, step.next_public_key)
            await self._release(node.id)  # a member without peers switches at once
        else:
            self.rotation.forget(node.id)

    async def underlay_changed(self, node_id: str, facts: dict[str, str]) -> bool:
        """The node's underlay facts changed (a FactsUpdate: a VM stopped and started with
        a new public address, ...): its endpoints as it joined move to the new addresses,
        and every network it is in gets a delta with its changed entry (through the
        mesh_nodes watch, as for a MeshJoin). False when it has not joined or nothing
        changed."""
        if self.mesh_nodes.get(node_id) is None:
            return False
        now = self._clock()

        def apply(cur: MeshNode) -> MeshNode | None:
            endpoints = endpoints_with_underlay(cur.endpoints, facts)
            for ep in endpoints:
                check_endpoint(ep, node_id=node_id)
            if endpoints == cur.endpoints:
                return None
            return msgspec.structs.replace(cur, endpoints=endpoints, updated_at=now)

        try:
            before = self.mesh_nodes.get(node_id)
            after = await self.mesh_nodes.mutate(node_id, apply)
        except (NotFound, MeshPeerInvalid):
            return False
        if after is None or before is None or after.endpoints == before.endpoints:
            return False
        self.stats["underlay_changes"] += 1
        log.info("node %s: underlay changed, endpoints now %s", node_id,
                 ", ".join(f"{ep.kind} {ep.host}" for ep in after.endpoints) or "none")
        return True

    def _peers_of(self, node_id: str) -> set[str] | None:
        """Its peers in every network it is in; None: it is in none (nothing to say)."""
        states = [state for state in self.states if node_id in state.peers]
        if not states:
            return None
        return {nid for state in states for nid in state.peers if nid != node_id}

    async def _on_ready(self, sender: str, step: MeshKeyRotation) -> None:
        """A peer has the rotating node's next key in its WireGuard (see rotation.py)."""
        cur = self.mesh_nodes.get(step.peer)
        if cur is None or cur.next_public_key != step.next_public_key \
                or cur.public_key != step.public_key:
            self.rotation.stats["ready_stale"] += 1  # late or repeated: nothing to do
            return
        self.rotation.announced(step.peer, step.next_public_key)  # (after a restart)
        if self.rotation.ready(step.peer, step.next_public_key, sender):
            await self._release(step.peer)

    async def _release(self, node_id: str) -> None:
        peers = self._peers_of(node_id)
        key = self.rotation.release(node_id, peers) if peers is not None else ""
        if not key:
            return
        log.info("node %s: every peer has its next key; switch", node_id)
        try:
            await self._nc.publish(self._subjects.mesh_rotate(node_id), codec.encode(
                MeshRotateKey(reason="peers ready", ready_key=key)))
        except Exception as exc:  # the node switches after its own timeout
            log.warning("node %s: switch word not sent: %s", node_id, exc)

    async def rotate(self, node_id: str, reason: str = "") -> None:
        """Ask a node to rotate its WireGuard key (it announces the new one, see _on_key)."""
        if self.mesh_nodes.get(node_id) is None:
            raise NotFound(f"node {node_id!r} has not joined the mesh")
        await self._nc.publish(self._subjects.mesh_rotate(node_id),
                               codec.encode(MeshRotateKey(reason=reason)))

    # -- views -----------------------------------------------------------------------

    def state(self, network: str) -> MeshState | None:
        return self.states.get(network)

    def member_views(self, net: NetworkRecord) -> list[dict[str, object]]:
        state = self.states.get(net.name)
        peers = state.peers if state else {}
        out: list[dict[str, object]] = []
        for nid, p in sorted(peers.items()):
            node = self.nodes.get(nid)
            out.append({
                "node_id": nid, "hostname": node.hostname if node else "",
                "address": p.address, "public_key": p.public_key,
                "next_public_key": p.next_public_key, "region": p.region,
                "relay": p.relay,
                "public": public_endpoint(p.endpoints) is not None,
                "endpoints": [f"{e.kind}:{e.host}:{e.port}" for e in p.endpoints],
                "status": node.status if node else "gone",
            })
        return out

    def networks_of(self, node_id: str) -> list[str]:
        return sorted(s.network for s in self.states if node_id in s.peers)

    def summary(self, names: Iterable[str]) -> dict[str, object]:
        return {n: {"generation": s.generation, "members": len(s.peers)}
                for n in names if (s := self.states.get(n)) is not None}


class _StaleStep(Exception):
    pass


class MeshTooLarge(ControllerError):
    """A network's published state (and so its snapshot) would not fit one NATS message."""

    code = "mesh_too_large"

    def __init__(self, network: str, members: int, size: int, limit: int) -> None:
        super().__init__(
            f"network {network}: {members} members make a state of {size} bytes, over the "
            f"{limit} bytes one NATS message may carry; raise the server's max_payload or "
            "split the network", details={"network": network, "members": members,
                                          "size": size, "limit": limit})
