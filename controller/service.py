"""The controller process: opens NATS (embedded or external) and its state, builds every
service once (fleet, enrollment, jobs, apps, ingest) and wires them to their subjects."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from controller.apps.deployer import AppRecord, Deployer, NodeAppStatus
from controller.audit import AuditLog
from controller.auth import ApiToken, ApiTokens
from controller.config import ControllerConfig, Secrets
from controller.enroll import Enrollment, TokenService
from controller.errors import BadRecord, ConfigError, ControllerError
from controller.fleet import Fleet
from controller.ingest.service import IngestService, sink_config_of
from controller.jobs.engine import JobEngine, JobRecord
from controller.keys import SigningKeys
from controller.live import MetricsHub
from controller.mesh.deltas import MeshNode, MeshState
from controller.mesh.ipam import Lease
from controller.mesh.networks import NetworkRecord
from controller.mesh.service import MeshService, MeshTables
from controller.models import NodeRecord, NodeStatus, TokenRecord, bounded_facts
from controller.nats.account import FleetAccount
from controller.nats.admission import (
    NodeAdmission,
    OperatorAdmission,
    UnmanagedAdmission,
)
from controller.nats.client import Flusher, check_admitted, when_available
from controller.nats.identities import ControllerIdentities
from controller.nats.operator import OperatorTrust, TrustError
from controller.nats.permissions import NodeAccess
from controller.nats.server import NatsServer, NatsSupervisor
from controller.provision.model import Infras
from controller.provision.service import Provisioning
from controller.state.streams import (
    API_TOKENS_BUCKET,
    APP_STATUS_BUCKET,
    APPS_BUCKET,
    IPAM_BUCKET,
    JOBS_BUCKET,
    KEYS_BUCKET,
    MESH_NODES_BUCKET,
    MESH_STATE_BUCKET,
    NATS_ACCOUNT_BUCKET,
    NETWORKS_BUCKET,
    NODES_BUCKET,
    TOKENS_BUCKET,
    Bucket,
    audit_stream_config,
    ensure_stream,
    events_stream_config,
    jobs_stream_config,
    mesh_stream_config,
    metrics_stream_config,
    open_bucket,
    per_node_batches,
)
from controller.state.table import Table
from controller.tls import ControllerTLS, trust_only
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    EnrollReply,
    EnrollRequest,
    ErrorReply,
    Event,
    FactsUpdate,
    Heartbeat,
    Message,
    MetricBatch,
    NodeEnrolled,
    NodeStatusChanged,
    RenewReply,
    RenewRequest,
)
from protocol.signing import seal_reply
from protocol.subjects import CONTROLLER_INBOX, Subjects
from protocol.trust import ca_fingerprint

log = logging.getLogger("barista.controller")
# Enrollment refusals that mean an attack or a broken agent: counted in Stats.rejected.
_COUNTED_REFUSALS = ("bad_signature", "identity_collision")
# A FactsUpdate: the 64 facts kept are at most 64 + 256 characters each; beyond this size
# it is refused whole (a real agent's are ~1 KB).
MAX_FACTS_MESSAGE = 64 * 1024
R = TypeVar("R", bound=msgspec.Struct)


@dataclass
class Stats:
    """Counters the API exposes at /v1/status, and the rate-limited log of refusals."""

    rejected: Counter[str] = field(default_factory=Counter)
    last_rejection: str = ""
    enrollments: int = 0
    enrollments_refused: int = 0
    heartbeats: int = 0
    metric_batches: int = 0
    facts_updates: int = 0  # FactsUpdates that changed a node's record
    # Stored KV records that did not decode, per bucket (also in rejected["bad_record"]).
    bad_records: Counter[str] = field(default_factory=Counter)
    _log_budget: dict[str, float] = field(default_factory=dict, repr=False)

    def reject(self, where: str, reason: str) -> None:
        self.rejected[where] += 1
        self.last_rejection = f"{where}: {reason}"[:300]

    def bad_record(self, bucket: str, reason: str) -> None:
        self.bad_records[bucket] += 1
        self.reject("bad_record", reason)

    def rate_limited(self, key: str, every: float = 10.0) -> bool:
        """True at most once per ``every`` seconds per key: whether to log this time."""
        now = time.monotonic()
        if now < self._log_budget.get(key, 0.0):
            return False
        self._log_budget[key] = now + every
        return True

    def on_bad_record(self, bad: BadRecord) -> None:
        """A Table found a stored record that does not decode: count it, log it (limited)."""
        self.bad_record(bad.bucket, f"{bad.bucket} {bad.key!r}: {bad.reason}")
        if self.rate_limited(f"bad_record.{bad.bucket}"):
            log.error("%s (bad records in %s so far: %d)", bad, bad.bucket,
                      self.bad_records[bad.bucket])

    def reject_message(self, where: str, subject: str, exc: ProtocolError) -> None:
        """A message refused off the wire: count it, log it (limited)."""
        reason = exc.reason or str(exc)
        self.reject(where, reason)
        if self.rate_limited(where):
            log.warning(
                "rejected message on %s: %s (count %d)", subject, reason, self.rejected[where]
            )


@dataclass
class _Serving:
    """Whether the controller serves; a NATS disconnect is worth a warning only then.
    ``state_reconnected``: what to do when the state connection is back (set once the KV
    tables exist)."""

    on: bool = False
    state_reconnected: Callable[[], None] | None = None


class Controller:
    """``async with Controller(config) as c``: starts the controller process; ``c`` is the
    running controller (every service built, none missing), and all of it stops on exit."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> RunningController:
        return await self._stack.enter_async_context(_run(self.config))

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


