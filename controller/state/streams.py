"""Every JetStream stream and KV bucket barista keeps, defined once (controller, ingest,
benchmarks and tests all use these).

Replicas: 1 unless configured (controller config ``stream_replicas``). That is what the
embedded single server needs and works on a cluster too (each stream on one server);
3 on a 3+ server cluster keeps the state through the loss of a server.

What one node may store in METRICS is bounded: a batch is at most ``max_batch`` bytes (larger ones
are refused by the stream) and a node's subject keeps at most ``per_node_batches(...)``
batches, so a noisy node's surplus evicts only its own oldest batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from protocol.codec import METRIC_BATCH_MAX
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.streams")

# Stream names.
METRICS = "METRICS"
JOBS = "JOBS"
EVENTS = "EVENTS"
EVENTS_MAX_AGE = 7 * 24 * 3600.0
EVENTS_MAX_BYTES = 256 << 20
AUDIT = "AUDIT"
AUDIT_MAX_AGE = 90 * 24 * 3600.0
AUDIT_MAX_BYTES = 1 << 30
# Overlay deltas (controller.mesh.deltas), one subject per network. Agents get them as
# plain subscribers; the stream keeps the history for controllers (and for a look back).
MESH = "MESH"
MESH_MAX_AGE = 24 * 3600.0
MESH_MAX_BYTES = 256 << 20
MESH_PER_NETWORK = 10_000
# A node may hold at most this fraction of the stream's bytes even when every one of its
# batches is as large as allowed; see per_node_batches.
NODE_SHARE = 4
# Batches per retention window: jitter, and an agent flushing its offline buffer, can put
# a few more than max_age / interval on a subject.
WINDOW_SLACK = 1.25


def per_node_batches(
    *, max_age: float, max_bytes: int, max_batch: int, interval: float
) -> int:
    """How many batches one node's subject keeps (the stream's max_msgs_per_subject).

    Enough for the retention window (max_age / interval, with slack), but never so many
    that one node's worst case (that count x max_batch) exceeds 1/NODE_SHARE of
    max_bytes: the stream evicts its oldest messages of *any* node when max_bytes is
    reached, so a per-subject count alone would let full-size batches push others out.
    """
    window = math.ceil(max_age / interval * WINDOW_SLACK) if interval > 0 else 1 << 30
    by_bytes = max_bytes // (NODE_SHARE * max_batch)
    return max(1, min(window, by_bytes))


def metrics_stream_config(
    *,
    subjects: list[str],
    max_age: float = 24 * 3600,
    max_bytes: int = 1 << 30,
    max_batch: int = METRIC_BATCH_MAX,
    interval: float = 10.0,
    name: str = METRICS,
    replicas: int = 1,
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        max_msg_size=max_batch,
        max_msgs_per_subject=per_node_batches(
            max_age=max_age, max_bytes=max_bytes, max_batch=max_batch, interval=interval
        ),
        # The agent sets Nats-Msg-Id: a resend after a lost ack is dropped as a duplicate.
        duplicate_window=120,
        num_replicas=replicas,
        description="metric batches from agents, the durable buffer in front of InfluxDB",
    )


def jobs_stream_config(
    *, subjects: Subjects, max_age: float, max_bytes: int, max_msg_size: int,
    replicas: int = 1,
) -> StreamConfig:
    """Per-node results of every job (``<prefix>.jobs.<id>.results``), kept for max_age."""
    return _kept_for(JOBS, [subjects.jobs_all], max_age=max_age, max_bytes=max_bytes,
                     max_msg_size=max_msg_size, replicas=replicas)


def events_stream_config(*, subjects: Subjects, replicas: int = 1) -> StreamConfig:
    """Node events and the controller's own fleet events, kept a week."""
    return _kept_for(EVENTS, subjects.stream_subjects_events, max_age=EVENTS_MAX_AGE,
                     max_bytes=EVENTS_MAX_BYTES, replicas=replicas)


