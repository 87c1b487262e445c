"""In-kernel WireGuard over generic netlink (the ``wireguard`` family, uapi/linux/wireguard.h).

Where the module exists this is the fast path; on these build machines it does not (the
family lookup answers ENOENT, ``ip link add type wireguard`` "Unknown device type"), so
``kernel_wireguard_available`` says so and the agent falls back to wireguard-go. The
messages are built and parsed here by hand (no pyroute2 on the agent) and unit-tested;
like the UAPI writer, they never carry WGDEVICE_F_REPLACE_PEERS.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.netmesh.errors import BackendUnavailable, NetmeshError
from agent.netmesh.host import Host
from agent.netmesh.uapi import DeviceOp, DeviceState, Endpoint, PeerOp, PeerState

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_A_IFINDEX = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGDEVICE_F_REPLACE_PEERS = 1  # never sent by us
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGPEER_F_REMOVE_ME = 1
WGPEER_F_REPLACE_ALLOWEDIPS = 2
WGPEER_F_UPDATE_ONLY = 4
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


def nla(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    head = _NLA.pack(_NLA.size + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """Attributes of a netlink payload as (type without flags, payload)."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > len(data):
            raise NetmeshError(f"malformed netlink attribute at offset {offset}")
        out.append((kind & NLA_TYPE_MASK, data[offset + _NLA.size: offset + length]))
        offset += (length + 3) & ~3
    return out


def sockaddr(endpoint: Endpoint) -> bytes:
    ip = ipaddress.ip_address(endpoint.host)
    if ip.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", endpoint.port) + \
            ip.packed + b"\0" * 8
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!H", endpoint.port) + \
        b"\0" * 4 + ip.packed + b"\0" * 4


def parse_sockaddr(data: bytes) -> Endpoint | None:
    if len(data) < 4:
        return None
    (family,) = struct.unpack_from("=H", data)
    (port,) = struct.unpack_from("!H", data, 2)
    if family == socket.AF_INET and len(data) >= 8:
        return Endpoint(str(ipaddress.IPv4Address(data[4:8])), port)
    if family == socket.AF_INET6 and len(data) >= 24:
        return Endpoint(str(ipaddress.IPv6Address(data[8:24])), port)
    return None


def _allowed_ip(prefix: str) -> bytes:
    net = ipaddress.ip_network(prefix, strict=False)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return nla(0, nla(WGALLOWEDIP_A_FAMILY, struct.pack("=H", family))
               + nla(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
               + nla(WGALLOWEDIP_A_CIDR_MASK, struct.pack("=B", net.prefixlen)), nested=True)


def _peer(op: PeerOp) -> bytes:
    flags = 0
    body = nla(WGPEER_A_PUBLIC_KEY, op.public_key)
    if op.remove:
        flags |= WGPEER_F_REMOVE_ME
    else:
        if op.update_only:
            flags |= WGPEER_F_UPDATE_ONLY
        if op.preshared_key is not None:
            body += nla(WGPEER_A_PRESHARED_KEY, op.preshared_key)
        if op.endpoint is not None:
            body += nla(WGPEER_A_ENDPOINT, sockaddr(op.endpoint))
        if op.keepalive is not None:
            body += nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", op.keepalive))
        if op.allowed_ips is not None:
            flags |= WGPEER_F_REPLACE_ALLOWEDIPS
            body += nla(WGPEER_A_ALLOWEDIPS, b"".join(_allowed_ip(p) for p in op.allowed_ips),
                        nested=True)
    body += nla(WGPEER_A_FLAGS, struct.pack("=I", flags))
    return nla(0, body, nested=True)


def build_set_device(family_id: int, ifname: str, device: DeviceOp | None,
                     peers: Sequence[PeerOp], *, seq: int = 1) -> bytes:
    """A WG_CMD_SET_DEVICE request (flags 0: peers not named stay as they are)."""
    attrs = nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\0")
    attrs += nla(WGDEVICE_A_FLAGS, struct.pack("=I", 0))
    if device is not None:
        if device.private_key is not None:
            attrs += nla(WGDEVICE_A_PRIVATE_KEY, device.private_key)
        if device.listen_port is not None:
            attrs += nla(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", device.listen_port))
        if device.fwmark is not None:
            attrs += nla(WGDEVICE_A_FWMARK, struct.pack("=I", device.fwmark))
    if peers:
        attrs += nla(WGDEVICE_A_PEERS, b"".join(_peer(op) for op in peers), nested=True)
    return _message(family_id, WG_CMD_SET_DEVICE, attrs, NLM_F_REQUEST | NLM_F_ACK, seq)


def build_get_device(family_id: int, ifname: str, *, seq: int = 1) -> bytes:
    return _message(family_id, WG_CMD_GET_DEVICE, nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\0"),
                    NLM_F_REQUEST | NLM_F_DUMP, seq)


def build_get_family(name: str, *, seq: int = 1) -> bytes:
    return _message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                    nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"), NLM_F_REQUEST, seq,
                    version=1)


def _message(family_id: int, cmd: int, attrs: bytes, flags: int, seq: int, *,
             version: int = WG_GENL_VERSION) -> bytes:
    body = _GENLHDR.pack(cmd, version, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family_id, flags, seq, 0) + body


def split_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload after the netlink header) of each message in one read."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetmeshError("malformed netlink message")
        out.append((kind, data[offset + _NLMSGHDR.size: offset + length]))
        offset += (length + 3) & ~3
    return out


