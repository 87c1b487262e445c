"""Runs fleet commands on this machine: the built-ins (ping, facts) and exec.

exec runs in its own process group under a timeout that kills the whole group, with an output
cap per stream and a concurrency limit; run() always returns a CommandResult, never raises.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import os
import pwd
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from agent.ledger import RunLedger
from protocol.messages import (
    Command,
    CommandResult,
    FactsReport,
    JobEvent,
    JobFinished,
    JobOutput,
    JobStarted,
    NodeFacts,
    Pong,
    ResultStatus,
)

log = logging.getLogger("barista.agent.executor")

OnEvent = Callable[[JobEvent], Awaitable[None]]

# The whole environment a command gets unless the command itself adds to it: the agent's own
# environment may hold secrets (join token, cloud credentials) and is never passed on.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SAFE_LANG = "C.UTF-8"
SHELL = "/bin/sh"
CHUNK_SIZE = 64 * 1024
PING_FACTS = ("hostname", "os", "agent_version", "uptime")
# No event tells us when the last member of a process group is gone, so we poll for it.
GROUP_POLL_INTERVAL = 0.05

_STOP_TIMEOUT = "timeout"
_STOP_SHUTDOWN = "shutdown"


class _Refused(Exception):
    """The command cannot run as asked; it becomes status "error" with this reason."""


@dataclass(eq=False)
class _Capture:
    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(eq=False)
class _Spec:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    # Popen's user/group/extra_groups: set only when switching to another user.
    credentials: dict[str, Any]


@dataclass(eq=False)
class _Running:
    proc: asyncio.subprocess.Process
    cmd: Command
    exited: asyncio.Event
    stop_reason: str = ""
    stopper: asyncio.Task[None] | None = None


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Sets an event the moment the process exits.

    On Python 3.11 Process.wait() returns only once the output pipes are closed too, which
    a background grandchild can keep open forever; the exit itself is what we time.
    """

    def __init__(
        self, exited: asyncio.Event, *, limit: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(limit=limit, loop=loop)
        self._exited = exited

    def process_exited(self) -> None:
        super().process_exited()
        self._exited.set()


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send sig to a process group; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not permitted to send %s to process group %d", sig.name, pgid)
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Executor:
    """Runs Commands; one per agent. Use ``async with`` or call aclose() on shutdown."""

    def __init__(
        self,
        *,
        facts: Callable[[], dict[str, Any]],
        labels: Callable[[], dict[str, str]],
        node_id: Callable[[], str],
        max_concurrency: int = 8,
        default_output_cap: int = 64 * 1024,
        max_output_cap: int = 1024 * 1024,
        kill_grace: float = 2.0,
        allow_users: bool = False,
        ledger: RunLedger | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if default_output_cap < 0 or max_output_cap < 0:
            raise ValueError("output caps must be >= 0")
        if not (math.isfinite(kill_grace) and kill_grace >= 0):
            raise ValueError(f"kill_grace must be a finite number >= 0, got {kill_grace}")
        self._facts = facts
        self._labels = labels
        self._node_id = node_id
        self._max_concurrency = max_concurrency
        self._default_output_cap = default_output_cap
        self._max_output_cap = max_output_cap
        self._kill_grace = kill_grace
        self._allow_users = allow_users
        # Records each running command's process group, so a restarted agent can end it.
        self._ledger = ledger
        self._slots = asyncio.Semaphore(max_concurrency)
        self._running: set[_Running] = set()
        # Reapers of commands whose run() was cancelled; aclose() waits for them.
        self._background: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # --- status -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """How many exec commands have a live process right now."""
        return len(self._running)

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def closed(self) -> bool:
        return self._closed

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Executor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new commands and kill the process group of every running one."""
        self._closed = True
        runs = list(self._running)
        if runs:
            log.info("killing %d running command(s) on shutdown", len(runs))
            stoppers = [self._stop(run, _STOP_SHUTDOWN) for run in runs]
            await asyncio.gather(*(asyncio.shield(s) for s in stoppers))
        # Give run() calls a moment to drain their pipes and return their results.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._kill_grace + 1.0):
                await self._idle.wait()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # --- running commands ---------------------------------------------------------------

    async def run(self, cmd: Command, *, on_event: OnEvent | None = None) -> CommandResult:
        """Run one command and return its result; every failure becomes status "error".

        Events: "started" (for exec once its process exists), "output" (only with
        stream_output, only within the cap) and always "finished".
        """
        t0 = time.monotonic()
        try:
            if self._closed:
                raise _Refused("the executor is closed (agent shutting down)")
            if cmd.action == "ping":
                await self._emit(on_event, cmd, self._started(cmd))
                result = self._ping(cmd)
            elif cmd.action == "facts":
                await self._emit(on_event, cmd, self._started(cmd))
                result = self._result(cmd, "ok", data=FactsReport(facts=_facts(self._facts())))
            elif cmd.action == "exec":
                result = await self._exec(cmd, on_event)
            else:
                raise _Refused(f"unknown action {cmd.action!r} (expected ping, facts or exec)")
        except _Refused as exc:
            result = self._result(cmd, "error", reason=str(exc))
        except Exception as exc:
            log.exception("command %s (job %s) failed inside the agent", cmd.id, cmd.job_id)
            result = self._result(cmd, "error", reason=f"agent error: {type(exc).__name__}: {exc}")
        if result.duration == 0.0:
            result.duration = time.monotonic() - t0
        await self._emit(
            on_event,
            cmd,
            JobFinished(job_id=cmd.job_id, status=result.status, exit_code=result.exit_code,
                        duration=result.duration),
        )
        level = logging.INFO if cmd.action == "exec" else logging.DEBUG
        if result.status in ("timeout", "error"):
            level = logging.WARNING
        if log.isEnabledFor(level):
            log.log(
                level,
                "command %s (job %s, %s) finished: status=%s exit_code=%s duration=%.3fs %s",
                cmd.id,
                cmd.job_id,
                cmd.action,
                result.status,
                result.exit_code,
                result.duration,
                result.reason,
            )
        return result

    def _ping(self, cmd: Command) -> CommandResult:
        facts = self._facts()
        data = Pong(labels=dict(self._labels()),
                    facts=_facts({k: facts[k] for k in PING_FACTS if k in facts}))
        return self._result(cmd, "ok", data=data)

    async def _exec(self, cmd: Command, on_event: OnEvent | None) -> CommandResult:
        spec = self._prepare(cmd)
        async with self._slots:
            if self._closed:
                raise _Refused("the executor is closed (agent shutting down)")
            return await self._spawn_and_wait(cmd, spec, on_event)

    def _prepare(self, cmd: Command) -> _Spec:
        """Validate an exec command and work out argv, environment, cwd and credentials."""
        if cmd.argv and cmd.shell:
            raise _Refused("exec takes either argv or shell, not both")
        if cmd.argv:
            argv = list(cmd.argv)
        elif cmd.shell:
            argv = [SHELL, "-c", cmd.shell]
        else:
            raise _Refused("exec needs a command: set argv or shell")
        if any("\0" in a for a in argv):
            raise _Refused("the command contains a NUL byte")
        if not (math.isfinite(cmd.timeout) and cmd.timeout > 0):
            raise _Refused(f"timeout must be a positive number of seconds, got {cmd.timeout!r}")

        home, user_name, credentials = self._credentials(cmd.user)
        env = {"PATH": SAFE_PATH, "HOME": home, "LANG": SAFE_LANG}
        if user_name:
            env["USER"] = env["LOGNAME"] = user_name
        for key, value in cmd.env.items():
            if not key or "=" in key or "\0" in key:
                raise _Refused(f"invalid environment variable name {key!r}")
            if "\0" in value:
                raise _Refused(f"environment variable {key!r} contains a NUL byte")
        env.update(cmd.env)

        if cmd.cwd:
            if not os.path.isabs(cmd.cwd):
                raise _Refused(f"cwd must be an absolute path, got {cmd.cwd!r}")
            if not os.path.isdir(cmd.cwd):
                raise _Refused(f"cwd {cmd.cwd!r} does not exist or is not a directory")
            cwd = cmd.cwd
        else:
            cwd = home if os.path.isdir(home) else "/"
        return _Spec(argv=argv, env=env, cwd=cwd, credentials=credentials)

    def _credentials(self, user: str) -> tuple[str, str, dict[str, Any]]:
        """Return (home, user name, Popen credential kwargs) for running as ``user``."""
        euid = os.geteuid()
        try:
            me: pwd.struct_passwd | None = pwd.getpwuid(euid)
        except KeyError:  # an uid without a passwd entry (containers)
            me = None
        if not user or (me is not None and user == me.pw_name):
            return (me.pw_dir if me is not None else "/"), "", {}
        if not self._allow_users:
            raise _Refused(f"running as user {user!r} is not allowed on this agent")
        if euid != 0:
            raise _Refused(f"cannot run as user {user!r}: the agent is not running as root")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise _Refused(f"unknown user {user!r}") from None
        # Popen's user/group/extra_groups do the setgroups/setgid/setuid dance in the child
        # in the right order, without a Python preexec_fn (unsafe with threads).
        credentials: dict[str, Any] = {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
        }
        return pw.pw_dir, pw.pw_name, credentials

    def _output_cap(self, cmd: Command) -> int:
        cap = cmd.output_cap if cmd.output_cap > 0 else self._default_output_cap
        return min(cap, self._max_output_cap)

    async def _spawn_and_wait(
        self, cmd: Command, spec: _Spec, on_event: OnEvent | None
    ) -> CommandResult:
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ExitAwareProtocol(exited, limit=2 * CHUNK_SIZE, loop=loop),
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=spec.env,
                cwd=spec.cwd,
                start_new_session=True,  # own process group: a timeout kills all of it
                **spec.credentials,
            )
        except OSError as exc:
            what = f": {exc.filename}" if exc.filename else ""
            raise _Refused(f"cannot start the command: {exc.strerror or exc}{what}") from None
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        t0 = time.monotonic()
        deadline = loop.time() + cmd.timeout
        run = _Running(proc=proc, cmd=cmd, exited=exited)
        self._running.add(run)
        if self._ledger is not None:
            self._ledger.started(job_id=cmd.job_id, command_id=cmd.id, pid=proc.pid)
        self._idle.clear()
        if self._closed:  # aclose() ran while we were spawning
            self._stop(run, _STOP_SHUTDOWN)
        cap = self._output_cap(cmd)
        out, err = _Capture(cap), _Capture(cap)
        readers: list[asyncio.Task[None]] = []
        lingering = False
        try:
            await self._emit(on_event, cmd, self._started(cmd))
            stream = on_event if cmd.stream_output else None
            readers = [
                asyncio.create_task(self._pump(proc.stdout, "stdout", out, cmd, stream)),
                asyncio.create_task(self._pump(proc.stderr, "stderr", err, cmd, stream)),
            ]
            try:
                async with asyncio.timeout_at(deadline):
                    await exited.wait()
            except TimeoutError:
                await asyncio.shield(self._stop(run, _STOP_TIMEOUT))
                await exited.wait()
            if run.stopper is not None:
                await asyncio.shield(run.stopper)
                pending = await self._drain(readers, max(1.0, self._kill_grace))
            else:
                pending = await self._drain(readers, self._kill_grace)
                if pending:
                    # The command is over but something it started in the background still
                    # holds its output open; kill the group rather than wait for EOF forever.
                    lingering = True
                    _signal_group(proc.pid, signal.SIGKILL)
                    pending = await self._drain(pending, max(1.0, self._kill_grace))
            for task in pending:
                task.cancel()
            for res in await asyncio.gather(*readers, return_exceptions=True):
                if isinstance(res, Exception):
                    log.warning("reading output of command %s failed: %r", cmd.id, res)
        finally:
            self._running.discard(run)
            if self._ledger is not None:
                self._ledger.ended(cmd.id)
            if not self._running:
                self._idle.set()
            if proc.returncode is None or not all(t.done() for t in readers):
                # Cancelled or failed half way: leave nothing behind, and reap the process in
                # the background since a cancelled task must not wait.
                _signal_group(proc.pid, signal.SIGKILL)
                for task in readers:
                    task.cancel()
                self._spawn_background(self._reap(exited, transport))
            else:
                transport.close()

        rc = proc.returncode
        status: ResultStatus
        reasons: list[str] = []
        if run.stop_reason == _STOP_TIMEOUT:
            status = "timeout"
            reasons.append(f"timed out after {cmd.timeout:g}s; process group killed")
        elif run.stop_reason == _STOP_SHUTDOWN:
            status = "error"
            reasons.append("killed: the agent is shutting down")
        elif rc == 0:
            status = "ok"
        else:
            status = "failed"
            if rc is not None and rc < 0:
                reasons.append(f"killed by signal {_signal_name(-rc)}")
        if lingering:
            reasons.append("background processes kept the output open after exit; killed them")
        return self._result(
            cmd,
            status,
            exit_code=rc,
            stdout=out.text(),
            stderr=err.text(),
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            duration=time.monotonic() - t0,
            reason="; ".join(reasons),
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader | None,
        stream: Literal["stdout", "stderr"],
        capture: _Capture,
        cmd: Command,
        on_event: OnEvent | None,
    ) -> None:
        """Read a pipe to EOF, keeping up to the cap; beyond it, drain and discard."""
        if reader is None:
            return
        # Incremental decoding so a multi-byte character split across chunks stays whole.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if on_event else None
        while True:
            chunk = await reader.read(CHUNK_SIZE)
            if not chunk:
                break
            room = capture.cap - len(capture.data)
            if len(chunk) > room:
                capture.truncated = True
                chunk = chunk[: max(room, 0)]
                if not chunk:
                    continue
            capture.data += chunk
            if decoder is not None:
                text = decoder.decode(chunk)
                if text:
                    await self._emit(on_event, cmd,
                                     JobOutput(job_id=cmd.job_id, stream=stream, data=text))
        if decoder is not None:
            text = decoder.decode(b"", final=True)
            if text:
                await self._emit(on_event, cmd,
                                 JobOutput(job_id=cmd.job_id, stream=stream, data=text))

    @staticmethod
    async def _drain(tasks: list[asyncio.Task[None]], within: float) -> list[asyncio.Task[None]]:
        """Wait up to ``within`` seconds for the tasks; return those still pending."""
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return []
        _, still = await asyncio.wait(pending, timeout=within)
        return [t for t in pending if t in still]

    def _spawn_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap(self, exited: asyncio.Event, transport: asyncio.SubprocessTransport) -> None:
        """Wait for a killed process to be reaped, then release its pipes."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._kill_grace + 5.0):
                    await exited.wait()
        finally:
            transport.close()

    def _stop(self, run: _Running, reason: str) -> asyncio.Task[None]:
        """Start killing a command's process group once; later callers share the same task."""
        if run.stopper is None:
            run.stop_reason = reason
            run.stopper = asyncio.create_task(self._kill_group(run.proc.pid))
        return run.stopper

    async def _kill_group(self, pgid: int) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after kill_grace."""
        if not _signal_group(pgid, signal.SIGTERM):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._kill_grace
        while loop.time() < deadline:
            await asyncio.sleep(GROUP_POLL_INTERVAL)
            if not _group_alive(pgid):
                return
        _signal_group(pgid, signal.SIGKILL)

    # --- helpers ------------------------------------------------------------------------

    async def _emit(self, on_event: OnEvent | None, cmd: Command, event: JobEvent) -> None:
        if on_event is None:
            return
        try:
            await on_event(event)
        except Exception:
            # A broken listener must never fail or kill the command.
            log.exception(
                "event listener failed on %r for command %s (job %s); ignored",
                type(event).__struct_config__.tag,
                cmd.id,
                cmd.job_id,
            )

    @staticmethod
    def _started(cmd: Command) -> JobStarted:
        return JobStarted(job_id=cmd.job_id, command_id=cmd.id)

    def _result(self, cmd: Command, status: ResultStatus, **fields: Any) -> CommandResult:
        try:
            node_id = self._node_id()
        except Exception:
            log.exception("node_id() failed; reporting an empty node id")
            node_id = ""
        return CommandResult(
            job_id=cmd.job_id, command_id=cmd.id, node_id=node_id, status=status, **fields
        )


def _facts(facts: dict[str, Any]) -> NodeFacts:
    """The machine's facts (agent.facts) as the wire's typed facts."""
    return msgspec.convert(facts, NodeFacts)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
