"""Ed25519 signing of commands, and the agent-side verifier with TTL and replay checks.

Also the enrollment's proof of possession (the agent signs its EnrollRequest with its nkey
seed; the controller verifies with the public nkey it names) and the sealed enrollment
reply (X25519 sealed box to a key the request carries)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

import msgspec
import nacl.exceptions
import nacl.public
import nacl.signing
import nkeys

from protocol import codec
from protocol.errors import (
    BadIdentityProof,
    BadSignature,
    CommandExpired,
    CommandRejected,
    CommandReplayed,
    ProtocolError,
    StaleEnrollRequest,
)
from protocol.messages import (
    Command,
    EnrollRequest,
    KeyRotation,
    Message,
    RenewRequest,
    SealedReply,
    SignedCommand,
    SignedKeyRotation,
)

# Ed25519 through libsodium (PyNaCl): verification is the agent's hot path on a broadcast,
# and libsodium verifies about 1.6x faster than OpenSSL through `cryptography` here.
# `cryptography` is only imported by the controller, to keep its key file in PEM.

MAX_TTL = 24 * 3600.0
DEFAULT_CLOCK_SKEW = 30.0


def key_id(public_key_b64: str) -> str:
    raw = base64.b64decode(public_key_b64)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(public_key_b64: str) -> nacl.signing.VerifyKey:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, expected 32")
        return nacl.signing.VerifyKey(raw)
    except Exception as exc:
        raise ValueError(f"not a base64 Ed25519 public key: {exc}") from None


class Signer(Protocol):
    """What signs commands: a CommandSigner, or the controller's rotating key set."""

    @property
    def public_key_b64(self) -> str: ...

    def sign(self, cmd: Command) -> SignedCommand: ...


class CommandSigner:
    """Holds the controller's private key; it never leaves the controller's data dir."""

    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        self.public_key_b64 = base64.b64encode(bytes(self._key.verify_key)).decode()
        self.key_id = key_id(self.public_key_b64)

    @classmethod
    def generate(cls) -> CommandSigner:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def from_pem(cls, pem: bytes) -> CommandSigner:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("signing key is not an Ed25519 private key")
        return cls(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.from_private_bytes(bytes(self._key))
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, cmd: Command) -> SignedCommand:
        payload = codec.encode(cmd)
        signature = self._key.sign(payload).signature
        return SignedCommand(payload=payload, signature=signature, key_id=self.key_id)

    def sign_rotation(self, rot: KeyRotation) -> SignedKeyRotation:
        payload = codec.encode(rot)
        signature = self._key.sign(payload).signature
        return SignedKeyRotation(payload=payload, signature=signature, key_id=self.key_id)


