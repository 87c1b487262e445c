"""Issue 8, the embedded nats-server: one per data dir (#2), restarted when it dies (#5), no
monitoring listener anyone on the machine can read (#15b).

Real processes throughout: controllers run as `barista server` subprocesses and are killed
with -9; nats-server processes are found by their command line (the config file of the
data dir) so that the tests see them whatever the controller records about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import nats
import nats.errors
import pytest

from agent.config import AgentConfig
from agent.runtime import Agent
from controller.errors import NatsServerError
from controller.models import NodeRecord
from controller.service import Controller, RunningController
from protocol.subjects import ENROLL_INBOX
from tests.fixtures.controller import AgentFactory, controller_config
from tests.fixtures.enroll import enroll_opts
from tests.fixtures.wait import wait_for, wait_for_blocking

FAST_ENV = {
    "BARISTA_HEARTBEAT_INTERVAL": "0.3",
    "BARISTA_METRICS_INTERVAL": "1",
    "BARISTA_STALE_AFTER": "1",
    "BARISTA_OFFLINE_AFTER": "2",
}


# -- processes, seen from outside ---------------------------------------------------------


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def servers_of(data_dir: Path) -> list[int]:
    """Live nats-server processes running on ``data_dir``'s config."""
    conf = os.path.realpath(data_dir / "nats" / "nats-server.conf")
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = _argv(int(entry.name))
        if len(argv) == 3 and Path(argv[0]).name == "nats-server" and argv[1] == "-c":
            try:
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:
                continue
            if os.path.realpath(os.path.join(cwd, argv[2])) == conf:
                found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    api_url: str
    api_token: str
    # `barista server` serves TLS by default: the CA its client config pins.
    ssl: ssl.SSLContext | bool = True

    @property
    def pid(self) -> int:
        return self.proc.pid


