"""Uptime, boot time and logged-in users, in Telegraf's `system` measurement."""

from __future__ import annotations

import time

import psutil

from agent.collectors.base import MetricPoint

_PROC_UPTIME = "/proc/uptime"


def _uptime(boot_time: float) -> int:
    # /proc/uptime counts on the monotonic clock, so an NTP step of the wall clock does
    # not make uptime jump or go negative; other platforms fall back to now - boot.
    try:
        with open(_PROC_UPTIME, "rb") as f:
            return int(float(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return max(0, int(time.time() - boot_time))


class SystemCollector:
    """Measurement `system`: uptime (s), boot_time (epoch s), n_users, n_unique_users."""

    name = "system"

    def collect(self) -> list[MetricPoint]:
        boot_time = float(psutil.boot_time())
        users = psutil.users()
        return [
            MetricPoint(
                "system",
                {
                    "uptime": _uptime(boot_time),
                    "boot_time": int(boot_time),
                    "n_users": len(users),
                    "n_unique_users": len({str(u.name) for u in users}),
                },
            )
        ]
