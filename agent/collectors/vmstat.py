"""Every /proc/vmstat counter, as Telegraf's `kernel_vmstat` input sends them (oom_kill,
pgmajfault, pswpin, ...: the names are the kernel's)."""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, MetricPoint, read_text
from agent.collectors.mem import parse_vmstat


class VmstatCollector:
    """Measurement `kernel_vmstat`, one int field per /proc/vmstat line; no tags."""

    name = "kernel_vmstat"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        text = read_text(f"{self._proc}/vmstat")
        if text is None:
            return []
        fields = parse_vmstat(text)
        return [MetricPoint("kernel_vmstat", dict(fields))] if fields else []
