"""Admitting nodes reloads the embedded nats-server's config: what that does to clients.

Established node connections must survive any number of reloads (every enrollment causes
one). A client still in its CONNECT handshake while a reload runs is dropped by the server
("authentication error") and must retry: the agent does, with backoff. These tests pin
the first behaviour and the admission itself.
"""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from pathlib import Path

import nats
import nats.errors
import nkeys
import pytest
from nats.aio.client import Client as NATS

from controller.nats.permissions import NodeAccess
from controller.nats.server import NatsServer


def identity(tmp_path: Path, name: str) -> tuple[str, str]:
    """(seed file, public key) of a fresh user nkey, as an agent makes it."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / f"{name}.nk"
    path.write_bytes(seed)
    path.chmod(0o600)
    return str(path), nkeys.from_seed(seed).public_key.decode()


async def test_established_node_connections_survive_reloads(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seeds = []
    for i in range(20):
        seed, public = identity(tmp_path, f"n{i}")
        nats_server.add_node(NodeAccess(f"n{i}", public))
        seeds.append(seed)
    await asyncio.to_thread(nats_server.reload)
    drops: list[int] = []
    clients = []
    for i, seed in enumerate(seeds):

        async def dropped(i: int = i) -> None:
            drops.append(i)

        clients.append(
            await nats.connect(nats_server.url, nkeys_seed=seed, disconnected_cb=dropped)
        )
    try:
        for r in range(10):  # ten more enrollments
            nats_server.add_node(NodeAccess(f"late{r}", identity(tmp_path, f"late{r}")[1]))
            await asyncio.to_thread(nats_server.reload)
        watcher = await nats.connect(nats_server.url, **nats_server.controller_credentials())
        try:
            sub = await watcher.subscribe("barista.node.*.heartbeat")
            await watcher.flush()
            for i, nc in enumerate(clients):
                await nc.publish(f"barista.node.n{i}.heartbeat", b"x")
                await nc.flush()
            got = {(await sub.next_msg(timeout=5)).subject for _ in clients}
        finally:
            await watcher.close()
        assert drops == []
        assert all(nc.is_connected for nc in clients)
        assert got == {f"barista.node.n{i}.heartbeat" for i in range(len(clients))}
    finally:
        for nc in clients:
            await nc.close()


async def test_a_node_is_admitted_by_the_reload_and_not_before(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed, public = identity(tmp_path, "newcomer")
    refused = NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await refused.connect(
                nats_server.url, nkeys_seed=seed, allow_reconnect=False, max_reconnect_attempts=0
            )
    finally:
        await refused.close()  # nats-py leaves a refused connection's socket open
    nats_server.add_node(NodeAccess("newcomer", public))
    await asyncio.to_thread(nats_server.reload)
    nc = await nats.connect(nats_server.url, nkeys_seed=seed, allow_reconnect=False)
    await nc.close()


async def test_the_agents_refused_connect_leaves_no_socket_open(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """nats-py keeps a refused connection's socket until GC; the agent's connect closes it
    (the suite runs with -W error, so a leaked socket collected here fails the test)."""
    from agent.connection import connect

    seed, _ = identity(tmp_path, "stranger")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(servers=[nats_server.url], nkeys_seed=seed, allow_reconnect=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()
