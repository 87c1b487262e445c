"""agent/netmesh/kernel.py (generic netlink messages, built by hand: the module is absent
here, so the messages are checked field by field and the family lookup against the real
kernel) and agent/netmesh/keys.py (the node's key files)."""

from __future__ import annotations

import base64
import logging
import socket
import stat
import struct
from pathlib import Path

import pytest

from agent.netmesh.backend import WireguardGoBackend, select_backend
from agent.netmesh.host import Host
from agent.netmesh.kernel import (
    GENL_ID_CTRL,
    WG_CMD_SET_DEVICE,
    WGALLOWEDIP_A_CIDR_MASK,
    WGALLOWEDIP_A_FAMILY,
    WGALLOWEDIP_A_IPADDR,
    WGDEVICE_A_FLAGS,
    WGDEVICE_A_IFNAME,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGDEVICE_A_PRIVATE_KEY,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_FLAGS,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PUBLIC_KEY,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    build_set_device,
    kernel_wireguard_available,
    nla,
    parse_attrs,
    parse_device,
    parse_sockaddr,
    resolve_family,
    sockaddr,
    split_messages,
)
from agent.netmesh.keys import KeyStore, PrivateKey
from agent.netmesh.uapi import DeviceOp, Endpoint, PeerOp

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def _u32(b: bytes) -> int:
    return int(struct.unpack("=I", b[:4])[0])


def test_set_device_message_layout() -> None:
    data = build_set_device(0x1F, "wg0", DeviceOp(private_key=K1, listen_port=51820), [
        PeerOp(public_key=K2, endpoint=Endpoint("fd00::2", 51821), keepalive=25,
               allowed_ips=("198.19.0.2/32", "fd00::2/128"), update_only=True),
        PeerOp(public_key=K1, remove=True),
    ], seq=7)
    (kind, payload), = split_messages(data)
    length, _, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (kind, length, seq, flags) == (0x1F, len(data), 7, 0x1 | 0x4)  # request, ack
    assert payload[0] == WG_CMD_SET_DEVICE and payload[1] == 1
    attrs = dict(parse_attrs(payload[4:]))
    assert attrs[WGDEVICE_A_IFNAME] == b"wg0\0"
    assert _u32(attrs[WGDEVICE_A_FLAGS]) == 0  # never WGDEVICE_F_REPLACE_PEERS
    assert attrs[WGDEVICE_A_PRIVATE_KEY] == K1
    assert struct.unpack("=H", attrs[WGDEVICE_A_LISTEN_PORT])[0] == 51820
    peers = [dict(parse_attrs(p)) for _, p in parse_attrs(attrs[WGDEVICE_A_PEERS])]
    first, second = peers
    assert first[WGPEER_A_PUBLIC_KEY] == K2
    assert _u32(first[WGPEER_A_FLAGS]) == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    assert parse_sockaddr(first[WGPEER_A_ENDPOINT]) == Endpoint("fd00::2", 51821)
    assert struct.unpack("=H", first[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL])[0] == 25
    ips = [dict(parse_attrs(a)) for _, a in parse_attrs(first[WGPEER_A_ALLOWEDIPS])]
    assert [(struct.unpack("=H", a[WGALLOWEDIP_A_FAMILY])[0], a[WGALLOWEDIP_A_IPADDR],
             a[WGALLOWEDIP_A_CIDR_MASK][0]) for a in ips] == [
        (socket.AF_INET, bytes([198, 19, 0, 2]), 32),
        (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "fd00::2"), 128)]
    assert second[WGPEER_A_PUBLIC_KEY] == K1
    assert _u32(second[WGPEER_A_FLAGS]) == WGPEER_F_REMOVE_ME
    assert WGPEER_A_ENDPOINT not in second


