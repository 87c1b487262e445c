"""Cumulative per-interface network counters, as Telegraf's `net` input reports them.

Counters come from /proc/net/dev, which shows the agent's own network namespace; the
interface flags from the SIOCGIFFLAGS ioctl (the same view). Which interfaces: the agent
config's ``net_interfaces`` / ``net_ignore_interfaces`` globs. Like Telegraf, interfaces
that are down are skipped, and so are loopback ones unless an include list is given (one
that matches ``lo`` reports it).
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct

from agent.collectors.base import (
    MAX_TAG_VALUES,
    CapWarner,
    CollectorOptions,
    FieldValue,
    MetricPoint,
    NameFilter,
    cap_names,
    read_text,
)

log = logging.getLogger("barista.agent.collectors")

IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
_SIOCGIFFLAGS, _SIOCGIFMTU = 0x8913, 0x8921

# /proc/net/dev columns after "name:" -> Telegraf field
_RX = ("bytes_recv", "packets_recv", "err_in", "drop_in")  # columns 0-3
_TX = ("bytes_sent", "packets_sent", "err_out", "drop_out")  # columns 8-11


def parse_net_dev(text: str) -> dict[str, dict[str, FieldValue]]:
    """/proc/net/dev -> interface -> Telegraf's net counters."""
    out: dict[str, dict[str, FieldValue]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        cols = rest.split()
        if not sep or len(cols) < 12:
            continue
        fields: dict[str, FieldValue] = {}
        for i, field in enumerate(_RX):
            fields[field] = int(cols[i])
        for i, field in enumerate(_TX):
            fields[field] = int(cols[8 + i])
        out[name.strip()] = fields
    return out


class InterfaceFlags:
    """SIOCGIFFLAGS / SIOCGIFMTU through one datagram socket, for one collection: use it
    as a context manager (a socket kept open between intervals would outlive agents that
    are dropped without closing their collectors)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def __enter__(self) -> InterfaceFlags:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _ioctl(self, request: int, name: str) -> bytes | None:
        try:
            return fcntl.ioctl(self._sock, request, struct.pack("16s16x", name.encode()[:15]))
        except OSError:
            return None  # gone since it was listed

    def flags(self, name: str) -> int | None:
        raw = self._ioctl(_SIOCGIFFLAGS, name)
        return None if raw is None else struct.unpack_from("H", raw, 16)[0]

    def mtu(self, name: str) -> int | None:
        raw = self._ioctl(_SIOCGIFMTU, name)
        return None if raw is None else struct.unpack_from("i", raw, 16)[0]


def interface_filter(opts: CollectorOptions) -> NameFilter:
    return NameFilter(opts.net_interfaces, opts.net_ignore_interfaces)


class NetCollector:
    """Measurement `net`, tag `interface`; cumulative counters since the interface came up."""

    name = "net"

    def __init__(
        self, options: CollectorOptions | None = None, *, max_interfaces: int = MAX_TAG_VALUES
    ) -> None:
        opts = options or CollectorOptions()
        self._proc = opts.proc
        self._filter = interface_filter(opts)
        # Interface names are tag values; bounded so a host with thousands of veths/taps
        # cannot flood the series count. Kept: the first in name order.
        self._max_interfaces = max_interfaces
        self._cap = CapWarner(log, "network interfaces", max_interfaces)

    def _wanted(self, name: str, ifs: InterfaceFlags) -> bool:
        if not self._filter(name):
            return False
        flags = ifs.flags(name)
        if flags is None or flags & IFF_UP == 0:
            return False  # gone, or administratively down (the link collector shows it)
        return self._filter.include_given or flags & IFF_LOOPBACK == 0

    def collect(self) -> list[MetricPoint]:
        text = read_text(f"{self._proc}/net/dev")
        counters = parse_net_dev(text) if text is not None else _psutil_counters()
        with InterfaceFlags() as ifs:
            wanted = [n for n in counters if self._wanted(n, ifs)]
        names, dropped = cap_names(wanted, self._max_interfaces)
        self._cap.dropped(dropped)
        return [MetricPoint("net", counters[n], {"interface": n}) for n in names]


def _psutil_counters() -> dict[str, dict[str, FieldValue]]:
    """Other platforms (no /proc): psutil's counters."""
    import psutil  # ~0.9 MB of RSS: only where /proc is missing

    out: dict[str, dict[str, FieldValue]] = {}
    for name, io in psutil.net_io_counters(pernic=True).items():
        out[str(name)] = {
            "bytes_sent": int(io.bytes_sent), "bytes_recv": int(io.bytes_recv),
            "packets_sent": int(io.packets_sent), "packets_recv": int(io.packets_recv),
            "err_in": int(io.errin), "err_out": int(io.errout), "drop_in": int(io.dropin),
            "drop_out": int(io.dropout),
        }  # fmt: skip
    return out
