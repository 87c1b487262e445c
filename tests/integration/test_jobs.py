"""Fleet commands with real NATS and real agents: targeting, timeouts, signatures, batches."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import msgspec
import pytest

from agent.runtime import Agent
from controller.jobs.engine import JobSpec
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import Command, CommandResult
from protocol.signing import CommandSigner
from tests.fixtures.controller import AgentFactory, controller_config, run_cli
from tests.fixtures.enroll import node_opts
from tests.fixtures.wait import wait_for


def runs(marker_dir: Path) -> list[str]:
    return sorted(p.name for p in marker_dir.iterdir()) if marker_dir.exists() else []


async def test_selector_targets_only_matching_nodes(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    aws1 = await agents.start(labels={"provider": "aws"})
    await agents.start(labels={"provider": "gcp"})
    aws2 = await agents.start(labels={"provider": "aws"})
    marks = tmp_path / "marks"
    marks.mkdir()
    job = await controller.jobs.run(
        JobSpec(shell=f"mktemp -p {marks}; echo done", selector="provider=aws", timeout=10)
    )
    results = await controller.jobs.results(job.id)
    assert sorted(r.node_id for r in results) == sorted([aws1.node_id, aws2.node_id])
    assert all(r.status == "ok" and r.stdout.endswith("done\n") for r in results)
    assert len(runs(marks)) == 2  # the gcp node ran nothing
    assert job.status == "done" and job.counts == {"ok": 2}


@pytest.mark.parametrize("mode", ["broadcast", "direct"])
async def test_finishes_early_when_all_replied(
    controller: RunningController, agents: AgentFactory,
    mode: Literal["broadcast", "direct"],
):
    for _ in range(3):
        await agents.start(labels={"role": "web"})
    job = await controller.jobs.run(
        JobSpec(action="ping", selector="role=web", timeout=30, mode=mode)
    )
    assert job.counts == {"ok": 3}
    assert job.finished_at - job.created_at < 10  # far below the 30 s timeout
    results = await controller.jobs.results(job.id)
    assert all(r.data["labels"] == {"role": "web"} for r in results)


async def test_dead_agent_is_no_response_and_job_ends_at_timeout(
    controller: RunningController, agents: AgentFactory
):
    alive = await agents.start(labels={"g": "1"})
    dead = await agents.start(labels={"g": "1"})
    # Kill without a goodbye: the controller still believes it is online.
    for t in dead._tasks:
        t.cancel()
    assert dead.nc is not None
    await dead.nc.close()
    t0 = time.monotonic()
    job = await controller.jobs.run(
        JobSpec(shell="echo ok", selector="g=1", timeout=1.0, mode="direct")
    )
    took = time.monotonic() - t0
    by_node = {r.node_id: r for r in await controller.jobs.results(job.id)}
    assert by_node[alive.node_id].status == "ok"
    assert by_node[dead.node_id].status == "no-response"
    assert "no reply" in by_node[dead.node_id].reason
    assert job.status == "done" and job.counts == {"ok": 1, "no-response": 1}
    assert took >= 1.0  # it waited for the straggler up to the timeout


async def test_offline_node_is_reported_without_waiting(
    controller: RunningController, agents: AgentFactory
):
    a = await agents.start(labels={"g": "2"})
    b = await agents.start(labels={"g": "2"})
    await b.stop()
    await wait_for(lambda: controller.fleet.get(b.node_id).status == "offline", 10)
    job = await controller.jobs.run(JobSpec(action="ping", selector="g=2", timeout=30))
    by_node = {r.node_id: r for r in await controller.jobs.results(job.id)}
    assert by_node[a.node_id].status == "ok"
    assert by_node[b.node_id].status == "no-response"
    assert by_node[b.node_id].reason == "node is offline"
    assert job.finished_at - job.created_at < 10


async def test_timeout_kills_command_and_children(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    await agents.start()
    pidfile = tmp_path / "child.pid"
    job = await controller.jobs.run(
        JobSpec(shell=f"sleep 60 & echo $! > {pidfile}; sleep 60", timeout=1.0)
    )
    (r,) = await controller.jobs.results(job.id)
    assert r.status == "timeout"
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{child}/stat")
        return stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z"

    await wait_for(gone, 10, "the background child to be killed")


async def test_output_over_cap_is_truncated_and_marked(
    controller: RunningController, agents: AgentFactory
):
    await agents.start()
    job = await controller.jobs.run(
        JobSpec(shell="head -c 100000 /dev/zero | tr '\\0' x", output_cap=1000, timeout=10)
    )
    (r,) = await controller.jobs.results(job.id)
    assert r.status == "ok" and len(r.stdout) == 1000 and r.stdout_truncated


async def _send(controller: RunningController, node_id: str, payload: bytes) -> CommandResult:
    """Publish a command to one node and wait for its result on the node's results subject."""
    nc = controller.nc
    sub = await nc.subscribe(controller.subjects.results(node_id))
    try:
        await nc.flush()
        await nc.publish(controller.subjects.cmd_node(node_id), payload)
        msg = await sub.next_msg(timeout=10)
    finally:
        await sub.unsubscribe()
    return codec.decode(msg.data, CommandResult)


