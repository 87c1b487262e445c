"""Process counts by state, as Telegraf's `processes` input reports them (counts only)."""

from __future__ import annotations

import os

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint

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
# psutil's STATUS_* values (plain strings) -> Telegraf field, for the fallback.
_PSUTIL_FIELD = {
    "running": "running",
    "sleeping": "sleeping",
    "disk-sleep": "blocked",
    "zombie": "zombies",
    "dead": "dead",
    "stopped": "stopped",
    "tracing-stop": "stopped",
    "idle": "idle",
    "parked": "parked",
    "waking": "running",
}
_ZERO = (
    "running", "sleeping", "blocked", "zombies", "stopped", "idle", "dead", "paging", "parked",
    "unknown",
)  # fmt: skip


def _count_proc(proc: str) -> dict[str, FieldValue] | None:
    """Read each /proc/<pid>/stat once: one small read per process, no psutil objects."""
    try:
        entries = os.scandir(proc)
    except FileNotFoundError:
        return None
    counts: dict[str, int] = dict.fromkeys(_ZERO, 0)
    total = threads = 0
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{proc}/{entry.name}/stat", "rb") as f:
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
    import psutil  # ~0.9 MB of RSS: only where /proc is missing

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

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        fields = _count_proc(self._proc)
        if fields is None:
            fields = _count_psutil()
        return [MetricPoint("processes", fields)]
