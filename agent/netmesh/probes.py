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

from agent.netmesh.host import Host

MAGIC = b"BMP1"
_FMT = struct.Struct("!4sBIQ")
PROBE_PORT = 51900
# Datagrams read per wake-up of the socket at most. asyncio's datagram transport reads one
# per event-loop iteration: with 300 datagrams/s to answer (30 peers, 0.2 s) and a loop
# that takes 20 ms an iteration (a busy agent), the socket's buffer filled, answers waited
# there for seconds (counted lost) and the rest were dropped.
READ_BATCH = 256


@dataclass(slots=True)
class PeerProbes:
    sent: int = 0
    received: int = 0
    late: int = 0  # answers after the timeout (in ``sent``, not in ``received``)
    rtts: list[float] = field(default_factory=list)  # seconds, this window

    def summary(self) -> tuple[float, float, int, int]:
        """(rtt ms median or -1, loss 0..1, sent, received) of the window."""
        rtt = sorted(self.rtts)[len(self.rtts) // 2] * 1000 if self.rtts else -1.0
        loss = 1.0 - self.received / self.sent if self.sent else 0.0
        return rtt, max(0.0, loss), self.sent, self.received


class Prober:
    """Echo responder and prober of one network on one node."""

    def __init__(self, *, host: Host, address: str, targets: Callable[[], Iterable[tuple[str,
                 str]]], port: int = PROBE_PORT, interval: float = 1.0, timeout: float = 2.0,
                 steady: float = 1.0, log: logging.Logger | None = None) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.targets = targets  # () -> (node id, overlay address) pairs
        # Every round (``interval``) probes the peers that have not answered yet (new ones:
        # whether and when they become reachable is what is not known); a peer that has
        # answered is probed every ``steady`` (not faster than the rounds), enough for its
        # RTT and loss, and the probes of N peers stop costing N / interval packets a second
        # each way on every node once the network is up.
        self.interval = interval
        self.steady = max(interval, steady)
        self._answered: set[tuple[str, str]] = set()  # (node id, address) that answered
        self._last_sent: dict[str, int] = {}  # node id -> when (monotonic ns)
        self.timeout = timeout
        self.log = log or logging.getLogger("barista.netmesh.probes")
        self.window: dict[str, PeerProbes] = {}
        self._pending: dict[tuple[str, int], tuple[str, int]] = {}  # (addr, seq) -> (node, ns)
        self._seq = 0
        self._node_of: dict[str, str] = {}  # overlay address -> node id, of the last round
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.answered = 0
        self.garbage = 0
        # answers that came after their probe's timeout (counted lost): a sign the path,
        # or this process, is overloaded; the slowest one's RTT, seconds
        self.late = 0
        self.late_max = 0.0

    async def __aenter__(self) -> Prober:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = await asyncio.to_thread(self.host.open_socket, family, socket.SOCK_DGRAM)
        try:
            # The overlay address may not be configured yet a moment after the interface.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            sock.bind((self.address, self.port))
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.create_task(self._loop(), name=f"probe-{self.address}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        """Everything queued on the socket (up to READ_BATCH), not one datagram a loop
        iteration: answers are timed when they arrive, not when the loop gets to them."""
        sock = self._sock
        for _ in range(READ_BATCH):
            if sock is None:
                return
            try:
                data, addr = sock.recvfrom(64)  # a probe is 17 bytes: longer is garbage
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.debug("probe socket %s: %s", self.address, exc)
                return
            self._received(data, addr)

    def _send(self, data: bytes, addr: tuple[str, int]) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto(data, addr)
            return True
        except OSError as exc:  # no route yet, or a full send buffer: counts as lost
            self.log.debug("probe to %s: %s", addr[0], exc)
            return False

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) != _FMT.size:
            self.garbage += 1
            return
        magic, kind, seq, sent = _FMT.unpack(data)
        if magic != MAGIC:
            self.garbage += 1
            return
        if kind == 0:
            if self._send(_FMT.pack(MAGIC, 1, seq, sent), addr):
                self.answered += 1
            return
        pending = self._pending.pop((addr[0], seq), None)
        if pending is None:
            # late (already counted lost), or not ours: our probes carry our clock
            rtt = (time.monotonic_ns() - sent) / 1e9
            node_id = self._node_of.get(addr[0])
            if node_id is not None and self.timeout < rtt < 3600.0:
                self.late += 1
                self.late_max = max(self.late_max, rtt)
                self.window.setdefault(node_id, PeerProbes()).late += 1
                self._answered.add((node_id, addr[0]))  # reachable; and more would queue
            return
        node_id, sent_ns = pending
        stats = self.window.setdefault(node_id, PeerProbes())
        rtt = (time.monotonic_ns() - sent_ns) / 1e9
        self._answered.add((node_id, addr[0]))
        if rtt > self.timeout:  # not expired yet only because no round ran since
            self.late += 1
            self.late_max = max(self.late_max, rtt)
            stats.late += 1
            return
        stats.received += 1
        stats.rtts.append(rtt)

    def probe_once(self) -> None:
        if self._sock is None:
            return
        now = time.monotonic_ns()
        expired = [k for k, (_, ns) in self._pending.items() if now - ns > self.timeout * 1e9]
        for k in expired:
            del self._pending[k]
        self._node_of = {}
        steady = int(self.steady * 1e9) - int(self.interval * 1e9) // 2  # the round's jitter
        last_sent, self._last_sent = self._last_sent, {}
        for node_id, address in self.targets():
            self._node_of[address] = node_id
            last = last_sent.get(node_id)
            if last is not None and (node_id, address) in self._answered \
                    and now - last < steady:
                self._last_sent[node_id] = last
                continue
            self._last_sent[node_id] = now
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._pending[(address, self._seq)] = (node_id, now)
            self.window.setdefault(node_id, PeerProbes()).sent += 1
            self._send(_FMT.pack(MAGIC, 0, self._seq, now), (address, self.port))
        self._answered.intersection_update((n, a) for a, n in self._node_of.items())

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
