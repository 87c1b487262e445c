"""Load averages, in Telegraf's `system` measurement (load1, load5, load15, n_cpus)."""

from __future__ import annotations

import os

from agent.collectors.base import CollectorOptions, MetricPoint


class LoadCollector:
    """Measurement `system`: load1, load5, load15 and the logical CPU count n_cpus."""

    name = "load"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        del options  # getloadavg(3) and sysconf need no paths

    def collect(self) -> list[MetricPoint]:
        load1, load5, load15 = os.getloadavg()
        return [
            MetricPoint(
                "system",
                {
                    "load1": float(load1),
                    "load5": float(load5),
                    "load15": float(load15),
                    "n_cpus": int(os.cpu_count() or 0),
                },
            )
        ]
