"""Typed wire messages (msgspec Structs, tagged by ``kind``).

Rule of evolution: a field added after a message's version always has a default, so an older
peer's message still decodes; tests/unit/test_protocol_evolution.py enforces it. A shape that
changes incompatibly gets a new ``kind`` (the tag is always on the wire; ``v`` is left out
when it is the default): RETIRED_KINDS maps the old kind to the new.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec

from protocol.version import PROTOCOL_VERSION

# Integer fields are InfluxDB's int64: a value outside it makes the batch malformed (the
# agent never sends one; a uint64 counter is sent as a float by whoever produces it).
Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
# Metric timestamps (ns since the epoch) InfluxDB accepts: ±(2**63 - 2). One beyond fails
# the whole write with 400, so decode refuses the batch instead.
TimestampNs = Annotated[int, msgspec.Meta(ge=-((1 << 63) - 2), le=(1 << 63) - 2)]
# Domain separation: a signature over an enroll request can never pass for anything else.
ENROLL_SIGNING_CONTEXT = "barista-enroll-v1"
RENEW_SIGNING_CONTEXT = "barista-renew-v1"

FieldValue = float | Int64 | bool | str  # a metric value may be NaN (ingest drops it)

# Times and durations must be finite: NaN compares false with everything, so a heartbeat
# stamped NaN would never age, and an infinite TTL never expires. The bounds refuse NaN
# and both infinities (codec.decode names the field "must be a finite number").
_FLOAT_MAX = sys.float_info.max
Finite = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
Duration = Annotated[float, msgspec.Meta(ge=0.0, le=_FLOAT_MAX)]  # seconds, finite, >= 0
Interval = Annotated[float, msgspec.Meta(gt=0.0, le=_FLOAT_MAX)]  # seconds, finite, > 0


class Message(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    """Base of every top-level message: a ``kind`` tag and the protocol version ``v``."""

    v: int = PROTOCOL_VERSION


# --- enrollment -------------------------------------------------------------------------


class EnrollRequest(Message, tag="enroll_req"):
    token: str
    # The agent's NATS nkey public key ("U..."); the private seed never leaves the machine.
    identity: str
    hostname: str
    agent_version: str
    facts: dict[str, str] = {}
    # Labels the agent declares about itself; the token's labels win on conflict.
    labels: dict[str, str] = {}
    wg_public_key: str = ""
    # Added after v1 (defaults keep older peers decoding; a controller that checks them
    # refuses a request without them). ``ts``: when the request was made (seconds since
    # the epoch). ``reply_key``: an ephemeral X25519 public key (32 bytes); the controller
    # seals its answer to it (a SealedReply), so other enrolling machines, which share the
    # enroll user and its inbox space, cannot read it. ``signature``: Ed25519 by the
    # identity nkey over signing_payload(), the proof that the sender holds the key.
    ts: Finite = 0.0
    reply_key: bytes = b""
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        """The canonical bytes the identity signs: every field but the signature, in a fixed
        order, dicts sorted (so a re-encoding by either side cannot change them)."""
        return msgspec.msgpack.encode(
            [
                ENROLL_SIGNING_CONTEXT,
                self.token,
                self.identity,
                self.hostname,
                self.agent_version,
                sorted(self.facts.items()),
                sorted(self.labels.items()),
                self.wg_public_key,
                float(self.ts),
                bytes(self.reply_key),
            ]
        )


class SealedReply(Message, tag="sealed"):
    """A reply readable only by the holder of the request's ``reply_key``:
    ``box`` is nacl.public.SealedBox(reply_key).encrypt(<an encoded message>)."""

    box: bytes


class EnrollReply(Message, tag="enroll_rep"):
    ok: bool
    node_id: str = ""
    labels: dict[str, str] = {}
    # "nkey": reconnect with the identity seed; "none": keep the current credentials.
    auth: Literal["nkey", "none"] = "none"
    inbox_prefix: str = ""
    heartbeat_interval: Interval = 5.0
    metrics_interval: Interval = 10.0
    # Controller public keys (base64 Ed25519) that sign commands; the bootstrap config's
    # key, when present, takes precedence.
    command_keys: list[str] = []
    # Set when ok is False; error_code is stable ("bad_token", "token_used", ...).
    error_code: str = ""
    error: str = ""
    # NATS operator mode: the node's user JWT (for its own nkey, short-lived); it connects
    # with it and the identity seed, and renews it before it expires (RenewRequest).
    nats_jwt: str = ""
    # The signing-key rotation step ``command_keys`` result from (0: none yet): a new
    # agent starts its key ring there instead of asking for the whole chain (key sync).
    key_seq: int = 0
    # The node is a member of an overlay network already: it starts its overlay (makes
    # its WireGuard key, sends MeshJoin) at once instead of waiting for a MeshInvite.
    mesh: bool = False
    # This controller sends MeshInvites: an agent outside every network may wait for one.
    # False (a controller from before them): the agent starts its overlay at once.
    mesh_invites: bool = False
    # App releases are assigned to the node: it asks for them at start. False: none at
    # enrollment, and it does not ask (5,000 agents enrolling at once make 5,000 requests
    # less); one assigned before it subscribed reaches it after its first heartbeat
    # (Heartbeat.apps_synced). True for a controller that does not say.
    apps: bool = True


# --- liveness ---------------------------------------------------------------------------


class Heartbeat(Message, tag="hb"):
    node_id: str
    seq: int
    ts: Finite
    uptime: Duration = 0.0
    agent_version: str = ""
    buffered_batches: int = 0
    dropped_batches: int = 0
    running_jobs: int = 0
    # The last signing-key rotation step the agent applied (-1: it keeps no key ring). A
    # controller further along sends the missed steps to the node's command subject.
    key_seq: int = -1
    # False in the first heartbeats of an agent that has not asked for its apps since it
    # started (its enrollment said it had none): the controller tells it if it has some.
    apps_synced: bool = True


class FactsUpdate(Message, tag="facts_update"):
    """The agent's current facts (agent/facts.py), sent at every start after enrollment and
    when its underlay (addresses, VPC range) changes while it runs: a VM stopped and
    started may come back with a new public address. The controller keeps them as the
    node's facts (bounded as at enrollment) and gives the overlay's peers the new
    endpoints."""

    node_id: str
    facts: dict[str, str] = {}
    ts: Finite = 0.0


# --- metrics ----------------------------------------------------------------------------


class MetricPoint(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sample: compact on the wire (an array, not a map)."""

    measurement: str
    fields: dict[str, FieldValue]
    tags: dict[str, str] = {}
    ts: TimestampNs = 0  # nanoseconds since the epoch; 0 = the batch's ts


