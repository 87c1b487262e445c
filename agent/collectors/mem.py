"""Memory and swap from /proc/meminfo, with Telegraf's (gopsutil's) names and formulas.

Every derived value is computed here, not taken from psutil, whose ``used`` changed meaning
(total - available since psutil 7.1; Telegraf's is total - free - buffers - cached):
- ``cached`` = Cached + SReclaimable (gopsutil adds the reclaimable slab to the page cache);
- ``used`` = total - free - buffered - cached, so used + free + buffered + cached = total;
- ``available`` = MemAvailable (kernels before 3.14 lack it: cached + free there);
- ``used_percent`` = 100 * used / total, ``available_percent`` = 100 * available / total;
- swap ``used`` = SwapTotal - SwapFree; ``in``/``out`` = pswpin/pswpout of /proc/vmstat
  times 4096 (gopsutil counts 4 KiB pages whatever the page size).
Fields a kernel does not list (HighTotal on 64-bit) are 0, as Telegraf sends them.
"""

from __future__ import annotations

from agent.collectors.base import (
    CollectorOptions,
    FieldValue,
    MetricPoint,
    parse_name_values,
    percent,
    read_text,
)

# /proc/meminfo key -> Telegraf `mem` field, for the values taken as they are (bytes, or
# a page count for the HugePages_ lines, which carry no unit).
MEMINFO_FIELDS = {
    "MemTotal": "total",
    "MemFree": "free",
    "Buffers": "buffered",
    "Active": "active",
    "Inactive": "inactive",
    "Writeback": "write_back",
    "WritebackTmp": "write_back_tmp",
    "Dirty": "dirty",
    "Shmem": "shared",
    "Slab": "slab",
    "SReclaimable": "sreclaimable",
    "SUnreclaim": "sunreclaim",
    "PageTables": "page_tables",
    "SwapCached": "swap_cached",
    "CommitLimit": "commit_limit",
    "Committed_AS": "committed_as",
    "HighTotal": "high_total",
    "HighFree": "high_free",
    "LowTotal": "low_total",
    "LowFree": "low_free",
    "SwapTotal": "swap_total",
    "SwapFree": "swap_free",
    "Mapped": "mapped",
    "VmallocTotal": "vmalloc_total",
    "VmallocUsed": "vmalloc_used",
    "VmallocChunk": "vmalloc_chunk",
    "HugePages_Total": "huge_pages_total",
    "HugePages_Free": "huge_pages_free",
    "Hugepagesize": "huge_page_size",
}
SWAP_PAGE = 4096  # gopsutil's multiplier for pswpin/pswpout


def parse_meminfo(text: str) -> dict[str, int]:
    """``Key: value [kB]`` lines -> key -> value in bytes (counts stay counts)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def mem_fields(info: dict[str, int]) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {f: info.get(k, 0) for k, f in MEMINFO_FIELDS.items()}
    total, free, buffered = info.get("MemTotal", 0), info.get("MemFree", 0), info.get("Buffers", 0)
    cached = info.get("Cached", 0) + info.get("SReclaimable", 0)
    available = info["MemAvailable"] if "MemAvailable" in info else cached + free
    # gopsutil's uint64 would wrap below 0 (LXCFS views can do that); 0 is what we send.
    used = max(0, total - free - buffered - cached)
    fields["cached"] = cached
    fields["available"] = available
    fields["used"] = used
    fields["used_percent"] = percent(used, total)
    fields["available_percent"] = percent(available, total)
    return fields


def swap_fields(info: dict[str, int], vmstat: dict[str, int]) -> dict[str, FieldValue]:
    total, free = info.get("SwapTotal", 0), info.get("SwapFree", 0)
    used = max(0, total - free)
    return {
        "total": total,
        "used": used,
        "free": free,
        "used_percent": percent(used, total),
        # Cumulative bytes swapped in/out since boot.
        "in": vmstat.get("pswpin", 0) * SWAP_PAGE,
        "out": vmstat.get("pswpout", 0) * SWAP_PAGE,
    }


# /proc/vmstat: one "name value" per line.
parse_vmstat = parse_name_values


class MemCollector:
    """Measurements `mem` (Telegraf's Linux fields) and `swap`."""

    name = "mem"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        meminfo = read_text(f"{self._proc}/meminfo")
        if meminfo is None:
            return _collect_psutil()
        info = parse_meminfo(meminfo)
        vmstat = parse_vmstat(read_text(f"{self._proc}/vmstat") or "")
        swap = swap_fields(info, vmstat)
        return [MetricPoint("mem", mem_fields(info)), MetricPoint("swap", swap)]


def _collect_psutil() -> list[MetricPoint]:
    """Other platforms: psutil's figures (imported only here: ~0.9 MB of RSS on Linux)."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    used = int(vm.used)
    mem: dict[str, FieldValue] = {
        "total": total, "available": available, "used": used, "free": int(vm.free),
        "available_percent": percent(available, total), "used_percent": percent(used, total),
    }  # fmt: skip
    for attr, field in (("cached", "cached"), ("buffers", "buffered"), ("active", "active"),
                        ("inactive", "inactive"), ("wired", "wired")):
        value = getattr(vm, attr, None)
        if value is not None:
            mem[field] = int(value)
    sw = psutil.swap_memory()
    swap: dict[str, FieldValue] = {
        "total": int(sw.total), "used": int(sw.used), "free": int(sw.free),
        "used_percent": percent(int(sw.used), int(sw.total)), "in": int(sw.sin),
        "out": int(sw.sout),
    }  # fmt: skip
    return [MetricPoint("mem", mem), MetricPoint("swap", swap)]
