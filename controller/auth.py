"""API tokens, roles and scopes: who may call the REST API, and on which nodes.

A token has a role (``viewer`` < ``operator`` < ``admin``; each allows what the lower ones
do) and optionally a scope, a label selector: a scoped token can only see and act on the
nodes its scope matches. Named tokens live in the ``api_tokens`` KV bucket with only the
sha256 of their secret (a 256-bit random value, so an unsalted hash is enough); the
``api-token`` file in the data dir is the bootstrap admin token and is never stored here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import msgspec

from controller.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from controller.state.table import Table
from protocol.errors import SelectorError
from protocol.selectors import Selector

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
RANK: dict[str, int] = {role: i for i, role in enumerate(ROLES)}
BOOTSTRAP_NAME = "bootstrap"
TOKEN_PREFIX = "brt_"
MAX_TTL = 10 * 365 * 86400.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiToken(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A named API token as stored: never the secret, only its sha256."""

    name: str
    role: Role
    secret_sha256: str
    scope: str = ""
    created_at: float
    created_by: str = ""
    expires_at: float = 0.0  # 0: never
    revoked_at: float = 0.0

    def state(self, now: float) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= now:
            return "expired"
        return "valid"

    def public(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role,
            "scope": self.scope,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at or None,
            "revoked_at": self.revoked_at or None,
            "state": self.state(now),
        }


@dataclass(frozen=True)
class Principal:
    """Who calls: a token's name, its role and its scope (empty: every node)."""

    name: str
    role: Role
    scope: Selector = field(default_factory=Selector)

    def allows(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]

    def require(self, role: Role, what: str) -> None:
        if not self.allows(role):
            raise Forbidden(f"{what} needs role {role}; token {self.name!r} has role "
                            f"{self.role}")

    @property
    def scoped(self) -> bool:
        return not self.scope.is_empty

    def sees(self, labels: dict[str, str]) -> bool:
        """Whether a node with these labels is within this principal's scope."""
        return self.scope.matches(labels)

    def covers(self, selector_text: str) -> bool:
        """Whether everything ``selector_text`` selects is inside the scope, judged by its
        requirements: it must carry each of the scope's (what narrow() makes). An
        unscoped principal covers everything; a scoped one never covers an unscoped job
        or app."""
        return covers(self.scope, selector_text)

    def narrow(self, selector: Selector) -> Selector:
        return narrow(selector, self.scope)

    def check_sees(self, labels: dict[str, str], what: str) -> None:
        if not self.sees(labels):
            raise Forbidden(f"{what} is outside the scope {self.scope} of token "
                            f"{self.name!r}")


def covers(scope: Selector, selector_text: str) -> bool:
    """Whether ``selector_text`` carries every requirement of ``scope`` (so it selects
    nothing outside it); an empty scope covers everything."""
    if scope.is_empty:
        return True
    try:
        have = set(Selector.parse(selector_text).requirements)
    except SelectorError:
        return False
    return set(scope.requirements) <= have


def check_covers(scope: Selector, selector_text: str, what: str) -> None:
    if not covers(scope, selector_text):
        raise Forbidden(f"{what} reaches beyond the scope {scope} of this API token")


def narrow(selector: Selector, scope: Selector) -> Selector:
    """The intersection of two selectors (comma is AND): what both select."""
    reqs = list(selector.requirements)
    reqs += [r for r in scope.requirements if r not in reqs]
    return Selector(tuple(reqs))


def parse_scope(text: str) -> Selector:
    try:
        return Selector.parse(text)
    except SelectorError as exc:
        raise BadRequest(f"scope {text!r} is not a label selector: {exc}") from None


@dataclass(frozen=True)
class IssuedApiToken:
    record: ApiToken
    secret: str


class ApiTokens:
    """Named API tokens over their Table, plus the bootstrap admin token."""

    def __init__(self, table: Table[ApiToken], *, bootstrap: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._bootstrap = bootstrap
        self._clock = clock

    def authenticate(self, secret: str) -> Principal:
        """The principal of a presented secret; Unauthorized says why not."""
        if not secret:
            raise Unauthorized(
                "missing API token: send 'Authorization: Bearer <token>' (the bootstrap "
                "token is in the controller's data dir, file api-token)")
        if hmac.compare_digest(secret.encode(), self._bootstrap.encode()):
            return Principal(name=BOOTSTRAP_NAME, role="admin")
        want = digest(secret)
        for rec in self._table:
            if hmac.compare_digest(rec.secret_sha256, want):
                state = rec.state(self._clock())
                if state != "valid":
                    raise Unauthorized(f"API token {rec.name!r} is {state}; ask an admin "
                                       "for a new one ('Authorization: Bearer <token>')")
                return Principal(name=rec.name, role=rec.role, scope=Selector.parse(rec.scope))
        raise Unauthorized("unknown API token: send 'Authorization: Bearer <token>' with a "
                           "token from `barista auth token create` or the data dir's "
                           "api-token file")

    async def create(self, *, name: str, role: str, scope: str = "", ttl: float | None = None,
                     created_by: str = "") -> IssuedApiToken:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BOOTSTRAP_NAME:
            raise BadRequest(f"token name {name!r}: 1-64 letters, digits, '-' or '_' "
                             f"(not {BOOTSTRAP_NAME!r})")
        if role not in ROLES:
            raise BadRequest(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(scope, str):
            raise BadRequest("scope must be a label selector string")
        sel = parse_scope(scope)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or not 0 < ttl <= MAX_TTL):
            raise BadRequest(f"ttl must be a number of seconds between 0 and {int(MAX_TTL)}")
        now = self._clock()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = ApiToken(name=name, role=role, secret_sha256=digest(secret), scope=str(sel),
                          created_at=now, created_by=created_by,
                          expires_at=now + ttl if ttl else 0.0)
        existing = self._table.get(name)
        if existing is not None and existing.state(now) == "valid":
            raise Conflict(f"API token {name!r} exists; revoke it first")
        if existing is None:
            await self._table.create(name, record)
        else:
            await self._table.update(name, record, revision=self._table.revision(name))
        return IssuedApiToken(record=record, secret=secret)

    def all(self) -> list[ApiToken]:
        return sorted(self._table, key=lambda t: t.created_at)

    async def revoke(self, name: str) -> ApiToken:
        now = self._clock()

        def revoke(cur: ApiToken) -> ApiToken | None:
            if cur.revoked_at:
                return None
            return msgspec.structs.replace(cur, revoked_at=now)

        if self._table.get(name) is None:
            raise NotFound(f"API token {name!r} not found")
        rec = await self._table.mutate(name, revoke)
        assert rec is not None  # mutate returns the stored record when fn declines
        return rec

    def now(self) -> float:
        return self._clock()
