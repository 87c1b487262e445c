"""MetricBatch -> InfluxDB line protocol, the hot path of ingest.

Escaping follows the line protocol reference; escaped tag sets are cached per encoder
because the same few hundred series repeat in every batch of a fleet.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import isfinite

from protocol.messages import MetricBatch

# str.translate tables: one C-level pass per string instead of chained replaces.
_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n", "\r": "\\r"})
_TAG = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r"})
_FIELD_STR = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_MEASUREMENT_SPECIAL = frozenset(",\n\r \\")
_TAG_SPECIAL = frozenset(",=\n\r \\")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Above this many cached entries a cache is simply dropped and rebuilt: series churn is
# rare (new nodes, new disks), and a clear is cheaper than LRU bookkeeping per point.
DEFAULT_CACHE_SIZE = 50_000


def escape_measurement(name: str) -> str:
    if _MEASUREMENT_SPECIAL.isdisjoint(name):
        return name
    # A trailing backslash would escape the separator that follows it.
    return name.rstrip("\\").translate(_MEASUREMENT)


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    if _TAG_SPECIAL.isdisjoint(text):
        return text
    return text.rstrip("\\").translate(_TAG)


def escape_field_string(text: str) -> str:
    return text.translate(_FIELD_STR)


def _format_fields(fields: Mapping[str, object], keys: dict[str, str]) -> str:
    """``k=v,k=v`` for the representable fields; "" when none is left."""
    parts = []
    for key, value in fields.items():
        ekey = keys.get(key)
        if ekey is None:
            ekey = keys[key] = escape_tag(key)
        if not ekey:
            continue
        kind = type(value)
        # Exact type checks: bool is a subclass of int and must not become "1i".
        if kind is float:
            if isfinite(value):  # type: ignore[arg-type]
                parts.append(f"{ekey}={value!r}")
        elif kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
                parts.append(f"{ekey}={value}i")
            else:
                parts.append(f"{ekey}={float(value)!r}")  # type: ignore[arg-type]
        elif kind is bool:
            parts.append(f"{ekey}={'true' if value else 'false'}")
        elif kind is str:
            parts.append(f'{ekey}="{escape_field_string(value)}"')  # type: ignore[arg-type]
    return ",".join(parts)


class LineEncoder:
    """Converts batches to line protocol, caching escaped series keys between batches.

    One encoder per ingest worker; not shared between threads.
    """

    __slots__ = ("_field_keys", "_max_cache", "_series", "_tagsets", "extra_tags")

    def __init__(
        self, *, extra_tags: Mapping[str, str] | None = None, max_cache: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.extra_tags = dict(extra_tags or {})
        self._max_cache = max_cache
        # (batch tags, node) -> merged common tags
        self._tagsets: dict[tuple[object, ...], dict[str, str]] = {}
        # (common tag key, measurement, point tags) -> "measurement,k=v,k=v"
        self._series: dict[tuple[object, ...], str] = {}
        self._field_keys: dict[str, str] = {}

    def encode(self, batch: MetricBatch, *, node: str | None = None) -> bytes:
        """Lines for ``batch``, each ending in ``\\n``; b"" when no point is representable.

        Tag precedence (later wins): point tags, batch tags, ``node`` (default the batch's
        node_id, used only if the batch has no node tag), the encoder's extra tags. The
        ingest worker passes the node id from the NATS subject, which NATS authenticated.
        """
        common_key = (tuple(batch.tags.items()), node, batch.node_id)
        common = self._tagsets.get(common_key)
        if common is None:
            common = dict(batch.tags)
            if node is not None:
                common["node"] = node
            elif "node" not in common and batch.node_id:
                common["node"] = batch.node_id
            common.update(self.extra_tags)
            if len(self._tagsets) >= self._max_cache:
                self._tagsets.clear()
            self._tagsets[common_key] = common

        series_cache = self._series
        if len(series_cache) >= self._max_cache:
            series_cache.clear()
        field_keys = self._field_keys
        if len(field_keys) >= self._max_cache:
            field_keys.clear()
        batch_ts = batch.ts
        out = []
        for point in batch.points:
            fields = _format_fields(point.fields, field_keys)
            if not fields:
                continue
            ptags = point.tags
            skey = (common_key, point.measurement, tuple(ptags.items()) if ptags else ())
            series = series_cache.get(skey)
            if series is None:
                series = series_cache[skey] = self._series_key(point.measurement, ptags, common)
            if not series:
                continue
            ts = point.ts or batch_ts
            if ts:
                out.append(f"{series} {fields} {ts}\n")
            else:
                out.append(f"{series} {fields}\n")
        return "".join(out).encode()

    @staticmethod
    def _series_key(measurement: str, ptags: Mapping[str, str], common: Mapping[str, str]) -> str:
        name = escape_measurement(measurement)
        if not name:
            return ""  # not writable; the caller drops the point
        merged = {**ptags, **common} if ptags else common
        parts = [name]
        for key in sorted(merged):
            ekey, evalue = escape_tag(key), escape_tag(merged[key])
            # InfluxDB rejects empty tag keys and values; an absent tag is the same thing.
            if ekey and evalue:
                parts.append(f"{ekey}={evalue}")
        return ",".join(parts)


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
