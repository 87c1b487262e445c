"""Executor tests against real subprocesses: exit codes, env, cwd, timeouts, caps, limits."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.executor import Executor
from agent.facts import collect_facts, parse_os_release
from protocol.messages import Command, FactsReport, JobEvent, Pong
from tests.fixtures.wait import wait_for

GONE_WITHIN = 5.0

ExecutorFactory = Callable[..., Executor]


def make_cmd(**fields: Any) -> Command:
    fields.setdefault("action", "exec")
    fields.setdefault("timeout", 10.0)
    return Command(
        id=fields.pop("id", uuid.uuid4().hex),
        job_id=fields.pop("job_id", "job-1"),
        issued_at=time.time(),
        ttl=60.0,
        **fields,
    )


def _is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is dead, only not yet reaped by init (PID 1 in a container may be slow to).
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


async def wait_gone(pid: int) -> bool:
    """True once ``pid`` is gone within GONE_WITHIN (nothing signals the death of a process
    that is not our child, so this polls)."""
    try:
        return await wait_for(lambda: _is_gone(pid), GONE_WITHIN, f"process {pid} to go")
    except AssertionError:
        return False


@pytest.fixture
def stray_pids() -> Iterator[list[int]]:
    """Pids of grandchildren a test spawns; killed by pid at teardown if a test left any."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not _is_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def make_executor() -> AsyncIterator[ExecutorFactory]:
    made: list[Executor] = []

    def factory(**options: Any) -> Executor:
        options.setdefault("facts", lambda: collect_facts("9.9.9"))
        options.setdefault("labels", lambda: {"role": "web"})
        options.setdefault("node_id", lambda: "node-1")
        options.setdefault("kill_grace", 0.5)
        ex = Executor(**options)
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        await ex.aclose()


@pytest.fixture
def executor(make_executor: ExecutorFactory) -> Executor:
    return make_executor()


def kind_of(event: JobEvent) -> str:
    """"started", "output" or "finished": the event's type without its "job." prefix."""
    return str(event.__struct_config__.tag).removeprefix("job.")


