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

# What the encoder does to text, so that it round-trips on InfluxDB 1.x and cannot change
# the structure of a line on VictoriaMetrics (infra/influxdb/README.md has the why):
# - names (measurement, tag keys and values, field keys) escape "," and " " (and "=" except
#   in the measurement) with a backslash, as InfluxDB's own writers do;
# - a backslash before a backslash, a space, a comma, an equals sign or the end of a name
#   (and before '"' in a measurement or field key) has no encoding both sinks read alike
#   (InfluxDB 1.x keeps such backslashes, VM takes them as escapes, or the other way
#   round), nor has a '"' in a field key, and control characters in names none at all
#   (InfluxDB 1.x stores
#   "\n" as backslash-n, a raw one ends the line): both become U+FFFD, counted;
# - a measurement starting with "#" would be read as a comment: its "#" becomes U+FFFD;
# - string fields escape "\" and '"'; tab and CR are written raw; a newline is written raw
#   inside the quotes for sinks whose parser allows it (InfluxDB 1.x), else it is
#   replaced; other control characters are replaced. All of it counted.
REPLACEMENT = "\ufffd"
_CONTROLS = "".join(map(chr, range(32))) + "\x7f"
_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ "})
_TAG = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_NAME_SPECIAL = frozenset(",= \\" + _CONTROLS)
_FIELD_KEY_SPECIAL = _NAME_SPECIAL | {'"'}
_NAME_CONTROL = re.compile(f"[{re.escape(_CONTROLS)}]")
_TAG_BACKSLASH = re.compile(r"\\(?=[\\ ,=]|\Z)")
# InfluxDB 1.x also unescapes \" in measurements and field keys (VictoriaMetrics does not).
_KEY_BACKSLASH = re.compile(r'\\(?=[\\ ,="]|\Z)')
_FIELD_STR = str.maketrans({"\\": "\\\\", '"': '\\"'})
_FIELD_SPECIAL = frozenset('\\"' + _CONTROLS)
_FIELD_CONTROL = re.compile("[" + re.escape(_CONTROLS.replace("\t", "").replace("\r", "")
                                            .replace("\n", "")) + "]")
_FIELD_CONTROL_NL = re.compile("[" + re.escape(_CONTROLS.replace("\t", "").replace("\r", ""))
                               + "]")
# Keys InfluxDB 1.x refuses (tag: 400, the point dropped) or drops (field: 204, silently),
# and the tag key VictoriaMetrics ignores (its metric name label): dropped, counted.
_RESERVED_KEY = "time"
_RESERVED_TAG_KEYS = frozenset({"time", "__name__"})
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


def _clean_name(text: str, backslash: re.Pattern[str] = _TAG_BACKSLASH) -> tuple[str, int]:
    """``text`` with what no encoding can carry replaced by U+FFFD; 1 if it changed."""
    if "\\" in text:
        text, n = backslash.subn(REPLACEMENT, text)
    else:
        n = 0
    text, m = _NAME_CONTROL.subn(REPLACEMENT, text)
    return text, int(n + m > 0)


def encode_measurement(name: str) -> tuple[str, int]:
    """The measurement as written, and 1 if characters were replaced (else 0)."""
    replaced = 0
    if not _NAME_SPECIAL.isdisjoint(name):
        name, replaced = _clean_name(name, _KEY_BACKSLASH)
        name = name.translate(_MEASUREMENT)
    if name.startswith("#"):
        name, replaced = REPLACEMENT + name[1:], 1
    return name, replaced


def encode_tag(text: str) -> tuple[str, int]:
    """A tag key or tag value as written, and 1 if characters were replaced."""
    if _NAME_SPECIAL.isdisjoint(text):
        return text, 0
    text, replaced = _clean_name(text)
    return text.translate(_TAG), replaced


def encode_field_key(text: str) -> tuple[str, int]:
    """A field key as written, and 1 if characters were replaced. A '"' in a field key
    makes VictoriaMetrics take the rest of the line for a quoted string (and drop it),
    and InfluxDB 1.x unescapes '\\"': it has no encoding either, and is replaced."""
    if _FIELD_KEY_SPECIAL.isdisjoint(text):
        return text, 0
    text, replaced = _clean_name(text, _KEY_BACKSLASH)
    if '"' in text:
        text, replaced = text.replace('"', REPLACEMENT), 1
    return text.translate(_TAG), replaced


