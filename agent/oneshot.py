"""One NATS request over a connection made for it: enrollment and the renewal of an
expired JWT, both as the enroll identity, once per machine (or per suspended VM).

nats-py's client is made for long-lived connections: a client object, a read loop, a
flusher and a pinger task, and CONNECT, PING, SUB and PUB each a write of their own. For
one request that is most of what an enrolling agent spends: at 5,000 agents enrolling at
once, the enroll connection was about half of each agent's start. Here the whole exchange
is the INFO line read, (TLS), then one write of CONNECT + PING + SUB + PUB, and lines read
until the reply arrives. The server applies the same checks either way (the enroll
identity can only publish the enroll request and read its own inbox space).

Protocol as in https://docs.nats.io/reference/reference-protocols/nats-protocol: INFO,
CONNECT (``sig``: the server's nonce signed with the identity's nkey, or user and
password), ``MSG``/``HMSG`` (a no-responders status is ``NATS/1.0 503``), ``-ERR``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.trust import host_port, parse_info

MAX_LINE = 1 << 16  # INFO lines with many connect_urls stay far below this
MAX_REPLY = 1 << 20


class RequestRefused(ConnectionError):
    """The server refused the connection or the request (-ERR): authorization, a payload
    over its limit, or no controller listening."""


@dataclass(frozen=True, slots=True)
class OneShotAuth:
    """How to authenticate: a user JWT and a function that signs the server's nonce
    (operator mode), or a user and a password."""

    jwt: str = ""
    sign: Callable[[bytes], bytes] | None = None
    user: str = ""
    password: str = ""


def _connect_line(info: dict[str, object], auth: OneShotAuth, *, name: str, tls: bool) -> bytes:
    opts: dict[str, object] = {
        "verbose": False, "pedantic": False, "tls_required": tls, "name": name,
        "lang": "python3", "version": "barista-oneshot", "protocol": 1, "echo": False,
        "headers": True, "no_responders": True,
    }
    if auth.jwt:
        opts["jwt"] = auth.jwt
        if auth.sign is not None:  # None: a bearer JWT
            nonce = str(info.get("nonce", ""))
            opts["sig"] = base64.urlsafe_b64encode(auth.sign(nonce.encode())).rstrip(
                b"=").decode()
    elif auth.user:
        opts["user"], opts["pass"] = auth.user, auth.password
    return b"CONNECT " + json.dumps(opts, separators=(",", ":")).encode() + b"\r\n"


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise ConnectionError("the NATS server sent an over-long line") from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("the NATS server closed the connection") from None
    return line[:-2]


def _error_text(line: bytes) -> str:
    return line[4:].strip().strip(b"'").decode(errors="replace") or "unknown error"


async def _exchange(url: str, *, subject: str, payload: bytes, inbox_prefix: str,
                    auth: OneShotAuth, tls: ssl.SSLContext | None, name: str) -> bytes:
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_LINE)
    try:
        info = parse_info(await _readline(reader), host, port)
        secure = bool(info.get("tls_required")) or url.startswith("tls://")
        if secure:
            # As nats-py: the pinned CA's context, else the system's trust store.
            await writer.start_tls(tls or ssl.create_default_context(), server_hostname=host)
        elif tls is not None:
            raise ConnectionError(f"the NATS server at {host}:{port} does not serve TLS, "
                                  "but this agent pins a CA: refusing to send in the clear")
        max_payload = int(info.get("max_payload", MAX_REPLY) or MAX_REPLY)
        if len(payload) > max_payload:
            raise RequestRefused(f"request of {len(payload)} bytes is over the server's "
                                 f"max_payload {max_payload}")
        inbox = f"{inbox_prefix}.{secrets.token_urlsafe(16)}"
        writer.write(b"".join((
            _connect_line(info, auth, name=name, tls=secure), b"PING\r\n",
            f"SUB {inbox} 1\r\n".encode(),
            f"PUB {subject} {inbox} {len(payload)}\r\n".encode(), payload, b"\r\n")))
        await writer.drain()
        while True:
            line = await _readline(reader)
            if line.startswith((b"MSG ", b"HMSG ")):
                return await _message(reader, line)
            if line == b"PING":
                writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RequestRefused(f"the NATS server refused: {_error_text(line)}")
            # PONG, +OK, INFO (cluster changes): nothing to do
    finally:
        writer.close()
        # Bounded: after a failed TLS handshake asyncio's wait_closed() may never return.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _message(reader: asyncio.StreamReader, line: bytes) -> bytes:
    parts = line.split()
    headers = parts[0] == b"HMSG"
    try:
        total = int(parts[-1])
        head = int(parts[-2]) if headers else 0
    except (IndexError, ValueError):
        raise ConnectionError(f"bad message line from the NATS server: {line[:80]!r}"
                              ) from None
    if total > MAX_REPLY or not 0 <= head <= total:
        raise ConnectionError(f"reply of {total} bytes is over {MAX_REPLY}")
    try:
        body = await reader.readexactly(total + 2)
    except asyncio.IncompleteReadError:
        raise ConnectionError("the NATS server closed the connection mid-reply") from None
    if headers:
        status = body[:head].split(b"\r\n", 1)[0].split()
        if len(status) > 1 and status[1] == b"503":
            raise RequestRefused("no controller is answering (no responders on the "
                                 "enroll subject): is the controller running?")
    return body[head:total]


async def request_once(servers: Sequence[str], subject: str, payload: bytes, *,
                       inbox_prefix: str, auth: OneShotAuth, tls: ssl.SSLContext | None,
                       wait: float, name: str) -> bytes:
    """The reply to one request: each server in random order until one answers (a
    refused connection or request is not retried on another: the caller backs off).
    TimeoutError after ``wait`` s in all; ssl.SSLCertVerificationError as raised."""
    order = list(servers)
    random.shuffle(order)
    last: Exception = ConnectionError("no NATS server configured")
    async with asyncio.timeout(wait):
        for url in order:
            try:
                return await _exchange(url, subject=subject, payload=payload,
                                       inbox_prefix=inbox_prefix, auth=auth, tls=tls,
                                       name=name)
            except (RequestRefused, ssl.SSLError):
                raise
            except OSError as exc:  # unreachable: the next server
                last = exc
    raise last
