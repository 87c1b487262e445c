"""agent/netmesh/uapi.py: the UAPI text we write and read (hex keys, IPv6 endpoints,
missing endpoints, never replace_peers) -- the wireguard-tools writer's defects, each."""

from __future__ import annotations

import pytest

from agent.netmesh.errors import UapiError
from agent.netmesh.uapi import DeviceOp, Endpoint, PeerOp, encode_set, parse_errno, parse_get

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
PSK = bytes([7]) * 32


def _lines(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n\n") and text.count("\n\n") == 1
    return text[:-2].split("\n")


def test_set_never_replaces_peers_and_uses_hex_keys() -> None:
    data = encode_set(DeviceOp(private_key=K1, listen_port=51820),
                      [PeerOp(public_key=K2, endpoint=Endpoint("198.18.0.2", 51820),
                              keepalive=25, allowed_ips=("198.19.0.2/32",),
                              preshared_key=PSK)])
    lines = _lines(data)
    assert lines[0] == "set=1"
    assert not any(line.startswith("replace_peers") for line in lines)
    assert f"private_key={K1.hex()}" in lines
    assert f"public_key={K2.hex()}" in lines
    assert f"preshared_key={PSK.hex()}" in lines  # hex, not base64
    assert "endpoint=198.18.0.2:51820" in lines
    assert "persistent_keepalive_interval=25" in lines
    assert lines[-2:] == ["replace_allowed_ips=true", "allowed_ip=198.19.0.2/32"]


def test_ipv6_endpoint_is_bracketed_and_missing_endpoint_is_left_out() -> None:
    lines = _lines(encode_set(None, [
        PeerOp(public_key=K1, endpoint=Endpoint("fd00::1", 51820), allowed_ips=("fd00::1/128",)),
        PeerOp(public_key=K2, allowed_ips=("198.19.0.3/32", "10.0.0.0/24")),
    ]))
    assert "endpoint=[fd00::1]:51820" in lines
    second = lines[lines.index(f"public_key={K2.hex()}"):]
    assert not any(line.startswith("endpoint=") for line in second)
    assert "allowed_ip=10.0.0.0/24" in second


def test_update_only_remove_and_untouched_fields() -> None:
    lines = _lines(encode_set(None, [PeerOp(public_key=K1, update_only=True, keepalive=0),
                                     PeerOp(public_key=K2, remove=True, keepalive=5)]))
    assert lines == ["set=1", f"public_key={K1.hex()}", "update_only=true",
                     "persistent_keepalive_interval=0", f"public_key={K2.hex()}",
                     "remove=true"]
    # allowed_ips None: no replace_allowed_ips line, the peer keeps its prefixes
    assert "replace_allowed_ips=true" not in lines


@pytest.mark.parametrize("op", [
    PeerOp(public_key=b"short"),
    PeerOp(public_key=K1, keepalive=70000),
    PeerOp(public_key=K1, allowed_ips=("not-a-prefix",)),
])
def test_bad_operations_are_refused_before_anything_is_sent(op: PeerOp) -> None:
    with pytest.raises(ValueError):
        encode_set(None, [op])


@pytest.mark.parametrize("text", ["198.18.0.1", "example.com:51820", "[fd00::1:51820",
                                  "198.18.0.1:0", "300.1.1.1:5"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


GET = f"""private_key={K1.hex()}
listen_port=51820
fwmark=0
public_key={K2.hex()}
preshared_key={"00" * 32}
protocol_version=1
endpoint=[fd00::2%3]:51821
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=10
rx_bytes=20
persistent_keepalive_interval=25
allowed_ip=198.19.0.2/32
allowed_ip=fd00::2/128
public_key={K1.hex()}
preshared_key={PSK.hex()}
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0

"""


def test_get_parses_peers_ipv6_endpoints_and_missing_ones() -> None:
    dev = parse_get(GET)
    assert dev.listen_port == 51820 and dev.has_private_key
    assert dev.private_key_hash == hash(K1)
    first, second = dev.peers[K2], dev.peers[K1]
    assert first.endpoint == Endpoint("fd00::2", 51821)  # scope id dropped
    assert first.last_handshake == 1700000000.5
    assert (first.rx_bytes, first.tx_bytes, first.keepalive) == (20, 10, 25)
    assert first.allowed_ips == ["198.19.0.2/32", "fd00::2/128"]
    assert not first.has_preshared_key
    assert second.endpoint is None and second.last_handshake == 0.0
    assert second.allowed_ips == [] and second.has_preshared_key


def test_get_and_set_errors() -> None:
    with pytest.raises(UapiError):
        parse_get("listen_port=1\nerrno=-22\n\n")
    with pytest.raises(UapiError):
        parse_get("garbage line\n")
    assert parse_errno("errno=0\n\n") == 0
    assert parse_errno("errno=-22\n\n") == -22
    with pytest.raises(UapiError):
        parse_errno("\n")


def test_round_trip_through_parse() -> None:
    ops = [PeerOp(public_key=K2, endpoint=Endpoint("fd00::9", 7), keepalive=3,
                  allowed_ips=("fd00::9/128", "198.19.0.9/32"))]
    lines = _lines(encode_set(None, ops))[1:]
    text = "\n".join(line for line in lines if not line.startswith("replace")) + "\nerrno=0\n"
    peer = parse_get(text).peers[K2]
    assert peer.endpoint == Endpoint("fd00::9", 7) and peer.keepalive == 3
    assert sorted(peer.allowed_ips) == ["198.19.0.9/32", "fd00::9/128"]
