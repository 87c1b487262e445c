"""Errors of the ingest path; each says whether retrying can help."""

from __future__ import annotations

from controller.errors import ControllerError


class SinkError(ControllerError):
    """A write to the metrics store failed.

    ``retryable``: the store is down or overloaded (5xx, 429, connection) and the same data
    will succeed later. ``status`` is the store's HTTP status, None for a connection error.
    ``auth``: credentials were refused (401/403); retryable, so that nothing is dropped while
    an operator fixes them, but logged as what it is.
    """

    code = "sink_error"

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, auth: bool = False
    ) -> None:
        super().__init__(message, details={"retryable": retryable, "status": status})
        self.retryable = retryable
        # Shadows ControllerError.status (the API's HTTP status): here it is the store's.
        self.status = status  # type: ignore[assignment]
        self.auth = auth


class SinkConfigError(ControllerError, ValueError):
    code = "sink_config_error"
    status = 400
