"""The metrics outbox: a bounded ring of encoded batches, sent oldest first, dropped oldest.

A batch leaves the ring only once JetStream acknowledged it; what falls out is counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS

from agent.connection import backoff
from protocol import codec
from protocol.messages import MetricBatch, MetricPoint


class Outbox:
    """Metric batches waiting for JetStream's acknowledgement, at most ``capacity``."""

    def __init__(self, *, capacity: int, log: logging.Logger) -> None:
        self.log = log
        self.buffer: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=capacity)
        self.dropped_total = 0
        # Metric points dropped because even alone they exceed the stream's batch cap.
        self.oversized_points = 0
        self.published_batches = 0
        self.seq = 0
        self._drops_since_connect = 0
        self._boot = f"{os.getpid():x}{random.getrandbits(32):08x}"
        self._have_data = asyncio.Event()

    def take_drops_since_connect(self) -> int:
        """Batches dropped since the last call (what a reconnect reports)."""
        dropped, self._drops_since_connect = self._drops_since_connect, 0
        return dropped

    def add(
        self,
        *,
        node_id: str,
        points: list[MetricPoint],
        errors: dict[str, str],
        tags: dict[str, str],
    ) -> None:
        """Queue one collection as a batch (split in parts if it is too big for the stream)."""
        self.seq += 1
        # Count the drop this batch causes before building it, so the batch itself
        # carries the count (the cumulative total, which later batches carry too).
        self._make_room()
        batch = MetricBatch(
            node_id=node_id,
            seq=self.seq,
            ts=time.time_ns(),
            points=points,
            tags=tags,
            dropped=self.dropped_total,
            errors=errors,
        )
        parts, lost = fit_batch(batch, codec.METRIC_BATCH_MAX)
        if lost:
            self.oversized_points += lost
            self.log.warning(
                "%d metric points of batch %d do not fit in %d bytes and were dropped "
                "(%d so far)", lost, self.seq, codec.METRIC_BATCH_MAX, self.oversized_points,
            )
        msg_id = f"{node_id}:{self._boot}:{self.seq}"
        for i, data in enumerate(parts):
            if i:
                self._make_room()
            # The first part keeps the plain id, so a batch that fits is sent as before.
            self._append(f"{msg_id}.{i}" if i else msg_id, data)

    def enqueue(self, msg_id: str, data: bytes) -> None:
        self._make_room()
        self._append(msg_id, data)

    def _make_room(self) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped_total += 1
            self._drops_since_connect += 1

    def _append(self, msg_id: str, data: bytes) -> None:
        self.buffer.append((msg_id, data))  # a full deque drops its oldest
        self._have_data.set()

    async def publish_loop(self, *, nc: NATS, connected: asyncio.Event, subject: str) -> None:
        """Sends buffered batches oldest first; a batch leaves the buffer once JetStream
        acknowledged it, so a lost connection or ack means a resend, not a loss (the
        Nats-Msg-Id header lets JetStream drop the duplicate)."""
        attempt = 0
        while True:
            if not self.buffer:
                self._have_data.clear()
                await self._have_data.wait()
                continue
            if not nc.is_connected:
                # The disconnected callback may not have run yet, and waiting on a set
                # event returns at once without yielding: this loop would spin and starve
                # the very callbacks (disconnect, reconnect) it waits for. Clear it here
                # (the reconnected callback sets it once is_connected holds again) and
                # look again at least every second. (asyncio.timeout, not wait_for: 3.11's
                # wait_for drops a cancel that comes with the reconnect, gh-86296, and the
                # loop then outlives the agent's stop.)
                connected.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await connected.wait()
                continue
            msg_id, data = self.buffer[0]
            try:
                js = nc.jetstream()
                await js.publish(subject, data, timeout=5.0, headers={"Nats-Msg-Id": msg_id})
            except asyncio.CancelledError:
                raise
            except nats.js.errors.BadRequestError as exc:
                # The stream refuses this batch for good (e.g. over its max_msg_size):
                # resending it would block every later batch, so drop it and count it.
                self.dropped_total += 1
                self.log.warning("metric batch %s refused by the stream (%s); dropped",
                                 msg_id, exc.description or exc)
                if self.buffer and self.buffer[0][0] == msg_id:
                    self.buffer.popleft()
                continue
            except Exception as exc:
                delay = backoff(attempt, base=0.2, cap=5.0)
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    self.log.warning(
                        "metric batch not acknowledged (%s); retrying in %.1fs",
                        exc or type(exc).__name__,
                        delay,
                    )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            # The buffer may have dropped its oldest while we awaited; pop only ours.
            if self.buffer and self.buffer[0][0] == msg_id:
                self.buffer.popleft()
            self.published_batches += 1


def fit_batch(batch: MetricBatch, limit: int) -> tuple[list[bytes], int]:
    """Encode ``batch`` as parts of at most ``limit`` bytes each (the METRICS stream refuses
    bigger ones), halving the points until they fit. Returns (parts, points dropped): a
    point that does not fit even alone is dropped and counted, never sent to be refused.
    """
    data = codec.encode(batch)
    if len(data) <= limit:
        return [data], 0
    if len(batch.points) <= 1:
        return [], len(batch.points)
    mid = len(batch.points) // 2
    parts: list[bytes] = []
    lost = 0
    for half in (batch.points[:mid], batch.points[mid:]):
        more, dropped = fit_batch(msgspec.structs.replace(batch, points=half), limit)
        parts += more
        lost += dropped
    return parts, lost
