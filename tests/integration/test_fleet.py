"""Liveness, metric batches, hostile payloads and controller restarts, with real NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from agent.runtime import Agent
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import ErrorReply, Event, Heartbeat, MetricBatch, NodeStatusChanged
from tests.fixtures.controller import AgentFactory, controller_config
from tests.fixtures.enroll import enroll_opts
from tests.fixtures.wait import wait_for


def spawn_agent(controller: RunningController, token: str, state_dir: Path, log: Path):
    token_file = state_dir.parent / f"{state_dir.name}.token"
    token_file.write_text(controller.tokens.join_text(token))  # what the join line holds
    token_file.chmod(0o600)
    log_f = open(log, "wb")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--nats-url",
                controller.agent_nats_url,
                "--token-file",
                str(token_file),
                "--state-dir",
                str(state_dir),
                "--hostname",
                "proc",
                "--heartbeat-interval",
                "0.2",
                "--metrics-interval",
                "0.5",
            ],
            stdout=log_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log_f.close()


async def test_killed_agent_goes_stale_then_offline(controller: RunningController, tmp_path: Path):
    events: list[Event] = []

    async def on_event(msg):
        events.append(codec.decode(msg.data, Event))

    await controller.nc.subscribe(controller.subjects.controller_events, cb=on_event)
    tok = await controller.tokens.create(labels={"provider": "aws"})
    proc = spawn_agent(controller, tok.token, tmp_path / "a", tmp_path / "a.log")
    try:
        node = await wait_for(
            lambda: next(iter(controller.fleet.select()), None), 20, "the agent to enroll"
        )
        assert node is not None
        await wait_for(lambda: controller.fleet.last_beat(node.id) is not None, 10, "a heartbeat")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        await wait_for(lambda: controller.fleet.get(node.id).status == "stale", 10, "stale")
        await wait_for(lambda: controller.fleet.get(node.id).status == "offline", 10, "offline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # the transition is persisted, not only in memory
    stored, _ = await controller.nodes.fetch(node.id)
    assert stored.status == "offline"
    await wait_for(lambda: len([e for e in events if e.type == "node.status"]) >= 2, 5)
    moves = [(e.payload.old, e.payload.new) for e in events
             if isinstance(e.payload, NodeStatusChanged)]
    assert moves[:2] == [("online", "stale"), ("stale", "offline")]


async def test_sigterm_stops_agent_cleanly(controller: RunningController, tmp_path: Path):
    tok = await controller.tokens.create()
    proc = spawn_agent(controller, tok.token, tmp_path / "a", tmp_path / "a.log")
    try:
        await wait_for(lambda: len(controller.fleet.nodes) == 1, 20, "enrollment")
        proc.send_signal(signal.SIGTERM)
        # Waited for in a thread: the controller serving this agent runs on this loop.
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in (tmp_path / "a.log").read_text()


async def test_offline_node_comes_back_online(controller: RunningController, agents: AgentFactory):
    agent = await agents.start()
    await agent.stop()
    await wait_for(lambda: controller.fleet.get(agent.node_id).status == "offline", 10)
    again = Agent(config=agent.config)  # same state dir: no re-enrollment, same identity
    async with again:
        assert again.node_id == agent.node_id
        await wait_for(lambda: controller.fleet.get(agent.node_id).status == "online", 10)


async def test_metric_batches_arrive_and_decode(
    controller: RunningController, agents: AgentFactory
):
    batches: list[MetricBatch] = []

    async def on_batch(msg):
        batches.append(codec.decode(msg.data, MetricBatch))

    agent = await agents.start(labels={"provider": "gcp", "region": "europe-west1", "role": "web"})
    await controller.nc.subscribe(controller.subjects.metrics(agent.node_id), cb=on_batch)
    await wait_for(lambda: len(batches) >= 2, 10, "two metric batches")
    b = batches[-1]
    assert b.node_id == agent.node_id
    assert b.tags == {"node": agent.node_id, "provider": "gcp", "region": "europe-west1"}
    measurements = {p.measurement for p in b.points}
    assert {"cpu", "mem", "system"} <= measurements
    mem = next(p for p in b.points if p.measurement == "mem")
    used_percent = mem.fields["used_percent"]
    assert isinstance(used_percent, (int, float)) and 0 < used_percent <= 100
    assert batches[-1].seq > batches[0].seq
    # also stored durably in the METRICS stream, and the API's latest view has it
    info = await controller.js.stream_info("METRICS")
    assert info.state.messages >= 2
    assert controller.hub.latest(agent.node_id) is not None


@pytest.fixture
async def enroll_nc(controller: RunningController) -> AsyncIterator[NATS]:
    """A client with the enroll credentials, asking from the enroll inbox as agents do."""
    client = await nats.connect(controller.nats_url, **enroll_opts(controller))
    try:
        yield client
    finally:
        await client.close()


async def test_garbage_on_every_subject_is_rejected_and_counted(
    controller: RunningController, agents: AgentFactory, enroll_nc: NATS
):
    nc, s = controller.nc, controller.subjects
    agent = await agents.start()
    # Requests come as peers ask them: enrollment from the enroll inbox, app sync from the
    # node's own connection on its own subject (other reply subjects get no answer).
    assert agent.nc is not None
    garbage = [
        b"",
        b"\x00\xff garbage",
        msgspec.msgpack.encode({"kind": "hb"}),
        msgspec.msgpack.encode({"kind": "from-the-future", "v": 1}),
        msgspec.msgpack.encode({"kind": "hb", "v": 99, "node_id": "x", "seq": 1, "ts": 1.0}),
        msgspec.msgpack.encode([1, 2, 3]),
    ]
    for data in garbage:
        reply = await enroll_nc.request(s.enroll, data, timeout=5)
        assert type(codec.decode(reply.data)).__name__ == "ErrorReply"  # an answer, not silence
        await nc.publish(s.heartbeat(agent.node_id), data)
        await nc.publish(s.metrics(agent.node_id), data)
        await nc.publish(s.events(agent.node_id), data)
        await nc.publish(s.results(agent.node_id), data)
        sync = await agent.nc.request(s.app_sync(agent.node_id), data, timeout=5)
        assert type(codec.decode(sync.data)).__name__ == "ErrorReply"
    # oversized for the heartbeat and enrollment limits
    big = b"\x81" + b"x" * (200 * 1024)
    await nc.publish(s.heartbeat(agent.node_id), big)
    await enroll_nc.request(s.enroll, big, timeout=5)
    # valid message under another node's subject (impersonation)
    hb = Heartbeat(node_id="someone-else", seq=1, ts=1.0)
    await nc.publish(s.heartbeat(agent.node_id), codec.encode(hb))
    await nc.flush()
    n = len(garbage)
    await wait_for(
        lambda: (
            controller.stats.rejected["heartbeat"] >= n + 2
            and controller.stats.rejected["metrics"] >= n
            and controller.stats.rejected["enroll"] >= n + 1
            and controller.stats.rejected["events"] >= n
            and controller.stats.rejected["results"] >= n
        ),
        10,
        "rejections counted",
    )
    # still serving: a new agent enrolls and heartbeats are still counted
    beats = controller.stats.heartbeats
    second = await agents.start()
    assert controller.fleet.get(second.node_id)
    await wait_for(lambda: controller.stats.heartbeats > beats + 2, 10)
    rejected = controller.status()["rejected"]
    assert isinstance(rejected, dict) and rejected["heartbeat"] >= n + 2


async def test_enroll_garbage_gets_a_clear_error_reply(
    controller: RunningController, enroll_nc: NATS
):
    reply = await enroll_nc.request(controller.subjects.enroll, b"\x00junk", timeout=5)
    err = codec.decode(reply.data, ErrorReply)
    assert err.code == "protocol_error"
    assert "msgpack" in err.message or "undecodable" in err.message


async def test_restarted_controller_still_knows_its_nodes(tmp_path: Path):
    cfg = controller_config(tmp_path / "ctl", offline_after=30.0, stale_after=10.0)
    async with Controller(cfg) as c:
        tok = await c.tokens.create(labels={"provider": "azure"})
        agent = Agent(config=_agent_cfg(c, tok.token, tmp_path / "a"))
        await agent.start()
        node_id = agent.node_id
    # the controller and its embedded NATS are gone; the agent keeps retrying
    try:
        async with Controller(cfg) as c2:
            node = c2.fleet.get(node_id)
            assert node.labels == {"provider": "azure"}
            # the embedded NATS admits the node's identity again after the restart
            await wait_for(
                lambda: c2.fleet.last_beat(node_id) is not None, 15, "heartbeat after restart"
            )
            assert c2.fleet.get(node_id).status == "online"
            # the used token stays used
            assert next(iter(c2.tokens_table)).used_by == node_id
    finally:
        await agent.stop()


def _agent_cfg(c: RunningController, token: str, state_dir: Path):
    from agent.config import AgentConfig

    return AgentConfig(
        nats_urls=[c.agent_nats_url],
        token=c.tokens.join_text(token),
        state_dir=state_dir,
        hostname="restart",
        collectors=["load"],
        heartbeat_interval=0.2,
    )


async def test_two_controllers_share_state(tmp_path: Path, nats_server_noauth):
    """Controllers are stateless apart from NATS: a second one sees the first one's nodes."""
    cfg1 = controller_config(tmp_path / "c1", nats_url=nats_server_noauth.url)
    cfg2 = controller_config(tmp_path / "c2", nats_url=nats_server_noauth.url)
    async with Controller(cfg1) as c1, Controller(cfg2) as c2:
        tok = await c1.tokens.create(labels={"provider": "onprem"})
        async with Agent(config=_agent_cfg(c1, tok.token, tmp_path / "a")) as agent:
            await wait_for(lambda: c2.nodes.get(agent.node_id), 10, "watch to propagate")
            await wait_for(lambda: c2.fleet.last_beat(agent.node_id) is not None, 10)
        # one-time tokens hold across controllers: c2 refuses the token c1 consumed
        from controller.errors import TokenRefused

        try:
            await c2.tokens.consume(tok.token, node_id="x", identity="U" + "A" * 55)
            raise AssertionError("a used token was accepted by the second controller")
        except TokenRefused as exc:
            assert exc.code == "token_used"