@asynccontextmanager
async def _run(cfg: ControllerConfig) -> AsyncIterator[RunningController]:
    """Open NATS and the state, build the services, serve; undo it all in reverse order.
    The embedded nats-server always goes, even when an earlier step fails."""
    subjects = Subjects(cfg.subject_prefix)
    stats = Stats()
    serving = _Serving()
    async with AsyncExitStack() as stack:
        secrets = Secrets.load_or_create(cfg.data_dir)
        tls = (await asyncio.to_thread(ControllerTLS.load_or_create, cfg.data_dir,
                                       names=_tls_names(cfg))) if cfg.tls else None
        trust = _nats_trust(cfg, tls)
        natsd: NatsServer | None = None
        supervisor: NatsSupervisor | None = None
        # Operator mode (embedded, or an external NATS set up by `barista nats init`):
        # the deployment's operator and accounts, and the controller's own users.
        operator_trust: OperatorTrust | None = None
        identities: ControllerIdentities | None = None
        state_creds: dict[str, str] = {}
        peer_creds: dict[str, str] = {}
        url = cfg.nats_url
        if not url:
            # Port 0: the port of the last run (agents hold that URL), else a free one.
            # Operator mode: every identity a JWT of this data dir's trust (made at the
            # first start), so admitting a node changes nothing on the server.
            operator_trust = await asyncio.to_thread(
                OperatorTrust.load_or_create, cfg.data_dir / "nats")
            natsd = NatsServer(
                data_dir=cfg.data_dir / "nats",
                port=cfg.nats_port,
                host=cfg.nats_host,
                subjects=subjects,
                max_payload=cfg.max_payload,
                tls_cert_file=str(tls.cert_file) if tls is not None else "",
                tls_key_file=str(tls.key_file) if tls is not None else "",
                tls_ca_file=str(tls.ca_file) if tls is not None else "",
                trust=operator_trust,
            )
            stack.push_async_callback(asyncio.to_thread, natsd.stop)
            # Locks the store, stopping an orphan of a killed controller: may wait.
            await asyncio.to_thread(natsd.prepare)
            # Forked from the loop's thread: the server's parent-death signal follows the
            # forking thread, and this one lives as long as the controller.
            natsd.launch()
            await asyncio.to_thread(natsd.wait_ready)
            url = natsd.url
            supervisor = NatsSupervisor(natsd)
            stack.push_async_callback(
                _cancel, asyncio.create_task(supervisor.run(), name="natsd-supervisor"))
            identities = natsd.identities
        elif cfg.nats_trust:
            # An external deployment whose servers run with this trust's config: the
            # trust written by `barista nats init`, the controller's users kept beside it.
            trust_dir = Path(cfg.nats_trust)
            try:
                operator_trust = await asyncio.to_thread(OperatorTrust.load, trust_dir)
                identities = await asyncio.to_thread(
                    ControllerIdentities.make, operator_trust, subjects, trust_dir / "creds",
                    reuse=True)
            except (TrustError, OSError) as exc:
                raise ConfigError(f"nats_trust {trust_dir}: {exc}") from None
        elif cfg.nats_user:
            # One set of credentials: the reply-subject checks are then the only guard.
            state_creds = peer_creds = {"user": cfg.nats_user, "password": cfg.nats_password}
        elif cfg.nats_creds:
            state_creds = peer_creds = {"user_credentials": cfg.nats_creds}
        state_inbox: dict[str, bytes] = {}
        if identities is not None:
            state_creds = identities.state_credentials()
            peer_creds = identities.peer_credentials()
            state_inbox = {"inbox_prefix": CONTROLLER_INBOX.encode()}
        # Two connections: nc talks to peers (and can reach no JetStream API on the
        # embedded server), state_nc holds state and streams and answers no peer.
        if trust is None:
            log.warning(
                "TLS is off: plain NATS%s, everything in the clear, and join tokens pin no "
                "CA (config tls = false / --no-tls); use this only on loopback or a trusted "
                "network", " and API" if not cfg.tls else "")
        tls_opt: dict[str, Any] = {"tls": trust[1]} if trust is not None else {}
        if natsd is None and identities is not None:
            await check_admitted(url, {**state_creds, **tls_opt}, cfg.nats_trust)
        connections: list[NATS] = []
        stack.push_async_callback(_close_connections, connections)
        nc = await _connect_nats(url, "barista-controller", {**peer_creds, **tls_opt}, serving)
        connections.append(nc)
        state_nc = await _connect_nats(
            url, "barista-controller-state", {**state_creds, **state_inbox, **tls_opt},
            serving, state=True)
        connections.append(state_nc)
        system_nc: NATS | None = None
        if identities is not None:
            # Account JWT pushes (revocations); the system account holds nothing else.
            system_nc = await _connect_nats(
                url, "barista-controller-sys", {**identities.system_credentials(), **tls_opt},
                serving)
            connections.append(system_nc)
        else:
            log.warning(
                "NATS at %s is not in barista's operator mode: node isolation is OFF (every "
                "agent connects with the credentials it was given, and any node can publish "
                "as any other). To isolate nodes, run `barista nats init --out DIR`, add what "
                "it prints to each nats-server's config, and start the controller with "
                "--nats-trust DIR", url)
        js = state_nc.jetstream()
        await _ensure_streams(js, cfg, subjects)
        ingest: IngestService | None = None
        sink_config = sink_config_of(cfg)
        if sink_config is not None:
            ingest = IngestService(
                js=js,
                sink_config=sink_config,
                workers=cfg.ingest_workers,
                subjects=subjects,
            )
            stack.push_async_callback(_stop_logged, "ingest", ingest.stop)
            await ingest.start()

        async def table(bucket: Bucket, record_type: type[R]) -> Table[R]:
            kv = await open_bucket(js, bucket, replicas=cfg.stream_replicas)
            t = Table(kv, record_type, name=bucket.name,
                      on_bad_record=stats.on_bad_record)
            await t.start()
            stack.push_async_callback(t.stop)
            return t

        nodes: Table[NodeRecord] = await table(NODES_BUCKET, NodeRecord)
        tokens: Table[TokenRecord] = await table(TOKENS_BUCKET, TokenRecord)
        jobs: Table[JobRecord] = await table(JOBS_BUCKET, JobRecord)
        apps: Table[AppRecord] = await table(APPS_BUCKET, AppRecord)
        app_statuses: Table[NodeAppStatus] = await table(APP_STATUS_BUCKET, NodeAppStatus)
        api_tokens: Table[ApiToken] = await table(API_TOKENS_BUCKET, ApiToken)
        keys_kv = await open_bucket(js, KEYS_BUCKET, replicas=cfg.stream_replicas)
        # Operator mode: the fleet account's revocations, shared by every controller.
        account: Table[FleetAccount] | None = None
        if operator_trust is not None:
            account = await table(NATS_ACCOUNT_BUCKET, FleetAccount)
        # --- mesh (issue 12): networks, addresses, node WireGuard sides, published peers
        mesh_tables = MeshTables(
            networks=await table(NETWORKS_BUCKET, NetworkRecord),
            ipam=await table(IPAM_BUCKET, Lease),
            mesh_nodes=await table(MESH_NODES_BUCKET, MeshNode),
            states=await table(MESH_STATE_BUCKET, MeshState),
        )
        # --- end mesh
        controller = RunningController(
            config=cfg, subjects=subjects, stats=stats, serving=serving, secrets=secrets,
            natsd=natsd, nats_supervisor=supervisor, nats_url=url, nc=nc, state_nc=state_nc,
            js=js, ingest=ingest, nodes=nodes, tokens_table=tokens, jobs_table=jobs,
            apps_table=apps, app_statuses=app_statuses, api_tokens_table=api_tokens,
            keys_kv=keys_kv, mesh_tables=mesh_tables, tls=tls,
            agent_ca_sha256=trust[0] if trust is not None else "", system_nc=system_nc,
            trust=operator_trust, nats_identities=identities, account_table=account,
        )
        stack.push_async_callback(controller.stop)
        await controller.start()
        yield controller


