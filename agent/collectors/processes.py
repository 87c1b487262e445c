"""Process counts by state, as Telegraf's `processes` input reports them (counts only)."""

from __future__ import annotations

import os

import psutil

from agent.collectors.base import FieldValue, MetricPoint

_PROC = "/proc"

# /proc/<pid>/stat state letter -> Telegraf field (same mapping as Telegraf on Linux).
_STATE_FIELD = {
    "R": "running",
    "S": "sleeping",
    "D": "blocked",
    "Z": "zombies",
    "X": "dead",
    "x": "dead",
    "T": "stopped",
    "t": "stopped",
    "W": "paging",
    "I": "idle",
    "P": "parked",
}
_PSUTIL_FIELD = {
    psutil.STATUS_RUNNING: "running",
    psutil.STATUS_SLEEPING: "sleeping",
    psutil.STATUS_DISK_SLEEP: "blocked",
    psutil.STATUS_ZOMBIE: "zombies",
    psutil.STATUS_DEAD: "dead",
    psutil.STATUS_STOPPED: "stopped",
    psutil.STATUS_TRACING_STOP: "stopped",
    psutil.STATUS_IDLE: "idle",
    psutil.STATUS_PARKED: "parked",
    psutil.STATUS_WAKING: "running",
}
_ZERO = (
    "running", "sleeping", "blocked", "zombies", "stopped", "idle", "dead", "paging", "parked",
    "unknown",
)  # fmt: skip


def _count_proc() -> dict[str, FieldValue] | None:
    """Read each /proc/<pid>/stat once: one small read per process, no psutil objects."""
    try:
        entries = os.scandir(_PROC)
    except FileNotFoundError:
        return None
    counts: dict[str, int] = dict.fromkeys(_ZERO, 0)
    total = threads = 0
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{_PROC}/{entry.name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue  # exited between listing and reading
            # comm (field 2) may hold spaces and parentheses: split after the last ')'.
            rest = data.rpartition(b")")[2].split()
            if len(rest) < 18:
                continue
            total += 1
            field = _STATE_FIELD.get(rest[0].decode("ascii", "replace"), "unknown")
            counts[field] = counts.get(field, 0) + 1
            threads += int(rest[17])  # num_threads, field 20 of stat
    return {"total": total, "total_threads": threads, **counts}


def _count_psutil() -> dict[str, FieldValue]:
    """Portable fallback: statuses only, so total_threads is not reported."""
    counts: dict[str, int] = dict.fromkeys(_ZERO, 0)
    total = 0
    for proc in psutil.process_iter(attrs=["status"]):
        total += 1
        field = _PSUTIL_FIELD.get(proc.info.get("status"), "unknown")
        counts[field] += 1
    return {"total": total, **counts}


class ProcessesCollector:
    """Measurement `processes`: total, running, sleeping, ..., total_threads; no tags."""

    name = "processes"

    def collect(self) -> list[MetricPoint]:
        fields = _count_proc()
        if fields is None:
            fields = _count_psutil()
        return [MetricPoint("processes", fields)]
