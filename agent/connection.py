"""NATS connection helpers shared by enrollment, the metrics outbox and command intake."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from collections.abc import Callable
from typing import Any

import nkeys
from nats.aio.client import Client as NATS


async def connect(**opts: Any) -> NATS:
    """``nats.connect``, but a refused connection's socket is closed now: nats-py leaves it
    open until the next garbage collection, and connects are retried for as long as it
    takes."""
    nc = NATS()
    try:
        await nc.connect(**opts)
    except BaseException:
        # Bounded: after a failed TLS handshake asyncio's wait_closed() never returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)
        raise
    return nc


async def flush_all(nc: NATS, pong_wait: int) -> None:
    """A flush whose PONG confirms every command sent before it (a subscription too).

    nats-py's ``flush()`` writes its PING to the socket at once, ahead of the commands
    still in its pending buffer, which its flusher task writes a moment later
    (``Client._send_ping``; so since 2016, and still in nats.py's main of 2026-06): its
    PONG can come back before the server has read a SUB sent just before, and a message
    published to that subject from another connection in the meantime is dropped (no
    interest yet). The second PING goes out after the first PONG, when the flusher has
    written the buffer, so it follows those commands on the wire and its PONG confirms
    them too. Each flush waits up to ``pong_wait`` s for its PONG (see agent.commands for
    why it must not expire)."""
    await nc.flush(timeout=pong_wait)
    await nc.flush(timeout=pong_wait)


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter: the delay before retry number ``attempt + 1``."""
    return float(min(cap, base * 2.0 ** min(attempt, 30)) * (0.5 + random.random() / 2))


def nkey_jwt_auth(
    user_jwt: Callable[[], str], seed_or_signer: bytes | Callable[[bytes], bytes]
) -> dict[str, Any]:
    """``user_jwt_cb``/``signature_cb`` for nats-py: ``user_jwt`` returns the current JWT
    (called at every connect, so a renewed one is used at the next reconnect);
    ``seed_or_signer``: an nkey seed, or a function signing bytes."""
    if callable(seed_or_signer):
        signer = seed_or_signer
    else:
        seed = seed_or_signer

        def signer(data: bytes) -> bytes:
            kp = nkeys.from_seed(bytearray(seed))
            try:
                return bytes(kp.sign(data))
            finally:
                kp.wipe()

    return {
        "user_jwt_cb": lambda: user_jwt().encode(),
        "signature_cb": lambda nonce: base64.b64encode(signer(nonce.encode())),
    }


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, not verified (the server does that); {} if unreadable."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def is_bearer(token: str) -> bool:
    """A user JWT that admits alone: the server checks no nonce signature for it."""
    nats = jwt_claims(token).get("nats")
    return isinstance(nats, dict) and nats.get("bearer_token") is True
