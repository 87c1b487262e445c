"""Enrollment: trade the one-time join token for a node id and credentials (sealed reply)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import nacl.public
import nkeys

from agent.config import AgentConfig, ConfigError
from agent.connection import backoff, is_bearer, nkey_jwt_auth
from agent.identity import EnrollState, Identity
from agent.oneshot import OneShotAuth, request_once
from agent.trust import CA_FILE, learn_pinned_ca, save_ca, trusting
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import EnrollReply, EnrollRequest, ErrorReply, SealedReply
from protocol.signing import open_reply
from protocol.subjects import ENROLL_SEED, JOIN_CREDS_SEP, Subjects
from protocol.trust import TrustError, ca_fingerprint, parse_join_token

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


def enroll_oneshot_auth(enroll_jwt: str, *, user: str, password: str) -> OneShotAuth:
    """The same for a one-shot request (agent/oneshot.py)."""
    if not enroll_jwt:
        return OneShotAuth(user=user, password=password)
    if is_bearer(enroll_jwt):
        return OneShotAuth(jwt=enroll_jwt)  # the server checks no nonce signature

    def sign(nonce: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(ENROLL_SEED.encode()))
        return bytes(kp.sign(nonce))

    return OneShotAuth(jwt=enroll_jwt, sign=sign)


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
        wg_public_key: str = "",
    ) -> None:
        self._config = config
        self._wg_public_key = wg_public_key
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
        # A token this agent cannot parse pins nothing; the controller refuses it (and
        # counts the refusal), so a newer token form is not refused here on a guess.
        parsed = parse_join_token(token)
        pin = parsed.ca_sha256 if parsed is not None else ""
        attempt = 0
        while True:
            try:
                tls = await self._trust(pin)
                reply = await self._enroll_once(self._request(token), tls)
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
                key_seq=reply.key_seq,
                mesh=reply.mesh,
                mesh_invites=reply.mesh_invites,
                apps_at_enrollment=reply.apps,
            )

    async def _trust(self, pin: str) -> ssl.SSLContext | None:
        """The TLS context of the enrollment connection, trusting only the pinned CA; it is
        kept in the state dir for every later connection. None: plain NATS (a token that
        pins nothing, and no ca_file). The pin is checked before anything is sent."""
        cfg = self._config
        path = cfg.state_dir / CA_FILE
        if cfg.ca_file:
            given = Path(cfg.ca_file)
            if pin:
                try:
                    der = ssl.PEM_cert_to_DER_cert(await asyncio.to_thread(given.read_text))
                except (OSError, ValueError) as exc:
                    raise EnrollmentError("bad_ca_file", f"ca_file {given}: {exc}") from None
                if ca_fingerprint(der) != pin:
                    raise EnrollmentError(
                        "ca_mismatch",
                        f"ca_file {given} is not the CA the join token pins: expected CA "
                        f"sha256 {pin}, got {ca_fingerprint(der)}; nothing was sent")
            return trusting(given)
        if not pin:
            path.unlink(missing_ok=True)  # a CA pinned by an earlier token is not ours now
            return None
        try:
            der = await asyncio.to_thread(
                learn_pinned_ca, cfg.nats_urls, pin, cfg.enroll_timeout)
        except TrustError as exc:
            self._log.error("enrollment refused by this agent: %s", exc)
            raise EnrollmentError("ca_mismatch", str(exc)) from None
        await asyncio.to_thread(save_ca, cfg.state_dir, der)
        self._log.info("the NATS server's CA matches the join token's pin (sha256 %s)", pin)
        return trusting(path)

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
            wg_public_key=self._wg_public_key,
            ts=time.time(),
            reply_key=bytes(reply_key.public_key),
        )
        return self._identity.sign_enroll(req), reply_key

    async def _enroll_once(
        self, request: tuple[EnrollRequest, nacl.public.PrivateKey],
        tls: ssl.SSLContext | None = None,
    ) -> EnrollReply:
        cfg = self._config
        req, reply_key = request
        try:
            data = await request_once(
                cfg.nats_urls, self._subjects.enroll, codec.encode(req),
                inbox_prefix=self._subjects.enroll_inbox,
                auth=enroll_oneshot_auth(self._enroll_jwt, user=cfg.enroll_user,
                                         password=cfg.enroll_password),
                tls=tls, wait=cfg.enroll_timeout,
                name=f"barista-agent-enroll {self._hostname}")
        except ssl.SSLCertVerificationError as exc:
            # The handshake failed before CONNECT: the token and its secret were not sent.
            raise EnrollmentError(
                "tls_untrusted",
                f"the NATS server's certificate is not trusted ({exc.verify_message}): "
                + ("it is not signed by the pinned CA or does not name this address; "
                   if tls is not None else "this agent pins no CA (a bt1 token); use a "
                   "join token that pins the controller's CA (bt2.<sha256>...) or ca_file; ")
                + "nothing was sent",
            ) from None
        return self._open(data, reply_key)

    def _open(self, data: bytes, reply_key: nacl.public.PrivateKey) -> EnrollReply:
        try:
            reply = codec.decode(data)
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
