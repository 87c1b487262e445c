"""RTT and loss to each peer over the overlay: a UDP echo on every node's overlay address
(ICMP would need raw sockets), one socket that answers probes and sends its own.

A probe is ``MAGIC | kind (0 ask, 1 answer) | seq (u32) | sent (u64 ns)``; anything else is
dropped. Answers are matched by (peer address, seq); a probe not answered within
``timeout`` counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

from agent.netmesh.host import Host

MAGIC = b"BMP1"
_FMT = struct.Struct("!4sBIQ")
PROBE_PORT = 51900


@dataclass(slots=True)
class PeerProbes:
    sent: int = 0
    received: int = 0
    rtts: list[float] = field(default_factory=list)  # seconds, this window

    def summary(self) -> tuple[float, float, int, int]:
        """(rtt ms median or -1, loss 0..1, sent, received) of the window."""
        rtt = sorted(self.rtts)[len(self.rtts) // 2] * 1000 if self.rtts else -1.0
        loss = 1.0 - self.received / self.sent if self.sent else 0.0
        return rtt, max(0.0, loss), self.sent, self.received


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, owner: Prober) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner._received(data, addr)


class Prober:
    """Echo responder and prober of one network on one node."""

    def __init__(self, *, host: Host, address: str, targets: Callable[[], Iterable[tuple[str,
                 str]]], port: int = PROBE_PORT, interval: float = 1.0, timeout: float = 2.0,
                 log: logging.Logger | None = None) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.targets = targets  # () -> (node id, overlay address) pairs
        self.interval = interval
        self.timeout = timeout
        self.log = log or logging.getLogger("barista.netmesh.probes")
        self.window: dict[str, PeerProbes] = {}
        self._pending: dict[tuple[str, int], tuple[str, int]] = {}  # (addr, seq) -> (node, ns)
        self._seq = 0
        self._proto: _Proto | None = None
        self._task: asyncio.Task[None] | None = None
        self.answered = 0
        self.garbage = 0

    async def __aenter__(self) -> Prober:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = await asyncio.to_thread(self.host.open_socket, family, socket.SOCK_DGRAM)
        try:
            # The overlay address may not be configured yet a moment after the interface.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            sock.bind((self.address, self.port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
        self._proto = proto
        self._task = asyncio.create_task(self._loop(), name=f"probe-{self.address}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) != _FMT.size:
            self.garbage += 1
            return
        magic, kind, seq, sent = _FMT.unpack(data)
        if magic != MAGIC:
            self.garbage += 1
            return
        if kind == 0:
            if self._proto is not None and self._proto.transport is not None:
                self._proto.transport.sendto(_FMT.pack(MAGIC, 1, seq, sent), addr)
                self.answered += 1
            return
        pending = self._pending.pop((addr[0], seq), None)
        if pending is None:
            return  # late (already counted lost) or not ours
        node_id, sent_ns = pending
        stats = self.window.setdefault(node_id, PeerProbes())
        stats.received += 1
        stats.rtts.append((time.monotonic_ns() - sent_ns) / 1e9)

    def probe_once(self) -> None:
        if self._proto is None or self._proto.transport is None:
            return
        now = time.monotonic_ns()
        expired = [k for k, (_, ns) in self._pending.items() if now - ns > self.timeout * 1e9]
        for k in expired:
            del self._pending[k]
        for node_id, address in self.targets():
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._pending[(address, self._seq)] = (node_id, now)
            self.window.setdefault(node_id, PeerProbes()).sent += 1
            try:
                self._proto.transport.sendto(_FMT.pack(MAGIC, 0, self._seq, now),
                                             (address, self.port))
            except OSError as exc:  # no route yet: counts as lost
                self.log.debug("probe to %s: %s", address, exc)

    def take_window(self) -> dict[str, PeerProbes]:
        """The window's counters (in-flight probes are left to the next window)."""
        window, self.window = self.window, {}
        in_flight: dict[str, int] = {}
        for node_id, _ in self._pending.values():
            in_flight[node_id] = in_flight.get(node_id, 0) + 1
        for node_id, n in in_flight.items():
            if node_id in window:
                window[node_id].sent -= n
                self.window.setdefault(node_id, PeerProbes()).sent += n
        return window

    async def _loop(self) -> None:
        while True:
            self.probe_once()
            await asyncio.sleep(self.interval)
