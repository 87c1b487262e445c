"""Command intake: subscribe, verify (signature, TTL, replay), match, run, answer.

Results go only to the node's own results subject; refusals are counted and answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.apps import AppReconciler, SyncError
from agent.connection import backoff, flush_all
from agent.ledger import Orphan, SeenLog
from agent.policy import CommandPolicy
from protocol import codec
from protocol.errors import CommandRejected, ProtocolError
from protocol.messages import (
    AnyEventPayload,
    AppsReport,
    Command,
    CommandResult,
    JobEvent,
    SignedCommand,
    SignedKeyRotation,
)
from protocol.selectors import Selector
from protocol.signing import DEFAULT_CLOCK_SKEW, CommandVerifier
from protocol.subjects import Subjects

# Built-ins that only read and answer: their ids are kept in memory only, since a replay
# after a restart changes nothing, and an fsync per node would slow every fleet-wide ping.
READ_ONLY_ACTIONS = frozenset({"ping", "facts"})
# How often subscribe() reports that the server has not yet confirmed the command
# subscriptions (it keeps waiting), and the flush timeout handed to nats-py, which must never
# expire first: see _confirm_subscriptions.
FLUSH_REPORT = 5.0
FLUSH_ABANDON = 3600

OnJobEvent = Callable[[JobEvent], Awaitable[None]]
Emit = Callable[[AnyEventPayload], Awaitable[None]]
OnRotation = Callable[[SignedKeyRotation], Awaitable[None]]


class CommandRunner(Protocol):
    """What runs the ping, facts and exec commands (agent.executor.Executor)."""

    @property
    def running(self) -> int:
        """How many commands are running now (reported in heartbeats)."""
        ...

    async def run(self, cmd: Command, *, on_event: OnJobEvent | None = None) -> CommandResult:
        """Run one command; every failure is a result, never an exception."""
        ...

    async def aclose(self) -> None:
        """Refuse new commands and kill the running ones."""
        ...


class CommandIntake:
    """One node's command subscriptions and the commands they brought in."""

    def __init__(
        self,
        *,
        nc: NATS,
        subjects: Subjects,
        node_id: str,
        labels: dict[str, str],
        verifier: CommandVerifier | None,
        seen_log: SeenLog,
        runner: CommandRunner,
        apps: AppReconciler,
        emit: Emit,
        log: logging.Logger,
        policy: CommandPolicy | None = None,
        on_rotation: OnRotation | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._node_id = node_id
        self._labels = labels
        self._verifier = verifier
        self._seen_log = seen_log
        self._runner = runner
        self._apps = apps
        self._emit = emit
        self.log = log
        self._policy = policy
        self._on_rotation = on_rotation
        self.rejected_commands = 0
        # Of those, refused by the node's command policy (also in rejected_commands).
        self.policy_rejected = 0
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._selectors: dict[str, Selector] = {}

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self) -> None:
        """Subscribe to the command subjects and wait until the server confirmed them,
        retried with backoff: a slow or paused server (a thousand agents enrolling) must
        never end the agent. Each subject is subscribed once; nats-py re-sends
        subscriptions itself after a reconnect."""
        subjects = [self._subjects.cmd_all, self._subjects.cmd_node(self._node_id)]
        attempt = 0
        while True:
            try:
                while len(self._subs) < len(subjects):
                    subject = subjects[len(self._subs)]
                    self._subs.append(await self._nc.subscribe(subject, cb=self._on_command))
                await self._confirm_subscriptions()
                return
            except Exception as exc:
                delay = backoff(attempt)
                self.log.warning(
                    "command subscriptions not confirmed by NATS (%s); retrying in %.1fs",
                    exc or type(exc).__name__,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _confirm_subscriptions(self) -> None:
        """A flush (PING/PONG) that is waited for as long as its PONG can still come: two
        in fact (agent.connection.flush_all), as one nats-py flush can be answered before
        the server has read the SUBs.

        nats-py's flush(timeout) cancels its PONG future on timeout but leaves it queued;
        the late PONG then raises inside the client's read loop, which ends for good (the
        connection reads nothing more and never reconnects). So the flush is never left to
        time out: we report every FLUSH_REPORT seconds and keep waiting, and send a new one
        only after a reconnect, which drops the queued PONG futures (and so this one's).
        """
        nc = self._nc
        reconnects = nc.stats["reconnects"]
        flush = asyncio.ensure_future(flush_all(nc, FLUSH_ABANDON))
        waited = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({flush}, timeout=FLUSH_REPORT)
                if done:
                    flush.result()
                    return
                waited += FLUSH_REPORT
                if nc.stats["reconnects"] != reconnects or nc.is_closed:
                    flush.cancel()  # its PONG future is gone with the old connection
                    raise ConnectionError("reconnected before the server confirmed")
                self.log.warning(
                    "command subscriptions not confirmed by NATS after %.0fs; still waiting",
                    waited,
                )
        except asyncio.CancelledError:
            flush.cancel()  # we are stopping: the connection is closed next
            raise

    async def unsubscribe(self) -> None:
        """Take no more commands (those already taken keep running)."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The commands (and app passes) still running, for the agent to wait on."""
        return list(self._tasks)

    # -- intake ----------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        """Verify before anything runs; run in a task so a long command blocks nothing."""
        try:
            signed = codec.decode(msg.data)
            if isinstance(signed, SignedKeyRotation) and self._on_rotation is not None:
                # Signing-key rotations travel on the command subjects too (the broadcast
                # one above all): every node may read them, none may publish them.
                await self._on_rotation(signed)
                return
            if not isinstance(signed, SignedCommand):
                raise ProtocolError(f"expected a 'signed_cmd' message, got "
                                    f"{type(signed).__struct_config__.tag!r}")
        except ProtocolError as exc:
            await self._refuse(f"undecodable command on {msg.subject}: {exc.reason}")
            return
        if self._verifier is None:
            await self._refuse("agent has no controller key configured", *_ids_of(signed))
            return
        try:
            cmd = self._verifier.verify(signed)
        except (CommandRejected, ProtocolError) as exc:
            await self._refuse(exc.reason, *_ids_of(signed))
            return
        if cmd.targets and self._node_id not in cmd.targets:
            return
        if not cmd.targets and cmd.selector:
            try:
                if not self._selector(cmd.selector).matches(self._labels):
                    return
            except ValueError as exc:
                await self._refuse(f"bad selector: {exc}", cmd.job_id, cmd.id)
                return
        if cmd.env and msg.subject == self._subjects.cmd_all:
            # Every node reads the broadcast subject: env values (secrets, often) travel
            # only on a node's own subject. The controller never sends this; refuse it.
            await self._refuse(
                "a command with env values arrived on the broadcast subject, which every node "
                "can read; env is accepted only on the node's own command subject",
                cmd.job_id, cmd.id,
            )
            return
        if self._policy is not None:
            # After the signature checks (only then does the command name its job) and
            # before anything runs: a stolen controller key gets no further than here.
            refusal = self._policy.check(cmd)
            if refusal is not None:
                self.policy_rejected += 1
                await self._refuse(f"refused by node policy: {refusal}", cmd.job_id, cmd.id)
                return
        if cmd.action in READ_ONLY_ACTIONS:
            # Instant built-ins run inline: a task per broadcast costs more than the answer.
            await self._run_command(cmd)
            return
        if not await self._remember(cmd):
            return
        self._track(asyncio.create_task(self._run_command(cmd)))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remember(self, cmd: Command) -> bool:
        """Write the command's id to disk (fsynced) before it runs, so that a restarted
        agent still refuses a replay of it; a command that cannot be recorded is refused."""
        assert self._verifier is not None
        until = self._verifier.forget_after(cmd.id)
        if until is None:
            until = cmd.issued_at + cmd.ttl + DEFAULT_CLOCK_SKEW
        try:
            await asyncio.to_thread(self._seen_log.record, cmd.id, until)
        except OSError as exc:
            await self._refuse(f"cannot record the command id (replay protection): {exc}",
                               cmd.job_id, cmd.id)
            return False
        return True

    async def _refuse(self, reason: str, job_id: str = "", command_id: str = "") -> None:
        """Count and log a refused command and, when it names its job, answer 'rejected'."""
        self.rejected_commands += 1
        self.log.warning("command refused: %s", reason)
        await self.reply(CommandResult(job_id=job_id, command_id=command_id,
                                       node_id=self._node_id, status="rejected", reason=reason))

    def _selector(self, text: str) -> Selector:
        """Parsed selectors, cached: a broadcast repeats the same few selectors."""
        sel = self._selectors.get(text)
        if sel is None:
            sel = Selector.parse(text)
            if len(self._selectors) >= 64:
                self._selectors.clear()
            self._selectors[text] = sel
        return sel

    # -- running ---------------------------------------------------------------------

    async def _run_command(self, cmd: Command) -> None:
        try:
            if cmd.action == "reconcile":
                result = await self._reconcile_apps(cmd)
            else:
                # Built-ins answer at once: progress events would only double their traffic.
                result = await self._runner.run(
                    cmd, on_event=self._emit if cmd.action == "exec" else None
                )
        except Exception as exc:
            self.log.exception("command %s failed inside the agent", cmd.id)
            result = CommandResult(
                job_id=cmd.job_id,
                command_id=cmd.id,
                node_id=self._node_id,
                status="error",
                reason=str(exc),
            )
        await self.reply(result)

    async def _reconcile_apps(self, cmd: Command) -> CommandResult:
        """The "reconcile" action: one app pass now; data = per-app status."""
        try:
            # Shielded so a timeout does not kill steps half way; tracked so stop() ends it.
            pass_task = asyncio.ensure_future(self._apps.reconcile())
            self._track(pass_task)
            pass_task.add_done_callback(lambda t: t.cancelled() or t.exception())
            data = await asyncio.wait_for(asyncio.shield(pass_task), cmd.timeout)
        except SyncError as exc:
            return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self._node_id,
                                 status="error", reason=f"app sync failed: {exc}")
        except TimeoutError:
            return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self._node_id,
                                 status="timeout", data=AppsReport(apps=self._apps.view()),
                                 reason=f"app reconcile still running after {cmd.timeout:g}s")
        return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self._node_id,
                             status="ok", data=AppsReport(apps=data))

    async def report_orphans(self, orphans: list[Orphan]) -> None:
        """Tell each job whose command a previous agent left running what became of it."""
        for o in orphans:
            if o.killed:
                reason = ("agent restarted: command killed (it was still running when the "
                          f"previous agent stopped; process group {o.pgid})")
            else:
                reason = ("agent restarted: the command ended while the agent was down; "
                          "its output and exit code are lost")
            self.log.warning("job %s: %s", o.job_id, reason)
            await self.reply(CommandResult(job_id=o.job_id, command_id=o.command_id,
                                           node_id=self._node_id, status="error",
                                           reason=reason))

    async def reply(self, result: CommandResult) -> None:
        """Publish a result on this node's results subject (never to a reply subject that
        every node of a broadcast shares: the subject is what proves who answered)."""
        if not result.job_id:
            return
        data = fit_result(result, self._nc.max_payload or codec.DEFAULT_MAX_PAYLOAD)
        try:
            await self._nc.publish(self._subjects.results(self._node_id), data)
        except Exception as exc:
            self.log.warning("result of job %s not sent: %s", result.job_id, exc)