class Recorder:
    """An on_event listener that keeps every event and can wake a test on one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    async def __call__(self, event: JobEvent) -> None:
        self.events.append((kind_of(event), msgspec.structs.asdict(event)))
        self.changed.set()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    def output(self, stream: str) -> str:
        return "".join(p["data"] for k, p in self.events if k == "output" and p["stream"] == stream)

    async def wait_for_output(self, stream: str, text: str) -> None:
        while text not in self.output(stream):
            self.changed.clear()
            await self.changed.wait()


async def test_exit_codes(executor: Executor) -> None:
    ok = await executor.run(make_cmd(argv=["true"], job_id="j", id="c1"))
    assert (ok.status, ok.exit_code, ok.reason) == ("ok", 0, "")
    assert (ok.job_id, ok.command_id, ok.node_id) == ("j", "c1", "node-1")
    assert ok.duration > 0

    failed = await executor.run(make_cmd(shell="exit 3"))
    assert (failed.status, failed.exit_code) == ("failed", 3)

    killed = await executor.run(make_cmd(shell="kill -KILL $$"))
    assert (killed.status, killed.exit_code) == ("failed", -9)
    assert "SIGKILL" in killed.reason


async def test_argv_runs_without_a_shell_and_shell_runs_with_one(executor: Executor) -> None:
    direct = await executor.run(make_cmd(argv=["echo", "$HOME", "a;b", "*"]))
    assert direct.stdout == "$HOME a;b *\n"
    shell = await executor.run(make_cmd(shell="echo $((1 + 2)); echo err >&2"))
    assert (shell.stdout, shell.stderr) == ("3\n", "err\n")


async def test_env_is_passed_and_agent_env_is_not(
    executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BARISTA_SECRET", "hunter2")
    res = await executor.run(make_cmd(argv=["env"], env={"FOO": "bar baz", "LANG": "C"}))
    assert res.status == "ok"
    env = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert set(env) == {"PATH", "HOME", "LANG", "FOO"}
    assert env["FOO"] == "bar baz"
    assert env["LANG"] == "C"  # the command's env wins over the safe defaults
    assert "hunter2" not in res.stdout


async def test_cwd(executor: Executor, tmp_path: Path) -> None:
    res = await executor.run(make_cmd(argv=["pwd"], cwd=str(tmp_path)))
    assert (res.status, res.stdout) == ("ok", f"{tmp_path}\n")

    missing = await executor.run(make_cmd(argv=["pwd"], cwd=str(tmp_path / "nope")))
    assert missing.status == "error"
    assert missing.exit_code is None
    assert "does not exist" in missing.reason

    relative = await executor.run(make_cmd(argv=["pwd"], cwd="some/dir"))
    assert relative.status == "error"
    assert "absolute" in relative.reason


async def test_timeout_kills_whole_group_including_grandchild(
    make_executor: ExecutorFactory, tmp_path: Path, stray_pids: list[int]
) -> None:
    ex = make_executor(kill_grace=0.5)
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    res = await ex.run(make_cmd(shell=f"sleep 100 & echo $! > {pidfile}; sleep 100", timeout=0.5))
    assert res.status == "timeout"
    assert res.exit_code == -signal.SIGTERM
    assert "timed out after 0.5s" in res.reason
    assert time.monotonic() - t0 < 5
    pid = int(pidfile.read_text())
    stray_pids.append(pid)
    assert await wait_gone(pid), f"grandchild {pid} survived the timeout"
    assert ex.running == 0


async def test_timeout_escalates_to_sigkill(make_executor: ExecutorFactory) -> None:
    ex = make_executor(kill_grace=0.3)
    # Ignored signals stay ignored across exec, so neither sh nor sleep dies of SIGTERM.
    res = await ex.run(make_cmd(shell="trap '' TERM; sleep 100", timeout=0.3))
    assert (res.status, res.exit_code) == ("timeout", -signal.SIGKILL)


async def test_background_process_holding_output_is_killed_after_exit(
    make_executor: ExecutorFactory, tmp_path: Path, stray_pids: list[int]
) -> None:
    ex = make_executor(kill_grace=0.3)
    pidfile = tmp_path / "bg.pid"
    res = await ex.run(make_cmd(shell=f"sleep 100 & echo $! > {pidfile}; echo done", timeout=10))
    assert (res.status, res.exit_code, res.stdout) == ("ok", 0, "done\n")
    assert "background" in res.reason
    pid = int(pidfile.read_text())
    stray_pids.append(pid)
    assert await wait_gone(pid)


async def test_output_cap_truncates_and_marks(make_executor: ExecutorFactory) -> None:
    ex = make_executor(max_output_cap=2000)
    res = await ex.run(
        make_cmd(
            shell="head -c 5000 /dev/zero | tr '\\0' a; printf bbbbbbbbbb >&2",
            output_cap=1000,
        )
    )
    assert res.status == "ok"
    assert res.stdout == "a" * 1000
    assert res.stdout_truncated
    assert (res.stderr, res.stderr_truncated) == ("b" * 10, False)

    exact = await ex.run(make_cmd(shell="printf 12345", output_cap=5))
    assert (exact.stdout, exact.stdout_truncated) == ("12345", False)

    clamped = await ex.run(make_cmd(shell="head -c 5000 /dev/zero", output_cap=10_000))
    assert (len(clamped.stdout), clamped.stdout_truncated) == (2000, True)

    invalid_utf8 = await ex.run(make_cmd(shell="printf '\\377ok'"))
    assert invalid_utf8.stdout == "\ufffdok"


async def test_ten_megabytes_of_output_does_not_hang(executor: Executor) -> None:
    t0 = time.monotonic()
    res = await executor.run(
        make_cmd(
            shell="head -c 10000000 /dev/zero; head -c 10000000 /dev/zero >&2",
            timeout=20,
        )
    )
    assert (res.status, res.exit_code) == ("ok", 0)
    assert len(res.stdout) == len(res.stderr) == 64 * 1024
    assert res.stdout_truncated and res.stderr_truncated
    assert time.monotonic() - t0 < 10


async def test_streaming_events_in_order(executor: Executor) -> None:
    rec = Recorder()
    res = await executor.run(
        make_cmd(
            shell="echo one; echo two >&2; echo three", stream_output=True, job_id="j", id="c"
        ),
        on_event=rec,
    )
    assert res.status == "ok"
    kinds = rec.kinds()
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"output"}
    assert rec.events[0][1] == {"job_id": "j", "command_id": "c"}
    assert rec.output("stdout") == "one\nthree\n"
    assert rec.output("stderr") == "two\n"
    finished = rec.events[-1][1]
    assert (finished["status"], finished["exit_code"]) == ("ok", 0)
    assert finished["duration"] == res.duration


async def test_streaming_respects_cap_and_flag(executor: Executor) -> None:
    capped = Recorder()
    res = await executor.run(
        make_cmd(shell="echo hello world", stream_output=True, output_cap=5), on_event=capped
    )
    assert res.stdout == "hello" and res.stdout_truncated
    assert capped.output("stdout") == "hello"

    quiet = Recorder()
    await executor.run(make_cmd(shell="echo hello"), on_event=quiet)
    assert quiet.kinds() == ["started", "finished"]


async def test_failing_listener_does_not_break_the_run(executor: Executor) -> None:
    calls: list[str] = []

    async def broken(event: JobEvent) -> None:
        calls.append(kind_of(event))
        raise RuntimeError("listener bug")

    res = await executor.run(make_cmd(shell="echo hi", stream_output=True), on_event=broken)
    assert (res.status, res.stdout) == ("ok", "hi\n")
    assert calls == ["started", "output", "finished"]


async def test_concurrency_limit(make_executor: ExecutorFactory, tmp_path: Path) -> None:
    ex = make_executor(max_concurrency=2)
    seen_running: list[int] = []

    async def on_event(event: JobEvent) -> None:
        if kind_of(event) == "started":
            seen_running.append(ex.running)

    def cmd(i: int) -> Command:
        stamp = f"{tmp_path}/{i}"
        return make_cmd(shell=f"date +%s.%N > {stamp}.start; sleep 0.3; date +%s.%N > {stamp}.end")

    results = await asyncio.gather(*(ex.run(cmd(i), on_event=on_event) for i in range(4)))
    assert [r.status for r in results] == ["ok"] * 4
    assert len(seen_running) == 4 and max(seen_running) <= 2

    edges: list[tuple[float, int]] = []
    for i in range(4):
        edges.append((float((tmp_path / f"{i}.start").read_text()), 1))
        edges.append((float((tmp_path / f"{i}.end").read_text()), -1))
    overlap = peak = 0
    for _, delta in sorted(edges):  # at equal times an end (-1) sorts before a start
        overlap += delta
        peak = max(peak, overlap)
    assert peak == 2  # the limit holds, and it is not serialising everything either
    assert ex.running == 0


async def test_ping_and_facts(executor: Executor) -> None:
    rec = Recorder()
    pong = await executor.run(make_cmd(action="ping"), on_event=rec)
    assert pong.status == "ok"
    assert isinstance(pong.data, Pong)
    assert pong.data.labels == {"role": "web"}
    facts = msgspec.to_builtins(pong.data.facts)
    assert set(facts) == {"hostname", "os", "agent_version", "uptime"}
    assert facts["hostname"] == socket.gethostname()
    assert facts["agent_version"] == "9.9.9"
    assert rec.kinds() == ["started", "finished"]

    full = await executor.run(make_cmd(action="facts"))
    assert full.status == "ok"
    assert isinstance(full.data, FactsReport)
    assert full.data.facts.cpu_count == os.cpu_count()
    assert (full.data.facts.mem_total or 0) > 0
    assert full.data.facts.os == "Linux"
    assert {"kernel", "arch", "python", "boot_time"} <= set(msgspec.to_builtins(full.data.facts))


async def test_broken_facts_callable_becomes_error(make_executor: ExecutorFactory) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("no /proc")

    ex = make_executor(facts=broken)
    res = await ex.run(make_cmd(action="facts"))
    assert res.status == "error"
    assert "no /proc" in res.reason


async def test_bad_commands_become_errors(executor: Executor) -> None:
    cases: list[tuple[Command, str]] = [
        (make_cmd(action="reboot"), "unknown action"),
        (make_cmd(), "set argv or shell"),
        (make_cmd(argv=["true"], shell="true"), "not both"),
        (make_cmd(argv=["true"], timeout=0), "timeout must be"),
        (make_cmd(argv=["true"], env={"A=B": "x"}), "invalid environment variable"),
        (make_cmd(argv=["/nonexistent/bin/tool"]), "cannot start the command"),
    ]
    for cmd, reason in cases:
        res = await executor.run(cmd)
        assert res.status == "error", cmd
        assert reason in res.reason, (cmd, res.reason)
        assert res.exit_code is None


async def test_other_user_refused_unless_allowed(
    make_executor: ExecutorFactory, executor: Executor
) -> None:
    res = await executor.run(make_cmd(argv=["id", "-u"], user="nobody"))
    assert res.status == "error"
    assert "not allowed" in res.reason

    allowed = make_executor(allow_users=True)
    unknown = await allowed.run(make_cmd(argv=["id", "-u"], user="no-such-user-xyz"))
    if os.geteuid() == 0:
        assert "unknown user" in unknown.reason
    else:
        assert "not running as root" in unknown.reason
    assert unknown.status == "error"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_run_as_other_user_when_root(make_executor: ExecutorFactory) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    ex = make_executor(allow_users=True)
    res = await ex.run(make_cmd(shell='id -u; id -g; echo "$HOME $USER"', user="nobody"))
    assert res.status == "ok", res.reason
    assert res.stdout.splitlines() == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        f"{nobody.pw_dir} nobody",
    ]


async def test_aclose_kills_running_commands(
    make_executor: ExecutorFactory, tmp_path: Path, stray_pids: list[int]
) -> None:
    ex = make_executor(kill_grace=0.5)
    pidfile = tmp_path / "grandchild.pid"
    rec = Recorder()
    task = asyncio.create_task(
        ex.run(
            make_cmd(
                shell=f"sleep 100 & echo $! > {pidfile}; echo ready; sleep 100",
                timeout=60,
                stream_output=True,
            ),
            on_event=rec,
        )
    )
    await rec.wait_for_output("stdout", "ready")
    pid = int(pidfile.read_text())
    stray_pids.append(pid)
    assert ex.running == 1

    await ex.aclose()
    res = await task
    assert res.status == "error"
    assert "shutting down" in res.reason
    assert await wait_gone(pid)
    assert ex.running == 0

    after = await ex.run(make_cmd(argv=["true"]))
    assert after.status == "error"
    assert "closed" in after.reason


async def test_cancelled_run_leaves_no_process(
    executor: Executor, tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    rec = Recorder()
    task = asyncio.create_task(
        executor.run(
            make_cmd(
                shell=f"sleep 100 & echo $! > {pidfile}; echo ready; sleep 100",
                stream_output=True,
            ),
            on_event=rec,
        )
    )
    await rec.wait_for_output("stdout", "ready")
    pid = int(pidfile.read_text())
    stray_pids.append(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone(pid)
    assert executor.running == 0


def test_executor_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Executor(facts=dict, labels=dict, node_id=str, max_concurrency=0)
    with pytest.raises(ValueError, match="kill_grace"):
        Executor(facts=dict, labels=dict, node_id=str, kill_grace=float("nan"))


def test_parse_os_release() -> None:
    text = "# comment\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID='12'\n\nbroken line\n"
    assert parse_os_release(text) == {
        "NAME": "Debian GNU/Linux",
        "ID": "debian",
        "VERSION_ID": "12",
    }