def encode_field_string(text: str, *, raw_newlines: bool = False) -> tuple[str, int]:
    """The quoted content of a string field, and 1 if characters were replaced."""
    if _FIELD_SPECIAL.isdisjoint(text):
        return text, 0
    controls = _FIELD_CONTROL if raw_newlines else _FIELD_CONTROL_NL
    text, n = controls.subn(REPLACEMENT, text)
    return text.translate(_FIELD_STR), int(n > 0)


def escape_measurement(name: str) -> str:
    return encode_measurement(name)[0]


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    return encode_tag(text)[0]


def escape_field_string(text: str, *, raw_newlines: bool = False) -> str:
    return encode_field_string(text, raw_newlines=raw_newlines)[0]


def format_float(value: float) -> str:
    """The shortest round-trip repr, spelled as msgspec spells it (``1e-7``, ``3.0``)."""
    return _json.encode(value).decode()


# What happened to a field key: written as is, written with characters replaced, dropped.
_KEY_OK, _KEY_REPLACED, _KEY_DROPPED = 0, 1, 2


def _field_key(key: str, keys: dict[str, tuple[str, int]]) -> tuple[str, int]:
    entry = keys.get(key)
    if entry is None:
        ekey, replaced = encode_field_key(key)
        if not ekey or ekey == _RESERVED_KEY:
            entry = ("", _KEY_DROPPED)
        else:
            entry = (ekey, _KEY_REPLACED if replaced else _KEY_OK)
        if len(key) <= _MAX_CACHED_FIELD_KEY:
            keys[key] = entry
    return entry


def _format_fields(
    fields: Mapping[str, object],
    keys: dict[str, tuple[str, int]],
    counts: LineCounts,
    raw_newlines: bool,
) -> str:
    """``k=v,k=v`` for the representable fields; "" when none is left. What it replaces
    or drops is added to ``counts``."""
    parts = []
    seen: set[str] = set()
    for key, value in fields.items():
        ekey, state = _field_key(key, keys)
        if state == _KEY_DROPPED or ekey in seen:
            counts.dropped_fields += 1
            continue
        replaced = int(state == _KEY_REPLACED)  # the key and a string value count apart
        kind = type(value)
        # Exact type checks: bool is a subclass of int and must not become "1i".
        if kind is float:
            if not isfinite(value):  # type: ignore[arg-type]
                counts.dropped_fields += 1
                continue
            parts.append(f"{ekey}={format_float(value)}")  # type: ignore[arg-type]
        elif kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
                parts.append(f"{ekey}={value}i")
            else:  # the protocol refuses these; kept for batches built in code
                parts.append(f"{ekey}={format_float(float(value))}")  # type: ignore[arg-type]
        elif kind is bool:
            parts.append(f"{ekey}={'true' if value else 'false'}")
        elif kind is str:
            text, changed = encode_field_string(value, raw_newlines=raw_newlines)  # type: ignore[arg-type]
            replaced += changed
            parts.append(f'{ekey}="{text}"')
        else:
            counts.dropped_fields += 1
            continue
        seen.add(ekey)
        counts.replaced += replaced
    return ",".join(parts)