def _tls_names(cfg: ControllerConfig) -> list[str]:
    """The server certificate's extra names: ``tls_names``, and the addresses agents and
    the CLI are told to use (agent_nats_url, api_host), so that they verify."""
    names = list(cfg.tls_names)
    if cfg.agent_nats_url:
        host = urllib.parse.urlsplit(cfg.agent_nats_url).hostname
        if host:
            names.append(host)
    for host in (cfg.api_host, cfg.nats_host):
        if host not in ("", "0.0.0.0", "::") and host not in names:
            names.append(host)
    return names


def _nats_trust(
    cfg: ControllerConfig, tls: ControllerTLS | None
) -> tuple[str, ssl.SSLContext] | None:
    """The CA NATS serves (its pin, and a context trusting only it), or None for plain NATS:
    the controller's own CA on the embedded server, ``nats_ca_file`` on an external one."""
    if cfg.nats_url:
        if not cfg.nats_ca_file:
            return None
        try:
            pem = Path(cfg.nats_ca_file).read_bytes()
            der = ssl.PEM_cert_to_DER_cert(pem.decode())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"nats_ca_file {cfg.nats_ca_file}: {exc}") from None
        return ca_fingerprint(der), trust_only(pem)
    if tls is None:
        return None
    return tls.ca_sha256, tls.client_context()


