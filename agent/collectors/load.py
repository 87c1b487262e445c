"""Load averages, in Telegraf's `system` measurement (load1, load5, load15, n_cpus)."""

from __future__ import annotations

import psutil

from agent.collectors.base import MetricPoint


class LoadCollector:
    """Measurement `system`: load1, load5, load15 and the logical CPU count n_cpus."""

    name = "load"

    def collect(self) -> list[MetricPoint]:
        load1, load5, load15 = psutil.getloadavg()
        return [
            MetricPoint(
                "system",
                {
                    "load1": float(load1),
                    "load5": float(load5),
                    "load15": float(load15),
                    "n_cpus": int(psutil.cpu_count(logical=True) or 0),
                },
            )
        ]