class Controllers:
    """`barista server` subprocesses on one data dir; every process they or their
    nats-servers leave behind is ended (by pid) at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_dir = base / "ctl"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def start(self, timeout: float = 30.0) -> Running:
        self.count += 1
        client = self.base / f"client{self.count}.toml"
        log = open(self.base / f"controller{self.count}.log", "wb")
        env = {**os.environ, **FAST_ENV, "BARISTA_CONFIG": str(client)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "server",
                 "--data-dir", str(self.data_dir), "--api-port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.procs.append(proc)

        def up() -> bool:  # the client config is written once the controller and its API are up
            if proc.poll() is not None:
                raise AssertionError(f"controller exited:\n{self.log(self.count)}")
            return client.exists()

        try:
            wait_for_blocking(up, timeout, "the controller to start")
        except AssertionError as exc:
            raise AssertionError(f"controller did not start:\n{self.log(self.count)}") from exc
        cfg = tomllib.loads(client.read_text())
        context = ssl.create_default_context(cafile=cfg["ca_file"]) if "ca_file" in cfg else True
        return Running(proc, cfg["url"], cfg["token"], context)

    def log(self, n: int) -> str:
        return (self.base / f"controller{n}.log").read_text(errors="replace")[-3000:]

    def port(self) -> int:
        return int((self.data_dir / "nats" / "port").read_text())

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for pid in servers_of(self.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a test may have stopped it
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Controllers]:
    c = Controllers(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


async def api_get(http: aiohttp.ClientSession, run: Running, path: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {run.api_token}"}
    async with http.get(run.api_url + path, headers=headers, ssl=run.ssl) as resp:
        data: dict[str, object] = await resp.json()
        return data


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- #2 ------------------------------------------------------------------------------------


async def test_f02_controller_killed_with_9_takes_its_nats_server_along(
    controllers: Controllers,
) -> None:
    first = await asyncio.to_thread(controllers.start)
    [server] = servers_of(controllers.data_dir)
    port = controllers.port()
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    await wait_for(lambda: gone(server), timeout=5, what=f"nats-server {server} to exit")
    # The next start: one server again, on the port agents know.
    await asyncio.to_thread(controllers.start)
    assert len(servers_of(controllers.data_dir)) == 1
    assert controllers.port() == port


async def test_f02_orphan_that_survives_is_stopped_and_its_port_reused(
    controllers: Controllers, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    first = await asyncio.to_thread(controllers.start)
    port = controllers.port()
    headers = {"Authorization": f"Bearer {first.api_token}"}
    async with http.post(first.api_url + "/v1/tokens", json={}, headers=headers,
                         ssl=first.ssl) as resp:
        assert resp.status == 201
        issued = await resp.json()
    config = AgentConfig(
        nats_urls=[f"nats://127.0.0.1:{port}"], token=issued["join_token"],
        state_dir=tmp_path / "agent", hostname="survivor", collectors=["load"],
    )
    async with Agent(config=config) as agent:
        # A server that outlives its controller despite everything (hung: stopped, so the
        # parent-death signal stays pending), then kill -9 of the controller.
        [orphan] = servers_of(controllers.data_dir)
        os.kill(orphan, signal.SIGSTOP)
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        assert not gone(orphan)

        second = await asyncio.to_thread(controllers.start)
        assert gone(orphan), "the orphaned nats-server still runs next to the new one"
        assert servers_of(controllers.data_dir) != [orphan]
        assert len(servers_of(controllers.data_dir)) == 1
        status = await api_get(http, second, "/v1/status")
        nats_status = status["nats"]
        assert isinstance(nats_status, dict)
        assert nats_status["url"] == f"nats://127.0.0.1:{port}", "the port moved"
        assert nats_status.get("orphans_stopped") == 1

        # The agent, still configured with the old URL, is back.
        async def beating() -> bool:
            s = await api_get(http, second, "/v1/status")
            node = await api_get(http, second, f"/v1/nodes/{agent.node_id}")
            return int(s["heartbeats"]) > 2 and node.get("status") == "online"  # type: ignore[call-overload]

        await wait_for(beating, 20, "the agent's heartbeats on the new controller")


async def test_f02_second_controller_on_the_same_data_dir_refuses(
    controller: RunningController, tmp_path: Path
) -> None:
    assert controller.natsd is not None
    pid, port = controller.natsd.pid, controller.natsd.port
    data_dir = controller.config.data_dir
    # The real command first: it must exit with a message that says what to do.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "server", "--data-dir", str(data_dir),
        "--api-port", "0",
        env={**os.environ, "BARISTA_CONFIG": str(tmp_path / "client.toml")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for stray in set(servers_of(data_dir)) - {pid}:  # what a second controller started
            os.kill(stray, signal.SIGKILL)
    assert proc.returncode != 0
    assert "in use by another barista controller" in err.decode()
    assert "--data-dir" in err.decode()
    # In-process too, with the error type.
    with pytest.raises(NatsServerError, match="in use by another barista controller"):
        async with Controller(controller_config(data_dir)):
            pass
    # The first one is untouched: same server, same port, still the only one.
    assert controller.natsd.pid == pid and controller.natsd.proc is not None
    assert controller.natsd.proc.poll() is None
    assert servers_of(data_dir) == [pid]
    assert int((data_dir / "nats" / "port").read_text()) == port
    nc = await nats.connect(controller.nats_url, **controller.natsd.controller_credentials())
    await nc.close()


# -- #5 ------------------------------------------------------------------------------------


async def test_f05_dead_nats_server_is_restarted_on_the_same_port(
    controller: RunningController,
    agents: AgentFactory,
    api: tuple[str, str],
    http: aiohttp.ClientSession,
) -> None:
    assert controller.natsd is not None and controller.fleet is not None
    agent = await agents.start()
    await wait_for(lambda: controller.stats.heartbeats > 2, what="heartbeats")
    old_pid, port = controller.natsd.pid, controller.natsd.port
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        natsd = controller.natsd
        assert natsd is not None
        return natsd.pid != old_pid and natsd.proc is not None and natsd.proc.poll() is None

    await wait_for(restarted, timeout=15, what="a new nats-server")
    assert controller.natsd.port == port
    assert servers_of(controller.config.data_dir) == [controller.natsd.pid]
    url, _ = api

    async def ready() -> bool:
        async with http.get(url + "/readyz") as resp:
            return resp.status == 200

    await wait_for(ready, 15, "readyz 200")
    nats_status = controller.status()["nats"]
    assert isinstance(nats_status, dict)
    assert nats_status.get("restarts") == 1
    assert "SIGKILL" in str(nats_status.get("last_exit"))
    beats = controller.stats.heartbeats
    await wait_for(lambda: controller.stats.heartbeats > beats + 2, timeout=15,
                   what="heartbeats after the restart")
    node = controller.fleet.get(agent.node_id)
    assert node is not None and node.status == "online"


# -- #15b ----------------------------------------------------------------------------------


async def test_f15b_nats_server_has_no_monitoring_listener(controller: RunningController) -> None:
    assert controller.natsd is not None and controller.natsd.pid is not None
    # The client port is all the server listens on: no /connz, /varz, ... over HTTP.
    assert listening_ports(controller.natsd.pid) == {controller.natsd.port}
    # Nor over NATS with the public enroll credentials every bootstrap script holds (the
    # server's own system account has a random password that only the config file holds).
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        controller.nats_url, **{**enroll_opts(controller), "inbox_prefix": ENROLL_INBOX},
        error_cb=on_error,  # its own inbox: only publish is in question
    )
    try:
        for subject in ("$SYS.REQ.SERVER.PING.CONNZ", "$SYS.REQ.SERVER.PING.VARZ"):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(subject, b"", timeout=1)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors
    # Readiness works without it (over NATS, as the system user): the controller started,
    # and the server answers the system account's health check.
    natsd = controller.natsd

    def healthy() -> object:
        with natsd.probe() as probe:
            return probe.server_request("HEALTHZ").get("status")

    assert await asyncio.to_thread(healthy) == "ok"


async def test_f05_kv_informers_catch_up_right_after_a_restart(
    controller: RunningController, agents: AgentFactory
) -> None:
    """The KV informers keep following their buckets across a server restart (the server
    restores the watch consumers from its file store; measured here: 0.2 s)."""
    assert controller.natsd is not None and controller.nodes is not None
    agent = await agents.start()
    old_pid = controller.natsd.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    await wait_for(lambda: controller.natsd is not None and controller.natsd.pid != old_pid
                   and controller.state_nc is not None and controller.state_nc.is_connected,
                   timeout=15, what="the restarted server and the state connection")
    # Another writer (a second controller, say) changes the node record.
    nc = await nats.connect(controller.nats_url, **controller.natsd.controller_credentials())
    try:
        kv = await nc.jetstream().key_value("nodes")
        entry = await kv.get(agent.node_id)
        assert entry.value is not None
        record = msgspec.msgpack.decode(entry.value, type=NodeRecord)
        changed = msgspec.structs.replace(record, labels={**record.labels, "moved": "yes"})
        await kv.update(agent.node_id, msgspec.msgpack.encode(changed), last=entry.revision)
    finally:
        await nc.close()

    def seen() -> bool:
        assert controller.nodes is not None
        node = controller.nodes.get(agent.node_id)
        return node is not None and node.labels.get("moved") == "yes"

    await wait_for(seen, timeout=5, what="the informer to see a write made after the restart")
