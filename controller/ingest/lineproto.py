"""MetricBatch -> InfluxDB line protocol, the hot path of ingest.

Two paths, one output. A fleet sends the same batch *shape* every interval (the same
points, tags, field names and value types; only the numbers move), so the encoder turns a
shape into a plan once and then formats a whole batch with a handful of C-level calls:

1. the batch's values, in order, go into one flat list;
2. an ``itemgetter`` built for the shape interleaves them with pre-rendered text pieces
   (``msgspec.Raw``: series keys, ``,field=``, `` ``/``i``, the timestamp, ``\\n``);
3. ``msgspec.json`` encodes that sequence: numbers get the shortest round-trip repr and
   booleans ``true``/``false``, the text pieces are copied verbatim; a non-finite float
   comes out as ``null``, which sends the batch down the exact path;
4. one ``bytes.translate`` deletes the JSON separators (text pieces carry their own commas
   as ``\\x01``, translated back in the same pass).

The exact path formats point by point and handles everything (strings, NaN, odd names).
Both produce the same bytes; tests/unit/test_lineproto.py holds them to it.

Series keys are ``measurement,<point tags sorted>,<common tags sorted>``: the common part
(node, infra, group, provider, region, zone) is per node and the rest is per shape, so the
caches stay small for big fleets. InfluxDB sorts tags itself; sorted input is only a hint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from math import isfinite
from operator import attrgetter, itemgetter
from typing import Any

import msgspec

from protocol.messages import MetricBatch

# str.translate tables: one C-level pass per string instead of chained replaces.
_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}
_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", **_CONTROL})
_TAG = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", **_CONTROL})
_FIELD_STR = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_MEASUREMENT_SPECIAL = frozenset(",\n\r\t\f \\")
_TAG_SPECIAL = frozenset(",=\n\r\t\f \\")
# A backslash before a character that gets escaped (or at the end) would be read with it:
# "a\\,b" must not become "a\\\\,b", which parsers disagree on (VictoriaMetrics splits the
# tag there, InfluxDB 3 refuses the line). Such backslashes are dropped: the name loses
# them but can never change the structure of the line.
_MEASUREMENT_DANGLING = re.compile(r"\\+(?=[, \n\r\t\f]|$)")
_TAG_DANGLING = re.compile(r"\\+(?=[,= \n\r\t\f]|$)")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Text pieces stand in "\x01" for their commas; the JSON array's own commas are deleted.
_COMMA_MARK = "\x01"
_FROM_JSON = bytes.maketrans(b"\x01", b",")
_JSON_NULL = b",null,"  # a value is always between two pieces, so always between commas

# The caches are bounded in entries and in bytes, against any input (a payload may be
# 1 MB of tag value). Past a bound every cache is dropped and rebuilt: churn is rare (new
# nodes, new disks), and a clear is cheaper than LRU bookkeeping per point. An entry whose
# text is longer than _MAX_CACHED_TEXT is not cached at all (no real name is that long).
DEFAULT_CACHE_SIZE = 50_000
DEFAULT_CACHE_BYTES = 16 << 20
_MAX_CACHED_TEXT = 4096
_MAX_CACHED_FIELD_KEY = 128
# A plan costs ~85 kB for a 64-core server's batch (110 points, 1,121 values: ~80 bytes a
# value, counted with its text); a fleet has a few shapes per hardware and collector set,
# and nodes of one shape share its plan. A shape whose plan would cost more than
# _MAX_PLAN_BYTES is not planned: such batches take the exact path.
DEFAULT_MAX_SHAPES = 512
DEFAULT_PLAN_BYTES = 64 << 20
_MAX_PLAN_BYTES = 4 << 20
_PLAN_BYTES_PER_VALUE = 80

_json = msgspec.json.Encoder()
_TS, _FIELDS, _TAGS = attrgetter("ts"), attrgetter("fields"), attrgetter("tags")
_MEASUREMENT_OF = attrgetter("measurement")
_NO_TAGS: dict[str, str] = {}
# Index ints shared by every plan's getter (Python caches only -5..256): a plan then holds
# a tuple of references, not thousands of int objects of its own.
_INTS: list[int] = []


def _int(i: int) -> int:
    if i >= 1 << 16:  # bounded: a huge batch's plan keeps its own
        return i
    if i >= len(_INTS):
        _INTS.extend(range(len(_INTS), i + 1024))
    return _INTS[i]


def _escape(
    text: str, special: frozenset[str], dangling: re.Pattern[str], table: dict[int, str]
) -> str:
    if special.isdisjoint(text):
        return text
    if "\\" in text:
        text = dangling.sub("", text)
    return text.translate(table)


def escape_measurement(name: str) -> str:
    return _escape(name, _MEASUREMENT_SPECIAL, _MEASUREMENT_DANGLING, _MEASUREMENT)


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    return _escape(text, _TAG_SPECIAL, _TAG_DANGLING, _TAG)


def escape_field_string(text: str) -> str:
    return text.translate(_FIELD_STR)


def format_float(value: float) -> str:
    """The shortest round-trip repr, spelled as msgspec spells it (``1e-7``, ``3.0``)."""
    return _json.encode(value).decode()


def _format_fields(fields: Mapping[str, object], keys: dict[str, str]) -> str:
    """``k=v,k=v`` for the representable fields; "" when none is left."""
    parts = []
    for key, value in fields.items():
        ekey = keys.get(key)
        if ekey is None:
            ekey = escape_tag(key)
            if len(key) <= _MAX_CACHED_FIELD_KEY:
                keys[key] = ekey
        if not ekey:
            continue
        kind = type(value)
        # Exact type checks: bool is a subclass of int and must not become "1i".
        if kind is float:
            if isfinite(value):  # type: ignore[arg-type]
                parts.append(f"{ekey}={format_float(value)}")  # type: ignore[arg-type]
        elif kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
                parts.append(f"{ekey}={value}i")
            else:  # the protocol refuses these; kept for batches built in code
                parts.append(f"{ekey}={format_float(float(value))}")  # type: ignore[arg-type]
        elif kind is bool:
            parts.append(f"{ekey}={'true' if value else 'false'}")
        elif kind is str:
            parts.append(f'{ekey}="{escape_field_string(value)}"')  # type: ignore[arg-type]
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a batch shape turns into. Its own lists are kept to recognise the next batch
    of a node by comparing (C-level) instead of building and hashing a key."""

    getter: Any  # itemgetter over [values..., ts, common raw, pieces...]; None: no line
    pieces: list[msgspec.Raw]
    fast: bool  # False: batches of this shape take the exact path
    measurements: tuple[str, ...]
    tags: list[dict[str, str]]
    lens: tuple[int, ...]
    names: tuple[str, ...]
    types: tuple[type, ...]


