"""The controller process: NATS (embedded or external), state, enrollment, fleet, API wiring."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from controller.apps.deployer import Deployer
from controller.config import ControllerConfig, Secrets
from controller.enroll import Enrollment, TokenService
from controller.errors import BadRecord
from controller.fleet import Fleet
from controller.ingest.service import IngestService, sink_config_of
from controller.jobs.engine import JobEngine, JobRecord
from controller.live import MetricsHub
from controller.models import NodeRecord, NodeStatus, TokenRecord
from controller.nats.admission import NatsAuth
from controller.nats.client import Flusher
from controller.nats.server import NatsServer, NatsSupervisor, NodeAccess
from controller.state.streams import ensure_stream, metrics_stream_config, per_node_batches
from controller.state.table import Table, open_bucket
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    EnrollReply,
    EnrollRequest,
    ErrorReply,
    Event,
    Heartbeat,
    Message,
    MetricBatch,
    NodeEnrolled,
    NodeStatusChanged,
)
from protocol.signing import seal_reply
from protocol.subjects import CONTROLLER_INBOX, Subjects

log = logging.getLogger("barista.controller")
# Enrollment refusals that mean an attack or a broken agent: counted in Stats.rejected.
_COUNTED_REFUSALS = ("bad_signature", "identity_collision")


@dataclass
class Stats:
    """Counters the API exposes at /v1/status."""

    rejected: Counter[str] = field(default_factory=Counter)
    last_rejection: str = ""
    enrollments: int = 0
    enrollments_refused: int = 0
    heartbeats: int = 0
    metric_batches: int = 0
    # Stored KV records that did not decode, per bucket (also in rejected["bad_record"]).
    bad_records: Counter[str] = field(default_factory=Counter)

    def reject(self, where: str, reason: str) -> None:
        self.rejected[where] += 1
        self.last_rejection = f"{where}: {reason}"[:300]

    def bad_record(self, bucket: str, reason: str) -> None:
        self.bad_records[bucket] += 1
        self.reject("bad_record", reason)


class Controller:
    """Owns every background task; use as ``async with Controller(config) as c``."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.subject_prefix)
        self.stats = Stats()
        self.secrets: Secrets | None = None
        self.natsd: NatsServer | None = None
        self.nats_supervisor: NatsSupervisor | None = None
        # Peer-facing connection (subscriptions, replies, commands) and the JetStream one.
        self.nc: NATS | None = None
        self.state_nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.nodes: Table[NodeRecord] | None = None
        self.tokens_table: Table[TokenRecord] | None = None
        self.tokens: TokenService | None = None
        self.fleet: Fleet | None = None
        self.enrollment: Enrollment | None = None
        self.auth: NatsAuth | None = None
        self.jobs: JobEngine | None = None
        self.deployer: Deployer | None = None
        self.hub = MetricsHub(self._labels_of)
        # Ingest workers into InfluxDB; None when no sink is configured (influx_kind "").
        self.ingest: IngestService | None = None
        # Called with every valid node event (app status, job progress, ...).
        self.event_listeners: list[Any] = []
        self._enroll_slots = asyncio.Semaphore(256)
        self._enroll_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Any] = []
        self._log_budget: dict[str, float] = {}
        self.ready = False
        self._flusher = Flusher()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        if self.config.nats_url:
            return self.config.nats_url
        assert self.natsd is not None
        return self.natsd.url

    @property
    def agent_nats_url(self) -> str:
        return self.config.agent_nats_url or self.nats_url

    async def __aenter__(self) -> Controller:
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
        self.secrets = Secrets.load_or_create(cfg.data_dir)
        state_creds: dict[str, str] = {}
        peer_creds: dict[str, str] = {}
        state_inbox: dict[str, bytes] = {}
        if not cfg.nats_url:
            # Port 0: the port of the last run (agents hold that URL), else a free one.
            self.natsd = NatsServer(
                data_dir=cfg.data_dir / "nats",
                port=cfg.nats_port,
                controller_password=self.secrets.nats_password,
                subjects=self.subjects,
                max_payload=cfg.max_payload,
            )
            self.natsd.set_nodes(NatsAuth.load_cache(cfg.data_dir / "nats-nodes.json"))
            # Locks the store, stopping an orphan of a killed controller: may wait.
            await asyncio.to_thread(self.natsd.prepare)
            # Forked from the loop's thread: the server's parent-death signal follows the
            # forking thread, and this one lives as long as the controller.
            self.natsd.launch()
            await asyncio.to_thread(self.natsd.wait_ready)
            self.nats_supervisor = NatsSupervisor(self.natsd)
            self._tasks.append(
                asyncio.create_task(self.nats_supervisor.run(), name="natsd-supervisor")
            )
            state_creds = self.natsd.controller_credentials()
            peer_creds = self.natsd.peer_credentials()
            if state_creds:
                state_inbox = {"inbox_prefix": CONTROLLER_INBOX.encode()}
        elif cfg.nats_user:
            # One set of credentials: the reply-subject checks are then the only guard.
            state_creds = peer_creds = {"user": cfg.nats_user, "password": cfg.nats_password}
        # Two connections: self.nc talks to peers (and can reach no JetStream API on the
        # embedded server), self.state_nc holds state and streams and answers no peer.
        self.nc = await self._connect_nats("barista-controller", peer_creds)
        self.state_nc = await self._connect_nats(
            "barista-controller-state", {**state_creds, **state_inbox}
        )
        self.js = self.state_nc.jetstream()
        await self._ensure_streams()
        sink_config = sink_config_of(cfg)
        if sink_config is not None:
            self.ingest = IngestService(
                js=self.js,
                sink_config=sink_config,
                workers=cfg.ingest_workers,
                subjects=self.subjects,
            )
            await self.ingest.start()
        bad = self.on_bad_record
        self.nodes = Table(
            await open_bucket(self.js, "nodes"), NodeRecord, name="nodes", on_bad_record=bad
        )
        self.tokens_table = Table(
            await open_bucket(self.js, "tokens"), TokenRecord, name="tokens", on_bad_record=bad
        )
        self.jobs_table = Table(
            await open_bucket(self.js, "jobs", history=1, ttl=cfg.job_retention),
            JobRecord, name="jobs", on_bad_record=bad,
        )
        await self.nodes.start()
        await self.tokens_table.start()
        await self.jobs_table.start()
        self.jobs = JobEngine(self, self.jobs_table)
        await self.jobs.start()
        self.deployer = deployer = Deployer(self)
        await deployer.start()
        self.event_listeners.append(deployer.on_event)
        self.auth = NatsAuth(self.natsd, cfg.data_dir / "nats-nodes.json")
        await self.auth.sync(NodeAccess(node_id=n.id, nkey=n.identity) for n in self.nodes)
        self.tokens = TokenService(self.tokens_table, default_ttl=cfg.token_ttl)
        self.fleet = Fleet(
            self.nodes,
            stale_after=cfg.stale_after,
            offline_after=cfg.offline_after,
            on_transition=self._on_transition,
        )
        self.enrollment = Enrollment(
            tokens=self.tokens,
            nodes=self.nodes,
            auth=self.auth,
            inbox_prefix=self.subjects.inbox_prefix,
            heartbeat_interval=cfg.heartbeat_interval,
            metrics_interval=cfg.metrics_interval,
            command_keys=[self.secrets.signer.public_key_b64],
        )
        s = self.subjects
        # Queue groups: with several controllers, one of them answers each enrollment.
        self._subs.append(
            await self.nc.subscribe(s.enroll, queue="controllers", cb=self._on_enroll)
        )
        self._subs.append(
            await self.nc.subscribe(s.app_sync_any, queue="controllers", cb=deployer.handle_sync)
        )
        self._subs.append(await self.nc.subscribe(s.heartbeat_any, cb=self._on_heartbeat))
        self._subs.append(await self.nc.subscribe(s.metrics_any, cb=self._on_metrics))
        self._subs.append(await self.nc.subscribe(s.events_any, cb=self._on_node_event))
        self._tasks.append(asyncio.create_task(self.fleet.run(), name="liveness"))
        # Confirms the subscriptions; a slow server must not fail the start (nor, through
        # nats-py's flush-timeout bug, silently stop the connection from reading).
        await self._flusher.flush(self.nc)
        self.ready = True
        log.info("controller ready (nats %s, data dir %s)", self.nats_url, cfg.data_dir)

    async def _connect_nats(self, name: str, opts: dict[str, Any]) -> NATS:
        return await nats.connect(
            self.nats_url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected,
            **opts,
        )

    async def stop(self) -> None:
        """Stop everything this controller started; the embedded nats-server always goes,
        even when an earlier step fails."""
        try:
            await self._stop_components()
        finally:
            if self.natsd is not None:
                await asyncio.to_thread(self.natsd.stop)

    async def _stop_components(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for task in list(self._enroll_tasks):
            task.cancel()
        if self._enroll_tasks:
            await asyncio.gather(*self._enroll_tasks, return_exceptions=True)
        for name, component in (("deployer", self.deployer), ("jobs", self.jobs),
                                ("ingest", self.ingest)):
            if component is not None:
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s failed", name)
        for table in (self.nodes, self.tokens_table, getattr(self, "jobs_table", None)):
            if table is not None:
                await table.stop()
        if self.enrollment is not None:
            self.enrollment.close()
        for nc in (self.nc, self.state_nc):
            if nc is not None and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.drain(), 5)
                except Exception:
                    await nc.close()

    async def _ensure_streams(self) -> None:
        assert self.js is not None
        cfg, s = self.config, self.subjects
        metrics = metrics_stream_config(
            subjects=s.stream_subjects_metrics,
            max_age=cfg.metrics_max_age,
            max_bytes=cfg.metrics_max_bytes,
            max_batch=cfg.metrics_max_batch,
            interval=cfg.metrics_interval,
        )
        log.info(
            "METRICS: a node keeps at most %d batches of at most %d bytes (stream: %d bytes)",
            metrics.max_msgs_per_subject, metrics.max_msg_size, metrics.max_bytes,
        )
        wanted = [
            metrics,
            StreamConfig(
                name="JOBS",
                subjects=[s.jobs_all],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=cfg.job_retention,
                max_bytes=cfg.jobs_max_bytes,
                max_msg_size=cfg.max_payload,
            ),
            StreamConfig(
                name="EVENTS",
                subjects=s.stream_subjects_events,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=7 * 24 * 3600,
                max_bytes=256 << 20,
            ),
        ]
        for sc in wanted:
            await ensure_stream(self.js, sc)

    # -- NATS callbacks --------------------------------------------------------------

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def _nats_disconnected(self) -> None:
        if not self.ready:
            return
        log.warning("disconnected from nats; reconnecting")

    async def _nats_reconnected(self) -> None:
        log.info("reconnected to nats")

    def _rate_limited(self, key: str, every: float = 10.0) -> bool:
        now = time.monotonic()
        if now < self._log_budget.get(key, 0.0):
            return False
        self._log_budget[key] = now + every
        return True

    def on_bad_record(self, bad: BadRecord) -> None:
        """A Table found a stored record that does not decode: count it, log it (limited)."""
        self.stats.bad_record(bad.bucket, f"{bad.bucket} {bad.key!r}: {bad.reason}")
        if self._rate_limited(f"bad_record.{bad.bucket}"):
            log.error("%s (bad records in %s so far: %d)", bad, bad.bucket,
                      self.stats.bad_records[bad.bucket])

    def _reject(self, where: str, subject: str, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or str(exc)
        self.stats.reject(where, reason)
        if self._rate_limited(where):
            log.warning(
                "rejected message on %s: %s (count %d)", subject, reason, self.stats.rejected[where]
            )

    async def _on_enroll(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time; enrollments wait on KV
        # writes and a batched server reload, so each gets its own task (bounded).
        await self._enroll_slots.acquire()
        task = asyncio.create_task(self._enroll_one(msg))
        self._enroll_tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._enroll_tasks.discard(t)
            self._enroll_slots.release()

        task.add_done_callback(done)

    def refuse_reply(self, msg: Msg) -> None:
        """Count and log a request whose reply subject is not the requester's own inbox;
        it gets no answer at all (any answer would go where the peer chose)."""
        reply = msg.reply or ""
        self._reject("reply_subject", msg.subject, ProtocolError(
            f"reply subject {reply[:80]!r} is not the requester's own inbox; not answered"))

    async def _enroll_one(self, msg: Msg) -> None:
        # Enrolling machines read only their inbox space: answer there and nowhere else.
        if not self.subjects.is_enroll_reply(msg.reply):
            self.refuse_reply(msg)
            return
        try:
            req = codec.decode(msg.data, EnrollRequest, max_size=64 * 1024)
        except ProtocolError as exc:
            self._reject("enroll", msg.subject, exc)
            await msg.respond(codec.encode(ErrorReply(code=exc.code, message=exc.reason)))
            return
        assert self.enrollment is not None
        answer: Message
        reply: EnrollReply | None
        try:
            answer = reply = await self.enrollment.enroll(req)
        except Exception:
            log.exception("enrollment failed")
            # The enroll user is unauthenticated: no internal details in the answer.
            answer = ErrorReply(
                code="internal", message="enrollment failed inside the controller; retry "
                "later (the controller log has the cause)")
            reply = None
        if reply is not None and reply.ok:
            self.stats.enrollments += 1
            await self._publish_event(
                Event(
                    ts=time.time(),
                    payload=NodeEnrolled(labels=reply.labels),
                    node_id=reply.node_id,
                    message=f"node {reply.node_id} enrolled",
                )
            )
        elif reply is not None:
            self.stats.enrollments_refused += 1
            if reply.error_code in _COUNTED_REFUSALS:
                self._reject(reply.error_code, msg.subject, ProtocolError(reply.error))
        await msg.respond(codec.encode(self._sealed(req, answer)))

    @staticmethod
    def _sealed(req: EnrollRequest, answer: Message) -> Message:
        """The answer sealed to the request's reply key: every enrolling machine shares the
        enroll user and may read every enrollment reply, only the requester can open it.
        A request without a valid key (refused for it) gets its refusal in the clear."""
        if len(req.reply_key) != 32:
            return answer
        try:
            return seal_reply(req.reply_key, answer)
        except ValueError:
            return answer

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = codec.decode(msg.data, Heartbeat, max_size=16 * 1024)
            if hb.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("heartbeat node_id does not match its subject")
        except ProtocolError as exc:
            self._reject("heartbeat", msg.subject, exc)
            return
        assert self.fleet is not None
        if self.fleet.beat(hb):
            self.stats.heartbeats += 1
        else:
            self._reject("heartbeat", msg.subject, ProtocolError(f"unknown node {hb.node_id}"))

    async def _on_metrics(self, msg: Msg) -> None:
        if len(msg.data) > self.config.metrics_max_batch:
            # The METRICS stream refused to store it (max_msg_size); count who sent it.
            self._reject("oversized_batch", msg.subject, ProtocolError(
                f"metric batch of {len(msg.data)} bytes exceeds metrics_max_batch "
                f"({self.config.metrics_max_batch})", size=len(msg.data)))
            return
        try:
            batch = codec.decode(msg.data, MetricBatch, max_size=self.config.metrics_max_batch)
            if batch.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("metric batch node_id does not match its subject")
        except ProtocolError as exc:
            self._reject("metrics", msg.subject, exc)
            return
        self.stats.metric_batches += 1
        self.hub.publish(batch)

    async def _on_node_event(self, msg: Msg) -> None:
        try:
            event = codec.decode(msg.data, Event, max_size=self.config.max_payload)
            if event.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("event node_id does not match its subject")
        except ProtocolError as exc:
            self._reject("events", msg.subject, exc)
            return
        if self.jobs is not None and event.type.startswith("job."):
            refusal = self.jobs.on_node_event(event)
            if refusal:
                self._reject("job_event", msg.subject, ProtocolError(refusal))
                return
        for fn in list(self.event_listeners):
            try:
                fn(event)
            except Exception:
                log.exception("event listener failed")

    async def _on_transition(self, node: NodeRecord, old: NodeStatus, new: NodeStatus) -> None:
        await self._publish_event(
            Event(
                ts=time.time(),
                payload=NodeStatusChanged(old=old, new=new),
                node_id=node.id,
                severity="warning" if new != "online" else "info",
                message=f"node {node.id} is {new} (was {old})",
            )
        )

    async def _publish_event(self, event: Event) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await self.nc.publish(self.subjects.controller_events, codec.encode(event))
        except Exception as exc:
            log.warning("could not publish event %s: %s", event.type, exc)

    def _labels_of(self, node_id: str) -> dict[str, str] | None:
        node = self.nodes.get(node_id) if self.nodes else None
        return node.labels if node else None

    def _tables(self) -> list[Table[Any]]:
        tables: list[Table[Any] | None] = [
            self.nodes, self.tokens_table, getattr(self, "jobs_table", None)]
        if self.deployer is not None:
            tables += [self.deployer.apps, self.deployer.statuses]
        return [t for t in tables if t is not None]

    def status(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "nats": {
                "url": self.nats_url,
                "embedded": self.natsd is not None,
                "connected": bool(self.nc and self.nc.is_connected),
                "state_connected": bool(self.state_nc and self.state_nc.is_connected),
                **(self.nats_supervisor.status() if self.nats_supervisor else {}),
            },
            "nodes": self.fleet.counts() if self.fleet else {},
            "rejected": dict(self.stats.rejected),
            "last_rejection": self.stats.last_rejection,
            "enrollments": self.stats.enrollments,
            "enrollments_refused": self.stats.enrollments_refused,
            "heartbeats": self.stats.heartbeats,
            "metric_batches": self.stats.metric_batches,
            # Also in "rejected" (bad_record, oversized_batch), here with their details.
            "bad_records": {
                "total": self.stats.rejected["bad_record"],
                "by_bucket": dict(self.stats.bad_records),
                "keys": {t.name: t.bad_keys()[:20] for t in self._tables() if t.bad_keys()},
            },
            "oversized_batches": self.stats.rejected["oversized_batch"],
            "metrics_limits": {
                "max_batch": self.config.metrics_max_batch,
                "batches_per_node": per_node_batches(
                    max_age=self.config.metrics_max_age,
                    max_bytes=self.config.metrics_max_bytes,
                    max_batch=self.config.metrics_max_batch,
                    interval=self.config.metrics_interval,
                ),
            },
            "stream_subscribers": self.hub.subscribers,
            "ingest": self.ingest.status() if self.ingest is not None else None,
        }
