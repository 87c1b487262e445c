"""NetMesh: the node's overlay networks, kept as the controller describes them.

Snapshots replace a network's view, deltas are applied in generation order (stale ones
ignored, a gap asks for a resync), bad input is counted and never reaches WireGuard. Each
view is persisted, so a restarted agent brings its tunnels back with the same key and
address before the controller answers. Two-phase key rotation (protocol MeshKeyRotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.files import write_private
from agent.netmesh.apply import Plan, WgPeer, diff, plan
from agent.netmesh.backend import IFNAME_MAX, Backend
from agent.netmesh.errors import NetmeshError
from agent.netmesh.host import Host
from agent.netmesh.keys import KeyStore
from agent.netmesh.probes import PROBE_PORT, Prober
from agent.netmesh.uapi import DeviceOp, DeviceState, Endpoint, PeerOp
from protocol import codec
from protocol.errors import MeshPeerInvalid, ProtocolError
from protocol.mesh import Net, check_peer, choose_endpoint, key_bytes, network_of
from protocol.messages import (
    MeshDelta,
    MeshHealth,
    MeshInvite,
    MeshKeyRotation,
    MeshPeer,
    MeshPeerHealth,
    MeshResyncRequest,
    MeshRotateKey,
    MeshSnapshot,
    Message,
)
from protocol.subjects import check_token

Publish = Callable[[Message], Awaitable[None]]
KICK_AFTER = 1.0  # seconds without a handshake before a new (or re-keyed) peer is re-added
# ... after a switch on the word that every peer has our key: the initiation was not
# dropped, only slow (a loaded machine) or lost, and a re-add would also drop the old
# session that still carries the peer's traffic to us
KICK_AFTER_READY = 2.5
KICK_AFTER_SECOND = 1.5  # ... by the second end of a pair that reaches each other directly
KICKS_PER_PEER = 3  # re-adds at 1 x, 2 x, 3 x that delay after it was added (or we switched)
KICK_POLL = 0.2  # the tick while only re-adds or one-way checks are pending
APPLY_BATCH = 50  # peers per WireGuard transaction (a netlink attribute holds 64 KiB)
POKE_KEEPALIVE = 1  # set for a moment: wireguard-go then sends a handshake initiation
# After a new peer's handshake, while our probes run: nothing received from it for this
# long (and probe intervals), though we sent, means its packets do not reach our session
# (see _kick_silent): re-added
CONFIRM_AFTER = 1.5
CONFIRM_PROBES = 3  # ... or this many probe intervals, if longer


@dataclass(slots=True)
class MeshStats:
    snapshots: int = 0
    deltas: int = 0
    stale: int = 0
    gaps: int = 0
    rejected: int = 0  # whole messages refused (garbage, wrong node, bad settings)
    rejected_peers: int = 0  # entries dropped from otherwise good messages
    unknown_network: int = 0
    resyncs: int = 0
    apply_errors: int = 0
    rotations: int = 0
    invites: int = 0  # invitations on the snapshot subject once the overlay runs (ignored)
    readds: int = 0  # silent peers re-added (no handshake yet, see _kick_silent)
    one_way: int = 0  # ... handshaken, but nothing came from them after it


@dataclass(slots=True)
class View:
    """One network as this node knows it."""

    network: str
    epoch: str
    generation: int
    cidr: Net
    mtu: int
    port: int
    keepalive: int
    own: MeshPeer
    peers: dict[str, MeshPeer]
    moved: set[str] = field(default_factory=set)  # rotating peers whose new key handshook

    def snapshot(self) -> MeshSnapshot:
        return MeshSnapshot(network=self.network, generation=self.generation, own=self.own,
                            cidr=str(self.cidr), peers=list(self.peers.values()),
                            epoch=self.epoch, mtu=self.mtu, port=self.port,
                            keepalive=self.keepalive)


@dataclass(slots=True)
class _Iface:
    """What we last applied to one interface (so a tick with no change runs no command)."""

    settings: tuple[object, ...] | None = None
    routes: frozenset[str] | None = None
    forward: bool | None = None
    endpoints: dict[bytes, Endpoint | None] = field(default_factory=dict)
    plan: Plan | None = None
    failed: set[bytes] = field(default_factory=set)  # peer ops refused in the last apply
    # peers we reach that have to handshake: key -> (since when, wall clock; re-adds; the
    # delay between re-adds)
    waiting: dict[bytes, tuple[float, int, float]] = field(default_factory=dict)
    # peers that handshook while waiting, until something arrives from them: key -> (when
    # we saw the handshake, wall clock; rx and tx bytes then; re-adds so far)
    confirming: dict[bytes, tuple[float, int, int, int]] = field(default_factory=dict)
    prober: Prober | None = None
    prober_address: str = ""


def interface_name(prefix: str, network: str) -> str:
    name = prefix + network
    if len(name) <= IFNAME_MAX:
        return name
    digest = hashlib.sha1(network.encode()).hexdigest()
    return prefix + digest[: IFNAME_MAX - len(prefix)]


class NetMesh:
    """``async with NetMesh(node_id=..., state_dir=..., backend=..., publish=...)``."""

    def __init__(self, *, node_id: str, state_dir: Path, backend: Backend,
                 host: Host | None = None, publish: Publish | None = None,
                 ifname_prefix: str = "bm-", reconcile_interval: float = 5.0,
                 health_interval: float = 10.0, probe_interval: float = 1.0,
                 probe_steady_interval: float = 1.0,
                 probe_port: int = PROBE_PORT, probes: bool = True,
                 rotation_poll: float = 0.05, switch_timeout: float = 5.0,
                 switch_poll: float = 0.01,
                 log: logging.Logger | None = None) -> None:
        self.node_id = check_token(node_id, "node id")
        self.state_dir = state_dir
        self.backend = backend
        self.host = host or Host()
        self.publish = publish
        if len(ifname_prefix) > IFNAME_MAX - 4:
            raise NetmeshError(f"interface prefix {ifname_prefix!r} is too long")
        self.ifname_prefix = ifname_prefix
        self.reconcile_interval = reconcile_interval
        self.health_interval = health_interval
        self.probe_interval = probe_interval  # peers that have not answered yet
        self.probe_steady_interval = probe_steady_interval  # ... and those that have
        self.probe_port = probe_port
        self.probes = probes
        self.rotation_poll = rotation_poll
        self.switch_poll = switch_poll
        self.switch_timeout = switch_timeout
        self.log = log or logging.getLogger(f"barista.netmesh.{node_id}")
        self.keys = KeyStore(state_dir / "wireguard")
        self.views: dict[str, View] = {}
        self.stats = MeshStats()
        self._ifaces: dict[str, _Iface] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_resync: dict[str, float] = {}
        self._last_key_msg = 0.0
        self._switch_due = 0.0
        self._fast_until = 0.0
        self._switched_at = 0.0  # wall clock (UAPI handshake times are wall clock)
        self._ready_key = ""  # the controller said every peer has this next key of ours
        # (rotating peer, its next key) we said ready for -> when (monotonic)
        self._acked: dict[tuple[str, str], float] = {}
        self._sending: set[asyncio.Future[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def views_dir(self) -> Path:
        return self.state_dir / "mesh"

    @property
    def public_key(self) -> str:
        return self.keys.public

    async def __aenter__(self) -> NetMesh:
        self.views_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.views_dir.glob("*.snapshot")):
            try:
                snap = codec.decode(path.read_bytes(), MeshSnapshot)
                view = self._view_of(snap)
            except (ProtocolError, OSError) as exc:
                self.log.warning("persisted mesh view %s unusable: %s", path.name, exc)
                continue
            self.views[view.network] = view
            self.log.info("network %s: restored generation %d", view.network, view.generation)
        for name in list(self.views):
            await self._reconcile_logged(name)
        self._tasks = [asyncio.create_task(self._tick_loop(), name="netmesh-tick"),
                       asyncio.create_task(self._health_loop(), name="netmesh-health")]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, keep_interfaces: bool = False) -> None:
        await _cancel(self._tasks, self.log)
        self._tasks.clear()
        for name in list(self._ifaces):
            await self._stop_prober(name)
            if not keep_interfaces:
                with contextlib.suppress(Exception):
                    await self.backend.down(self.ifname(name))
        self._ifaces.clear()

    def ifname(self, network: str) -> str:
        return interface_name(self.ifname_prefix, network)

    def plan(self, network: str) -> Plan | None:
        """What the network's interface was last configured with (peers, relays, routes)."""
        iface = self._ifaces.get(network)
        return iface.plan if iface is not None else None

    def prober(self, network: str) -> Prober | None:
        iface = self._ifaces.get(network)
        return iface.prober if iface is not None else None

    def resync_all(self, reason: str) -> None:
        """Ask for a fresh snapshot of every network we know (after a (re)connect)."""
        for name, view in self.views.items():
            self._request_resync(name, view.generation, reason, force=True)

    # -- input -------------------------------------------------------------------------

    def _reject(self, what: str, exc: Exception) -> str:
        self.stats.rejected += 1
        self.log.warning("mesh %s rejected: %s", what, exc)
        return "rejected"

    def _checked_peers(self, entries: list[MeshPeer], cidr: Net, network: str
                       ) -> dict[str, MeshPeer]:
        good: dict[str, MeshPeer] = {}
        for peer in entries:
            try:
                check_peer(peer, cidr)
            except MeshPeerInvalid as exc:
                self.stats.rejected_peers += 1
                self.log.warning("network %s: peer %r dropped: %s", network,
                                 exc.node_id or peer.node_id, exc)
                continue
            good[peer.node_id] = peer
        return good

    def _view_of(self, snap: MeshSnapshot) -> View:
        check_token(snap.network, "network name")
        cidr = network_of(snap.cidr)
        if snap.own.node_id != self.node_id:
            raise MeshPeerInvalid(f"snapshot is for node {snap.own.node_id!r}",
                                  node_id=snap.own.node_id, field="own")
        check_peer(snap.own, cidr)
        min_mtu = 1280 if cidr.version == 6 else 576
        if not min_mtu <= snap.mtu <= 9000:
            raise MeshPeerInvalid(f"mtu {snap.mtu} out of range", field="mtu")
        if not 1 <= snap.port <= 65535:
            raise MeshPeerInvalid(f"port {snap.port} out of range", field="port")
        if not 0 <= snap.keepalive <= 65535:
            raise MeshPeerInvalid(f"keepalive {snap.keepalive} out of range",
                                  field="keepalive")
        if snap.generation < 0:
            raise MeshPeerInvalid("negative generation", field="generation")
        peers = self._checked_peers([p for p in snap.peers if p.node_id != self.node_id],
                                    cidr, snap.network)
        return View(network=snap.network, epoch=snap.epoch, generation=snap.generation,
                    cidr=cidr, mtu=snap.mtu, port=snap.port, keepalive=snap.keepalive,
                    own=snap.own, peers=peers)

    async def handle_snapshot(self, data: bytes | MeshSnapshot) -> str:
        """Apply a snapshot: "applied", "stale", "invite" or "rejected"."""
        try:
            if isinstance(data, MeshSnapshot):
                snap = data
            else:
                got = codec.decode(data)
                if isinstance(got, MeshInvite):
                    # The snapshot subject also carries invitations: one sent before the
                    # controller saw our MeshJoin (a retry, a second controller) asks
                    # nothing more.
                    self.stats.invites += 1
                    return "invite"
                # anything else is refused with the typed decoder's own words
                snap = got if isinstance(got, MeshSnapshot) else codec.decode(data, MeshSnapshot)
            view = self._view_of(snap)
        except (ProtocolError, ValueError) as exc:
            return self._reject("snapshot", exc)
        async with self._lock(view.network):
            old = self.views.get(view.network)
            if old is not None and old.epoch == view.epoch and view.generation < old.generation:
                self.stats.stale += 1
                return "stale"
            if old is not None:
                view.moved = {n for n in old.moved if n in view.peers
                              and view.peers[n].next_public_key}
            self.views[view.network] = view
            self.stats.snapshots += 1
            self._persist(view)
            self.log.info("network %s: snapshot generation %d, %d peers", view.network,
                          view.generation, len(view.peers))
            await self._own_changed(view)
            await self._reconcile_logged(view.network, locked=True)
        if self._rotation_pending():
            self._wake.set()  # poll for the new key's handshake from now, not next tick
        return "applied"

    async def handle_delta(self, data: bytes | MeshDelta) -> str:
        """Apply a delta: "applied", "stale", "gap", "unknown" or "rejected"."""
        try:
            delta = data if isinstance(data, MeshDelta) else codec.decode(data, MeshDelta)
            check_token(delta.network, "network name")
        except (ProtocolError, ValueError) as exc:
            return self._reject("delta", exc)
        view = self.views.get(delta.network)
        if view is None:
            self.stats.unknown_network += 1
            self.log.warning("delta for network %r, which this node is not in", delta.network)
            return "unknown"
        async with self._lock(delta.network):
            view = self.views.get(delta.network)
            if view is None:
                self.stats.unknown_network += 1
                return "unknown"
            if delta.epoch and view.epoch and delta.epoch != view.epoch:
                self.stats.gaps += 1
                self._request_resync(view.network, view.generation, "epoch")
                return "gap"
            if delta.generation <= view.generation:
                self.stats.stale += 1
                return "stale"
            if delta.from_generation != view.generation or \
                    delta.from_generation >= delta.generation:
                self.stats.gaps += 1
                self._request_resync(view.network, view.generation, "gap")
                return "gap"
            if self.node_id in delta.removed:
                self.log.info("network %s: this node was removed", view.network)
                await self._leave(view.network)
                return "applied"
            peers = dict(view.peers)
            for node_id in delta.removed:
                peers.pop(node_id, None)
                view.moved.discard(node_id)
            own = view.own
            entries: list[MeshPeer] = []
            for peer in list(delta.added) + list(delta.changed):
                if peer.node_id == self.node_id:
                    try:
                        check_peer(peer, view.cidr)
                        own = peer
                    except MeshPeerInvalid as exc:
                        self.stats.rejected_peers += 1
                        self.log.warning("network %s: own entry dropped: %s", view.network, exc)
                else:
                    entries.append(peer)
            for node_id, peer in self._checked_peers(entries, view.cidr, view.network).items():
                if not peer.next_public_key:
                    view.moved.discard(node_id)
                peers[node_id] = peer
            view.peers, view.own, view.generation = peers, own, delta.generation
            self.stats.deltas += 1
            self._persist(view)
            await self._own_changed(view)
            await self._reconcile_logged(view.network, locked=True)
        if self._rotation_pending():
            self._wake.set()  # poll for the new key's handshake from now, not next tick
        return "applied"

    # -- rotation ----------------------------------------------------------------------

    async def rotate_key(self) -> str:
        """Phase 1: make the next key (kept on the node) and announce its public key."""
        nxt = self.keys.begin_rotation()
        self.stats.rotations += 1
        self.log.info("key rotation: announcing %s (in use: %s)", nxt, self.keys.public)
        await self._send_key("announce")
        self._wake.set()
        return nxt

    async def _send_key(self, phase: str) -> None:
        self._last_key_msg = time.monotonic()
        if self.publish is None:
            return
        if phase == "announce":
            msg = MeshKeyRotation(node_id=self.node_id, phase="announce",
                                  public_key=self.keys.public,
                                  next_public_key=self.keys.next_public)
        else:
            old = self.keys.old.public_b64 if self.keys.old is not None else ""
            msg = MeshKeyRotation(node_id=self.node_id, phase="switched", public_key=old,
                                  next_public_key=self.keys.public)
        try:
            await self.publish(msg)
        except Exception as exc:
            self.log.warning("key rotation %s not sent: %s", phase, exc)

    async def handle_rotate(self, data: bytes | MeshRotateKey) -> str:
        """The controller on our rotate subject: "rotated" (a rotation started), "ready"
        (switch now: every peer has our next key), "ignored" or "rejected"."""
        try:
            req = data if isinstance(data, MeshRotateKey) else codec.decode(data, MeshRotateKey)
        except ProtocolError as exc:
            return self._reject("rotate request", exc)
        if req.ready_key:
            return "ready" if self.peers_ready(req.ready_key) else "ignored"
        await self.rotate_key()
        return "rotated"

    def peers_ready(self, key: str) -> bool:
        """Every peer has our next key in its WireGuard: switch at once (no need to wait
        for our own view, the peers' is what matters). False: not our next key."""
        if self.keys.next is None or key != self.keys.next_public:
            self.log.info("key rotation: switch word for %s, not our next key: ignored", key)
            return False
        self._ready_key = key
        self._switch_due = time.monotonic()
        self._wake.set()
        return True

    async def _own_changed(self, view: View) -> None:
        """The network's view of this node: switch when every peer has our next key (the
        controller says so) or, failing that word, switch_timeout after our own entry
        showed it; forget the old key when the network committed the new one."""
        own = view.own
        if self.keys.next is not None and own.next_public_key == self.keys.next_public:
            if not self._switch_due:
                ready = self._ready_key == self.keys.next_public
                self._switch_due = time.monotonic() + (0.0 if ready else self.switch_timeout)
                self._wake.set()
        elif self.keys.old is not None and own.public_key == self.keys.public \
                and not own.next_public_key:
            self.keys.finish()
            self.log.info("key rotation: %s committed, old key deleted", self.keys.public)

    async def _switch_if_due(self) -> None:
        if not self._switch_due or time.monotonic() < self._switch_due:
            return
        self._switch_due = 0.0
        if self.keys.next is None:
            return
        ready = self._ready_key == self.keys.next_public
        if not ready:
            self.log.warning("key rotation: no word that every peer has our next key after "
                             "%.1f s; switching anyway", self.switch_timeout)
        self.keys.switch()
        self._ready_key = ""
        self._switched_at = time.time()
        self.log.info("key rotation: switched to %s", self.keys.public)
        for name in list(self.views):
            iface = self._ifaces.get(name)
            if iface is not None and iface.plan is not None:
                # A peer that missed the new key (a timeout switch) drops our initiation;
                # _kick_silent re-adds it instead of WireGuard's retry after 5 s.
                for key, peer in iface.plan.peers.items():
                    if peer.endpoint is not None and peer.allowed_ips:
                        iface.waiting[key] = (self._switched_at, 0,
                                              KICK_AFTER_READY if ready else KICK_AFTER)
            await self._reconcile_logged(name)
            await self._poke_all(name)
        await self._send_key("switched")

    async def _poke_all(self, network: str) -> None:
        """Right after our switch: every peer holding prefixes initiates its handshake
        with our new key now, not when our next packet for it comes (the packet that
        started it went out right after the handshake, before the peer's poll had moved
        our prefixes to the new key: one lost packet per rotation)."""
        iface = self._ifaces.get(network)
        if iface is None or iface.plan is None:
            return
        ops = [op for key, peer in iface.plan.peers.items() if peer.allowed_ips
               for op in (PeerOp(public_key=key, update_only=True, keepalive=0),
                          PeerOp(public_key=key, update_only=True, keepalive=POKE_KEEPALIVE),
                          PeerOp(public_key=key, update_only=True, keepalive=peer.keepalive))]
        if not ops:
            return
        try:
            await self.backend.set(self.ifname(network), None, ops)
        except Exception as exc:  # their traffic starts the handshakes instead
            self.log.warning("network %s: peers not poked after our switch: %s", network, exc)

    def _kicking(self) -> bool:
        return any(iface.waiting or iface.confirming for iface in self._ifaces.values())

    async def _kick_silent(self, network: str) -> None:
        """A peer we reach that has not handshaken KICK_AFTER after it was added (or after
        our key switch without the ready word) probably dropped our initiation: it did not
        have our key yet, or its interface was not up. WireGuard would retry only after
        5 s (REKEY_TIMEOUT); re-adding that one peer resets its handshake state and
        initiates at once. At most KICKS_PER_PEER times.

        A peer that handshook is watched a little longer while our probes run (they are
        answered, so something comes back within a few probe intervals): when we sent
        since the handshake and received nothing, its packets miss our session. That is
        what crossing first initiations can leave in wireguard-go (both ends add each
        other at the same moment and both initiate; ConsumeMessageResponse checks the
        handshake state under a read lock and writes it later, so the initiation
        answered meanwhile on the other handshake worker deletes the index the new
        session is then installed under: we send on it, the peer's packets to that index
        are dropped). wireguard-go repairs that only when its new-handshake timer fires,
        15 s (KeepaliveTimeout + RekeyTimeout) after our first unanswered packet. A re-add
        on this side only (the peer receives our packets: its rx grows, it does nothing)
        makes one fresh handshake at once."""
        iface = self._ifaces.get(network)
        if iface is None or not (iface.waiting or iface.confirming):
            return
        ifname = self.ifname(network)
        state = await self.backend.get(ifname)
        now = time.time()
        want = iface.plan.peers if iface.plan is not None else {}
        readd: list[tuple[bytes, WgPeer]] = []  # in one transaction (see _apply_ops)
        for key, (since, count, delay) in list(iface.waiting.items()):
            have, peer = state.peers.get(key), want.get(key)
            if have is not None and peer is not None and have.last_handshake >= since:
                self.log.info("network %s: handshake with %s %.2f s after it was due",
                              network, peer.node_id, have.last_handshake - since)
                if self.probes:
                    iface.confirming[key] = (now, have.rx_bytes, have.tx_bytes, count)
            if have is None or peer is None or have.last_handshake >= since \
                    or count >= KICKS_PER_PEER:
                del iface.waiting[key]
                continue
            if now - since < delay * (count + 1):
                continue
            iface.waiting[key] = (since, count + 1, delay)
            self.log.info("network %s: no handshake with %s yet; re-adding it", network,
                          peer.node_id)
            self.stats.readds += 1
            readd.append((key, peer))
        window = max(CONFIRM_AFTER, CONFIRM_PROBES * self.probe_interval)
        for key, (seen, rx, tx, count) in list(iface.confirming.items()):
            have, peer = state.peers.get(key), want.get(key)
            if have is None or peer is None or have.rx_bytes > rx or count >= KICKS_PER_PEER:
                del iface.confirming[key]
                continue
            if now - seen < window:
                continue
            del iface.confirming[key]
            if have.tx_bytes <= tx:
                continue  # we sent nothing either: no sign of trouble
            self.log.info("network %s: handshake with %s, but nothing from it in %.1f s "
                          "though we sent %d bytes; re-adding it", network, peer.node_id,
                          now - seen, have.tx_bytes - tx)
            self.stats.one_way += 1
            iface.waiting[key] = (now, count + 1, KICK_AFTER)
            readd.append((key, peer))
        for start in range(0, len(readd), APPLY_BATCH):
            await self._readd(ifname, iface, readd[start:start + APPLY_BATCH])

    async def _readd(self, ifname: str, iface: _Iface, peers: list[tuple[bytes, WgPeer]]
                     ) -> None:
        if not peers:
            return
        await self.backend.set(ifname, None, [
            op for key, peer in peers
            for op in (PeerOp(public_key=key, remove=True),
                       *_poked(PeerOp(public_key=key, endpoint=peer.endpoint,
                                      keepalive=peer.keepalive,
                                      allowed_ips=tuple(sorted(peer.allowed_ips)))))])
        for key, peer in peers:
            iface.endpoints[key] = peer.endpoint

    async def _ack_rotations(self) -> None:
        """Say "ready" for every rotating peer whose next key is in our WireGuard now (in
        every network we share with it), once per rotation: the controller tells the
        rotating node to switch when all its peers did (controller/mesh/rotation.py)."""
        pending: dict[tuple[str, str], MeshPeer] = {}
        for view in self.views.values():
            for node_id, peer in view.peers.items():
                if peer.next_public_key:
                    pending[(node_id, peer.next_public_key)] = peer
        self._acked = {k: t for k, t in self._acked.items() if k in pending}
        for (node_id, nxt), peer in pending.items():
            if (node_id, nxt) in self._acked or not all(
                    self._has_key(name, node_id, nxt) for name, v in self.views.items()
                    if node_id in v.peers and v.peers[node_id].next_public_key == nxt):
                continue
            self._acked[(node_id, nxt)] = time.monotonic()
            if self.publish is None:
                continue
            try:
                await self.publish(MeshKeyRotation(
                    node_id=self.node_id, phase="ready", public_key=peer.public_key,
                    next_public_key=nxt, peer=node_id))
            except Exception as exc:  # the rotating node switches after its timeout
                self.log.warning("key rotation of %s: ready not sent: %s", node_id, exc)

    def _switch_imminent(self) -> bool:
        """We said ready for a peer that has not handshaken with its new key yet: it may
        switch any moment (when all its peers said so), and until we move its prefixes
        its packets with the new key fail our allowed-IPs check. Poll at switch_poll for
        that, for switch_timeout + 1 s after our ready at most."""
        now = time.monotonic()
        for (node_id, nxt), when in self._acked.items():
            if now - when > self.switch_timeout + 1.0:
                continue
            if any(node_id in v.peers and v.peers[node_id].next_public_key == nxt
                   and node_id not in v.moved for v in self.views.values()):
                return True
        return False

    def _has_key(self, network: str, node_id: str, next_key: str) -> bool:
        iface = self._ifaces.get(network)
        if iface is None or iface.plan is None:
            return False
        key = key_bytes(next_key)
        if key in iface.plan.peers:
            return key not in iface.failed
        # Relayed, unreachable or in conflict here: no WireGuard entry of its own to add.
        return all(p.node_id != node_id for p in iface.plan.peers.values())

    def _rotation_pending(self) -> bool:
        """A peer rotates and its new key has not handshaken yet: poll fast, for a while
        (a peer that never switches falls back to the normal tick after a minute)."""
        pending = any(p.next_public_key and n not in v.moved
                      for v in self.views.values() for n, p in v.peers.items())
        if not pending:
            self._fast_until = 0.0
            return False
        now = time.monotonic()
        if not self._fast_until:
            self._fast_until = now + 60.0
        return now < self._fast_until

    def _note_moves(self, view: View, state: DeviceState) -> bool:
        """Rotating peers whose new key handshook here: their allowed IPs move to it."""
        changed = False
        for node_id, peer in view.peers.items():
            if not peer.next_public_key or node_id in view.moved:
                continue
            have = state.peers.get(key_bytes(peer.next_public_key))
            if have is not None and (have.last_handshake > 0 or have.rx_bytes > 0):
                view.moved.add(node_id)
                changed = True
                self.log.info("network %s: peer %s handshook with its new key", view.network,
                              node_id)
        return changed

    # -- reconcile ---------------------------------------------------------------------

    def _lock(self, network: str) -> asyncio.Lock:
        return self._locks.setdefault(network, asyncio.Lock())

    def _persist(self, view: View) -> None:
        path = self.views_dir / f"{view.network}.snapshot"
        try:
            write_private(path, codec.encode(view.snapshot()), durable=False)
        except OSError as exc:
            self.log.warning("network %s: view not persisted: %s", view.network, exc)

    async def _leave(self, network: str) -> None:
        self.views.pop(network, None)
        await self._stop_prober(network)
        self._ifaces.pop(network, None)
        with contextlib.suppress(Exception):
            await self.backend.down(self.ifname(network))
        with contextlib.suppress(FileNotFoundError):
            (self.views_dir / f"{network}.snapshot").unlink()

    async def _reconcile_logged(self, network: str, *, locked: bool = False) -> None:
        try:
            if locked:
                await self._reconcile(network)
            else:
                async with self._lock(network):
                    await self._reconcile(network)
        except Exception as exc:
            self.stats.apply_errors += 1
            self.log.warning("network %s: apply failed: %s", network, exc)

    async def _reconcile(self, network: str) -> None:
        view = self.views.get(network)
        if view is None:
            return
        ifname = self.ifname(network)
        iface = self._ifaces.setdefault(network, _Iface())
        if not self.backend.alive(ifname):
            if iface.settings is not None:
                self.log.warning("network %s: WireGuard backend for %s gone; restarting",
                                 network, ifname)
            iface = self._ifaces[network] = _Iface(prober=iface.prober,
                                                   prober_address=iface.prober_address)
            await self.backend.up(ifname)
        state = await self.backend.get(ifname)
        key = self.keys.current
        dev = DeviceOp(private_key=key.secret() if state.private_key_hash != hash(key.secret())
                       else None,
                       listen_port=view.port if state.listen_port != view.port else None)
        if dev.private_key is not None or dev.listen_port is not None:
            await self.backend.set(ifname, dev, [])
        settings = (view.own.address, view.cidr.prefixlen, view.mtu)
        if iface.settings != settings:
            await self.host.set_address(ifname, view.own.address, view.cidr.prefixlen)
            await self.host.set_link(ifname, mtu=view.mtu)
            iface.settings = settings
        self._note_moves(view, state)
        want = plan(view.own, view.peers, cidr=view.cidr, keepalive=view.keepalive,
                    moved=view.moved)
        iface.failed = set()
        ops = diff(state, want, iface.endpoints)
        # A new peer that holds prefixes and has an endpoint initiates its handshake at
        # once, not at its first packet: when the other side adds us a moment later, its
        # own initiation reaches us and we answer (both ends do this).
        pokes = {op.public_key for op in ops if not op.remove and not op.update_only
                 and op.endpoint is not None and op.allowed_ips}
        since = time.time()  # before: a handshake may complete during the call
        done = await self._apply_ops(network, ifname, ops, pokes, iface)
        for op in done:
            if op.remove:
                iface.endpoints.pop(op.public_key, None)
                iface.waiting.pop(op.public_key, None)
                iface.confirming.pop(op.public_key, None)
            elif op.endpoint is not None or not op.update_only:
                iface.endpoints[op.public_key] = op.endpoint
            if op.public_key in pokes:
                iface.waiting[op.public_key] = (since, 0, self._kick_after(
                    view, want.peers[op.public_key].node_id))
        iface.plan = want
        await self._ack_rotations()
        routes = frozenset(want.routes)
        if iface.routes != routes:
            await self.host.set_routes(ifname, routes)
            iface.routes = routes
        if iface.forward != want.forward:
            if want.forward or iface.forward:
                await self.host.set_forwarding(want.forward)
            iface.forward = want.forward
        if self.probes and iface.prober_address != view.own.address:
            await self._stop_prober(network)
            iface.prober = await self._start_prober(network, view.own.address)
            iface.prober_address = view.own.address

    def _kick_after(self, view: View, node_id: str) -> float:
        """The delay between re-adds of a new peer that has not handshaken. A peer that
        reaches us directly too (public / public, one VPC) added us in the same moment and
        re-adds us on the same schedule: when both ends re-added at 1, 2, 3 s, each re-add
        reset the other end's handshake in flight and their initiations crossed again
        (bench/mesh.py part (a): pairs re-added by both ends within 30 ms, twice, before
        their handshake). The end with the larger node id waits KICK_AFTER_SECOND."""
        peer = view.peers.get(node_id)
        if peer is None or choose_endpoint(peer.endpoints, view.own.endpoints) is None \
                or self.node_id < node_id:
            return KICK_AFTER
        return KICK_AFTER_SECOND

    async def _apply_ops(self, network: str, ifname: str, ops: list[PeerOp],
                         pokes: set[bytes], iface: _Iface) -> list[PeerOp]:
        """The peer operations, APPLY_BATCH peers a UAPI transaction (each peer on its own,
        never replacing all peers); the ones applied. A burst of joins used to cost one
        transaction per peer, one after another: 30-250 ms each on a loaded machine, seconds
        before the last new peer was configured (the batch is bounded: a netlink attribute
        holds 64 KiB). When a transaction is refused (a bad key, a full device), WireGuard
        has applied the operations before the failing one: that batch is applied again one
        by one (idempotent: the same settings), so that only the refused peer is left out
        (``iface.failed``) and the others are configured."""
        done: list[PeerOp] = []
        for start in range(0, len(ops), APPLY_BATCH):
            batch = ops[start:start + APPLY_BATCH]
            expanded = [x for op in batch
                        for x in (_poked(op) if op.public_key in pokes else [op])]
            try:
                await self.backend.set(ifname, None, expanded)
                done += batch
                continue
            except Exception as exc:
                if len(batch) > 1:
                    self.log.info("network %s: %d peer ops refused together (%s); one by one",
                                  network, len(batch), exc)
                else:
                    self.stats.apply_errors += 1
                    iface.failed.add(batch[0].public_key)
                    self.log.warning("network %s: peer op refused: %s", network, exc)
                    continue
            for op in batch:
                try:
                    await self.backend.set(ifname, None,
                                           _poked(op) if op.public_key in pokes else [op])
                except Exception as exc:
                    self.stats.apply_errors += 1
                    iface.failed.add(op.public_key)
                    self.log.warning("network %s: peer op refused: %s", network, exc)
                    continue
                done.append(op)
        return done

    async def _start_prober(self, network: str, address: str) -> Prober | None:
        def targets() -> list[tuple[str, str]]:
            v = self.views.get(network)
            if v is None:
                return []
            i = self._ifaces.get(network)
            reach = i.plan if i is not None else None
            return [(n, p.address) for n, p in v.peers.items()
                    if reach is None or n not in reach.unreachable]

        prober = Prober(host=self.host, address=address, targets=targets, port=self.probe_port,
                        interval=self.probe_interval, steady=self.probe_steady_interval,
                        log=self.log)
        try:
            return await prober.__aenter__()
        except OSError as exc:
            self.log.warning("network %s: probes off: %s", network, exc)
            return None

    async def _stop_prober(self, network: str) -> None:
        iface = self._ifaces.get(network)
        if iface is not None and iface.prober is not None:
            await iface.prober.__aexit__(None, None, None)
            iface.prober, iface.prober_address = None, ""

    def _request_resync(self, network: str, generation: int, reason: str, *,
                        force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_resync.get(network, -10.0) < 1.0:
            return
        self._last_resync[network] = now
        self.stats.resyncs += 1
        if self.publish is None:
            return
        msg = MeshResyncRequest(node_id=self.node_id, network=network, generation=generation,
                                reason=reason)
        task = asyncio.ensure_future(self.publish(msg))
        self._sending.add(task)  # a reference until done (the loop keeps only weak ones)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.debug("resync request not sent: %s", task.exception())

    async def _tick_loop(self) -> None:
        while True:
            fast = self._rotation_pending() or bool(self._switch_due)
            wait = self.reconcile_interval
            if fast:
                wait = self.switch_poll if self._switch_imminent() else self.rotation_poll
            elif self._kicking():
                # re-adds are due at whole seconds, the one-way check after 1.5 s: no need
                # for the rotation's poll (a full reconcile and two UAPI gets per tick,
                # each node, while a burst of joins handshakes)
                wait = min(wait, KICK_POLL)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # comes with the wake-up (gh-86296), and close() then waited for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            await self._switch_if_due()
            for name in list(self.views):
                await self._reconcile_logged(name)
                if self._kicking():
                    try:
                        await self._kick_silent(name)
                    except Exception as exc:
                        self.log.warning("network %s: re-adding peers failed: %s", name, exc)
            # An unanswered rotation step is repeated (the controller may have missed it).
            if time.monotonic() - self._last_key_msg > 5.0:
                if self.keys.next is not None:
                    await self._send_key("announce")
                elif self.keys.old is not None:
                    await self._send_key("switched")

    # -- health ------------------------------------------------------------------------

    async def health(self, network: str) -> MeshHealth | None:
        view = self.views.get(network)
        iface = self._ifaces.get(network)
        if view is None:
            return None
        try:
            state = await self.backend.get(self.ifname(network))
        except Exception as exc:
            self.log.debug("health of %s: %s", network, exc)
            state = DeviceState()
        window = iface.prober.take_window() if iface is not None and iface.prober else {}
        now = time.time()
        report: list[MeshPeerHealth] = []
        via = iface.plan.via if iface is not None and iface.plan is not None else {}
        for node_id, peer in sorted(view.peers.items()):
            keys = [peer.public_key] + ([peer.next_public_key] if peer.next_public_key else [])
            entries = [state.peers.get(key_bytes(via_key)) for via_key in
                       ([view.peers[via[node_id]].public_key] if node_id in via else keys)]
            found = [e for e in entries if e is not None]
            last = max((e.last_handshake for e in found), default=0.0)
            probes = window.get(node_id)
            rtt, loss, sent, received = probes.summary() if probes else (-1.0, 0.0, 0, 0)
            report.append(MeshPeerHealth(
                node_id=node_id, handshake_age=max(0.0, now - last) if last else -1.0,
                rx_bytes=sum(e.rx_bytes for e in found), tx_bytes=sum(e.tx_bytes for e in found),
                rtt_ms=rtt, loss=loss, sent=sent, received=received,
                relayed=node_id in via))
        return MeshHealth(node_id=self.node_id, network=network, ts=now,
                          generation=view.generation, peers=report,
                          window=self.health_interval,
                          rejected=self.stats.rejected + self.stats.rejected_peers)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            for name in list(self.views):
                report = await self.health(name)
                if report is not None and self.publish is not None:
                    try:
                        await self.publish(report)
                    except Exception as exc:
                        self.log.debug("health of %s not sent: %s", name, exc)


async def _cancel(tasks: list[asyncio.Task[None]], log: logging.Logger) -> None:
    """Cancel ``tasks`` and wait for them, bounded: a cancel lost on the way (a library's
    wait_for racing it) is repeated, and a task that still runs after that is reported
    and left, instead of hanging the caller (an agent's stop, a test's teardown)."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(5):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in pending:
        log.error("task %s did not end when cancelled", task.get_name())
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())


def _poked(op: PeerOp) -> list[PeerOp]:
    """An added peer's operations such that wireguard-go initiates a handshake at once:
    turning a peer's persistent keepalive on sends a keepalive (device/uapi.go pkaOn; the
    kernel's set_peer does the same), which without a session is a handshake initiation;
    a peer that wants none gets it off again in the same transaction."""
    if op.keepalive:
        return [op]
    return [replace(op, keepalive=POKE_KEEPALIVE),
            PeerOp(public_key=op.public_key, update_only=True, keepalive=0)]


__all__ = ["MeshStats", "NetMesh", "View", "interface_name"]
