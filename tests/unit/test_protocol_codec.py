"""Codec round trips for every message type, and the ProtocolError given for each bad input."""

from __future__ import annotations

import zlib
from array import array
from typing import Any

import msgspec
import pytest

from protocol import PROTOCOL_VERSION
from protocol.codec import DEFAULT_MAX_PAYLOAD, ZLIB_EXT, decode, encode
from protocol.errors import PayloadTooLarge, ProtocolError, UnsupportedVersion
from protocol.messages import (
    ALL_MESSAGES,
    AppArtifact,
    AppRelease,
    AppReport,
    AppsReport,
    AppStatus,
    AppSyncReply,
    AppSyncRequest,
    Command,
    CommandResult,
    EnrollReply,
    EnrollRequest,
    ErrorReply,
    Event,
    FactsReport,
    FactsUpdate,
    HealthCheck,
    Heartbeat,
    JobFinished,
    JobOutput,
    JobStarted,
    KeyRotation,
    KeySyncReply,
    KeySyncRequest,
    MeshDelta,
    MeshEndpoint,
    MeshHealth,
    MeshInvite,
    MeshJoin,
    MeshKeyRotation,
    MeshPeer,
    MeshPeerHealth,
    MeshResyncRequest,
    MeshRotateKey,
    MeshSnapshot,
    Message,
    MetricBatch,
    MetricPoint,
    MetricsDropped,
    NodeEnrolled,
    NodeFacts,
    NodeStatusChanged,
    Pong,
    RenewReply,
    RenewRequest,
    SealedReply,
    SignedCommand,
    SignedKeyRotation,
)
from protocol.signing import CommandSigner

T0 = 1_700_000_000.0
WG_A = "q0nG0cV0sRJ3nEwFA3bgl/+T6VaVUqP7cU1A1c6pHXo="
WG_B = "AdBr2dTbhrDiAg8yc+cKtAFLPOzLRP0DSMhQ6kZKGjc="


def _mesh_peer(node_id: str = "n-0002", key: str = WG_B) -> MeshPeer:
    return MeshPeer(
        node_id=node_id, public_key=key, address="198.19.0.2", allowed_ips=["198.19.0.2/32"],
        endpoints=[MeshEndpoint(host="fd00::2", port=51820, kind="private", network="vpc-1"),
                   MeshEndpoint(host="198.18.1.2", kind="public", region="aws/us-east-1")],
        relay="n-0009", keepalive=25, region="aws/us-east-1",
    )
T0_NS = 1_700_000_000_123_456_789


def _command() -> Command:
    return Command(
        id="c-0001",
        job_id="j-42",
        issued_at=T0,
        ttl=120.0,
        action="exec",
        selector="provider=aws,region in (us-east-1,eu-west-1),!spot",
        targets=["node-a", "node-b"],
        argv=["/bin/sh", "-c", "echo 'héllo' && uname -a"],
        env={"LANG": "C.UTF-8", "EMPTY": ""},
        cwd="/tmp",
        user="barista",
        timeout=30.0,
        output_cap=4096,
        stream_output=True,
    )


