"""The agent runtime: enrollment, heartbeats, metric batches with an offline buffer, commands.

No module-level state: many agents can run in one event loop (tests, the broadcast bench).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import nacl.public
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.apps import AppReconciler, SyncError
from agent.collectors.base import Collector
from agent.collectors.scheduler import CollectorSet, build_collectors
from agent.config import AgentConfig, ConfigError
from agent.facts import collect_facts
from agent.identity import EnrollState, Identity
from agent.ledger import Orphan, RunLedger, SeenLog
from protocol import codec
from protocol.errors import CommandRejected, ProtocolError
from protocol.messages import (
    Command,
    CommandResult,
    EnrollReply,
    EnrollRequest,
    ErrorReply,
    Event,
    Heartbeat,
    MetricBatch,
    SealedReply,
    SignedCommand,
)
from protocol.selectors import Selector
from protocol.signing import DEFAULT_CLOCK_SKEW, CommandVerifier, open_reply
from protocol.subjects import ENROLL_INBOX, Subjects

AGENT_VERSION = "0.1.0"
Severity = Literal["debug", "info", "warning", "error"]
# Labels copied into every metric as tags; all have a small, bounded set of values.
TAG_LABELS = ("infra", "group", "provider", "region", "zone")
# Refusals that a later attempt (a new request) can overcome: the clock was off.
_TRANSIENT_REFUSALS = ("clock_skew",)
# Built-ins that only read and answer: their ids are kept in memory only, since a replay
# after a restart changes nothing, and an fsync per node would slow every fleet-wide ping.
READ_ONLY_ACTIONS = frozenset({"ping", "facts"})
# How often start() reports that the server has not yet confirmed the command subscriptions
# (it keeps waiting), and the flush timeout handed to nats-py, which must never expire first:
# see _confirm_subscriptions.
FLUSH_REPORT = 5.0
FLUSH_ABANDON = 3600


class EnrollmentError(Exception):
    """Enrollment was refused for good (bad, used or expired token): retrying cannot help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


async def _connect(**opts: Any) -> NATS:
    """``nats.connect``, but a refused connection's socket is closed now: nats-py leaves it
    open until the next garbage collection, and connects are retried for as long as it
    takes."""
    nc = NATS()
    try:
        await nc.connect(**opts)
    except BaseException:
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    return nc


def _backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    return float(min(cap, base * 2.0 ** min(attempt, 30)) * (0.5 + random.random() / 2))


