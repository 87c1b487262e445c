"""Ingest end to end: real nats-server (JetStream) -> IngestWorker -> real InfluxDB 1.x or
VictoriaMetrics (v2 write API): delivery, outage without loss, malformed input, sharing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from controller.ingest.errors import SinkConfigError, SinkError
from controller.ingest.sinks import (
    InfluxV1Sink,
    InfluxV2Sink,
    SinkConfig,
    classify_status,
    make_sink,
)
from controller.ingest.worker import IngestWorker
from controller.nats.server import NatsServer
from controller.state.streams import ensure_stream, metrics_stream_config
from protocol.codec import encode
from protocol.messages import FieldValue, Heartbeat, MetricBatch, MetricPoint
from protocol.subjects import Subjects
from tests.fixtures.influx import InfluxDB1, Victoria
from tests.fixtures.wait import wait_for

DB = "barista"
BASE_TS = 1_700_000_000_000_000_000
SUBJECTS = Subjects()
FAST = {"retry_backoff": (0.05, 0.3), "max_wait": 0.2}


def batch(node: str, seq: int) -> MetricBatch:
    """4 points (2 cpu, 1 mem, 1 net) with distinct timestamps per (node, seq)."""
    return MetricBatch(
        node_id=node,
        seq=seq,
        ts=BASE_TS + seq * 1_000_000_000,
        tags={"infra": "inf-1", "provider": "aws", "region": "us-east-1", "zone": "us-east-1a"},
        points=[
            MetricPoint("cpu", {"usage_active": 10.0 + seq, "usage_idle": 90.0}, {"cpu": "cpu0"}),
            MetricPoint("cpu", {"usage_active": 20.0 + seq}, {"cpu": "cpu-total"}),
            MetricPoint("mem", {"used_percent": 42.5, "total": 8 << 30, "ok": True}),
            # a tag value that needs escaping, and a string field with quotes
            MetricPoint(
                "net", {"bytes_recv": seq, "note": 'say "hi"\\'}, {"interface": "eth 0,x=y"}
            ),
        ],
    )


POINTS_PER_BATCH = 4


# A worker's stats are counters, not events: tests poll them (tests/fixtures/wait.py).
WITHIN = 20.0


async def settled(js: JetStreamContext, within: float = 10.0) -> ConsumerInfo:
    """Consumer info once every delivered message is acked or terminated (acks are
    published asynchronously, possibly on another connection)."""

    async def info_if_settled() -> ConsumerInfo | None:
        info: ConsumerInfo = await js.consumer_info("METRICS", "ingest")
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None

    info = await wait_for(info_if_settled, within, "the ingest consumer to settle",
                          interval=0.02)
    assert info is not None
    return info


@pytest.fixture
async def js(nats_server_noauth: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server_noauth.url)
    try:
        jsc = nc.jetstream()
        await ensure_stream(jsc, metrics_stream_config(subjects=SUBJECTS.stream_subjects_metrics))
        yield jsc
    finally:
        await nc.close()


async def publish(js: JetStreamContext, node: str, seqs: range) -> None:
    for seq in seqs:
        await js.publish(SUBJECTS.metrics(node), encode(batch(node, seq)))


@pytest.fixture
async def influx_sink(influxdb1: InfluxDB1) -> AsyncIterator[InfluxV1Sink]:
    influxdb1.create_db(DB)
    sink = InfluxV1Sink(influxdb1.url, DB)
    try:
        yield sink
    finally:
        await sink.close()


@pytest.mark.influx
async def test_points_arrive_in_influxdb1(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    await publish(js, "n1", range(10))
    await publish(js, "n2", range(5))
    async with IngestWorker(js=js, sink=influx_sink, **FAST) as worker:  # type: ignore[arg-type]
        await wait_for(lambda: worker.stats.batches == 15, WITHIN, what="15 batches")
        assert worker.stats.points == 15 * POINTS_PER_BATCH
        assert worker.status()["running"] is True

    assert influxdb1.count("cpu", "usage_active", DB, "WHERE node = 'n1'") == 20
    assert influxdb1.count("cpu", "usage_active", DB, "WHERE node = 'n2'") == 10
    rows = influxdb1.query(
        "SELECT usage_active, cpu, node, infra, provider, region, zone FROM cpu "
        "WHERE node = 'n1' AND cpu = 'cpu0' ORDER BY time LIMIT 1",
        DB,
    )
    assert rows[0]["values"][0] == [
        BASE_TS,
        10.0,
        "cpu0",
        "n1",
        "inf-1",
        "aws",
        "us-east-1",
        "us-east-1a",
    ]
    mem = influxdb1.query("SELECT total, ok, used_percent FROM mem WHERE node = 'n2' LIMIT 1", DB)
    assert mem[0]["values"][0][1:] == [8 << 30, True, 42.5]
    net = influxdb1.query("SELECT bytes_recv, note, interface FROM net WHERE node = 'n1'", DB)
    values = net[0]["values"]
    assert len(values) == 10
    assert values[3][1:] == [3, 'say "hi"\\', "eth 0,x=y"]


@pytest.mark.influx
async def test_fast_path_values_read_back_exactly(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    """Numbers spelled by the fast path (msgspec's shortest repr: 1e-7, 1e22, 5e-324) and
    its tag order (point tags, then the node's) are what InfluxDB 1.x stores."""
    odd = [1e-7, 1e22, 5e-324, -0.0, 0.1 + 0.2, 1.7976931348623157e308, 123456789.125]
    for seq in range(3):
        fields: dict[str, FieldValue] = {
            f"f{i}": v * (seq + 1) if v < 1e300 else v for i, v in enumerate(odd)
        }
        fields |= {"i_max": (1 << 63) - 1, "i_min": -(1 << 63), "flag": seq % 2 == 0}
        b = MetricBatch(
            node_id="n1",
            seq=seq,
            ts=BASE_TS + seq,
            tags={"zone": "z", "infra": "i"},
            points=[MetricPoint("odd", fields, {"device": "sda", "path": "/"})],
        )
        await js.publish(SUBJECTS.metrics("n1"), encode(b))
    async with IngestWorker(js=js, sink=influx_sink, **FAST) as worker:  # type: ignore[arg-type]
        await wait_for(lambda: worker.stats.batches == 3, WITHIN, what="3 batches")
        assert worker.encoder.fast_batches == 3 and worker.encoder.exact_batches == 0
    cols = [f"f{i}" for i in range(len(odd))] + ["i_max", "i_min", "flag", "device", "node"]
    rows = influxdb1.query(f"SELECT {', '.join(cols)} FROM odd ORDER BY time", DB)
    values = rows[0]["values"]
    assert len(values) == 3
    for seq, row in enumerate(values):
        assert row[0] == BASE_TS + seq
        assert row[1 : len(odd) + 1] == [v * (seq + 1) if v < 1e300 else v for v in odd]
        assert row[len(odd) + 1 :] == [(1 << 63) - 1, -(1 << 63), seq % 2 == 0, "sda", "n1"]


@pytest.mark.influx
async def test_v2_sink_into_victoria(js: JetStreamContext, victoria: Victoria) -> None:
    sink = make_sink(
        SinkConfig(kind="influx2", url=victoria.url, token="t", org="o", bucket="metrics")
    )
    assert isinstance(sink, InfluxV2Sink)
    try:
        assert await sink.ping()
        await publish(js, "n1", range(6))
        async with IngestWorker(js=js, sink=sink, **FAST) as worker:  # type: ignore[arg-type]
            await wait_for(lambda: worker.stats.batches == 6, WITHIN, what="6 batches")
    finally:
        await sink.close()

    series = victoria.export('{__name__="cpu_usage_active"}')
    by_cpu = {s["metric"]["cpu"]: s for s in series}
    assert set(by_cpu) == {"cpu0", "cpu-total"}
    cpu0 = by_cpu["cpu0"]
    assert cpu0["metric"]["node"] == "n1" and cpu0["metric"]["region"] == "us-east-1"
    assert cpu0["values"] == [10.0 + s for s in range(6)]
    assert cpu0["timestamps"] == [(BASE_TS + s * 1_000_000_000) // 1_000_000 for s in range(6)]
    net = victoria.export('{__name__="net_bytes_recv"}')
    assert net[0]["metric"]["interface"] == "eth 0,x=y"


@pytest.mark.influx
async def test_outage_loses_nothing(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    async with IngestWorker(js=js, sink=influx_sink, **FAST) as worker:  # type: ignore[arg-type]
        await publish(js, "n1", range(5))
        await wait_for(lambda: worker.stats.batches == 5, WITHIN, what="first 5 batches")

        influxdb1.stop()
        await publish(js, "n1", range(5, 25))
        await wait_for(lambda: worker.stats.write_errors >= 3, WITHIN, what="write errors")
        assert worker.status()["backing_off"] is True
        info = await js.consumer_info("METRICS", "ingest")
        assert info.num_ack_pending + info.num_pending == 20  # nothing of it was acked
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 5
        assert worker.stats.batches == 5

        influxdb1.start()
        await wait_for(lambda: worker.stats.batches == 25, WITHIN, what="backlog drained")
        info = await settled(js)
        # held and retried by the same worker, not handed round by redelivery
        assert info.num_redelivered == 0

    assert influxdb1.count("cpu", "usage_active", DB) == 25 * 2
    assert influxdb1.count("net", "bytes_recv", DB) == 25
    assert worker.stats.rejected == 0 and worker.stats.malformed == 0


@pytest.mark.influx
async def test_malformed_is_dropped_and_does_not_block(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    await js.publish(SUBJECTS.metrics("bad"), b"\x00garbage")
    await js.publish(SUBJECTS.metrics("bad"), encode(Heartbeat(node_id="bad", seq=1, ts=1.0)))
    await publish(js, "n1", range(5))
    async with IngestWorker(js=js, sink=influx_sink, **FAST) as worker:  # type: ignore[arg-type]
        await wait_for(lambda: worker.stats.batches == 5, WITHIN, what="good batches")
        assert worker.stats.malformed == 2
        info = await settled(js)
        assert info.num_redelivered == 0
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 7
    assert influxdb1.count("cpu", "usage_active", DB) == 10


@pytest.mark.influx
async def test_refused_batch_is_terminated_and_the_rest_written(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    # "note" is a string field in every good batch; an int here is a type conflict (400)
    bad = batch("n1", 99)
    bad.points[3].fields["note"] = 7
    await publish(js, "n1", range(3))
    await js.publish(SUBJECTS.metrics("n1"), encode(bad))
    await publish(js, "n1", range(3, 6))
    async with IngestWorker(
        js=js,
        sink=influx_sink,
        batch_lines=100_000,
        **FAST,  # type: ignore[arg-type]
    ) as worker:
        await wait_for(
            lambda: worker.stats.batches + worker.stats.rejected == 7, WITHIN, what="all 7"
        )
        assert worker.stats.rejected == 1
        assert "field type conflict" in (worker.stats.last_error or "")
        info = await settled(js)
        assert info.num_redelivered == 0
    assert influxdb1.count("net", "bytes_recv", DB) == 6


@pytest.mark.influx
async def test_two_workers_share_the_durable(
    nats_server_noauth: NatsServer,
    js: JetStreamContext,
    influxdb1: InfluxDB1,
    influx_sink: InfluxV1Sink,
) -> None:
    nc2: NATS = await nats.connect(nats_server_noauth.url)
    sink2 = InfluxV1Sink(influxdb1.url, DB)
    opts = {"fetch_batch": 4, "batch_lines": 16, **FAST}
    try:
        async with (
            IngestWorker(js=js, sink=influx_sink, name="w1", **opts) as w1,  # type: ignore[arg-type]
            IngestWorker(js=nc2.jetstream(), sink=sink2, name="w2", **opts) as w2,  # type: ignore[arg-type]
        ):
            await publish(js, "n1", range(100))
            await publish(js, "n2", range(100))
            await wait_for(lambda: w1.stats.batches + w2.stats.batches >= 200, WITHIN, what="200")
            assert w1.stats.batches > 0 and w2.stats.batches > 0, (w1.stats, w2.stats)
            assert w1.stats.batches + w2.stats.batches == 200
            info = await settled(js)
            assert info.num_redelivered == 0
    finally:
        await sink2.close()
        await nc2.close()
    assert influxdb1.count("cpu", "usage_active", DB) == 200 * 2
    assert influxdb1.count("mem", "used_percent", DB) == 200


async def test_ensure_metrics_stream_is_idempotent(js: JetStreamContext) -> None:
    await ensure_stream(js, metrics_stream_config(
        subjects=SUBJECTS.stream_subjects_metrics, max_age=3600, max_bytes=1 << 20
    ))
    info = await js.stream_info("METRICS")
    assert info.config.max_age == 3600 and info.config.max_bytes == 1 << 20
    assert info.config.subjects == SUBJECTS.stream_subjects_metrics


async def test_unreachable_sink_is_retryable() -> None:
    from controller.nats.server import free_port

    sink = InfluxV1Sink(f"http://127.0.0.1:{free_port()}", DB, user="u", password="s3cret")
    try:
        assert await sink.ping() is False
        with pytest.raises(SinkError) as err:
            await sink.write(b"cpu v=1 1\n", points=1)
        assert err.value.retryable and err.value.status is None
        assert "s3cret" not in str(err.value)
    finally:
        await sink.close()


@pytest.mark.parametrize(
    ("status", "retryable", "auth"),
    [
        (400, False, False),
        (413, False, False),
        (401, True, True),
        (403, True, True),
        (404, True, False),
        (429, True, False),
        (500, True, False),
        (503, True, False),
    ],
)
def test_status_classification(status: int, retryable: bool, auth: bool) -> None:
    err = classify_status(status, "body", what="sink")
    assert (err.retryable, err.auth, err.status) == (retryable, auth, status)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SinkConfig(kind="influx1", url="http://127.0.0.1:8086"), "database name"),
        (SinkConfig(kind="influx2", url="http://127.0.0.1:8086", org="o"), "token, bucket"),
        (SinkConfig(kind="influx1", url="127.0.0.1:8086", db="x"), "http(s)://"),
        (SinkConfig(kind="influx9", url="http://h:1", db="x"), "unknown sink kind"),  # type: ignore[arg-type]
        (SinkConfig(kind="influx1", url="http://h:1", db="x", password="p"), "without a user"),
    ],
)
def test_bad_sink_config(config: SinkConfig, message: str) -> None:
    with pytest.raises(SinkConfigError, match=re.escape(message)) as err:
        make_sink(config)
    assert isinstance(err.value, ValueError)


def test_sink_config_repr_hides_secrets() -> None:
    config = SinkConfig(kind="influx2", url="http://h:1", token="tok-123", org="o", bucket="b")
    assert "tok-123" not in repr(config)


@pytest.mark.influx
async def test_what_the_encoder_changes_is_counted_in_the_status(
    js: JetStreamContext, influxdb1: InfluxDB1, influx_sink: InfluxV1Sink
) -> None:
    """Points InfluxDB would drop or refuse without telling us are changed by the encoder,
    counted, and shown in the worker's and the service's status (`barista status`)."""
    odd = MetricBatch(
        node_id="n9", seq=1, ts=BASE_TS,
        points=[
            MetricPoint("#comment", {"v": 1}),  # renamed: its '#' becomes U+FFFD
            MetricPoint("m", {"time": 1, "v": 2, "nan": float("nan")}, {"time": "t"}),
            MetricPoint("m2", {"s": "two\nlines"}, {"path": "C:\\"}),
        ],
    )
    await js.publish(SUBJECTS.metrics("n9"), encode(odd))
    async with IngestWorker(js=js, sink=influx_sink, **FAST) as worker:  # type: ignore[arg-type]
        await wait_for(lambda: worker.stats.batches == 1, WITHIN, what="the batch")
        assert worker.status()["line_protocol"] == {
            "replaced": 2,  # "#comment", "C:\\"
            "dropped_tags": 1,  # tag key time
            "dropped_fields": 2,  # field key time, NaN
            "dropped_points": 0,
        }
    assert influxdb1.count("\ufffdcomment", "v", DB) == 1
    rows = influxdb1.query('SELECT "v", "time" FROM "m"', DB)
    assert rows[0]["values"][0][1] == 2
    # InfluxDB 1.x keeps a raw newline inside a quoted string field: it round-trips.
    rows = influxdb1.query('SELECT "s", "path" FROM "m2"', DB)
    assert rows[0]["values"][0][1:] == ["two\nlines", "C:\ufffd"]