def test_attribute_padding_and_sockaddr_v4() -> None:
    attr = nla(5, b"abcde")
    assert len(attr) == 12 and struct.unpack("=HH", attr[:4]) == (9, 5)
    raw = sockaddr(Endpoint("198.18.0.7", 51820))
    assert len(raw) == 16 and raw[4:8] == bytes([198, 18, 0, 7])
    assert struct.unpack("!H", raw[2:4])[0] == 51820
    assert parse_sockaddr(raw) == Endpoint("198.18.0.7", 51820)
    with pytest.raises(Exception, match="malformed"):
        parse_attrs(b"\xff\x00\x01\x00")


def test_a_get_device_dump_parses_into_device_state() -> None:
    # The kernel answers WG_CMD_GET_DEVICE with the same attribute tree we build for SET.
    msg = build_set_device(0x1F, "wg0", DeviceOp(listen_port=51820), [
        PeerOp(public_key=K2, endpoint=Endpoint("198.18.0.2", 51820), keepalive=5,
               allowed_ips=("198.19.0.2/32",))])
    (_, payload), = split_messages(msg)
    dev = parse_device([payload])
    assert dev.listen_port == 51820
    peer = dev.peers[K2]
    assert peer.endpoint == Endpoint("198.18.0.2", 51820) and peer.keepalive == 5
    assert peer.allowed_ips == ["198.19.0.2/32"]


def test_the_generic_netlink_lookup_is_real_and_wireguard_is_absent_here() -> None:
    # nlctrl always exists: the request/answer path works against this kernel.
    assert resolve_family(Host(), "nlctrl") == GENL_ID_CTRL
    available, reason = kernel_wireguard_available(Host())
    if available:
        pytest.skip(f"this kernel has WireGuard ({reason})")
    assert "no 'wireguard' generic netlink family" in reason
    backend = select_backend("auto", host=Host(), log=logging.getLogger("test"))
    assert isinstance(backend, WireguardGoBackend)  # the fallback


def test_key_files_are_private_and_stable(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "wg")
    path = tmp_path / "wg" / "wireguard.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "wg").stat().st_mode) == 0o700
    public = store.public
    assert len(base64.b64decode(public)) == 32
    assert KeyStore(tmp_path / "wg").public == public  # a restart keeps the key
    secret = store.current.to_base64()
    assert secret not in repr(store.current) and secret not in str(store.current)
    assert public in repr(store.current)


def test_rotation_files(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    first = store.public
    nxt = store.begin_rotation()
    assert store.begin_rotation() == nxt  # idempotent
    assert KeyStore(tmp_path).next_public == nxt  # survives a restart mid-rotation
    store.switch()
    assert store.public == nxt and store.old is not None and store.old.public_b64 == first
    assert not (tmp_path / "wireguard-next.key").exists()
    assert stat.S_IMODE((tmp_path / "wireguard-old.key").stat().st_mode) == 0o600
    again = KeyStore(tmp_path)
    assert again.public == nxt and again.old is not None
    store.finish()
    assert not (tmp_path / "wireguard-old.key").exists()


def test_generated_keys_are_clamped_and_match_wg() -> None:
    key = PrivateKey.generate()
    raw = key.secret()
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64
    # RFC 7748 test vector (Alice): the public key derivation is X25519's
    alice = PrivateKey(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    assert alice.public.hex() == ("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98e"
                                  "aa9b4e6a")


def test_a_full_apply_batch_fits_one_netlink_message() -> None:
    # netmesh sends a reconcile's peer operations APPLY_BATCH peers a transaction: the
    # peers' nested attribute has a 16-bit length (a 1,000-peer snapshot in one message
    # would not encode at all).
    from agent.netmesh.mesh import APPLY_BATCH, _poked

    def op(i: int) -> PeerOp:
        return PeerOp(public_key=bytes([i % 256]) * 32,
                      endpoint=Endpoint(host=f"2001:db8::{i:x}", port=51820),
                      allowed_ips=tuple(f"fd00:{i:x}:{j:x}::/64" for j in range(4)))

    batch = [x for i in range(APPLY_BATCH) for x in _poked(op(i))]
    assert len(build_set_device(0x1F, "wg0", None, batch)) < 65535
    with pytest.raises(struct.error):
        build_set_device(0x1F, "wg0", None, [x for i in range(1000) for x in _poked(op(i))])
