"""Uptime, boot time and logged-in users, in Telegraf's `system` measurement.

Boot time is /proc/stat's ``btime``; users are the USER_PROCESS records of utmp, read with
struct (what psutil.users() returns, without loading psutil).
"""

from __future__ import annotations

import struct
import time

from agent.collectors.base import CollectorOptions, MetricPoint, read_text

UTMP_PATHS = ("/run/utmp", "/var/run/utmp")
_USER_PROCESS = 7
# struct utmp on Linux (glibc, every 64-bit ABI and i386): type, pid, line, id, user, ...
_UTMP = struct.Struct("hi32s4s32s256s")
_UTMP_SIZE = 384


def boot_time(stat: str) -> int | None:
    for line in stat.splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    return None


def utmp_users(data: bytes) -> list[str]:
    """User names of the USER_PROCESS records in a utmp file's bytes."""
    users = []
    for off in range(0, len(data) - _UTMP_SIZE + 1, _UTMP_SIZE):
        kind, _pid, _line, _id, user, _host = _UTMP.unpack_from(data, off)
        if kind == _USER_PROCESS:
            users.append(user.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return users


def _read_users() -> list[str]:
    for path in UTMP_PATHS:
        try:
            with open(path, "rb") as f:
                return utmp_users(f.read(1 << 20))
        except FileNotFoundError:
            continue
    return []  # no utmp (containers, minimal images): nobody logged in


class SystemCollector:
    """Measurement `system`: uptime (s), boot_time (epoch s), n_users, n_unique_users."""

    name = "system"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        stat = read_text(f"{self._proc}/stat")
        if stat is None:
            import psutil  # other platforms only: ~0.9 MB of RSS

            boot = int(psutil.boot_time())
            users = [str(u.name) for u in psutil.users()]
            uptime = max(0, int(time.time() - boot))
        else:
            boot = boot_time(stat) or 0
            users = _read_users()
            # /proc/uptime counts on the monotonic clock (boot-time based), so an NTP step
            # of the wall clock does not make uptime jump or go negative.
            up = read_text(f"{self._proc}/uptime")
            uptime = int(float(up.split()[0])) if up else max(0, int(time.time() - boot))
        return [
            MetricPoint(
                "system",
                {
                    "uptime": uptime,
                    "boot_time": boot,
                    "n_users": len(users),
                    "n_unique_users": len(set(users)),
                },
            )
        ]
