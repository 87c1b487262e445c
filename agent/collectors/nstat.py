"""Kernel network counters (/proc/net/netstat, snmp, snmp6), as Telegraf's `nstat` input
names them: field = section prefix + counter (``TcpRetransSegs``, ``TcpExtListenDrops``,
``TcpExtListenOverflows``, ``Ip6InReceives``); tag ``name`` = netstat, snmp or snmp6.
Zeros are sent (Telegraf's ``dump_zeros = true``), so a counter's series never has holes."""

from __future__ import annotations

from agent.collectors.base import (
    CollectorOptions,
    FieldValue,
    MetricPoint,
    parse_name_values,
    read_text,
)


def parse_paired_table(text: str) -> dict[str, FieldValue]:
    """netstat/snmp: a header line ``Tcp: A B`` followed by a value line ``Tcp: 1 2``."""
    out: dict[str, FieldValue] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        names, nums = header.split(), values.split()
        if not names or len(names) != len(nums) or names[0] != nums[0]:
            continue
        prefix = names[0].rstrip(":")
        for name, num in zip(names[1:], nums[1:], strict=True):
            try:
                out[prefix + name] = int(num)
            except ValueError:
                continue
    return out


def parse_flat_table(text: str) -> dict[str, FieldValue]:
    """snmp6: one ``Name value`` pair per line."""
    return dict(parse_name_values(text))


class NstatCollector:
    """Measurement `nstat`, one point per file that exists (snmp6 only with IPv6)."""

    name = "nstat"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._proc = (options or CollectorOptions()).proc

    def collect(self) -> list[MetricPoint]:
        points: list[MetricPoint] = []
        for file, parse in (
            ("netstat", parse_paired_table),
            ("snmp", parse_paired_table),
            ("snmp6", parse_flat_table),
        ):
            text = read_text(f"{self._proc}/net/{file}")
            if text is not None and (fields := parse(text)):
                points.append(MetricPoint("nstat", fields, {"name": file}))
        return points