def audit_stream_config(*, subjects: Subjects, replicas: int = 1) -> StreamConfig:
    """Who did what through the API and which jobs ran (controller.audit), kept 90 days
    or 1 GiB, whichever comes first."""
    return _kept_for(AUDIT, [subjects.audit], max_age=AUDIT_MAX_AGE,
                     max_bytes=AUDIT_MAX_BYTES, replicas=replicas)


def mesh_stream_config(*, subjects: Subjects, replicas: int = 1) -> StreamConfig:
    """Versioned peer deltas of every network (``<prefix>.mesh.<net>.delta``). The
    controller sends them as plain messages (members get no reply inbox or headers with
    them) and checks that the stream kept them (controller.mesh.deltas); the periodic
    beacons on the same subjects are kept too."""
    config = _kept_for(MESH, subjects.stream_subjects_mesh, max_age=MESH_MAX_AGE,
                       max_bytes=MESH_MAX_BYTES, replicas=replicas)
    config.max_msgs_per_subject = MESH_PER_NETWORK
    config.duplicate_window = 120
    config.description = "overlay peer deltas, one subject per network"
    return config


def _kept_for(
    name: str, subjects: list[str], *, max_age: float, max_bytes: int,
    max_msg_size: int = -1, replicas: int = 1,
) -> StreamConfig:
    """A file stream with limits retention: messages go when too old or too many bytes
    (``max_msg_size`` -1: no limit of its own, the server's max_payload)."""
    return StreamConfig(
        name=name, subjects=subjects, retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, max_age=max_age, max_bytes=max_bytes,
        max_msg_size=max_msg_size, num_replicas=replicas,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing store's config up to ``config``.

    Idempotent; safe to run from several controllers at once.
    """
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s for %s", config.name, config.subjects)
            return
        except nats.js.errors.BadRequestError:
            # Another controller created it in between (update below), or the server
            # refused it (no room for its max_bytes, too few servers for its replicas).
            try:
                await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                raise
    await js.update_stream(config)


@dataclass(frozen=True, slots=True)
class Bucket:
    """A KV bucket (file storage); ``history``: revisions kept per key."""

    name: str
    history: int = 5

    def config(self, *, replicas: int = 1) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=self.name, history=self.history, storage=StorageType.FILE, replicas=replicas
        )


NODES_BUCKET = Bucket("nodes")
TOKENS_BUCKET = Bucket("tokens")
# Finished jobs are pruned by the job engine (job_retention), not by the bucket.
JOBS_BUCKET = Bucket("jobs", history=1)
APPS_BUCKET = Bucket("apps")
APP_STATUS_BUCKET = Bucket("app_status", history=1)
# Named API tokens (controller.auth): only the sha256 of each secret is stored.
API_TOKENS_BUCKET = Bucket("api_tokens")
# Signing-key rotation steps (signed, public), kept for agents that were offline.
KEYS_BUCKET = Bucket("keys", history=1)
# The fleet account's shared state in operator mode (controller.nats.account): every
# controller of a deployment builds the account JWT it pushes from it (revocations).
NATS_ACCOUNT_BUCKET = Bucket("nats_account")
# Overlay networks (controller.mesh): the networks, their address leases, what each node
# told about its WireGuard side (key, endpoints), and each network's published peers.
NETWORKS_BUCKET = Bucket("networks")
IPAM_BUCKET = Bucket("ipam")
MESH_NODES_BUCKET = Bucket("mesh_nodes", history=1)
MESH_STATE_BUCKET = Bucket("mesh_state", history=1)
# Infras (controller.provision): desired state per infra, and the journal of provider
# operations (an intent is written before each create/delete call; done ones are removed).
INFRAS_BUCKET = Bucket("infras")
INFRA_OPS_BUCKET = Bucket("infra_ops", history=1)


async def open_bucket(js: JetStreamContext, bucket: Bucket, *, replicas: int = 1) -> KeyValue:
    """Open a KV bucket, creating it when missing (with ``replicas``; an existing bucket
    keeps the replicas it has)."""
    try:
        return await js.key_value(bucket.name)
    except nats.js.errors.BucketNotFoundError:
        pass
    return await js.create_key_value(bucket.config(replicas=replicas))
