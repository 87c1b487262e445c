"""NATS JWTs in the nats-io/jwt v2 format: typed claims, encoding, signing, verification.

Pure: no I/O, no state; the clock is a keyword argument. The format follows
github.com/nats-io/jwt/v2 (claims.go, user_claims.go, account_claims.go,
operator_claims.go) so that nats-server accepts what is signed here:

- ``header.payload.signature``, each part base64url without padding; the header is
  ``{"typ":"JWT","alg":"ed25519-nkey"}``; the signature is Ed25519 (the issuer's nkey) over
  the ASCII of ``header.payload``.
- The standard claims (aud, exp, jti, iat, iss, name, nbf, sub) and the type-specific part
  under ``nats`` (with ``type`` and ``version: 2``).
- ``jti`` is the base32 (no padding) of SHA-512/256 over the JSON of the standard claims
  with ``jti`` empty (jwt v2; v1 used SHA-256). The server does not check it, but the
  full resolver skips an update whose ``jti`` equals the stored one.

Struct defaults are Go's zero values and zero values are omitted, exactly like Go's
``omitempty`` (``type`` and ``version`` too: ``encode`` sets them, as jwt's Encode does):
a missing field decodes to the same zero the Go code sees. "Unlimited" is ``NO_LIMIT``
(-1) and must be asked for; the builders (``user_claims``, ``account_claims``,
``operator_claims``) start from the same defaults as ``jwt.NewUserClaims`` and friends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

NO_LIMIT = -1
JWT_VERSION = 2
HEADER = b'{"typ":"JWT","alg":"ed25519-nkey"}'

KeyKind = Literal["operator", "account", "user"]
_PREFIX: dict[str, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}


class JwtError(ValueError):
    """A token that is malformed, wrongly signed or of the wrong kind."""


class JwtBadSignature(JwtError):
    pass


class JwtExpired(JwtError):
    pass


class JwtNotYetValid(JwtError):
    pass


# -- nkeys -------------------------------------------------------------------------------


def new_seed(kind: KeyKind) -> bytes:
    """A fresh nkey seed ("SO…", "SA…", "SU…") for an operator, account or user."""
    return bytes(nkeys.encode_seed(os.urandom(32), _PREFIX[kind]))


def public_key(seed: bytes | bytearray | str) -> str:
    """The public nkey ("O…", "A…", "U…") of a seed."""
    kp = nkeys.from_seed(bytearray(seed.encode() if isinstance(seed, str) else seed))
    try:
        return str(kp.public_key.decode())
    finally:
        kp.wipe()


def _sign(seed: bytes | bytearray | str, data: bytes) -> bytes:
    kp = nkeys.from_seed(bytearray(seed.encode() if isinstance(seed, str) else seed))
    try:
        return bytes(kp.sign(data))
    finally:
        kp.wipe()


def sign(seed: bytes | bytearray | str, data: bytes) -> bytes:
    """The Ed25519 signature of ``data`` by ``seed`` (a server's nonce, for instance)."""
    return _sign(seed, data)


def public_key_bytes(key: str, kind: KeyKind | None = None) -> bytes:
    """The raw Ed25519 key inside a public nkey, checked (prefix byte, CRC16); ``JwtError``
    if it is not a public nkey (of ``kind``, when given)."""
    try:
        raw = base64.b32decode(key.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise JwtError(f"{key!r} is not a base32 nkey") from None
    if len(raw) != 35:
        raise JwtError(f"{key!r} is not a public nkey")
    # nkeys' CRC16 is XMODEM's, which binascii computes in C (nkeys.crc16 is a Python loop)
    if binascii.crc_hqx(raw[:33], 0) != int.from_bytes(raw[33:], "little"):
        raise JwtError(f"{key!r}: nkey checksum does not match")
    if kind is not None and raw[0] != _PREFIX[kind]:
        raise JwtError(f"{key!r} is not a public {kind} nkey")
    if kind is None and raw[0] not in _PREFIX.values():
        raise JwtError(f"{key!r} is not an operator, account or user nkey")
    return raw[1:33]


def is_public_key(key: str, kind: KeyKind) -> bool:
    try:
        public_key_bytes(key, kind)
    except JwtError:
        return False
    return True


# -- claims ------------------------------------------------------------------------------


class Permission(msgspec.Struct, omit_defaults=True, kw_only=True):
    allow: list[str] = []
    deny: list[str] = []


class ResponsePermission(msgspec.Struct, kw_only=True):
    """Lets a user answer requests it received (``max`` replies within ``ttl`` ns)."""

    max: int
    ttl: int


class User(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The ``nats`` part of a user JWT (jwt.User: permissions, limits, issuer_account)."""

    pub: Permission = msgspec.field(default_factory=Permission)
    sub: Permission = msgspec.field(default_factory=Permission)
    resp: ResponsePermission | None = None
    src: list[str] = []
    subs: int = 0
    data: int = 0
    payload: int = 0
    bearer_token: bool = False
    allowed_connection_types: list[str] = []
    issuer_account: str = ""
    tags: list[str] = []
    type: str = ""
    version: int = 0


class OperatorLimits(msgspec.Struct, omit_defaults=True, kw_only=True):
    """An account's limits (jwt.OperatorLimits: NATS, account and JetStream limits). JetStream
    is on for the account when ``mem_storage`` or ``disk_storage`` is not 0."""

    subs: int = 0
    data: int = 0
    payload: int = 0
    imports: int = 0
    exports: int = 0
    wildcards: bool = False
    disallow_bearer: bool = False
    conn: int = 0
    leaf: int = 0
    mem_storage: int = 0
    disk_storage: int = 0
    streams: int = 0
    consumer: int = 0
    max_ack_pending: int = 0
    mem_max_stream_bytes: int = 0
    disk_max_stream_bytes: int = 0
    max_bytes_required: bool = False


class Account(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The ``nats`` part of an account JWT. ``signing_keys``: unscoped account signing keys
    (users signed by one carry ``issuer_account``); ``revocations``: user public key (or
    "*") → unix time; every user JWT of that key issued at or before it is refused."""

    limits: OperatorLimits = msgspec.field(default_factory=OperatorLimits)
    signing_keys: list[str] = []
    revocations: dict[str, int] = {}
    description: str = ""
    tags: list[str] = []
    type: str = ""
    version: int = 0


class Operator(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The ``nats`` part of an operator JWT (self-signed)."""

    signing_keys: list[str] = []
    account_server_url: str = ""
    operator_service_urls: list[str] = []
    system_account: str = ""
    assert_server_version: str = ""
    strict_signing_key_usage: bool = False
    tags: list[str] = []
    type: str = ""
    version: int = 0


class _ClaimsData(msgspec.Struct, omit_defaults=True, kw_only=True):
    # jwt.ClaimsData, in its field order (the order of its JSON, which jti hashes).
    aud: str = ""
    exp: int = 0
    jti: str = ""
    iat: int = 0
    iss: str = ""
    name: str = ""
    nbf: int = 0
    sub: str = ""


class UserClaims(_ClaimsData, kw_only=True):
    nats: User = msgspec.field(default_factory=User)


class AccountClaims(_ClaimsData, kw_only=True):
    nats: Account = msgspec.field(default_factory=Account)


class OperatorClaims(_ClaimsData, kw_only=True):
    nats: Operator = msgspec.field(default_factory=Operator)


AnyClaims = UserClaims | AccountClaims | OperatorClaims
C = TypeVar("C", UserClaims, AccountClaims, OperatorClaims)

# Who may sign what (jwt's ExpectedPrefixes) and what the subject must be.
_ISSUER_KIND: dict[type[_ClaimsData], KeyKind] = {
    UserClaims: "account",
    AccountClaims: "operator",
    OperatorClaims: "operator",
}
_SUBJECT_KIND: dict[type[_ClaimsData], KeyKind] = {
    UserClaims: "user",
    AccountClaims: "account",
    OperatorClaims: "operator",
}
_CLAIM_TYPE: dict[type[_ClaimsData], str] = {
    UserClaims: "user",
    AccountClaims: "account",
    OperatorClaims: "operator",
}


def user_claims(
    subject: str,
    *,
    name: str = "",
    pub_allow: Iterable[str] = (),
    pub_deny: Iterable[str] = (),
    sub_allow: Iterable[str] = (),
    sub_deny: Iterable[str] = (),
    expires: int = 0,
    issuer_account: str = "",
    resp: ResponsePermission | None = None,
    src: Iterable[str] = (),
    bearer: bool = False,
) -> UserClaims:
    """A user's claims (what jwt.NewUserClaims starts from: no subscription, data or payload
    limit; no bearer token, so the server checks the nonce signature). An empty allow list
    allows everything not denied, as in nats-server. ``expires``: unix time, 0 = never.
    ``issuer_account``: the account's public key when signed by one of its signing keys.
    ``bearer``: the JWT alone admits (no nonce signature checked): only for a user whose
    seed is public anyway (the enroll identity)."""
    if not is_public_key(subject, "user"):
        raise JwtError(f"user subject {subject!r} is not a public user nkey")
    return UserClaims(
        sub=subject,
        name=name,
        exp=expires,
        nats=User(
            pub=Permission(allow=list(pub_allow), deny=list(pub_deny)),
            sub=Permission(allow=list(sub_allow), deny=list(sub_deny)),
            resp=resp,
            src=list(src),
            subs=NO_LIMIT,
            data=NO_LIMIT,
            payload=NO_LIMIT,
            bearer_token=bearer,
            issuer_account=issuer_account,
        ),
    )


def account_limits(*, jetstream: bool = False, conn: int = NO_LIMIT) -> OperatorLimits:
    """jwt.NewAccountClaims's limits (unlimited, JetStream off), with JetStream unlimited if
    ``jetstream`` (a zero storage limit is what turns it off)."""
    js = NO_LIMIT if jetstream else 0
    return OperatorLimits(
        subs=NO_LIMIT,
        data=NO_LIMIT,
        payload=NO_LIMIT,
        imports=NO_LIMIT,
        exports=NO_LIMIT,
        wildcards=True,
        conn=conn,
        leaf=NO_LIMIT,
        mem_storage=js,
        disk_storage=js,
        streams=js,
        consumer=js,
    )


def account_claims(
    subject: str,
    *,
    name: str = "",
    limits: OperatorLimits | None = None,
    signing_keys: Iterable[str] = (),
    revocations: dict[str, int] | None = None,
) -> AccountClaims:
    if not is_public_key(subject, "account"):
        raise JwtError(f"account subject {subject!r} is not a public account nkey")
    keys = sorted(signing_keys)  # jwt's SigningKeys.MarshalJSON sorts them
    for key in keys:
        if not is_public_key(key, "account"):
            raise JwtError(f"signing key {key!r} is not a public account nkey")
    return AccountClaims(
        sub=subject,
        name=name,
        nats=Account(
            limits=limits if limits is not None else account_limits(),
            signing_keys=keys,
            revocations=dict(revocations or {}),
        ),
    )


def operator_claims(
    subject: str,
    *,
    name: str = "",
    system_account: str = "",
    signing_keys: Iterable[str] = (),
    service_urls: Iterable[str] = (),
) -> OperatorClaims:
    if not is_public_key(subject, "operator"):
        raise JwtError(f"operator subject {subject!r} is not a public operator nkey")
    if system_account and not is_public_key(system_account, "account"):
        raise JwtError(f"system account {system_account!r} is not a public account nkey")
    keys = list(signing_keys)
    for key in keys:
        if not is_public_key(key, "operator"):
            raise JwtError(f"signing key {key!r} is not a public operator nkey")
    return OperatorClaims(
        sub=subject,
        name=name,
        nats=Operator(
            system_account=system_account,
            signing_keys=keys,
            operator_service_urls=list(service_urls),
        ),
    )


# -- encoding ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwtError("token part is not base64url") from None


def _go_json(obj: object) -> bytes:
    # Go's json.Marshal escapes <, > and & (HTML-safe); the jti hashes Go's bytes.
    return (
        msgspec.json.encode(obj)
        .replace(b"<", b"\\u003c")
        .replace(b">", b"\\u003e")
        .replace(b"&", b"\\u0026")
    )


def claims_hash(claims: AnyClaims) -> str:
    """The jti: base32 of SHA-512/256 over the standard claims with jti empty."""
    data = _ClaimsData(
        aud=claims.aud,
        exp=claims.exp,
        iat=claims.iat,
        iss=claims.iss,
        name=claims.name,
        nbf=claims.nbf,
        sub=claims.sub,
    )
    digest = hashlib.new("sha512_256", _go_json(data)).digest()
    return base64.b32encode(digest).rstrip(b"=").decode("ascii")


def _check_operator_signer(claims: AnyClaims, issuer: str) -> None:
    if isinstance(claims, OperatorClaims) and issuer not in (
        claims.sub,
        *claims.nats.signing_keys,
    ):
        raise JwtError("an operator JWT is signed by the operator or one of its signing keys")


class Issuer:
    """A key that signs many JWTs (the fleet account's signing key signs every node's): its
    key pair and public key are derived once, not at every JWT. Holds the key as long as
    its owner holds the seed; ``close()`` wipes it."""

    def __init__(self, seed: bytes | bytearray | str) -> None:
        self._kp = nkeys.from_seed(bytearray(seed.encode() if isinstance(seed, str) else seed))
        self.public = str(self._kp.public_key.decode())
        self._kinds: dict[KeyKind, bool] = {}

    def is_kind(self, kind: KeyKind) -> bool:
        ok = self._kinds.get(kind)
        if ok is None:
            ok = self._kinds[kind] = is_public_key(self.public, kind)
        return ok

    def sign(self, data: bytes) -> bytes:
        return bytes(self._kp.sign(data))

    def close(self) -> None:
        self._kp.wipe()


def encode(
    claims: C,
    signer_seed: bytes | bytearray | str | Issuer,
    *,
    issued_at: int | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """Sign ``claims`` with ``signer_seed``: sets iss (the seed's public key), iat
    (``issued_at`` or now, unix seconds) and jti, and returns the JWT. The signer must be of
    the kind nats-server expects (an account key or account signing key for users, an
    operator key for accounts and operators); an operator JWT must be self-signed or signed
    by one of its signing keys."""
    if isinstance(signer_seed, Issuer):
        return _encode(claims, signer_seed, issued_at=issued_at, clock=clock)
    # One key pair for the issuer's name and the signature (each derivation costs).
    signer = Issuer(signer_seed)
    try:
        return _encode(claims, signer, issued_at=issued_at, clock=clock)
    finally:
        signer.close()


def _encode(
    claims: C, signer: Issuer, *, issued_at: int | None, clock: Callable[[], float]
) -> str:
    kind = type(claims)
    issuer = signer.public
    if not signer.is_kind(_ISSUER_KIND[kind]):
        raise JwtError(f"{_CLAIM_TYPE[kind]} claims must be signed by an {_ISSUER_KIND[kind]} key")
    if not is_public_key(claims.sub, _SUBJECT_KIND[kind]):
        raise JwtError(f"{_CLAIM_TYPE[kind]} claims need a public {_SUBJECT_KIND[kind]} subject")
    _check_operator_signer(claims, issuer)
    iat = int(clock()) if issued_at is None else int(issued_at)
    signed: C = msgspec.structs.replace(
        claims,
        iss=issuer,
        iat=iat,
        jti="",
        nats=msgspec.structs.replace(claims.nats, type=_CLAIM_TYPE[kind], version=JWT_VERSION),
    )
    signed = msgspec.structs.replace(signed, jti=claims_hash(signed))
    to_sign = f"{_b64(HEADER)}.{_b64(_go_json(signed))}"
    return f"{to_sign}.{_b64(signer.sign(to_sign.encode('ascii')))}"


def decode(
    token: str,
    kind: type[C],
    *,
    check_time: bool = True,
    clock: Callable[[], float] = time.time,
) -> C:
    """The claims of ``token`` once its header, type, signature (by its own iss, which must
    be a key of the right kind) and, with ``check_time``, exp and nbf are checked.

    Whether the issuer is *trusted* (the right account or one of its signing keys) is the
    caller's question: see ``check_user_issuer``."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three dot-separated parts")
    try:
        header = msgspec.json.decode(_unb64(parts[0]), type=dict[str, str])
        claims = msgspec.json.decode(_unb64(parts[1]), type=kind)
    except msgspec.DecodeError as exc:
        raise JwtError(f"JWT does not decode: {exc}") from None
    if header.get("typ", "").upper() != "JWT" or header.get("alg", "").lower() != "ed25519-nkey":
        raise JwtError(f"unsupported JWT header {header!r} (want ed25519-nkey, jwt v2)")
    if claims.nats.type != _CLAIM_TYPE[kind]:
        raise JwtError(f"JWT is a {claims.nats.type!r} claim, not {_CLAIM_TYPE[kind]!r}")
    try:
        key = public_key_bytes(claims.iss, _ISSUER_KIND[kind])
        public_key_bytes(claims.sub, _SUBJECT_KIND[kind])
    except JwtError as exc:
        raise JwtError(f"JWT issuer or subject: {exc}") from None
    try:
        nacl.signing.VerifyKey(key).verify(
            f"{parts[0]}.{parts[1]}".encode("ascii"), _unb64(parts[2])
        )
    except (nacl.exceptions.BadSignatureError, ValueError, UnicodeEncodeError):
        raise JwtBadSignature("JWT signature does not match its issuer") from None
    if check_time:
        now = clock()
        if claims.exp and now > claims.exp:
            raise JwtExpired(f"JWT expired at {claims.exp}")
        if claims.nbf and claims.nbf > now:
            raise JwtNotYetValid(f"JWT is not valid before {claims.nbf}")
    return claims


def check_user_issuer(user: UserClaims, account: AccountClaims) -> None:
    """``JwtError`` unless ``user`` was issued by ``account`` (its own key, or one of its
    signing keys with ``issuer_account`` naming it), as nats-server checks it."""
    if user.iss == account.sub and user.nats.issuer_account in ("", account.sub):
        return
    if user.iss in account.nats.signing_keys and user.nats.issuer_account == account.sub:
        return
    raise JwtError(f"user {user.sub} was not issued by account {account.sub}")


def is_revoked(user: UserClaims, account: AccountClaims) -> bool:
    """As jwt's RevocationList.IsRevoked: revoked if the account revokes the user's key (or
    "*") at or after the user JWT's iat."""
    revs = account.nats.revocations
    return any(key in revs and revs[key] >= user.iat for key in (user.sub, "*"))


# -- creds -------------------------------------------------------------------------------

_SEED_KIND = {"SU": "USER", "SA": "ACCOUNT", "SO": "OPERATOR"}


def format_creds(user_jwt: str, seed: bytes | bytearray | str) -> str:
    """The standard .creds text (jwt.FormatUserConfig): the user JWT and its nkey seed, as
    nats-py's ``user_credentials`` and the nats CLI read it."""
    s = (seed.decode() if isinstance(seed, (bytes, bytearray)) else seed).strip()
    kind = _SEED_KIND.get(s[:2])
    if kind is None:
        raise JwtError("not an operator, account or user seed")
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN {kind} NKEY SEED-----\n{s}\n------END {kind} NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def parse_creds(text: str) -> tuple[str, str]:
    """(JWT, seed) of a .creds text."""
    blocks: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("-----BEGIN ") and line.rstrip().endswith("-----"):
            blocks.append(lines[i + 1].strip())
    if len(blocks) != 2:
        raise JwtError("a .creds text has a JWT block and a seed block")
    return blocks[0], blocks[1]
