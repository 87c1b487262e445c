"""protocol/mesh.py: the checks of a peer entry and the pair rules both sides share."""

from __future__ import annotations

import base64
import ipaddress

import msgspec
import pytest

from protocol.errors import MeshPeerInvalid
from protocol.mesh import (
    check_peer,
    choose_endpoint,
    endpoints_with_underlay,
    is_direct,
    keepalive_for,
    key_bytes,
    pair_relay,
)
from protocol.messages import MeshEndpoint, MeshPeer

NET = ipaddress.ip_network("198.19.0.0/16")
KEY = base64.b64encode(bytes(range(32))).decode()
KEY2 = base64.b64encode(bytes(range(1, 33))).decode()


def _pub(host: str) -> MeshEndpoint:
    return MeshEndpoint(host=host, kind="public")


def _priv(host: str, network: str) -> MeshEndpoint:
    return MeshEndpoint(host=host, kind="private", network=network)


def _peer(node_id: str = "b", *eps: MeshEndpoint, relay: str = "", **kw: object) -> MeshPeer:
    base = MeshPeer(node_id=node_id, public_key=KEY, address="198.19.0.2",
                    endpoints=list(eps), relay=relay)
    return msgspec.structs.replace(base, **kw)


def test_a_valid_peer_passes() -> None:
    check_peer(_peer("b", _priv("fd00::2", "vpc-1"), _pub("198.18.0.2"),
                     allowed_ips=["10.5.0.0/24", "fd00:1::/64"]), NET)
    assert key_bytes(KEY) == bytes(range(32))


@pytest.mark.parametrize(("changes", "field"), [
    ({"public_key": "short"}, "public_key"),
    ({"public_key": "!" * 44}, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 31).decode() + "A"}, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 33).decode()[:44]}, "public_key"),
    ({"next_public_key": KEY}, "next_public_key"),
    ({"next_public_key": "zz"}, "next_public_key"),
    ({"address": "10.0.0.1"}, "address"),
    ({"address": "198.19.0.0"}, "address"),
    ({"address": "fd00::1"}, "address"),
    ({"address": "nonsense"}, "address"),
    ({"allowed_ips": ["0.0.0.0/0"]}, "allowed_ips"),
    ({"allowed_ips": ["10.0.0.1/24"]}, "allowed_ips"),
    ({"allowed_ips": ["x"]}, "allowed_ips"),
    ({"endpoints": [MeshEndpoint(host="example.com")]}, "endpoints"),
    ({"endpoints": [MeshEndpoint(host="198.18.0.1", port=0)]}, "endpoints"),
    ({"endpoints": [MeshEndpoint(host="198.18.0.1", network="a b")]}, "endpoints"),
    ({"relay": "a.b"}, "relay"),
    ({"keepalive": 70000}, "keepalive"),
    ({"node_id": "bad id"}, "node_id"),
])
def test_invalid_entries_are_refused_with_the_field(changes: dict[str, object],
                                                    field: str) -> None:
    with pytest.raises(MeshPeerInvalid) as info:
        check_peer(_peer(**changes), NET)  # type: ignore[arg-type]
    assert info.value.field == field


def test_endpoint_choice_prefers_a_shared_private_network() -> None:
    own = [_priv("10.0.0.1", "aws/vpc-1")]
    peer = [_priv("10.0.0.2", "aws/vpc-1"), _pub("198.18.5.2")]
    assert choose_endpoint(own, peer) == peer[0]
    assert choose_endpoint([_priv("10.1.0.1", "gcp/vpc-9")], peer) == peer[1]
    assert choose_endpoint(own, [_priv("10.2.0.2", "other")]) is None
    assert choose_endpoint(own, []) is None


def test_direct_and_relay_rules() -> None:
    relay = _peer("r", _pub("198.18.9.1"))
    nat_a = _peer("a", _priv("10.0.0.1", "site-a"), relay="r")
    nat_c = _peer("c", _priv("10.9.0.1", "site-c"), relay="r2")
    same_vpc = _peer("d", _priv("10.0.0.7", "site-a"))
    assert is_direct(nat_a, relay) and is_direct(relay, nat_c)
    assert is_direct(nat_a, same_vpc)
    assert not is_direct(nat_a, nat_c)
    # both ends pick the same relay: the one named by the smaller node id
    assert pair_relay(nat_a, nat_c) == pair_relay(nat_c, nat_a) == "r"
    assert pair_relay(nat_a, relay) == ""
    no_relay = _peer("b", _priv("10.7.0.1", "site-b"))
    assert pair_relay(no_relay, nat_c) == "r2"  # falls back to the other's relay
    assert pair_relay(no_relay, _peer("e", _priv("10.8.0.1", "site-e"))) == ""


def test_keepalive_only_from_behind_nat_towards_a_public_endpoint() -> None:
    nat = _peer("a", _priv("10.0.0.1", "site"))
    public = _peer("p", _pub("198.18.0.1"))
    assert keepalive_for(25, nat, public, public.endpoints[0]) == 25
    assert keepalive_for(25, public, nat, None) == 0
    assert keepalive_for(25, nat, public, None) == 0
    forced = msgspec.structs.replace(public, keepalive=5)
    assert keepalive_for(25, nat, forced, public.endpoints[0]) == 5


def test_endpoints_follow_the_underlay_facts() -> None:
    joined = [MeshEndpoint(host="10.0.0.5", port=51820, kind="private", network="vpc-1",
                           region="eu"),
              MeshEndpoint(host="198.51.100.1", port=51820, kind="public", region="eu")]
    moved = endpoints_with_underlay(joined, {"private_ip": "10.0.0.9",
                                             "public_ip": "203.0.113.4"})
    assert [(e.kind, e.host, e.network, e.region) for e in moved] == [
        ("private", "10.0.0.9", "vpc-1", "eu"), ("public", "203.0.113.4", "", "eu")]
    # Behind NAT now: no public endpoint; a fact absent or not an address moves nothing.
    assert [e.kind for e in endpoints_with_underlay(joined, {"public_ip": ""})] == ["private"]
    assert endpoints_with_underlay(joined, {}) == joined
    assert endpoints_with_underlay(joined, {"public_ip": "nope", "private_ip": "x"}) == joined
    # A public address where the node had none: one is added, like the private's region.
    added = endpoints_with_underlay(joined[:1], {"public_ip": "203.0.113.4"})
    assert [(e.kind, e.host, e.region) for e in added] == [
        ("private", "10.0.0.5", "eu"), ("public", "203.0.113.4", "eu")]