async def _connect_nats(
    url: str, name: str, opts: dict[str, Any], serving: _Serving, *, state: bool = False
) -> NATS:
    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def disconnected_cb() -> None:
        if serving.on:
            log.warning("disconnected from nats; reconnecting")

    async def reconnected_cb() -> None:
        log.info("reconnected to nats")
        if state and serving.state_reconnected is not None:
            serving.state_reconnected()

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        **opts,
    )


async def _close_connections(connections: list[NATS]) -> None:
    for nc in connections:
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:
                await nc.close()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass


async def _stop_logged(name: str, stop: Callable[[], Awaitable[None]]) -> None:
    try:
        await stop()
    except Exception:
        log.exception("stopping %s failed", name)


async def _ensure_streams(js: JetStreamContext, cfg: ControllerConfig, s: Subjects) -> None:
    metrics = metrics_stream_config(
        subjects=s.stream_subjects_metrics,
        max_age=cfg.metrics_max_age,
        max_bytes=cfg.metrics_max_bytes,
        max_batch=cfg.metrics_max_batch,
        interval=cfg.metrics_interval,
        replicas=cfg.stream_replicas,
    )
    log.info(
        "METRICS: a node keeps at most %d batches of at most %d bytes (stream: %d bytes)",
        metrics.max_msgs_per_subject, metrics.max_msg_size, metrics.max_bytes,
    )
    wanted = [
        metrics,
        jobs_stream_config(subjects=s, max_age=cfg.job_retention,
                           max_bytes=cfg.jobs_max_bytes, max_msg_size=cfg.max_payload,
                           replicas=cfg.stream_replicas),
        events_stream_config(subjects=s, replicas=cfg.stream_replicas),
        audit_stream_config(subjects=s, replicas=cfg.stream_replicas),
        mesh_stream_config(subjects=s, replicas=cfg.stream_replicas),  # mesh (issue 12)
    ]
    for sc in wanted:
        await when_available(functools.partial(ensure_stream, js, sc),
                              what=f"stream {sc.name}")