def _cmd(marks: Path, **kw: object) -> Command:
    cmd = Command(id=os.urandom(8).hex(), job_id="manual-" + os.urandom(4).hex(),
                  issued_at=time.time(), ttl=60.0, action="exec",
                  shell=f"mktemp -p {marks}", timeout=10.0)
    return msgspec.structs.replace(cmd, **kw)


async def test_forged_command_is_rejected_and_not_run(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    agent = await agents.start()
    marks = tmp_path / "m"
    marks.mkdir()
    mallory = CommandSigner.generate()
    res = await _send(controller, agent.node_id, codec.encode(mallory.sign(_cmd(marks))))
    assert res.status == "rejected" and "signature" in res.reason
    # a valid signature over a modified payload is also refused
    good = controller.secrets.signer.sign(_cmd(marks))
    tampered = msgspec.structs.replace(good, payload=good.payload.replace(b"mktemp", b"mkTemp"))
    res = await _send(controller, agent.node_id, codec.encode(tampered))
    assert res.status == "rejected"
    assert runs(marks) == [] and agent.rejected_commands == 2


async def test_replayed_command_is_rejected_and_not_run(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    agent = await agents.start()
    marks = tmp_path / "m"
    marks.mkdir()
    signed = codec.encode(controller.secrets.signer.sign(_cmd(marks)))
    first = await _send(controller, agent.node_id, signed)
    assert first.status == "ok"
    again = await _send(controller, agent.node_id, signed)
    assert again.status == "rejected" and "already accepted" in again.reason
    assert len(runs(marks)) == 1


async def test_expired_command_is_rejected_and_not_run(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    agent = await agents.start()
    marks = tmp_path / "m"
    marks.mkdir()
    old = _cmd(marks, issued_at=time.time() - 3600, ttl=60.0)
    res = await _send(controller, agent.node_id, codec.encode(controller.secrets.signer.sign(old)))
    assert res.status == "rejected" and "expired" in res.reason
    future = _cmd(marks, issued_at=time.time() + 3600)
    res = await _send(
        controller, agent.node_id, codec.encode(controller.secrets.signer.sign(future))
    )
    assert res.status == "rejected" and "future" in res.reason
    await controller.nc.publish(controller.subjects.cmd_node(agent.node_id), b"\x00garbage")
    await wait_for(lambda: agent.rejected_commands == 3, 5, "the garbage to be refused")
    assert runs(marks) == []


async def test_rejections_are_reported_in_the_job(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    """An agent that does not trust this controller's key answers 'rejected'."""
    other = CommandSigner.generate()
    tok = await controller.tokens.create(labels={"g": "r"})
    agent = Agent(config=agents.config(tok.token, controller_keys=[other.public_key_b64]))
    async with agent:
        job = await controller.jobs.run(JobSpec(action="ping", selector="g=r", timeout=5))
        (r,) = await controller.jobs.results(job.id)
        assert r.status == "rejected" and "signature" in r.reason
        assert job.counts == {"rejected": 1}


async def test_batch_rollout_stops_at_failure_threshold(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    for _ in range(4):
        await agents.start(labels={"tier": "app"})
    marks = tmp_path / "m"
    marks.mkdir()
    job = await controller.jobs.run(
        JobSpec(
            shell=f"mktemp -p {marks}; exit 1",
            selector="tier=app",
            batch="1",
            max_failures="1",
            timeout=10,
        )
    )
    assert job.status == "stopped" and "exceed max_failures 1" in job.stop_reason
    assert job.counts == {"failed": 2, "skipped": 2}
    assert len(runs(marks)) == 2  # batches 3 and 4 never ran
    results = await controller.jobs.results(job.id)
    # batch 0 failed (1 failure, within max_failures 1), batch 1 failed (2: stop), in order
    assert [r.batch for r in results if r.status == "failed"] == [0, 1]


async def test_percent_batches_all_succeed(controller: RunningController, agents: AgentFactory):
    for _ in range(4):
        await agents.start(labels={"tier": "p"})
    job = await controller.jobs.run(
        JobSpec(shell="true", selector="tier=p", batch="50%", max_failures="10%", timeout=10)
    )
    assert job.status == "done" and job.batches == 2 and job.counts == {"ok": 4}
    assert {r.batch for r in await controller.jobs.results(job.id)} == {0, 1}


async def test_reply_from_unexpected_node_is_recorded(
    controller: RunningController, agents: AgentFactory
):
    """Label drift: the agent still believes in a label the inventory no longer has."""
    a = await agents.start(labels={"role": "db"})
    b = await agents.start(labels={"role": "db"})
    await controller.nodes.mutate(
        b.node_id, lambda n: msgspec.structs.replace(n, labels={"role": "web"})
    )
    await wait_for(lambda: controller.fleet.get(b.node_id).labels == {"role": "web"}, 5)
    job = await controller.jobs.run(
        JobSpec(action="ping", selector="role=db", timeout=2, mode="broadcast")
    )
    # The job may finish as soon as the expected node answered; the drifted node's
    # answer is recorded all the same, before or after that.
    async def results():
        return {r.node_id: r for r in await controller.jobs.results(job.id)}

    async def with_drifted():
        by_node = await results()
        return by_node if b.node_id in by_node else None

    by_node = await wait_for(with_drifted, what="the drifted node's answer")
    assert by_node[a.node_id].expected and by_node[a.node_id].status == "ok"
    assert not by_node[b.node_id].expected and by_node[b.node_id].status == "ok"
    assert job.expected == [a.node_id] and job.counts == {"ok": 1}


async def test_bad_job_specs_are_refused(controller: RunningController):
    from controller.errors import BadRequest

    bad = [
        JobSpec(action="rm-rf"),
        JobSpec(),
        JobSpec(argv=["a"], shell="b"),
        JobSpec(shell="x", timeout=0),
        JobSpec(shell="x", batch="lots"),
        JobSpec(shell="x", batch="0"),
        JobSpec(shell="x", max_failures="200%"),
        JobSpec(shell="x", selector="a in ("),
    ]
    for spec in bad:
        with pytest.raises((BadRequest, ValueError)):
            await controller.jobs.submit(spec)
    assert len(controller.jobs_table) == 0


@pytest.mark.slow
async def test_job_history_survives_controller_restart(tmp_path: Path):
    cfg = controller_config(tmp_path / "ctl")
    async with Controller(cfg) as c:
        factory = AgentFactory(c, tmp_path / "agents")
        async with factory.stack:
            await factory.start(labels={"p": "1"})
            await factory.start(labels={"p": "1"})
            job = await c.jobs.run(JobSpec(shell="echo persisted", selector="p=1", timeout=10))
    async with Controller(cfg) as c2:
        again = c2.jobs.get(job.id)
        assert again.status == "done" and again.counts == {"ok": 2}
        assert again.spec.shell == "echo persisted"
        results = await c2.jobs.results(job.id)
        assert len(results) == 2 and all(r.stdout == "persisted\n" for r in results)
        assert [j.id for j in c2.jobs.recent()] == [job.id]


async def test_jobs_api_and_sse(api, http, controller: RunningController, agents: AgentFactory):
    url, token = api
    h = {"Authorization": f"Bearer {token}"}
    for _ in range(2):
        await agents.start(labels={"x": "y"})
    async with http.post(
        url + "/v1/jobs",
        headers=h,
        json={"shell": "sleep 0.3; echo hi", "selector": "x=y", "stream_output": True},
    ) as r:
        assert r.status == 202
        job = await r.json()
        assert job["expected"] == 2 and job["status"] == "running"
    events: list[str] = []
    async with http.get(url + f"/v1/jobs/{job['id']}/events", headers=h) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"event:"):
                events.append(line.decode().split(":", 1)[1].strip())
                if events[-1] == "done":
                    break
    assert events.count("result") == 2 and events[-1] == "done"
    async with http.get(url + f"/v1/jobs/{job['id']}", headers=h) as r:
        body = await r.json()
        assert body["status"] == "done" and len(body["results"]) == 2
    async with http.get(url + "/v1/jobs", headers=h) as r:
        assert [j["id"] for j in (await r.json())["jobs"]] == [job["id"]]
    async with http.post(url + "/v1/jobs", headers=h, json={"shell": "x", "bogus": 1}) as r:
        assert r.status == 400 and "bogus" in (await r.json())["message"]
    async with http.get(url + "/v1/jobs/nope", headers=h) as r:
        assert r.status == 404


async def test_cli_run_exit_codes_and_async(
    api, controller: RunningController, agents: AgentFactory
):
    import json

    url, token = api
    await agents.start(labels={"c": "1"})
    async def cli(*args: str) -> tuple[int, str]:
        code, out, _ = await run_cli(*args, url=url, token=token)
        return code, out

    code, out = await cli("run", "-l", "c=1", "-o", "json", "--", "echo", "hello")
    assert code == 0 and json.loads(out)["results"][0]["stdout"] == "hello\n"
    code, out = await cli("run", "-l", "c=1", "-o", "json", "--", "sh -c 'exit 4'")
    assert code == 1 and json.loads(out)["results"][0]["exit_code"] == 4
    code, out = await cli("run", "--async", "-o", "json", "--", "true")
    assert code == 0
    job_id = json.loads(out)["id"]
    await controller.jobs.wait(job_id)
    code, out = await cli("jobs", "show", job_id, "-o", "json")
    assert code == 0 and json.loads(out)["counts"] == {"ok": 1}
    code, out = await cli("jobs", "ls", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 3


async def test_a_node_cannot_answer_for_another(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    """Results are authenticated by subject: node A cannot file a result as node B."""
    import nats

    a = await agents.start(labels={"f": "1"})
    b = await agents.start(labels={"f": "1"})
    errors: list[Exception] = []
    assert a.state is not None

    async def err_cb(exc: Exception) -> None:
        errors.append(exc)

    mallory = await nats.connect(
        controller.nats_url,
        **node_opts(a),
        inbox_prefix=a.state.inbox_prefix.encode(),
        error_cb=err_cb,
    )
    try:
        job = await controller.jobs.submit(
            JobSpec(shell="sleep 0.5; exit 3", selector="f=1", timeout=10)
        )
        forged = CommandResult(
            job_id=job.id, command_id="x", node_id=b.node_id, status="ok", stdout="FORGED"
        )
        # under B's subject: refused by NATS permissions
        await mallory.publish(controller.subjects.results(b.node_id), codec.encode(forged))
        # under A's own subject, naming B: refused by the controller
        await mallory.publish(controller.subjects.results(a.node_id), codec.encode(forged))
        await mallory.flush()
        done = await controller.jobs.wait(job.id)
    finally:
        await mallory.close()
    by_node = {r.node_id: r for r in await controller.jobs.results(done.id)}
    assert by_node[b.node_id].status == "failed" and by_node[b.node_id].exit_code == 3
    assert by_node[b.node_id].stdout == ""
    assert any("permissions violation" in str(e).lower() for e in errors)
    assert controller.stats.rejected["results"] >= 1


async def test_results_over_the_payload_limit_are_cut_not_lost(
    controller: RunningController, agents: AgentFactory
):
    await agents.start()
    # two streams at a 1 MiB cap each, the second of invalid UTF-8 that grows when decoded
    job = await controller.jobs.run(
        JobSpec(
            shell="head -c 900000 /dev/zero | tr '\\0' a; head -c 600000 /dev/urandom >&2",
            output_cap=1024 * 1024,
            timeout=20,
        )
    )
    (r,) = await controller.jobs.results(job.id)
    assert r.status == "ok", r.reason
    assert r.stdout_truncated and r.stderr_truncated
    assert 0 < len(r.stdout) < 900000
