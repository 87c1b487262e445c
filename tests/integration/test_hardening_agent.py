"""Issue 8, agent findings: env in broadcasts (#6), replay after restart (#7), orphans after
kill -9 (#8), the join token on the command line (#15a), start() dying of a slow server (#16).

Real components only: the controller's embedded nats-server, agents in-process and as
processes, raw nats-py clients with a node's own nkey, kill -9 and SIGSTOP of real pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from agent.config import AgentConfig
from agent.identity import EnrollState
from agent.runtime import Agent
from controller.errors import BadRequest
from controller.jobs.engine import JobSpec
from controller.nats.server import NatsServer
from controller.service import RunningController
from protocol import codec
from protocol.messages import Command, CommandResult
from protocol.signing import CommandSigner
from tests.fixtures.controller import AgentFactory
from tests.fixtures.enroll import node_opts
from tests.fixtures.nats import confirm
from tests.fixtures.wait import wait_for

# -- helpers ------------------------------------------------------------------------------


def _command(**kw: object) -> Command:
    cmd = Command(id=os.urandom(8).hex(), job_id="manual-" + os.urandom(4).hex(),
                  issued_at=time.time(), ttl=120.0, action="exec", timeout=10.0)
    return msgspec.structs.replace(cmd, **kw)


@contextlib.asynccontextmanager
async def results_of(controller: RunningController, node_id: str) -> AsyncIterator[asyncio.Queue]:
    """Every CommandResult a node publishes, read as the controller."""
    q: asyncio.Queue[CommandResult] = asyncio.Queue()

    async def on_msg(msg) -> None:
        q.put_nowait(codec.decode(msg.data, CommandResult))

    sub = await controller.nc.subscribe(controller.subjects.results(node_id), cb=on_msg)
    await controller.nc.flush()
    try:
        yield q
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def as_node(
    agent: Agent, url: str
) -> AsyncIterator[tuple[Callable[[], Awaitable[None]], list[bytes]]]:
    """A raw client with the agent's own nkey, subscribed to what that node may read: yields
    ``delivered`` (returns once everything NATS routed to it so far is in ``seen``), ``seen``."""
    assert agent.state is not None
    seen: list[bytes] = []

    async def on_msg(msg) -> None:
        seen.append(msg.data)

    async def quiet(exc: Exception) -> None:
        pass

    nc = await nats.connect(url, **node_opts(agent),
                            inbox_prefix=agent.state.inbox_prefix.encode(), error_cb=quiet)
    try:
        subs = [await nc.subscribe(agent.subjects.cmd_all, cb=on_msg),
                await nc.subscribe(agent.subjects.cmd_node(agent.node_id), cb=on_msg)]
        await confirm(nc)  # listening before the controller sends, or seeing nothing is void

        async def delivered() -> None:
            await nc.flush()  # the PONG follows every message routed to us before the PING
            await wait_for(lambda: all(s.pending_msgs == 0 for s in subs), 5, "delivery")

        yield delivered, seen
    finally:
        await nc.close()


def _spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as log_f:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", *args],
            stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **env},
        )


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def _proc_file(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _token_file(path: Path, token: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


# -- #6 env values never travel in a broadcast --------------------------------------------


async def test_f06_env_never_reaches_nodes_a_job_does_not_target(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    """A role=a node reading the broadcast subject with its own nkey never sees the env of
    a job for role=b: auto mode sends it per node even above DIRECT_MAX nodes, and an
    explicit broadcast with env is refused, saying why."""
    from controller.jobs.engine import DIRECT_MAX

    node_a = await agents.start(labels={"role": "a"})
    role_b = [await agents.start(labels={"role": "b"}) for _ in range(DIRECT_MAX + 1)]
    secret = "s3cr3t-" + os.urandom(8).hex()
    async with as_node(node_a, controller.agent_nats_url) as (delivered, seen):
        job = await controller.jobs.run(JobSpec(
            shell='printf %s "$DB_PASSWORD" | wc -c', env={"DB_PASSWORD": secret},
            selector="role=b", timeout=20))
        refused = None
        try:
            await controller.jobs.run(JobSpec(
                shell="true", env={"DB_PASSWORD": secret}, selector="role=b", timeout=20,
                mode="broadcast"))
        except BadRequest as exc:
            refused = exc
        await confirm(controller.nc)  # the jobs' commands went out on this connection
        await delivered()
        assert not [m for m in seen if secret.encode() in m], "env value reached role=a"
    assert job.counts == {"ok": len(role_b)}, job.counts
    results = await controller.jobs.results(job.id)
    assert all(r.stdout.strip() == str(len(secret)) for r in results)
    assert refused is not None, "mode broadcast with env was accepted"
    assert "broadcast" in str(refused) and "env" in str(refused)
    assert controller.stats.rejected["job_broadcast_env"] == 1


async def test_f06_agent_refuses_env_on_the_broadcast_subject(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    """Defence in depth: a validly signed command with env that arrives on the broadcast
    subject is answered 'rejected' and not run."""
    agent = await agents.start(labels={"role": "b"})
    marker = tmp_path / "ran"
    cmd = _command(shell=f"touch {marker}", env={"TOKEN": "x"}, selector="role=b")
    async with results_of(controller, agent.node_id) as results:
        await controller.nc.publish(controller.subjects.cmd_all,
                                    codec.encode(controller.secrets.signer.sign(cmd)))
        res = await asyncio.wait_for(results.get(), 10)
    assert res.status == "rejected" and "broadcast" in res.reason, res
    assert res.command_id == cmd.id
    assert not marker.exists()
    assert agent.rejected_commands == 1


# -- #7 replay protection survives a restart ----------------------------------------------


async def test_f07_captured_command_is_refused_after_agent_restart(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    tok = await controller.tokens.create()
    cfg = agents.config(tok.token)
    marks = tmp_path / "marks"
    marks.mkdir()
    async with Agent(config=cfg) as agent:
        cmd = _command(shell=f"mktemp -p {marks}", targets=[agent.node_id])
        captured = codec.encode(controller.secrets.signer.sign(cmd))
        async with results_of(controller, agent.node_id) as results:
            await controller.nc.publish(controller.subjects.cmd_node(agent.node_id), captured)
            first = await asyncio.wait_for(results.get(), 10)
        node_id = agent.node_id
    assert first.status == "ok" and len(list(marks.iterdir())) == 1
    # The same state dir, a new agent: the captured bytes published again, within the TTL.
    async with Agent(config=agents.config("", state_dir=cfg.state_dir)) as again:
        assert again.node_id == node_id
        async with results_of(controller, node_id) as results:
            await controller.nc.publish(controller.subjects.cmd_node(node_id), captured)
            second = await asyncio.wait_for(results.get(), 10)
        # "rejected" is the agent's answer instead of running it: nothing left to wait for
    assert second.status == "rejected" and "already accepted" in second.reason, second
    assert len(list(marks.iterdir())) == 1, "the replayed command ran again"
    assert (cfg.state_dir / "seen-commands.log").stat().st_mode & 0o777 == 0o600


# -- #8 commands left running by a killed agent -------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            _end(p)


@pytest.fixture
def stray_pids() -> Iterator[list[int]]:
    """Pids of commands our agents started: killed at the end if anything left them."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def test_f08_restarted_agent_kills_what_a_killed_agent_left_running(
    controller: RunningController, tmp_path: Path, processes, stray_pids
):
    tok = await controller.tokens.create(labels={"role": "orphan"})
    state = tmp_path / "agent"
    args = ["--nats-url", controller.agent_nats_url, "--state-dir", str(state),
            "--hostname", "orphan", "--heartbeat-interval", "0.2", "--metrics-interval", "1"]
    # The token through the environment (BARISTA_AGENT_TOKEN): the same on main and here.
    join = controller.tokens.join_text(tok.token)
    processes.append(_spawn(args, tmp_path / "agent.log", BARISTA_AGENT_TOKEN=join))
    node = await wait_for(lambda: next(iter(controller.fleet.select()), None), 20, "enrollment")
    assert node is not None
    await wait_for(lambda: controller.fleet.last_beat(node.id) is not None, 10, "a heartbeat")
    pidfile = tmp_path / "sleep.pid"
    record = await controller.jobs.submit(JobSpec(
        shell=f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 300",
        targets=[node.id], timeout=90))
    await wait_for(pidfile.exists, 10, "the command to start")
    sleep_pid = int(pidfile.read_text())
    stray_pids.append(sleep_pid)
    os.kill(processes[0].pid, signal.SIGKILL)
    processes[0].wait(5)
    assert _alive(sleep_pid), "the command died with the agent: nothing to test"
    processes.append(_spawn(args, tmp_path / "agent.log"))
    await wait_for(lambda: not _alive(sleep_pid), 20, "the orphaned command to be killed")
    job = await asyncio.wait_for(controller.jobs.wait(record.id), 20)
    (res,) = await controller.jobs.results(job.id)
    assert res.node_id == node.id and res.status == "error"
    assert "agent restarted" in res.reason and "killed" in res.reason, res.reason
    assert not list((state / "running").glob("*.run")), "the record outlived the command"


