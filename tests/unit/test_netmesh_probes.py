"""The overlay probes (agent/netmesh/probes.py) on loopback: two real probers answering
each other, in an event loop that is slow per iteration, as a busy agent's is."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

from agent.netmesh.host import Host
from agent.netmesh.probes import Prober
from tests.fixtures.wait import wait_for

PEERS = 150  # one round: 150 probes, 150 answers (the socket buffer holds them all)


@contextlib.asynccontextmanager
async def _busy_loop(per_iteration: float) -> AsyncIterator[None]:
    """Every loop iteration costs ``per_iteration`` of blocked time (a loaded agent)."""

    async def spin() -> None:
        while True:
            time.sleep(per_iteration)  # noqa: ASYNC251 (blocks the loop on purpose)
            await asyncio.sleep(0)

    task = asyncio.create_task(spin())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _free_port() -> int:
    """A UDP port free on 127.0.0.1 and 127.0.0.2 (both probers of a test bind the same
    port: probes go to the peer's address at our port), not a fixed one: another run of
    these tests at the same time must not collide."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.2", port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no UDP port free on both 127.0.0.1 and 127.0.0.2")


def _probers(port: int, *, timeout: float) -> tuple[Prober, Prober]:
    # PEERS targets that are all the second prober (answers are matched by address and
    # sequence number, each target gets its own); one round only (a long interval).
    asker = Prober(host=Host(), address="127.0.0.1", port=port, interval=3600.0,
                   timeout=timeout, targets=lambda: [(f"n{i}", "127.0.0.2")
                                                     for i in range(PEERS)])
    answerer = Prober(host=Host(), address="127.0.0.2", port=port, interval=3600.0,
                      targets=list)
    return asker, answerer


async def test_a_round_is_answered_in_time_when_each_loop_iteration_is_slow() -> None:
    # asyncio's datagram transport read one datagram per loop iteration: at 5 ms an
    # iteration, 150 answers took 0.75 s to be read (on both sockets), past the timeout.
    asker, answerer = _probers(_free_port(), timeout=0.4)
    async with answerer, _busy_loop(0.005), asker:
        await wait_for(lambda: answerer.answered == PEERS, 5, "every probe answered")
        await wait_for(lambda: sum(p.received + p.late for p in asker.window.values())
                       == PEERS, 5, "every answer read")
        window = asker.take_window()
    assert sum(p.received for p in window.values()) == PEERS
    assert asker.late == 0
    assert max(max(p.rtts) for p in window.values()) < 0.4


async def test_an_answer_after_the_timeout_counts_late_not_received() -> None:
    # Before, an answer that came after its timeout but before the next round pruned its
    # probe was counted received (with its long RTT).
    asker, answerer = _probers(_free_port(), timeout=0.05)
    async with answerer, _busy_loop(0.1), asker:  # every answer waits >= 0.1 s
        await wait_for(lambda: asker.late == PEERS, 10, "every late answer read")
        assert 0.1 <= asker.late_max < 10
        window = asker.take_window()
    assert sum(p.received for p in window.values()) == 0
    assert sum(p.late for p in window.values()) == PEERS


async def test_a_peer_that_answers_is_probed_at_the_steady_rate_a_silent_one_each_round(
        ) -> None:
    # Every peer used to be probed every round: 30 peers at 0.2 s, 150 probes a second
    # each way on every node, also once all of them answered.
    port = _free_port()
    answerer = Prober(host=Host(), address="127.0.0.2", port=port, interval=3600.0,
                      targets=list)
    asker = Prober(host=Host(), address="127.0.0.1", port=port, interval=0.05, steady=0.5,
                   targets=lambda: [("up", "127.0.0.2"), ("silent", "127.0.0.3")])
    async with answerer, asker:
        t0 = time.monotonic()
        await wait_for(lambda: "silent" in asker.window and asker.window["silent"].sent >= 20,
                       10, "20 rounds")
        elapsed = time.monotonic() - t0
        up, silent = asker.window["up"], asker.window["silent"]
        assert silent.received == 0
        # The silent peer is probed every round (20 of 0.05 s, longer on a loaded machine),
        # the one that answered every 0.5 s (less half a round's jitter): the first probe,
        # then one per 0.475 s, and one in flight.
        assert up.received >= 1, up
        assert 2 <= up.sent <= elapsed / 0.475 + 2, (up, elapsed)
        assert up.sent * 2 < silent.sent, (up, silent)