class MetricBatch(Message, tag="metrics"):
    node_id: str
    seq: int
    ts: TimestampNs  # nanoseconds since the epoch; 0 = none (the store stamps the points)
    points: list[MetricPoint]
    # Tags common to every point (node, infra, group, provider, region, zone).
    tags: dict[str, str] = {}
    # Batches this agent has dropped from its offline buffer since it started (cumulative,
    # so the count survives the loss of the very batches that would have reported it).
    dropped: int = 0
    errors: dict[str, str] = {}  # collector name -> last error, when a collector failed


# --- commands ---------------------------------------------------------------------------

# "reconcile": converge to the desired app releases now (see agent/apps.py).
CommandAction = Literal["ping", "facts", "exec", "reconcile"]


class Command(Message, tag="cmd"):
    id: str  # unique per message; the replay cache keys on it
    job_id: str
    issued_at: Finite
    ttl: float  # range-checked by the verifier (0 < ttl <= max: NaN and inf refused as "ttl")
    action: CommandAction
    selector: str = ""
    targets: list[str] = []  # explicit node ids (direct or batch); empty = by selector
    argv: list[str] = []
    shell: str = ""
    env: dict[str, str] = {}
    cwd: str = ""
    user: str = ""
    timeout: Duration = 60.0
    output_cap: int = 64 * 1024
    stream_output: bool = False


class SignedCommand(Message, tag="signed_cmd"):
    payload: bytes  # an encoded Command
    signature: bytes  # Ed25519 over payload
    key_id: str = ""


ResultStatus = Literal["ok", "failed", "timeout", "rejected", "error"]
# Where a deployed app stands on a node (see agent/apps.py).
AppState = Literal["installing", "running", "failed", "unhealthy", "removed"]


