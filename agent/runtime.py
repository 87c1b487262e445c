"""The agent: wires enrollment, the connection, heartbeats, the metrics outbox and commands.

No module-level state: many agents can run in one event loop (tests, the broadcast bench).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.apps import AppReconciler
from agent.collectors.base import Collector
from agent.collectors.scheduler import CollectorSet, build_collectors
from agent.commands import CommandIntake, CommandRunner, OnJobEvent
from agent.config import AgentConfig
from agent.connection import backoff, connect, nkey_jwt_auth
from agent.enroll import Enroller, EnrollmentError
from agent.facts import collect_facts, underlay_facts
from agent.identity import EnrollState, Identity
from agent.keyring import KeyRing
from agent.ledger import Orphan, RunLedger, SeenLog
from agent.outbox import Outbox
from agent.renew import RenewalRefused, expired_soon, renew_as_enroller, renew_loop
from agent.trust import CA_FILE, trusting
from protocol import codec
from protocol.errors import ProtocolError
from protocol.mesh import FACT_PRIVATE_IP, FACT_PUBLIC_IP, FACT_VPC_CIDR, UNDERLAY_FACTS
from protocol.messages import (
    AnyEventPayload,
    Command,
    CommandResult,
    Event,
    FactsUpdate,
    Heartbeat,
    MeshInvite,
    MeshSnapshot,
    MetricsDropped,
    Severity,
    SignedKeyRotation,
)
from protocol.signing import CommandVerifier
from protocol.subjects import Subjects

# Heartbeats that say "apps not synced" after a start that skipped the app sync (the first
# may be lost: a controller restarting).
UNSYNCED_BEATS = 3

if TYPE_CHECKING:  # imported when the overlay starts (agent import time is budgeted)
    from agent.netmesh.link import MeshLink
    from agent.netmesh.mesh import NetMesh
    from protocol.messages import MeshEndpoint

AGENT_VERSION = "0.1.0"
# Where NetMesh keeps the node's WireGuard key (agent/netmesh/keys.py KEY_FILE in
# state_dir/wireguard; tests/unit/test_agent_start.py checks they agree): a node that has one
# was in the overlay before and restarts straight into it.
MESH_KEY_PATH = ("wireguard", "wireguard.key")
# Labels copied into every metric as tags; all have a small, bounded set of values.
TAG_LABELS = ("infra", "group", "provider", "region", "zone")


class Agent:
    """One agent. ``async with Agent(config=cfg) as a: await a.wait_closed()``."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        collectors: list[Collector] | None = None,
        version: str = AGENT_VERSION,
        executor_factory: Callable[[Agent], CommandRunner] | None = None,
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
        self.executor: CommandRunner | None = None
        self.apps: AppReconciler | None = None
        self.commands: CommandIntake | None = None
        self.keyring: KeyRing | None = None
        self._key_sync: asyncio.Task[int] | None = None
        # The node-side command policy (None: everything signed is allowed).
        self.policy = config.command_policy()
        self.outbox = Outbox(capacity=config.buffer_batches, log=self.log)
        self._hb_seq = 0
        self._apps_unsynced = False  # enrolled with no apps and not asked for them since
        self._started = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._facts: dict[str, Any] = {}
        self._facts_unsent = False  # the last FactsUpdate never reached the connection
        self._stopping = False
        # The overlay (agent/netmesh): its interfaces appear when a snapshot arrives.
        self.mesh: NetMesh | None = None
        self.mesh_link: MeshLink | None = None
        # A node in no network waits on its snapshot subject for a MeshInvite (one
        # subscription; nothing of agent/netmesh is imported until then).
        self._invite_sub: Subscription | None = None
        self._mesh_starting: asyncio.Task[None] | None = None
        # Out of its last network: the overlay stops (and the node waits for invitations
        # again); an invitation that comes meanwhile starts it again after.
        self._mesh_leaving: asyncio.Task[None] | None = None
        self._invited_while_leaving = False
        self._keys_from_enrollment = True

    # -- properties ------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.state.node_id if self.state else ""

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.state.labels) if self.state else {}

    @property
    def facts(self) -> dict[str, Any]:
        """The machine's facts as last collected (the underlay's as last looked at)."""
        return dict(self._facts)

    @property
    def metrics_interval(self) -> float:
        assert self.state is not None
        return self.config.metrics_interval or self.state.metrics_interval

    @property
    def heartbeat_interval(self) -> float:
        assert self.state is not None
        return self.config.heartbeat_interval or self.state.heartbeat_interval

    @property
    def state_path(self) -> Path:
        return self.config.state_dir / "state.json"

    # The outbox's and the command intake's counters, as the agent's own stats.

    @property
    def buffer(self) -> collections.deque[tuple[str, bytes]]:
        return self.outbox.buffer

    @property
    def dropped_total(self) -> int:
        return self.outbox.dropped_total

    @property
    def oversized_points(self) -> int:
        return self.outbox.oversized_points

    @property
    def published_batches(self) -> int:
        return self.outbox.published_batches

    @property
    def rejected_commands(self) -> int:
        return self.commands.rejected_commands if self.commands is not None else 0

    @property
    def policy_rejected(self) -> int:
        """Commands refused by the node's command policy (counted in rejected_commands too)."""
        return self.commands.policy_rejected if self.commands is not None else 0

    @property
    def key_rotations_refused(self) -> int:
        """Signing-key rotation steps refused (not signed by a trusted key, malformed)."""
        return self.keyring.refused if self.keyring is not None else 0

    @property
    def apps_allowed(self) -> bool:
        return self.policy is None or self.policy.apps

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
        # The blocking local work runs in two thread hops (each costs, and the loop may be
        # shared by many agents): what enrollment needs, then the rest.
        identity, self._facts, state = await asyncio.to_thread(self._load_identity)
        self.identity = identity
        enrolled_now = state is None
        if state is None:
            # No WireGuard key yet: it is made when the node joins a network (_start_mesh).
            state = await Enroller(
                config=cfg, identity=identity, subjects=self.subjects, hostname=self.hostname,
                version=self.version, facts=self._facts, log=self.log,
            ).enroll()
        else:
            self.log.info("node %s: already enrolled", state.node_id)
            if state.nats_jwt and expired_soon(state.nats_jwt):
                await self._renew_expired(state)
        self.state = state
        self.log = self.outbox.log = logging.getLogger(f"barista.agent.{state.node_id}")
        keys = cfg.controller_keys or state.command_keys
        self._keys_from_enrollment = not cfg.controller_keys
        self.verifier = CommandVerifier(keys) if keys else None
        if self.verifier is None:
            self.log.warning("no controller key configured: every command will be refused")
        else:
            self.keyring = KeyRing(verifier=self.verifier,
                                   path=cfg.state_dir / "command-keys.json", log=self.log)
        seen_log = self.seen_log = SeenLog(cfg.state_dir / "seen-commands.log")
        remembered, orphans = await asyncio.to_thread(self._load_ledgers, enrolled_now)
        if self.verifier is not None and remembered:
            self.verifier.remember(remembered)
        self.collector_set = CollectorSet(
            self._collectors
            if self._collectors is not None
            else build_collectors(cfg.collectors or None, cfg.collector_options())
        )
        if self._executor_factory is not None:
            self.executor = self._executor_factory(self)
        else:
            ledger = self.ledger

            def make_executor() -> CommandRunner:
                from agent.executor import Executor

                return Executor(
                    max_concurrency=cfg.max_concurrency,
                    facts=lambda: dict(self._facts),
                    labels=lambda: self.labels,
                    node_id=lambda: self.node_id,
                    allow_users=cfg.allow_run_as_user,
                    ledger=ledger,
                )

            self.executor = _LazyRunner(make_executor)
        apps = self.apps = AppReconciler(
            state_dir=cfg.state_dir / "apps",
            request=self._app_sync_request,
            emit=self.emit,
            node_id=lambda: self.node_id,
            log=logging.getLogger(f"barista.agent.{self.node_id}.apps"),
        )
        nc = self.nc = await self._connect(state)
        # Outside every network: the invitation subscription goes out with the command
        # subscriptions and is confirmed by the same PING (one write, not two).
        meshed = cfg.mesh_enabled and bool(state.mesh or not state.mesh_invites or (
            not enrolled_now and not state.mesh_left and self._meshed_before()))
        if cfg.mesh_enabled and not meshed:
            await self._await_invite()
        self.commands = CommandIntake(
            nc=nc, subjects=self.subjects, node_id=state.node_id, labels=self.labels,
            verifier=self.verifier, seen_log=seen_log, runner=self.executor, apps=apps,
            emit=self.emit, log=self.log, policy=self.policy,
            on_rotation=self._on_rotation if self.keyring is not None else None,
        )
        await self.commands.subscribe()
        if not (enrolled_now and self._keys_from_enrollment):
            # Rotations missed while this agent was stopped. A new agent's key ring came
            # with its enrollment (key_seq); a step made since reaches it by the broadcast
            # or, if it came before the subscription, at its first heartbeat (key_seq).
            await self.sync_keys()
        await self.commands.report_orphans(orphans)
        if not enrolled_now:
            # Enrollment sent them; an enrolled agent's may have changed since (a VM
            # stopped and started with a new public address, an upgrade). Before MeshJoin.
            await self._send_facts()
        if meshed:
            # Meshed before (a key in the state dir: also an agent from before invitations),
            # or enrolled by a controller that never invites.
            await self._start_mesh()
        if self.apps_allowed and enrolled_now and not state.apps_at_enrollment:
            # Nothing assigned at enrollment: not asked; our heartbeats say so until a
            # pass ran, and the controller tells us if something was assigned meanwhile.
            self._apps_unsynced = True
        elif self.apps_allowed:
            apps.trigger()  # converge to the desired apps, also after a restart
        else:
            self.log.info("app deploys disabled by the node policy")
        self._tasks = [
            asyncio.create_task(
                renew_loop(state=state, nc=lambda: self.nc, identity=identity,
                           subjects=self.subjects, save=self._save_state, log=self.log),
                name="renew"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._collect_loop(), name="collect"),
            asyncio.create_task(self._facts_loop(), name="facts"),
            asyncio.create_task(
                self.outbox.publish_loop(nc=nc, connected=self._connected,
                                         subject=self.subjects.metrics(state.node_id)),
                name="publish",
            ),
        ]
        self.log.info("node %s: agent started (labels %s)", self.node_id, self.labels)

    def _load_identity(self) -> tuple[Identity, dict[str, Any], EnrollState | None]:
        """(Blocking) the state dir, the identity key (made at the first start), the facts
        and the enrollment state (None: not enrolled yet)."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        identity = Identity(cfg.state_dir / "identity.nk")
        facts = collect_facts(self.version) | self._underlay()
        return identity, facts, EnrollState.load(self.state_path)

    def _underlay(self) -> dict[str, str]:
        """(Blocking, cheap: a UDP connect, the interface list) the underlay facts now."""
        cfg = self.config
        return underlay_facts(nats_urls=cfg.nats_urls, private=cfg.mesh_private_address,
                              public=cfg.mesh_public_address, vpc_cidr=cfg.mesh_vpc_cidr)

    def _load_ledgers(self, save_state: bool) -> tuple[list[tuple[str, float]], list[Orphan]]:
        """(Blocking) the state just enrolled saved (fsynced) if ``save_state``, then the
        trusted keys, the command ids seen before a restart (they stay refused for their
        TTL: replay protection) and the commands a previous agent left running (kill -9, a
        crash), which are ended before any new one starts (their jobs hear about it once we
        are connected)."""
        assert self.state is not None and self.seen_log is not None
        if save_state:
            self.state.save(self.state_path)
        if self.keyring is not None and not self.keyring.load() and \
                self._keys_from_enrollment:
            self.keyring.seq = self.state.key_seq  # the step the enrolled keys result from
        remembered = self.seen_log.load()
        self.ledger = RunLedger(self.config.state_dir / "running")
        return remembered, self.ledger.reap()

    async def stop(self) -> None:
        """Stop taking commands, kill running ones, flush what can be sent, disconnect."""
        self._stopping = True
        if self.commands is not None:
            await self.commands.unsubscribe()
        await self._stop_mesh()
        for task in self._tasks:
            task.cancel()
        if self._key_sync is not None:
            self._key_sync.cancel()
        # Kill running commands first: waiting for them would wait for their timeouts.
        if self.executor is not None:
            await self.executor.aclose()
        if self.apps is not None:
            await self.apps.close()
        running = self.commands.tasks() if self.commands is not None else []
        for task in list(self._tasks) + running:
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

    # -- connection ------------------------------------------------------------------

    async def _connect(self, st: EnrollState) -> NATS:
        """Connect with the node's credentials, retried with backoff for as long as it takes."""
        cfg = self.config
        assert self.identity is not None
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
        tls = self._tls()
        if tls is not None:
            opts["tls"] = tls
        if st.auth == "nkey" and st.nats_jwt:
            # Operator mode: the JWT is read at every (re)connect, so a renewal takes effect
            # at the next one (renewal forces it).
            opts.update(nkey_jwt_auth(lambda: self._state_jwt(), self.identity.sign))
        elif st.auth == "nkey":
            opts["nkeys_seed"] = str(self.identity.seed_path)
        elif cfg.nats_creds:
            opts["user_credentials"] = cfg.nats_creds
        elif cfg.nats_user:
            opts["user"], opts["password"] = cfg.nats_user, cfg.nats_password
        attempt = 0
        while True:
            try:
                nc = await connect(**opts)
                break
            except Exception as exc:
                delay = backoff(attempt)
                self.log.warning("cannot connect to NATS (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        self._connected.set()
        return nc

    def _tls(self) -> ssl.SSLContext | None:
        """The CA pinned at enrollment (or configured): the only one trusted, ever. None:
        plain NATS (a token that pinned nothing)."""
        cfg = self.config
        ca_file = Path(cfg.ca_file) if cfg.ca_file else cfg.state_dir / CA_FILE
        return trusting(ca_file) if cfg.ca_file or ca_file.exists() else None

    async def _save_state(self) -> None:
        if self.state is not None:
            await asyncio.to_thread(self.state.save, self.state_path)

    async def _renew_expired(self, state: EnrollState) -> None:
        """Back with an expired JWT: renew as the enroll identity (retried while NATS or the
        controller is unreachable; a revoked or deleted node stops here for good)."""
        assert self.identity is not None
        if not state.enroll_jwt:
            self.log.warning("node %s: NATS credentials expired and no enroll identity to "
                             "renew them with; connecting anyway", state.node_id)
            return
        attempt = 0
        while True:
            try:
                state.nats_jwt = await renew_as_enroller(
                    self.config.nats_urls, self.identity, self.subjects, state.node_id,
                    enroll_jwt=state.enroll_jwt, wait=self.config.enroll_timeout,
                    tls=self._tls())
                break
            except RenewalRefused as exc:
                raise EnrollmentError(exc.code, f"cannot renew this node's NATS "
                                      f"credentials: {exc}") from None
            except Exception as exc:
                delay = backoff(attempt)
                self.log.warning("renewing expired NATS credentials failed (%s); retrying in "
                                 "%.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        await asyncio.to_thread(state.save, self.state_path)
        self.log.info("node %s: expired NATS credentials renewed", state.node_id)

    def _state_jwt(self) -> str:
        return self.state.nats_jwt if self.state is not None else ""

    async def _start_mesh(self) -> None:
        from agent.netmesh.backend import select_backend
        from agent.netmesh.host import Host
        from agent.netmesh.link import MeshLink
        from agent.netmesh.mesh import NetMesh

        cfg = self.config
        log = logging.getLogger(f"barista.agent.{self.node_id}.mesh")
        host = Host(cfg.mesh_netns)
        try:
            backend = select_backend(cfg.mesh_backend, host=host, log=log)
        except Exception as exc:
            log.warning("overlay network disabled: %s", exc)
            return
        labels = self.labels
        region = cfg.mesh_region or "/".join(
            v for v in (labels.get("provider", ""), labels.get("region", "")) if v)
        endpoints = self._mesh_endpoints(region)
        mesh = NetMesh(node_id=self.node_id, state_dir=cfg.state_dir, backend=backend,
                       host=host, ifname_prefix=cfg.mesh_ifname_prefix,
                       health_interval=cfg.mesh_health_interval, log=log)
        link = MeshLink(nc=lambda: self.nc, subjects=self.subjects, node_id=self.node_id,
                        mesh=mesh, endpoints=endpoints, region=region,
                        on_left=self._left_last_network, log=log)
        await mesh.__aenter__()
        self.mesh, self.mesh_link = mesh, link
        try:
            await link.start()
        except Exception as exc:
            log.warning("overlay subscriptions failed: %s", exc)

    def _mesh_endpoints(self, region: str) -> list[MeshEndpoint]:
        """Where peers reach this node: its underlay facts (agent/facts.py underlay_facts);
        peers in the same VPC / region network (configured, else labelled, else the VPC
        range) use the private address."""
        from agent.netmesh.link import endpoints_of

        cfg, labels, facts = self.config, self.labels, self._facts
        return endpoints_of(
            private=str(facts.get(FACT_PRIVATE_IP, "")), public=str(facts.get(FACT_PUBLIC_IP, "")),
            network_id=(cfg.mesh_network_id or labels.get("vpc", "") or labels.get("network", "")
                        or str(facts.get(FACT_VPC_CIDR, ""))),
            region=region, port=cfg.mesh_port)

    def _meshed_before(self) -> bool:
        return self.config.state_dir.joinpath(*MESH_KEY_PATH).exists()

    async def _await_invite(self) -> None:
        """Outside every network: one subscription, on the node's own snapshot subject,
        where the controller sends a MeshInvite when the node is put in a network (and
        again until it joins). nats-py re-subscribes it after a reconnect."""
        assert self.nc is not None
        try:
            self._invite_sub = await self.nc.subscribe(
                self.subjects.mesh_snapshot(self.node_id), cb=self._on_invite)
        except Exception as exc:
            self.log.warning("overlay invitations not subscribed: %s", exc)

    async def _on_invite(self, msg: Msg) -> None:
        try:
            invite = codec.decode(msg.data)
        except ProtocolError as exc:
            self.log.warning("mesh invitation rejected: %s", exc.reason)
            return
        # A snapshot too: a controller that believes this node joined (its key was lost).
        if not isinstance(invite, MeshInvite | MeshSnapshot):
            self.log.warning("mesh invitation rejected: unexpected %s",
                             type(invite).__name__)
            return
        if self._mesh_leaving is not None:
            self._invited_while_leaving = True
            return
        if self._stopping or self.mesh is not None or self._mesh_starting is not None:
            return
        nets = invite.networks if isinstance(invite, MeshInvite) else [invite.network]
        self.log.info("node %s: in network(s) %s; starting the overlay", self.node_id,
                      ", ".join(nets) or "?")
        self._mesh_starting = asyncio.create_task(self._join_mesh(), name="mesh-start")

    async def _join_mesh(self) -> None:
        """Start the overlay (key, MeshJoin), then drop the invitation subscription (the
        mesh link has its own on the same subject) and remember the membership."""
        try:
            await self._start_mesh()
            if self.mesh is None:
                return  # no backend here (logged): the next invitation tries again
            if self._invite_sub is not None:
                with contextlib.suppress(Exception):
                    await self._invite_sub.unsubscribe()
                self._invite_sub = None
            if self.state is not None and (not self.state.mesh or self.state.mesh_left):
                self.state.mesh, self.state.mesh_left = True, False
                await self._save_state()
        except Exception:
            self.log.exception("starting the overlay failed; the next invitation retries")
        finally:
            self._mesh_starting = None

    def _left_last_network(self) -> None:
        """(MeshLink) a delta took the node out of its last network: the overlay stops."""
        if self._stopping or self._mesh_leaving is not None:
            return
        self.log.info("node %s: in no network now; stopping the overlay", self.node_id)
        self._mesh_leaving = asyncio.create_task(self._leave_mesh(), name="mesh-stop")

    async def _leave_mesh(self) -> None:
        """Stop the NetMesh (its interfaces, wireguard-go, probers and tasks are gone with
        the views already) and the mesh link, and wait for invitations again: subscribed
        first, so a snapshot of a network that takes the node back meanwhile is not lost
        (the controller still knows the node as joined and sends it a snapshot, not an
        invitation). The WireGuard key stays: a node put back in a network reuses it."""
        try:
            await self._await_invite()
            if self.mesh_link is not None:
                await self.mesh_link.stop()
            if self.mesh is not None:
                await self.mesh.close()
            self.mesh = self.mesh_link = None
            if self.state is not None and (self.state.mesh or not self.state.mesh_left):
                self.state.mesh, self.state.mesh_left = False, True
                await self._save_state()
        except Exception:
            self.log.exception("stopping the overlay failed")
        finally:
            self._mesh_leaving = None
        if self._invited_while_leaving and not self._stopping and self.mesh is None:
            self.log.info("node %s: put back in a network; starting the overlay",
                          self.node_id)
            self._mesh_starting = asyncio.create_task(self._join_mesh(), name="mesh-start")
        self._invited_while_leaving = False

    async def _stop_mesh(self) -> None:
        if self._mesh_leaving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._mesh_leaving
        if self._mesh_starting is not None:
            self._mesh_starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._mesh_starting
        if self._invite_sub is not None:
            with contextlib.suppress(Exception):
                await self._invite_sub.unsubscribe()
            self._invite_sub = None
        if self.mesh_link is not None:
            await self.mesh_link.stop()
        if self.mesh is not None:
            await self.mesh.close()
        self.mesh = self.mesh_link = None

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
        if self.apps is not None and self.apps_allowed:
            self.apps.trigger()  # assignments may have changed while we were away
        if self.keyring is not None:
            self._start_key_sync()  # a rotation may have happened while we were away
        if self.mesh_link is not None:
            # Deltas sent while we were away are gone (core NATS): resync every network.
            task = asyncio.create_task(self.mesh_link.announce("reconnect"))
            self._tasks.append(task)
        self.log.info("reconnected to NATS; %d batches buffered", len(self.buffer))
        dropped = self.outbox.take_drops_since_connect()
        if dropped:
            await self.emit(
                MetricsDropped(dropped=dropped),
                f"dropped {dropped} metric batches while offline",
                "warning",
            )

    async def _on_rotation(self, signed: SignedKeyRotation) -> None:
        assert self.keyring is not None
        before = self.keyring.refused
        await self.keyring.handle(signed, via="broadcast")
        if self.keyring.refused != before:
            # Perhaps signed by a key from a step we missed: the sync brings the chain.
            self._start_key_sync()

    async def sync_keys(self) -> int:
        """Fetch and apply the signing-key rotations missed; how many were applied."""
        if self.keyring is None:
            return 0
        return await self.keyring.sync(self._key_sync_request, node_id=self.node_id)

    def _start_key_sync(self) -> None:
        if self._key_sync is None or self._key_sync.done():
            self._key_sync = asyncio.create_task(self.sync_keys(), name="key-sync")

    async def _key_sync_request(self, payload: bytes) -> bytes:
        if self.nc is None or not self.nc.is_connected:
            raise ConnectionError("not connected to NATS")
        msg = await self.nc.request(self.subjects.key_sync(self.node_id), payload, timeout=5.0)
        return msg.data

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("nats: %s", exc)

    async def _app_sync_request(self, payload: bytes) -> bytes:
        if self.nc is None or not self.nc.is_connected:
            raise ConnectionError("not connected to NATS")
        msg = await self.nc.request(self.subjects.app_sync(self.node_id), payload, timeout=5.0)
        return msg.data

    async def emit(
        self, payload: AnyEventPayload, message: str = "", severity: Severity = "info"
    ) -> None:
        """Publish an event on this node's events subject (best effort)."""
        if self.nc is None or not self.nc.is_connected:
            return
        ev = Event(
            ts=time.time(),
            payload=payload,
            node_id=self.node_id,
            message=message,
            severity=severity,
        )
        try:
            await self.nc.publish(self.subjects.events(self.node_id), codec.encode(ev))
        except Exception as exc:
            self.log.debug("event %s not published: %s", ev.type, exc)

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
                    running_jobs=self.executor.running if self.executor is not None else 0,
                    # Only a key ring that descends from the enrolled keys: configured
                    # keys may sit past steps they cannot verify, and would be sent those
                    # steps at every heartbeat (they catch up by key sync instead).
                    key_seq=self.keyring.seq if self.keyring is not None
                    and self._keys_from_enrollment else -1,
                    apps_synced=self._apps_synced(),
                )
                try:
                    await self.nc.publish(subject, codec.encode(hb))
                except Exception as exc:
                    self.log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    def _apps_synced(self) -> bool:
        """False in the first UNSYNCED_BEATS heartbeats of an agent enrolled with no apps
        that has not asked for them since: an app assigned before it subscribed reaches it
        then (the controller checks). Later assignments reach it by their reconcile job,
        so the controller is not asked for every heartbeat of a node that never has apps."""
        if not self._apps_unsynced or (self.apps is not None and self.apps.passes > 0):
            return True
        return self._hb_seq > UNSYNCED_BEATS

    def _base_tags(self) -> dict[str, str]:
        tags = {"node": self.node_id}
        for key in TAG_LABELS:
            if key in self.labels:
                tags[key] = self.labels[key]
        return tags

    async def collect_once(self) -> None:
        """Collect once and queue the batch in the outbox."""
        assert self.collector_set is not None
        points, errors = await self.collector_set.collect_async()
        self.outbox.add(node_id=self.node_id, points=points, errors=errors,
                        tags=self._base_tags())

    def enqueue(self, msg_id: str, data: bytes) -> None:
        self.outbox.enqueue(msg_id, data)

    # -- facts -----------------------------------------------------------------------

    async def _send_facts(self) -> None:
        """Our facts to the controller (FactsUpdate). One that could not be handed to the
        connection (closed meanwhile) is sent again at the next look at the underlay; nats-py
        itself keeps what is published while it reconnects."""
        update = FactsUpdate(node_id=self.node_id, ts=time.time(),
                             facts={k: str(v) for k, v in self._facts.items()})
        nc = self.nc
        try:
            if nc is None:
                raise ConnectionError("no NATS connection")
            await nc.publish(self.subjects.facts(self.node_id), codec.encode(update))
            self._facts_unsent = False
        except Exception as exc:
            self._facts_unsent = True
            self.log.warning("facts not sent: %s", exc)

    async def refresh_underlay(self) -> bool:
        """Look at the underlay again (what facts_interval does); a change is sent to the
        controller, which moves this node's overlay endpoints, and is what the next
        MeshJoin says. True when it changed."""
        new = await asyncio.to_thread(self._underlay)
        old = {k: self._facts[k] for k in UNDERLAY_FACTS if k in self._facts}
        if new == old:
            if self._facts_unsent:
                await self._send_facts()
            return False
        self.log.info("node %s: underlay changed (%s -> %s)", self.node_id, old, new)
        self._facts = {k: v for k, v in self._facts.items() if k not in UNDERLAY_FACTS} | new
        if self.mesh_link is not None:
            self.mesh_link.endpoints = self._mesh_endpoints(self.mesh_link.region)
        await self._send_facts()
        return True

    async def _facts_loop(self) -> None:
        interval = self.config.facts_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_underlay()
            except Exception as exc:  # an interface list that cannot be read, ...
                self.log.warning("underlay not checked: %s", exc)

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


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set; a stop during start (enrollment retries, a slow key sync)
    ends the start at once instead of after it."""
    agent = Agent(config=config)
    starting = asyncio.ensure_future(agent.__aenter__())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # __aenter__ stops what it started, then re-raises
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            agent.log.info("stopped while starting")
            return
        starting.result()  # a failed start raises here (e.g. a refused enrollment)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(agent.__aexit__)
            await stopping
            agent.log.info("stopping")
    finally:
        stopping.cancel()


__all__ = ["AGENT_VERSION", "Agent", "EnrollmentError", "run_agent"]


class _LazyRunner:
    """The executor, imported and built on the first command: an agent can run for hours
    without one, and agent.executor costs ~0.15 MB of RSS until then."""

    def __init__(self, make: Callable[[], CommandRunner]) -> None:
        self._make = make
        self._real: CommandRunner | None = None
        self._closed = False

    @property
    def running(self) -> int:
        return self._real.running if self._real is not None else 0

    async def run(self, cmd: Command, *, on_event: OnJobEvent | None = None) -> CommandResult:
        if self._real is None:
            self._real = self._make()
            if self._closed:
                await self._real.aclose()  # refuses it, as a closed executor does
        return await self._real.run(cmd, on_event=on_event)

    async def aclose(self) -> None:
        self._closed = True
        if self._real is not None:
            await self._real.aclose()
