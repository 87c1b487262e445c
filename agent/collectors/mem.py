"""Memory and swap, as Telegraf's `mem` and `swap` inputs name them."""

from __future__ import annotations

import psutil

from agent.collectors.base import FieldValue, MetricPoint, percent

# psutil attribute -> Telegraf field, for the fields only some platforms have. Telegraf
# calls the buffer cache "buffered", so dashboards expect that name, not psutil's.
_OPTIONAL = (
    ("cached", "cached"),
    ("buffers", "buffered"),
    ("active", "active"),
    ("inactive", "inactive"),
    ("shared", "shared"),
    ("slab", "slab"),
    ("wired", "wired"),
)


class MemCollector:
    """Measurements `mem` (total, available, used, free, *_percent, ...) and `swap`."""

    name = "mem"

    def collect(self) -> list[MetricPoint]:
        vm = psutil.virtual_memory()
        total = int(vm.total)
        available = int(vm.available)
        used = int(vm.used)
        mem: dict[str, FieldValue] = {
            "total": total,
            "available": available,
            "used": used,
            "free": int(vm.free),
            "available_percent": percent(available, total),
            "used_percent": percent(used, total),
        }
        for attr, field in _OPTIONAL:
            value = getattr(vm, attr, None)
            if value is not None:
                mem[field] = int(value)

        sw = psutil.swap_memory()
        swap_total = int(sw.total)
        swap_used = int(sw.used)
        swap: dict[str, FieldValue] = {
            "total": swap_total,
            "used": swap_used,
            "free": int(sw.free),
            "used_percent": percent(swap_used, swap_total),
            # Cumulative bytes swapped in/out since boot (Telegraf's "in"/"out").
            "in": int(sw.sin),
            "out": int(sw.sout),
        }
        return [MetricPoint("mem", mem), MetricPoint("swap", swap)]
