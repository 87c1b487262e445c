"""Overlay rules both sides apply the same way: checks of a peer entry and the pair rules
(endpoint choice, direct reachability, which relay a pair uses, keepalive). No I/O.

The wire messages are in protocol/messages.py (MeshSnapshot, MeshDelta, ...). Deltas are
network-wide, so whatever is specific to one pair of nodes is derived from the two
entries with these functions, by the agent (what to configure) and the controller (what to
expect, which relay to name), never sent per pair.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from protocol.errors import MeshPeerInvalid
from protocol.messages import MeshEndpoint, MeshPeer

KEY_LEN = 32  # Curve25519 keys
KEY_B64_LEN = 44
MAX_KEEPALIVE = 65535
MAX_ALLOWED_IPS = 256
MAX_ENDPOINTS = 16
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NETWORK_ID = re.compile(r"[A-Za-z0-9_./:-]{1,128}")
# A node's underlay, in its facts (agent/facts.py reports them, controller/mesh/networks.py
# reads them): ``vpc_cidr`` may list several ranges, comma-separated; ``public_ip`` empty:
# the node sits behind NAT.
FACT_PRIVATE_IP = "private_ip"
FACT_PUBLIC_IP = "public_ip"
FACT_VPC_CIDR = "vpc_cidr"
UNDERLAY_FACTS = (FACT_PRIVATE_IP, FACT_PUBLIC_IP, FACT_VPC_CIDR)

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def key_bytes(value: str, *, node_id: str = "", field: str = "public_key") -> bytes:
    """The 32 bytes of a base64 WireGuard key, or MeshPeerInvalid."""
    if not isinstance(value, str) or len(value) != KEY_B64_LEN:
        raise MeshPeerInvalid(f"{field} must be {KEY_B64_LEN} characters of base64",
                              node_id=node_id, field=field)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MeshPeerInvalid(f"{field} is not base64", node_id=node_id, field=field) from None
    if len(raw) != KEY_LEN:
        raise MeshPeerInvalid(f"{field} must decode to {KEY_LEN} bytes", node_id=node_id,
                              field=field)
    return raw


def network_of(cidr: str) -> Net:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise MeshPeerInvalid(f"network cidr {cidr!r}: {exc}", field="cidr") from None


def check_endpoint(ep: MeshEndpoint, *, node_id: str = "") -> None:
    try:
        ipaddress.ip_address(ep.host)
    except ValueError:
        raise MeshPeerInvalid(f"endpoint host {ep.host!r} is not an IP address",
                              node_id=node_id, field="endpoints") from None
    if not 1 <= ep.port <= 65535:
        raise MeshPeerInvalid(f"endpoint port {ep.port} is out of range", node_id=node_id,
                              field="endpoints")
    if ep.network and not _NETWORK_ID.fullmatch(ep.network):
        raise MeshPeerInvalid(f"endpoint network id {ep.network!r} is not usable",
                              node_id=node_id, field="endpoints")


def check_peer(peer: MeshPeer, net: Net) -> None:
    """Raise MeshPeerInvalid unless ``peer`` is safe to put into WireGuard state for a
    network on ``net``: a node id token, valid keys, an address inside the network, valid
    allowed IPs that include the address and no default route, valid endpoints."""
    nid = peer.node_id if isinstance(peer.node_id, str) else ""
    if not _TOKEN.fullmatch(nid):
        raise MeshPeerInvalid(f"node id {peer.node_id!r} is not a valid token", field="node_id")
    key_bytes(peer.public_key, node_id=nid)
    if peer.next_public_key:
        key_bytes(peer.next_public_key, node_id=nid, field="next_public_key")
        if peer.next_public_key == peer.public_key:
            raise MeshPeerInvalid("next_public_key equals public_key", node_id=nid,
                                  field="next_public_key")
    address = address_of(peer)
    if address.version != net.version or address not in net:
        raise MeshPeerInvalid(f"address {peer.address} is outside the network {net}",
                              node_id=nid, field="address")
    if address in (net.network_address, net.broadcast_address) and net.num_addresses > 2:
        raise MeshPeerInvalid(f"address {peer.address} is not a host address of {net}",
                              node_id=nid, field="address")
    if len(peer.allowed_ips) > MAX_ALLOWED_IPS:
        raise MeshPeerInvalid(f"more than {MAX_ALLOWED_IPS} allowed IPs", node_id=nid,
                              field="allowed_ips")
    for prefix in allowed_networks(peer):
        if prefix.prefixlen == 0:
            raise MeshPeerInvalid(f"allowed IP {prefix} is a default route", node_id=nid,
                                  field="allowed_ips")
    if len(peer.endpoints) > MAX_ENDPOINTS:
        raise MeshPeerInvalid(f"more than {MAX_ENDPOINTS} endpoints", node_id=nid,
                              field="endpoints")
    for ep in peer.endpoints:
        check_endpoint(ep, node_id=nid)
    if peer.relay and not _TOKEN.fullmatch(peer.relay):
        raise MeshPeerInvalid(f"relay {peer.relay!r} is not a node id", node_id=nid,
                              field="relay")
    if not 0 <= peer.keepalive <= MAX_KEEPALIVE:
        raise MeshPeerInvalid(f"keepalive {peer.keepalive} is out of range", node_id=nid,
                              field="keepalive")


def address_of(peer: MeshPeer) -> Addr:
    try:
        return ipaddress.ip_address(peer.address)
    except ValueError:
        raise MeshPeerInvalid(f"address {peer.address!r} is not an IP address",
                              node_id=peer.node_id, field="address") from None


def host_network(address: Addr) -> Net:
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


def allowed_networks(peer: MeshPeer) -> list[Net]:
    """The peer's own prefixes: its address as a host prefix, then its allowed_ips (deduped,
    in order)."""
    out: list[Net] = [host_network(address_of(peer))]
    for text in peer.allowed_ips:
        try:
            prefix = ipaddress.ip_network(text, strict=True)
        except (ValueError, TypeError):
            raise MeshPeerInvalid(f"allowed IP {text!r} is not a prefix", node_id=peer.node_id,
                                  field="allowed_ips") from None
        if prefix not in out:
            out.append(prefix)
    return out


# --- pair rules -----------------------------------------------------------------------


def public_endpoint(endpoints: Sequence[MeshEndpoint]) -> MeshEndpoint | None:
    return next((ep for ep in endpoints if ep.kind == "public"), None)


def endpoints_with_underlay(endpoints: Sequence[MeshEndpoint],
                            facts: Mapping[str, str]) -> list[MeshEndpoint]:
    """A node's ``endpoints`` (as it joined) moved to the addresses of its current underlay
    ``facts``: its private endpoints' host becomes FACT_PRIVATE_IP; its public endpoint's
    FACT_PUBLIC_IP (added when it has a public address now, dropped when the fact is empty:
    behind NAT now). A fact absent or not an IP address leaves its endpoints as they are;
    the rest of each endpoint (network id, region) is kept."""
    private = _address_or_none(facts.get(FACT_PRIVATE_IP, ""))
    raw_public = facts.get(FACT_PUBLIC_IP)
    public = None if raw_public is None else (
        _address_or_none(raw_public) if raw_public.strip() else "")
    out: list[MeshEndpoint] = []
    for ep in endpoints:
        if ep.kind == "private" and private:
            ep = msgspec.structs.replace(ep, host=private)
        elif ep.kind == "public" and public is not None:
            continue  # replaced below (or gone: no public address now)
        out.append(ep)
    if public:
        old = public_endpoint(endpoints) or (endpoints[0] if endpoints else None)
        new = MeshEndpoint(host=public, kind="public")  # the default WireGuard port
        out.append(msgspec.structs.replace(new, port=old.port, region=old.region)
                   if old is not None else new)
    return out


def _address_or_none(value: str) -> str | None:
    """``value`` as a normalised IP address literal, or None."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def _private_networks(endpoints: Iterable[MeshEndpoint]) -> set[str]:
    return {ep.network for ep in endpoints if ep.kind == "private" and ep.network}


