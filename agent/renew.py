"""Renewal of the node's NATS user JWT (NATS operator mode).

The controller signs a short-lived JWT at enrollment. The agent asks for a new one at 2/3
of its life on its own renew subject (the connection proves who asks), swaps it behind the
connection's JWT callback and forces a reconnect, so the server never sees it expire:
nats-py closes a client for good on "User Authentication Expired". An agent that comes back
with an expired JWT (a suspended VM) renews first, as the enroll identity, by signing the
request with its identity nkey; a revoked or deleted node is refused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import nacl.public
from nats.aio.client import Client as NATS

from agent.connection import backoff, jwt_claims
from agent.enroll import enroll_oneshot_auth
from agent.identity import EnrollState, Identity
from agent.oneshot import request_once
from protocol import codec
from protocol.messages import ErrorReply, RenewReply, RenewRequest, SealedReply
from protocol.signing import open_reply, sign_renew
from protocol.subjects import Subjects

# Renew at this fraction of the JWT's life; a JWT with less than MIN_LEFT seconds left at
# start is renewed before connecting.
RENEW_AT = 2 / 3
MIN_LEFT = 30.0


class RenewalRefused(Exception):
    """The controller refused to renew (revoked, deleted): retrying cannot help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code


def jwt_times(token: str) -> tuple[float, float]:
    """(issued at, expires at) of a JWT (not verified: the server does that); expires 0:
    never."""
    claims = jwt_claims(token)
    try:
        return float(claims.get("iat", 0)), float(claims.get("exp", 0))
    except (ValueError, TypeError):
        return 0.0, 0.0


def renew_due(token: str, *, now: float | None = None) -> float:
    """When ``token`` should be renewed (unix time; inf: never)."""
    iat, exp = jwt_times(token)
    if not exp:
        return float("inf")
    return iat + (exp - iat) * RENEW_AT


def expired_soon(token: str, *, now: float | None = None) -> bool:
    _, exp = jwt_times(token)
    now = time.time() if now is None else now
    return bool(exp) and exp - now < MIN_LEFT


def _request(identity: Identity, node_id: str, *, sealed: bool) -> tuple[
    RenewRequest, nacl.public.PrivateKey | None
]:
    key = nacl.public.PrivateKey.generate() if sealed else None
    req = RenewRequest(
        node_id=node_id, identity=identity.public_key, ts=time.time(),
        reply_key=bytes(key.public_key) if key is not None else b"",
    )
    seed = bytearray(identity.seed_path.read_bytes().strip())
    try:
        return sign_renew(req, seed), key
    finally:
        seed[:] = bytes(len(seed))


def _answer(data: bytes, key: nacl.public.PrivateKey | None) -> str:
    reply = codec.decode(data)
    if isinstance(reply, SealedReply) and key is not None:
        reply = codec.decode(open_reply(key, reply))
    if isinstance(reply, ErrorReply):
        raise ConnectionError(f"{reply.message} [{reply.code}]")
    if not isinstance(reply, RenewReply):
        raise ConnectionError(f"unexpected renewal reply {type(reply).__name__}")
    if not reply.ok:
        if reply.error_code in ("revoked", "not_found", "not_managed"):
            raise RenewalRefused(reply.error_code, reply.error)
        raise ConnectionError(f"{reply.error} [{reply.error_code}]")
    return reply.nats_jwt


async def renew_connected(
    nc: NATS, identity: Identity, subjects: Subjects, node_id: str, *, wait: float = 5.0
) -> str:
    """A new JWT, asked for over the node's own connection."""
    req, _ = _request(identity, node_id, sealed=False)
    msg = await nc.request(subjects.node_renew(node_id), codec.encode(req), timeout=wait)
    return _answer(msg.data, None)


async def renew_as_enroller(
    urls: list[str], identity: Identity, subjects: Subjects, node_id: str, *,
    enroll_jwt: str, wait: float = 5.0, tls: ssl.SSLContext | None = None,
) -> str:
    """A new JWT for a node whose own has expired: asked for as the enroll identity, the
    answer sealed to a fresh key (every enrolling machine reads that inbox space). ``tls``:
    the pinned CA's context (None: plain NATS)."""
    req, key = _request(identity, node_id, sealed=True)
    data = await request_once(
        urls, subjects.enroll, codec.encode(req), inbox_prefix=subjects.enroll_inbox,
        auth=enroll_oneshot_auth(enroll_jwt, user="", password=""), tls=tls, wait=wait,
        name=f"barista-agent-renew {node_id}")
    return _answer(data, key)


async def renew_loop(
    *,
    state: EnrollState,
    nc: Callable[[], NATS | None],
    identity: Identity,
    subjects: Subjects,
    save: Callable[[], Awaitable[None]],
    log: logging.Logger,
) -> None:
    """Renew ``state.nats_jwt`` at RENEW_AT of its life, forever (until cancelled)."""
    attempt = 0
    while True:
        due = renew_due(state.nats_jwt)
        if due == float("inf"):
            return
        await asyncio.sleep(max(0.0, due - time.time()) if attempt == 0 else backoff(attempt))
        client = nc()
        if client is None or not client.is_connected:
            attempt += 1
            continue
        try:
            token = await renew_connected(client, identity, subjects, state.node_id)
        except RenewalRefused as exc:
            log.error("the controller refused to renew this node's NATS credentials: %s", exc)
            return
        except Exception as exc:
            log.warning("renewing the NATS credentials failed (%s); retrying", exc)
            attempt += 1
            continue
        attempt = 0
        state.nats_jwt = token
        await save()
        log.info("NATS credentials renewed (valid until %s)",
                 time.ctime(jwt_times(token)[1]))
        # The server checks a JWT at connect only: reconnect now with the new one.
        await client.force_reconnect()
