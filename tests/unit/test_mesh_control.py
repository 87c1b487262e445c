"""Pure logic of the mesh control side: network checks and CIDR overlaps, relay choice,
the peer diff and snapshots, matrix aggregation."""

from __future__ import annotations

import base64

import pytest

from controller.mesh.deltas import MeshState, choose_relays, diff, snapshot_of
from controller.mesh.errors import BadNetwork, CidrOverlap
from controller.mesh.matrix import PairStats, aggregate
from controller.mesh.networks import (
    Membership,
    NetworkRecord,
    NetworkSpec,
    check_overlaps,
    node_ranges,
    parse_cidr,
    validate,
)
from controller.models import NodeRecord
from protocol.messages import MeshEndpoint, MeshPeer


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def peer(nid: str, *, public: str = "", private: str = "", vpc: str = "", region: str = "",
         address: str = "100.96.0.1") -> MeshPeer:
    eps = []
    if private:
        eps.append(MeshEndpoint(host=private, kind="private", network=vpc))
    if public:
        eps.append(MeshEndpoint(host=public, kind="public"))
    return MeshPeer(node_id=nid, public_key=key(len(nid)), address=address, endpoints=eps,
                    region=region)


def net(name: str = "corp", cidr: str = "100.96.0.0/12", **kw: object) -> NetworkRecord:
    return NetworkRecord(name=name, cidr=cidr, **kw)  # type: ignore[arg-type]


def node(nid: str, **labels: str) -> NodeRecord:
    facts = {k: v for k, v in labels.items() if k in ("vpc_cidr", "private_ip")}
    rest = {k: v for k, v in labels.items() if k not in facts}
    return NodeRecord(id=nid, hostname=nid, identity="U" + nid, labels=rest, facts=facts)


# -- networks ---------------------------------------------------------------------------


def test_overlap_with_another_network_names_both() -> None:
    with pytest.raises(CidrOverlap) as err:
        check_overlaps("100.96.0.0/16", name="b", networks=[net("a", "100.96.0.0/12")],
                       vpcs=[])
    assert "100.96.0.0/16" in err.value.message and "network a" in err.value.message
    assert err.value.details["other_cidr"] == "100.96.0.0/12"
    # Disjoint ranges, other address families and the network itself are fine.
    check_overlaps("100.112.0.0/12", name="b", networks=[net("a", "100.96.0.0/12")], vpcs=[])
    check_overlaps("fd00::/64", name="b", networks=[net("a", "100.96.0.0/12")], vpcs=[])
    check_overlaps("100.96.0.0/12", name="a", networks=[net("a", "100.96.0.0/12")], vpcs=[])


def test_overlap_with_a_node_vpc_names_the_node() -> None:
    n = node("web-1", vpc_cidr="10.0.0.0/16, 10.9.0.0/24")
    with pytest.raises(CidrOverlap) as err:
        check_overlaps("10.9.0.0/16", name="x", networks=[], vpcs=node_ranges(n))
    assert "node web-1" in err.value.message and "10.9.0.0/24" in err.value.message
    # A private address alone counts as a host range.
    m = node("db-1", private_ip="172.16.5.5")
    with pytest.raises(CidrOverlap):
        check_overlaps("172.16.0.0/12", name="x", networks=[], vpcs=node_ranges(m))
    check_overlaps("100.96.0.0/12", name="x", networks=[], vpcs=node_ranges(n) + node_ranges(m))


@pytest.mark.parametrize("spec, field", [
    (NetworkSpec(name="Bad_Name"), "name"),
    (NetworkSpec(name="ok", cidr="10.0.0.1/8"), "cidr"),  # host bits set
    (NetworkSpec(name="ok", cidr="10.0.0.0/31"), "cidr"),
    (NetworkSpec(name="ok", cidr="banana"), "cidr"),
    (NetworkSpec(name="ok", cidr="127.0.0.0/8"), "cidr"),
    (NetworkSpec(name="ok", selector="a in ("), "selector"),
    (NetworkSpec(name="ok", infras=["No!"]), "name"),
])
def test_bad_network_specs_name_the_field(spec: NetworkSpec, field: str) -> None:
    with pytest.raises(BadNetwork) as err:
        validate(spec)
    assert err.value.field == field


def test_parse_cidr_accepts_v4_and_v6() -> None:
    assert str(parse_cidr("198.19.0.0/16")) == "198.19.0.0/16"
    assert str(parse_cidr("fd00:1::/64")) == "fd00:1::/64"


def test_membership_by_selector_infra_and_infra_spec() -> None:
    m = Membership(infra_networks=lambda infra: ["corp"] if infra == "shop" else [])
    corp = net("corp", selector="env=prod")
    assert m.is_member(corp, node("a", env="prod"))
    assert not m.is_member(corp, node("b", env="dev"))
    assert m.is_member(corp, node("c", infra="shop"))  # the infra's spec lists corp
    assert not m.is_member(corp, node("d", infra="other"))
    assert m.is_member(net("corp", infras=["other"]), node("d", infra="other"))
    revoked = NodeRecord(id="e", hostname="e", identity="U", labels={"env": "prod"},
                         revoked=True)
    assert not m.is_member(corp, revoked)
    # No selector and no infra: nobody (an empty selector would match everyone).
    assert not m.is_member(net("empty"), node("a", env="prod"))