def _samples() -> dict[type[Message], Message]:
    """One realistic instance per message type, with non-default values wherever possible."""
    signer = CommandSigner.generate()
    return {
        AppSyncRequest: AppSyncRequest(node_id="n-0001"),
        AppSyncReply: AppSyncReply(
            releases=[
                AppRelease(
                    name="web",
                    version="1.2.0",
                    artifacts=[
                        AppArtifact(url="file:///srv/web.tgz", sha256="ab" * 32, dest="web.tgz")
                    ],
                    install=["tar xzf web.tgz"],
                    start=["./web &"],
                    stop=["pkill web"],
                    env={"PORT": "8080"},
                    health=HealthCheck(http="http://127.0.0.1:8080/healthz", retries=3),
                )
            ]
        ),
        EnrollRequest: EnrollRequest(
            token="tok_abcdef",
            identity="UAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            hostname="vm-1.internal",
            agent_version="0.1.0",
            facts={"os": "linux", "arch": "x86_64"},
            labels={"provider": "aws", "region": "us-east-1"},
            wg_public_key="q0nG0cV0sRJ3nEwFA3bgl/+T6VaVUqP7cU1A1c6pHXo=",
            ts=T0,
            reply_key=b"\x01" * 32,
            signature=b"\x02" * 64,
        ),
        EnrollReply: EnrollReply(
            ok=True,
            node_id="n-0001",
            labels={"provider": "aws"},
            auth="nkey",
            inbox_prefix="_INBOX_n-0001",
            heartbeat_interval=2.5,
            metrics_interval=15.0,
        ),
        Heartbeat: Heartbeat(
            node_id="n-0001",
            seq=7,
            ts=T0,
            uptime=3600.5,
            agent_version="0.1.0",
            buffered_batches=3,
            dropped_batches=1,
            running_jobs=2,
        ),
        FactsUpdate: FactsUpdate(node_id="n-0001", ts=T0,
                                 facts={"public_ip": "198.51.100.7", "os": "Linux"}),
        MetricBatch: MetricBatch(
            node_id="n-0001",
            seq=99,
            ts=T0_NS,
            points=[
                MetricPoint("cpu", {"usage": 12.5, "cores": 4, "throttled": False}),
                MetricPoint(
                    "disk",
                    {"used": 1 << 40, "free_pct": 0.25, "fs": "ext4", "ro": True},
                    tags={"device": "/dev/nvme0n1p1", "mount": "/"},
                    ts=T0_NS + 1,
                ),
                MetricPoint("net", {"bytes_recv": 0, "err": -1, "iface": ""}, tags={"nic": "eth0"}),
            ],
            tags={"node": "n-0001", "provider": "aws", "region": "us-east-1"},
            dropped=5,
            errors={"diskio": "permission denied"},
        ),
        Command: _command(),
        SignedCommand: signer.sign(_command()),
        CommandResult: CommandResult(
            job_id="j-42",
            command_id="c-0001",
            node_id="n-0001",
            status="failed",
            exit_code=2,
            stdout="partial output…",
            stderr="boom",
            stdout_truncated=True,
            duration=1.25,
            reason="exit status 2",
            data=Pong(labels={"role": "web"}, facts=NodeFacts(os="linux", cpu_count=4)),
        ),
        Event: Event(
            ts=T0,
            payload=NodeStatusChanged(old="offline", new="online"),
            node_id="n-0001",
            severity="warning",
            message="back after 30s",
        ),
        ErrorReply: ErrorReply(code="bad_token", message="join token expired"),
        SealedReply: SealedReply(box=b"\x00\xffsealed"),
        KeyRotation: KeyRotation(seq=2, issued_at=T0, new_key="bmV3", old_key="b2xk",
                                 not_before=T0, old_key_expires=T0 + 3600),
        SignedKeyRotation: SignedKeyRotation(payload=b"\x81", signature=b"s" * 64,
                                             key_id="abc"),
        KeySyncRequest: KeySyncRequest(node_id="n-0001", after=1),
        KeySyncReply: KeySyncReply(rotations=[SignedKeyRotation(payload=b"p", signature=b"s")]),
        RenewRequest: RenewRequest(node_id="n-0001", identity="U" + "A" * 55, ts=T0,
                                   reply_key=b"k" * 32, signature=b"s" * 64),
        RenewReply: RenewReply(ok=False, error_code="revoked", error="node n-0001 was revoked"),
        MeshSnapshot: MeshSnapshot(network="overlay", generation=7, epoch="e1",
                                   own=_mesh_peer("n-0001", WG_A), cidr="198.19.0.0/16",
                                   peers=[_mesh_peer()], mtu=1380, port=51821, keepalive=15),
        MeshDelta: MeshDelta(network="overlay", generation=9, from_generation=7,
                             added=[_mesh_peer("n-0003")], changed=[_mesh_peer()],
                             removed=["n-0004"], epoch="e1"),
        MeshResyncRequest: MeshResyncRequest(node_id="n-0001", network="overlay",
                                             generation=7, reason="gap"),
        MeshJoin: MeshJoin(node_id="n-0001", public_key=WG_A,
                           endpoints=[MeshEndpoint(host="10.0.0.5", network="vpc-1")],
                           region="gcp/europe-west1"),
        MeshKeyRotation: MeshKeyRotation(node_id="n-0001", phase="announce", public_key=WG_A,
                                         next_public_key=WG_B),
        MeshRotateKey: MeshRotateKey(reason="scheduled"),
        MeshInvite: MeshInvite(networks=["overlay"]),
        MeshHealth: MeshHealth(node_id="n-0001", network="overlay", ts=T0, generation=7,
                               peers=[MeshPeerHealth(node_id="n-0002", handshake_age=3.5,
                                                     rx_bytes=10, tx_bytes=20, rtt_ms=1.25,
                                                     loss=0.1, sent=10, received=9)],
                               window=10.0, rejected=2),
    }


