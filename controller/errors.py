"""Controller errors; the API maps each ``code`` to an HTTP status in one middleware."""

from __future__ import annotations

from typing import Any

from protocol.errors import BaristaError


class ControllerError(BaristaError):
    code = "controller_error"
    status = 500

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(ControllerError):
    code = "not_found"
    status = 404


class Conflict(ControllerError):
    code = "conflict"
    status = 409


class BadRequest(ControllerError):
    code = "bad_request"
    status = 400


class Unauthorized(ControllerError):
    """No API token, or one that is unknown, expired or revoked (HTTP 401)."""

    code = "unauthorized"
    status = 401


class Forbidden(ControllerError):
    """An authenticated API token whose role or scope does not allow the call (HTTP 403)."""

    code = "forbidden"
    status = 403


class ConfigError(ControllerError):
    """The controller's settings (file, environment, flags) or the CLI's config are
    unusable; the message names the setting. A server-side fault if the API ever meets it."""

    code = "config_error"


class TokenRefused(ControllerError):
    """A join token cannot be used; ``code`` says why (bad_token, token_used, token_expired)."""

    status = 403

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NatsServerError(ControllerError):
    code = "nats_server_error"


class StoreInUse(NatsServerError):
    """The embedded NATS store is locked by another live controller (``holder_pid``, 0 if
    unknown): one nats-server per data dir, ever."""

    code = "store_in_use"

    def __init__(self, message: str, *, lock_path: str, holder_pid: int) -> None:
        super().__init__(message, details={"lock": lock_path, "holder_pid": holder_pid})
        self.lock_path = lock_path
        self.holder_pid = holder_pid


class BodyTooLarge(ControllerError):
    code = "payload_too_large"
    status = 413


class BadRecord(ControllerError):
    """A stored KV record does not decode as its type: skipped, counted, never fatal."""

    code = "bad_record"

    def __init__(self, bucket: str, key: str, revision: int, reason: str) -> None:
        super().__init__(
            f"{bucket} {key!r} (revision {revision}) holds an undecodable record: {reason}",
            details={"bucket": bucket, "key": key, "revision": revision},
        )
        self.bucket = bucket
        self.key = key
        self.revision = revision
        self.reason = reason
