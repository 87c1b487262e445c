"""Signing-key rotation with a real controller and real agents: agents learn the new key
from a step signed by the old one, accept both during the overlap and only the new one
after the finish; an agent stopped during the rotation catches up at start; a step signed
by an unknown key is refused and counted."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from agent.runtime import Agent
from controller.jobs.engine import JobSpec
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import Command, CommandResult, KeyRotation
from protocol.signing import CommandSigner, Signer
from tests.fixtures.controller import AgentFactory, controller_config, run_cli
from tests.fixtures.nats import confirm
from tests.fixtures.wait import wait_for


async def _send(controller: RunningController, node_id: str, signer: Signer,
                **kw: object) -> CommandResult:
    """A ping signed by ``signer``, sent to one node; its result."""
    cmd = Command(id=os.urandom(8).hex(), job_id="manual-" + os.urandom(4).hex(),
                  issued_at=time.time(), ttl=60.0, action="ping", **kw)  # type: ignore[arg-type]
    nc = controller.nc
    sub = await nc.subscribe(controller.subjects.results(node_id))
    try:
        await nc.flush()
        await nc.publish(controller.subjects.cmd_node(node_id), codec.encode(signer.sign(cmd)))
        msg = await sub.next_msg(timeout=10)
    finally:
        await sub.unsubscribe()
    return codec.decode(msg.data, CommandResult)


async def test_rotate_then_finish(
    controller: RunningController, agents: AgentFactory, api: tuple[str, str]
) -> None:
    old = controller.secrets.signer
    a1 = await agents.start(labels={"g": "k"})
    a2 = await agents.start(labels={"g": "k"})

    code, out, err = await run_cli("keys", "rotate", "--overlap", "1h", "-o", "json",
                                   url=api[0], token=api[1])
    assert code == 0, err
    view = json.loads(out)
    assert view["seq"] == 1 and view["retiring"]["key_id"] == old.key_id
    new_id = view["active"]["key_id"]
    assert new_id != old.key_id and controller.signing_keys.key_id == new_id
    for a in (a1, a2):
        await wait_for(lambda a=a: a.keyring is not None and a.keyring.seq == 1, 5,
                       "the agents to learn the new key")
    # Commands signed by the new key run; the old key still works during the overlap.
    job = await controller.jobs.run(JobSpec(action="ping", selector="g=k", timeout=10))
    assert job.counts == {"ok": 2}
    assert (await _send(controller, a1.node_id, old)).status == "ok"
    # A node enrolling during the overlap is told both keys.
    assert sorted(controller.signing_keys.enroll_keys) == sorted(
        [old.public_key_b64, controller.signing_keys.public_key_b64])
    # The private old key is kept (0600) during the overlap, and goes with the finish.
    kept = controller.config.data_dir / "signing-keys" / f"{old.key_id}.pem"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600

    code, out, err = await run_cli("keys", "rotate", "--finish", "-o", "json",
                                   url=api[0], token=api[1])
    assert code == 0, err
    assert json.loads(out)["retiring"] is None and not kept.exists()
    for a in (a1, a2):
        await wait_for(lambda a=a: a.keyring is not None and a.keyring.seq == 2, 5,
                       "the agents to drop the old key")
    res = await _send(controller, a1.node_id, old)
    assert res.status == "rejected" and "signature" in res.reason
    job = await controller.jobs.run(JobSpec(action="ping", selector="g=k", timeout=10))
    assert job.counts == {"ok": 2}
    # The agents keep what they trust (0600): only the new key.
    path = a1.config.state_dir / "command-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["seq"] == 2 and list(saved["keys"]) == [controller.signing_keys.public_key_b64]
    # A second finish, or a bad request, is a clear error.
    code, _, err = await run_cli("keys", "rotate", "--finish", url=api[0], token=api[1])
    assert code != 0 and "no key rotation in progress" in err
    code, out, _ = await run_cli("keys", "ls", url=api[0], token=api[1])
    assert code == 0 and new_id in out


async def test_agent_stopped_during_rotation_catches_up(
    controller: RunningController, agents: AgentFactory
) -> None:
    old = controller.secrets.signer
    tok = await controller.tokens.create(labels={"g": "off"})
    cfg = agents.config(tok.token)
    async with Agent(config=cfg) as agent:
        node_id = agent.node_id
    await controller.signing_keys.rotate(overlap=3600)
    await controller.signing_keys.finish()
    async with Agent(config=cfg) as agent:
        # The missed steps are fetched at start, before start() returns.
        assert agent.keyring is not None and agent.keyring.seq == 2
        assert agent.node_id == node_id
        job = await controller.jobs.run(JobSpec(action="ping", selector="g=off", timeout=10))
        assert job.counts == {"ok": 1}
        res = await _send(controller, node_id, old)
        assert res.status == "rejected" and "signature" in res.reason
    # A node enrolled after the rotation starts with the new key; the chain changes nothing.
    fresh = await agents.start(labels={"g": "new"})
    assert fresh.keyring is not None and fresh.key_rotations_refused == 0
    job = await controller.jobs.run(JobSpec(action="ping", selector="g=new", timeout=10))
    assert job.counts == {"ok": 1}


async def test_new_agent_keys_come_with_enrollment_and_a_missed_step_with_heartbeat(
    controller: RunningController, agents: AgentFactory
) -> None:
    """A new agent's key ring comes with its enrollment (no key sync request at start); a
    step it could not hear (made before its command subscription existed) is sent to it
    when its heartbeat says it is behind."""
    keys = controller.signing_keys
    keys.missed_interval = 0.5
    await keys.rotate(overlap=3600)
    syncs = keys.stats["syncs"]
    agent = await agents.start(labels={"g": "late"})
    assert agent.keyring is not None and agent.keyring.seq == keys.seq == 1
    assert keys.stats["syncs"] == syncs
    assert agent.commands is not None and agent.nc is not None
    await agent.commands.unsubscribe()  # deaf, as before its subscriptions were made
    await confirm(agent.nc)  # (the server has taken the UNSUBs)
    await keys.finish()
    # The broadcast is at the server before the agent listens again (under load nats-py's
    # flusher could send it after the agent's new SUB, and the agent would hear it; one
    # nats-py flush would not wait for it, tests.fixtures.nats.confirm).
    await confirm(controller.nc)
    await agent.commands.subscribe()
    await wait_for(lambda: agent.keyring is not None and agent.keyring.seq == 2, 10,
                   "the missed step, sent on the heartbeat's word")
    assert keys.stats["missed_sent"] >= 1 and keys.stats["syncs"] == syncs
    assert agent.key_rotations_refused == 0
    job = await controller.jobs.run(JobSpec(action="ping", selector="g=late", timeout=10))
    assert job.counts == {"ok": 1}


async def test_rotation_signed_by_unknown_key_is_refused(
    controller: RunningController, agents: AgentFactory
) -> None:
    agent = await agents.start()
    intruder = CommandSigner.generate()
    rot = KeyRotation(seq=1, issued_at=time.time(), new_key=intruder.public_key_b64,
                      old_key=controller.signing_keys.public_key_b64, finish=False)
    await controller.nc.publish(controller.subjects.cmd_all,
                                codec.encode(intruder.sign_rotation(rot)))
    await wait_for(lambda: agent.key_rotations_refused == 1, 5, "the rotation to be refused")
    assert agent.keyring is not None and agent.keyring.seq == 0
    res = await _send(controller, agent.node_id, intruder)
    assert res.status == "rejected" and "signature" in res.reason
    # A finish signed by an unknown key cannot make the agent drop the real key.
    drop = KeyRotation(seq=1, issued_at=time.time(),
                       new_key=controller.signing_keys.public_key_b64,
                       old_key=controller.signing_keys.public_key_b64, finish=True)
    await controller.nc.publish(controller.subjects.cmd_all,
                                codec.encode(intruder.sign_rotation(drop)))
    assert (await _send(controller, agent.node_id, controller.signing_keys)).status == "ok"


@pytest.mark.parametrize("crash_after_announce", [False, True])
async def test_controller_restart_keeps_the_rotation(
    tmp_path: Path, crash_after_announce: bool
) -> None:
    data = tmp_path / "c"
    async with Controller(controller_config(data)) as c:
        old = c.signing_keys.public_key_b64
        await c.signing_keys.rotate(overlap=3600)
        new = c.signing_keys.public_key_b64
        if crash_after_announce:
            # As if the controller died after announcing the new key, before the swap.
            (data / "signing-keys").joinpath(
                f"{c.signing_keys.key_id}.pem").write_bytes((data / "signing-key.pem")
                                                            .read_bytes())
            (data / "signing-key.pem").write_bytes(
                (data / "signing-keys" / f"{c.secrets.signer.key_id}.pem").read_bytes())
    async with Controller(controller_config(data)) as c:
        assert c.signing_keys.public_key_b64 == new and c.signing_keys.seq == 1
        ret = c.signing_keys.retiring()
        assert ret is not None and ret.old_key == old
        await c.signing_keys.finish()
        assert c.signing_keys.view()["retiring"] is None


async def test_overlap_ends_by_itself(
    controller: RunningController, agents: AgentFactory
) -> None:
    """Without --finish, the controller finishes when the overlap has passed."""
    old = controller.secrets.signer
    agent = await agents.start()
    await controller.signing_keys.rotate(overlap=0.5)
    await wait_for(lambda: controller.signing_keys.seq == 2, 10, "the automatic finish")
    await wait_for(lambda: agent.keyring is not None and agent.keyring.seq == 2, 5,
                   "the agent to drop the old key")
    res = await _send(controller, agent.node_id, old)
    assert res.status == "rejected" and "signature" in res.reason
    assert (await _send(controller, agent.node_id, controller.signing_keys)).status == "ok"
