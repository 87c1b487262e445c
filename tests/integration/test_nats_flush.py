"""Our flushes against a real nats-server with protocol tracing: when one returns, the
server has read every command sent before it (nats-py's own flush writes its PING ahead
of the commands still in its pending buffer: agent.connection.flush_all).

The order is read from the server's trace, which logs each command as it parses it, a
PING before its PONG goes out: deterministic, where a lost message is a race (about 1 run
in 10 here, see test_operator_mode's isolation test).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from agent import connection
from controller.nats import client
from controller.nats.server import find_binary, free_port
from tests.fixtures.nats import confirm

_OP = re.compile(r"<<- \[(\w+)")


@dataclass
class TracedServer:
    log: Path
    port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def ops(self) -> list[str]:
        """The commands the server read from clients, in the order it parsed them."""
        return _OP.findall(self.log.read_text(errors="replace"))


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[TracedServer]:
    srv = TracedServer(log=tmp_path / "nats-server.log", port=free_port())
    proc = subprocess.Popen(
        [find_binary(), "-a", "127.0.0.1", "-p", str(srv.port), "-V", "-l", str(srv.log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"nats-server exited with {proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=0.5) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)
        yield srv
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def _flusher(nc: NATS) -> None:
    assert await client.Flusher().flush(nc)


FLUSHES: dict[str, Callable[[NATS], Awaitable[None]]] = {
    "agent.connection.flush_all": lambda nc: connection.flush_all(nc, 10),
    "controller.nats.client.flush_all": lambda nc: client.flush_all(nc, 10),
    "controller.nats.client.Flusher": _flusher,
    "tests.fixtures.nats.confirm": confirm,
}


@pytest.mark.parametrize("name", FLUSHES)
async def test_flush_returns_after_the_server_read_what_came_before(
    traced: TracedServer, name: str
) -> None:
    nc = await nats.connect(traced.url, allow_reconnect=False)
    try:
        await nc.subscribe("flush.sub")
        await nc.publish("flush.pub", b"x")
        await FLUSHES[name](nc)
        ops = traced.ops()
    finally:
        await nc.close()
    # CONNECT and the connect's PING, then the SUB and PUB; with one nats-py flush its
    # PING comes before them: ["CONNECT", "PING", "PING", "SUB", "PUB"].
    assert ops[:2] == ["CONNECT", "PING"]
    assert "SUB" in ops and "PUB" in ops
    assert "PING" in ops[max(ops.index("SUB"), ops.index("PUB")):], ops
