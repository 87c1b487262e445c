"""MetricBatch -> line protocol: escaping, value types, dropped values, tag merging."""

from __future__ import annotations

import math

import pytest

from controller.ingest.lineproto import (
    LineEncoder,
    batch_to_lines,
    escape_field_string,
    escape_measurement,
    escape_tag,
)
from protocol.messages import MetricBatch, MetricPoint

TS = 1_700_000_000_000_000_000


def one(points: list[MetricPoint], tags: dict[str, str] | None = None, **kw: object) -> list[str]:
    batch = MetricBatch(node_id="n1", seq=1, ts=TS, points=points, tags=tags or {})
    return batch_to_lines(batch, **kw).decode().splitlines()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("func", "raw", "escaped"),
    [
        (escape_measurement, "cpu", "cpu"),
        (escape_measurement, "my cpu,x", "my\\ cpu\\,x"),
        (escape_measurement, "a=b", "a=b"),  # '=' is legal in a measurement
        (escape_tag, "eth 0,x=y", "eth\\ 0\\,x\\=y"),
        (escape_tag, "C:\\", "C:"),  # a trailing backslash would escape the separator
        (escape_tag, "a\nb", "a\\nb"),
        (escape_field_string, 'say "hi" \\o/', 'say \\"hi\\" \\\\o/'),
    ],
)
def test_escaping(func: object, raw: str, escaped: str) -> None:
    assert func(raw) == escaped  # type: ignore[operator]


def test_value_types_and_timestamp() -> None:
    [line] = one(
        [MetricPoint("m", {"f": 1.5, "i": 3, "b": True, "nb": False, "s": "x", "big": 1 << 70})]
    )
    assert line == f'm,node=n1 f=1.5,i=3i,b=true,nb=false,s="x",big={float(1 << 70)!r} {TS}'


def test_nan_and_inf_are_dropped_and_empty_points_too() -> None:
    lines = one(
        [
            MetricPoint("m", {"ok": 1.0, "nan": math.nan, "inf": math.inf}),
            MetricPoint("gone", {"nan": math.nan, "minf": -math.inf}),
            MetricPoint("", {"v": 1}),  # no measurement name: not writable
        ]
    )
    assert lines == [f"m,node=n1 ok=1.0 {TS}"]


def test_tags_merged_sorted_and_escaped() -> None:
    [line] = one(
        [MetricPoint("net", {"v": 1}, {"interface": "eth 0", "empty": ""}, ts=TS + 5)],
        tags={"zone": "z1", "region": "r1", "provider": "aws"},
    )
    assert line == f"net,interface=eth\\ 0,node=n1,provider=aws,region=r1,zone=z1 v=1i {TS + 5}"


def test_subject_node_wins_over_claimed_node_and_extra_tags_win_over_all() -> None:
    batch = MetricBatch(
        node_id="n1",
        seq=1,
        ts=TS,
        points=[MetricPoint("m", {"v": 1}, {"node": "p", "infra": "i0"})],
        tags={"node": "spoofed", "infra": "i1"},
    )
    enc = LineEncoder(extra_tags={"infra": "i2"})
    assert enc.encode(batch, node="real").decode() == f"m,infra=i2,node=real v=1i {TS}\n"
    # without a subject node, the batch's own node tag is kept
    assert batch_to_lines(batch).decode() == f"m,infra=i1,node=spoofed v=1i {TS}\n"


def test_batch_without_ts_lets_the_server_stamp() -> None:
    batch = MetricBatch(node_id="n1", seq=1, ts=0, points=[MetricPoint("m", {"v": 2.0})])
    assert batch_to_lines(batch) == b"m,node=n1 v=2.0\n"


def test_cache_gives_same_output_and_stays_bounded() -> None:
    enc = LineEncoder(max_cache=4)
    for i in range(20):
        batch = MetricBatch(
            node_id=f"n{i}", seq=i, ts=TS, points=[MetricPoint("m", {"v": i}, {"k": str(i)})]
        )
        expected = f"m,k={i},node=n{i} v={i}i {TS}\n".encode()
        assert enc.encode(batch) == expected
        assert enc.encode(batch) == expected  # from the cache
    assert len(enc._series) <= 4 and len(enc._tagsets) <= 4


def test_empty_batch_is_empty_bytes() -> None:
    assert batch_to_lines(MetricBatch(node_id="n1", seq=1, ts=TS, points=[])) == b""
