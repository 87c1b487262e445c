"""Enrollment: trade the one-time join token for a node id and credentials (sealed reply)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nacl.public

from agent.config import AgentConfig, ConfigError
from agent.connection import backoff, connect, nkey_jwt_auth
from agent.identity import EnrollState, Identity
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import EnrollReply, EnrollRequest, ErrorReply, SealedReply
from protocol.signing import open_reply
from protocol.subjects import ENROLL_SEED, JOIN_CREDS_SEP, Subjects

# Refusals that a later attempt (a new request) can overcome: the clock was off.
_TRANSIENT_REFUSALS = ("clock_skew",)


def split_join_text(text: str) -> tuple[str, str]:
    """(join token, enroll JWT or "") of what a machine was given to join."""
    token, _, enroll_jwt = text.strip().partition(JOIN_CREDS_SEP)
    return token, enroll_jwt


def enroll_auth(enroll_jwt: str, *, user: str, password: str) -> dict[str, Any]:
    """nats-py's auth options for the enroll identity: in NATS operator mode its JWT with
    the public ENROLL_SEED, else the enroll user and password."""
    if not enroll_jwt:
        return {"user": user, "password": password}
    return nkey_jwt_auth(lambda: enroll_jwt, ENROLL_SEED.encode())


class EnrollmentError(Exception):
    """Enrollment was refused for good (bad, used or expired token): retrying cannot help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


class Enroller:
    """Enrolls one agent, retrying transient failures (NATS down, no controller) forever."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        identity: Identity,
        subjects: Subjects,
        hostname: str,
        version: str,
        facts: dict[str, Any],
        log: logging.Logger,
    ) -> None:
        self._config = config
        self._identity = identity
        self._subjects = subjects
        self._hostname = hostname
        self._version = version
        self._facts = facts
        self._log = log
        self._enroll_jwt = ""

    async def enroll(self) -> EnrollState:
        """Enroll with the join token from the config, a file or the environment; the token
        is held only for the enrollment itself (it is never written back to the config)."""
        try:
            token = self._config.join_token()
        except ConfigError as exc:
            raise EnrollmentError("no_token", str(exc)) from None
        if not token:
            raise EnrollmentError(
                "no_token",
                "this agent is not enrolled and has no join token: create one with "
                "`barista token create`, write it to a 0600 file and pass --token-file FILE "
                "(or set BARISTA_AGENT_TOKEN)",
            )
        token, self._enroll_jwt = split_join_text(token)
        self._enroll_jwt = self._enroll_jwt or self._config.enroll_jwt
        attempt = 0
        while True:
            try:
                reply = await self._enroll_once(self._request(token))
            except EnrollmentError:
                raise
            except Exception as exc:  # transient: NATS down, no controller, timeout
                delay = backoff(attempt)
                self._log.warning(
                    "enrollment attempt %d failed (%s); retrying in %.1fs",
                    attempt + 1,
                    exc or type(exc).__name__,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self._log.info("enrolled as node %s", reply.node_id)
            return EnrollState(
                node_id=reply.node_id,
                labels=reply.labels,
                auth=reply.auth,
                inbox_prefix=reply.inbox_prefix,
                command_keys=reply.command_keys,
                heartbeat_interval=reply.heartbeat_interval,
                metrics_interval=reply.metrics_interval,
                nats_jwt=reply.nats_jwt,
                enroll_jwt=self._enroll_jwt if reply.nats_jwt else "",
            )

    def _request(self, token: str) -> tuple[EnrollRequest, nacl.public.PrivateKey]:
        """A fresh request per attempt: its own time, a new ephemeral key for the sealed
        reply, signed with the identity key (the controller checks all three)."""
        reply_key = nacl.public.PrivateKey.generate()
        req = EnrollRequest(
            token=token,
            identity=self._identity.public_key,
            hostname=self._hostname,
            agent_version=self._version,
            facts={k: str(v) for k, v in self._facts.items()},
            labels=self._config.labels,
            ts=time.time(),
            reply_key=bytes(reply_key.public_key),
        )
        return self._identity.sign_enroll(req), reply_key

    async def _enroll_once(
        self, request: tuple[EnrollRequest, nacl.public.PrivateKey]
    ) -> EnrollReply:
        cfg = self._config
        req, reply_key = request
        nc = await connect(
            servers=cfg.nats_urls,
            **enroll_auth(self._enroll_jwt, user=cfg.enroll_user, password=cfg.enroll_password),
            inbox_prefix=self._subjects.enroll_inbox.encode(),
            allow_reconnect=False,
            connect_timeout=cfg.enroll_timeout,
            max_reconnect_attempts=0,
            name=f"barista-agent-enroll {self._hostname}",
            error_cb=self._on_error,
        )
        try:
            msg = await nc.request(
                self._subjects.enroll, codec.encode(req), timeout=cfg.enroll_timeout
            )
        finally:
            await nc.close()
        try:
            reply = codec.decode(msg.data)
            if isinstance(reply, SealedReply):
                # Sealed to our ephemeral key: nobody else on the enroll inbox can read it.
                reply = codec.decode(open_reply(reply_key, reply))
        except ProtocolError as exc:
            raise ConnectionError(f"bad enrollment reply: {exc.reason}") from None
        if isinstance(reply, ErrorReply):
            if reply.code in ("internal",):
                raise ConnectionError(reply.message)
            raise EnrollmentError(reply.code, reply.message)
        if not isinstance(reply, EnrollReply):
            raise ConnectionError(f"unexpected enrollment reply {type(reply).__name__}")
        if not reply.ok:
            if reply.error_code in _TRANSIENT_REFUSALS:
                raise ConnectionError(f"{reply.error} [{reply.error_code}]")
            raise EnrollmentError(
                reply.error_code or "refused", reply.error or "enrollment refused"
            )
        return reply

    async def _on_error(self, exc: Exception) -> None:
        # The failed attempt itself is logged once by enroll() with its retry delay.
        self._log.debug("enrollment connection: %s", exc)
