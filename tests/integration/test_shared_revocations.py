"""Revocations shared by several controllers of one NATS deployment (issue 10, item 2): two
(then three) real controllers on the 3-server cluster of tests/fixtures/nats_cluster.py,
each with its own copy of the `barista nats init` dir (as on two machines). A revocation
made by one controller holds whatever the others push afterwards: the revocation list
lives in JetStream KV (controller.nats.account), not in each controller's trust dir.

A stale account JWT pushed by anyone (one without those revocations) is answered at once:
every controller watches the account update subjects and pushes its own again.

Checked with raw nats-py connects using the nodes' own credentials (their enrollment JWT
and nkey), on every server of the cluster, and on an already connected client.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.connection import connect, nkey_jwt_auth
from agent.runtime import Agent
from controller.nats.account import FleetAccount
from controller.nats.operator import push_account_jwt
from controller.nats.permissions import NodeAccess
from controller.service import Controller, RunningController
from tests.fixtures.controller import AgentFactory, controller_config
from tests.fixtures.nats_cluster import NatsCluster
from tests.fixtures.wait import wait_for


def frozen_creds(agent: Agent) -> dict[str, Any]:
    """nats-py options with the node's nkey and the JWT it holds now (what a thief keeps)."""
    assert agent.state is not None and agent.identity is not None
    token = agent.state.nats_jwt
    assert token
    return nkey_jwt_auth(lambda: token, agent.identity.sign)


async def connects(url: str, opts: dict[str, Any]) -> str:
    """"ok" when a raw connect with ``opts`` is accepted, else the refusal."""
    try:
        nc = await connect(servers=[url], allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=5, **opts)
    except Exception as exc:
        return f"refused: {exc}"
    await nc.close()
    return "ok"


async def watch_closed(url: str, opts: dict[str, Any]) -> tuple[Any, asyncio.Event]:
    gone = asyncio.Event()

    async def on_gone() -> None:
        gone.set()

    nc = await connect(servers=[url], allow_reconnect=False, max_reconnect_attempts=0,
                       disconnected_cb=on_gone, closed_cb=on_gone, **opts)
    return nc, gone


def refused(answer: str) -> bool:
    return answer.startswith("refused") and (
        "authorization" in answer.lower() or "revoked" in answer.lower())


async def refused_everywhere(cluster: NatsCluster, opts: dict[str, Any]) -> bool:
    return all([refused(await connects(url, opts)) for url in cluster.urls])


async def all_refused_everywhere(cluster: NatsCluster, nodes: list[dict[str, Any]]) -> bool:
    return all([await refused_everywhere(cluster, opts) for opts in nodes])


def settled(*controllers: RunningController) -> bool:
    """No push or shared write a watch started still runs on any of ``controllers``."""
    return all(c.admission.settled for c in controllers)  # type: ignore[attr-defined]


async def assert_refused_everywhere(cluster: NatsCluster, opts: dict[str, Any]) -> None:
    for url in cluster.urls:
        answer = await connects(url, opts)
        assert refused(answer), (url, answer)


@asynccontextmanager
async def controller_on(
    cluster: NatsCluster, base: Path, server: int, *, deployment: Path | None = None
) -> AsyncIterator[RunningController]:
    """A controller on the cluster with its own data dir and its own copy of the
    deployment dir (made from the cluster's when missing: the same keys, on another
    machine), talking to server ``server``; agents use the last server."""
    dep = deployment or base / "deployment"
    if not dep.exists():
        shutil.copytree(cluster.deployment, dep)
    cfg = controller_config(base / "data", nats_url=cluster.urls[server], nats_trust=str(dep),
                            agent_nats_url=cluster.urls[-1])
    async with Controller(cfg) as c:
        yield c