def choose_endpoint(own: Sequence[MeshEndpoint],
                    peer: Sequence[MeshEndpoint]) -> MeshEndpoint | None:
    """Where to send to ``peer``: its private endpoint in a VPC / region network we share,
    else its public endpoint, else None (it has to reach us; WireGuard learns its address
    from its handshake)."""
    mine = _private_networks(own)
    for ep in peer:
        if ep.kind == "private" and ep.network and ep.network in mine:
            return ep
    return public_endpoint(peer)


def is_direct(a: MeshPeer, b: MeshPeer) -> bool:
    """Whether ``a`` and ``b`` can talk without a relay: they share a private network, or
    at least one of them has a public endpoint (the other one, behind NAT, keeps the
    tunnel open with keepalives)."""
    if _private_networks(a.endpoints) & _private_networks(b.endpoints):
        return True
    return public_endpoint(a.endpoints) is not None or public_endpoint(b.endpoints) is not None


def pair_relay(a: MeshPeer, b: MeshPeer) -> str:
    """The relay node a pair that is not direct uses, the same seen from both ends (a
    WireGuard peer accepts only sources in its allowed IPs, so both directions must cross
    the same relay): the relay named by the entry with the smaller node id, else the other
    one's. "" when the pair is direct or neither names a relay (unreachable)."""
    if is_direct(a, b):
        return ""
    first, second = (a, b) if a.node_id < b.node_id else (b, a)
    for relay in (first.relay, second.relay):
        if relay and relay not in (a.node_id, b.node_id):
            return relay
    return ""


def keepalive_for(network_keepalive: int, own: MeshPeer, peer: MeshPeer,
                  endpoint: MeshEndpoint | None) -> int:
    """Persistent keepalive (seconds, 0 = off) from ``own`` to ``peer``: the peer entry's
    own value when set; else the network's when ``own`` has no public endpoint (it may sit
    behind NAT) and sends to the peer's public endpoint, so the NAT mapping stays open."""
    if peer.keepalive:
        return peer.keepalive
    if endpoint is not None and endpoint.kind == "public" \
            and public_endpoint(own.endpoints) is None:
        return network_keepalive
    return 0
