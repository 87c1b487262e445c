"""Socket counts from /proc/net/sockstat and sockstat6, in measurement `netstat`.

Telegraf's `netstat` counts connections per TCP state by walking every process's file
descriptors, which costs seconds on a busy host; the kernel already keeps the counts an
operator pages on. Of Telegraf's fields only ``tcp_time_wait`` is here (same meaning); the
others are the kernel's: ``tcp_inuse``, ``tcp_orphan``, ``tcp_alloc``, ``tcp_mem`` (pages),
``udp_inuse``, ``udp_mem``, ``raw_inuse``, ``frag_inuse``, ``frag_memory``, ``sockets_used``
and the IPv6 ``tcp6_inuse``, ``udp6_inuse``, ...
"""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint, read_text

_RENAME = {"tw": "time_wait"}


def parse_sockstat(text: str) -> dict[str, FieldValue]:
    """``TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1`` lines -> tcp_inuse=5, ..."""
    out: dict[str, FieldValue] = {}
    for line in text.splitlines():
        proto, sep, rest = line.partition(":")
        items = rest.split()
        if not sep or len(items) % 2:
            continue
        prefix = proto.strip().lower()
        for key, value in zip(items[::2], items[1::2], strict=True):
            try:
                out[f"{prefix}_{_RENAME.get(key, key)}"] = int(value)
            except ValueError:
                continue
    return out


class NetstatCollector:
    """Measurement `netstat`, no tags: the counts of this network namespace."""

    name = "netstat"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        fields: dict[str, FieldValue] = {}
        for file in ("sockstat", "sockstat6"):
            text = read_text(f"{self._proc}/net/{file}")
            if text is not None:
                fields.update(parse_sockstat(text))
        return [MetricPoint("netstat", fields)] if fields else []
