"""Line protocol through real InfluxDB 1.x and real VictoriaMetrics, read back.

A property test generates names, tag values and field values of every kind (spaces,
commas, equals signs, quotes, backslashes, newlines, control characters, unicode, empty
strings, int64 bounds, non-finite floats), encodes them with the ingest encoder, writes
them to both stores and reads them back. What comes back must be what was sent, or what
the documented rules (infra/influxdb/README.md) turn it into, with each change counted in
the encoder's counts: `expected()` below is those rules written out a second time,
independently of controller/ingest/lineproto.py.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from controller.ingest.lineproto import LineCounts, LineEncoder
from controller.ingest.sinks import InfluxV1Sink, InfluxV2Sink
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import MetricBatch, MetricPoint
from tests.fixtures.influx import InfluxDB1, Victoria
from tests.fixtures.wait import wait_for_blocking

pytestmark = pytest.mark.influx

R = "\ufffd"
# VictoriaMetrics keeps samples within its retention only: stay near now.
BASE_MS = (time.time_ns() // 1_000_000 // 1000) * 1000


# --- the documented rules, written out independently --------------------------------


def _control(ch: str) -> bool:
    return ord(ch) < 32 or ch == "\x7f"


def expect_name(
    text: str, *, measurement: bool = False, key: bool = False
) -> tuple[str, int]:
    """A name as the stores must show it, and 1 if it had to change. ``key``: a field
    key, where a quote breaks VictoriaMetrics' parser; there and in a measurement,
    InfluxDB 1.x also unescapes a backslash-quote."""
    conflicts = "\\ ,=\"" if key or measurement else "\\ ,="
    out = []
    for i, ch in enumerate(text):
        after = text[i + 1] if i + 1 < len(text) else ""
        if ch == "\\" and (after == "" or after in conflicts):
            out.append(R)  # no encoding both stores read alike
        elif _control(ch):
            out.append(R)  # no encoding of a control character in a name
        elif ch == '"' and key:
            out.append(R)  # no encoding of a quote in a field key
        else:
            out.append(ch)
    if measurement and out and out[0] == "#":
        out[0] = R  # a leading '#' is a comment
    result = "".join(out)
    return result, int(result != text)


def expect_string(text: str, *, raw_newlines: bool) -> tuple[str, int]:
    keep = "\t\r\n" if raw_newlines else "\t\r"
    result = "".join(R if _control(ch) and ch not in keep else ch for ch in text)
    return result, int(result != text)


@dataclass
class Expected:
    measurement: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    counts: LineCounts = field(default_factory=LineCounts)


def expected(point: MetricPoint, node: str, *, raw_newlines: bool) -> Expected:
    out = Expected()
    name, name_changed = expect_name(point.measurement, measurement=True)
    if not name:
        out.counts.dropped_points = 1
        return out
    counts = LineCounts(replaced=name_changed)
    tags: dict[str, str] = {}
    for key, value in sorted(point.tags.items()):
        if not value:
            continue  # an empty tag is an absent tag, on both stores
        k, k_changed = expect_name(key)
        v, v_changed = expect_name(value)
        if not k or k in ("time", "__name__", "node") or k in tags:
            counts.dropped_tags += 1
            continue
        tags[k] = v
        counts.replaced += k_changed + v_changed
    fields: dict[str, Any] = {}
    dropped_fields = 0
    for key, fvalue in point.fields.items():
        k, k_changed = expect_name(key, key=True)
        if not k or k == "time" or k in fields:
            dropped_fields += 1
            continue
        if isinstance(fvalue, float) and not math.isfinite(fvalue):
            dropped_fields += 1
            continue
        if isinstance(fvalue, str):
            fvalue, s_changed = expect_string(fvalue, raw_newlines=raw_newlines)
            k_changed += s_changed
        fields[k] = fvalue
        counts.replaced += k_changed
    if not fields:
        out.counts = LineCounts(dropped_fields=dropped_fields, dropped_points=1)
        return out
    counts.dropped_fields = dropped_fields
    tags["node"] = node
    out.measurement, out.tags, out.fields, out.counts = name, tags, fields, counts
    return out


# --- the stores ----------------------------------------------------------------------


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        with exc:
            raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def influx_create(influx: InfluxDB1, db: str) -> None:
    body = urllib.parse.urlencode({"q": f'CREATE DATABASE "{db}"'}).encode()
    with urllib.request.urlopen(f"{influx.url}/query", data=body, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert "error" not in answer["results"][0], answer


def influx_read(influx: InfluxDB1, db: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(measurement, tags, fields) of every point in ``db``."""
    rows = []
    for series in influx.query('SELECT *::field FROM /.*/ GROUP BY *', db):
        columns = series["columns"]
        for values in series["values"]:
            fields = {c: v for c, v in zip(columns[1:], values[1:], strict=True) if v is not None}
            tags = {k: v for k, v in (series.get("tags") or {}).items() if v != ""}
            rows.append((series["name"], tags, fields))
    return rows


