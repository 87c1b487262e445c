"""Link state per interface: measurement `link`, tag ``interface``; fields ``up`` (1 when
administratively up and running, i.e. RFC 2863 "up"), ``admin_up``, ``mtu`` and ``speed``
(Mbit/s as the driver reports it, -1 when unknown: virtual links, no carrier). Telegraf's
`net` has no such fields; the meaning follows node-exporter's netclass. Interfaces that are
down are reported (that is the point); loopback only when an include list is given."""

from __future__ import annotations

import logging
import socket

from agent.collectors.base import (
    MAX_TAG_VALUES,
    CapWarner,
    CollectorOptions,
    FieldValue,
    MetricPoint,
    cap_names,
    read_int,
    read_text,
)
from agent.collectors.net import (
    IFF_LOOPBACK,
    IFF_RUNNING,
    IFF_UP,
    InterfaceFlags,
    interface_filter,
    parse_net_dev,
)

log = logging.getLogger("barista.agent.collectors")


class LinkCollector:
    name = "link"

    def __init__(
        self, options: CollectorOptions | None = None, *, max_interfaces: int = MAX_TAG_VALUES
    ) -> None:
        opts = options or CollectorOptions()
        self._proc, self._sys = opts.proc, opts.sys
        self._filter = interface_filter(opts)
        self._max_interfaces = max_interfaces
        self._cap = CapWarner(log, "network interfaces (link)", max_interfaces)

    def _speed(self, name: str) -> int:
        # /sys/class/net shows the namespace sysfs was mounted in, which may not be ours
        # (a process moved into a netns without remounting /sys): trust it only when it
        # knows this interface under the same index.
        base = f"{self._sys}/class/net/{name}"
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            return -1
        if read_int(f"{base}/ifindex") != index:
            return -1
        speed = read_int(f"{base}/speed")
        return speed if speed is not None and speed >= 0 else -1

    def collect(self) -> list[MetricPoint]:
        text = read_text(f"{self._proc}/net/dev")
        if text is None:
            return []
        states: dict[str, dict[str, FieldValue]] = {}
        with InterfaceFlags() as ifs:
            for name in parse_net_dev(text):
                if not self._filter(name):
                    continue
                flags = ifs.flags(name)
                if flags is None:
                    continue  # gone since it was listed
                if flags & IFF_LOOPBACK and not self._filter.include_given:
                    continue
                states[name] = {
                    "up": int(flags & IFF_UP != 0 and flags & IFF_RUNNING != 0),
                    "admin_up": int(flags & IFF_UP != 0),
                    "mtu": ifs.mtu(name) or 0,
                    "speed": self._speed(name),
                }
        names, dropped = cap_names(states, self._max_interfaces)
        self._cap.dropped(dropped)
        return [MetricPoint("link", states[n], {"interface": n}) for n in names]
