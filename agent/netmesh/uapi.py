"""The WireGuard cross-platform UAPI (wireguard-go's unix socket), written here.

Not the ``wireguard-tools`` package's writer: that one always sends ``replace_peers=true``
(every session dropped on each change), writes preshared keys in base64 where the UAPI
wants hex, and mangles IPv6 and missing endpoints (DESIGN.md section 9). Here: keys are
hex, IPv6 endpoints bracketed, a peer without an endpoint sends no endpoint line, and
``replace_peers`` is never written -- each change names the peers it touches.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from agent.netmesh.errors import UapiError

MAX_RESPONSE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # an IP literal
    port: int

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.host)  # ValueError for anything else
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")

    def uapi(self) -> str:
        ip = ipaddress.ip_address(self.host)
        return f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"endpoint {text!r} has no port")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"endpoint {text!r}: unbalanced brackets")
            host = host[1:-1]
        host = host.split("%", 1)[0]  # a scoped IPv6 address
        return cls(str(ipaddress.ip_address(host)), int(port))


@dataclass(frozen=True, slots=True)
class PeerOp:
    """One peer's change in a set transaction. ``allowed_ips`` None: leave them; a list:
    replace them with it. ``endpoint`` / ``keepalive`` None: leave them."""

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    endpoint: Endpoint | None = None
    keepalive: int | None = None
    allowed_ips: tuple[str, ...] | None = None
    preshared_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeviceOp:
    private_key: bytes | None = None
    listen_port: int | None = None
    fwmark: int | None = None


def _hex_key(key: bytes, what: str) -> str:
    if len(key) != 32:
        raise ValueError(f"{what} must be 32 bytes, not {len(key)}")
    return key.hex()


def encode_set(device: DeviceOp | None = None, peers: tuple[PeerOp, ...] | list[PeerOp] = ()
               ) -> bytes:
    """A ``set=1`` request. Never ``replace_peers``: peers not named stay as they are."""
    lines = ["set=1"]
    if device is not None:
        if device.private_key is not None:
            lines.append(f"private_key={_hex_key(device.private_key, 'private key')}")
        if device.listen_port is not None:
            if not 0 <= device.listen_port <= 65535:
                raise ValueError(f"listen port {device.listen_port} out of range")
            lines.append(f"listen_port={device.listen_port}")
        if device.fwmark is not None:
            lines.append(f"fwmark={device.fwmark}")
    for op in peers:
        lines.append(f"public_key={_hex_key(op.public_key, 'public key')}")
        if op.remove:
            lines.append("remove=true")
            continue
        if op.update_only:
            lines.append("update_only=true")
        if op.preshared_key is not None:
            lines.append(f"preshared_key={_hex_key(op.preshared_key, 'preshared key')}")
        if op.endpoint is not None:
            lines.append(f"endpoint={op.endpoint.uapi()}")
        if op.keepalive is not None:
            if not 0 <= op.keepalive <= 65535:
                raise ValueError(f"keepalive {op.keepalive} out of range")
            lines.append(f"persistent_keepalive_interval={op.keepalive}")
        if op.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            for prefix in op.allowed_ips:
                lines.append(f"allowed_ip={ipaddress.ip_network(prefix, strict=False)}")
    return ("\n".join(lines) + "\n\n").encode()


@dataclass(slots=True)
class PeerState:
    public_key: bytes
    endpoint: Endpoint | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int = 0
    last_handshake: float = 0.0  # seconds since the epoch; 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    has_preshared_key: bool = False


@dataclass(slots=True)
class DeviceState:
    has_private_key: bool = False
    private_key_hash: int = 0  # hash of the private key (compare without keeping it)
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerState] = field(default_factory=dict)


def parse_get(text: str) -> DeviceState:
    """Parse a ``get=1`` answer (the lines before ``errno``). The private key is not kept:
    only whether one is set and a hash to compare against."""
    dev = DeviceState()
    peer: PeerState | None = None
    sec = nsec = 0
    errno: int | None = None
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"malformed UAPI line {line[:40]!r}")
        if key == "errno":
            errno = int(value)
            break
        if key == "private_key":
            raw = bytes.fromhex(value)
            dev.has_private_key = raw != bytes(32)
            dev.private_key_hash = hash(raw)
        elif key == "listen_port":
            dev.listen_port = int(value)
        elif key == "fwmark":
            dev.fwmark = int(value)
        elif key == "public_key":
            if peer is not None:
                peer.last_handshake = sec + nsec / 1e9
            peer = PeerState(public_key=bytes.fromhex(value))
            if len(peer.public_key) != 32:
                raise UapiError("UAPI public_key is not 32 bytes")
            dev.peers[peer.public_key] = peer
            sec = nsec = 0
        elif peer is None:
            continue  # a device key this parser does not know
        elif key == "endpoint":
            peer.endpoint = Endpoint.parse(value)
        elif key == "allowed_ip":
            peer.allowed_ips.append(str(ipaddress.ip_network(value, strict=False)))
        elif key == "persistent_keepalive_interval":
            peer.keepalive = int(value)
        elif key == "last_handshake_time_sec":
            sec = int(value)
        elif key == "last_handshake_time_nsec":
            nsec = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "preshared_key":
            peer.has_preshared_key = bytes.fromhex(value) != bytes(32)
    if peer is not None:
        peer.last_handshake = sec + nsec / 1e9
    if errno not in (None, 0):
        raise UapiError(f"UAPI get failed with errno {errno}", errno=errno)
    return dev


def parse_errno(text: str) -> int:
    for line in text.split("\n"):
        if line.startswith("errno="):
            return int(line[6:])
    raise UapiError(f"UAPI answer without errno: {text[:60]!r}")


class UapiClient:
    """One request per connection on ``/var/run/wireguard/<ifname>.sock``."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    async def _exchange(self, request: bytes) -> str:
        async def go() -> str:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
            try:
                writer.write(request)
                await writer.drain()
                buf = b""
                # The answer ends with "errno=N\n\n"; the socket stays open after it.
                while not (buf.endswith(b"\n\n") and b"errno=" in buf):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > MAX_RESPONSE:
                        raise UapiError("UAPI answer too large")
                return buf.decode()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass

        try:
            async with asyncio.timeout(self.timeout):  # (not wait_for: see mesh._tick_loop)
                return await go()
        except (TimeoutError, OSError) as exc:
            raise UapiError(f"UAPI socket {self.path}: {exc or type(exc).__name__}") from None

    async def get(self) -> DeviceState:
        return parse_get(await self._exchange(b"get=1\n\n"))

    async def set(self, request: bytes) -> None:
        errno = parse_errno(await self._exchange(request))
        if errno != 0:
            raise UapiError(f"UAPI set failed with errno {errno}", errno=errno)