# -- relays -----------------------------------------------------------------------------


def test_relay_prefers_same_region_then_least_loaded() -> None:
    peers = [
        peer("pub-eu", public="198.18.1.1", region="eu"),
        peer("pub-us1", public="198.18.2.1", region="us"),
        peer("pub-us2", public="198.18.2.2", region="us"),
        peer("nat-us1", private="10.1.0.1", vpc="site", region="us"),
        peer("nat-us2", private="10.1.0.2", vpc="site", region="us"),
        peer("nat-eu", private="10.2.0.1", vpc="eu-site", region="eu"),
    ]
    relays = choose_relays(peers)
    assert set(relays) == {"nat-us1", "nat-us2", "nat-eu"}  # public nodes need none
    assert relays["nat-eu"] == "pub-eu"
    # Both US nodes get a US relay, spread over the two.
    assert {relays["nat-us1"], relays["nat-us2"]} == {"pub-us1", "pub-us2"}


def test_relay_nearest_region_by_rtt_and_kept_when_still_best() -> None:
    peers = [
        peer("pub-eu", public="198.18.1.1", region="eu"),
        peer("pub-ap", public="198.18.3.1", region="ap"),
        peer("nat-us", private="10.1.0.1", vpc="site", region="us"),
    ]
    rtt = {frozenset({"us", "eu"}): 80.0, frozenset({"us", "ap"}): 150.0}
    relays = choose_relays(peers, region_rtt=lambda a, b: rtt.get(frozenset({a, b})))
    assert relays == {"nat-us": "pub-eu"}
    # Current relay kept while it is within 20 % of the best.
    rtt[frozenset({"us", "ap"})] = 90.0
    assert choose_relays(peers, current={"nat-us": "pub-ap"},
                         region_rtt=lambda a, b: rtt.get(frozenset({a, b}))) == {"nat-us": "pub-ap"}
    # A relay that is gone is replaced.
    assert choose_relays(peers[1:], current={"nat-us": "pub-eu"}) == {"nat-us": "pub-ap"}
    # Nobody public: no relay at all.
    assert choose_relays([peers[2]]) == {}


# -- diff and snapshot ------------------------------------------------------------------


def test_diff_added_changed_removed() -> None:
    a, b, c = peer("a"), peer("b"), peer("c")
    b2 = peer("b", public="198.18.0.9")
    d = diff({"a": a, "b": b}, {"b": b2, "c": c})
    assert [p.node_id for p in d.added] == ["c"]
    assert [p.node_id for p in d.changed] == ["b"]
    assert d.removed == ["a"]
    assert not diff({"a": a}, {"a": peer("a")})


def test_snapshot_has_own_entry_and_the_others() -> None:
    state = MeshState(network="corp", epoch="e1", generation=7,
                      peers={"a": peer("a", address="100.96.0.1"),
                             "b": peer("b", address="100.96.0.2")})
    snap = snapshot_of(net("corp", mtu=1380, port=51000), state, "a")
    assert snap is not None
    assert snap.own.node_id == "a" and [p.node_id for p in snap.peers] == ["b"]
    assert (snap.generation, snap.epoch, snap.mtu, snap.port) == (7, "e1", 1380, 51000)
    assert snapshot_of(net("corp"), state, "zz") is None


# -- matrix -----------------------------------------------------------------------------


def pair(src: str, dst: str, ra: str, rb: str, rtt: float, loss: float = 0.0) -> PairStats:
    return PairStats(src=src, dst=dst, src_region=ra, dst_region=rb, rtt_ms=rtt, loss=loss,
                     handshake_age=3.0, rx_bytes=1, tx_bytes=1, relayed=False, ts=1.0)


def test_region_aggregate() -> None:
    rows = aggregate([
        pair("a", "b", "eu", "us", 80.0), pair("c", "b", "eu", "us", 100.0),
        pair("d", "b", "eu", "us", -1.0, loss=1.0),
        pair("b", "a", "us", "eu", 81.0, loss=0.1),
    ])
    eu_us = next(r for r in rows if (r["src_region"], r["dst_region"]) == ("eu", "us"))
    assert eu_us["pairs"] == 3 and eu_us["answered"] == 2
    assert eu_us["rtt_ms"] == 90.0 and eu_us["rtt_min_ms"] == 80.0
    assert eu_us["loss"] == pytest.approx(1 / 3)
    us_eu = next(r for r in rows if (r["src_region"], r["dst_region"]) == ("us", "eu"))
    assert us_eu["rtt_ms"] == 81.0 and us_eu["loss"] == pytest.approx(0.1)
