"""Keeps the embedded nats-server's list of node identities in step with enrollment.

Reloads are batched: many nodes enrolling at once cost one config reload. A reload drops
every client caught in its CONNECT handshake (nats-server checks all clients against the
new users, and one mid-handshake has not authenticated yet); such clients retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from controller.nats.server import NatsServer, NodeAccess

log = logging.getLogger("barista.controller.auth")


class NatsAuth:
    """Node nkeys allowed on the embedded server; a no-op when NATS is external."""

    def __init__(self, server: NatsServer | None, cache_path: Path, *, debounce: float = 0.02):
        self._server = server
        self._cache_path = cache_path
        self._debounce = debounce
        self._lock = asyncio.Lock()
        self._pending: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def managed(self) -> bool:
        return self._server is not None

    @staticmethod
    def load_cache(path: Path) -> list[NodeAccess]:
        """Identities known at the last run, so the server admits nodes right at restart."""
        try:
            return [NodeAccess(**n) for n in json.loads(path.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return []

    def _save_cache(self) -> None:
        assert self._server is not None
        nodes = [{"node_id": n.node_id, "nkey": n.nkey} for n in self._server._nodes.values()]
        tmp = self._cache_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(nodes, f)
        os.replace(tmp, self._cache_path)

    async def add(self, access: NodeAccess) -> None:
        """Admit a node; returns once the server has loaded the new config."""
        if self._server is None:
            return
        self._server.add_node(access)
        await self._reload_soon()

    async def remove(self, nkey: str) -> None:
        if self._server is None:
            return
        self._server.remove_node(nkey)
        await self._reload_soon()

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Make the server's node list exactly ``nodes`` (after loading state at start)."""
        if self._server is None:
            return
        wanted = {n.nkey: n for n in nodes}
        if wanted == self._server._nodes:
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
                assert self._server is not None
                self._save_cache()
                # A snapshot taken on the loop (enrollments keep changing the node list),
                # rendered and loaded in a thread: with thousands of nodes rendering alone
                # takes tens of milliseconds.
                nodes = list(self._server._nodes.values())
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