async def test_a_revocation_holds_whatever_another_controller_pushes(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    cluster = nats_cluster
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(controller_on(cluster, tmp_path / "a", 0))
        b = await stack.enter_async_context(controller_on(cluster, tmp_path / "b", 1))
        factory = AgentFactory(a, tmp_path / "agents")
        await stack.enter_async_context(factory.stack)
        x, y, w, z = [await factory.start(labels={"n": name}) for name in "xyzw"]
        creds = {agent.node_id: frozen_creds(agent) for agent in (x, y, w, z)}
        keys = {agent.node_id: agent.identity.public_key  # type: ignore[union-attr]
                for agent in (x, y, w, z)}
        for agent in (x, y, w, z):  # every node gets in, on every server
            for url in cluster.urls:
                assert await connects(url, creds[agent.node_id]) == "ok"

        # A revokes X: its open connection (to another server) goes within a second.
        x_nc, x_gone = await watch_closed(cluster.urls[2], creds[x.node_id])
        t0 = time.monotonic()
        await a.revoke_node(x.node_id)
        await asyncio.wait_for(x_gone.wait(), 1.0)
        print(f"X disconnected {(time.monotonic() - t0) * 1000:.0f} ms after A's revocation")
        await x_nc.close()
        # B learns it from the shared state, and signs nothing for X any more.
        await wait_for(lambda: b.admission.is_revoked(keys[x.node_id]), 5,  # type: ignore[attr-defined]
                       "B to see A's revocation")
        with pytest.raises(Exception, match="revoked"):
            await b.admission.credentials(NodeAccess(node_id=x.node_id, nkey=keys[x.node_id]))

        # B revokes Y (B's push is the last one): X stays out, Y goes within a second.
        y_nc, y_gone = await watch_closed(cluster.urls[0], creds[y.node_id])
        t0 = time.monotonic()
        await b.revoke_node(y.node_id)
        await asyncio.wait_for(y_gone.wait(), 1.0)
        print(f"Y disconnected {(time.monotonic() - t0) * 1000:.0f} ms after B's revocation")
        await y_nc.close()
        # B deletes W: revoked too.
        w_nc, w_gone = await watch_closed(cluster.urls[1], creds[w.node_id])
        await b.delete_node(w.node_id)
        await asyncio.wait_for(w_gone.wait(), 1.0)
        await w_nc.close()
        await wait_for(lambda: a.admission.is_revoked(keys[w.node_id]), 5,  # type: ignore[attr-defined]
                       "A to see B's revocations")
        # Every push the watches started has landed on the server that answered first; the
        # others apply it as they get it: all three refused on every server.
        await wait_for(lambda: settled(a, b), 5, "the pushes the watches started")
        await wait_for(lambda: all_refused_everywhere(
            cluster, [creds[node.node_id] for node in (x, y, w)]), 5,
            "X, Y and W refused on every server")
        z_nc, z_gone = await watch_closed(cluster.urls[2], creds[z.node_id])

        # The shared record holds all three.
        record, _ = await a.account_table.fetch(a.trust.fleet_account)  # type: ignore[union-attr]
        assert isinstance(record, FleetAccount)
        assert {keys[n.node_id] for n in (x, y, w)} <= set(record.revocations)
        assert keys[z.node_id] not in record.revocations

        # A third controller whose trust dir knows no revocation at all (a fresh copy of
        # what `nats init` wrote) pushes the account JWT at its start: built from the
        # shared state, it keeps all three out.
        c_dep = tmp_path / "c" / "deployment"
        shutil.copytree(cluster.deployment, c_dep)
        c_fleet = (c_dep / "trust" / "fleet.jwt").read_text()
        async with controller_on(cluster, tmp_path / "c", 2, deployment=c_dep) as c:
            assert c.trust is not None
            assert {keys[n.node_id] for n in (x, y, w)} <= set(c.trust.revocations)
            assert (c_dep / "trust" / "fleet.jwt").read_text() != c_fleet
        for node in (x, y, w):
            await assert_refused_everywhere(cluster, creds[node.node_id])
        # Anyone's stale push (the account JWT as `nats init` wrote it, without any
        # revocation: an older controller, `nsc push`) is answered at once by A and B.
        sys_nc = await connect(servers=[cluster.urls[1]],
                               **a.nats_identities.system_credentials())  # type: ignore[union-attr]
        assert a.trust is not None
        try:
            t0 = time.monotonic()
            await push_account_jwt(sys_nc, c_fleet, operator_key=a.trust.operator_key)
        finally:
            await sys_nc.close()

        async def all_refused() -> bool:
            for node in (x, y, w):
                for url in cluster.urls:
                    if await connects(url, creds[node.node_id]) == "ok":
                        return False
            return True

        deadline = time.monotonic() + 3
        while not await all_refused():
            assert time.monotonic() < deadline, "a stale push let a revoked node back in"
            await asyncio.sleep(0.05)
        print(f"stale push undone within {(time.monotonic() - t0) * 1000:.0f} ms")
        # and the node never revoked stayed connected through all of it
        assert not z_gone.is_set() and z_nc.is_connected
        assert await connects(cluster.urls[0], creds[z.node_id]) == "ok"
        await z_nc.close()


async def test_concurrent_revocations_on_two_controllers_all_hold(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """A and B revoke at the same moment (their compare-and-sets race): every revocation
    is in the shared record and in force afterwards."""
    cluster = nats_cluster
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(controller_on(cluster, tmp_path / "a", 0))
        b = await stack.enter_async_context(controller_on(cluster, tmp_path / "b", 1))
        factory = AgentFactory(a, tmp_path / "agents")
        await stack.enter_async_context(factory.stack)
        nodes = [await factory.start() for _ in range(6)]
        creds = {n.node_id: frozen_creds(n) for n in nodes}
        await asyncio.gather(*(
            (a if i % 2 else b).revoke_node(n.node_id) for i, n in enumerate(nodes)))
        record, _ = await b.account_table.fetch(b.trust.fleet_account)  # type: ignore[union-attr]
        assert {n.identity.public_key for n in nodes} <= set(  # type: ignore[union-attr]
            record.revocations)
        await wait_for(lambda: settled(a, b), 5, "the pushes the watches started")
        await wait_for(lambda: all_refused_everywhere(cluster, list(creds.values())), 5,
                       "all six refused on every server")


async def test_a_controller_restart_keeps_revocations(tmp_path: Path) -> None:
    """On the embedded server: revoke, stop, lose the trust dir's copy of the account JWT's
    revocations (an older fleet.jwt back from a backup), start again: still refused (the
    shared record in KV brings them back and the start pushes them)."""
    cfg = controller_config(tmp_path / "ctl")
    trust_dir = tmp_path / "ctl" / "nats" / "trust"
    async with Controller(cfg) as c:
        before = (trust_dir / "fleet.jwt").read_bytes()
        factory = AgentFactory(c, tmp_path / "agents")
        async with factory.stack:
            victim = await factory.start()
            creds = frozen_creds(victim)
            assert await connects(c.nats_url, creds) == "ok"
            await c.revoke_node(victim.node_id)
            assert (await connects(c.nats_url, creds)).startswith("refused")
        url = c.nats_url
    (trust_dir / "fleet.jwt").write_bytes(before)  # mode kept (0600)
    async with Controller(cfg) as c:
        assert c.nats_url == url and c.trust is not None
        assert victim.identity is not None
        assert victim.identity.public_key in c.trust.revocations
        answer = await connects(c.nats_url, creds)
        assert answer.startswith("refused") and "authorization" in answer.lower(), answer
        record = c.account_table.get(c.trust.fleet_account)  # type: ignore[union-attr]
        assert record is not None and victim.identity.public_key in record.revocations

