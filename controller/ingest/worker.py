"""Ingest workers: the durable METRICS stream -> line protocol -> a Sink, ack after write.

Any number of workers share one durable pull consumer and split the stream between them.
A message is acked only once the write that holds its points succeeded, so a store outage
loses nothing that is still within the stream's retention.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from controller.ingest.errors import SinkError
from controller.ingest.lineproto import LineEncoder
from controller.ingest.sinks import Sink
from controller.state.streams import METRICS
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import MetricBatch
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.ingest")


@dataclass
class IngestStats:
    batches: int = 0  # batches written (and acked)
    points: int = 0  # lines written
    malformed: int = 0  # messages that did not decode as a MetricBatch (terminated)
    rejected: int = 0  # batches the store refused as bad data (terminated)
    write_errors: int = 0  # failed write attempts (each retried)
    last_error: str | None = None
    last_write: float | None = None  # time.time() of the last successful write


@dataclass(slots=True)
class _Item:
    msg: Msg
    lines: bytes
    points: int


class _LogLimiter:
    """At most one log line per key every ``interval`` seconds; counts what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet; otherwise how many were held back since the last line."""
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 1000:  # keys include subjects: keep this bounded
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


class IngestWorker:
    """One consumer loop: fetch, decode, encode, write in chunks, then ack.

    Writes are idempotent in InfluxDB (same measurement + tag set + timestamp overwrites),
    so a redelivery after a crash, or after a write that succeeded but whose answer was
    lost, does no harm: at-least-once delivery gives exactly-once data.
    """

    def __init__(
        self,
        *,
        js: JetStreamContext,
        sink: Sink,
        stream: str = METRICS,
        durable: str = "ingest",
        batch_lines: int = 5000,
        fetch_batch: int = 256,
        max_wait: float = 1.0,
        retry_backoff: tuple[float, float] = (0.5, 10.0),
        ack_wait: float = 60.0,
        max_ack_pending: int = 20_000,
        max_inflight: int = 2,
        stop_grace: float = 5.0,
        subjects: Subjects | None = None,
        name: str = "",
    ) -> None:
        if batch_lines < 1 or fetch_batch < 1 or max_inflight < 1 or max_wait <= 0:
            raise ValueError(
                "batch_lines, fetch_batch and max_inflight must be >= 1 and max_wait > 0"
            )
        if not 0 < retry_backoff[0] <= retry_backoff[1]:
            raise ValueError(f"retry_backoff {retry_backoff!r} must be (min, max), 0 < min <= max")
        self.js = js
        self.sink = sink
        self.stream = stream
        self.durable = durable
        self.batch_lines = batch_lines
        self.fetch_batch = fetch_batch
        self.max_wait = max_wait
        self.retry_backoff = retry_backoff
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.stop_grace = stop_grace
        self.subjects = subjects or Subjects()
        self.name = name or durable
        self.stats = IngestStats()
        self.encoder = LineEncoder(raw_newlines=bool(getattr(sink, "raw_newlines", False)))
        self.backing_off = False
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._limiter = _LogLimiter()
        # Writes in flight while the loop fetches and encodes the next chunk; bounded, so
        # during an outage the loop stops fetching instead of piling up messages.
        self._slots = asyncio.Semaphore(max_inflight)
        self._writes: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> IngestWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._ensure_consumer()
        self._sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        self._task = asyncio.create_task(self._run(), name=f"ingest-{self.name}")

    async def stop(self) -> None:
        """Stop fetching. Messages held but not yet written stay unacked and are redelivered
        (to another worker) after ack_wait."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._writes:
            # Let writes that are under way finish and ack (a short grace), so a clean
            # shutdown does not cause an ack_wait's worth of redelivery.
            _, late = await asyncio.wait(set(self._writes), timeout=self.stop_grace)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # connection already closed: nothing to undo
                log.debug("ingest %s: unsubscribe: %s", self.name, exc)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stream": self.stream,
            "durable": self.durable,
            "sink": getattr(self.sink, "name", type(self.sink).__name__),
            "running": self._task is not None and not self._task.done(),
            "backing_off": self.backing_off,
            **asdict(self.stats),
            # batches line-encoded through a shape plan / point by point (lineproto.py)
            "encoded_fast": self.encoder.fast_batches,
            "encoded_exact": self.encoder.exact_batches,
            # what the encoder replaced or dropped to write at all (lineproto.LineCounts)
            "line_protocol": self.encoder.counts.as_dict(),
        }

    async def _ensure_consumer(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            max_deliver=-1,  # never give up on a batch because the store was down
            # Room for every worker's outstanding fetch.
            max_waiting=512,
            description="metric batches -> InfluxDB",
        )
        try:
            await self.js.add_consumer(self.stream, config)
        except nats.js.errors.BadRequestError as exc:
            # Exists with a config the server will not change in place (e.g. created by an
            # older controller): use it as it is rather than refuse to ingest.
            log.warning("ingest consumer %s/%s kept as is: %s", self.stream, self.durable, exc)

    # --- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        pending: list[_Item] = []
        pending_lines = 0
        deadline = 0.0
        delay = self.retry_backoff[0]
        loop = asyncio.get_running_loop()
        while True:
            try:
                sub = self._sub
                assert sub is not None
                wait = self.max_wait if not pending else max(0.01, deadline - loop.time())
                try:
                    msgs = await sub.fetch(self.fetch_batch, timeout=wait)
                except TimeoutError:  # nats-py raises asyncio's and its own; both are this
                    msgs = []
                for msg in msgs:
                    item = await self._convert(msg)
                    if item is None:
                        continue
                    if not pending:
                        deadline = loop.time() + self.max_wait
                    pending.append(item)
                    pending_lines += item.points
                    if pending_lines >= self.batch_lines:
                        chunk, pending, pending_lines = pending, [], 0
                        await self._start_flush(chunk)
                if pending and (not msgs or loop.time() >= deadline):
                    chunk, pending, pending_lines = pending, [], 0
                    await self._start_flush(chunk)
                delay = self.retry_backoff[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A fetch or ack failed (NATS reconnecting, stream deleted...) or a bug.
                # What is held stays held and is written on the next round; what was lost
                # in between is redelivered after ack_wait (rewrites are harmless).
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                if (held := self._limiter.allow("loop")) is not None:
                    log.warning(
                        "ingest %s: loop error (%d more held back), retrying in %.1fs: %s",
                        self.name, held, delay, self.stats.last_error,
                        exc_info=not isinstance(exc, nats.errors.Error),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_backoff[1])

    async def _convert(self, msg: Msg) -> _Item | None:
        """Decode and encode one message; None when it was consumed here (bad or empty)."""
        try:
            batch = decode(msg.data, MetricBatch)
        except ProtocolError as exc:
            self.stats.malformed += 1
            if (held := self._limiter.allow(f"malformed:{msg.subject}")) is not None:
                log.warning(
                    "ingest %s: dropping malformed message on %s (%d more held back): %s",
                    self.name, msg.subject, held, exc.reason,
                )
            await msg.term()  # never redelivered: it will not get any better
            return None
        lines = self.encoder.encode(batch, node=self.subjects.node_id_of(msg.subject))
        if not lines:
            await msg.ack()  # nothing representable in it; not an error of the store
            self.stats.batches += 1
            return None
        return _Item(msg, lines, lines.count(b"\n"))

    async def _start_flush(self, items: list[_Item]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._flush_in_background(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _flush_in_background(self, items: list[_Item]) -> None:
        try:
            await self._flush(items)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # An ack or term failed (NATS gone): those messages are redelivered after
            # ack_wait and rewritten, which is harmless.
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            if (held := self._limiter.allow("ack")) is not None:
                log.warning(
                    "ingest %s: acking a written chunk failed (%d more held back): %s",
                    self.name, held, self.stats.last_error,
                )
        finally:
            self._slots.release()

    async def _flush(self, items: list[_Item]) -> None:
        try:
            await self._write(items)
        except SinkError as exc:  # not retryable: bad data
            if len(items) > 1:
                # Find the culprits one by one, so that a single bad batch does not take
                # the good ones of its chunk down with it (rewrites are idempotent).
                for item in items:
                    await self._flush([item])
                return
            self.stats.rejected += 1
            self.stats.last_error = str(exc)
            msg = items[0].msg
            if (held := self._limiter.allow("rejected")) is not None:
                log.error(
                    "ingest %s: store refused the batch from %s (seq %s), dropping it "
                    "(%d more held back): %s",
                    self.name, msg.subject, _seq(msg), held, exc,
                )
            await msg.term()
            return
        for item in items:
            await item.msg.ack()
        self.stats.batches += len(items)

    async def _write(self, items: list[_Item]) -> None:
        """Write the chunk, retrying retryable failures until it succeeds or is cancelled.

        Raises SinkError only for a non-retryable one.
        """
        body = items[0].lines if len(items) == 1 else b"".join(i.lines for i in items)
        points = sum(i.points for i in items)
        delay = self.retry_backoff[0]
        while True:
            try:
                await self.sink.write(body, points=points)
            except SinkError as exc:
                if not exc.retryable:
                    raise
                error: str = str(exc)
                auth = exc.auth
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a sink must not lose data or stop the loop
                log.exception("ingest %s: unexpected error from the sink", self.name)
                error, auth = f"{type(exc).__name__}: {exc}", False
            else:
                self.backing_off = False
                self.stats.points += points
                self.stats.last_write = time.time()
                return
            self.stats.write_errors += 1
            self.stats.last_error = error
            self.backing_off = True
            if (held := self._limiter.allow("write")) is not None:
                log.log(
                    logging.ERROR if auth else logging.WARNING,
                    "ingest %s: write of %d points failed%s (%d more held back), retry in "
                    "%.1fs: %s",
                    self.name, points, " - check the sink credentials" if auth else "",
                    held, delay, error,
                )
            # Keep the messages ours while we wait, instead of letting ack_wait hand them
            # to another worker that would hit the same outage.
            for item in items:
                await item.msg.in_progress()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_backoff[1])


def _seq(msg: Msg) -> int | None:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # not a JetStream message
        return None
