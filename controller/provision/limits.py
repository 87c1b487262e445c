"""API rate limits: what the engine (and an SDK provider, for each request it makes) allows
itself against one cloud, and the token bucket that enforces it.

The engine puts a bucket per provider (and per region when the cloud limits each region)
and a concurrency limit per provider+region in front of every provider call. One provider
call can be many cloud requests (a batch of launches), so the SDK providers also meter
every request they send with a ``RequestMeter`` built from the same ``ApiLimits``: the
cloud's documented limit holds for what really goes over the wire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What the engine allows itself against one provider (set to the provider's limits)."""

    rate: float = 10.0  # calls per second for the whole provider (token bucket; 0: none)
    burst: int = 10
    region_rate: float = 0.0  # and per region when the cloud limits each one (0: none)
    region_burst: int = 0
    concurrency: int = 8  # calls in flight per provider+region
    batch: int = 50  # VMs per run_instances call


class TokenBucket:
    """``rate`` calls per second with bursts of ``burst``; waiters are served in order."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.rate = rate
        self.size = float(max(1, burst))
        self.tokens = self.size
        self._clock = clock
        self._sleep = sleep
        self._at = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = self._clock()
                self.tokens = min(self.size, self.tokens + (now - self._at) * self.rate)
                self._at = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await self._sleep((1.0 - self.tokens) / self.rate + 1e-4)


class RequestMeter:
    """An SDK provider's side of the limits: every request it sends takes a token (the
    provider-wide bucket and its region's) and one of ``concurrency`` worker threads per
    region (the SDKs block; a thread pool of its own keeps one cloud from starving the
    others of the event loop's default executor)."""

    def __init__(self, limits: ApiLimits, *, name: str,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.limits = limits
        self._name = name
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[str, TokenBucket] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.sent = 0

    def _bucket(self, region: str) -> TokenBucket:
        b = self._buckets.get(region)
        if b is None:
            lim = self.limits
            rate, burst = (lim.rate, lim.burst) if not region else (lim.region_rate,
                                                                    lim.region_burst)
            b = self._buckets[region] = TokenBucket(rate, burst, clock=self._clock,
                                                    sleep=self._sleep)
        return b

    async def run(self, region: str, fn: Callable[[], T]) -> T:
        """``fn`` (a blocking SDK request) in a worker thread, within the limits."""
        slots = self._slots.get(region)
        if slots is None:
            slots = self._slots[region] = asyncio.Semaphore(max(1, self.limits.concurrency))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(4, 4 * self.limits.concurrency),
                thread_name_prefix=f"barista-{self._name}")
        async with slots:
            await self._bucket("").acquire()
            if region and self.limits.region_rate > 0:
                await self._bucket(region).acquire()
            self.sent += 1
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def gather_launches(results: Sequence[list[T] | BaseException]) -> list[T]:
    """The answers of launches made side by side (``asyncio.gather(...,
    return_exceptions=True)``): what was made is returned even when some failed, so no VM
    made is forgotten (the engine fails the names left out, and retries them on the next
    pass); when none was made the first error is raised (a capacity error fails the batch
    over to the next zone)."""
    made: list[T] = []
    errors: list[BaseException] = []
    for r in results:
        if isinstance(r, BaseException):
            errors.append(r)
        else:
            made.extend(r)
    for e in errors:
        if not isinstance(e, Exception):  # a cancellation is not an answer
            raise e
    if errors and not made:
        raise errors[0]
    return made


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """Requests side by side, each to its end (none abandoned half-way because another
    failed), then the first error raised, if any; else their answers in order."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
