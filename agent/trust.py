"""The controller's CA, learned from the NATS server and checked against the join token's pin
before anything is sent (stdlib ssl only).

nats-server sends its INFO line in the clear and then expects the TLS handshake; its
certificate file holds the server certificate and the CA after it, so the handshake hands
us the CA. We read INFO, complete a handshake that verifies nothing, take the chain, close
the socket: the only bytes we sent are the TLS ClientHello and key exchange. The pinned CA
is then the only one the real connection trusts (host names checked as well).
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from agent.files import write_private
from protocol.trust import TrustError, pinned_ca

CA_FILE = "ca.pem"


class NoTLS(Exception):
    """The server at a URL does not serve TLS, but a CA was pinned."""


def host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


def parse_info(line: bytes, host: str, port: int) -> dict[str, Any]:
    """The JSON of a NATS server's first line, ``INFO {...}``; ConnectionError otherwise."""
    if not line.startswith(b"INFO "):
        raise ConnectionError(f"not a NATS server at {host}:{port}")
    try:
        info = json.loads(line[5:])
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ConnectionError(f"bad INFO line from {host}:{port}")
    return info


def _read_line(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection before its INFO line")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("the server sent an over-long INFO line")
    return buf.split(b"\r\n", 1)[0]


def _chain_of(tls_sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server presented (DER), verified or not. Python 3.13 has this
    as a public method; 3.10-3.12 only on the underlying _ssl object."""
    public = getattr(tls_sock, "get_unverified_chain", None)
    if public is not None:
        return list(public() or [])
    raw: Any = tls_sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in raw or []]  # type: ignore[attr-defined]


def fetch_nats_chain(url: str, timeout: float) -> list[bytes]:
    """The certificate chain the NATS server at ``url`` presents (blocking: a thread).
    ``NoTLS`` if it does not ask for TLS; OSError/ConnectionError if it is unreachable."""
    host, port = host_port(url)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        info = parse_info(_read_line(sock), host, port)
        if not info.get("tls_required"):
            raise NoTLS(f"{host}:{port}")
        # Verifies nothing on purpose: the chain is checked against the pin afterwards, and
        # nothing but the handshake goes over this socket.
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        with probe.wrap_socket(sock, server_hostname=host) as tls_sock:
            return _chain_of(tls_sock)


def learn_pinned_ca(urls: list[str], pin: str, timeout: float) -> bytes:
    """The CA certificate (DER) whose sha256 is ``pin``, from the first server that answers.
    ``TrustError`` when a server presents another chain, ``NoTLS`` when it serves no TLS;
    the last connection error when none answers."""
    last: Exception = ConnectionError("no NATS url")
    for url in urls:
        try:
            chain = fetch_nats_chain(url, timeout)
        except NoTLS:
            raise TrustError(
                f"the join token pins the controller CA sha256 {pin}, but the NATS server at "
                f"{url} serves no TLS. Refusing to send anything: a server that pins nothing "
                "is not the controller the token was made for", expected=pin,
            ) from None
        except (OSError, ConnectionError) as exc:
            last = exc
            continue
        return pinned_ca(chain, pin, where=f"the NATS server at {url}")
    raise last


def save_ca(state_dir: Path, der: bytes) -> Path:
    path = state_dir / CA_FILE
    write_private(path, ssl.DER_cert_to_PEM_cert(der).encode())
    return path


def trusting(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only the CA in ``ca_file`` and checks host names."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx
