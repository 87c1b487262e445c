"""NATS operator mode: the trust material in a data dir, the server's config for it, user
JWTs, and account updates (revocations) pushed to a running server.

At first start ``OperatorTrust.load_or_create`` makes an operator key, a system account, the
fleet account and an account *signing* key (nkey seeds in 0600 files in a 0700 dir; no seed
is ever logged or put in an exception), and signs the operator's and both accounts' JWTs;
later starts load them. The server then needs no user list at all: every identity is a user
JWT, signed here for an nkey, and checked by the server against the account it names.
Admitting a node is signing a JWT — no config change, no reload.

The fleet account's JWT (``fleet.jwt`` in the trust dir) carries its revocations. With a
controller's state in JetStream their record is shared by every controller of the
deployment (controller.nats.account: KV, compare-and-set, merged here by ``merge``); the
trust dir's copy is this controller's cache of it. A revocation re-signs the JWT and is
pushed on ``$SYS.REQ.CLAIMS.UPDATE`` (as a system-account user); the server closes the
revoked users' connections at once, refuses their JWTs from then on, and keeps the account
JWT in its full resolver dir (``allow_delete: false``), so the revocation survives
restarts. The JWT is written here before it is pushed, and the rendered config preloads the
current one, so a push that fails is applied at the next server start.

A revocation refuses every JWT of that key issued at or before it — not JWTs signed later,
so ``user_jwt`` refuses to sign for a revoked key (renewal of a revoked node fails here).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from controller.nats import jwt

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = logging.getLogger("barista.controller.nats.operator")

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
# The other subjects nats-server takes an account JWT update on (the account's own).
ACCOUNT_CLAIMS_UPDATES = ("$SYS.REQ.ACCOUNT.{}.CLAIMS.UPDATE", "$SYS.ACCOUNT.{}.CLAIMS.UPDATE")
# Short-lived node credentials (issue 10): renewed by the agent well before expiry.
DEFAULT_USER_TTL = 24 * 3600.0

Which = Literal["fleet", "system"]
# What a trust dir holds (seeds 0600; the JWTs are no secret but kept 0600 too).
TRUST_FILES = (
    "operator.seed", "system.seed", "fleet.seed", "fleet-signing.seed",
    "operator.jwt", "system.jwt", "fleet.jwt",
)


class TrustError(RuntimeError):
    """The trust dir is unusable (a key or JWT that does not match, a bad permission)."""


class RevokedUser(TrustError):
    """Refusing to sign a JWT for a revoked user key."""


class ClaimsUpdateFailed(RuntimeError):
    """nats-server refused an account JWT update (its error description is the message)."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """A user's subject permissions as plain allow/deny lists (an empty allow list allows
    everything not denied, as in nats-server). ``responses``: how many replies the user
    may publish to the reply subject of each request it receives (None: no such right)."""

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    responses: int | None = None
    responses_ttl: float = 0.0

    @classmethod
    def from_config(cls, perms: Mapping[str, Any]) -> Permissions:
        """From the ``permissions`` block of a config user (``{"publish": {"allow": [...],
        "deny": [...]}, "subscribe": {...}}``, as server.node_permissions builds it)."""
        pub = perms.get("publish", {}) or {}
        sub = perms.get("subscribe", {}) or {}
        return cls(
            pub_allow=tuple(pub.get("allow", ())),
            pub_deny=tuple(pub.get("deny", ())),
            sub_allow=tuple(sub.get("allow", ())),
            sub_deny=tuple(sub.get("deny", ())),
        )


@dataclass(frozen=True, slots=True)
class UserCreds:
    """A user whose seed was made here: its public key, JWT and .creds text (secret)."""

    public_key: str
    jwt: str
    creds: str

    def __repr__(self) -> str:  # never the seed
        return f"UserCreds(public_key={self.public_key!r})"


@dataclass(frozen=True, slots=True)
class ClaimsUpdate:
    """nats-server's answer to an account JWT update."""

    account: str
    code: int
    message: str


def _write_private(path: Path, data: bytes) -> None:
    # Atomic (a crash leaves the old file or the new one) and 0600 from the first byte.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_private(path: Path) -> bytes:
    st = path.stat()
    if st.st_mode & 0o077:
        raise TrustError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600")
    return path.read_bytes().strip()


