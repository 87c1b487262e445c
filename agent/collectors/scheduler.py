"""Builds collectors by name and runs them as a set, each isolated from the others' failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from agent.collectors.base import Collector, CollectorOptions, MetricPoint
from agent.collectors.conntrack import ConntrackCollector
from agent.collectors.cpu import CpuCollector
from agent.collectors.disk import DiskCollector
from agent.collectors.diskio import DiskIOCollector
from agent.collectors.kernel import KernelCollector
from agent.collectors.link import LinkCollector
from agent.collectors.load import LoadCollector
from agent.collectors.mem import MemCollector
from agent.collectors.net import NetCollector
from agent.collectors.netstat import NetstatCollector
from agent.collectors.nstat import NstatCollector
from agent.collectors.pressure import PressureCollector
from agent.collectors.processes import ProcessesCollector
from agent.collectors.sysctl_fs import SysctlFsCollector
from agent.collectors.system import SystemCollector
from agent.collectors.timex import TimexCollector
from agent.collectors.vmstat import VmstatCollector

log = logging.getLogger("barista.agent.collectors")

DEFAULT_COLLECTORS: tuple[str, ...] = (
    "cpu",
    "mem",
    "disk",
    "diskio",
    "net",
    "load",
    "system",
    "processes",
    "kernel",
    "kernel_vmstat",
    "pressure",
    "nstat",
    "netstat",
    "conntrack",
    "linux_sysctl_fs",
    "timex",
    "link",
)

# Read-only so no caller can register into a registry shared by every agent in the process.
# Each entry builds a collector from the agent's options.
COLLECTORS: Mapping[str, Callable[[CollectorOptions], Collector]] = MappingProxyType(
    {
        "cpu": CpuCollector,
        "mem": MemCollector,
        "disk": DiskCollector,
        "diskio": DiskIOCollector,
        "net": NetCollector,
        "load": LoadCollector,
        "system": SystemCollector,
        "processes": ProcessesCollector,
        "kernel": KernelCollector,
        "kernel_vmstat": VmstatCollector,
        "pressure": PressureCollector,
        "nstat": NstatCollector,
        "netstat": NetstatCollector,
        "conntrack": ConntrackCollector,
        "linux_sysctl_fs": SysctlFsCollector,
        "timex": TimexCollector,
        "link": LinkCollector,
    }
)

# An error message travels in every MetricBatch while the collector keeps failing.
_MAX_ERROR_LEN = 200


def build_collectors(
    names: Iterable[str] | None = None, options: CollectorOptions | None = None
) -> list[Collector]:
    """New collector instances for `names` (default: all of DEFAULT_COLLECTORS), in order,
    built with `options` (the config's include/exclude globs).

    Raises ValueError naming the unknown names and the valid ones. Repeats are dropped.
    """
    if isinstance(names, str):
        # A bare "cpu" would otherwise iterate as "c", "p", "u".
        raise ValueError(f"collector names must be a list of names, not the string {names!r}")
    wanted = list(DEFAULT_COLLECTORS if names is None else names)
    unknown = [n for n in wanted if n not in COLLECTORS]
    if unknown:
        raise ValueError(
            f"unknown collector(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(COLLECTORS)}"
        )
    opts = options or CollectorOptions()
    return [COLLECTORS[n](opts) for n in dict.fromkeys(wanted)]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_LEN else text[: _MAX_ERROR_LEN - 3] + "..."


class CollectorSet:
    """Runs collectors one after another; one that raises is reported, not fatal.

    State that spans calls (cpu deltas, who is failing) lives in the instances, so many
    agents can each own a set in one process. Calls are serialised by a lock.
    """

    def __init__(self, collectors: list[Collector]) -> None:
        names = [c.name for c in collectors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate collector name(s): {', '.join(dupes)}")
        self.collectors: list[Collector] = list(collectors)
        self.failures: dict[str, int] = {}  # collector name -> failed calls since start
        self.last_duration_ms: dict[str, float] = {}  # collector name -> cost of last call
        self._failing: set[str] = set()  # logged as failing; not logged again until recovered
        self._lock = threading.Lock()

    def collect_all(self) -> tuple[list[MetricPoint], dict[str, str]]:
        """Points from every collector that succeeded, and name -> error for the others."""
        points: list[MetricPoint] = []
        errors: dict[str, str] = {}
        with self._lock:
            for collector in self.collectors:
                name = collector.name
                start = time.perf_counter()
                try:
                    got = collector.collect()
                except Exception as exc:
                    errors[name] = _describe(exc)
                    self.failures[name] = self.failures.get(name, 0) + 1
                    if name not in self._failing:
                        # Once per outage: a collector failing every 10 s must not
                        # fill the disk with the same traceback.
                        self._failing.add(name)
                        log.warning("collector %s failed: %s", name, errors[name], exc_info=True)
                else:
                    points.extend(got)
                    if name in self._failing:
                        self._failing.discard(name)
                        log.info(
                            "collector %s recovered (%d failed calls since start)",
                            name,
                            self.failures.get(name, 0),
                        )
                finally:
                    self.last_duration_ms[name] = (time.perf_counter() - start) * 1000.0
        return points, errors

    async def collect_async(self) -> tuple[list[MetricPoint], dict[str, str]]:
        """`collect_all` in a worker thread, so /proc reads never stall the event loop."""
        return await asyncio.to_thread(self.collect_all)
