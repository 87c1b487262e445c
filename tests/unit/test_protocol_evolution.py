"""The evolution rule: a field added after protocol v1 has a default, so older peers still decode.

The tables below are frozen as of protocol v1. Do not edit an entry to make a test pass: give
the new field a default instead. A new message class gets a new entry (its own v1 fields).
A message whose shape changed incompatibly gets a new kind (REPLACED, frozen from then on);
its v1 kind stays below, retired (protocol.messages.RETIRED_KINDS), and is refused clearly.
"""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import (
    ALL_MESSAGES,
    RETIRED_KINDS,
    Heartbeat,
    Message,
    MetricBatch,
    MetricPoint,
)
from tests.unit.test_protocol_codec import SAMPLES

# class name -> (kind tag on the wire, fields required (no default) in protocol v1)
V1_MESSAGES: dict[str, tuple[str, frozenset[str]]] = {
    "EnrollRequest": ("enroll_req", frozenset({"token", "identity", "hostname", "agent_version"})),
    "EnrollReply": ("enroll_rep", frozenset({"ok"})),
    "Heartbeat": ("hb", frozenset({"node_id", "seq", "ts"})),
    "MetricBatch": ("metrics", frozenset({"node_id", "seq", "ts", "points"})),
    "Command": ("cmd", frozenset({"id", "job_id", "issued_at", "ttl", "action"})),
    "SignedCommand": ("signed_cmd", frozenset({"payload", "signature"})),
    "CommandResult": ("cmd_result", frozenset({"job_id", "command_id", "node_id", "status"})),
    "Event": ("event", frozenset({"ts", "type"})),
    "ErrorReply": ("error", frozenset({"code", "message"})),
    "AppSyncRequest": ("app_sync_req", frozenset({"node_id"})),
    "AppSyncReply": ("app_sync_rep", frozenset()),
    # Added with sealed enrollment replies (issue 8, finding 10): a new message class.
    "SealedReply": ("sealed", frozenset({"box"})),
    # Added with signing-key rotation (issue 10, item 8): new message classes.
    "KeyRotation": ("key_rotation", frozenset({"seq", "issued_at", "new_key"})),
    "SignedKeyRotation": ("signed_key_rotation", frozenset({"payload", "signature"})),
    "KeySyncRequest": ("key_sync_req", frozenset({"node_id"})),
    "KeySyncReply": ("key_sync_rep", frozenset()),
    # Added with NATS operator mode (issue 10): renewal of a node's user JWT.
    "RenewRequest": ("renew_req", frozenset({"node_id", "identity", "ts"})),
    "RenewReply": ("renew_rep", frozenset({"ok"})),
    # Added with the overlay network (issue 12): new message classes.
    "MeshSnapshot": ("mesh_snapshot", frozenset({"network", "generation", "own", "cidr"})),
    "MeshDelta": ("mesh_delta", frozenset({"network", "generation", "from_generation"})),
    "MeshResyncRequest": ("mesh_resync", frozenset({"node_id"})),
    "MeshJoin": ("mesh_join", frozenset({"node_id", "public_key"})),
    "MeshKeyRotation": ("mesh_key_rotation",
                        frozenset({"node_id", "phase", "public_key", "next_public_key"})),
    "MeshRotateKey": ("mesh_rotate_key", frozenset()),
    "MeshInvite": ("mesh_invite", frozenset()),
    "MeshHealth": ("mesh_health", frozenset({"node_id", "network", "ts"})),
    # Added with facts refreshed after enrollment: a new message class.
    "FactsUpdate": ("facts_update", frozenset({"node_id"})),
}

# Messages whose v1 shape changed incompatibly (typed payloads instead of free-form maps):
# class name -> (the new kind, its required fields when introduced). Frozen like V1_MESSAGES.
REPLACED: dict[str, tuple[str, frozenset[str]]] = {
    "Event": ("event.v2", frozenset({"ts", "payload"})),
    "CommandResult": ("cmd_result.v2", frozenset({"job_id", "command_id", "node_id", "status"})),
}


def _frozen(name: str) -> tuple[str, frozenset[str]]:
    return REPLACED.get(name) or V1_MESSAGES[name]


