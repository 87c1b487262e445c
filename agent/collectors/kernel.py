"""Kernel counters from /proc/stat, as Telegraf's `kernel` input names them."""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint, read_int, read_text

# /proc/stat line -> Telegraf field (the line's first number)
_STAT = {
    "intr": "interrupts",
    "ctxt": "context_switches",
    "processes": "processes_forked",
    "btime": "boot_time",
}


def kernel_fields(stat: str, entropy: int | None) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {}
    for line in stat.splitlines():
        key, _, rest = line.partition(" ")
        field = _STAT.get(key)
        if field is not None:
            fields[field] = int(rest.split()[0])
        elif key == "page":  # kernels before 2.6 only; Telegraf reads it when there
            pages = rest.split()
            fields["disk_pages_in"], fields["disk_pages_out"] = int(pages[0]), int(pages[1])
    if entropy is not None:
        fields["entropy_avail"] = entropy
    return fields


class KernelCollector:
    """Measurement `kernel`: interrupts, context_switches, processes_forked (cumulative
    since boot), boot_time (epoch s) and entropy_avail."""

    name = "kernel"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        stat = read_text(f"{self._proc}/stat")
        if stat is None:
            return []  # not Linux
        entropy = read_int(f"{self._proc}/sys/kernel/random/entropy_avail")
        return [MetricPoint("kernel", kernel_fields(stat, entropy))]
