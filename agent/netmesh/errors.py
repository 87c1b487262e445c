"""Errors of the node's overlay: each carries what is needed to act on it."""

from __future__ import annotations

from protocol.errors import BaristaError


class NetmeshError(BaristaError):
    code = "netmesh_error"


class UapiError(NetmeshError, OSError):
    """A UAPI exchange with wireguard-go failed (socket gone, errno from a set)."""

    code = "uapi_error"

    def __init__(self, reason: str, *, errno: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.uapi_errno = errno


class BackendUnavailable(NetmeshError):
    """A WireGuard backend cannot work here (no kernel module, no wireguard-go binary)."""

    code = "backend_unavailable"

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"WireGuard backend {backend!r} is not available: {reason}")
        self.backend = backend
        self.reason = reason


class HostCommandFailed(NetmeshError):
    """An ``ip`` / ``sysctl`` command for the interface failed."""

    code = "host_command_failed"

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:300]}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