# Structs nested inside messages: class name -> v1 required fields. Array-like structs are
# positional on the wire, so their v1 field order is frozen too (new fields go at the end).
V1_NESTED: dict[str, frozenset[str]] = {
    "MetricPoint": frozenset({"measurement", "fields"}),
    "AppRelease": frozenset({"name", "version"}),
    "AppArtifact": frozenset({"url", "sha256"}),
    "HealthCheck": frozenset(),
    # Added with typed payloads (Event.payload, CommandResult.data): their fields then.
    "NodeFacts": frozenset(),
    "Pong": frozenset(),
    "FactsReport": frozenset({"facts"}),
    "AppReport": frozenset({"version", "state"}),
    "AppsReport": frozenset(),
    "JobStarted": frozenset({"job_id"}),
    "JobOutput": frozenset({"job_id", "stream", "data"}),
    "JobFinished": frozenset({"job_id", "status"}),
    "AppStatus": frozenset({"app", "version", "state"}),
    "MetricsDropped": frozenset({"dropped"}),
    "NodeStatusChanged": frozenset({"old", "new"}),
    "NodeEnrolled": frozenset(),
    # Added with the overlay network (issue 12).
    "MeshEndpoint": frozenset({"host"}),
    "MeshPeer": frozenset({"node_id", "public_key", "address"}),
    "MeshPeerHealth": frozenset({"node_id"}),
}
# Tagged payloads: class name -> its type tag on the wire (never changes, like a kind).
PAYLOAD_TAGS: dict[str, str] = {
    "Pong": "pong",
    "FactsReport": "facts",
    "AppsReport": "apps",
    "JobStarted": "job.started",
    "JobOutput": "job.output",
    "JobFinished": "job.finished",
    "AppStatus": "app.status",
    "MetricsDropped": "metrics.dropped",
    "NodeStatusChanged": "node.status",
    "NodeEnrolled": "node.enrolled",
}
V1_ARRAY_ORDER: dict[str, tuple[str, ...]] = {
    "MetricPoint": ("measurement", "fields", "tags", "ts"),
}


def _required(cls: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.name for f in msgspec.structs.fields(cls) if f.required)