# -- #15a the join token never on the command line ----------------------------------------


async def test_f15a_token_comes_from_a_file_never_the_command_line(
    controller: RunningController, tmp_path: Path, processes
):
    tok = await controller.tokens.create()
    base = ["--nats-url", controller.agent_nats_url, "--hostname", "tok"]
    # --token is refused at once, with the way to do it instead
    refused = _spawn([*base, "--state-dir", str(tmp_path / "r"), "--token", tok.token],
                     tmp_path / "refused.log")
    processes.append(refused)
    try:
        rc = await asyncio.to_thread(refused.wait, 10)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 2, "an agent ran with the join token on its command line"
    assert "--token-file" in (tmp_path / "refused.log").read_text()
    assert not list(controller.fleet.select())
    # a token file enrolls; neither the command line nor the environment holds the token
    join = controller.tokens.join_text(tok.token)
    proc = _spawn([*base, "--state-dir", str(tmp_path / "a"),
                   "--token-file", str(_token_file(tmp_path / "token", join))],
                  tmp_path / "agent.log")
    processes.append(proc)
    node = await wait_for(lambda: next(iter(controller.fleet.select()), None), 20, "enrollment")
    assert node is not None
    await wait_for(lambda: controller.fleet.last_beat(node.id) is not None, 10, "a heartbeat")
    secret = tok.token.encode()
    assert secret not in _proc_file(proc.pid, "cmdline")
    assert secret not in _proc_file(proc.pid, "environ")
    assert proc.poll() is None