class OperatorTrust:
    """The operator, its system account and the fleet account of one data dir.

    ``nats_dir`` is the embedded server's data dir: the keys and JWTs live in
    ``<nats_dir>/trust`` (0700), the server's resolver in ``<nats_dir>/jwt``."""

    def __init__(
        self,
        nats_dir: Path,
        *,
        seeds: dict[str, bytes],
        operator_jwt: str,
        system_jwt: str,
        fleet_jwt: str,
        clock: Callable[[], float],
    ) -> None:
        self.nats_dir = nats_dir
        self._seeds = seeds
        self._issuers: dict[str, jwt.Issuer] = {}  # seed name -> its key pair, derived once
        self._clock = clock
        self.operator_jwt = operator_jwt
        self.system_jwt = system_jwt
        self._fleet_jwt = fleet_jwt
        self._fleet = jwt.decode(fleet_jwt, jwt.AccountClaims, check_time=False)
        self.operator_key = jwt.public_key(seeds["operator"])
        self.system_account = jwt.public_key(seeds["system"])
        self.fleet_account = jwt.public_key(seeds["fleet"])
        self.fleet_signing_key = jwt.public_key(seeds["fleet-signing"])

    def __repr__(self) -> str:
        return f"OperatorTrust(operator={self.operator_key!r}, fleet={self.fleet_account!r})"

    # -- the data dir ----------------------------------------------------------------

    @staticmethod
    def trust_dir(nats_dir: Path) -> Path:
        return Path(nats_dir) / "trust"

    @staticmethod
    def resolver_dir(nats_dir: Path) -> Path:
        return Path(nats_dir) / "jwt"

    @classmethod
    def load_or_create(
        cls,
        nats_dir: Path,
        *,
        name: str = "barista",
        clock: Callable[[], float] = time.time,
    ) -> OperatorTrust:
        """The trust of ``nats_dir``, made at first start (keys and JWTs that are missing
        are made; ones that exist are kept, and checked against each other)."""
        nats_dir = Path(nats_dir).resolve()
        tdir = cls.trust_dir(nats_dir)
        tdir.mkdir(parents=True, exist_ok=True)
        os.chmod(tdir, 0o700)
        kinds: dict[str, jwt.KeyKind] = {
            "operator": "operator",
            "system": "account",
            "fleet": "account",
            "fleet-signing": "account",
        }
        seeds: dict[str, bytes] = {}
        for role, kind in kinds.items():
            path = tdir / f"{role}.seed"
            if path.exists():
                seeds[role] = _read_private(path)
            else:
                seeds[role] = jwt.new_seed(kind)
                _write_private(path, seeds[role])
                log.info("made the NATS %s key (%s)", role, jwt.public_key(seeds[role]))
            try:
                if not jwt.is_public_key(jwt.public_key(seeds[role]), kind):
                    raise ValueError
            except Exception:
                raise TrustError(f"{path} is not a NATS {kind} seed") from None

        operator_pub = jwt.public_key(seeds["operator"])
        system_pub = jwt.public_key(seeds["system"])
        fleet_pub = jwt.public_key(seeds["fleet"])
        signing_pub = jwt.public_key(seeds["fleet-signing"])

        def load_jwt(role: str, kind: type[jwt.C], subject: str) -> str | None:
            path = tdir / f"{role}.jwt"
            try:
                token = path.read_text().strip()
            except FileNotFoundError:
                return None
            try:
                claims = jwt.decode(token, kind, check_time=False)
            except jwt.JwtError as exc:
                raise TrustError(f"{path}: {exc}") from None
            if claims.sub != subject or claims.iss != operator_pub:
                raise TrustError(f"{path} does not belong to this operator's keys")
            return token

        operator_jwt = load_jwt("operator", jwt.OperatorClaims, operator_pub)
        op = jwt.operator_claims(operator_pub, name=name, system_account=system_pub)
        if operator_jwt is None or (
            jwt.decode(operator_jwt, jwt.OperatorClaims, check_time=False).nats.system_account
            != system_pub
        ):
            operator_jwt = jwt.encode(op, seeds["operator"], clock=clock)
            _write_private(tdir / "operator.jwt", operator_jwt.encode())

        system_jwt = load_jwt("system", jwt.AccountClaims, system_pub)
        if system_jwt is None:
            sys_claims = jwt.account_claims(system_pub, name="SYS")
            system_jwt = jwt.encode(sys_claims, seeds["operator"], clock=clock)
            _write_private(tdir / "system.jwt", system_jwt.encode())

        fleet_jwt = load_jwt("fleet", jwt.AccountClaims, fleet_pub)
        if fleet_jwt is None:
            fleet = jwt.account_claims(
                fleet_pub,
                name=name,
                limits=jwt.account_limits(jetstream=True),
                signing_keys=[signing_pub],
            )
            fleet_jwt = jwt.encode(fleet, seeds["operator"], clock=clock)
            _write_private(tdir / "fleet.jwt", fleet_jwt.encode())
        elif (
            signing_pub
            not in jwt.decode(fleet_jwt, jwt.AccountClaims, check_time=False).nats.signing_keys
        ):
            raise TrustError(f"{tdir / 'fleet.jwt'} does not list this dir's signing key")

        return cls(
            nats_dir,
            seeds=seeds,
            operator_jwt=operator_jwt,
            system_jwt=system_jwt,
            fleet_jwt=fleet_jwt,
            clock=clock,
        )

    @classmethod
    def load(cls, nats_dir: Path, *, clock: Callable[[], float] = time.time) -> OperatorTrust:
        """The trust ``barista nats init`` wrote into ``nats_dir`` (nothing is made here: a
        new operator would be one the deployment's servers do not know)."""
        tdir = cls.trust_dir(Path(nats_dir))
        missing = [name for name in TRUST_FILES if not (tdir / name).exists()]
        if missing:
            raise TrustError(
                f"{tdir} holds no NATS trust (missing {', '.join(missing)}); make it with "
                f"`barista nats init --out {nats_dir}`")
        return cls.load_or_create(nats_dir, clock=clock)

    # -- the server's config ---------------------------------------------------------

    def server_config(self, *, resolver_dir: Path | str | None = None) -> dict[str, object]:
        """The operator-mode part of nats-server's config (merge it into the rest; nats-server
        reads JSON). There must be no ``authorization``, ``accounts`` or ``no_auth_user``
        next to it: operator mode refuses config users. The full resolver keeps account
        JWTs (and so revocations) in ``<nats_dir>/jwt``; the preload brings the current
        ones at every start (an older preload never replaces a newer stored JWT).
        ``resolver_dir``: where the server keeps account JWTs (default ``<nats_dir>/jwt``)."""
        return {
            "operator": self.operator_jwt,
            "system_account": self.system_account,
            "resolver": resolver_block(
                self.resolver_dir(self.nats_dir) if resolver_dir is None else resolver_dir),
            "resolver_preload": {
                self.system_account: self.system_jwt,
                self.fleet_account: self._fleet_jwt,
            },
        }

    # -- users -----------------------------------------------------------------------

    def user_jwt(
        self,
        public_key: str,
        *,
        name: str,
        permissions: Permissions,
        ttl: float | None = DEFAULT_USER_TTL,
        account: Which = "fleet",
        bearer: bool = False,
    ) -> str:
        """A user JWT for ``public_key`` (an nkey whose seed its owner keeps: it proves it by
        signing the server's nonce). Fleet users are signed with the account's signing key,
        system users with the system account's key. ``ttl`` None: no expiry. ``bearer``:
        the server checks no nonce signature (jwt.user_claims)."""
        if account == "fleet" and self.is_revoked(public_key):
            raise RevokedUser(f"user {public_key} is revoked")
        now = self._clock()
        resp = None
        if permissions.responses is not None:
            resp = jwt.ResponsePermission(
                max=permissions.responses, ttl=int(permissions.responses_ttl * 1e9)
            )
        claims = jwt.user_claims(
            public_key,
            name=name,
            pub_allow=permissions.pub_allow,
            pub_deny=permissions.pub_deny,
            sub_allow=permissions.sub_allow,
            sub_deny=permissions.sub_deny,
            resp=resp,
            expires=0 if ttl is None else int(now + ttl),
            issuer_account=self.fleet_account if account == "fleet" else "",
            bearer=bearer,
        )
        return jwt.encode(claims, self._issuer("fleet-signing" if account == "fleet"
                                               else "system"), issued_at=int(now))

    def _issuer(self, name: str) -> jwt.Issuer:
        """The key pair of seed ``name``, derived once (it signs every node's JWT)."""
        issuer = self._issuers.get(name)
        if issuer is None:
            issuer = self._issuers[name] = jwt.Issuer(self._seeds[name])
        return issuer

    def new_user(
        self,
        *,
        name: str,
        permissions: Permissions,
        ttl: float | None = None,
        account: Which = "fleet",
    ) -> UserCreds:
        """A user whose nkey is made here (the controller's own users, the system user):
        the .creds text holds the seed, so it is a secret. ``ttl`` None: no expiry."""
        seed = jwt.new_seed("user")
        public = jwt.public_key(seed)
        token = self.user_jwt(public, name=name, permissions=permissions, ttl=ttl, account=account)
        return UserCreds(public_key=public, jwt=token, creds=jwt.format_creds(token, seed))

    def system_user(self, *, name: str = "barista-sys") -> UserCreds:
        """A system-account user (server state, account updates), unrestricted there."""
        return self.new_user(name=name, permissions=Permissions(), account="system")

    # -- the fleet account and revocations --------------------------------------------

    @property
    def fleet_jwt(self) -> str:
        return self._fleet_jwt

    @property
    def revocations(self) -> dict[str, int]:
        return dict(self._fleet.nats.revocations)

    def is_revoked(self, public_key: str) -> bool:
        return public_key in self._fleet.nats.revocations or "*" in self._fleet.nats.revocations

    @property
    def signing_keys(self) -> list[str]:
        """The fleet account's signing keys (this dir's, and any another controller shared)."""
        return list(self._fleet.nats.signing_keys)

    def merge(self, revocations: Mapping[str, int], signing_keys: Iterable[str] = ()) -> bool:
        """Take in the fleet account state other controllers shared (controller.nats.account):
        the union of revocations (the later time of each key: a revocation is never dropped
        or moved into the past) and of signing keys. Re-signs and writes the account JWT
        when that changes anything; True then (push it with ``push_fleet``)."""
        revs = dict(self._fleet.nats.revocations)
        for key, when in revocations.items():
            if key != "*" and not jwt.is_public_key(key, "user"):
                log.warning("ignoring a shared revocation of %r: not a public user nkey", key)
                continue
            revs[key] = max(revs.get(key, 0), int(when))
        keys = set(self._fleet.nats.signing_keys)
        for key in signing_keys:
            if jwt.is_public_key(key, "account"):
                keys.add(key)
            else:
                log.warning("ignoring a shared signing key %r: not a public account nkey", key)
        if revs == self._fleet.nats.revocations and keys == set(self._fleet.nats.signing_keys):
            return False
        self._resign_fleet(revs, sorted(keys))
        return True

    def revoke(self, *public_keys: str) -> str:
        """Revoke users of the fleet account (every JWT of theirs issued until now) and
        return the re-signed account JWT, already written to the trust dir; push it with
        ``push_fleet``. One update for many keys: a batch is one push."""
        for key in public_keys:
            if not jwt.is_public_key(key, "user"):
                raise TrustError(f"{key!r} is not a public user nkey")
        now = int(self._clock())
        revs = dict(self._fleet.nats.revocations)
        for key in public_keys:
            # Never moved into the past (jwt's RevocationList.Revoke keeps the newer one).
            revs[key] = max(revs.get(key, 0), now)
        return self._resign_fleet(revs, self._fleet.nats.signing_keys)

    def lacks(self, account_jwt: str) -> bool | None:
        """Whether a fleet account JWT seen on the wire (someone's push) drops a revocation
        this trust holds (or moves one into the past); its own revocations are merged in
        first. None: not this operator's fleet account JWT (ignored)."""
        try:
            claims = jwt.decode(account_jwt, jwt.AccountClaims, check_time=False)
        except jwt.JwtError:
            return None
        if claims.sub != self.fleet_account or claims.iss != self.operator_key:
            return None
        theirs = claims.nats.revocations
        self.merge(theirs, claims.nats.signing_keys)
        return any(theirs.get(key, -1) < when for key, when in self.revocations.items())

    async def push_fleet(self, nc: NATS, *, wait: float = 5.0) -> ClaimsUpdate:
        """Push the current fleet account JWT (after ``revoke``, and at every controller
        start: a push that failed before is applied then)."""
        return await push_account_jwt(
            nc, self._fleet_jwt, operator_key=self.operator_key, wait=wait
        )

    def _resign_fleet(self, revocations: dict[str, int], signing_keys: list[str]) -> str:
        fleet = msgspec.structs.replace(
            self._fleet,
            nats=msgspec.structs.replace(self._fleet.nats, revocations=revocations,
                                         signing_keys=sorted(signing_keys)),
        )
        # iat must grow: the preload at a server start (saveIfNewer) keeps the stored JWT
        # when the new one's iat is older and skips it silently when the jti is the same --
        # and jti hashes only the standard claims, not the revocations, so two updates in
        # one second would look the same. (A push on $SYS.REQ.CLAIMS.UPDATE overwrites
        # whatever is stored, older or not.)
        iat = max(int(self._clock()), self._fleet.iat + 1)
        token = jwt.encode(fleet, self._seeds["operator"], issued_at=iat)
        _write_private(self.trust_dir(self.nats_dir) / "fleet.jwt", token.encode())
        self._fleet_jwt = token
        self._fleet = jwt.decode(token, jwt.AccountClaims, check_time=False)
        return token