def _nested_structs() -> dict[str, type[msgspec.Struct]]:
    """Every Struct class reachable from a message's field types (messages excluded)."""
    found: dict[str, type[msgspec.Struct]] = {}
    seen: set[type[Any]] = set()

    def walk(t: mi.Type) -> None:
        if isinstance(t, mi.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            if t.cls not in ALL_MESSAGES:
                found[t.cls.__name__] = t.cls
            for f in t.fields:
                walk(f.type)
            return
        for attr in ("item_type", "key_type", "value_type"):
            inner = getattr(t, attr, None)
            if isinstance(inner, mi.Type):
                walk(inner)
        for inner in getattr(t, "types", ()) + getattr(t, "item_types", ()):
            walk(inner)

    for info in mi.multi_type_info(ALL_MESSAGES):
        walk(info)
    return found


def test_every_message_is_registered_with_its_v1_fields() -> None:
    unregistered = sorted(c.__name__ for c in ALL_MESSAGES if c.__name__ not in V1_MESSAGES)
    assert not unregistered, (
        f"new message classes {unregistered}: add them to V1_MESSAGES with their kind and "
        "required fields (the fields they are introduced with)"
    )


def test_every_nested_struct_is_registered() -> None:
    nested = _nested_structs()
    assert "MetricPoint" in nested  # the walker does find nested structs
    unregistered = sorted(set(nested) - set(V1_NESTED))
    assert not unregistered, f"new nested structs {unregistered}: add them to V1_NESTED"


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_no_required_field_added_after_v1(cls: type[Message]) -> None:
    if cls.__name__ not in V1_MESSAGES:
        pytest.fail(f"{cls.__name__} is not registered in V1_MESSAGES")
    _, frozen = _frozen(cls.__name__)
    added = sorted(_required(cls) - frozen)
    assert not added, (
        f"{cls.__name__} has required fields {added} that v1 peers do not send: "
        "a field added after v1 must have a default"
    )


@pytest.mark.parametrize("name", sorted(V1_NESTED))
def test_no_required_field_added_to_nested_structs(name: str) -> None:
    cls = _nested_structs()[name]
    added = sorted(_required(cls) - V1_NESTED[name])
    assert not added, f"{name} has required fields {added} added after v1: give them a default"


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_v1_required_fields_are_kept_required(cls: type[Message]) -> None:
    # Messages are encoded with omit_defaults: if a v1 required field got a default, a newer
    # peer would leave it out whenever it equals the default and a v1 peer would refuse it.
    kind, frozen = _frozen(cls.__name__)
    assert str(cls.__struct_config__.tag) == kind, "a message's kind must never change"
    lost = sorted(frozen - _required(cls))
    assert not lost, f"{cls.__name__} v1 required fields {lost} were removed or given a default"


def test_a_replaced_kind_is_retired_and_refused_clearly() -> None:
    # Only a new kind may change a shape: the old kind is kept out of use and named.
    in_use = {str(c.__struct_config__.tag) for c in ALL_MESSAGES}
    retired = {V1_MESSAGES[name][0]: kind for name, (kind, _) in REPLACED.items()}
    assert RETIRED_KINDS == retired
    assert not set(retired) & in_use
    for old, new in retired.items():
        with pytest.raises(ProtocolError, match=f"'{old}' is the old shape of '{new}'"):
            decode(msgspec.msgpack.encode({"kind": old, "v": 1}))


@pytest.mark.parametrize("name", sorted(PAYLOAD_TAGS))
def test_payload_tags_never_change(name: str) -> None:
    cls = _nested_structs()[name]
    assert str(cls.__struct_config__.tag) == PAYLOAD_TAGS[name]


def test_every_tagged_payload_is_registered() -> None:
    tagged = {n for n, c in _nested_structs().items() if c.__struct_config__.tag is not None}
    assert tagged == set(PAYLOAD_TAGS)


@pytest.mark.parametrize("name", sorted(V1_ARRAY_ORDER))
def test_array_like_field_order_is_stable(name: str) -> None:
    cls = _nested_structs()[name]
    assert cls.__struct_config__.array_like
    v1 = V1_ARRAY_ORDER[name]
    assert cls.__struct_fields__[: len(v1)] == v1, f"{name}: new fields go after {v1}"


def test_the_rule_catches_a_required_field_added_later() -> None:
    # The check above must fail for a message that grew a required field.
    class GrownHeartbeat(Message, tag="hb"):
        node_id: str
        seq: int
        ts: float
        cpu_count: int  # added "in v2" without a default: not allowed

    _, frozen = V1_MESSAGES["Heartbeat"]
    assert sorted(_required(GrownHeartbeat) - frozen) == ["cpu_count"]


# --- a newer peer adds defaulted fields ---------------------------------------------------


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_unknown_extra_fields_from_a_newer_peer_are_ignored(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    raw = msgspec.msgpack.decode(encode(msg))
    raw["added_in_v1_1"] = {"nested": [1, 2.5, "x", None], "flag": True}
    raw["zz_other"] = b"\x00\x01"
    data = msgspec.msgpack.encode(raw)
    assert decode(data, cls) == msg
    assert decode(data) == msg


def test_extra_trailing_element_in_array_like_struct_is_ignored() -> None:
    raw = msgspec.msgpack.decode(encode(SAMPLES[MetricBatch]))
    # omit_defaults trims trailing defaults of array-like structs: pad them back first
    for point in raw["points"]:
        while len(point) < len(MetricPoint.__struct_fields__):
            point.append({} if len(point) == 2 else 0)
        point.append("field added later")
    assert all(len(p) == len(MetricPoint.__struct_fields__) + 1 for p in raw["points"])
    assert decode(msgspec.msgpack.encode(raw)) == SAMPLES[MetricBatch]


def test_a_newer_peer_message_with_a_defaulted_field_decodes_here() -> None:
    # simulate the newer peer's own class: same kind, one more field with a default
    class NewerHeartbeat(Message, tag="hb"):
        node_id: str
        seq: int
        ts: float
        load1: float = 0.0

    data = msgspec.msgpack.encode(NewerHeartbeat(node_id="n-1", seq=3, ts=1.0, load1=0.7))
    assert type(decode(data)) is Heartbeat
    hb = decode(data, Heartbeat)
    assert (hb.node_id, hb.seq, hb.ts) == ("n-1", 3, 1.0)
