"""Join tokens (one-time, expiring, carrying labels) and the enrollment handler."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.errors import BadRequest, Conflict, NotFound, TokenRefused
from controller.models import NodeRecord, TokenRecord, bounded_facts
from controller.nats.admission import NodeAdmission
from controller.nats.operator import RevokedUser
from controller.nats.permissions import NodeAccess
from controller.provision.contract import TAG_NODE
from controller.provision.model import LABEL_GROUP, LABEL_INFRA
from controller.state.table import Table
from protocol.errors import BadIdentityProof, SelectorError
from protocol.messages import EnrollReply, EnrollRequest, RenewReply, RenewRequest
from protocol.selectors import parse_labels
from protocol.signing import verify_enroll, verify_renew
from protocol.subjects import JOIN_CREDS_SEP
from protocol.trust import JoinToken, parse_join_token

log = logging.getLogger("barista.controller.enroll")

_NKEY_RE = re.compile(r"^U[A-Z2-7]{55}$")
# A node name a token can be bound to: it becomes the node id (a subject token) and the
# machine's hostname, so DNS-label rules: "<infra>-<group>-<index>".
NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_TOKEN_TTL = 365 * 24 * 3600.0


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; only its hash is stored
    record: TokenRecord


def bare_token(token: str) -> str:
    """A join token without the enroll credentials it may carry (after JOIN_CREDS_SEP)."""
    return (token or "").split(JOIN_CREDS_SEP, 1)[0]


class TokenService:
    """Join tokens. ``ca_sha256``: the pin of the CA agents see on NATS, carried in every
    token made here (``bt2.<pin>.<id>.<secret>``); "" (plain NATS): ``bt1.<id>.<secret>``.
    ``enroll_jwt``: the enroll identity's JWT (operator mode), which ``join_text`` appends
    to a token after JOIN_CREDS_SEP so that one string is all a machine needs to join; it
    is no secret (it can only ask to enroll), the token before it is."""

    def __init__(
        self, tokens: Table[TokenRecord], *, default_ttl: float, ca_sha256: str = "",
        enroll_jwt: str = "",
    ) -> None:
        self._tokens = tokens
        self._default_ttl = default_ttl
        self._ca_sha256 = ca_sha256
        self._enroll_jwt = enroll_jwt

    async def create(
        self,
        *,
        labels: dict[str, str] | None = None,
        ttl: float | None = None,
        description: str = "",
        node_name: str = "",
    ) -> IssuedToken:
        """A one-time join token. ``node_name``: bound to that node (see TokenRecord)."""
        ttl = self._default_ttl if ttl is None else float(ttl)
        if not (0 < ttl <= MAX_TOKEN_TTL):
            raise BadRequest(f"token ttl must be between 1 second and {int(MAX_TOKEN_TTL)} s")
        if node_name and not NODE_NAME_RE.match(node_name):
            raise BadRequest(
                f"node name {node_name[:80]!r} must be 1-63 lower-case letters, digits and "
                "'-', starting and ending with a letter or digit")
        labels = clean_labels(labels or {})
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        record = TokenRecord(
            id=token_id,
            secret_sha256=_sha256(secret),
            labels=labels,
            created_at=now,
            expires_at=now + ttl,
            description=description[:200],
            node_name=node_name,
        )
        await self._tokens.create(token_id, record)
        log.info("join token %s created (ttl %.0fs, labels %s%s)", token_id, ttl, labels,
                 f", bound to node {node_name}" if node_name else "")
        token = JoinToken(token_id=token_id, secret=secret, ca_sha256=self._ca_sha256)
        return IssuedToken(token=str(token), record=record)

    @property
    def enroll_jwt(self) -> str:
        return self._enroll_jwt

    def join_text(self, token: str) -> str:
        """What a joining machine is given: the token, and the enroll identity's JWT when
        NATS is in operator mode (without it the machine cannot even ask to enroll)."""
        return f"{token}{JOIN_CREDS_SEP}{self._enroll_jwt}" if self._enroll_jwt else token

    async def consume(
        self, token: str, *, node_id: str, identity: str, hostname: str = ""
    ) -> TokenRecord:
        """Mark the token used by ``node_id``; refuse bad, expired or used tokens, and a
        node-bound token presented by a machine of another name (``hostname``): it is used
        by its ``node_name`` then, never by ``node_id``.

        Compare-and-set on the token's revision makes it one-time even with several
        controllers. A retry by the same identity (its reply was lost) gets the same node.
        The record is first taken from the table's watched copy (no read round trip); a
        stale copy (used or revoked elsewhere meanwhile) fails the compare-and-set, and the
        token is then read from the server and checked again.
        """
        parsed = parse_join_token(bare_token(token))
        if parsed is None:
            raise TokenRefused(
                "bad_token", "join token is malformed; check that it was copied whole"
            )
        # The pin is not checked here: it protects the agent, which checked it before it
        # sent this request; the secret is what admits.
        token_id, secret = parsed.token_id, parsed.secret
        cached = self._tokens.get(token_id)
        rev = self._tokens.revision(token_id)
        if cached is not None and rev:
            try:
                return await self._consume(token_id, secret, cached, rev, node_id=node_id,
                                           identity=identity, hostname=hostname)
            except Conflict:
                pass  # the copy was stale: decide on the server's record
        try:
            record, rev = await self._tokens.fetch(token_id)
        except NotFound:
            raise TokenRefused("bad_token", "join token is unknown or was revoked") from None
        try:
            return await self._consume(token_id, secret, record, rev, node_id=node_id,
                                       identity=identity, hostname=hostname)
        except Conflict:
            raise TokenRefused(
                "token_used", "join token was used concurrently by another node"
            ) from None

    async def _consume(
        self, token_id: str, secret: str, record: TokenRecord, rev: int, *, node_id: str,
        identity: str, hostname: str,
    ) -> TokenRecord:
        """Check ``record`` (at revision ``rev``) and mark it used by compare-and-set;
        ``Conflict`` if the stored token is no longer at ``rev``."""
        if not hmac.compare_digest(record.secret_sha256, _sha256(secret)):
            raise TokenRefused("bad_token", "join token is unknown or was revoked")
        if record.used_by:
            if record.used_by_identity == identity:
                return record  # idempotent retry of the same machine
            raise TokenRefused(
                "token_used",
                "join token was already used by another node; create a new one with "
                "`barista token create`",
            )
        if record.expires_at < time.time():
            raise TokenRefused(
                "token_expired",
                "join token has expired; create a new one with `barista token create`",
            )
        if record.node_name:
            if hostname != record.node_name:
                raise TokenRefused(
                    "token_node_mismatch",
                    f"join token is bound to node {record.node_name!r} and cannot enroll "
                    f"{hostname[:64]!r}; set the agent's hostname to {record.node_name!r} "
                    "or use a token made for this machine",
                )
            node_id = record.node_name
        used = TokenRecord(
            **{
                **{f: getattr(record, f) for f in record.__struct_fields__},
                "used_at": time.time(),
                "used_by": node_id,
                "used_by_identity": identity,
            }
        )
        await self._tokens.update(token_id, used, revision=rev)
        return used


def clean_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as stored: checked with the selectors' key/value rules (so every label can be
    selected on) and kept exactly as checked, i.e. trimmed; ``BadRequest`` otherwise."""
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("labels must be strings")
        try:
            ((k, v),) = parse_labels([f"{key}={value}"]).items()
        except SelectorError as exc:
            raise BadRequest(f"invalid label {key!r}: {exc.reason}") from None
        if k != key.strip():  # an "=" inside the key would silently become another label
            raise BadRequest(f"invalid label key {key!r}")
        if k in out:
            raise BadRequest(f"label {k!r} is given twice (after trimming whitespace)")
        out[k] = v
    return out


