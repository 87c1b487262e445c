"""Enrollment against a real nats-server: tokens, identity, refusals, least privilege."""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from agent.identity import EnrollState
from agent.runtime import Agent, EnrollmentError
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import EnrollReply, Heartbeat
from tests.fixtures.controller import AgentFactory
from tests.fixtures.enroll import enroll_raw, node_opts, signed_request
from tests.fixtures.nats import confirm
from tests.fixtures.wait import wait_for


async def test_agent_enrolls_with_valid_token(controller: RunningController, agents: AgentFactory):
    agent = await agents.start(labels={"provider": "aws", "region": "us-east-1"})
    node = controller.fleet.get(agent.node_id)
    assert node.labels == {"provider": "aws", "region": "us-east-1"}
    assert agent.identity is not None and node.identity == agent.identity.public_key
    assert node.status == "online"
    # identity and state are private to the machine
    seed = agent.config.state_dir / "identity.nk"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    assert stat.S_IMODE((agent.config.state_dir / "state.json").stat().st_mode) == 0o600
    assert seed.read_bytes().startswith(b"SU")
    saved = EnrollState.load(agent.config.state_dir / "state.json")
    assert saved is not None and saved.node_id == agent.node_id and saved.auth == "nkey"
    # it reconnected with its own nkey: heartbeats arrive
    await wait_for(
        lambda: controller.fleet.last_beat(agent.node_id) is not None, what="a heartbeat"
    )
    (token,) = list(controller.tokens_table)
    assert token.used_by == agent.node_id
    # only a hash of the token's secret is stored
    assert agent.config.token.rsplit(".", 1)[1] not in msgspec.json.encode(token).decode()


async def test_agent_labels_merge_token_wins(controller: RunningController, agents: AgentFactory):
    tok = await controller.tokens.create(labels={"provider": "gcp"})
    agent = Agent(config=agents.config(tok.token, labels={"provider": "spoofed", "role": "db"}))
    async with agent:
        assert controller.fleet.get(agent.node_id).labels == {"provider": "gcp", "role": "db"}


async def test_reused_token_is_refused(controller: RunningController, agents: AgentFactory):
    tok = await controller.tokens.create(labels={"provider": "aws"})
    first = await agents.start(token=tok.token)
    second = Agent(config=agents.config(tok.token))
    with pytest.raises(EnrollmentError) as err:
        async with second:
            pass
    assert err.value.code == "token_used"
    assert "already used" in err.value.message and "barista token create" in err.value.message
    assert [n.id for n in controller.fleet.select()] == [first.node_id]
    assert not (second.config.state_dir / "state.json").exists()


async def test_expired_token_is_refused(controller: RunningController, agents: AgentFactory):
    tok = await controller.tokens.create()
    await controller.tokens_table.mutate(
        tok.record.id, lambda t: msgspec.structs.replace(t, expires_at=time.time() - 1)
    )
    with pytest.raises(EnrollmentError) as err:
        async with Agent(config=agents.config(tok.token)):
            pass
    assert err.value.code == "token_expired"
    assert len(controller.fleet.nodes) == 0


@pytest.mark.parametrize(
    "token",
    [
        "bt1.0123456789abcdef.thisisnotthesecretatall00000",  # unknown id
        "garbage",
        "bt1.zz.short",
    ],
)
async def test_unknown_or_malformed_token_is_refused(
    controller: RunningController, agents: AgentFactory, token: str
):
    with pytest.raises(EnrollmentError) as err:
        async with Agent(config=agents.config(token)):
            pass
    assert err.value.code == "bad_token"
    assert len(controller.fleet.nodes) == 0
    assert controller.stats.enrollments_refused == 1


async def test_right_id_wrong_secret_is_refused(
    controller: RunningController, agents: AgentFactory
):
    tok = await controller.tokens.create()
    forged = tok.token.rsplit(".", 1)[0] + ".A" + "b" * 42
    with pytest.raises(EnrollmentError) as err:
        async with Agent(config=agents.config(forged)):
            pass
    assert err.value.code == "bad_token"
    # the real token is still usable
    agent = await agents.start(token=tok.token)
    assert controller.fleet.get(agent.node_id)