def fit_result(result: CommandResult, limit: int) -> bytes:
    """Encode ``result`` within ``limit`` bytes, cutting output (marked truncated) if needed.

    Output caps are per stream and counted before decoding; two full streams, or invalid
    UTF-8 that grows when replaced, could otherwise exceed the NATS payload limit, and a
    result that cannot be published is a node reported as not answering.
    """
    data = codec.encode(result)
    budget = limit - 4096  # headers and protocol overhead
    if len(data) <= budget:
        return data
    # 256: the truncation flags and longer headers that the cut result may add
    overhead = len(data) - len(result.stdout.encode()) - len(result.stderr.encode()) + 256
    room = max(0, budget - overhead)
    half = room // 2
    out = msgspec.structs.replace(
        result,
        stdout=_cut(result.stdout, half),
        stderr=_cut(result.stderr, room - min(half, len(result.stdout.encode()))),
        stdout_truncated=result.stdout_truncated or len(result.stdout.encode()) > half,
        stderr_truncated=result.stderr_truncated
        or len(result.stderr.encode()) > room - min(half, len(result.stdout.encode())),
    )
    data = codec.encode(out)
    if len(data) <= budget:
        return data
    return codec.encode(msgspec.structs.replace(
        out, stdout="", stderr="", data=None, stdout_truncated=True, stderr_truncated=True,
        reason=(out.reason + "; " if out.reason else "") + "result too large for NATS",
    ))


def _cut(text: str, max_bytes: int) -> str:
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes)].decode("utf-8", "ignore")


def _ids_of(signed: SignedCommand) -> tuple[str, str]:
    """Best-effort ids of a refused command, so the controller can file the refusal."""
    try:
        cmd = codec.decode(signed.payload, Command)
        return cmd.job_id, cmd.id
    except ProtocolError:
        return "", ""