@dataclass(slots=True)
class _Common:
    """A node's tags common to all its points, rendered once, and its last shape."""

    keys: frozenset[str]  # escaped tag keys: a point tag with one of these is dropped
    text: str  # ",k=v,k=v" (sorted), "" when none
    raw: msgspec.Raw | None  # text for the fast path; None when it cannot take it
    last: _Shape | None = None


_ShapeKey = tuple[Any, ...]
# What a shape too big to plan gets: the exact path. It matches no batch (a batch with
# points has lens), so the next batch is looked at afresh.
_UNPLANNED = _Shape(False, [], False, (), [], (), (), ())


class LineEncoder:
    """Converts batches to line protocol, caching per-node tags and per-shape plans.

    One encoder per ingest worker; not shared between threads. ``fast_batches`` and
    ``exact_batches`` count which path each batch took. Batches are expected to be valid
    protocol messages (``protocol.codec.decode`` makes sure): an int field outside int64,
    which decode refuses, would be written as an int by the fast path.
    """

    __slots__ = (
        "_cache_bytes",
        "_commons",
        "_extra_tags",
        "_field_keys",
        "_max_cache",
        "_max_cache_bytes",
        "_max_plan_bytes",
        "_max_shapes",
        "_pieces",
        "_plan_bytes",
        "_series",
        "_shapes",
        "exact_batches",
        "fast_batches",
    )

    def __init__(
        self,
        *,
        extra_tags: Mapping[str, str] | None = None,
        max_cache: int = DEFAULT_CACHE_SIZE,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_shapes: int = DEFAULT_MAX_SHAPES,
        max_plan_bytes: int = DEFAULT_PLAN_BYTES,
    ) -> None:
        self._extra_tags = dict(extra_tags or {})
        self._max_cache = max_cache
        self._max_cache_bytes = max_cache_bytes
        self._max_shapes = max_shapes
        self._max_plan_bytes = max_plan_bytes
        # (batch tags, node) or (batch tags, None, node_id) -> the node's common tags
        self._commons: dict[tuple[object, ...], _Common] = {}
        # (measurement, point tags, common keys) -> "measurement,k=v" ("" = not writable)
        self._series: dict[tuple[object, ...], str] = {}
        self._field_keys: dict[str, str] = {}
        # shape key -> plan, shared by every node that sends that shape
        self._shapes: dict[_ShapeKey, _Shape] = {}
        self._pieces: dict[str, msgspec.Raw] = {}  # text pieces shared between plans
        self._cache_bytes = 0  # text held by _commons and _series (keys and values)
        self._plan_bytes = 0  # estimated size of the plans in _shapes
        self.fast_batches = 0
        self.exact_batches = 0

    @property
    def extra_tags(self) -> dict[str, str]:
        """Tags added to every point (a copy: they are fixed when the encoder is made)."""
        return dict(self._extra_tags)

    def encode(self, batch: MetricBatch, *, node: str | None = None) -> bytes:
        """Lines for ``batch``, each ending in ``\\n``; b"" when no point is representable.

        Tag precedence (later wins): point tags, batch tags, ``node`` (default the batch's
        node_id, used only if the batch has no node tag), the encoder's extra tags. The
        ingest worker passes the node id from the NATS subject, which NATS authenticated.
        """
        common = self._common(batch, node)
        out = self._encode_fast(batch, common)
        if out is None:
            self.exact_batches += 1
            return self._encode_exact(batch, common)
        self.fast_batches += 1
        return out

    # --- caches ---------------------------------------------------------------------

    def _drop_caches(self) -> None:
        self._commons.clear()  # nodes hold their last plan: they go with the plans
        self._series.clear()
        self._field_keys.clear()
        self._shapes.clear()
        self._pieces.clear()
        self._cache_bytes = self._plan_bytes = 0

    def _room_for_text(self, cache: dict[Any, Any], cost: int) -> bool:
        """Whether an entry of ``cost`` characters may be cached (making room if needed)."""
        if cost > _MAX_CACHED_TEXT:
            return False
        if len(cache) >= self._max_cache or self._cache_bytes + cost > self._max_cache_bytes:
            self._drop_caches()
        self._cache_bytes += cost
        return True

    # --- tags -----------------------------------------------------------------------

    def _common(self, batch: MetricBatch, node: str | None) -> _Common:
        items = tuple(batch.tags.items())
        # The batch's node_id matters only when no node is given (it cannot then spread
        # one node's batches over many entries).
        key = (items, node) if node is not None else (items, None, batch.node_id)
        common = self._commons.get(key)
        if common is None:
            tags = dict(batch.tags)
            if node is not None:
                tags["node"] = node
            elif "node" not in tags and batch.node_id:
                tags["node"] = batch.node_id
            tags.update(self._extra_tags)
            pairs = _escaped_pairs(tags)
            text = "".join(f",{k}={v}" for k, v in pairs)
            raw = None if _COMMA_MARK in text else msgspec.Raw(_marked(text))
            common = _Common(frozenset(k for k, _ in pairs), text, raw)
            cost = 2 * len(text) + len(node or batch.node_id)
            if self._room_for_text(self._commons, cost):
                self._commons[key] = common
        return common

    def _series_key(
        self, measurement: str, ptags: tuple[tuple[str, str], ...], common: frozenset[str]
    ) -> str:
        """``measurement,k=v`` for the point's own tags; "" when not writable."""
        key = (measurement, ptags, common)
        series = self._series.get(key)
        if series is None:
            name = escape_measurement(measurement)
            if not name:
                series = ""  # not writable; the caller drops the point
            else:
                own = [(k, v) for k, v in _escaped_pairs(dict(ptags)) if k not in common]
                series = name + "".join(f",{k}={v}" for k, v in own)
            cost = len(measurement) + sum(len(k) + len(v) for k, v in ptags) + len(series)
            if self._room_for_text(self._series, cost):
                self._series[key] = series
        return series

    # --- the exact path -------------------------------------------------------------

    def _encode_exact(self, batch: MetricBatch, common: _Common) -> bytes:
        field_keys = self._field_keys
        if len(field_keys) >= self._max_cache:
            field_keys.clear()  # entries are short (_MAX_CACHED_FIELD_KEY)
        batch_ts = batch.ts
        out = []
        for point in batch.points:
            fields = _format_fields(point.fields, field_keys)
            if not fields:
                continue
            ptags = tuple(point.tags.items()) if point.tags else ()
            series = self._series_key(point.measurement, ptags, common.keys)
            if not series:
                continue
            ts = point.ts or batch_ts
            if ts:
                out.append(f"{series}{common.text} {fields} {ts}\n")
            else:
                out.append(f"{series}{common.text} {fields}\n")
        return "".join(out).encode()

    # --- the fast path --------------------------------------------------------------

    def _encode_fast(self, batch: MetricBatch, common: _Common) -> bytes | None:
        """The batch through its shape's plan; None when the exact path must take it."""
        batch_ts = batch.ts
        points = batch.points
        if not batch_ts or not points or common.raw is None:
            return None
        if any(map(_TS, points)):  # per-point timestamps: the agent never sends them
            return None
        fields = list(map(_FIELDS, points))
        values: list[Any] = list(chain.from_iterable(map(dict.values, fields)))
        types = tuple(map(type, values))
        names = tuple(chain.from_iterable(fields))
        lens = tuple(map(len, fields))
        measurements = tuple(map(_MEASUREMENT_OF, points))
        tags = list(map(_TAGS, points))
        shape = common.last
        if (
            shape is None
            or shape.types != types
            or shape.names != names
            or shape.lens != lens
            or shape.measurements != measurements
            or shape.tags != tags
        ):
            shape = common.last = self._shape(common.keys, measurements, tags, lens, names, types)
        if not shape.fast:
            return None
        if shape.getter is None:
            return b""
        values.append(batch_ts)
        values.append(common.raw)
        values.extend(shape.pieces)
        blob = _json.encode(shape.getter(values))
        if _JSON_NULL in blob:  # NaN or infinity: the exact path drops those values
            return None
        return blob[1:-1].translate(_FROM_JSON, b",")

    def _shape(
        self,
        common_keys: frozenset[str],
        measurements: tuple[str, ...],
        tags: list[dict[str, str]],
        lens: tuple[int, ...],
        names: tuple[str, ...],
        types: tuple[type, ...],
    ) -> _Shape:
        """The shared plan for a shape, made on first sight. The plan keeps the tuples of
        its key (no second copy) and copies of the tag dicts, which are small."""
        ptags = tuple(tuple(t.items()) if t else () for t in tags)
        key = (common_keys, measurements, ptags, lens, names, types)
        shape = self._shapes.get(key)
        if shape is None:
            cost = (
                _PLAN_BYTES_PER_VALUE * len(types)
                + sum(map(len, names))
                + 2 * sum(map(len, measurements))
                + 2 * sum(len(k) + len(v) for t in ptags for k, v in t)
            )
            if cost > _MAX_PLAN_BYTES:
                return _UNPLANNED
            if (
                len(self._shapes) >= self._max_shapes
                or self._plan_bytes + cost > self._max_plan_bytes
            ):
                self._drop_caches()
            plan = self._build_plan(key)
            getter, pieces = plan or (None, [])
            tag_copies = [dict(t) if t else _NO_TAGS for t in tags]
            shape = _Shape(
                getter, pieces, plan is not None, measurements, tag_copies, lens, names, types
            )
            self._shapes[key] = shape
            self._plan_bytes += cost
        return shape

    def _build_plan(self, key: _ShapeKey) -> tuple[Any, list[msgspec.Raw]] | None:
        """The interleaving getter and text pieces for one shape: (None, []) when it
        writes no line, None when the fast path cannot write it (string values, a
        comma mark in a name)."""
        common_keys, measurements, ptags, lens, names, types = key
        nvalues = len(types)
        ts_at, common_at, pieces_at = nvalues, nvalues + 1, nvalues + 2
        texts: list[str] = []
        index: list[int] = []  # into [values..., ts, common raw, pieces...]

        def piece(text: str) -> None:
            texts.append(text)
            index.append(pieces_at + len(texts) - 1)

        start = 0
        for measurement, tags, n in zip(measurements, ptags, lens, strict=True):
            first, start = start, start + n
            if not all(t is float or t is int or t is bool for t in types[first:start]):
                return None  # strings need escaping
            fields = [(escape_tag(names[i]), i) for i in range(first, start)]
            fields = [(ekey, i) for ekey, i in fields if ekey]
            series = self._series_key(measurement, tags, common_keys)
            if not series or not fields:
                continue  # the exact path drops this point too
            piece(("\n" if texts else "") + series)
            index.append(common_at)
            sep, after_int = " ", False
            for ekey, i in fields:
                piece(("i" if after_int else "") + sep + ekey + "=")
                index.append(i)
                sep, after_int = ",", types[i] is int
            piece("i " if after_int else " ")
            index.append(ts_at)
        if not texts:
            return None, []
        if any(_COMMA_MARK in t for t in texts):
            return None
        piece("\n")
        return itemgetter(*map(_int, index)), [self._piece(t) for t in texts]

    def _piece(self, text: str) -> msgspec.Raw:
        piece = self._pieces.get(text)
        if piece is None:
            piece = self._pieces[text] = msgspec.Raw(_marked(text))
        return piece


def _marked(text: str) -> bytes:
    return text.replace(",", _COMMA_MARK).encode()


def _escaped_pairs(tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """Escaped (key, value) pairs sorted by key; empty keys or values left out (InfluxDB
    rejects them, and an absent tag means the same). Keys that escape alike ("k", "k\\")
    resolve the same way whatever order they came in: the fast path recognises a node's
    tags by dict equality, which ignores order."""
    pairs = {}
    for key, value in sorted(tags.items()):
        ekey, evalue = escape_tag(key), escape_tag(value)
        if ekey and evalue:
            pairs[ekey] = evalue
    return sorted(pairs.items())


def batch_to_lines(
    batch: MetricBatch,
    *,
    extra_tags: Mapping[str, str] | None = None,
    node: str | None = None,
    encoder: LineEncoder | None = None,
) -> bytes:
    """One batch as line protocol (``\\n``-terminated lines, timestamps in ns).

    Pass a long-lived ``encoder`` on hot paths to reuse its caches; ``extra_tags`` is
    used only when no encoder is given.
    """
    if encoder is None:
        encoder = LineEncoder(extra_tags=extra_tags)
    return encoder.encode(batch, node=node)
