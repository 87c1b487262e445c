"""Every NATS subject barista uses is built here and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import InvalidName

# A subject token: no dots, no wildcards, no whitespace. Node ids and network names
# become tokens, so they are checked before they are ever put into a subject. Checked
# with fullmatch: ``$`` alone would let a trailing newline into the NATS protocol line.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,32}(\.[A-Za-z0-9_-]{1,32}){0,3}$")

DEFAULT_PREFIX = "barista"
# The inbox space of enrolling machines (the shared enroll user may read only this).
ENROLL_INBOX = "_INBOX_enroll"
# The shared NATS user of machines that are not enrolled yet: it may only ask to enroll and
# read ENROLL_INBOX, and a join token is what authorises a node, so it is no secret.
ENROLL_USER = "enroll"
ENROLL_PASSWORD = "enroll"
# In NATS operator mode the enroll identity is a user JWT for this nkey, whose seed is
# public on purpose (like ENROLL_PASSWORD): the JWT, made by the controller and carried in
# the join token after JOIN_CREDS_SEP, limits it to the enroll request and its inbox space.
ENROLL_SEED = "SUAL2HHW6XSQAUULN2ZT6YW3QQDGWRMM3ZVIV4SY2KFZOGKTLOA6ANPLMY"
ENROLL_NKEY = "UBWJCDXNDILNXJCEQLEK2BHTZG3SLHWNQJDQ3HEL7XOQXI5AKYTA7VZF"
JOIN_CREDS_SEP = "~"
# The inbox space of the controller's own JetStream connection (peers may not publish there).
CONTROLLER_INBOX = "_INBOX_controller"
# A reply subject inside an inbox space: the space, then 1-3 tokens (nats-py's requests use
# two: a per-connection id and a per-request token).
_REPLY_TAIL = r"(\.[A-Za-z0-9_-]{1,64}){1,3}"
# Matched after a known prefix: one compiled pattern for every node (a pattern per node id
# would be compiled anew each time once a fleet outgrows re's cache of 512).
_REPLY_TAIL_RE = re.compile(_REPLY_TAIL)


def _has_reply_tail(prefix: str, subject: str) -> bool:
    """Whether ``subject`` is ``prefix`` followed by a reply tail (and nothing else)."""
    return subject.startswith(prefix) and bool(
        _REPLY_TAIL_RE.fullmatch(subject, len(prefix)))


def check_token(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidName(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_' or '-'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject names under one configurable prefix (default ``barista``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX.fullmatch(self.prefix):
            raise InvalidName(f"subject prefix {self.prefix!r} is not a valid NATS subject prefix")

    # agent -> controller
    @property
    def enroll(self) -> str:
        return f"{self.prefix}.enroll"

    def heartbeat(self, node_id: str) -> str:
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.hb"

    def metrics(self, node_id: str) -> str:
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.metrics"

    def events(self, node_id: str) -> str:
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.events"

    def facts(self, node_id: str) -> str:
        """FactsUpdate: the node's current facts (at each start, on an underlay change)."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.facts"

    def results(self, node_id: str) -> str:
        """Where a node publishes its command results: only that node may publish here, so
        the subject itself proves which node a result comes from."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.results"

    @property
    def results_any(self) -> str:
        return f"{self.prefix}.node.*.results"

    def node_all(self, node_id: str) -> str:
        """Everything a node may publish (used for its NATS permissions)."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.>"

    # controller -> agents
    @property
    def cmd_all(self) -> str:
        return f"{self.prefix}.cmd.all"

    def cmd_node(self, node_id: str) -> str:
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.cmd"

    def mesh_delta(self, network: str) -> str:
        return f"{self.prefix}.mesh.{check_token(network, 'network name')}.delta"

    @property
    def mesh_all(self) -> str:
        return f"{self.prefix}.mesh.>"

    @property
    def mesh_delta_any(self) -> str:
        """Every network's deltas: the subjects of the JetStream stream MESH."""
        return f"{self.prefix}.mesh.*.delta"

    # Mesh, per node. Controller -> node: snapshot, rotate (the node subscribes to its own
    # two). Node -> controller: join, resync, key, health (under node_all like the rest).
    def mesh_snapshot(self, node_id: str) -> str:
        """MeshSnapshot of each network the node is in (on join, resync, restarts)."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.snapshot"

    def mesh_rotate(self, node_id: str) -> str:
        """MeshRotateKey: the controller asks the node to rotate its WireGuard key."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.rotate"

    def mesh_join(self, node_id: str) -> str:
        """MeshJoin: the node's WireGuard public key and underlay endpoints."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.join"

    @property
    def mesh_join_any(self) -> str:
        return f"{self.prefix}.node.*.mesh.join"

    def mesh_resync(self, node_id: str) -> str:
        """MeshResyncRequest: the node saw a gap (answered on its snapshot subject)."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.resync"

    @property
    def mesh_resync_any(self) -> str:
        return f"{self.prefix}.node.*.mesh.resync"

    def mesh_key(self, node_id: str) -> str:
        """MeshKeyRotation steps (announce, switched) of the node's WireGuard key."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.key"

    @property
    def mesh_key_any(self) -> str:
        return f"{self.prefix}.node.*.mesh.key"

    def mesh_health(self, node_id: str) -> str:
        """MeshHealth: per-peer handshake age, counters, RTT and loss."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.mesh.health"

    @property
    def mesh_health_any(self) -> str:
        return f"{self.prefix}.node.*.mesh.health"

    # wildcards the controller subscribes to
    @property
    def heartbeat_any(self) -> str:
        return f"{self.prefix}.node.*.hb"

    @property
    def metrics_any(self) -> str:
        return f"{self.prefix}.node.*.metrics"

    @property
    def facts_any(self) -> str:
        return f"{self.prefix}.node.*.facts"

    @property
    def events_any(self) -> str:
        return f"{self.prefix}.node.*.events"

    def job_results(self, job_id: str) -> str:
        """Per-node results of one job, kept in the JOBS stream."""
        return f"{self.prefix}.jobs.{check_token(job_id, 'job id')}.results"

    @property
    def jobs_all(self) -> str:
        return f"{self.prefix}.jobs.>"

    def app_sync(self, node_id: str) -> str:
        """Agent asks the controller for the app releases it should run (request/reply).
        Under the node's own subjects: only that node may publish here, so the subject
        proves who asks."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.apps.sync"

    @property
    def app_sync_any(self) -> str:
        return f"{self.prefix}.node.*.apps.sync"

    def key_sync(self, node_id: str) -> str:
        """Agent asks for the signing-key rotations it missed (request/reply, answered only
        to the node's own inbox). Under the node's own subjects, like app sync."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.keys.sync"

    @property
    def key_sync_any(self) -> str:
        return f"{self.prefix}.node.*.keys.sync"

    def node_renew(self, node_id: str) -> str:
        """A connected agent asks for a fresh user JWT (request/reply, under its own
        subjects: the subject proves who asks, as for app sync)."""
        return f"{self.prefix}.node.{check_token(node_id, 'node id')}.renew"

    @property
    def node_renew_any(self) -> str:
        return f"{self.prefix}.node.*.renew"

    @property
    def controller_events(self) -> str:
        """Fleet events the controller itself emits (liveness transitions, enrollments)."""
        return f"{self.prefix}.fleet.events"

    @property
    def audit(self) -> str:
        """The audit trail (the AUDIT stream): only the controller's state connection
        publishes here; no node's permissions name it."""
        return f"{self.prefix}.audit"

    def node_id_of(self, subject: str) -> str | None:
        """The node id in a ``<prefix>.node.<id>.<leaf>`` subject, or None."""
        head = f"{self.prefix}.node."
        if not subject.startswith(head):
            return None
        rest = subject[len(head) :]
        node_id, sep, _ = rest.partition(".")
        if not sep or not _TOKEN.fullmatch(node_id):
            return None
        return node_id

    def inbox_prefix(self, node_id: str) -> str:
        """Each node gets its own reply inbox space so it cannot read other nodes' replies."""
        return f"_INBOX_{check_token(node_id, 'node id')}"

    def inbox_any(self, node_id: str) -> str:
        """Every reply subject in node ``node_id``'s inbox space."""
        return f"{self.inbox_prefix(node_id)}.>"

    @property
    def enroll_inbox(self) -> str:
        """The inbox prefix enrolling machines use (shared: replies are sealed)."""
        return ENROLL_INBOX

    @property
    def enroll_inbox_any(self) -> str:
        return f"{ENROLL_INBOX}.>"

    @property
    def controller_inbox(self) -> str:
        """The inbox prefix of the controller's JetStream connection."""
        return CONTROLLER_INBOX

    @property
    def controller_inbox_any(self) -> str:
        return f"{CONTROLLER_INBOX}.>"

    # Reply subjects a peer names are checked before the controller publishes to them: a
    # peer must never be able to make the controller publish anywhere else (a JetStream
    # API subject, a KV key, another node's subjects).
    @staticmethod
    def is_enroll_reply(subject: str) -> bool:
        """Whether ``subject`` is a reply subject in the enrolling machines' inbox space."""
        return isinstance(subject, str) and _has_reply_tail(ENROLL_INBOX, subject)

    def is_node_reply(self, node_id: str, subject: str) -> bool:
        """Whether ``subject`` is a reply subject in node ``node_id``'s own inbox space."""
        return isinstance(subject, str) and _has_reply_tail(self.inbox_prefix(node_id), subject)

    # JetStream names
    @property
    def stream_subjects_metrics(self) -> list[str]:
        return [self.metrics_any]

    @property
    def stream_subjects_mesh(self) -> list[str]:
        return [self.mesh_delta_any]

    @property
    def stream_subjects_events(self) -> list[str]:
        return [self.events_any, self.controller_events]