def vm_read(vm: Victoria, node: str) -> dict[str, tuple[dict[str, str], float]]:
    """metric name -> (labels without __name__ and db, value) of the series of ``node``."""
    selector = f'{{node="{node}"}}'
    out = {}
    for series in vm.export(selector, start=str(BASE_MS // 1000 - 3600)):
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        labels.pop("db", None)
        assert name not in out, f"two series named {name!r}"
        out[name] = (labels, float(series["values"][-1]))
    return out


# --- the strategies ------------------------------------------------------------------

_SPECIAL = [*" ,=\\\"'#\n\r\t\x00\x01\x1b\x7f", "\\ ", "\\,", "\\=", "\\\\", "é", "日", "😀"]
_chars = st.sampled_from(_SPECIAL) | st.characters(codec="utf-8", categories=["L", "N", "P", "S"])
_names = st.lists(_chars, max_size=6).map("".join)
_keys = st.sampled_from(["time", "", "k", "a b", "#x"]) | _names
_values = st.one_of(
    st.floats(),  # NaN and infinities included: dropped, counted
    st.sampled_from([0.0, -0.0, 1.5, 1e308, 5e-324, -1e-7]),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.sampled_from([-(1 << 63), (1 << 63) - 1, 0, -1]),
    st.booleans(),
    st.lists(_chars, max_size=8).map("".join),
)
_points = st.builds(
    MetricPoint,
    st.sampled_from(["cpu", "#cpu", "", "m m", "a,b"]) | _names,
    st.dictionaries(_keys, _values, max_size=4),
    # Tag keys "node" and "db" are the stores' own (the node tag, VictoriaMetrics' db
    # label): left out here, they are tested by the unit tests of the encoder.
    st.dictionaries(_keys.filter(lambda k: k not in ("node", "db")), _names, max_size=3),
)


@pytest.fixture
def stores(influxdb1: InfluxDB1, victoria: Victoria) -> Iterator[tuple[InfluxDB1, Victoria]]:
    yield influxdb1, victoria


_case = itertools.count()


@settings(
    max_examples=150,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each try costs two writes
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(point=_points, fast=st.booleans())
def test_every_input_round_trips_or_is_changed_by_a_counted_rule(
    stores: tuple[InfluxDB1, Victoria], point: MetricPoint, fast: bool
) -> None:
    influx, vm = stores
    case = next(_case)
    node, db = f"n{case}", f"db{case}"
    ts = (BASE_MS + case) * 1_000_000
    # Through the codec, as the ingest worker gets it; per-point ts takes the exact path.
    batch = MetricBatch(node_id=node, seq=case, ts=ts,
                        points=[point if fast else MetricPoint(point.measurement, point.fields,
                                                               point.tags, ts=ts)])
    batch = decode(encode(batch), MetricBatch)

    # InfluxDB 1.x: newlines in string fields written raw, as its sink says.
    v1 = LineEncoder(raw_newlines=InfluxV1Sink("http://x", "d").raw_newlines)
    lines = v1.encode(batch, node=node)
    want = expected(point, node, raw_newlines=True)
    assert v1.counts == want.counts, (lines, want)
    influx_create(influx, db)
    if lines:
        influx.write(db, lines)
    got = influx_read(influx, db)
    if not want.fields:
        assert got == []
    else:
        assert len(got) == 1, got
        name, tags, fields = got[0]
        assert (name, tags) == (want.measurement, want.tags), lines
        # Exact for ints, bools and strings; floats exact by value (InfluxDB's JSON writes
        # 5.283950991835329e16 as 52839509918353290, the same float).
        assert set(fields) == set(want.fields), lines
        for key, value in want.fields.items():
            got_value = float(fields[key]) if type(value) is float else fields[key]
            assert got_value == value and type(got_value) is type(value), (key, lines)

    # VictoriaMetrics (v2 write API): newlines in strings replaced, as its sink says.
    v2 = LineEncoder(
        raw_newlines=InfluxV2Sink("http://x", "t", "o", "b").raw_newlines  # False
    )
    lines = v2.encode(batch, node=node)
    want = expected(point, node, raw_newlines=False)
    assert v2.counts == want.counts, (lines, want)
    if lines:
        _post(f"{vm.url}/api/v2/write?bucket=b&org=o&precision=ns", lines)
    names = {f"{want.measurement}_{k}": v for k, v in want.fields.items()}
    series = vm_read(vm, node)
    if set(series) != set(names):
        # A just-written series can take a moment to be searchable, even after a flush.
        wait_for_blocking(lambda: set(vm_read(vm, node)) == set(names), 2, "VM series")
        series = vm_read(vm, node)
    assert set(series) == set(names), lines
    for name, value in names.items():
        labels, number = series[name]
        assert labels == want.tags, lines
        if isinstance(value, str):
            continue  # VictoriaMetrics keeps no strings (it stores a number parsed from one)
        # VictoriaMetrics stores float64 samples in a decimal form of about 12 significant
        # digits (and ints as floats): equal within that, not bit for bit.
        assert number == pytest.approx(float(value), rel=1e-11, abs=1e-300), (name, lines)


@pytest.mark.parametrize("ts", [(1 << 63) - 2, -((1 << 63) - 2), 1, -1])
def test_timestamps_at_influxdb_bounds_are_accepted(influxdb1: InfluxDB1, ts: int) -> None:
    batch = decode(encode(MetricBatch(node_id="n", seq=1, ts=ts,
                                      points=[MetricPoint("m", {"v": 1})])), MetricBatch)
    influxdb1.create_db("bounds")
    influxdb1.write("bounds", LineEncoder().encode(batch, node="n"))
    series = influxdb1.query('SELECT "v" FROM "m"', "bounds")
    assert ts in [row[0] for row in series[0]["values"]]


@pytest.mark.parametrize("ts", [(1 << 63) - 1, -((1 << 63) - 1), -(1 << 63), 1 << 63, 1 << 64])
def test_timestamps_influxdb_refuses_are_refused_at_decode(ts: int) -> None:
    point = MetricPoint("m", {"v": 1})
    for batch in (
        MetricBatch(node_id="n", seq=1, ts=ts, points=[point]),
        MetricBatch(node_id="n", seq=1, ts=1, points=[MetricPoint("m", {"v": 1}, ts=ts)]),
    ):
        try:
            data = encode(batch)
        except OverflowError:
            continue  # beyond uint64: not even encodable
        with pytest.raises(ProtocolError, match="ts"):
            decode(data, MetricBatch)


def test_a_tag_named_name_is_dropped_and_counted(victoria: Victoria) -> None:
    """VictoriaMetrics silently ignores a tag named __name__ (the series keeps its name
    and loses the tag): the encoder drops it itself, counted, on every sink."""
    batch = MetricBatch(node_id="n", seq=1, ts=BASE_MS * 1_000_000,
                        points=[MetricPoint("m", {"v": 1}, {"__name__": "evil", "k": "x"})])
    enc = LineEncoder()
    lines = enc.encode(batch, node="vmname")
    assert b"evil" not in lines and enc.counts.dropped_tags == 1
    _post(f"{victoria.url}/api/v2/write?bucket=b&org=o&precision=ns", lines)
    assert vm_read(victoria, "vmname") == {"m_v": ({"node": "vmname", "k": "x"}, 1.0)}
    raw = b"m,__name__=evil,node=raw v=1 " + str(BASE_MS * 1_000_000).encode() + b"\n"
    _post(f"{victoria.url}/api/v2/write?bucket=b&org=o&precision=ns", raw)
    assert vm_read(victoria, "raw") == {"m_v": ({"node": "raw"}, 1.0)}  # VM's own silence
