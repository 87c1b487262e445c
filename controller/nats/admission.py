"""Node admission: which node identities the NATS server lets in (the ``NodeAdmission``
seam) and its implementations: ``OperatorAdmission`` (NATS operator mode, the embedded
server's: a node is admitted by a user JWT signed for its nkey, no reload), batched config
reloads of a server with config users (``ReloadAdmission``), and nothing at all for a NATS
that is not ours (``UnmanagedAdmission``).

Reloads are batched: many nodes enrolling at once cost one config reload. A reload drops
every client caught in its CONNECT handshake (nats-server checks all clients against the
new users, and one mid-handshake has not authenticated yet); such clients retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.files import write_private
from controller.nats.operator import DEFAULT_USER_TTL, OperatorTrust, Permissions
from controller.nats.permissions import NodeAccess, node_permissions
from controller.nats.server import NatsServer
from protocol.subjects import Subjects

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = logging.getLogger("barista.controller.auth")


class NodeAdmission(Protocol):
    """Admits node identities to NATS. Enrollment and the controller see only this, so a
    reload-free implementation (operator mode, user JWTs) can replace ReloadAdmission."""

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
    """An external NATS server: its operator admits nodes; nothing to do here."""

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


class ReloadAdmission:
    """Node nkeys allowed on the embedded server, written into its config and reloaded.

    The node list is also cached in ``cache_path`` (load_cache), so that a restarted
    server admits the known nodes right away."""

    def __init__(self, *, server: NatsServer, cache_path: Path, debounce: float = 0.02):
        self._server = server
        self._cache_path = cache_path
        self._debounce = debounce
        self._lock = asyncio.Lock()
        self._pending: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def managed(self) -> bool:
        return True

    @staticmethod
    def load_cache(path: Path) -> list[NodeAccess]:
        """Identities known at the last run, so the server admits nodes right at restart."""
        try:
            return [NodeAccess(**n) for n in json.loads(path.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return []

    def _save_cache(self) -> None:
        nodes = [{"node_id": n.node_id, "nkey": n.nkey} for n in self._server.nodes.values()]
        write_private(self._cache_path, json.dumps(nodes).encode())

    async def admit(self, access: NodeAccess) -> None:
        """Admit a node; returns once the server has loaded the new config."""
        self._server.add_node(access)
        await self._reload_soon()

    async def credentials(self, access: NodeAccess) -> str:
        return ""

    async def remove(self, nkey: str) -> None:
        self._server.remove_node(nkey)
        await self._reload_soon()

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Make the server's node list exactly ``nodes`` (after loading state at start)."""
        wanted = {n.nkey: n for n in nodes}
        if wanted == self._server.nodes:
            return
        self._server.set_nodes(wanted.values())
        await self._reload_soon()

    async def _reload_soon(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reload_batch())
        await fut

    async def _reload_batch(self) -> None:
        await asyncio.sleep(self._debounce)
        async with self._lock:
            waiting, self._pending = self._pending, []
            try:
                self._save_cache()
                # A snapshot taken on the loop (enrollments keep changing the node list),
                # rendered and loaded in a thread: with thousands of nodes rendering alone
                # takes tens of milliseconds.
                nodes = list(self._server.nodes.values())
                server = self._server
                await asyncio.to_thread(
                    lambda: server.reload(config_text=server.render_config(nodes))
                )
                log.debug("nats-server reloaded for %d change(s)", len(waiting))
            except Exception as exc:
                for fut in waiting:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)
        if self._pending:  # arrived while we were reloading
            self._task = asyncio.create_task(self._reload_batch())


class OperatorAdmission:
    """NATS operator mode: a node is admitted by signing a user JWT for its own nkey (with
    the fleet account's signing key and node_permissions), so enrolling changes nothing on
    the server -- no config write, no reload, no dropped handshake. Removal revokes the
    nkey in the fleet account JWT and pushes it over ``system_nc`` (a system-account
    connection): the server closes the node's connections and refuses it from then on."""

    def __init__(
        self,
        *,
        trust: OperatorTrust,
        subjects: Subjects,
        system_nc: NATS | None,
        server: NatsServer | None = None,
        ttl: float = DEFAULT_USER_TTL,
    ) -> None:
        self._trust = trust
        # Only a record of who is admitted here (server.nodes); the server needs no list.
        self._server = server
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
        if self._server is not None:
            self._server.add_node(access)

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
        if self._server is not None:
            self._server.remove_node(nkey)
        if self._trust.is_revoked(nkey):
            return
        self._trust.revoke(nkey)
        await self._push()

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Nothing to list (every JWT names its node); the fleet account JWT is pushed, so
        that a revocation whose push failed before is in force now."""
        if self._server is not None:
            self._server.set_nodes(n for n in nodes if not self._trust.is_revoked(n.nkey))
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
                # The revocation is in the trust dir and the preload of the next start.
                log.warning("could not push the fleet account JWT to nats-server: %s", exc)
                raise
