"""Errors of the lab cloud: a command that failed (with its argv and stderr) and bad config."""

from __future__ import annotations

from collections.abc import Sequence

from protocol.errors import BaristaError


class LabError(BaristaError):
    """Something in the lab could not be set up or found."""

    code = "lab_error"


class CommandFailed(LabError):
    """An ``ip``/``nft``/... subprocess exited non-zero."""

    code = "lab_command_failed"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {self.stderr}")


class LabConfigError(LabError, ValueError):
    """The lab configuration (regions, delays, loss) is invalid; names the field."""

    code = "lab_config"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
