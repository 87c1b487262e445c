"""The controller's side of the lab gateway: TCP forwarders from the lab gateway address
(on the lab's own host bridge) to a controller that listens on loopback only.

Lab VMs reach the controller at ``Lab.gateway_ip``. A controller whose NATS and API listen
on 127.0.0.1 (the default) runs a ``GatewayForwarder`` for the ports the VMs need; TLS
passes through unchanged (give the server certificate the gateway address, ``--tls-name``).
Nothing listens on a host interface: the gateway address exists only on the lab's bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from types import TracebackType

log = logging.getLogger("barista.lab.gateway")

CHUNK = 65536


class GatewayForwarder:
    """``async with GatewayForwarder(host=gw, routes={4222: ("127.0.0.1", 41234)})``:
    listens on ``host:port`` for every route (port 0 = any free one; see ``ports``) and
    splices each connection to its target. Closes listeners and connections on exit."""

    def __init__(self, *, host: str, routes: Mapping[int, tuple[str, int]]) -> None:
        self.host = host
        self.routes = dict(routes)
        self.ports: dict[int, int] = {}  # asked port -> bound port
        self.connections = 0
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> GatewayForwarder:
        try:
            for port, target in self.routes.items():
                server = await asyncio.start_server(
                    functools.partial(self._accept, target=target), self.host, port)
                self._servers.append(server)
                self.ports[port] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                target: tuple[str, int]) -> None:
        task = asyncio.create_task(self._splice(reader, writer, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      target: tuple[str, int]) -> None:
        self.connections += 1
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with
            # the connection (gh-86296), and close() then waits for the splice to end.
            async with asyncio.timeout(10):
                up_r, up_w = await asyncio.open_connection(*target)
        except (OSError, TimeoutError) as exc:
            log.warning("lab gateway: %s:%d unreachable: %s", target[0], target[1], exc)
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            for w in (writer, up_w):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()