class CommandVerifier:
    """Verifies signature, expiry and uniqueness of commands before anything runs.

    The replay cache remembers every accepted command id until its TTL has passed. It is
    bounded: when it is full of live ids, new commands are refused (fail closed) rather
    than forgetting ids that could then be replayed.
    """

    def __init__(
        self,
        public_keys: Iterable[str],
        *,
        clock: Callable[[], float] = time.time,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        max_ttl: float = MAX_TTL,
        cache_size: int = 200_000,
    ) -> None:
        self._keys: dict[str, nacl.signing.VerifyKey] = {}
        self._expires: dict[str, float] = {}  # key id -> epoch seconds; absent: never
        self._public: dict[str, str] = {}  # key id -> base64
        self._clock = clock
        self.set_keys(dict.fromkeys(public_keys, 0.0))
        self._skew = clock_skew
        self._max_ttl = max_ttl
        self._cache_size = cache_size
        self._seen: dict[str, float] = {}  # command id -> forget after (epoch seconds)
        self._next_prune = 0.0

    def set_keys(self, keys: Mapping[str, float]) -> None:
        """Trust exactly ``keys`` (base64 public key -> expiry in epoch seconds, 0 = none):
        a signing-key rotation changes the set while the agent runs."""
        loaded = {key_id(pk): load_public_key(pk) for pk in keys}
        if not loaded:
            raise ValueError("a verifier needs at least one controller public key")
        self._keys = loaded
        self._public = {key_id(pk): pk for pk in keys}
        self._expires = {key_id(pk): float(t) for pk, t in keys.items() if t}

    def trusted_keys(self) -> dict[str, float]:
        """The keys trusted now (base64 -> expiry, 0 = none); expired ones left out."""
        now = self._clock()
        return {pk: self._expires.get(kid, 0.0) for kid, pk in self._public.items()
                if self._expires.get(kid, math.inf) >= now}

    @property
    def cached_ids(self) -> int:
        return len(self._seen)

    def remember(self, entries: Iterable[tuple[str, float]]) -> int:
        """Preload ids accepted before a restart (id, forget-after epoch seconds); expired
        ones are skipped. Returns how many were taken, at most the cache size."""
        now = self._clock()
        taken = 0
        for cid, until in entries:
            if len(self._seen) >= self._cache_size:
                break
            if math.isfinite(until) and until >= now and cid not in self._seen:
                self._seen[cid] = until
                taken += 1
        return taken

    def forget_after(self, command_id: str) -> float | None:
        """When the cache forgets an accepted id (epoch seconds), or None if not cached."""
        return self._seen.get(command_id)

    def check_signature(self, payload: bytes, signature: bytes, kid: str) -> str:
        """The id of the trusted, unexpired key that made ``signature``; ``BadSignature``."""
        now = self._clock()
        ids = [kid] if kid in self._keys else list(self._keys)
        for i in ids:
            if self._expires.get(i, math.inf) < now:
                continue  # a rotated-out key past its overlap
            try:
                self._keys[i].verify(payload, signature)
                return i
            except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
                continue
        raise BadSignature("signature does not match any trusted controller key")

    def verify_rotation(self, signed: SignedKeyRotation) -> KeyRotation:
        """The rotation step if a trusted key signed it (no replay check: steps are
        numbered and applied once); ``BadSignature`` or ``ProtocolError``."""
        self.check_signature(signed.payload, signed.signature, signed.key_id)
        try:
            return codec.decode(signed.payload, KeyRotation)
        except ProtocolError as exc:
            raise CommandRejected(f"signed payload is not a key rotation: {exc.reason}") from None

    def verify(self, signed: SignedCommand) -> Command:
        """Return the command if it may run; raise ``CommandRejected`` (or ProtocolError)."""
        self.check_signature(signed.payload, signed.signature, signed.key_id)
        try:
            cmd = codec.decode(signed.payload, Command)
        except ProtocolError as exc:
            raise CommandRejected(f"signed payload is not a command: {exc.reason}") from None
        now = self._clock()
        # A NaN issued_at would pass every comparison below and stay in the cache forever.
        if not math.isfinite(cmd.issued_at):
            raise CommandRejected(f"issued_at {cmd.issued_at} is not a time", command_id=cmd.id)
        if not (0 < cmd.ttl <= self._max_ttl):
            raise CommandRejected(
                f"ttl {cmd.ttl}s outside (0, {self._max_ttl}]", command_id=cmd.id
            )
        if cmd.issued_at > now + self._skew:
            raise CommandExpired(
                f"issued {cmd.issued_at - now:.1f}s in the future (clock skew?)",
                command_id=cmd.id,
            )
        expires = cmd.issued_at + cmd.ttl
        if expires + self._skew < now:
            raise CommandExpired(
                f"expired {now - expires:.1f}s ago (ttl {cmd.ttl}s)", command_id=cmd.id
            )
        self._prune(now)
        if cmd.id in self._seen:
            raise CommandReplayed(f"command id {cmd.id} was already accepted", command_id=cmd.id)
        if len(self._seen) >= self._cache_size:
            raise CommandRejected(
                "replay cache is full of live command ids; refusing until they expire",
                command_id=cmd.id,
            )
        self._seen[cmd.id] = expires + self._skew
        return cmd

    def _prune(self, now: float) -> None:
        if now < self._next_prune and len(self._seen) < self._cache_size:
            return
        self._next_prune = now + 1.0
        dead = [cid for cid, until in self._seen.items() if until < now]
        for cid in dead:
            del self._seen[cid]


# --- enrollment: proof of possession and sealed replies ----------------------------------

# How far an enroll request's ts may be from the controller's clock. Generous: a freshly
# booted VM may not have synced its clock yet, and a sealed reply is useless to whoever
# replays a request anyway; the window only bounds how long a captured request stays valid.
ENROLL_MAX_SKEW = 900.0


