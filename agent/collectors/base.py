"""The collector protocol and the small helpers that every collector shares."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from protocol.messages import FieldValue, MetricPoint

__all__ = [
    "MAX_TAG_VALUES",
    "CapWarner",
    "Collector",
    "FieldValue",
    "MetricPoint",
    "cap_names",
    "percent",
]

# Upper bound on the distinct values a per-item tag (cpu, interface, device, mount path)
# can take on one machine. Every series costs memory in InfluxDB forever, and a machine
# with thousands of veths or loop devices must not blow up the fleet's cardinality.
MAX_TAG_VALUES = 64


class Collector(Protocol):
    """One source of metrics. `collect` is synchronous: psutil reads /proc, which is fast."""

    name: str

    def collect(self) -> list[MetricPoint]: ...


def cap_names(names: Iterable[str], limit: int) -> tuple[list[str], int]:
    """Keep the first `limit` names in sorted order; return them and how many were dropped.

    Sorting makes the kept set stable from one interval to the next, so a series does not
    flicker in and out when the order the kernel lists devices in changes.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ordered = sorted(set(names))
    return ordered[:limit], max(0, len(ordered) - limit)


def percent(part: float, whole: float) -> float:
    """`100 * part / whole`, clamped to [0, 100]; 0 when `whole` is not positive."""
    if whole <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 * part / whole))


class CapWarner:
    """Logs once per collector instance that a cap dropped items, not every interval."""

    def __init__(self, logger: logging.Logger, what: str, limit: int) -> None:
        self._logger = logger
        self._what = what
        self._limit = limit
        self._warned = False

    def dropped(self, count: int) -> None:
        if count > 0 and not self._warned:
            self._warned = True
            self._logger.warning(
                "%d %s over the cap of %d are not reported", count, self._what, self._limit
            )
