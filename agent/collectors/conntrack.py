"""Connection-tracking table use, as Telegraf's `conntrack` input reports it: fields
``ip_conntrack_count`` and ``ip_conntrack_max`` (floats, as Telegraf sends them), from
nf_conntrack_* (or the old ip_conntrack_*) sysctls. No point while the module is not
loaded: nothing is tracked, so nothing can overflow."""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint, read_int

_DIRS = ("sys/net/netfilter", "sys/net/ipv4/netfilter")


class ConntrackCollector:
    """Measurement `conntrack`, no tags."""

    name = "conntrack"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        fields: dict[str, FieldValue] = {}
        for directory in _DIRS:
            for prefix in ("nf", "ip"):
                for what in ("count", "max"):
                    value = read_int(f"{self._proc}/{directory}/{prefix}_conntrack_{what}")
                    if value is not None:
                        fields.setdefault(f"ip_conntrack_{what}", float(value))
        return [MetricPoint("conntrack", fields)] if fields else []