def test_f15a_token_file_and_env_in_config(tmp_path: Path, monkeypatch):
    path = _token_file(tmp_path / "t", "bt1.abc.def\n")
    cfg = AgentConfig.load(None, {"token_file": str(path)})
    assert cfg.token == "" and cfg.join_token() == "bt1.abc.def"
    monkeypatch.setenv("BARISTA_AGENT_TOKEN", "bt1.env.tok")
    assert AgentConfig.load(None, {}).join_token() == "bt1.env.tok"


# -- #16 a slow server never kills start() ------------------------------------------------


class _PausingProxy:
    """A loopback TCP proxy to a real nats-server that SIGSTOPs the server the moment the
    client sends its first SUB, for ``pause`` seconds: the flush after subscribing then
    meets a server that does not answer, deterministically."""

    def __init__(self, server: NatsServer, pause: float) -> None:
        self.server = server
        self.pause = pause
        self.stopped = False
        self.resumed = asyncio.Event()
        self._srv: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _PausingProxy:
        self._srv = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._srv is not None
        return f"nats://127.0.0.1:{self._srv.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self._resume()
        assert self._srv is not None
        self._srv.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await self._srv.wait_closed()

    def _resume(self) -> None:
        if self.stopped and not self.resumed.is_set():
            assert self.server.pid is not None
            os.kill(self.server.pid, signal.SIGCONT)
            self.resumed.set()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.server.port)
        self._writers += [writer, up_w]
        for coro in (self._pipe(reader, up_w, watch=True), self._pipe(up_r, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    watch: bool = False) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await src.read(65536):
                if watch and not self.stopped and b"SUB " in data:
                    assert self.server.pid is not None
                    os.kill(self.server.pid, signal.SIGSTOP)
                    self.stopped = True
                    asyncio.get_running_loop().call_later(self.pause, self._resume)
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.mark.slow
async def test_f16_start_survives_a_server_that_stalls_the_subscribe_flush(
    nats_server_noauth: NatsServer, tmp_path: Path, caplog
):
    signer = CommandSigner.generate()
    state = tmp_path / "agent"
    state.mkdir()
    EnrollState(node_id="n16", auth="none", command_keys=[signer.public_key_b64],
                heartbeat_interval=0.5, metrics_interval=60).save(state / "state.json")
    caplog.set_level(logging.WARNING, logger="barista.agent")
    # Longer than nats-py's default flush timeout (10 s), which main's start() did not survive.
    async with _PausingProxy(nats_server_noauth, pause=11.0) as proxy:
        agent = Agent(config=AgentConfig(nats_urls=[proxy.url], state_dir=state,
                                         collectors=["load"]))
        try:
            await asyncio.wait_for(agent.start(), 40)
            assert proxy.stopped and proxy.resumed.is_set()
            assert "command subscriptions not confirmed" in caplog.text
            assert "encountered error" not in caplog.text  # nats-py's read loop lives
            # and the agent takes commands once the server is back
            nc = await nats.connect(nats_server_noauth.url)
            try:
                sub = await nc.subscribe(agent.subjects.results("n16"))
                await nc.flush()
                ping = _command(action="ping", targets=["n16"])
                await nc.publish(agent.subjects.cmd_node("n16"), codec.encode(signer.sign(ping)))
                res = codec.decode((await sub.next_msg(timeout=10)).data, CommandResult)
                assert res.status == "ok" and res.job_id == ping.job_id
            finally:
                await nc.close()
        finally:
            await agent.stop()


async def test_f06_api_refuses_broadcast_env_with_400(controller: RunningController, api, http):
    url, token = api
    async with http.post(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                         json={"shell": "true", "env": {"K": "v"}, "mode": "broadcast"}) as r:
        body = await r.json()
    assert r.status == 400, body
    assert "broadcast" in body["message"] and "env" in body["message"]
    async with http.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}) as r:
        status = await r.json()
    assert status["rejected"]["job_broadcast_env"] == 1


def test_f08_a_reused_pid_is_never_killed(tmp_path: Path):
    """A record whose pid now names another process (other start time) is dropped, and that
    process lives; a record of a group that is gone is reported as not killed."""
    from agent.ledger import RunLedger

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ledger = RunLedger(tmp_path / "running")
        ledger.started(job_id="j1", command_id="c1", pid=other.pid)
        rec = next((tmp_path / "running").glob("*.run"))
        rec.write_bytes(rec.read_bytes().replace(b'"start":', b'"start":1'))  # not this one
        ledger.started(job_id="j2", command_id="c2", pid=2**22 + 17)  # no such process
        orphans = sorted(ledger.reap(), key=lambda o: o.job_id)
        assert [(o.job_id, o.killed) for o in orphans] == [("j1", False), ("j2", False)]
        assert other.poll() is None, "a process that is not ours was killed"
        assert not list((tmp_path / "running").iterdir())
    finally:
        other.kill()
        other.wait(5)