def resolver_block(directory: Path | str) -> dict[str, object]:
    """A full resolver in ``directory``: every account JWT kept there (revocations too,
    never deleted), synced with the other servers of a cluster every 2 minutes."""
    return {"type": "full", "dir": str(directory), "allow_delete": False, "interval": "2m"}


async def push_account_jwt(
    nc: NATS, account_jwt: str, *, operator_key: str, wait: float = 5.0
) -> ClaimsUpdate:
    """Send an account JWT to the server(s) on ``$SYS.REQ.CLAIMS.UPDATE``; ``nc`` is a
    nats-py client connected as a system-account user. The server answers
    ``{"server": {...}, "data": {"account", "code": 200, "message": "jwt updated"}}`` or
    ``{"server": {...}, "error": {"account", "code": 500, "description"}}`` (raised as
    ``ClaimsUpdateFailed``). In a cluster every server with a full resolver answers; the
    first answer is returned (the resolvers also sync among themselves).

    Checked here first: the JWT must be an account JWT signed by ``operator_key``. The
    server stores any decodable account JWT pushed there -- one signed by another operator
    too, answering "jwt updated", after which the account refuses every user until a good
    JWT is pushed again -- so a system user is as strong as the operator key."""
    try:
        claims = jwt.decode(account_jwt, jwt.AccountClaims, check_time=False)
    except jwt.JwtError as exc:
        raise TrustError(f"not an account JWT: {exc}") from None
    if claims.iss != operator_key:
        raise TrustError(f"account JWT of {claims.sub} is not signed by operator {operator_key}")
    msg = await nc.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=wait)
    answer = msgspec.json.decode(msg.data)
    if not isinstance(answer, dict):
        raise ClaimsUpdateFailed(f"unexpected answer to a claims update: {msg.data[:200]!r}")
    err = answer.get("error")
    if err:
        raise ClaimsUpdateFailed(str(err.get("description", err)))
    data = answer.get("data") or {}
    return ClaimsUpdate(
        account=str(data.get("account", "")),
        code=int(data.get("code", 0)),
        message=str(data.get("message", "")),
    )


def permissions_of(
    *,
    pub_allow: Iterable[str] = (),
    pub_deny: Iterable[str] = (),
    sub_allow: Iterable[str] = (),
    sub_deny: Iterable[str] = (),
) -> Permissions:
    """``Permissions`` from any iterables (lists from ``Subjects``, generators, ...)."""
    return Permissions(
        pub_allow=tuple(pub_allow),
        pub_deny=tuple(pub_deny),
        sub_allow=tuple(sub_allow),
        sub_deny=tuple(sub_deny),
    )
