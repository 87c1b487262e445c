"""Cumulative per-interface network counters, as Telegraf's `net` input reports them."""

from __future__ import annotations

import logging

import psutil

from agent.collectors.base import MAX_TAG_VALUES, CapWarner, MetricPoint, cap_names

log = logging.getLogger("barista.agent.collectors")


class NetCollector:
    """Measurement `net`, tag `interface`; interfaces that are down or ignored are skipped."""

    name = "net"

    def __init__(
        self,
        *,
        ignore: frozenset[str] = frozenset({"lo"}),
        ignore_prefixes: tuple[str, ...] = (),
        max_interfaces: int = MAX_TAG_VALUES,
    ) -> None:
        self._ignore = ignore
        # e.g. ("veth",) on container hosts, whose veth names churn with every container.
        self._ignore_prefixes = ignore_prefixes
        # Interface names are tag values; bounded so a host with thousands of veths/taps
        # cannot flood the series count. Kept: the first in name order.
        self._max_interfaces = max_interfaces
        self._cap = CapWarner(log, "network interfaces", max_interfaces)

    def collect(self) -> list[MetricPoint]:
        counters = psutil.net_io_counters(pernic=True)
        up = {str(name) for name, st in psutil.net_if_stats().items() if st.isup}
        names, dropped = cap_names(
            (
                str(name)
                for name in counters
                if name in up
                and name not in self._ignore
                and not name.startswith(self._ignore_prefixes)
            ),
            self._max_interfaces,
        )
        self._cap.dropped(dropped)
        points: list[MetricPoint] = []
        for name in names:
            io = counters[name]
            points.append(
                MetricPoint(
                    "net",
                    {
                        "bytes_sent": int(io.bytes_sent),
                        "bytes_recv": int(io.bytes_recv),
                        "packets_sent": int(io.packets_sent),
                        "packets_recv": int(io.packets_recv),
                        "err_in": int(io.errin),
                        "err_out": int(io.errout),
                        "drop_in": int(io.dropin),
                        "drop_out": int(io.dropout),
                    },
                    {"interface": str(name)},
                )
            )
        return points