class Agent:
    """One agent. ``async with Agent(config=cfg) as a: await a.wait_closed()``."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        collectors: list[Collector] | None = None,
        version: str = AGENT_VERSION,
        executor_factory: Callable[[Agent], Any] | None = None,
    ) -> None:
        self.config = config
        self.version = version
        self.subjects = Subjects(config.subject_prefix)
        self.log = logging.getLogger("barista.agent")
        self.hostname = config.hostname or socket.gethostname()
        self._collectors = collectors
        self._executor_factory = executor_factory
        self.identity: Identity | None = None
        self.state: EnrollState | None = None
        self.nc: NATS | None = None
        self.collector_set: CollectorSet | None = None
        self.verifier: CommandVerifier | None = None
        self.seen_log: SeenLog | None = None
        self.ledger: RunLedger | None = None
        self.executor: Any = None
        self.apps: AppReconciler | None = None
        self.buffer: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=config.buffer_batches
        )
        self.dropped_total = 0
        self._drops_since_connect = 0
        # Metric points dropped because even alone they exceed the stream's batch cap.
        self.oversized_points = 0
        self.published_batches = 0
        self.rejected_commands = 0
        self._seq = 0
        self._hb_seq = 0
        self._boot = f"{os.getpid():x}{random.getrandbits(32):08x}"
        self._started = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._cmd_tasks: set[asyncio.Task[Any]] = set()
        self._have_data = asyncio.Event()
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._facts: dict[str, Any] = {}
        self._stopping = False
        self._selectors: dict[str, Selector] = {}
        self._cmd_subs: list[Any] = []

    # -- properties ------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.state.node_id if self.state else ""

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.state.labels) if self.state else {}

    @property
    def metrics_interval(self) -> float:
        assert self.state is not None
        return self.config.metrics_interval or self.state.metrics_interval

    @property
    def heartbeat_interval(self) -> float:
        assert self.state is not None
        return self.config.heartbeat_interval or self.state.heartbeat_interval

    @property
    def state_path(self) -> Any:
        return self.config.state_dir / "state.json"

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        self.identity = await asyncio.to_thread(Identity, cfg.state_dir / "identity.nk")
        self._facts = await asyncio.to_thread(collect_facts, self.version)
        self.state = EnrollState.load(self.state_path)
        if self.state is None:
            self.state = await self._enroll_with_token()
            self.state.save(self.state_path)
        else:
            self.log.info("node %s: already enrolled", self.state.node_id)
        self.log = logging.getLogger(f"barista.agent.{self.state.node_id}")
        keys = cfg.controller_keys or self.state.command_keys
        self.verifier = CommandVerifier(keys) if keys else None
        if self.verifier is None:
            self.log.warning("no controller key configured: every command will be refused")
        # Ids accepted before a restart stay refused for their TTL (replay protection).
        self.seen_log = SeenLog(cfg.state_dir / "seen-commands.log")
        remembered = await asyncio.to_thread(self.seen_log.load)
        if self.verifier is not None and remembered:
            self.verifier.remember(remembered)
        # Commands a previous agent left running (kill -9, crash) are ended before any new
        # one starts; their jobs hear about it once we are connected.
        self.ledger = RunLedger(cfg.state_dir / "running")
        orphans = await asyncio.to_thread(self.ledger.reap)
        self.collector_set = CollectorSet(
            self._collectors
            if self._collectors is not None
            else build_collectors(cfg.collectors or None)
        )
        if self._executor_factory is not None:
            self.executor = self._executor_factory(self)
        else:
            from agent.executor import Executor

            self.executor = Executor(
                max_concurrency=cfg.max_concurrency,
                facts=lambda: dict(self._facts),
                labels=lambda: self.labels,
                node_id=lambda: self.node_id,
                allow_users=cfg.allow_run_as_user,
                ledger=self.ledger,
            )
        self.apps = AppReconciler(
            state_dir=cfg.state_dir / "apps",
            request=self._app_sync_request,
            emit=self.emit,
            node_id=lambda: self.node_id,
            log=logging.getLogger(f"barista.agent.{self.node_id}.apps"),
        )
        await self._connect()
        await self._report_orphans(orphans)
        self.apps.trigger()  # converge to the desired apps, also after a restart
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._collect_loop(), name="collect"),
            asyncio.create_task(self._publish_loop(), name="publish"),
        ]
        self.log.info("node %s: agent started (labels %s)", self.node_id, self.labels)

    async def stop(self) -> None:
        """Stop taking commands, kill running ones, flush what can be sent, disconnect."""
        self._stopping = True
        for sub in self._cmd_subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._cmd_subs.clear()
        for task in self._tasks:
            task.cancel()
        # Kill running commands first: waiting for them would wait for their timeouts.
        if self.executor is not None and hasattr(self.executor, "aclose"):
            await self.executor.aclose()
        if self.apps is not None:
            await self.apps.close()
        for task in list(self._tasks) + list(self._cmd_tasks):
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), 3)
            except Exception:
                await self.nc.close()
        if self.seen_log is not None:
            self.seen_log.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- enrollment ------------------------------------------------------------------

    async def _enroll_with_token(self) -> EnrollState:
        """Enroll with the join token from the config, a file or the environment; the token
        is held only for the enrollment itself."""
        cfg = self.config
        try:
            token = cfg.join_token()
        except ConfigError as exc:
            raise EnrollmentError("no_token", str(exc)) from None
        if not token:
            raise EnrollmentError(
                "no_token",
                "this agent is not enrolled and has no join token: create one with "
                "`barista token create`, write it to a 0600 file and pass --token-file FILE "
                "(or set BARISTA_AGENT_TOKEN)",
            )
        given = cfg.token
        cfg.token = token
        try:
            return await self._enroll()
        finally:
            cfg.token = given  # a token read from a file is not kept past enrollment

    async def _enroll(self) -> EnrollState:
        cfg = self.config
        assert self.identity is not None
        if not cfg.token:
            raise EnrollmentError(
                "no_token",
                "this agent is not enrolled and has no join token: create one with "
                "`barista token create` and pass it with --token-file FILE "
                "(or BARISTA_AGENT_TOKEN)",
            )
        attempt = 0
        while True:
            try:
                reply = await self._enroll_once(self._enroll_request())
            except EnrollmentError:
                raise
            except Exception as exc:  # transient: NATS down, no controller, timeout
                delay = _backoff(attempt)
                self.log.warning(
                    "enrollment attempt %d failed (%s); retrying in %.1fs",
                    attempt + 1,
                    exc or type(exc).__name__,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.log.info("enrolled as node %s", reply.node_id)
            return EnrollState(
                node_id=reply.node_id,
                labels=reply.labels,
                auth=reply.auth,
                inbox_prefix=reply.inbox_prefix,
                command_keys=reply.command_keys,
                heartbeat_interval=reply.heartbeat_interval,
                metrics_interval=reply.metrics_interval,
            )

    def _enroll_request(self) -> tuple[EnrollRequest, nacl.public.PrivateKey]:
        """A fresh request per attempt: its own time, a new ephemeral key for the sealed
        reply, signed with the identity key (the controller checks all three)."""
        cfg = self.config
        assert self.identity is not None
        reply_key = nacl.public.PrivateKey.generate()
        req = EnrollRequest(
            token=cfg.token,
            identity=self.identity.public_key,
            hostname=self.hostname,
            agent_version=self.version,
            facts={k: str(v) for k, v in self._facts.items()},
            labels=cfg.labels,
            ts=time.time(),
            reply_key=bytes(reply_key.public_key),
        )
        return self.identity.sign_enroll(req), reply_key

    async def _enroll_once(
        self, request: tuple[EnrollRequest, nacl.public.PrivateKey]
    ) -> EnrollReply:
        cfg = self.config
        req, reply_key = request
        nc = await _connect(
            servers=cfg.nats_urls,
            user=cfg.enroll_user,
            password=cfg.enroll_password,
            inbox_prefix=ENROLL_INBOX.encode(),
            allow_reconnect=False,
            connect_timeout=cfg.enroll_timeout,
            max_reconnect_attempts=0,
            name=f"barista-agent-enroll {self.hostname}",
            error_cb=self._on_enroll_error,
        )
        try:
            msg = await nc.request(
                self.subjects.enroll, codec.encode(req), timeout=cfg.enroll_timeout
            )
        finally:
            await nc.close()
        try:
            reply = codec.decode(msg.data)
            if isinstance(reply, SealedReply):
                # Sealed to our ephemeral key: nobody else on the enroll inbox can read it.
                reply = codec.decode(open_reply(reply_key, reply))
        except ProtocolError as exc:
            raise ConnectionError(f"bad enrollment reply: {exc.reason}") from None
        if isinstance(reply, ErrorReply):
            if reply.code in ("internal",):
                raise ConnectionError(reply.message)
            raise EnrollmentError(reply.code, reply.message)
        if not isinstance(reply, EnrollReply):
            raise ConnectionError(f"unexpected enrollment reply {type(reply).__name__}")
        if not reply.ok:
            if reply.error_code in _TRANSIENT_REFUSALS:
                raise ConnectionError(f"{reply.error} [{reply.error_code}]")
            raise EnrollmentError(
                reply.error_code or "refused", reply.error or "enrollment refused"
            )
        return reply

    # -- connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        cfg, st = self.config, self.state
        assert st is not None and self.identity is not None
        opts: dict[str, Any] = {
            "servers": cfg.nats_urls,
            "name": f"barista-agent {st.node_id}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1.0,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }
        if st.inbox_prefix:
            opts["inbox_prefix"] = st.inbox_prefix.encode()
        if st.auth == "nkey":
            opts["nkeys_seed"] = str(self.identity.seed_path)
        elif cfg.nats_creds:
            opts["user_credentials"] = cfg.nats_creds
        elif cfg.nats_user:
            opts["user"], opts["password"] = cfg.nats_user, cfg.nats_password
        attempt = 0
        while True:
            try:
                self.nc = await _connect(**opts)
                break
            except Exception as exc:
                delay = _backoff(attempt)
                self.log.warning("cannot connect to NATS (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        self._connected.set()
        await self._subscribe_commands(st.node_id)

    async def _subscribe_commands(self, node_id: str) -> None:
        """Subscribe to the command subjects and wait until the server confirmed them,
        retried with backoff: a slow or paused server (a thousand agents enrolling) must
        never end the agent. Each subject is subscribed once; nats-py re-sends
        subscriptions itself after a reconnect."""
        assert self.nc is not None
        subjects = [self.subjects.cmd_all, self.subjects.cmd_node(node_id)]
        attempt = 0
        while True:
            try:
                while len(self._cmd_subs) < len(subjects):
                    subject = subjects[len(self._cmd_subs)]
                    self._cmd_subs.append(await self.nc.subscribe(subject, cb=self._on_command))
                await self._confirm_subscriptions()
                return
            except Exception as exc:
                delay = _backoff(attempt)
                self.log.warning(
                    "command subscriptions not confirmed by NATS (%s); retrying in %.1fs",
                    exc or type(exc).__name__,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _confirm_subscriptions(self) -> None:
        """A flush (PING/PONG) that is waited for as long as its PONG can still come.

        nats-py's flush(timeout) cancels its PONG future on timeout but leaves it queued;
        the late PONG then raises inside the client's read loop, which ends for good (the
        connection reads nothing more and never reconnects). So the flush is never left to
        time out: we report every FLUSH_REPORT seconds and keep waiting, and send a new one
        only after a reconnect, which drops the queued PONG futures (and so this one's).
        """
        assert self.nc is not None
        nc = self.nc
        reconnects = nc.stats["reconnects"]
        flush = asyncio.ensure_future(nc.flush(timeout=FLUSH_ABANDON))
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

    async def _report_orphans(self, orphans: list[Orphan]) -> None:
        """Tell each job whose command a previous agent left running what became of it."""
        for o in orphans:
            if o.killed:
                reason = ("agent restarted: command killed (it was still running when the "
                          f"previous agent stopped; process group {o.pgid})")
            else:
                reason = ("agent restarted: the command ended while the agent was down; "
                          "its output and exit code are lost")
            self.log.warning("job %s: %s", o.job_id, reason)
            await self._reply(CommandResult(job_id=o.job_id, command_id=o.command_id,
                                            node_id=self.node_id, status="error",
                                            reason=reason))

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if self._stopping:
            return
        self.log.warning(
            "disconnected from NATS; buffering metrics (up to %d batches)",
            self.config.buffer_batches,
        )

    async def _on_reconnected(self) -> None:
        self._connected.set()
        if self.apps is not None:
            self.apps.trigger()  # assignments may have changed while we were away
        self.log.info("reconnected to NATS; %d batches buffered", len(self.buffer))
        if self._drops_since_connect:
            dropped, self._drops_since_connect = self._drops_since_connect, 0
            await self.emit(
                "metrics.dropped",
                f"dropped {dropped} metric batches while offline",
                severity="warning",
                data={"dropped": dropped},
            )

    async def _on_enroll_error(self, exc: Exception) -> None:
        # The failed attempt itself is logged once by _enroll with its retry delay.
        self.log.debug("enrollment connection: %s", exc)

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("nats: %s", exc)

    async def emit(
        self,
        type_: str,
        message: str = "",
        *,
        severity: Severity = "info",
        data: dict[str, Any] | None = None,
    ) -> None:
        """Publish an event on this node's events subject (best effort)."""
        if self.nc is None or not self.nc.is_connected:
            return
        ev = Event(
            ts=time.time(),
            type=type_,
            node_id=self.node_id,
            message=message,
            severity=severity,
            data=data or {},
        )
        try:
            await self.nc.publish(self.subjects.events(self.node_id), codec.encode(ev))
        except Exception as exc:
            self.log.debug("event %s not published: %s", type_, exc)

    # -- loops -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        subject = self.subjects.heartbeat(self.node_id)
        while True:
            if self.nc is not None and self.nc.is_connected:
                self._hb_seq += 1
                hb = Heartbeat(
                    node_id=self.node_id,
                    seq=self._hb_seq,
                    ts=time.time(),
                    uptime=time.monotonic() - self._started,
                    agent_version=self.version,
                    buffered_batches=len(self.buffer),
                    dropped_batches=self.dropped_total,
                    running_jobs=getattr(self.executor, "running", 0),
                )
                try:
                    await self.nc.publish(subject, codec.encode(hb))
                except Exception as exc:
                    self.log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    def _base_tags(self) -> dict[str, str]:
        tags = {"node": self.node_id}
        for key in TAG_LABELS:
            if key in self.labels:
                tags[key] = self.labels[key]
        return tags

    async def collect_once(self) -> None:
        assert self.collector_set is not None
        points, errors = await self.collector_set.collect_async()
        self._seq += 1
        # Count the drop this batch causes before building it, so the batch itself
        # carries the count (the cumulative total, which later batches carry too).
        self._make_room()
        batch = MetricBatch(
            node_id=self.node_id,
            seq=self._seq,
            ts=time.time_ns(),
            points=points,
            tags=self._base_tags(),
            dropped=self.dropped_total,
            errors=errors,
        )
        parts, lost = fit_batch(batch, codec.METRIC_BATCH_MAX)
        if lost:
            self.oversized_points += lost
            self.log.warning(
                "%d metric points of batch %d do not fit in %d bytes and were dropped "
                "(%d so far)", lost, self._seq, codec.METRIC_BATCH_MAX, self.oversized_points,
            )
        msg_id = f"{self.node_id}:{self._boot}:{self._seq}"
        for i, data in enumerate(parts):
            if i:
                self._make_room()
            # The first part keeps the plain id, so a batch that fits is sent as before.
            self._append(f"{msg_id}.{i}" if i else msg_id, data)

    def enqueue(self, msg_id: str, data: bytes) -> None:
        self._make_room()
        self._append(msg_id, data)

    def _make_room(self) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped_total += 1
            self._drops_since_connect += 1

    def _append(self, msg_id: str, data: bytes) -> None:
        self.buffer.append((msg_id, data))  # a full deque drops its oldest
        self._have_data.set()

    async def _collect_loop(self) -> None:
        interval = self.metrics_interval
        next_at = time.monotonic()
        while True:
            try:
                await self.collect_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("metric collection failed")
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # we fell behind (suspend, overload): skip, do not burst
                next_at = now + interval
            await asyncio.sleep(next_at - now)

    async def _publish_loop(self) -> None:
        """Sends buffered batches oldest first; a batch leaves the buffer once JetStream
        acknowledged it, so a lost connection or ack means a resend, not a loss (the
        Nats-Msg-Id header lets JetStream drop the duplicate)."""
        subject = self.subjects.metrics(self.node_id)
        attempt = 0
        while True:
            if not self.buffer:
                self._have_data.clear()
                await self._have_data.wait()
                continue
            if self.nc is None or not self.nc.is_connected:
                await self._connected.wait()
                continue
            msg_id, data = self.buffer[0]
            try:
                js = self.nc.jetstream()
                await js.publish(subject, data, timeout=5.0, headers={"Nats-Msg-Id": msg_id})
            except asyncio.CancelledError:
                raise
            except nats.js.errors.BadRequestError as exc:
                # The stream refuses this batch for good (e.g. over its max_msg_size):
                # resending it would block every later batch, so drop it and count it.
                self.dropped_total += 1
                self.log.warning("metric batch %s refused by the stream (%s); dropped",
                                 msg_id, exc.description or exc)
                if self.buffer and self.buffer[0][0] == msg_id:
                    self.buffer.popleft()
                continue
            except Exception as exc:
                delay = _backoff(attempt, base=0.2, cap=5.0)
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    self.log.warning(
                        "metric batch not acknowledged (%s); retrying in %.1fs",
                        exc or type(exc).__name__,
                        delay,
                    )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            # The buffer may have dropped its oldest while we awaited; pop only ours.
            if self.buffer and self.buffer[0][0] == msg_id:
                self.buffer.popleft()
            self.published_batches += 1

    # -- commands --------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        """Verify before anything runs; run in a task so a long command blocks nothing."""
        try:
            signed = codec.decode(msg.data, SignedCommand)
        except ProtocolError as exc:
            await self._refuse(f"undecodable command on {msg.subject}: {exc.reason}")
            return
        if self.verifier is None:
            await self._refuse("agent has no controller key configured", *_ids_of(signed))
            return
        try:
            cmd = self.verifier.verify(signed)
        except (CommandRejected, ProtocolError) as exc:
            await self._refuse(getattr(exc, "reason", str(exc)), *_ids_of(signed))
            return
        if cmd.targets and self.node_id not in cmd.targets:
            return
        if not cmd.targets and cmd.selector:
            try:
                if not self._selector(cmd.selector).matches(self.labels):
                    return
            except ValueError as exc:
                await self._refuse(f"bad selector: {exc}", cmd.job_id, cmd.id)
                return
        if cmd.env and msg.subject == self.subjects.cmd_all:
            # Every node reads the broadcast subject: env values (secrets, often) travel
            # only on a node's own subject. The controller never sends this; refuse it.
            await self._refuse(
                "a command with env values arrived on the broadcast subject, which every node "
                "can read; env is accepted only on the node's own command subject",
                cmd.job_id, cmd.id,
            )
            return
        if cmd.action in READ_ONLY_ACTIONS:
            # Instant built-ins run inline: a task per broadcast costs more than the answer.
            await self._run_command(msg, cmd)
            return
        if not await self._remember(cmd):
            return
        task = asyncio.create_task(self._run_command(msg, cmd))
        self._cmd_tasks.add(task)
        task.add_done_callback(self._cmd_tasks.discard)

    async def _remember(self, cmd: Command) -> bool:
        """Write the command's id to disk (fsynced) before it runs, so that a restarted
        agent still refuses a replay of it; a command that cannot be recorded is refused."""
        assert self.verifier is not None and self.seen_log is not None
        until = self.verifier.forget_after(cmd.id)
        if until is None:
            until = cmd.issued_at + cmd.ttl + DEFAULT_CLOCK_SKEW
        try:
            await asyncio.to_thread(self.seen_log.record, cmd.id, until)
        except OSError as exc:
            await self._refuse(f"cannot record the command id (replay protection): {exc}",
                               cmd.job_id, cmd.id)
            return False
        return True

    async def _refuse(self, reason: str, job_id: str = "", command_id: str = "") -> None:
        """Count and log a refused command and, when it names its job, answer 'rejected'."""
        self.rejected_commands += 1
        self.log.warning("command refused: %s", reason)
        await self._reply(CommandResult(job_id=job_id, command_id=command_id,
                                        node_id=self.node_id, status="rejected", reason=reason))

    def _selector(self, text: str) -> Selector:
        """Parsed selectors, cached: a broadcast repeats the same few selectors."""
        sel = self._selectors.get(text)
        if sel is None:
            sel = Selector.parse(text)
            if len(self._selectors) >= 64:
                self._selectors.clear()
            self._selectors[text] = sel
        return sel

    async def _run_command(self, msg: Msg, cmd: Command) -> None:
        async def on_event(kind: str, data: dict[str, Any]) -> None:
            await self.emit(f"job.{kind}", data={"job_id": cmd.job_id, **data})

        try:
            if cmd.action == "reconcile":
                result = await self._reconcile_apps(cmd)
            else:
                # Built-ins answer at once: progress events would only double their traffic.
                result = await self.executor.run(
                    cmd, on_event=on_event if cmd.action == "exec" else None
                )
        except Exception as exc:
            self.log.exception("command %s failed inside the agent", cmd.id)
            result = CommandResult(
                job_id=cmd.job_id,
                command_id=cmd.id,
                node_id=self.node_id,
                status="error",
                reason=str(exc),
            )
        await self._reply(result)

    async def _reconcile_apps(self, cmd: Command) -> CommandResult:
        """The "reconcile" action: one app pass now; data = per-app status."""
        assert self.apps is not None
        try:
            # Shielded: a slow pass keeps going (steps are not killed half way).
            # Shielded so a timeout does not kill steps half way; tracked so stop() ends it.
            pass_task = asyncio.ensure_future(self.apps.reconcile())
            self._cmd_tasks.add(pass_task)
            pass_task.add_done_callback(self._cmd_tasks.discard)
            pass_task.add_done_callback(lambda t: t.cancelled() or t.exception())
            data = await asyncio.wait_for(asyncio.shield(pass_task), cmd.timeout)
        except SyncError as exc:
            return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self.node_id,
                                 status="error", reason=f"app sync failed: {exc}")
        except TimeoutError:
            return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self.node_id,
                                 status="timeout", data=self.apps.view(),
                                 reason=f"app reconcile still running after {cmd.timeout:g}s")
        return CommandResult(job_id=cmd.job_id, command_id=cmd.id, node_id=self.node_id,
                             status="ok", data=data)

    async def _app_sync_request(self, payload: bytes) -> bytes:
        if self.nc is None or not self.nc.is_connected:
            raise ConnectionError("not connected to NATS")
        msg = await self.nc.request(self.subjects.app_sync(self.node_id), payload, timeout=5.0)
        return msg.data

    async def _reply(self, result: CommandResult) -> None:
        """Publish a result on this node's results subject (never to a reply subject that
        every node of a broadcast shares: the subject is what proves who answered)."""
        if self.nc is None or not result.job_id:
            return
        data = fit_result(result, self.nc.max_payload or codec.DEFAULT_MAX_PAYLOAD)
        try:
            await self.nc.publish(self.subjects.results(self.node_id), data)
        except Exception as exc:
            self.log.warning("result of job %s not sent: %s", result.job_id, exc)


def fit_batch(batch: MetricBatch, limit: int) -> tuple[list[bytes], int]:
    """Encode ``batch`` as parts of at most ``limit`` bytes each (the METRICS stream refuses
    bigger ones), halving the points until they fit. Returns (parts, points dropped): a
    point that does not fit even alone is dropped and counted, never sent to be refused.
    """
    data = codec.encode(batch)
    if len(data) <= limit:
        return [data], 0
    if len(batch.points) <= 1:
        return [], len(batch.points)
    mid = len(batch.points) // 2
    parts: list[bytes] = []
    lost = 0
    for half in (batch.points[:mid], batch.points[mid:]):
        more, dropped = fit_batch(msgspec.structs.replace(batch, points=half), limit)
        parts += more
        lost += dropped
    return parts, lost


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
        out, stdout="", stderr="", data={}, stdout_truncated=True, stderr_truncated=True,
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


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    async with Agent(config=config) as agent:
        await stop.wait()
        agent.log.info("stopping")


__all__ = ["AGENT_VERSION", "Agent", "EnrollmentError", "fit_batch", "run_agent"]
