"""From a network as the controller describes it to WireGuard peer operations: the desired
peer set (endpoints, keepalives, relays modelled in allowed IPs, key rotations), and the
diff against what the interface has now, one peer per operation. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.netmesh.uapi import DeviceState, Endpoint, PeerOp
from protocol.mesh import (
    Net,
    allowed_networks,
    choose_endpoint,
    host_network,
    is_direct,
    keepalive_for,
    key_bytes,
    pair_relay,
)
from protocol.messages import MeshPeer


@dataclass(frozen=True, slots=True)
class WgPeer:
    """One WireGuard peer entry as it should be."""

    node_id: str
    public_key: bytes
    endpoint: Endpoint | None
    keepalive: int
    allowed_ips: frozenset[str]


@dataclass(slots=True)
class Plan:
    peers: dict[bytes, WgPeer] = field(default_factory=dict)
    routes: set[str] = field(default_factory=set)  # prefixes outside the network's CIDR
    forward: bool = False  # some peer is relayed through this node
    via: dict[str, str] = field(default_factory=dict)  # node id -> relay node id
    unreachable: list[str] = field(default_factory=list)  # no direct path, no usable relay
    conflicts: list[str] = field(default_factory=list)  # claimed an address already taken


def _endpoint(peer: MeshPeer, own: MeshPeer) -> Endpoint | None:
    ep = choose_endpoint(own.endpoints, peer.endpoints)
    return Endpoint(str(ipaddress.ip_address(ep.host)), ep.port) if ep is not None else None


def plan(own: MeshPeer, peers: Mapping[str, MeshPeer], *, cidr: Net, keepalive: int,
         moved: frozenset[str] | set[str] = frozenset()) -> Plan:
    """The WireGuard peers node ``own`` needs in a network. ``peers`` are already checked
    (protocol.mesh.check_peer). ``moved``: peers in a key rotation whose new key has
    handshaken here, so their allowed IPs belong to the new key now."""
    out = Plan()
    own_net = host_network(ipaddress.ip_address(own.address))
    # Taken prefixes: host prefixes (nearly all) in a set, wider ones in a list, so that
    # the overlap check stays O(N) for a network of plain members.
    hosts: set[Net] = {own_net}
    wide: list[Net] = []
    nets: dict[str, list[Net]] = {}

    def clashes(n: Net) -> bool:
        if n.prefixlen == n.max_prefixlen:
            return n in hosts or any(w.version == n.version and n.subnet_of(w)  # type: ignore[arg-type]
                                     for w in wide)
        return any(t.version == n.version and n.overlaps(t) for t in (*hosts, *wide))

    claimed: set[str] = {own.public_key, own.next_public_key} - {""}
    for node_id in sorted(peers):
        peer = peers[node_id]
        mine = allowed_networks(peer)
        its_keys = {peer.public_key, peer.next_public_key} - {""}
        if any(clashes(n) for n in mine) or its_keys & claimed:
            out.conflicts.append(node_id)  # the first claimant (by node id) keeps it
            continue
        claimed |= its_keys
        for n in mine:
            if n.prefixlen == n.max_prefixlen:
                hosts.add(n)
            else:
                wide.append(n)
        nets[node_id] = mine
    holders: dict[str, bytes] = {}  # node id -> the key that holds its allowed IPs
    extra: dict[str, list[Net]] = {}
    for node_id, mine in nets.items():
        peer = peers[node_id]
        if not is_direct(own, peer):
            relay = pair_relay(own, peer)
            if relay and relay in nets and is_direct(own, peers[relay]):
                out.via[node_id] = relay
                extra.setdefault(relay, []).extend(mine)
            else:
                out.unreachable.append(node_id)
            continue
        endpoint = _endpoint(peer, own)
        ka = keepalive_for(keepalive, own, peer, choose_endpoint(own.endpoints, peer.endpoints))
        current = key_bytes(peer.public_key, node_id=node_id)
        keys = [current]
        holder = current
        if peer.next_public_key:
            nxt = key_bytes(peer.next_public_key, node_id=node_id, field="next_public_key")
            keys.append(nxt)
            if node_id in moved:
                holder = nxt
        holders[node_id] = holder
        for key in keys:
            out.peers[key] = WgPeer(node_id=node_id, public_key=key, endpoint=endpoint,
                                    keepalive=ka, allowed_ips=frozenset())
    for node_id, holder in holders.items():
        prefixes = nets[node_id] + extra.get(node_id, [])
        entry = out.peers[holder]
        out.peers[holder] = WgPeer(node_id=entry.node_id, public_key=entry.public_key,
                                   endpoint=entry.endpoint, keepalive=entry.keepalive,
                                   allowed_ips=frozenset(str(n) for n in prefixes))
    for node_id in nets:
        if node_id in holders or node_id in out.via:
            for n in nets[node_id]:
                if not (n.version == cidr.version and n.subnet_of(cidr)):  # type: ignore[arg-type]
                    out.routes.add(str(n))
    out.forward = any(p.relay == own.node_id for p in peers.values())
    return out


def diff(current: DeviceState, want: Plan,
         applied_endpoints: Mapping[bytes, Endpoint | None]) -> list[PeerOp]:
    """Peer operations that turn ``current`` into ``want``, one peer each: additions first,
    then updates that give a peer prefixes (WireGuard moves a prefix to the peer that
    gets it, so it is never unrouted in between), other updates, removals last.
    ``applied_endpoints``: what we last set per key -- an endpoint WireGuard learnt by
    roaming is left alone unless the wanted one changed."""
    adds: list[PeerOp] = []
    gains: list[PeerOp] = []
    updates: list[PeerOp] = []
    removes: list[PeerOp] = []
    for key, peer in want.peers.items():
        have = current.peers.get(key)
        ips = tuple(sorted(peer.allowed_ips))
        if have is None:
            adds.append(PeerOp(public_key=key, endpoint=peer.endpoint,
                               keepalive=peer.keepalive, allowed_ips=ips))
            continue
        have_ips = frozenset(str(ipaddress.ip_network(p)) for p in have.allowed_ips)
        new_ips = ips if have_ips != peer.allowed_ips else None
        endpoint = None
        if peer.endpoint is not None and peer.endpoint != have.endpoint and \
                applied_endpoints.get(key) != peer.endpoint:
            endpoint = peer.endpoint
        keep = peer.keepalive if peer.keepalive != have.keepalive else None
        if new_ips is None and endpoint is None and keep is None:
            continue
        op = PeerOp(public_key=key, update_only=True, endpoint=endpoint, keepalive=keep,
                    allowed_ips=new_ips)
        (gains if new_ips is not None and peer.allowed_ips - have_ips else updates).append(op)
    for key in current.peers:
        if key not in want.peers:
            removes.append(PeerOp(public_key=key, remove=True))
    return adds + gains + updates + removes