async def test_token_used_elsewhere_is_refused_from_a_stale_copy(
    tmp_path: Path, nats_server_noauth
):
    """A controller whose watched copy of a token is stale (c2's watch is stopped, so it
    still sees the token unused) decides on the server's record: the compare-and-set
    against its old revision fails, another identity is refused and the identity that
    used the token gets its own node back (the idempotent retry)."""
    from controller.errors import TokenRefused

    cfg1 = controller_config(tmp_path / "c1", nats_url=nats_server_noauth.url)
    cfg2 = controller_config(tmp_path / "c2", nats_url=nats_server_noauth.url)
    async with Controller(cfg1) as c1, Controller(cfg2) as c2:
        tok = await c1.tokens.create()
        await wait_for(lambda: c2.tokens_table.get(tok.record.id), 10, "watch to propagate")
        await c2.tokens_table.stop()  # c2's copy of the token stays "unused" from now on
        first, other = "U" + "A" * 55, "U" + "B" * 55
        used = await c1.tokens.consume(tok.token, node_id="n1", identity=first)
        stale = c2.tokens_table.get(tok.record.id)
        assert stale is not None and stale.used_by == ""  # stale indeed
        with pytest.raises(TokenRefused) as refused:
            await c2.tokens.consume(tok.token, node_id="n2", identity=other)
        assert refused.value.code == "token_used"
        again = await c2.tokens.consume(tok.token, node_id="n3", identity=first)
        assert (again.used_by, again.used_by_identity) == ("n1", first) == (
            used.used_by, used.used_by_identity)
