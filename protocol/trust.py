"""Pinned trust: join tokens that carry the controller CA's hash, and the CA check.

A join token is ``bt2.<sha256 of the CA certificate's DER, 64 hex>.<id>.<secret>`` (like
k3s's ``K10<hash>::...``): whoever holds it can tell the controller's CA from a forged one
before sending anything. A controller serving plain NATS (the demo, loopback) issues
``bt1.<id>.<secret>``, which pins nothing. No I/O here: the agent and the CLI fetch the
server's certificate chain their own way and ask ``pinned_ca`` which certificate to trust.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

PINNED_PREFIX = "bt2"
PLAIN_PREFIX = "bt1"
_PINNED_RE = re.compile(r"^bt2\.([0-9a-f]{64})\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
_PLAIN_RE = re.compile(r"^bt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class TrustError(Exception):
    """The server's certificate chain is not the one pinned; the message names both hashes."""

    def __init__(self, message: str, *, expected: str = "", found: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str
    # sha256 hex of the CA certificate (DER) the server must present; "" for a plain token.
    ca_sha256: str = ""

    def __str__(self) -> str:
        if self.ca_sha256:
            return f"{PINNED_PREFIX}.{self.ca_sha256}.{self.token_id}.{self.secret}"
        return f"{PLAIN_PREFIX}.{self.token_id}.{self.secret}"


def parse_join_token(token: str) -> JoinToken | None:
    """The parts of a join token, or None if it is malformed."""
    token = token or ""
    m = _PINNED_RE.match(token)
    if m:
        return JoinToken(token_id=m.group(2), secret=m.group(3), ca_sha256=m.group(1))
    m = _PLAIN_RE.match(token)
    if m:
        return JoinToken(token_id=m.group(1), secret=m.group(2))
    return None


def ca_fingerprint(der: bytes) -> str:
    """The pin of a certificate: sha256 of its DER encoding, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def normalize_pin(pin: str) -> str:
    """A sha256 pin as hex (``AB:CD:..``, upper case and a ``sha256:`` prefix are accepted);
    ValueError if it is not one."""
    text = pin.strip().lower().removeprefix("sha256:").replace(":", "")
    if not _SHA256_RE.match(text):
        raise ValueError(f"{pin!r} is not a sha256 hash (64 hex digits)")
    return text


def pinned_ca(chain: list[bytes], pin: str, *, where: str) -> bytes:
    """The certificate (DER) of ``chain`` whose hash is ``pin``: the CA to trust from now
    on. ``TrustError`` naming the expected and the presented hashes when none matches."""
    found = tuple(ca_fingerprint(der) for der in chain)
    for der, digest in zip(chain, found, strict=True):
        if digest == pin:
            return der
    shown = ", ".join(found) or "no certificate at all"
    raise TrustError(
        f"{where} presented a certificate chain that is not the pinned CA: expected CA "
        f"sha256 {pin}, got {shown}. Refusing to send anything: the server is not the "
        "controller the join token was made for (or someone is in the way); check the "
        "address and the token",
        expected=pin, found=found,
    )
