"""agent/netmesh/apply.py: the wanted peer set (endpoints, keepalives, relays in allowed IPs,
rotations) and the peer-by-peer diff against the interface's state."""

from __future__ import annotations

import base64
import ipaddress

from agent.netmesh.apply import Plan, WgPeer, diff, plan
from agent.netmesh.uapi import DeviceState, Endpoint, PeerState
from protocol.mesh import key_bytes
from protocol.messages import MeshEndpoint, MeshPeer

CIDR = ipaddress.ip_network("198.19.0.0/16")


def _key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def _peer(name: str, i: int, *eps: MeshEndpoint, relay: str = "", **kw: object) -> MeshPeer:
    return MeshPeer(node_id=name, public_key=_key(i), address=f"198.19.0.{i}",
                    endpoints=list(eps), relay=relay, **kw)  # type: ignore[arg-type]


def _pub(i: int) -> MeshEndpoint:
    return MeshEndpoint(host=f"198.18.{i}.2", kind="public")


def _priv(i: int, site: str) -> MeshEndpoint:
    return MeshEndpoint(host=f"10.{i}.0.2", kind="private", network=site)


def test_direct_peers_get_their_address_endpoint_and_no_keepalive_between_public_nodes() -> None:
    own = _peer("a", 1, _pub(1))
    peers = {"b": _peer("b", 2, _pub(2), allowed_ips=["10.50.0.0/24"])}
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    entry = p.peers[key_bytes(_key(2))]
    assert entry.endpoint == Endpoint("198.18.2.2", 51820)
    assert entry.keepalive == 0
    assert entry.allowed_ips == {"198.19.0.2/32", "10.50.0.0/24"}
    assert p.routes == {"10.50.0.0/24"}  # the /32 is inside the interface's own prefix
    assert not p.forward and not p.via and not p.unreachable


def test_same_vpc_uses_the_private_endpoint() -> None:
    own = _peer("a", 1, _priv(1, "vpc-x"), _pub(1))
    peers = {"b": _peer("b", 2, _priv(2, "vpc-x"), _pub(2)),
             "c": _peer("c", 3, _priv(3, "vpc-y"), _pub(3))}
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    assert p.peers[key_bytes(_key(2))].endpoint == Endpoint("10.2.0.2", 51820)
    assert p.peers[key_bytes(_key(3))].endpoint == Endpoint("198.18.3.2", 51820)


def test_nat_node_keeps_tunnels_to_public_peers_and_relays_the_rest() -> None:
    own = _peer("n1", 11, _priv(11, "site-1"), relay="r")
    peers = {"r": _peer("r", 1, _pub(1)),
             "n2": _peer("n2", 12, _priv(12, "site-2"), relay="r"),
             "n3": _peer("n3", 13, _priv(13, "site-3"))}  # names none: n1's relay is used
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    relay = p.peers[key_bytes(_key(1))]
    assert relay.keepalive == 25 and relay.endpoint == Endpoint("198.18.1.2", 51820)
    assert relay.allowed_ips == {"198.19.0.1/32", "198.19.0.12/32", "198.19.0.13/32"}
    assert p.via == {"n2": "r", "n3": "r"}
    assert set(p.peers) == {key_bytes(_key(1))}  # no WireGuard peer for the relayed ones
    # neither end names a relay: unreachable, nothing configured for it
    lonely = plan(_peer("n4", 14, _priv(14, "site-4")), {"n3": peers["n3"]}, cidr=CIDR,
                  keepalive=25)
    assert lonely.unreachable == ["n3"] and not lonely.peers


def test_the_relay_forwards_and_has_both_ends_directly() -> None:
    own = _peer("r", 1, _pub(1))
    peers = {"n1": _peer("n1", 11, _priv(11, "s1"), relay="r"),
             "n2": _peer("n2", 12, _priv(12, "s2"), relay="r")}
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    assert p.forward
    for i in (11, 12):
        entry = p.peers[key_bytes(_key(i))]
        assert entry.endpoint is None and entry.keepalive == 0  # they come to us
        assert entry.allowed_ips == {f"198.19.0.{i}/32"}


def test_rotation_adds_the_next_key_without_prefixes_until_it_handshakes() -> None:
    own = _peer("a", 1, _pub(1))
    rotating = _peer("b", 2, _pub(2), next_public_key=_key(22))
    before = plan(own, {"b": rotating}, cidr=CIDR, keepalive=25)
    assert before.peers[key_bytes(_key(2))].allowed_ips == {"198.19.0.2/32"}
    assert before.peers[key_bytes(_key(22))].allowed_ips == frozenset()
    after = plan(own, {"b": rotating}, cidr=CIDR, keepalive=25, moved={"b"})
    assert after.peers[key_bytes(_key(2))].allowed_ips == frozenset()
    assert after.peers[key_bytes(_key(22))].allowed_ips == {"198.19.0.2/32"}
    # the moving update comes before the one that takes the prefix away
    state = _state(before)
    ops = diff(state, after, {})
    assert [op.public_key for op in ops] == [key_bytes(_key(22)), key_bytes(_key(2))]
    assert ops[0].allowed_ips == ("198.19.0.2/32",) and ops[1].allowed_ips == ()