# --- typed payloads: CommandResult.data and Event.payload ------------------------------
# Tagged by "type" inside the payload; an unknown type (from a newer peer) makes the whole
# message a ProtocolError. A field added to a payload later has a default, like any field.


class NodeFacts(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Facts about a node's machine; a fact this platform lacks is None (left out)."""

    hostname: str | None = None
    os: str | None = None
    kernel: str | None = None
    arch: str | None = None
    python: str | None = None
    cpu_count: int | None = None
    agent_version: str | None = None
    mem_total: int | None = None
    boot_time: float | None = None
    uptime: float | None = None
    distro: str | None = None
    distro_id: str | None = None
    distro_version: str | None = None
    # The underlay (protocol.mesh FACT_*): public_ip "" = behind NAT.
    private_ip: str | None = None
    public_ip: str | None = None
    vpc_cidr: str | None = None


class ResultData(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of what a command answers beyond its status and output."""


class Pong(ResultData, tag="pong"):
    """The answer to "ping": the node's labels and a few of its facts."""

    labels: dict[str, str] = {}
    facts: NodeFacts = msgspec.field(default_factory=NodeFacts)


class FactsReport(ResultData, tag="facts"):
    """The answer to "facts"."""

    facts: NodeFacts


class AppReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One app on one node, as the node last saw it."""

    version: str
    state: AppState
    error: str = ""
    at: Finite = 0.0


class AppsReport(ResultData, tag="apps"):
    """The answer to "reconcile": app name -> where it stands after the pass."""

    apps: dict[str, AppReport] = {}


AnyResultData = Pong | FactsReport | AppsReport


class CommandResult(Message, tag="cmd_result.v2"):
    job_id: str
    command_id: str
    node_id: str
    status: ResultStatus
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: Duration = 0.0
    reason: str = ""
    # Typed: the "cmd_result" kind this replaces carried a free-form map here.
    data: AnyResultData | None = None


# --- events -----------------------------------------------------------------------------

Liveness = Literal["pending", "online", "stale", "offline"]
Severity = Literal["debug", "info", "warning", "error"]


class EventPayload(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of what an event says; the tag is the event's type ("job.output", ...)."""


class JobStarted(EventPayload, tag="job.started"):
    job_id: str
    command_id: str = ""


class JobOutput(EventPayload, tag="job.output"):
    """Streamed output of an exec command (only with stream_output, within the cap)."""

    job_id: str
    stream: Literal["stdout", "stderr"]
    data: str


class JobFinished(EventPayload, tag="job.finished"):
    job_id: str
    status: ResultStatus
    exit_code: int | None = None
    duration: Duration = 0.0


class AppStatus(EventPayload, tag="app.status"):
    """An app changed state on the node that sends it."""

    app: str
    version: str
    state: AppState
    error: str = ""


class MetricsDropped(EventPayload, tag="metrics.dropped"):
    """Metric batches the node dropped from its offline buffer while disconnected."""

    dropped: int


class NodeStatusChanged(EventPayload, tag="node.status"):
    """Sent by the controller: a node's liveness changed."""

    old: Liveness = msgspec.field(name="from")
    new: Liveness = msgspec.field(name="to")


class NodeEnrolled(EventPayload, tag="node.enrolled"):
    """Sent by the controller: a node enrolled, with the labels it was given."""

    labels: dict[str, str] = {}


AnyEventPayload = (
    JobStarted | JobOutput | JobFinished | AppStatus | MetricsDropped | NodeStatusChanged
    | NodeEnrolled
)
JobEvent = JobStarted | JobOutput | JobFinished


class Event(Message, tag="event.v2"):
    ts: Finite
    # Typed: the "event" kind this replaces carried a ``type`` string and a ``data`` map.
    payload: AnyEventPayload
    node_id: str = ""
    severity: Severity = "info"
    message: str = ""

    @property
    def type(self) -> str:
        """The event's type: its payload's tag ("job.output", "node.status", ...)."""
        return str(type(self.payload).__struct_config__.tag)


class ErrorReply(Message, tag="error"):
    code: str
    message: str


# --- app deploys (desired state; see agent/apps.py and controller/deploy.py) ---------------


class AppArtifact(msgspec.Struct, kw_only=True, omit_defaults=True):
    url: str  # http(s):// or file://
    sha256: str  # 64 hex digits; a mismatch aborts the install
    dest: str = ""  # file name inside the release dir; default: the URL's last segment


class HealthCheck(msgspec.Struct, kw_only=True, omit_defaults=True):
    cmd: str = ""  # run with /bin/sh -c in the release dir; exit 0 = healthy
    http: str = ""  # GET on a loopback URL; 2xx/3xx = healthy
    retries: int = 10
    interval: Duration = 1.0
    timeout: Duration = 5.0


class AppRelease(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One version of one app as a node should run it; steps run with /bin/sh -c."""

    name: str
    version: str
    artifacts: list[AppArtifact] = []
    install: list[str] = []
    start: list[str] = []
    stop: list[str] = []
    env: dict[str, str] = {}
    health: HealthCheck | None = None
    step_timeout: Duration = 300.0


class AppSyncRequest(Message, tag="app_sync_req"):
    node_id: str


class AppSyncReply(Message, tag="app_sync_rep"):
    releases: list[AppRelease] = []


# --- command-signing key rotation (see controller/keys.py and agent/keyring.py) -----------


class KeyRotation(Message, tag="key_rotation"):
    """One step of a signing-key rotation, signed (as a SignedKeyRotation) by a key the
    agents already trust. Steps are numbered; an agent applies each once, in order.

    A start (``finish`` False, signed by ``old_key``): trust ``new_key`` too; drop
    ``old_key`` at ``old_key_expires`` at the latest (0: only on finish). A finish
    (signed by ``new_key``): drop ``old_key`` now."""

    seq: int  # 1, 2, ...
    issued_at: Finite
    new_key: str  # base64 Ed25519 public key
    old_key: str = ""
    not_before: Finite = 0.0  # the controller signs commands with new_key from then on
    old_key_expires: Finite = 0.0
    finish: bool = False


class SignedKeyRotation(Message, tag="signed_key_rotation"):
    """A KeyRotation and its signature. Its own kind: a signature over a rotation can
    never pass for a command's (the payload's kind is checked on decode)."""

    payload: bytes  # an encoded KeyRotation
    signature: bytes  # Ed25519 over payload
    key_id: str = ""


class KeySyncRequest(Message, tag="key_sync_req"):
    """An agent asks for the rotation steps after the last one it applied."""

    node_id: str
    after: int = 0


class KeySyncReply(Message, tag="key_sync_rep"):
    rotations: list[SignedKeyRotation] = []


class RenewRequest(Message, tag="renew_req"):
    """A node asks for a fresh NATS user JWT (operator mode): on its own renew subject while
    connected, or -- its JWT expired while it was away -- as the enroll identity on the
    enroll subject. Signed by the node's identity nkey (``signing_payload``), recently
    (``ts``); the answer is sealed to ``reply_key`` (32 bytes, X25519) when given."""

    node_id: str
    identity: str
    ts: Finite
    reply_key: bytes = b""
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        return msgspec.msgpack.encode(
            [RENEW_SIGNING_CONTEXT, self.node_id, self.identity, float(self.ts),
             bytes(self.reply_key)]
        )


class RenewReply(Message, tag="renew_rep"):
    ok: bool
    nats_jwt: str = ""
    # Set when ok is False: "revoked", "not_found", "bad_signature", ...
    error_code: str = ""
    error: str = ""


# --- overlay network (see protocol/mesh.py, agent/netmesh/, controller/mesh/) -------------
# One WireGuard key per node (the public key in EnrollRequest.wg_public_key and MeshJoin),
# one interface per network. Keys are base64 (44 characters, 32 bytes) as `wg` prints
# them; addresses are IP literals, prefixes CIDR strings. The wire types are plain strings
# on purpose: one bad peer must not make a whole snapshot undecodable; protocol/mesh.py
# checks each peer (both sides use the same checks) and a bad one is dropped and counted.

EndpointKind = Literal["private", "public"]


class MeshEndpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a node's WireGuard port is reachable on the underlay.

    ``private``: inside its VPC / region network ``network`` (reachable by nodes that have
    an endpoint in the same ``network``). ``public``: from anywhere (a public IP, 1:1 NAT).
    A node behind NAT has no public endpoint."""

    host: str  # an IPv4 or IPv6 literal (no brackets)
    port: int = 51820
    kind: EndpointKind = "private"
    network: str = ""  # VPC / region network id (private endpoints); "" for public ones
    region: str = ""  # provider region, e.g. "aws/us-east-1" (for the latency matrix)


class MeshPeer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One member of a network as every other member sees it (the same entry for all:
    deltas are network-wide, so anything pair-specific is derived on the node with the
    rules of protocol/mesh.py).

    ``allowed_ips``: the prefixes the peer itself owns (at least its overlay ``address``
    as a /32 or /128; a site gateway adds its LAN). ``relay``: the node id of the public
    node, chosen by the controller, through which peers that cannot reach this one
    directly send to it (protocol/mesh.py pair_relay). ``keepalive``: seconds, 0 = the
    network's rule (protocol/mesh.py keepalive_for). ``next_public_key``: during a key
    rotation, the key the node announced and will switch to (peers accept handshakes from
    it and move the peer's allowed IPs to it once it handshakes)."""

    node_id: str
    public_key: str
    address: str  # overlay address, no prefix length
    allowed_ips: list[str] = []
    endpoints: list[MeshEndpoint] = []
    relay: str = ""
    keepalive: int = 0
    next_public_key: str = ""
    region: str = ""
    labels: dict[str, str] = {}


class MeshSnapshot(Message, tag="mesh_snapshot"):
    """The whole network as node ``own.node_id`` should configure it (controller -> node,
    on the node's mesh snapshot subject: on join, on resync, after a restart of either
    side). ``own`` is the node's entry as every peer sees it (``own.address`` is its
    overlay address, ``own.relay`` its relay); ``peers`` are all the others. ``epoch``
    names one incarnation of the network: a new epoch (network re-created) resets the
    generation, so a lower generation with a new epoch is not stale."""

    network: str
    generation: int
    own: MeshPeer  # the node's own entry: its node id, overlay address, key, endpoints
    cidr: str  # the network's prefix, e.g. "100.96.0.0/12": the interface route
    peers: list[MeshPeer] = []
    epoch: str = ""
    mtu: int = 1420
    port: int = 51820  # the node's WireGuard listen port on this network
    keepalive: int = 25  # seconds: persistent keepalive for NAT'ed nodes' tunnels


class MeshDelta(Message, tag="mesh_delta"):
    """Network-wide change from ``from_generation`` to ``generation`` (JetStream stream
    MESH, subject ``<prefix>.mesh.<network>.delta``; coalesced: it may span several
    generations). A node applies it only when ``from_generation`` is the generation it
    has; a stale one (``generation`` <= its own) is ignored, a gap asks for a resync.
    ``changed`` carries full entries (replace, not patch); ``removed`` node ids. A node
    finds its own entry among them too (its address or key as the network sees it)."""

    network: str
    generation: int
    from_generation: int
    added: list[MeshPeer] = []
    changed: list[MeshPeer] = []
    removed: list[str] = []
    epoch: str = ""


class MeshResyncRequest(Message, tag="mesh_resync"):
    """A node asks for a fresh MeshSnapshot of ``network`` (it saw a gap, a new epoch, or
    reconnected); ``generation`` is the one it has (0: none). The answer comes on its
    snapshot subject. ``network`` "" asks for every network the node is a member of."""

    node_id: str
    network: str = ""
    generation: int = 0
    reason: str = ""  # "gap", "start", "reconnect", "epoch", "rejected"


class MeshJoin(Message, tag="mesh_join"):
    """A node says how to reach it (on every agent start and when its endpoints change):
    its WireGuard public key (only the public key ever leaves the node) and its underlay
    endpoints. The controller answers with a MeshSnapshot per network the node is in."""

    node_id: str
    public_key: str
    endpoints: list[MeshEndpoint] = []
    region: str = ""
    next_public_key: str = ""  # a rotation in progress (see MeshKeyRotation)
    # Encodings the node reads besides plain MessagePack ("zlib": protocol/codec.py
    # COMPRESSED); the controller compresses the node's snapshots only when it says so.
    accepts: list[str] = []


MeshKeyPhase = Literal["announce", "ready", "switched"]


class MeshKeyRotation(Message, tag="mesh_key_rotation"):
    """Two-phase WireGuard key rotation, one step from the node (node -> controller).

    1. ``announce``: the node made ``next_public_key`` (its private key stays on the node)
       and still uses ``public_key``. The controller publishes the node's entry with
       ``next_public_key`` set; peers add it as a second WireGuard peer (no allowed IPs).
    2. ``ready``, from each peer (``node_id`` the peer, ``peer`` the rotating node, the two
       keys the rotating node's): the peer's WireGuard has the next key now. When every
       peer said so the controller tells the node (``MeshRotateKey.ready_key``).
    3. The node switches its interfaces to the new key (on that word, or after a timeout
       when it does not come) and says ``switched``; peers already move the allowed IPs
       to the new key when its first handshake arrives. The controller then publishes the
       entry with ``public_key`` = the new key and no ``next_public_key``: peers drop the
       old one, and the node deletes its old private key (it keeps it until then)."""

    node_id: str
    phase: MeshKeyPhase
    public_key: str  # the key in use before the rotation
    next_public_key: str
    peer: str = ""  # phase "ready": the rotating node


class MeshRotateKey(Message, tag="mesh_rotate_key"):
    """Controller -> node (its mesh rotate subject): start a key rotation now; or, with
    ``ready_key``, every peer has the node's announced next key: switch to it now."""

    reason: str = ""
    ready_key: str = ""


class MeshInvite(Message, tag="mesh_invite"):
    """Controller -> node (its mesh snapshot subject, which only the controller and the
    node itself may publish on): the node is a member of ``networks`` but has not joined.
    A node outside every network runs no overlay; this tells it to start one (make its
    WireGuard key, send MeshJoin). Sent again, with backoff, until the node joins."""

    networks: list[str] = []


class MeshPeerHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One peer as one node sees it. ``handshake_age``: seconds since the last handshake,
    -1 = never. ``rtt_ms`` -1 = no probe answered in the window; ``loss`` 0..1."""

    node_id: str
    handshake_age: Finite = -1.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    rtt_ms: Finite = -1.0
    loss: Finite = 0.0
    sent: int = 0  # probes sent in the window
    received: int = 0
    relayed: bool = False  # reached through a relay (probes measure the relayed path)


class MeshHealth(Message, tag="mesh_health"):
    """Per-peer health of one node in one network (node -> controller, its mesh health
    subject, every probe window): what the latency/loss matrix is made of."""

    node_id: str
    network: str
    ts: Finite
    generation: int = 0
    peers: list[MeshPeerHealth] = []
    window: Duration = 0.0  # seconds the probe counters cover
    rejected: int = 0  # mesh messages this node rejected since it started (bad input)


# Kinds whose shape changed incompatibly -> the kind that replaced them. A peer still
# sending the old kind gets a clear ProtocolError naming the new one.
RETIRED_KINDS: dict[str, str] = {"event": "event.v2", "cmd_result": "cmd_result.v2"}

AnyMessage = (
    EnrollRequest
    | EnrollReply
    | Heartbeat
    | FactsUpdate
    | MetricBatch
    | Command
    | SignedCommand
    | CommandResult
    | Event
    | ErrorReply
    | AppSyncRequest
    | AppSyncReply
    | SealedReply
    | KeyRotation
    | SignedKeyRotation
    | KeySyncRequest
    | KeySyncReply
    | RenewRequest
    | RenewReply
    | MeshSnapshot
    | MeshDelta
    | MeshResyncRequest
    | MeshJoin
    | MeshKeyRotation
    | MeshRotateKey
    | MeshInvite
    | MeshHealth
)

ALL_MESSAGES: tuple[type[Message], ...] = (
    EnrollRequest,
    EnrollReply,
    Heartbeat,
    FactsUpdate,
    MetricBatch,
    Command,
    SignedCommand,
    CommandResult,
    Event,
    ErrorReply,
    AppSyncRequest,
    AppSyncReply,
    SealedReply,
    KeyRotation,
    SignedKeyRotation,
    KeySyncRequest,
    KeySyncReply,
    RenewRequest,
    RenewReply,
    MeshSnapshot,
    MeshDelta,
    MeshResyncRequest,
    MeshJoin,
    MeshKeyRotation,
    MeshRotateKey,
    MeshInvite,
    MeshHealth,
)