class RunningController:
    """The controller while it runs: its NATS side and state handed in open, every service
    built here once. Made by ``Controller``; starts serving in ``start()``."""

    def __init__(
        self,
        *,
        config: ControllerConfig,
        subjects: Subjects,
        stats: Stats,
        serving: _Serving,
        secrets: Secrets,
        natsd: NatsServer | None,
        nats_supervisor: NatsSupervisor | None,
        nats_url: str,
        nc: NATS,
        state_nc: NATS,
        js: JetStreamContext,
        ingest: IngestService | None,
        nodes: Table[NodeRecord],
        tokens_table: Table[TokenRecord],
        jobs_table: Table[JobRecord],
        apps_table: Table[AppRecord],
        app_statuses: Table[NodeAppStatus],
        api_tokens_table: Table[ApiToken],
        keys_kv: KeyValue,
        mesh_tables: MeshTables,
        tls: ControllerTLS | None = None,
        agent_ca_sha256: str = "",
        system_nc: NATS | None = None,
        trust: OperatorTrust | None = None,
        nats_identities: ControllerIdentities | None = None,
        account_table: Table[FleetAccount] | None = None,
    ) -> None:
        self.config = config
        # The controller's CA and server certificate (None with tls = false), and the pin
        # of the CA agents see on NATS ("" when NATS is plain: tokens then pin nothing).
        self.tls = tls
        self.agent_ca_sha256 = agent_ca_sha256
        self.subjects = subjects
        self.stats = stats
        self._serving = serving
        self.secrets = secrets
        # None when NATS is external (config.nats_url).
        self.natsd = natsd
        self.nats_supervisor = nats_supervisor
        self.nats_url = nats_url
        self.agent_nats_url = config.agent_nats_url or nats_url
        # Peer-facing connection (subscriptions, replies, commands) and the JetStream one.
        self.nc = nc
        self.state_nc = state_nc
        self.js = js
        # Ingest workers into InfluxDB; None when no sink is configured (influx_kind "").
        self.ingest = ingest
        self.nodes = nodes
        self.tokens_table = tokens_table
        self.jobs_table = jobs_table
        self.hub = MetricsHub(self._labels_of)
        # Named API tokens (roles, scopes) beside the data dir's bootstrap admin token.
        self.api_tokens = ApiTokens(api_tokens_table, bootstrap=secrets.api_token)
        self.audit = AuditLog(js=js, subjects=subjects)
        self.system_nc = system_nc
        # Operator mode (the embedded server, or an external NATS with nats_trust): the
        # deployment's trust and the controller's own NATS users; None otherwise.
        self.trust = trust
        self.nats_identities = nats_identities
        # The fleet account's revocations shared by every controller (operator mode).
        self.account_table = account_table
        self.admission: NodeAdmission
        if trust is not None:
            self.admission = OperatorAdmission(
                trust=trust, subjects=subjects, system_nc=system_nc, ttl=config.node_jwt_ttl,
                account=account_table)
        else:
            self.admission = UnmanagedAdmission()
        # "operator": nodes isolated by their own JWTs; "off": a NATS that is not ours.
        self.isolation = "operator" if self.admission.managed else "off"
        self.tokens = TokenService(
            tokens_table, default_ttl=config.token_ttl, ca_sha256=agent_ca_sha256,
            enroll_jwt=nats_identities.enroll_jwt if nats_identities is not None else "")
        self.fleet = Fleet(
            nodes,
            stale_after=config.stale_after,
            offline_after=config.offline_after,
            on_transition=self._on_transition,
        )
        # The signer of every command; rotates its key (barista keys rotate).
        self.signing_keys = SigningKeys(
            data_dir=config.data_dir, active=secrets.signer, kv=keys_kv, nc=nc,
            subjects=subjects, refuse_reply=self.refuse_reply,
        )
        self.enrollment = Enrollment(
            tokens=self.tokens,
            nodes=nodes,
            admission=self.admission,
            inbox_prefix=subjects.inbox_prefix,
            heartbeat_interval=config.heartbeat_interval,
            metrics_interval=config.metrics_interval,
            command_keys=self.signing_keys.enroll_keys,  # kept current by a rotation
            key_seq=lambda: self.signing_keys.enroll_seq,
            in_network=lambda node: self.mesh.in_network(node),
            has_apps=lambda node: bool(self.deployer.releases_for(node)),
        )
        self.jobs = JobEngine(
            records=jobs_table,
            fleet=self.fleet,
            nc=nc,
            js=js,
            subjects=subjects,
            signer=self.signing_keys,
            reject=stats.reject_message,
            refuse=stats.reject,
            audit=self.audit,
        )
        self.deployer = Deployer(
            apps=apps_table,
            statuses=app_statuses,
            fleet=self.fleet,
            jobs=self.jobs,
            subjects=subjects,
            refuse_reply=self.refuse_reply,
        )
        # Called with every valid node event (app status, job progress, ...).
        self.event_listeners: list[Callable[[Event], None]] = [self.deployer.on_event]
        self._rewatch_tasks: set[asyncio.Task[None]] = set()
        serving.state_reconnected = self._rewatch_tables
        self._tables: list[Table[Any]] = [nodes, tokens_table, jobs_table, apps_table,
                                          app_statuses, api_tokens_table]
        if account_table is not None:
            self._tables.append(account_table)
        # --- mesh (issue 12): overlay networks, IPAM, peer distribution, the matrix
        self.mesh = MeshService(tables=mesh_tables, nodes=nodes, nc=nc, js=js,
                                subjects=subjects, reject=stats.reject_message)
        self._tables += [mesh_tables.networks, mesh_tables.ipam, mesh_tables.mesh_nodes,
                         mesh_tables.states]
        self._mesh_stack = AsyncExitStack()
        # --- end mesh
        # Provisioning (issue 11): the configured providers and the engine (Infras).
        self.provisioning = Provisioning(
            js=js, nodes=nodes, tokens=self.tokens, providers=config.providers,
            data_dir=config.data_dir, nats_url=lambda: self.agent_nats_url,
            controller_keys=lambda: list(self.signing_keys.enroll_keys),
            ca_sha256=agent_ca_sha256, forget_node=self._forget_infra_node,
            reuse_venv=config.provision_reuse_venv, replicas=config.stream_replicas)
        self._provision_stack = AsyncExitStack()
        self._enroll_slots = asyncio.Semaphore(256)
        self._enroll_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Subscription] = []
        self._flusher = Flusher()

    @property
    def ready(self) -> bool:
        return self._serving.on

    def ready_to_serve(self) -> bool:
        """Ready, with both connections up (after an embedded nats-server restart each
        reconnects on its own)."""
        return self.ready and self.nc.is_connected and self.state_nc.is_connected

    async def start(self) -> None:
        await self.signing_keys.start()
        await self.jobs.start()
        await self.deployer.start()
        try:
            await self.admission.sync(
                NodeAccess(node_id=n.id, nkey=n.identity) for n in self.nodes)
        except Exception as exc:
            if self.natsd is not None or self.trust is None:
                raise
            raise ConfigError(
                f"the NATS at {self.nats_url} did not take barista's fleet account JWT "
                f"({type(exc).__name__}: {exc}): do its servers run with the include file "
                f"of `barista nats init` (nats_trust {self.config.nats_trust}/server/)?"
            ) from None
        s, nc = self.subjects, self.nc
        # Queue groups: with several controllers, one of them answers each enrollment.
        self._subs.append(await nc.subscribe(s.enroll, queue="controllers", cb=self._on_enroll))
        self._subs.append(
            await nc.subscribe(s.app_sync_any, queue="controllers",
                               cb=self.deployer.handle_sync)
        )
        self._subs.append(
            await nc.subscribe(s.key_sync_any, queue="controllers",
                               cb=self.signing_keys.handle_sync)
        )
        self._subs.append(
            await nc.subscribe(s.node_renew_any, queue="controllers", cb=self._on_renew))
        self._subs.append(await nc.subscribe(s.heartbeat_any, cb=self._on_heartbeat))
        self._subs.append(await nc.subscribe(s.metrics_any, cb=self._on_metrics))
        self._subs.append(await nc.subscribe(s.events_any, cb=self._on_node_event))
        self._subs.append(await nc.subscribe(s.facts_any, queue="controllers",
                                             cb=self._on_facts))
        self._tasks.append(asyncio.create_task(self.fleet.run(), name="liveness"))
        await self._mesh_stack.enter_async_context(self.mesh)  # mesh (issue 12)
        await self._provision_stack.enter_async_context(self.provisioning)
        # An infra spec's `networks:` put its nodes into those overlay networks.
        engine = self.provisioning.engine

        def infra_networks(name: str) -> list[str]:
            view = engine.get(name)
            return list(view.spec.networks) if view is not None else []

        self.mesh.use_infra_networks(infra_networks)
        self._provision_stack.callback(engine.subscribe(
            lambda p: self.mesh.infras_changed() if not p.group and not p.node else None))
        # Confirms the subscriptions; a slow server must not fail the start (nor, through
        # nats-py's flush-timeout bug, silently stop the connection from reading).
        await self._flusher.flush(nc)
        self._serving.on = True
        log.info("controller ready (nats %s, data dir %s)", self.nats_url, self.config.data_dir)

    async def stop(self) -> None:
        """Stop what start() started and the services; the tables and connections are
        closed after it by whoever opened them."""
        self._serving.on = False
        self._serving.state_reconnected = None
        for task in list(self._rewatch_tasks):
            await _cancel(task)
        for task in self._tasks:
            await _cancel(task)
        self._tasks.clear()
        for task in list(self._enroll_tasks):
            task.cancel()
        if self._enroll_tasks:
            await asyncio.gather(*self._enroll_tasks, return_exceptions=True)
        await _stop_logged("provisioning", self._provision_stack.aclose)
        await _stop_logged("mesh", self._mesh_stack.aclose)  # mesh (issue 12)
        await _stop_logged("deployer", self.deployer.stop)
        await _stop_logged("jobs", self.jobs.stop)
        await _stop_logged("signing keys", self.signing_keys.stop)
        if isinstance(self.admission, OperatorAdmission):
            await _stop_logged("admission", self.admission.close)
        self.enrollment.close()

    def _rewatch_tables(self) -> None:
        """The state connection is back: a restarted server may have lost the KV watch
        consumers, which nats-py would notice only on its idle timer (seen: 5-18 s)."""
        log.info("state connection back; re-watching %d KV buckets", len(self._tables))
        for table in self._tables:
            task = asyncio.create_task(table.rewatch(), name=f"rewatch-{table.name}")
            self._rewatch_tasks.add(task)
            task.add_done_callback(self._rewatch_tasks.discard)

    # -- NATS callbacks --------------------------------------------------------------

    async def _on_enroll(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time; enrollments wait on KV
        # writes, so each gets its own task (bounded).
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
        self.stats.reject_message("reply_subject", msg.subject, ProtocolError(
            f"reply subject {reply[:80]!r} is not the requester's own inbox; not answered"))

    async def _enroll_one(self, msg: Msg) -> None:
        # Enrolling machines read only their inbox space: answer there and nowhere else.
        if not self.subjects.is_enroll_reply(msg.reply):
            self.refuse_reply(msg)
            return
        try:
            req = codec.decode(msg.data, EnrollRequest, max_size=64 * 1024)
        except ProtocolError as exc:
            # A node whose JWT expired while it was away renews as the enroll identity.
            try:
                renew = codec.decode(msg.data, RenewRequest, max_size=16 * 1024)
            except ProtocolError:
                renew = None
            if renew is not None:
                await self._answer_renew(msg, renew)
                return
            self.stats.reject_message("enroll", msg.subject, exc)
            await msg.respond(codec.encode(ErrorReply(code=exc.code, message=exc.reason)))
            return
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
                self.stats.reject_message(reply.error_code, msg.subject, ProtocolError(reply.error))
        await msg.respond(codec.encode(self._sealed(req, answer)))

    async def _on_renew(self, msg: Msg) -> None:
        """A connected node renews its JWT on its own subject (which proves who asks); the
        answer goes only to its own inbox space, like app sync."""
        node_id = self.subjects.node_id_of(msg.subject)
        if node_id is None or not self.subjects.is_node_reply(node_id, msg.reply):
            self.refuse_reply(msg)
            return
        try:
            req = codec.decode(msg.data, RenewRequest, max_size=16 * 1024)
            if req.node_id != node_id:
                raise ProtocolError(f"renewal for node {req.node_id!r} asked on node "
                                    f"{node_id!r}'s subject")
        except ProtocolError as exc:
            self.stats.reject_message("renew", msg.subject, exc)
            await msg.respond(codec.encode(ErrorReply(code=exc.code, message=exc.reason)))
            return
        await self._answer_renew(msg, req)

    async def _answer_renew(self, msg: Msg, req: RenewRequest) -> None:
        try:
            answer: Message = await self.enrollment.renew(req)
        except Exception:
            log.exception("renewal failed")
            answer = ErrorReply(code="internal", message="renewal failed inside the controller")
        if isinstance(answer, RenewReply) and not answer.ok:
            log.warning("renewal for node %s refused: %s", req.node_id, answer.error_code)
        if len(req.reply_key) == 32:
            try:
                answer = seal_reply(req.reply_key, answer)
            except ValueError:
                pass
        await msg.respond(codec.encode(answer))

    async def revoke_node(self, node_id: str) -> NodeRecord:
        """Revoke a node: marked revoked (renewal refused), its NATS user revoked and the
        account update pushed (the server drops its connections at once)."""
        node = self.fleet.get(node_id)

        def mark(rec: NodeRecord) -> NodeRecord | None:
            return None if rec.revoked else msgspec.structs.replace(rec, revoked=True)

        updated = await self.nodes.mutate(node_id, mark) or node
        await self.admission.remove(node.identity)
        log.warning("node %s revoked", node_id)
        return updated

    async def _forget_infra_node(self, node_id: str) -> None:
        """The engine's VM of this node is gone: the node goes too (its user revoked)."""
        if self.nodes.get(node_id) is not None:
            await self.delete_node(node_id)

    @property
    def infras(self) -> Infras:
        return self.provisioning.engine

    async def delete_node(self, node_id: str) -> None:
        """Forget a node, revoking its NATS user first (it cannot reconnect or renew)."""
        node = self.fleet.get(node_id)
        await self.admission.remove(node.identity)
        await self.nodes.delete(node_id)
        log.warning("node %s deleted", node_id)

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
            self.stats.reject_message("heartbeat", msg.subject, exc)
            return
        if self.fleet.beat(hb):
            self.stats.heartbeats += 1
            if 0 <= hb.key_seq < self.signing_keys.seq:
                # A rotation made before this agent subscribed (it enrolled just then).
                await self.signing_keys.send_missed(hb.node_id, hb.key_seq)
            if not hb.apps_synced:
                # Told at enrollment it had no apps; one assigned since reaches it now.
                self.deployer.on_unsynced(hb.node_id)
        else:
            self.stats.reject_message(
                "heartbeat", msg.subject, ProtocolError(f"unknown node {hb.node_id}"))

    async def _on_facts(self, msg: Msg) -> None:
        """A node's current facts (at each agent start, on an underlay change): kept in its
        record, bounded as at enrollment; its overlay endpoints follow its addresses."""
        try:
            update = codec.decode(msg.data, FactsUpdate, max_size=MAX_FACTS_MESSAGE)
            if update.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("facts node_id does not match its subject")
            node = self.nodes.get(update.node_id)
            if node is None or node.revoked:
                raise ProtocolError(
                    f"facts of {'a revoked' if node else 'an unknown'} node {update.node_id}")
        except ProtocolError as exc:
            self.stats.reject_message("facts", msg.subject, exc)
            return
        facts = bounded_facts(update.facts)
        changed = False

        def apply(cur: NodeRecord) -> NodeRecord | None:
            nonlocal changed
            changed = cur.facts != facts
            return msgspec.structs.replace(cur, facts=facts) if changed else None

        try:
            await self.nodes.mutate(node.id, apply)
            if changed:
                self.stats.facts_updates += 1
            # Also when the record had them: the endpoints may lag (a controller stopped
            # between the two writes); nothing is written when they agree.
            await self.mesh.distributor.underlay_changed(node.id, facts)
        except ControllerError as exc:  # deleted meanwhile, too contended
            log.warning("node %s: facts not recorded: %s", node.id, exc)

    async def _on_metrics(self, msg: Msg) -> None:
        if len(msg.data) > self.config.metrics_max_batch:
            # The METRICS stream refused to store it (max_msg_size); count who sent it.
            self.stats.reject_message("oversized_batch", msg.subject, ProtocolError(
                f"metric batch of {len(msg.data)} bytes exceeds metrics_max_batch "
                f"({self.config.metrics_max_batch})", size=len(msg.data)))
            return
        try:
            batch = codec.decode(msg.data, MetricBatch, max_size=self.config.metrics_max_batch)
            if batch.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("metric batch node_id does not match its subject")
        except ProtocolError as exc:
            self.stats.reject_message("metrics", msg.subject, exc)
            return
        self.stats.metric_batches += 1
        self.hub.publish(batch)

    async def _on_node_event(self, msg: Msg) -> None:
        try:
            event = codec.decode(msg.data, Event, max_size=self.config.max_payload)
            if event.node_id != self.subjects.node_id_of(msg.subject):
                raise ProtocolError("event node_id does not match its subject")
        except ProtocolError as exc:
            self.stats.reject_message("events", msg.subject, exc)
            return
        if event.type.startswith("job."):
            refusal = self.jobs.on_node_event(event)
            if refusal:
                self.stats.reject_message("job_event", msg.subject, ProtocolError(refusal))
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
        if self.nc.is_closed:
            return
        try:
            await self.nc.publish(self.subjects.controller_events, codec.encode(event))
        except Exception as exc:
            log.warning("could not publish event %s: %s", event.type, exc)

    def _labels_of(self, node_id: str) -> dict[str, str] | None:
        node = self.nodes.get(node_id)
        return node.labels if node else None

    def status(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "nats": {
                "url": self.nats_url,
                "embedded": self.natsd is not None,
                # "operator": each node its own JWT identity; "off": a NATS not ours.
                "isolation": self.isolation,
                "connected": self.nc.is_connected,
                "state_connected": self.state_nc.is_connected,
                **(self.nats_supervisor.status() if self.nats_supervisor else {}),
            },
            # api: the API serves TLS with the controller's CA; nats: agents reach NATS over
            # TLS and join tokens pin nats_ca_sha256. Both off: plain, said so at start.
            "tls": {
                "api": self.tls is not None,
                "nats": bool(self.agent_ca_sha256),
                "ca_sha256": self.tls.ca_sha256 if self.tls else "",
                "ca_file": str(self.tls.ca_file) if self.tls else "",
                "nats_ca_sha256": self.agent_ca_sha256,
            },
            "nodes": self.fleet.counts(),
            "rejected": dict(self.stats.rejected),
            "last_rejection": self.stats.last_rejection,
            "enrollments": self.stats.enrollments,
            "enrollments_refused": self.stats.enrollments_refused,
            "heartbeats": self.stats.heartbeats,
            "metric_batches": self.stats.metric_batches,
            "facts_updates": self.stats.facts_updates,
            # Also in "rejected" (bad_record, oversized_batch), here with their details.
            "bad_records": {
                "total": self.stats.rejected["bad_record"],
                "by_bucket": dict(self.stats.bad_records),
                "keys": {t.name: t.bad_keys()[:20] for t in self._tables if t.bad_keys()},
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
            "signing_keys": {"seq": self.signing_keys.seq,
                             "active": self.signing_keys.key_id,
                             "rotating": self.signing_keys.retiring() is not None,
                             **self.signing_keys.stats},
            "ingest": self.ingest.status() if self.ingest is not None else None,
            "mesh": self.mesh.status(),  # mesh (issue 12)
        }
