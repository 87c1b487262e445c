"""Live metric relay: the latest batch per node, and fan-out to stream subscribers (SSE)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.messages import MetricBatch
from protocol.selectors import Selector

log = logging.getLogger("barista.controller.live")


@dataclass
class StreamSubscription:
    selector: Selector
    measurements: frozenset[str]
    queue: asyncio.Queue[MetricBatch] = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    dropped: int = 0


class MetricsHub:
    def __init__(self, labels_of: Callable[[str], dict[str, str] | None]) -> None:
        self._labels_of = labels_of
        self._latest: dict[str, MetricBatch] = {}
        self._subs: list[StreamSubscription] = []

    def latest(self, node_id: str) -> MetricBatch | None:
        return self._latest.get(node_id)

    def forget(self, node_id: str) -> None:
        self._latest.pop(node_id, None)

    def publish(self, batch: MetricBatch) -> None:
        self._latest[batch.node_id] = batch
        if not self._subs:
            return
        labels = self._labels_of(batch.node_id) or {}
        for sub in self._subs:
            if not sub.selector.matches(labels):
                continue
            out = batch
            if sub.measurements:
                pts = [p for p in batch.points if p.measurement in sub.measurements]
                if not pts:
                    continue
                out = MetricBatch(
                    node_id=batch.node_id, seq=batch.seq, ts=batch.ts, points=pts, tags=batch.tags
                )
            try:
                sub.queue.put_nowait(out)
            except asyncio.QueueFull:
                # A slow reader loses its oldest sample, never slows the relay.
                sub.dropped += 1
                try:
                    sub.queue.get_nowait()
                    sub.queue.put_nowait(out)
                except (asyncio.QueueEmpty, asyncio.QueueFull):
                    pass

    def subscribe(
        self, selector: Selector, measurements: frozenset[str] = frozenset()
    ) -> tuple[StreamSubscription, Callable[[], None]]:
        sub = StreamSubscription(selector=selector, measurements=measurements)
        self._subs.append(sub)

        def unsubscribe() -> None:
            if sub in self._subs:
                self._subs.remove(sub)

        return sub, unsubscribe

    @property
    def subscribers(self) -> int:
        return len(self._subs)