async def test_same_machine_retry_is_idempotent(
    controller: RunningController, agents: AgentFactory
):
    """A lost enrollment reply: the same identity retrying the used token gets its node."""
    tok = await controller.tokens.create(labels={"k": "v"})
    agent = await agents.start(token=tok.token)
    assert agent.identity is not None
    req, key = signed_request(tok.token, agent.identity, hostname="again")
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply)
    assert reply.ok and reply.node_id == agent.node_id
    assert len(controller.fleet.nodes) == 1


async def test_enroll_retries_until_controller_appears(
    nats_server_noauth, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Transient errors (no controller answering yet) are retried with backoff."""
    from tests.fixtures.controller import controller_config

    nats_server = nats_server_noauth
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_server.url)
    from agent.config import AgentConfig

    holder: dict[str, Agent] = {}

    async def run_agent(token_future: asyncio.Future[str]) -> None:
        token = await token_future
        agent = Agent(
            config=AgentConfig(
                nats_urls=[nats_server.url],
                token=token,
                state_dir=tmp_path / "a",
                hostname="late",
                collectors=["load"],
            )
        )
        holder["agent"] = agent
        await agent.start()

    # The token must exist before the agent asks; so create it with a first controller
    # run, stop that controller, start the agent, and only then the second controller.
    async with Controller(cfg) as c:
        token = (await c.tokens.create()).token
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_agent(fut))
    fut.set_result(token)

    def failed_attempts() -> int:
        return sum("enrollment attempt" in r.getMessage() and "retrying" in r.getMessage()
                   for r in caplog.records)

    # The agent is retrying against a NATS with no controller: two failed attempts logged
    # (the second after a backoff), and it has neither given up nor enrolled.
    await wait_for(lambda: failed_attempts() >= 2, what="two failed enrollment attempts")
    assert not task.done()
    try:
        async with Controller(cfg) as c:
            await asyncio.wait_for(task, 20)
            agent = holder["agent"]
            assert c.fleet.get(agent.node_id)
            # external NATS: the controller does not manage identities
            assert agent.state is not None and agent.state.auth == "none"
    finally:
        if "agent" in holder:
            await holder["agent"].stop()
        task.cancel()


async def test_node_cannot_publish_as_another_node(
    controller: RunningController, agents: AgentFactory
):
    a = await agents.start()
    b = await agents.start()
    seen: list[bytes] = []

    async def on_msg(msg):
        seen.append(msg.data)

    sub = await controller.nc.subscribe(controller.subjects.heartbeat(b.node_id), cb=on_msg)
    await confirm(controller.nc)  # listening before the forgery, or missing it proves nothing
    errors: list[Exception] = []

    async def err_cb(exc: Exception) -> None:
        errors.append(exc)

    # Connect as node A with its own seed, then try to impersonate B.
    assert a.state is not None
    nc = await nats.connect(
        controller.nats_url,
        **node_opts(a),
        inbox_prefix=a.state.inbox_prefix.encode(),
        error_cb=err_cb,
    )
    try:
        forged = Heartbeat(node_id=b.node_id, seq=1, ts=time.time())
        await nc.publish(controller.subjects.heartbeat(b.node_id), codec.encode(forged))
        await nc.flush()
        await wait_for(lambda: errors, what="a permissions violation")
        # B's own heartbeats, sent after the forgery was refused, reach the same
        # subscription in order: once one has, the forgery would have arrived before it.
        refused_at = time.time()
        await wait_for(
            lambda: any(codec.decode(d, Heartbeat).ts > refused_at for d in seen),
            what="a heartbeat of B sent after the forgery",
        )
        assert "permissions violation" in str(errors[0]).lower()
        # and it cannot read B's commands
        with pytest.raises(nats.errors.Error):
            s = await nc.subscribe(controller.subjects.cmd_node(b.node_id))
            await nc.flush()
            await wait_for(lambda: len(errors) > 1, what="a subscribe violation")
            raise nats.errors.Error(str(errors[-1]))
        del s
    finally:
        await nc.close()
        await sub.unsubscribe()
    assert all(codec.decode(d, Heartbeat).node_id == b.node_id for d in seen)
    assert not any(
        codec.decode(d, Heartbeat).seq == 1 and codec.decode(d, Heartbeat).ts == forged.ts
        for d in seen
    )