def parse_device(payloads: Sequence[bytes]) -> DeviceState:
    """A WG_CMD_GET_DEVICE dump (its generic-netlink payloads) as a DeviceState."""
    dev = DeviceState()
    for payload in payloads:
        for kind, value in parse_attrs(payload[_GENLHDR.size:]):
            if kind == WGDEVICE_A_PRIVATE_KEY:
                dev.has_private_key = value != bytes(32)
                dev.private_key_hash = hash(bytes(value))
            elif kind == WGDEVICE_A_LISTEN_PORT:
                (dev.listen_port,) = struct.unpack("=H", value[:2])
            elif kind == WGDEVICE_A_FWMARK:
                (dev.fwmark,) = struct.unpack("=I", value[:4])
            elif kind == WGDEVICE_A_PEERS:
                for _, peer_attrs in parse_attrs(value):
                    peer = _parse_peer(peer_attrs)
                    old = dev.peers.get(peer.public_key)
                    if old is not None:  # a peer split over several dump messages
                        old.allowed_ips.extend(peer.allowed_ips)
                    else:
                        dev.peers[peer.public_key] = peer
    return dev


def _parse_peer(data: bytes) -> PeerState:
    peer = PeerState(public_key=b"")
    for kind, value in parse_attrs(data):
        if kind == WGPEER_A_PUBLIC_KEY:
            peer.public_key = bytes(value)
        elif kind == WGPEER_A_ENDPOINT:
            peer.endpoint = parse_sockaddr(value)
        elif kind == WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL:
            (peer.keepalive,) = struct.unpack("=H", value[:2])
        elif kind == WGPEER_A_LAST_HANDSHAKE_TIME and len(value) >= 16:
            sec, nsec = struct.unpack("=qq", value[:16])
            peer.last_handshake = sec + nsec / 1e9
        elif kind == WGPEER_A_RX_BYTES:
            (peer.rx_bytes,) = struct.unpack("=Q", value[:8])
        elif kind == WGPEER_A_TX_BYTES:
            (peer.tx_bytes,) = struct.unpack("=Q", value[:8])
        elif kind == WGPEER_A_PRESHARED_KEY:
            peer.has_preshared_key = value != bytes(32)
        elif kind == WGPEER_A_ALLOWEDIPS:
            for _, ip_attrs in parse_attrs(value):
                fields = dict(parse_attrs(ip_attrs))
                addr = fields.get(WGALLOWEDIP_A_IPADDR, b"")
                mask = fields.get(WGALLOWEDIP_A_CIDR_MASK, b"\0")[0]
                ip = ipaddress.ip_address(addr)
                peer.allowed_ips.append(str(ipaddress.ip_network(f"{ip}/{mask}")))
    return peer


def _exchange(host: Host, request: bytes, *, dump: bool) -> list[tuple[int, bytes]]:
    sock = host.open_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.send(request)
        messages: list[tuple[int, bytes]] = []
        while True:
            for kind, payload in split_messages(sock.recv(1 << 20)):
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code != 0:
                        raise OSError(-code, f"netlink: {errnos.errorcode.get(-code, -code)}")
                    return messages
                if kind == NLMSG_DONE:
                    return messages
                messages.append((kind, payload))
            if not dump:
                return messages
    finally:
        sock.close()


def resolve_family(host: Host, name: str = WG_GENL_NAME) -> int | None:
    """The generic-netlink family id of ``name``, None when the kernel has no such family."""
    try:
        answers = _exchange(host, build_get_family(name), dump=False)
    except OSError as exc:
        if exc.errno == errnos.ENOENT:
            return None
        raise
    for _, payload in answers:
        for kind, value in parse_attrs(payload[_GENLHDR.size:]):
            if kind == CTRL_ATTR_FAMILY_ID:
                return int(struct.unpack("=H", value[:2])[0])
    return None


def kernel_wireguard_available(host: Host) -> tuple[bool, str]:
    try:
        family = resolve_family(host)
    except OSError as exc:
        return False, f"generic netlink unusable: {exc}"
    if family is None:
        return False, "no 'wireguard' generic netlink family (module not loaded or absent)"
    return True, f"wireguard family id {family}"


@dataclass
class KernelBackend:
    host: Host = field(default_factory=Host)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("barista.netmesh"))
    name: str = "kernel"
    _family: int | None = None
    _up: set[str] = field(default_factory=set)

    async def _family_id(self) -> int:
        if self._family is None:
            self._family = await asyncio.to_thread(resolve_family, self.host)
            if self._family is None:
                raise BackendUnavailable(self.name, "no 'wireguard' generic netlink family")
        return self._family

    async def up(self, ifname: str) -> None:
        await self._family_id()
        if not await self.host.link_exists(ifname):
            await self.host.run(["ip", "link", "add", "dev", ifname, "type", "wireguard"])
        self._up.add(ifname)

    async def down(self, ifname: str) -> None:
        self._up.discard(ifname)
        await self.host.delete_link(ifname)

    def alive(self, ifname: str) -> bool:
        return ifname in self._up

    async def get(self, ifname: str) -> DeviceState:
        family = await self._family_id()
        answers = await asyncio.to_thread(_exchange, self.host,
                                          build_get_device(family, ifname), dump=True)
        return parse_device([payload for kind, payload in answers if kind == family])

    async def set(self, ifname: str, device: DeviceOp | None, peers: Sequence[PeerOp]) -> None:
        family = await self._family_id()
        await asyncio.to_thread(_exchange, self.host,
                                build_set_device(family, ifname, device, peers), dump=False)