@dataclass(slots=True)
class LineCounts:
    """What the encoder had to change to write a point at all, counted per written line
    (a common tag replaced in a batch of 100 points counts 100): names or string values
    with characters replaced, tags and fields dropped, points dropped."""

    replaced: int = 0
    dropped_tags: int = 0
    dropped_fields: int = 0
    dropped_points: int = 0

    def add(self, other: LineCounts, times: int = 1) -> None:
        self.replaced += other.replaced * times
        self.dropped_tags += other.dropped_tags * times
        self.dropped_fields += other.dropped_fields * times
        self.dropped_points += other.dropped_points * times

    def as_dict(self) -> dict[str, int]:
        return {
            "replaced": self.replaced,
            "dropped_tags": self.dropped_tags,
            "dropped_fields": self.dropped_fields,
            "dropped_points": self.dropped_points,
        }


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a batch shape turns into. Its own lists are kept to recognise the next batch
    of a node by comparing (C-level) instead of building and hashing a key."""

    getter: Any  # itemgetter over [values..., ts, common raw, pieces...]; None: no line
    pieces: list[msgspec.Raw]
    fast: bool  # False: batches of this shape take the exact path
    counts: LineCounts  # what a batch of this shape changes, apart from its common tags
    lines: int  # lines a batch of this shape writes
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
    counts: LineCounts  # what the common tags change, per line written
    last: _Shape | None = None


_ShapeKey = tuple[Any, ...]
# What a shape too big to plan gets: the exact path. It matches no batch (a batch with
# points has lens), so the next batch is looked at afresh.
_UNPLANNED = _Shape(False, [], False, LineCounts(), 0, (), [], (), (), ())


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
        "counts",
        "exact_batches",
        "fast_batches",
        "raw_newlines",
    )

    def __init__(
        self,
        *,
        extra_tags: Mapping[str, str] | None = None,
        max_cache: int = DEFAULT_CACHE_SIZE,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_shapes: int = DEFAULT_MAX_SHAPES,
        max_plan_bytes: int = DEFAULT_PLAN_BYTES,
        raw_newlines: bool = False,
    ) -> None:
        self._extra_tags = dict(extra_tags or {})
        # Newlines in string fields written raw inside the quotes (InfluxDB 1.x reads them
        # so); False replaces them (VictoriaMetrics splits lines at every newline).
        self.raw_newlines = raw_newlines
        self.counts = LineCounts()
        self._max_cache = max_cache
        self._max_cache_bytes = max_cache_bytes
        self._max_shapes = max_shapes
        self._max_plan_bytes = max_plan_bytes
        # (batch tags, node) or (batch tags, None, node_id) -> the node's common tags
        self._commons: dict[tuple[object, ...], _Common] = {}
        # (measurement, point tags, common keys) -> ("measurement,k=v" ("" = not writable),
        # what writing it changes)
        self._series: dict[tuple[object, ...], tuple[str, LineCounts]] = {}
        self._field_keys: dict[str, tuple[str, int]] = {}
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
        What had to be replaced or dropped is added to ``counts``.

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
            counts = LineCounts()
            pairs = _escaped_pairs(tags, counts)
            text = "".join(f",{k}={v}" for k, v in pairs)
            raw = None if _COMMA_MARK in text else msgspec.Raw(_marked(text))
            common = _Common(frozenset(k for k, _ in pairs), text, raw, counts)
            cost = 2 * len(text) + len(node or batch.node_id)
            if self._room_for_text(self._commons, cost):
                self._commons[key] = common
        return common

    def _series_key(
        self, measurement: str, ptags: tuple[tuple[str, str], ...], common: frozenset[str]
    ) -> tuple[str, LineCounts]:
        """``measurement,k=v`` for the point's own tags ("" when not writable), and what
        writing it changes."""
        key = (measurement, ptags, common)
        entry = self._series.get(key)
        if entry is None:
            counts = LineCounts()
            name, counts.replaced = encode_measurement(measurement)
            if not name:
                series = ""  # not writable; the caller drops the point
            else:
                own = []
                for k, v in _escaped_pairs(dict(ptags), counts):
                    if k in common:
                        counts.dropped_tags += 1  # the node's own tags win
                    else:
                        own.append((k, v))
                series = name + "".join(f",{k}={v}" for k, v in own)
            entry = (series, counts)
            cost = len(measurement) + sum(len(k) + len(v) for k, v in ptags) + len(series)
            if self._room_for_text(self._series, cost):
                self._series[key] = entry
        return entry

    # --- the exact path -------------------------------------------------------------

    def _encode_exact(self, batch: MetricBatch, common: _Common) -> bytes:
        field_keys = self._field_keys
        if len(field_keys) >= self._max_cache:
            field_keys.clear()  # entries are short (_MAX_CACHED_FIELD_KEY)
        batch_ts = batch.ts
        counts = self.counts
        out = []
        for point in batch.points:
            ptags = tuple(point.tags.items()) if point.tags else ()
            series, series_counts = self._series_key(point.measurement, ptags, common.keys)
            if not series:
                counts.dropped_points += 1
                continue
            # Counted into a scratch first: a point that ends up not written counts as a
            # dropped point (with its dropped fields), not as replaced names.
            point_counts = LineCounts()
            fields = _format_fields(point.fields, field_keys, point_counts, self.raw_newlines)
            if not fields:
                counts.dropped_fields += point_counts.dropped_fields
                counts.dropped_points += 1
                continue
            counts.add(point_counts)
            counts.add(series_counts)
            counts.add(common.counts)
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
            self.counts.add(shape.counts)
            return b""
        values.append(batch_ts)
        values.append(common.raw)
        values.extend(shape.pieces)
        blob = _json.encode(shape.getter(values))
        if _JSON_NULL in blob:  # NaN or infinity: the exact path drops (and counts) those
            return None
        self.counts.add(shape.counts)
        self.counts.add(common.counts, shape.lines)
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
            getter, pieces, counts, lines = plan or (None, [], LineCounts(), 0)
            tag_copies = [dict(t) if t else _NO_TAGS for t in tags]
            shape = _Shape(
                getter, pieces, plan is not None, counts, lines, measurements, tag_copies,
                lens, names, types,
            )
            self._shapes[key] = shape
            self._plan_bytes += cost
        return shape

    def _build_plan(
        self, key: _ShapeKey
    ) -> tuple[Any, list[msgspec.Raw], LineCounts, int] | None:
        """The interleaving getter and text pieces for one shape, what a batch of it
        changes (apart from its common tags) and how many lines it writes: getter None
        when it writes no line; None when the fast path cannot write it (string values,
        a comma mark in a name). Counts the way _encode_exact does."""
        common_keys, measurements, ptags, lens, names, types = key
        nvalues = len(types)
        ts_at, common_at, pieces_at = nvalues, nvalues + 1, nvalues + 2
        texts: list[str] = []
        index: list[int] = []  # into [values..., ts, common raw, pieces...]

        def piece(text: str) -> None:
            texts.append(text)
            index.append(pieces_at + len(texts) - 1)

        counts = LineCounts()
        lines = 0
        start = 0
        keys = self._field_keys
        for measurement, tags, n in zip(measurements, ptags, lens, strict=True):
            first, start = start, start + n
            if not all(t is float or t is int or t is bool for t in types[first:start]):
                return None  # strings need escaping
            series, series_counts = self._series_key(measurement, tags, common_keys)
            if not series:
                counts.dropped_points += 1
                continue  # the exact path drops this point too
            fields: list[tuple[str, int]] = []
            seen: set[str] = set()
            point_counts = LineCounts()
            for i in range(first, start):
                ekey, state = _field_key(names[i], keys)
                if state == _KEY_DROPPED or ekey in seen:
                    point_counts.dropped_fields += 1
                    continue
                seen.add(ekey)
                point_counts.replaced += state == _KEY_REPLACED
                fields.append((ekey, i))
            if not fields:
                counts.dropped_fields += point_counts.dropped_fields
                counts.dropped_points += 1
                continue
            counts.add(point_counts)
            counts.add(series_counts)
            lines += 1
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
            return None, [], counts, 0
        if any(_COMMA_MARK in t for t in texts):
            return None
        piece("\n")
        return itemgetter(*map(_int, index)), [self._piece(t) for t in texts], counts, lines

    def _piece(self, text: str) -> msgspec.Raw:
        piece = self._pieces.get(text)
        if piece is None:
            piece = self._pieces[text] = msgspec.Raw(_marked(text))
        return piece


def _marked(text: str) -> bytes:
    return text.replace(",", _COMMA_MARK).encode()


def _escaped_pairs(tags: Mapping[str, str], counts: LineCounts) -> list[tuple[str, str]]:
    """Escaped (key, value) pairs sorted by key, what was replaced or dropped added to
    ``counts``. An empty value is left out uncounted (InfluxDB rejects it, and an absent
    tag means the same on both sinks); an empty key, the key ``time`` (InfluxDB 1.x
    refuses the point), ``__name__`` (VictoriaMetrics ignores it) and a key that escapes
    like an earlier one are dropped, counted.
    Sorted first, so keys that clash resolve the same way whatever order they came in:
    the fast path recognises a node's tags by dict equality, which ignores order."""
    pairs: dict[str, str] = {}
    for key, value in sorted(tags.items()):
        if not value:
            continue
        ekey, key_replaced = encode_tag(key)
        evalue, value_replaced = encode_tag(value)
        if not ekey or ekey in _RESERVED_TAG_KEYS or ekey in pairs:
            counts.dropped_tags += 1
            continue
        pairs[ekey] = evalue
        counts.replaced += key_replaced + value_replaced
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
