"""Errors raised by the protocol package; each carries the facts needed to act on it."""

from __future__ import annotations


class BaristaError(Exception):
    """Base of every error barista raises on purpose."""

    code = "error"


class ProtocolError(BaristaError, ValueError):
    """A message could not be accepted: malformed, oversized, unknown kind or version."""

    code = "protocol_error"

    def __init__(self, reason: str, *, kind: str | None = None, size: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.size = size


class PayloadTooLarge(ProtocolError):
    code = "payload_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes", size=size)
        self.limit = limit


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"

    def __init__(self, version: int, supported: frozenset[int], kind: str | None = None) -> None:
        super().__init__(
            f"protocol version {version} is not supported (this build speaks "
            f"{', '.join(str(v) for v in sorted(supported))}); upgrade the older side",
            kind=kind,
        )
        self.version = version


class BadIdentityProof(ProtocolError):
    """An enroll request is not signed by the identity key it names (or not signed)."""

    code = "bad_signature"


class StaleEnrollRequest(BadIdentityProof):
    """An enroll request's time is too far from the controller's clock (retry once the
    machine's clock is right: the agent makes a new request per attempt)."""

    code = "clock_skew"


class CommandRejected(BaristaError):
    """A signed command failed verification; ``reason`` says which check refused it."""

    code = "rejected"

    def __init__(self, reason: str, *, command_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id


class BadSignature(CommandRejected):
    code = "bad_signature"


class CommandExpired(CommandRejected):
    code = "expired"


class CommandReplayed(CommandRejected):
    code = "replayed"


class SelectorError(BaristaError, ValueError):
    """A label selector has bad syntax; ``position`` points at the offending character."""

    code = "bad_selector"

    def __init__(self, selector: str, position: int, reason: str) -> None:
        pointer = f"{selector}\n{' ' * position}^"
        super().__init__(f"invalid selector at position {position}: {reason}\n{pointer}")
        self.selector = selector
        self.position = position
        self.reason = reason


class InvalidName(BaristaError, ValueError):
    """A node id, network name or label is not usable as a subject token or label."""

    code = "invalid_name"


class MeshPeerInvalid(ProtocolError):
    """A mesh peer entry (or a network's own settings) failed a check of protocol/mesh.py:
    it never reaches WireGuard state. ``node_id`` names the entry, ``field`` the check."""

    code = "mesh_peer_invalid"

    def __init__(self, reason: str, *, node_id: str = "", field: str = "") -> None:
        super().__init__(reason, kind="mesh_peer")
        self.node_id = node_id
        self.field = field
