"""Pressure stall information (/proc/pressure), as Telegraf's kernel input reports it with
``collect = ["psi"]``: measurement `pressure`, tags resource (cpu, memory, io) and type
(some, full); fields avg10, avg60, avg300 (percent of time stalled) and total (µs, since
boot). cpu/full is left out, as Telegraf does (always zero before Linux 5.13)."""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint

RESOURCES = ("cpu", "memory", "io")


def parse_psi(text: str) -> dict[str, dict[str, FieldValue]]:
    """``some avg10=0.00 avg60=0.00 avg300=0.00 total=0`` lines -> type -> fields."""
    out: dict[str, dict[str, FieldValue]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields: dict[str, FieldValue] = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "total":
                fields["total"] = int(value)
            elif key in ("avg10", "avg60", "avg300"):
                fields[key] = float(value)
        if fields:
            out[kind] = fields
    return out


class PressureCollector:
    """Measurement `pressure`; nothing on kernels without PSI (or booted with psi=0)."""

    name = "pressure"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        points: list[MetricPoint] = []
        for resource in RESOURCES:
            try:
                with open(f"{self._proc}/pressure/{resource}", "rb") as f:
                    text = f.read().decode("ascii", "replace")
            except OSError:  # absent, or EOPNOTSUPP with psi=0
                continue
            for kind, fields in parse_psi(text).items():
                if resource == "cpu" and kind == "full":
                    continue
                points.append(MetricPoint("pressure", fields, {"resource": resource, "type": kind}))
        return points
