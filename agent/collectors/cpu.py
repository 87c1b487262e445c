"""CPU usage in percent from /proc/stat deltas, as Telegraf's `cpu` input computes it."""

from __future__ import annotations

import logging
from typing import Any

from agent.collectors.base import (
    MAX_TAG_VALUES,
    CapWarner,
    CollectorOptions,
    FieldValue,
    MetricPoint,
    read_text,
)

log = logging.getLogger("barista.agent.collectors")

# Linux's user time already includes guest and nice includes guest_nice, so the total
# leaves the guest columns out and usage_user/usage_nice subtract them (Telegraf does
# the same); that way the ten usage_* fields other than usage_active sum to 100.
_TOTAL_PARTS = ("user", "system", "nice", "iowait", "irq", "softirq", "steal", "idle")
# The columns of a /proc/stat cpu line, in order (ticks; only ratios are used).
_STAT_COLUMNS = (
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice",
)  # fmt: skip


class _Raw:
    """A /proc/stat cpu line in psutil's cpu_times shape (attributes by column name)."""

    def __init__(self, label: str, values: list[str]) -> None:
        self.label = label
        for name, value in zip(_STAT_COLUMNS, values, strict=False):
            setattr(self, name, float(value))


def parse_stat_cpus(text: str) -> tuple[Any, list[Any]]:
    """(the aggregate ``cpu`` line, the ``cpuN`` lines in order) of /proc/stat."""
    total: Any = None
    per: list[Any] = []
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        parts = line.split()
        if parts[0] == "cpu":
            total = _Raw("cpu-total", parts[1:])
        else:
            per.append(_Raw(parts[0], parts[1:]))
    return total, per


class _Times:
    """The cpu_times columns this collector needs; platforms lacking one read as 0."""

    __slots__ = ("guest", "guest_nice", "idle", "label", "total", "values")

    def __init__(self, raw: Any, label: str = "") -> None:
        self.label = getattr(raw, "label", label)
        self.values = {f: float(getattr(raw, f, 0.0)) for f in _TOTAL_PARTS}
        self.guest = float(getattr(raw, "guest", 0.0))
        self.guest_nice = float(getattr(raw, "guest_nice", 0.0))
        self.idle = self.values["idle"]
        self.total = sum(self.values.values())


def _usage(now: _Times, last: _Times) -> dict[str, FieldValue] | None:
    total = now.total - last.total
    if total <= 0:
        # No tick elapsed (two calls within one jiffy) or the counters went backwards
        # (CPU hot-plug); Telegraf skips the sample too rather than divide by zero.
        return None

    def pct(delta: float) -> float:
        return min(100.0, max(0.0, 100.0 * delta / total))

    d = {f: now.values[f] - last.values[f] for f in _TOTAL_PARTS}
    guest = now.guest - last.guest
    guest_nice = now.guest_nice - last.guest_nice
    return {
        "usage_user": pct(d["user"] - guest),
        "usage_system": pct(d["system"]),
        "usage_idle": pct(d["idle"]),
        "usage_nice": pct(d["nice"] - guest_nice),
        "usage_iowait": pct(d["iowait"]),
        "usage_irq": pct(d["irq"]),
        "usage_softirq": pct(d["softirq"]),
        "usage_steal": pct(d["steal"]),
        "usage_guest": pct(guest),
        "usage_guest_nice": pct(guest_nice),
        "usage_active": pct(total - d["idle"]),
    }


class CpuCollector:
    """Measurement `cpu`, tag `cpu` = `cpu0`.. and `cpu-total`; the first call only primes."""

    name = "cpu"

    def __init__(
        self,
        options: CollectorOptions | None = None,
        *,
        percpu: bool = True,
        totalcpu: bool = True,
        max_cpus: int = MAX_TAG_VALUES,
    ) -> None:
        self._proc = (options or CollectorOptions()).proc
        self._percpu = percpu
        self._totalcpu = totalcpu
        # Per-CPU series are bounded by the core count, but a 192-core host would still
        # send 192 points per interval; past the cap only cpu-total is reported.
        self._max_cpus = max_cpus
        self._cap = CapWarner(log, "per-cpu series (only cpu-total is sent)", max_cpus)
        self._last_total: _Times | None = None
        self._last_per: list[_Times] | None = None

    def _read(self) -> tuple[Any, list[Any]]:
        text = read_text(f"{self._proc}/stat")
        if text is not None:
            return parse_stat_cpus(text)
        import psutil  # other platforms only: ~0.9 MB of RSS

        return psutil.cpu_times(percpu=False), list(psutil.cpu_times(percpu=True))

    def collect(self) -> list[MetricPoint]:
        points: list[MetricPoint] = []
        raw_total, raw_per = self._read()
        if self._percpu:
            # Offline CPUs are absent from /proc/stat: the tag is the kernel's name.
            per = [_Times(t, f"cpu{i}") for i, t in enumerate(raw_per)]
            if len(per) > self._max_cpus:
                self._cap.dropped(len(per))
            else:
                last = self._last_per
                # A changed CPU count (hot-plug) makes the old sample useless: re-prime.
                if last is not None and [t.label for t in last] == [t.label for t in per]:
                    for now, before in zip(per, last, strict=True):
                        fields = _usage(now, before)
                        if fields is not None:
                            points.append(MetricPoint("cpu", fields, {"cpu": now.label}))
                self._last_per = per
        if self._totalcpu:
            if raw_total is None:
                return points
            total = _Times(raw_total)
            if self._last_total is not None:
                fields = _usage(total, self._last_total)
                if fields is not None:
                    points.append(MetricPoint("cpu", fields, {"cpu": "cpu-total"}))
            self._last_total = total
        return points
