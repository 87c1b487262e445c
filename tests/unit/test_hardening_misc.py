"""Pure-logic parts of the issue 8 fixes: finite times in the codec (finding 12), the
METRICS bounds and the agent's batch splitting (finding 9), strict JSON (finding 11)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from agent.outbox import fit_batch
from controller.errors import BadRequest
from controller.jsontext import loads
from controller.state.streams import NODE_SHARE, metrics_stream_config, per_node_batches
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    AppRelease,
    AppSyncReply,
    Command,
    CommandResult,
    EnrollReply,
    Event,
    HealthCheck,
    Heartbeat,
    MetricBatch,
    MetricPoint,
    MetricsDropped,
)

NON_FINITE = [math.nan, math.inf, -math.inf]

# (message, field path to poison): every time and duration on the wire
TIME_FIELDS: list[tuple[Any, tuple[str, ...]]] = [
    (Heartbeat(node_id="n", seq=1, ts=1.0), ("ts",)),
    (Heartbeat(node_id="n", seq=1, ts=1.0), ("uptime",)),
    (Event(ts=1.0, payload=MetricsDropped(dropped=1)), ("ts",)),
    (Command(id="c", job_id="j", issued_at=1.0, ttl=5.0, action="ping"), ("issued_at",)),
    # Command.ttl is range-checked by the verifier instead (tests/unit/test_signing.py).
    (Command(id="c", job_id="j", issued_at=1.0, ttl=5.0, action="ping"), ("timeout",)),
    (CommandResult(job_id="j", command_id="c", node_id="n", status="ok"), ("duration",)),
    (EnrollReply(ok=True), ("heartbeat_interval",)),
    (EnrollReply(ok=True), ("metrics_interval",)),
]


def _poisoned(msg: Any, path: tuple[str, ...], value: float) -> bytes:
    raw = msgspec.to_builtins(msg)
    raw[path[0]] = value
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("msg", "path"), TIME_FIELDS,
                         ids=[f"{type(m).__name__}.{p[0]}" for m, p in TIME_FIELDS])
def test_f12_codec_refuses_non_finite_times(msg: Any, path: tuple[str, ...], value: float):
    codec.decode(codec.encode(msg), type(msg))  # the finite message is fine
    with pytest.raises(ProtocolError) as info:
        codec.decode(_poisoned(msg, path, value), type(msg))
    reason = info.value.reason
    assert path[0] in reason
    assert any(why in reason for why in ("finite", ">= 0", "> 0")), reason


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_f12_nested_app_durations_are_finite(value: float):
    good = AppSyncReply(releases=[AppRelease(name="a", version="1", health=HealthCheck())])
    raw = msgspec.to_builtins(good)
    for where in (("step_timeout",), ("health", "interval"), ("health", "timeout")):
        bad = msgspec.to_builtins(good)
        target = bad["releases"][0]
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
        with pytest.raises(ProtocolError):
            codec.decode(msgspec.msgpack.encode(bad), AppSyncReply)
    codec.decode(msgspec.msgpack.encode(raw), AppSyncReply)


def test_f12_negative_durations_refused_and_metric_values_may_be_nan():
    with pytest.raises(ProtocolError):
        codec.decode(_poisoned(Heartbeat(node_id="n", seq=1, ts=1.0), ("uptime",), -1.0),
                     Heartbeat)
    # Metric *values* may be non-finite (ingest drops them, infra/influxdb/README.md).
    batch = MetricBatch(node_id="n", seq=1, ts=1, points=[
        MetricPoint(measurement="cpu", fields={"a": math.nan, "b": math.inf})])
    out = codec.decode(codec.encode(batch), MetricBatch)
    assert math.isnan(out.points[0].fields["a"])  # type: ignore[arg-type]


def test_f12_nan_message_is_clear():
    data = _poisoned(Heartbeat(node_id="n", seq=1, ts=1.0), ("ts",), math.nan)
    with pytest.raises(ProtocolError, match=r"`\$\.ts` must be a finite number"):
        codec.decode(data, Heartbeat)


# -- finding 9 ---------------------------------------------------------------------------


def test_f09_per_node_bound_never_exceeds_its_share_of_the_stream():
    for max_bytes in (16 << 20, 1 << 30, 10 << 30):
        for interval in (0.5, 10.0, 60.0):
            for max_batch in (64 << 10, 256 << 10, 1 << 20):
                n = per_node_batches(max_age=24 * 3600, max_bytes=max_bytes,
                                     max_batch=max_batch, interval=interval)
                assert n >= 1
                assert n * max_batch <= max(max_bytes // NODE_SHARE, max_batch)
    # a short retention: the window decides (with slack), not the bytes
    assert per_node_batches(max_age=600, max_bytes=1 << 30, max_batch=256 << 10,
                            interval=10) == 75


def test_f09_stream_config_is_bounded_per_subject():
    sc = metrics_stream_config(subjects=["barista.node.*.metrics"])
    assert sc.max_msg_size == codec.METRIC_BATCH_MAX == 256 * 1024
    assert sc.max_msgs_per_subject == 1024  # 1 GiB / 4 / 256 KiB
    assert sc.duplicate_window == 120


def _batch(points: int, size: int) -> MetricBatch:
    return MetricBatch(node_id="n", seq=7, ts=1, points=[
        MetricPoint(measurement="m", fields={"s": "x" * size}, tags={"i": str(i)})
        for i in range(points)])


def test_f09_agent_splits_a_batch_over_the_cap_and_loses_nothing():
    batch = _batch(400, 2000)  # ~800 kB encoded
    assert len(codec.encode(batch)) > codec.METRIC_BATCH_MAX
    parts, lost = fit_batch(batch, codec.METRIC_BATCH_MAX)
    assert lost == 0 and len(parts) > 1
    assert all(len(p) <= codec.METRIC_BATCH_MAX for p in parts)
    decoded = [codec.decode(p, MetricBatch) for p in parts]
    assert [pt.tags["i"] for b in decoded for pt in b.points] == [str(i) for i in range(400)]
    assert all(b.seq == 7 and b.node_id == "n" for b in decoded)
    small = _batch(3, 10)
    assert fit_batch(small, codec.METRIC_BATCH_MAX) == ([codec.encode(small)], 0)


def test_f09_a_point_that_cannot_fit_is_dropped_and_counted():
    batch = _batch(4, 10)
    batch.points.append(MetricPoint(measurement="huge", fields={"s": "x" * 300_000}))
    parts, lost = fit_batch(batch, codec.METRIC_BATCH_MAX)
    assert lost == 1
    kept = [pt.measurement for p in parts for pt in codec.decode(p, MetricBatch).points]
    assert kept == ["m"] * 4


# -- finding 11 --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": NaN}', "Infinity", "{"])
def test_f11_strict_json_is_bad_request(text: str):
    with pytest.raises(BadRequest, match="not valid JSON"):
        loads(text)
    assert loads('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