def infra_link(labels: dict[str, str]) -> dict[str, str]:
    """The NodeRecord fields linking a provisioned node to its infra, from the labels of
    the token the engine made for it (TAG_NODE names the node; {} for any other token)."""
    node = labels.get(TAG_NODE, "")
    if not node:
        return {}
    return {"infra": labels.get(LABEL_INFRA, ""), "group": labels.get(LABEL_GROUP, ""),
            "infra_node": node}


def token_id_of(token: str) -> str | None:
    parsed = parse_join_token(bare_token(token))
    return parsed.token_id if parsed else None


def make_node_id(hostname: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:40] or "node"
    return f"{base}-{secrets.token_hex(3)}"


class Enrollment:
    """Turns an EnrollRequest into a node record, a NATS identity and a reply.

    An identity (nkey) is bound to one node: a request must prove it holds the key (its
    signature), and an nkey that belongs to an enrolled node is only accepted again for
    that node's own retry (the token it enrolled with)."""

    def __init__(
        self,
        *,
        tokens: TokenService,
        nodes: Table[NodeRecord],
        admission: NodeAdmission,
        inbox_prefix: Callable[[str], str],
        heartbeat_interval: float,
        metrics_interval: float,
        command_keys: list[str],
        key_seq: Callable[[], int] = lambda: 0,
        in_network: Callable[[NodeRecord], bool] = lambda _node: False,
        has_apps: Callable[[NodeRecord], bool] = lambda _node: True,
    ) -> None:
        self._tokens = tokens
        self._nodes = nodes
        self._admission = admission
        self._inbox_prefix = inbox_prefix
        self._hb = heartbeat_interval
        self._mi = metrics_interval
        self._command_keys = command_keys
        # The rotation step command_keys result from (the agent's key ring starts there).
        self._key_seq = key_seq
        # Whether a node is in an overlay network (its agent starts the overlay at once).
        self._in_network = in_network
        # Whether app releases are assigned to a node (its agent asks for them at start).
        self._has_apps = has_apps
        # nkey -> node id, fed by the nodes table (every controller's enrollments, removals)
        self._by_identity: dict[str, str] = {}
        self._identity_of: dict[str, str] = {}
        # nkey -> token id of an enrollment in flight here (the table learns of it later)
        self._claims: dict[str, str] = {}
        for node in nodes:
            self._index(node.id, node)
        self._unsubscribe = nodes.subscribe(self._index)

    def close(self) -> None:
        self._unsubscribe()

    def _index(self, node_id: str, node: NodeRecord | None) -> None:
        old = self._identity_of.pop(node_id, None)
        if old is not None and self._by_identity.get(old) == node_id:
            del self._by_identity[old]
        if node is not None and node.identity:
            self._identity_of[node_id] = node.identity
            self._by_identity[node.identity] = node_id

    async def enroll(self, req: EnrollRequest) -> EnrollReply:
        if not _NKEY_RE.match(req.identity):
            return self._refuse("bad_request", "identity must be a NATS user nkey (U...)")
        try:
            verify_enroll(req)
        except BadIdentityProof as exc:
            log.warning("enrollment of %r refused: %s", req.hostname[:64], exc.reason)
            return self._refuse(exc.code, exc.reason)
        if len(req.reply_key) != 32:
            return self._refuse(
                "bad_request", "enroll request has no 32-byte reply_key to seal the answer "
                "to (an agent older than the controller? upgrade it)")
        try:
            agent_labels = parse_labels([f"{k}={v}" for k, v in req.labels.items()])
        except ValueError as exc:
            return self._refuse("bad_request", f"invalid agent label: {exc}")
        token_id = token_id_of(req.token)
        owner = self._by_identity.get(req.identity)
        owner_rec = self._nodes.get(owner) if owner is not None else None
        claim = self._claims.get(req.identity)
        if (owner_rec is not None and owner_rec.token_id != token_id) or (
            claim is not None and claim != token_id
        ):
            log.warning("enrollment of %r refused: its identity belongs to node %s",
                        req.hostname[:64], owner or "(enrolling)")
            return self._refuse(
                "identity_collision",
                "this identity key already belongs to an enrolled node; a machine that "
                "enrolls again with a new token needs a new identity (remove the agent's "
                "state dir) or the old node removed first",
            )
        if claim is None:
            self._claims[req.identity] = token_id or ""
        try:
            return await self._enroll(req, agent_labels)
        finally:
            if claim is None:
                self._claims.pop(req.identity, None)

    async def _enroll(self, req: EnrollRequest, agent_labels: dict[str, str]) -> EnrollReply:
        node_id = make_node_id(req.hostname)
        try:
            token = await self._tokens.consume(
                req.token, node_id=node_id, identity=req.identity, hostname=req.hostname)
        except TokenRefused as exc:
            log.warning("enrollment of %r refused: %s", req.hostname[:64], exc.code)
            return self._refuse(exc.code, exc.message)
        node_id = token.used_by  # the same node on an idempotent retry (or the bound name)
        existing = self._nodes.get(node_id)
        if existing is not None and existing.token_id != token.id:
            # A bound name already taken by a node that joined with another token (a VM
            # made again under the same name): that node must be removed first.
            return self._refuse(
                "node_exists", f"node {node_id} already exists (enrolled with another "
                "token); delete it first (`barista nodes delete`)")
        if existing is not None and existing.revoked:
            return self._refuse("revoked", f"node {node_id} was revoked")
        if existing is not None:
            # A retry after a failed reply: make sure the identity really is admitted.
            await self._admission.admit(NodeAccess(node_id=node_id, nkey=req.identity))
        if existing is None:
            now = time.time()
            link = infra_link(token.labels)
            record = NodeRecord(
                id=node_id,
                hostname=req.hostname[:255],
                identity=req.identity,
                labels={k: v for k, v in {**agent_labels, **token.labels}.items()
                        if k != TAG_NODE},
                facts=bounded_facts(req.facts),
                status="online",
                enrolled_at=now,
                last_seen=now,
                status_changed_at=now,
                agent_version=req.agent_version[:64],
                wg_public_key=req.wg_public_key[:64],
                token_id=token.id,
                infra=link.get("infra", ""),
                group=link.get("group", ""),
                infra_node=link.get("infra_node", ""),
            )
            await self._admission.admit(NodeAccess(node_id=node_id, nkey=req.identity))
            try:
                await self._nodes.create(node_id, record)
            except Conflict:
                record = self._nodes.get(node_id) or record
            existing = record
            log.info("node %s enrolled (token %s, labels %s)", node_id, token.id, record.labels)
        try:
            nats_jwt = await self._admission.credentials(
                NodeAccess(node_id=node_id, nkey=req.identity))
        except RevokedUser:
            return self._refuse("revoked", f"node {node_id}'s identity was revoked")
        return EnrollReply(
            ok=True,
            node_id=node_id,
            labels=existing.labels,
            auth="nkey" if self._admission.managed else "none",
            inbox_prefix=self._inbox_prefix(node_id),
            heartbeat_interval=self._hb,
            metrics_interval=self._mi,
            command_keys=self._command_keys,
            key_seq=self._key_seq(),
            nats_jwt=nats_jwt,
            mesh=self._in_network(existing),
            mesh_invites=True,
            apps=self._has_apps(existing),
        )

    async def renew(self, req: RenewRequest) -> RenewReply:
        """A fresh user JWT for a node that proves its identity nkey (``req``'s signature);
        refused for a node that was revoked or deleted, or another node's key."""
        try:
            verify_renew(req)
        except BadIdentityProof as exc:
            return RenewReply(ok=False, error_code=exc.code, error=exc.reason)
        node = self._nodes.get(req.node_id)
        if node is None or node.identity != req.identity:
            return RenewReply(ok=False, error_code="not_found",
                              error=f"no node {req.node_id!r} with this identity")
        if node.revoked:
            return RenewReply(ok=False, error_code="revoked",
                              error=f"node {req.node_id} was revoked")
        try:
            token = await self._admission.credentials(
                NodeAccess(node_id=node.id, nkey=node.identity))
        except RevokedUser:
            return RenewReply(ok=False, error_code="revoked",
                              error=f"node {req.node_id}'s identity was revoked")
        if not token:
            return RenewReply(ok=False, error_code="not_managed",
                              error="this NATS is not in operator mode: nothing to renew")
        return RenewReply(ok=True, nats_jwt=token)

    @staticmethod
    def _refuse(code: str, message: str) -> EnrollReply:
        return EnrollReply(ok=False, error_code=code, error=message)
