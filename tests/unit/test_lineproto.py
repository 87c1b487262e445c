"""MetricBatch -> line protocol: escaping, value types, dropped values, tag merging, and the
fast (shape plan) path giving exactly the bytes of the exact path."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.ingest.lineproto import (
    LineEncoder,
    batch_to_lines,
    escape_field_string,
    escape_measurement,
    escape_tag,
    format_float,
)
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import FieldValue, MetricBatch, MetricPoint

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
        # A trailing backslash would escape the separator: replaced (U+FFFD).
        (escape_tag, "C:\\", "C:\ufffd"),
        (escape_tag, "a\nb", "a\ufffdb"),  # no encoding of a newline in a name: replaced
        (escape_measurement, "#cpu", "\ufffdcpu"),  # a leading '#' makes a comment
        (escape_tag, "#cpu", "#cpu"),  # elsewhere it is harmless
        # A backslash before a final newline is kept (the newline is replaced): found by
        # the round trip through InfluxDB (a regex "$" also matches before a final "\n").
        (escape_tag, "a\\\n", "a\\\ufffd"),
        (escape_measurement, 'a\\"b', "a\ufffd\"b"),  # InfluxDB 1.x unescapes \" there
        (escape_field_string, 'say "hi" \\o/', 'say \\"hi\\" \\\\o/'),
    ],
)
def test_escaping(func: object, raw: str, escaped: str) -> None:
    assert func(raw) == escaped  # type: ignore[operator]


def test_value_types_and_timestamp() -> None:
    [line] = one(
        [MetricPoint("m", {"f": 1.5, "i": 3, "b": True, "nb": False, "s": "x", "big": 1 << 70})]
    )
    big = format_float(float(1 << 70))  # the protocol refuses such ints; code may not
    assert line == f'm,node=n1 f=1.5,i=3i,b=true,nb=false,s="x",big={big} {TS}'


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


def test_point_tags_come_before_the_common_tags_each_part_sorted() -> None:
    [line] = one(
        [MetricPoint("disk", {"v": 1}, {"path": "/", "device": "sda1"})],
        tags={"zone": "z1", "group": "g1"},
    )
    assert line == f"disk,device=sda1,path=/,group=g1,node=n1,zone=z1 v=1i {TS}"


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
    assert len(enc._series) <= 4 and len(enc._commons) <= 4


def test_empty_batch_is_empty_bytes() -> None:
    assert batch_to_lines(MetricBatch(node_id="n1", seq=1, ts=TS, points=[])) == b""


# --- the fast path -------------------------------------------------------------------


def _exact(batch: MetricBatch, node: str | None = None) -> bytes:
    enc = LineEncoder()
    return enc._encode_exact(batch, enc._common(batch, node))


def server_batch(seq: int, node: str = "n1") -> MetricBatch:
    points = [
        MetricPoint("mem", {"total": 8 << 30, "used_percent": 12.5 + seq, "cached": 1 << 20}),
        MetricPoint("system", {"load1": 0.25 * seq, "n_cpus": 4, "uptime": 3600 + seq}),
        *(
            MetricPoint(
                "cpu", {"usage_user": 1 / (seq + i + 1), "usage_idle": 99.0 - i}, {"cpu": f"cpu{i}"}
            )
            for i in range(4)
        ),
        MetricPoint(
            "net", {"bytes_recv": 10**12 + seq, "err_in": 0, "up": True}, {"interface": "eth0"}
        ),
        MetricPoint("tiny", {"v": 1e-7, "w": 1e22, "x": -0.0, "y": 5e-324}),
    ]
    return MetricBatch(
        node_id=node,
        seq=seq,
        ts=TS + seq,
        points=points,
        tags={"infra": "i1", "provider": "aws", "region": "eu-west-1"},
    )


def test_fast_path_gives_the_exact_bytes_and_is_taken_for_repeated_shapes() -> None:
    enc = LineEncoder()
    for seq in range(5):
        batch = decode(encode(server_batch(seq)), MetricBatch)  # as the worker sees it
        assert enc.encode(batch, node="n1") == _exact(batch, "n1")
    assert enc.fast_batches == 5 and enc.exact_batches == 0
    first = enc.encode(server_batch(0), node="n1").decode().splitlines()[0]
    assert first == (
        f"mem,infra=i1,node=n1,provider=aws,region=eu-west-1 "
        f"total={8 << 30}i,used_percent=12.5,cached={1 << 20}i {TS}"
    )


def test_one_plan_serves_every_node_with_the_same_shape() -> None:
    enc = LineEncoder()
    for n in range(20):
        batch = server_batch(n, node=f"node-{n}")
        assert enc.encode(batch, node=f"node-{n}") == _exact(batch, f"node-{n}")
    assert len(enc._shapes) == 1


@pytest.mark.parametrize(
    "point",
    [
        MetricPoint("m", {"ok": 1.0, "bad": math.nan}),  # NaN: dropped by the exact path
        MetricPoint("m", {"ok": 1.0, "bad": -math.inf}),
        MetricPoint("m", {"s": 'quote " and, comma'}),  # strings: exact path
    ],
)
def test_batches_the_fast_path_cannot_take_fall_back_to_the_exact_one(
    point: MetricPoint,
) -> None:
    batch = MetricBatch(node_id="n1", seq=1, ts=TS, points=[server_batch(1).points[0], point])
    enc = LineEncoder()
    assert enc.encode(batch) == _exact(batch)
    assert enc.exact_batches == 1 and enc.fast_batches == 0


def test_escaped_names_and_dropped_points_on_the_fast_path() -> None:
    batch = MetricBatch(
        node_id="n1",
        seq=1,
        ts=TS,
        points=[
            MetricPoint("", {"v": 1}),  # not writable
            MetricPoint("my net", {"bytes, in": 5, "": 1.5}, {"if": "eth 0,x", "node": "no"}),
            MetricPoint("empty", {}),
            MetricPoint("m", {"v": 2.5}),
        ],
        tags={"region": "us=1"},
    )
    enc = LineEncoder()
    out = enc.encode(batch)
    assert enc.fast_batches == 1
    assert out == _exact(batch)
    assert out.decode().splitlines() == [
        f"my\\ net,if=eth\\ 0\\,x,node=n1,region=us\\=1 bytes\\,\\ in=5i {TS}",
        f"m,node=n1,region=us\\=1 v=2.5 {TS}",
    ]
    # Two points dropped (no name; no field), the empty field key and the point's own
    # "node" tag (the node's wins) dropped: all counted, the same on both paths.
    assert enc.counts.as_dict() == {
        "replaced": 0, "dropped_tags": 1, "dropped_fields": 1, "dropped_points": 2,
    }  # fmt: skip
    again = LineEncoder()
    again._encode_exact(batch, again._common(batch, None))
    assert again.counts == enc.counts


def test_a_shape_change_makes_a_new_plan() -> None:
    enc = LineEncoder()
    batch = server_batch(1)
    enc.encode(batch)
    changed = server_batch(2)
    changed.points[0].fields["used_percent"] = 12  # int now: a different shape
    assert enc.encode(changed) == _exact(changed)
    assert b"used_percent=12i" in enc.encode(changed)
    assert len(enc._shapes) == 2 and enc.fast_batches == 3


def test_shape_cache_stays_bounded() -> None:
    enc = LineEncoder(max_shapes=3)
    for i in range(10):
        batch = MetricBatch(node_id="n1", seq=i, ts=TS, points=[MetricPoint(f"m{i}", {"v": i})])
        assert enc.encode(batch) == f"m{i},node=n1 v={i}i {TS}\n".encode()
    assert len(enc._shapes) <= 3


def test_an_int_outside_int64_makes_the_batch_malformed() -> None:
    batch = MetricBatch(node_id="n1", seq=1, ts=TS, points=[MetricPoint("m", {"v": 1 << 63})])
    with pytest.raises(ProtocolError):
        decode(encode(batch), MetricBatch)


_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # mostly what the fast path takes
    st.floats(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.booleans(),
    st.text(max_size=4),
)
_points = st.builds(
    MetricPoint,
    st.sampled_from(["cpu", "mem", "m m", "", "a,b"]) | _names,
    st.dictionaries(
        st.sampled_from(["v", "w", "x y", "", "\\", "z="]) | _names, _values, max_size=4
    ),
    st.dictionaries(st.sampled_from(["cpu", "node", "path", ""]) | _names, _names, max_size=3),
)


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    points=st.lists(_points, max_size=6),
    tags=st.dictionaries(st.sampled_from(["infra", "zone", "cpu", "node"]), _names, max_size=3),
    ts=st.sampled_from([TS, 0, 1]),
)
def test_fast_and_exact_paths_agree_on_anything(
    points: list[MetricPoint], tags: dict[str, str], ts: int
) -> None:
    batch = MetricBatch(node_id="n1", seq=1, ts=ts, points=points, tags=tags)
    enc = LineEncoder()
    exact = LineEncoder()
    expected = exact._encode_exact(batch, exact._common(batch, "n1"))
    assert enc.encode(batch, node="n1") == expected
    assert enc.encode(batch, node="n1") == expected  # again, through the cached plan
    # The same changes counted too, whichever path wrote the batch.
    exact._encode_exact(batch, exact._common(batch, "n1"))
    assert enc.counts == exact.counts


def test_tag_keys_that_escape_alike_give_one_answer_in_any_order() -> None:
    """A node's tags are recognised by dict equality (order ignored), so which of two
    colliding keys wins must not depend on their order either (review finding)."""
    enc = LineEncoder()
    first = MetricBatch(
        node_id="n1", seq=1, ts=TS, points=[MetricPoint("m", {"v": 1}, {"k": "1", "k\\": "2"})]
    )
    second = MetricBatch(
        node_id="n1", seq=2, ts=TS, points=[MetricPoint("m", {"v": 1}, {"k\\": "2", "k": "1"})]
    )
    assert enc.encode(first, node="n1") == _exact(first, "n1")
    assert enc.encode(second, node="n1") == _exact(second, "n1") == _exact(first, "n1")


@pytest.mark.parametrize(
    ("tags", "fields", "line"),
    [
        # A backslash before an escaped character, another backslash or the end has
        # no encoding InfluxDB 1.x and VictoriaMetrics read alike: replaced, so that
        # "x\,evil\=1" stays one tag value on both (VM would read "x\\,evil\\=1" as two).
        ({"host": "x\\,evil\\=1"}, {"v": 1}, "m,host=x\ufffd\\,evil\ufffd\\=1,node=n1 v=1i"),
        ({}, {"usage\\=5\\,g": 1.0}, "m,node=n1 usage\ufffd\\=5\ufffd\\,g=1.0"),
        ({"path": "C:\\\\"}, {"v": 1}, "m,path=C:\ufffd\ufffd,node=n1 v=1i"),
        ({"t": "a\tb\\ c"}, {"v": 1}, "m,t=a\ufffdb\ufffd\\ c,node=n1 v=1i"),
        ({"t": "a\\b"}, {"v": 1}, "m,t=a\\b,node=n1 v=1i"),  # harmless backslash kept
    ],
)
def test_backslashes_cannot_change_the_structure_of_a_line(
    tags: dict[str, str], fields: dict[str, FieldValue], line: str
) -> None:
    batch = MetricBatch(node_id="n1", seq=1, ts=TS, points=[MetricPoint("m", fields, tags)])
    assert LineEncoder().encode(batch, node="n1") == f"{line} {TS}\n".encode()
    assert _exact(batch, "n1") == f"{line} {TS}\n".encode()


def test_caches_are_bounded_in_bytes_and_skip_huge_names() -> None:
    enc = LineEncoder(max_cache_bytes=20_000)
    for i in range(200):  # one node sending new batch tags every time
        batch = MetricBatch(
            node_id="n1",
            seq=i,
            ts=TS,
            points=[MetricPoint("m", {"v": i}, {"d": "x" * 100})],
            tags={"t": f"{i}-" + "y" * 300},
        )
        assert enc.encode(batch, node="n1") == _exact(batch, "n1")
        assert enc._cache_bytes <= 20_000
    huge = MetricBatch(
        node_id="n1", seq=1, ts=TS, points=[MetricPoint("m", {"v": 1})], tags={"t": "z" * 100_000}
    )
    enc = LineEncoder()
    assert enc.encode(huge, node="n1") == _exact(huge, "n1")
    assert not enc._commons and enc._cache_bytes < 100  # only the tiny series "m"


def test_plans_are_bounded_in_bytes_and_a_giant_shape_is_not_planned() -> None:
    enc = LineEncoder(max_plan_bytes=100_000)
    for i in range(30):  # 30 shapes of ~20 kB each
        batch = MetricBatch(
            node_id="n1",
            seq=i,
            ts=TS,
            points=[MetricPoint("m", {f"f{j}": float(j) for j in range(200 + i)})],
        )
        assert enc.encode(batch, node="n1") == _exact(batch, "n1")
        assert enc._plan_bytes <= 100_000
    assert enc.fast_batches == 30
    giant = MetricBatch(
        node_id="n1",
        seq=1,
        ts=TS,
        points=[MetricPoint("m", {c * 1_000_000: 1.0 for c in "abcde"})],
    )
    enc = LineEncoder()
    assert enc.encode(giant, node="n1") == _exact(giant, "n1")
    assert enc.exact_batches == 1 and not enc._shapes
