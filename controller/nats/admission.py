"""Node admission: which node identities the NATS server lets in (the ``NodeAdmission``
seam) and its implementations: ``OperatorAdmission`` (NATS operator mode, on the embedded
server or on any NATS deployment set up by ``barista nats init``: a node is admitted by a
user JWT signed for its nkey, nothing changes on the server), and nothing at all for a NATS
that is not ours (``UnmanagedAdmission``: nodes are not isolated from each other).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from controller.nats.operator import DEFAULT_USER_TTL, OperatorTrust, Permissions
from controller.nats.permissions import NodeAccess, node_permissions
from protocol.subjects import Subjects

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = logging.getLogger("barista.controller.auth")


class NodeAdmission(Protocol):
    """Admits node identities to NATS. Enrollment and the controller see only this."""

    @property
    def managed(self) -> bool:
        """Whether nodes are isolated by their own identity (node_permissions); False when
        NATS is not ours to manage and nodes connect with what the operator gave them."""
        ...

    async def admit(self, access: NodeAccess) -> None:
        """Let ``access`` in; returns once the server accepts that identity."""
        ...

    async def credentials(self, access: NodeAccess) -> str:
        """What the node connects with besides its nkey: a user JWT in operator mode, ""
        otherwise. Raises RevokedUser for a revoked identity."""
        ...

    async def remove(self, nkey: str) -> None:
        """Stop admitting ``nkey`` (in operator mode: revoke it, connections included)."""
        ...

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Admit exactly ``nodes`` (after loading state at start)."""
        ...


class UnmanagedAdmission:
    """An external NATS without barista's trust (no ``barista nats init``): its operator
    admits nodes, all with the credentials they were given; nothing to do here."""

    @property
    def managed(self) -> bool:
        return False

    async def admit(self, access: NodeAccess) -> None:
        return None

    async def credentials(self, access: NodeAccess) -> str:
        return ""

    async def remove(self, nkey: str) -> None:
        return None

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        return None


class OperatorAdmission:
    """NATS operator mode: a node is admitted by signing a user JWT for its own nkey (with
    the fleet account's signing key and node_permissions), so enrolling changes nothing on
    the server -- no config write, no reload, no dropped handshake. Removal revokes the
    nkey in the fleet account JWT and pushes it over ``system_nc`` (a system-account
    connection): every server of the deployment closes the node's connections and refuses
    it from then on."""

    def __init__(
        self,
        *,
        trust: OperatorTrust,
        subjects: Subjects,
        system_nc: NATS | None,
        ttl: float = DEFAULT_USER_TTL,
    ) -> None:
        self._trust = trust
        self._subjects = subjects
        self._system_nc = system_nc
        self._ttl = ttl
        self._push_lock = asyncio.Lock()
        # Pushes coalesce: one that starts after a caller's change carries it, so 1,000
        # revocations at once (an infra deleted) cost a few pushes, not 1,000 in a row.
        self._push_wanted = 0
        self._push_done = 0

    @property
    def managed(self) -> bool:
        return True

    @property
    def ttl(self) -> float:
        return self._ttl

    async def admit(self, access: NodeAccess) -> None:
        # The JWT from credentials() is the admission; nothing changes on the server.
        return None

    async def credentials(self, access: NodeAccess) -> str:
        perms = Permissions.from_config(node_permissions(self._subjects, access.node_id))
        return self._trust.user_jwt(
            access.nkey, name=access.node_id, permissions=perms, ttl=self._ttl
        )

    def is_revoked(self, nkey: str) -> bool:
        return self._trust.is_revoked(nkey)

    async def remove(self, nkey: str) -> None:
        """Revoke ``nkey``: written to the trust dir first (a failed push is applied at the
        next start, see sync), then pushed."""
        if self._trust.is_revoked(nkey):
            return
        self._trust.revoke(nkey)
        await self._push()

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Nothing to list (every JWT names its node); the fleet account JWT is pushed, so
        that a revocation whose push failed before is in force now."""
        await self._push()

    async def _push(self) -> None:
        if self._system_nc is None:
            return
        self._push_wanted += 1
        mine = self._push_wanted
        async with self._push_lock:
            if self._push_done >= mine:
                return  # a push that started after our change already carried it
            carries = self._push_wanted
            try:
                await self._trust.push_fleet(self._system_nc)
                self._push_done = carries
            except Exception as exc:
                # The revocation is in the trust dir, pushed again at the next start (and
                # in the embedded server's preload).
                log.warning("could not push the fleet account JWT to nats-server: %s", exc)
                raise
