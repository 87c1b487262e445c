"""The lab's WAN: a small userspace IPv4 router on TUN devices that delays (and may drop)
packets per region pair, for kernels without ``netem`` (like these machines').

It runs as its own process in the lab's WAN namespace (``python -m
controller.provision.lab.router CONFIG``) and opens one TUN device, ``wan0``, inside each
region's namespace (and the gateway's), so that every kernel sees a packet once: a VM's
packet is routed by its region's namespace into ``wan0``, read here, held for half the
pair's round-trip time on a timer heap, and written into the destination region's ``wan0``.
Destinations outside the lab's prefixes are dropped: nothing leaves the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import heapq
import ipaddress
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

log = logging.getLogger("barista.lab.router")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
TUN_NAME = "wan0"
LAB_SPAN = "198.18.0.0/16"
READ_BURST = 64  # packets per readable callback, so that one busy link cannot starve others
MAX_QUEUED = 20_000  # packets held for delay at once; beyond, drop (a full router queue)
STATS_EVERY = 1.0


class RouterLink(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # a region name or "gateway"
    netns: str  # where its wan0 lives
    prefixes: list[str]  # destinations routed to this link
    address: str = ""  # an address for wan0 itself ("a.b.c.d/32"), "" for none


class RouterPair(msgspec.Struct, frozen=True, kw_only=True):
    src: str
    dst: str
    delay_ms: float  # one way
    loss: float = 0.0


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True):
    links: list[RouterLink]
    pairs: list[RouterPair]
    stats_path: str
    seed: int = 0


class PairStats(msgspec.Struct, kw_only=True):
    forwarded: int = 0
    bytes: int = 0
    lost: int = 0  # dropped by the configured loss
    overflow: int = 0  # dropped: the delay queue was full or the TUN refused the write


class RouterStats(msgspec.Struct, kw_only=True):
    ready: bool
    pid: int
    started_at: float
    updated_at: float
    no_route: int = 0  # destination outside the lab (or a private LAN): dropped
    not_ipv4: int = 0
    queued: int = 0
    pairs: dict[str, PairStats] = {}  # "src>dst"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_tun(name: str) -> int:
    """A TUN device (no packet info header) in the calling thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_tun_in(netns: str, name: str) -> int:
    """Open ``name`` inside ``netns`` and come back: the device stays there, the fd here."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target)
        try:
            return open_tun(name)
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, timeout=30)


class _Link:
    def __init__(self, index: int, config: RouterLink, fd: int) -> None:
        self.index = index
        self.name = config.name
        self.fd = fd
        self.nets = [ipaddress.IPv4Network(p) for p in config.prefixes]


class Router:
    """The forwarding loop. ``links`` are open TUN fds; pairs give delay and loss."""

    def __init__(self, config: RouterConfig, fds: Sequence[int]) -> None:
        self.config = config
        pairs = zip(config.links, fds, strict=True)
        self.links = [_Link(i, c, fd) for i, (c, fd) in enumerate(pairs)]
        by_name = {link.name: link for link in self.links}
        n = len(self.links)
        self._delay = [[0.0] * n for _ in range(n)]
        self._loss = [[0.0] * n for _ in range(n)]
        for p in config.pairs:
            s, d = by_name.get(p.src), by_name.get(p.dst)
            if s is not None and d is not None:
                self._delay[s.index][d.index] = p.delay_ms / 1000.0
                self._loss[s.index][d.index] = p.loss
        # Longest prefix first; (network int, mask int, link index).
        routes = [
            (int(net.network_address), int(net.netmask), net.prefixlen, link.index)
            for link in self.links
            for net in link.nets
        ]
        routes.sort(key=lambda r: -r[2])
        self._routes = [(a, m, i) for a, m, _, i in routes]
        self._rng = random.Random(config.seed)
        self._heap: list[tuple[float, int, int, bytes, PairStats]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")
        self._pairs: dict[tuple[int, int], PairStats] = {}
        self.stats = RouterStats(
            ready=False, pid=os.getpid(), started_at=time.time(), updated_at=time.time()
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    def _route(self, dst: int) -> int:
        for addr, mask, index in self._routes:
            if dst & mask == addr:
                return index
        return -1

    def _pair(self, s: int, d: int) -> PairStats:
        st = self._pairs.get((s, d))
        if st is None:
            st = self._pairs[(s, d)] = PairStats()
            self.stats.pairs[f"{self.links[s].name}>{self.links[d].name}"] = st
        return st

    def _readable(self, link: _Link) -> None:
        assert self._loop is not None
        for _ in range(READ_BURST):
            try:
                pkt = os.read(link.fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("read from %s failed: %s", link.name, exc)
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                self.stats.not_ipv4 += 1
                continue
            out = self._route(int.from_bytes(pkt[16:20], "big"))
            if out < 0 or out == link.index:
                self.stats.no_route += 1
                continue
            st = self._pair(link.index, out)
            loss = self._loss[link.index][out]
            if loss and self._rng.random() < loss:
                st.lost += 1
                continue
            delay = self._delay[link.index][out]
            if delay <= 0:
                self._write(self.links[out].fd, pkt, st)
                continue
            if len(self._heap) >= MAX_QUEUED:
                st.overflow += 1
                continue
            due = self._loop.time() + delay
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, self.links[out].fd, pkt, st))
            if due < self._timer_due:
                self._arm(due)

    def _write(self, fd: int, pkt: bytes, st: PairStats) -> None:
        try:
            os.write(fd, pkt)
        except OSError:
            st.overflow += 1
            return
        st.forwarded += 1
        st.bytes += len(pkt)

    def _arm(self, due: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_at(due, self._flush)

    def _flush(self) -> None:
        assert self._loop is not None
        self._timer = None
        self._timer_due = float("inf")
        now = self._loop.time() + 0.0002  # the selector's granularity: send what is due
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, fd, pkt, st = heapq.heappop(heap)
            self._write(fd, pkt, st)
        if heap:
            self._arm(heap[0][0])

    def _write_stats(self, ready: bool) -> None:
        self.stats.ready = ready
        self.stats.updated_at = time.time()
        self.stats.queued = len(self._heap)
        path = Path(self.config.stats_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(self.stats))
        os.replace(tmp, path)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        for link in self.links:
            self._loop.add_reader(link.fd, self._readable, link)
        self._write_stats(True)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), STATS_EVERY)
                except TimeoutError:
                    pass
                self._write_stats(True)
        finally:
            for link in self.links:
                self._loop.remove_reader(link.fd)
            if self._timer is not None:
                self._timer.cancel()


def setup_links(config: RouterConfig) -> list[int]:
    """Open every link's wan0 in its namespace, bring it up and route the lab through it."""
    fds = []
    for link in config.links:
        fd = open_tun_in(link.netns, TUN_NAME)
        fds.append(fd)
        if link.address:
            _ip(link.netns, "addr", "replace", link.address, "dev", TUN_NAME)
        _ip(link.netns, "link", "set", TUN_NAME, "up")
        _ip(link.netns, "route", "replace", LAB_SPAN, "dev", TUN_NAME)
    return fds


async def amain(config: RouterConfig) -> None:
    fds = setup_links(config)
    router = Router(config, fds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.run(stop)
    finally:
        for fd in fds:
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="barista-lab-router", description=__doc__)
    parser.add_argument("config", type=Path, help="the router's JSON config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = msgspec.json.decode(args.config.read_bytes(), type=RouterConfig)
    except (OSError, msgspec.DecodeError) as exc:
        print(f"router config {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(amain(config))
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"router failed: {exc}", file=sys.stderr)
        return 1
    return 0


def read_stats(path: Path) -> RouterStats | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=RouterStats)
    except (OSError, msgspec.DecodeError, json.JSONDecodeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