def test_address_conflicts_keep_the_first_claimant() -> None:
    own = _peer("a", 1, _pub(1))
    peers = {"b": _peer("b", 2, _pub(2)),
             "c": MeshPeer(node_id="c", public_key=_key(3), address="198.19.0.3",
                           allowed_ips=["198.19.0.2/32"], endpoints=[_pub(3)]),
             "d": MeshPeer(node_id="d", public_key=_key(4), address="198.19.0.1",
                           endpoints=[_pub(4)])}
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    assert sorted(p.conflicts) == ["c", "d"]
    assert set(p.peers) == {key_bytes(_key(2))}


def _state(p: Plan) -> DeviceState:
    dev = DeviceState()
    for key, peer in p.peers.items():
        dev.peers[key] = PeerState(public_key=key, endpoint=peer.endpoint,
                                   allowed_ips=sorted(peer.allowed_ips), keepalive=peer.keepalive)
    return dev


def test_diff_is_peer_by_peer_and_never_touches_unchanged_peers() -> None:
    k = [bytes([i]) * 32 for i in range(5)]
    state = DeviceState(peers={
        k[1]: PeerState(public_key=k[1], endpoint=Endpoint("198.18.1.2", 51820),
                        allowed_ips=["198.19.0.1/32"]),
        k[2]: PeerState(public_key=k[2], endpoint=Endpoint("198.18.9.9", 4000),  # roamed
                        allowed_ips=["198.19.0.2/32"]),
        k[3]: PeerState(public_key=k[3], allowed_ips=["198.19.0.3/32"]),
    })
    want = Plan(peers={
        k[1]: WgPeer("p1", k[1], Endpoint("198.18.1.2", 51820), 0, frozenset({"198.19.0.1/32"})),
        k[2]: WgPeer("p2", k[2], Endpoint("198.18.2.2", 51820), 0, frozenset({"198.19.0.2/32"})),
        k[4]: WgPeer("p4", k[4], None, 25, frozenset({"198.19.0.4/32"})),
    })
    # p2's endpoint was set by us before and WireGuard roamed since: left alone
    ops = diff(state, want, {k[2]: Endpoint("198.18.2.2", 51820)})
    assert [(op.public_key, op.remove, op.update_only) for op in ops] == [
        (k[4], False, False), (k[3], True, False)]
    assert ops[0].endpoint is None and ops[0].keepalive == 25
    # the wanted endpoint changed: set again
    ops = diff(state, want, {})
    assert any(op.public_key == k[2] and op.endpoint == Endpoint("198.18.2.2", 51820)
               and op.update_only and op.allowed_ips is None for op in ops)


def test_a_thousand_members_plan_quickly_with_a_wide_prefix_conflict() -> None:
    import time

    own = _peer("a", 1, _pub(1))
    peers = {f"p{i}": MeshPeer(node_id=f"p{i}",
                               public_key=base64.b64encode(
                                   i.to_bytes(2, "big") + b"\xee" * 30).decode(),
                               address=f"198.19.{10 + i // 250}.{1 + i % 250}",
                               endpoints=[_pub(2)]) for i in range(1000)}
    peers["wide"] = MeshPeer(node_id="wide", public_key=_key(255), address="198.19.200.1",
                             allowed_ips=["198.19.10.0/24"], endpoints=[_pub(3)])
    t0 = time.perf_counter()
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    assert time.perf_counter() - t0 < 5.0  # O(N): ~0.05 s here; the quadratic check took ~1 s
    assert p.conflicts == ["wide"]  # its /24 covers members that came first (by node id)
    assert len(p.peers) == 1000


def test_a_key_claimed_twice_or_our_own_is_a_conflict() -> None:
    own = _peer("a", 1, _pub(1))
    peers = {"b": _peer("b", 2, _pub(2)),
             "c": MeshPeer(node_id="c", public_key=_key(2), address="198.19.0.3",
                           endpoints=[_pub(3)]),
             "d": MeshPeer(node_id="d", public_key=_key(1), address="198.19.0.4",
                           endpoints=[_pub(4)])}
    p = plan(own, peers, cidr=CIDR, keepalive=25)
    assert sorted(p.conflicts) == ["c", "d"] and set(p.peers) == {key_bytes(_key(2))}