def nkey_public_bytes(public_key: str) -> bytes:
    """The raw Ed25519 key inside a NATS user nkey ("U..."): base32 of prefix byte, 32 key
    bytes and a CRC16; ``ValueError`` if it is not one."""
    try:
        raw = base64.b32decode(public_key.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a base32 nkey: {exc}") from None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError("not a NATS user nkey (U...)")
    # nkeys' CRC16 is XMODEM's, which binascii computes in C (nkeys.crc16 is a Python loop)
    if binascii.crc_hqx(raw[:33], 0) != int.from_bytes(raw[33:], "little"):
        raise ValueError("nkey checksum does not match")
    return raw[1:33]


# What a node signs to prove it holds its identity nkey: an enroll or a renew request
# (each has ``identity``, ``ts``, ``signature`` and ``signing_payload()``).
_Proof = TypeVar("_Proof", EnrollRequest, RenewRequest)


def _sign_proof(req: _Proof, seed: bytes | bytearray) -> _Proof:
    """``req`` with its signature: the identity nkey (from ``seed``) over its fields."""
    kp = nkeys.from_seed(bytearray(seed))
    try:
        if kp.public_key.decode() != req.identity:
            raise ValueError("the seed does not belong to the request's identity")
        signature = bytes(kp.sign(req.signing_payload()))
    finally:
        kp.wipe()
    return msgspec.structs.replace(req, signature=signature)


def _verify_proof(req: EnrollRequest | RenewRequest, what: str, *, now: float | None,
                  max_skew: float) -> None:
    """Raise ``BadIdentityProof`` unless ``req`` is signed by the nkey it names, and
    ``StaleEnrollRequest`` unless it was signed recently."""
    if not req.signature:
        raise BadIdentityProof(
            f"{what} request is not signed by its identity key (an agent older than the "
            "controller? upgrade it)"
        )
    try:
        key = nacl.signing.VerifyKey(nkey_public_bytes(req.identity))
        key.verify(req.signing_payload(), req.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise BadIdentityProof(
            f"{what} request signature does not match its identity key"
        ) from None
    now = time.time() if now is None else now
    # NaN fails every comparison: refuse what is not a finite, recent time.
    if not (math.isfinite(req.ts) and abs(req.ts - now) <= max_skew):
        raise StaleEnrollRequest(
            f"{what} request time is more than {max_skew:.0f}s off the controller's clock "
            "(check the machine's clock)"
        )


def sign_enroll(req: EnrollRequest, seed: bytes | bytearray) -> EnrollRequest:
    """``req`` with its signature: the identity nkey (from ``seed``) over its fields."""
    return _sign_proof(req, seed)


def verify_enroll(
    req: EnrollRequest, *, now: float | None = None, max_skew: float = ENROLL_MAX_SKEW
) -> None:
    """Raise ``BadIdentityProof`` unless ``req`` is signed by the nkey it names, recently."""
    _verify_proof(req, "enroll", now=now, max_skew=max_skew)


def seal_reply(reply_key: bytes, reply: Message) -> SealedReply:
    """``reply`` encoded and sealed to ``reply_key`` (32-byte X25519); ``ValueError`` if
    the key is not one."""
    if len(reply_key) != nacl.public.PublicKey.SIZE:
        raise ValueError(f"reply_key must be {nacl.public.PublicKey.SIZE} bytes")
    box = nacl.public.SealedBox(nacl.public.PublicKey(bytes(reply_key)))
    return SealedReply(box=box.encrypt(codec.encode(reply)))


def open_reply(private_key: nacl.public.PrivateKey, sealed: SealedReply) -> bytes:
    """The encoded message inside ``sealed``; ``ProtocolError`` if it was not sealed to
    ``private_key`` or was altered."""
    try:
        return bytes(nacl.public.SealedBox(private_key).decrypt(sealed.box))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise ProtocolError("sealed reply cannot be opened with this request's key") from None


def sign_renew(req: RenewRequest, seed: bytes | bytearray) -> RenewRequest:
    """``req`` signed by the identity nkey it names (from ``seed``)."""
    return _sign_proof(req, seed)


def verify_renew(
    req: RenewRequest, *, now: float | None = None, max_skew: float = ENROLL_MAX_SKEW
) -> None:
    """Raise ``BadIdentityProof`` unless ``req`` is signed by the nkey it names, recently."""
    _verify_proof(req, "renew", now=now, max_skew=max_skew)