SAMPLES = _samples()


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(ALL_MESSAGES)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_round_trip_typed_and_untyped(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    data = encode(msg)
    assert isinstance(data, bytes)
    typed = decode(data, cls)
    untyped = decode(data)
    assert typed == msg
    assert untyped == msg
    assert type(untyped) is cls
    assert untyped.v == PROTOCOL_VERSION
    # bytearray and memoryview are accepted as well (what NATS clients may hand us)
    assert decode(bytearray(data), cls) == msg
    assert decode(memoryview(data)) == msg


def test_default_only_message_round_trips() -> None:
    msg = EnrollReply(ok=False, error_code="token_used", error="token already used")
    assert decode(encode(msg), EnrollReply) == msg


def test_metric_field_value_types_survive() -> None:
    batch = decode(encode(SAMPLES[MetricBatch]), MetricBatch)
    fields = batch.points[1].fields
    assert type(fields["used"]) is int
    assert type(fields["free_pct"]) is float
    assert type(fields["fs"]) is str
    assert type(fields["ro"]) is bool
    assert type(batch.points[0].fields["throttled"]) is bool
    assert batch.points[0].ts == 0 and batch.points[1].ts == T0_NS + 1


def test_signed_command_payload_decodes_to_the_command() -> None:
    signed = decode(encode(SAMPLES[SignedCommand]), SignedCommand)
    assert decode(signed.payload, Command) == _command()


def test_kind_tag_is_on_the_wire() -> None:
    raw = msgspec.msgpack.decode(encode(SAMPLES[Heartbeat]))
    assert raw["kind"] == "hb"
    assert raw["node_id"] == "n-0001"


# --- bad input -----------------------------------------------------------------------------


def _mp(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


_DROP = object()  # marks a field to leave out


def _hb(**overrides: Any) -> dict[str, Any]:
    """A raw heartbeat map with some fields replaced (or dropped with ``_DROP``)."""
    base: dict[str, Any] = {"kind": "hb", "v": 1, "node_id": "n-1", "seq": 1, "ts": T0}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


BAD_INPUTS: list[tuple[bytes, type[Message] | None, str]] = [
    (b"", None, "empty payload"),
    (b"", Heartbeat, "empty payload"),
    (b"\xc1\xc1\xc1garbage", None, "not a msgpack map"),
    (b"\xff\x00\x13\x37", Heartbeat, "not a msgpack map"),
    (b'{"kind": "hb"}', None, "not a msgpack map"),  # JSON is not msgpack
    (_mp([1, 2, 3]), None, "not a msgpack map"),
    (_mp("hb"), Heartbeat, "not a msgpack map"),
    (_mp(42), None, "not a msgpack map"),
    (_mp(None), None, "not a msgpack map"),
    (_mp({1: 2}), None, "not a msgpack map"),
    (_mp(_hb(kind=_DROP)), None, "no 'kind' field"),
    (_mp(_hb(kind=_DROP)), Heartbeat, "no 'kind' field"),
    (_mp({}), None, "no 'kind' field"),
    (_mp(_hb(kind=7)), None, "'kind' must be a string"),
    (_mp(_hb(kind="teleport")), None, "unknown message kind 'teleport'"),
    (_mp(_hb(kind="teleport")), Heartbeat, "unknown message kind 'teleport'"),
    (encode(SAMPLES[Event]), Heartbeat, "expected a 'hb' message, got 'event.v2'"),
    (encode(SAMPLES[Command]), SignedCommand, "expected a 'signed_cmd' message, got 'cmd'"),
    (_mp(_hb(seq=_DROP)), Heartbeat, "missing required field `seq`"),
    (_mp(_hb(node_id=_DROP)), None, "missing required field `node_id`"),
    (_mp(_hb(seq="one")), Heartbeat, "Expected `int`, got `str` - at `$.seq`"),
    (_mp(_hb(ts="now")), None, "Expected `float`, got `str` - at `$.ts`"),
    (_mp(_hb(v="1")), None, "Expected `int`, got `str` - at `$.v`"),
    (_mp(_hb(v=True)), Heartbeat, "Expected `int`, got `bool` - at `$.v`"),
    (_mp(_hb(uptime=[1])), None, "at `$.uptime`"),
    (_mp(_hb(seq=1.5)), None, "at `$.seq`"),
    (
        _mp(
            {
                "kind": "cmd",
                "id": "c",
                "job_id": "j",
                "issued_at": T0,
                "ttl": 1.0,
                "action": "format-disk",
            }
        ),
        Command,
        "at `$.action`",
    ),
    (
        _mp(
            {
                "kind": "metrics",
                "node_id": "n",
                "seq": 1,
                "ts": 1,
                "points": [["cpu", {"usage": [1, 2]}]],
            }
        ),
        MetricBatch,
        "at `$.points[0][1][...]`",
    ),
    (encode(SAMPLES[Heartbeat]) + b"\x00", None, "not a msgpack map"),  # trailing bytes
    (encode(SAMPLES[Heartbeat])[:-3], Heartbeat, "not a msgpack map"),  # truncated
]


@pytest.mark.parametrize(
    ("data", "expect", "reason"),
    [pytest.param(*case, id=f"{case[1] and case[1].__name__}:{case[2]}") for case in BAD_INPUTS],
)
def test_bad_input_is_a_protocol_error_with_reason(
    data: bytes, expect: type[Message] | None, reason: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, expect)
    assert type(info.value) is ProtocolError
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_protocol_error_carries_kind_and_size() -> None:
    data = _mp(_hb(kind="teleport"))
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.kind == "teleport"
    assert info.value.size == len(data)
    assert "newer peer" in info.value.reason
    with pytest.raises(ProtocolError) as info:
        decode(encode(SAMPLES[Event]), Heartbeat)
    assert info.value.kind == "event.v2"


def test_protocol_error_is_a_value_error() -> None:
    # callers that only know ValueError still catch it
    with pytest.raises(ValueError, match="empty payload"):
        decode(b"")


@pytest.mark.parametrize("value", ["text", 42, None, ["list"], {"kind": "hb"}, 3.5])
def test_non_bytes_input(value: Any) -> None:
    with pytest.raises(ProtocolError, match="payload must be bytes") as info:
        decode(value)
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize("expect", [MetricPoint, dict, int, Message, [Heartbeat]])
def test_expect_must_be_a_message_type(expect: Any) -> None:
    with pytest.raises(ProtocolError, match="not a protocol message type"):
        decode(encode(SAMPLES[Heartbeat]), expect)


def test_oversized_payload_is_refused_before_decoding() -> None:
    # 2 MiB of garbage: if it were parsed we would get "not a msgpack map", not PayloadTooLarge
    data = b"\xc1" * (2 * 1024 * 1024)
    with pytest.raises(PayloadTooLarge) as info:
        decode(data)
    assert info.value.size == len(data)
    assert info.value.limit == DEFAULT_MAX_PAYLOAD == 1024 * 1024
    assert "exceeds the limit of 1048576 bytes" in info.value.reason
    assert info.value.code == "payload_too_large"


def test_custom_max_size() -> None:
    data = encode(SAMPLES[MetricBatch])
    assert decode(data, MetricBatch, max_size=len(data)) == SAMPLES[MetricBatch]
    with pytest.raises(PayloadTooLarge) as info:
        decode(data, MetricBatch, max_size=len(data) - 1)
    assert info.value.size == len(data)
    assert info.value.limit == len(data) - 1
    # the limit also applies to untyped decoding and to tiny limits
    with pytest.raises(PayloadTooLarge):
        decode(data, max_size=16)


def test_payload_exactly_at_default_limit_is_decoded_not_refused() -> None:
    # a real message padded to exactly the limit passes the size check and then decodes
    pad = MetricsDropped(dropped=1)
    overhead = len(encode(Event(ts=T0, payload=pad, message="x" * 70_000))) - 70_000
    padded = Event(ts=T0, payload=pad, message="x" * (DEFAULT_MAX_PAYLOAD - overhead))
    data = encode(padded)
    assert len(data) == DEFAULT_MAX_PAYLOAD
    assert decode(data, Event).message == padded.message


@pytest.mark.parametrize("version", [0, 2, -1, 1000])
@pytest.mark.parametrize("expect", [None, Heartbeat])
def test_unsupported_version(version: int, expect: type[Message] | None) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode(_mp(_hb(v=version)), expect)
    assert info.value.version == version
    assert info.value.kind == "hb"
    assert f"protocol version {version} is not supported" in info.value.reason
    assert "speaks 1" in info.value.reason


def test_unsupported_version_wins_over_schema_errors() -> None:
    # a v2 peer may have changed the schema: say "version", not "missing field"
    with pytest.raises(UnsupportedVersion) as info:
        decode(_mp({"kind": "hb", "v": 2, "node": "renamed"}), Heartbeat)
    assert info.value.version == 2
    with pytest.raises(UnsupportedVersion):
        decode(_mp({"kind": "hyperdrive", "v": 2}))


def test_unsupported_version_on_encode_side_object() -> None:
    data = encode(Heartbeat(node_id="n-1", seq=1, ts=T0, v=2))
    with pytest.raises(UnsupportedVersion):
        decode(data, Heartbeat)


def test_memoryview_size_is_counted_in_bytes() -> None:
    # 300,000 four-byte items: len() says 300,000, the payload is 1.2 MB
    view = memoryview(array("I", bytes(4 * 300_000)))
    assert len(view) < DEFAULT_MAX_PAYLOAD < view.nbytes
    with pytest.raises(PayloadTooLarge) as info:
        decode(view)
    assert info.value.size == view.nbytes


# --- typed payloads (Event.payload, CommandResult.data) -----------------------------------

EVENT_PAYLOADS = [
    JobStarted(job_id="j-1", command_id="c-1"),
    JobOutput(job_id="j-1", stream="stderr", data="héllo\n"),
    JobFinished(job_id="j-1", status="failed", exit_code=2, duration=0.5),
    AppStatus(app="web", version="1.2", state="unhealthy", error="health check failed"),
    MetricsDropped(dropped=7),
    NodeStatusChanged(old="online", new="stale"),
    NodeEnrolled(labels={"provider": "aws"}),
]
RESULT_DATA = [
    Pong(labels={"role": "web"}, facts=NodeFacts(hostname="h", uptime=0.0)),
    FactsReport(facts=NodeFacts(os="Linux", cpu_count=8, mem_total=1 << 34)),
    AppsReport(apps={"web": AppReport(version="1.2", state="running", at=T0)}),
]


@pytest.mark.parametrize("payload", EVENT_PAYLOADS, ids=lambda p: p.__class__.__name__)
def test_every_event_payload_round_trips(payload: Any) -> None:
    ev = Event(ts=T0, payload=payload, node_id="n-1")
    got = decode(encode(ev), Event)
    assert got == ev and type(got.payload) is type(payload)
    assert got.type == payload.__struct_config__.tag  # the event's type is its payload's tag


@pytest.mark.parametrize("data", RESULT_DATA, ids=lambda d: d.__class__.__name__)
def test_every_result_data_round_trips(data: Any) -> None:
    res = CommandResult(job_id="j", command_id="c", node_id="n", status="ok", data=data)
    assert decode(encode(res), CommandResult) == res


def test_unknown_event_payload_type_is_a_clear_error() -> None:
    raw = msgspec.msgpack.decode(encode(Event(ts=T0, payload=MetricsDropped(dropped=1))))
    raw["payload"]["type"] = "mesh.delta"  # a payload kind from a newer peer
    with pytest.raises(ProtocolError) as info:
        decode(msgspec.msgpack.encode(raw), Event)
    assert "unknown payload.type" in info.value.reason and "'mesh.delta'" in info.value.reason
    assert "newer peer" in info.value.reason


def test_unknown_result_data_type_is_a_clear_error() -> None:
    raw = msgspec.msgpack.decode(encode(SAMPLES[CommandResult]))
    raw["data"]["type"] = "tarball"
    with pytest.raises(ProtocolError) as info:
        decode(msgspec.msgpack.encode(raw))
    assert "unknown data.type" in info.value.reason and "'tarball'" in info.value.reason


@pytest.mark.parametrize(("old", "new"), [("event", "event.v2"), ("cmd_result", "cmd_result.v2")])
def test_retired_kinds_are_refused_naming_their_replacement(old: str, new: str) -> None:
    # The shapes before typed payloads: a free-form "type"/"data" event, a map of data.
    legacy = {"kind": old, "ts": T0, "type": "job.output", "job_id": "j", "command_id": "c",
              "node_id": "n", "status": "ok", "data": {"job_id": "j", "data": "x"}}
    with pytest.raises(ProtocolError) as info:
        decode(msgspec.msgpack.encode(legacy))
    assert f"{old!r} is the old shape of {new!r}" in info.value.reason


# -- compressed payloads (a MeshJoin ``accepts`` "zlib": snapshots) ---------------------


def _big_snapshot() -> MeshSnapshot:
    return MeshSnapshot(network="overlay", generation=3, own=_mesh_peer("n-0000", WG_A),
                        cidr="198.19.0.0/16",
                        peers=[_mesh_peer(f"n-{i:04d}") for i in range(1, 200)])


def test_compressed_round_trip_is_smaller() -> None:
    snap = _big_snapshot()
    plain, packed = encode(snap), encode(snap, compress=True)
    assert packed[0] in (0xC7, 0xC8, 0xC9) and len(packed) < len(plain) // 3
    assert decode(packed, MeshSnapshot) == decode(plain, MeshSnapshot) == snap
    assert msgspec.msgpack.decode(packed).code == ZLIB_EXT  # one well-formed ext value


def test_small_message_is_not_compressed() -> None:
    hb = SAMPLES[Heartbeat]
    assert encode(hb, compress=True) == encode(hb)


def test_compressed_payload_is_bounded_after_inflating() -> None:
    # 2 MB of one repeated character inflate from a few kB: refused, not unpacked
    bomb = Event(ts=T0, payload=MetricsDropped(dropped=1), message="x" * 2_000_000)
    data = encode(bomb, compress=True)
    assert len(data) < 10_000
    with pytest.raises(PayloadTooLarge) as info:
        decode(data)
    assert info.value.limit == DEFAULT_MAX_PAYLOAD
    assert decode(data, Event, max_size=3_000_000).message == bomb.message
    with pytest.raises(PayloadTooLarge):
        decode(encode(_big_snapshot(), compress=True), max_size=5_000)


@pytest.mark.parametrize(("data", "reason"), [
    (msgspec.msgpack.encode(msgspec.msgpack.Ext(ZLIB_EXT, b"not zlib")), "does not inflate"),
    (msgspec.msgpack.encode(msgspec.msgpack.Ext(
        ZLIB_EXT, zlib.compress(encode(SAMPLES[MeshDelta]))[:-6])), "truncated"),
    (msgspec.msgpack.encode(msgspec.msgpack.Ext(ZLIB_EXT, zlib.compress(b"\xc1\xc1"))),
     "not a msgpack map"),
    (msgspec.msgpack.encode(msgspec.msgpack.Ext(7, zlib.compress(encode(SAMPLES[MeshDelta])))),
     "not a msgpack map"),  # another ext type is no compressed message
    (msgspec.msgpack.encode(msgspec.msgpack.Ext(ZLIB_EXT, zlib.compress(b""))), "empty payload"),
])
def test_bad_compressed_payload_is_a_protocol_error(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert reason in info.value.reason
