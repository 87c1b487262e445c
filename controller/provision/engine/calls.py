"""Every provider call goes through ``_call``: a token bucket per provider (and per
region when set), a concurrency limit per (provider, region), retries with backoff
and jitter on transient errors, and a provider stopped once it refused our credentials."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controller.provision.contract import CredentialsError, Provider, TransientError
from controller.provision.engine.base import EngineBase
from controller.provision.limits import ApiLimits, TokenBucket

log = logging.getLogger("barista.controller.provision")


T = TypeVar("T")


class ProviderCalls(EngineBase):
    """The per-(provider, region) call plumbing: limits, retries, refused credentials."""

    def _limit(self, provider: str) -> ApiLimits:
        """The limits given for ``provider``, else the ones its cloud documents (an SDK
        provider's ``api_limits``, with the source in its module), else the defaults."""
        given = self._limits.get(provider)
        if given is not None:
            return given
        documented = getattr(self._providers.get(provider), "api_limits", None)
        return documented if isinstance(documented, ApiLimits) else ApiLimits()

    def _bucket(self, provider: str, region: str, rate: float, burst: int) -> TokenBucket:
        key = (provider, region)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(rate, burst, clock=self._clock,
                                                 sleep=self._sleep)
        return b

    async def _call(self, prov: Provider, region: str, what: str,
                    fn: Callable[[], Awaitable[T]]) -> T:
        lim = self._limit(prov.name)
        key = (prov.name, region)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(max(1, lim.concurrency))
        last: TransientError | None = None
        for attempt in range(max(1, self.settings.attempts)):
            if prov.name in self._refused:
                raise CredentialsError(self._refused[prov.name], provider=prov.name)
            async with slots:
                await self._bucket(prov.name, "", lim.rate, lim.burst).acquire()
                if lim.region_rate > 0 and region:
                    await self._bucket(prov.name, region, lim.region_rate,
                                       lim.region_burst).acquire()
                try:
                    return await fn()
                except TransientError as exc:
                    last = exc
                except CredentialsError as exc:
                    self._refused[prov.name] = exc.message
                    log.error("provider %s refused our credentials: %s", prov.name, exc.message)
                    raise
            delay = min(self.settings.backoff_max, self.settings.backoff * 2 ** attempt)
            delay *= self._rng.uniform(0.5, 1.5)
            log.info("%s %s at %s/%s: %s; retry %d in %.2fs", prov.name, what, prov.name,
                     region, last.message, attempt + 1, delay)
            await self._sleep(delay)
        assert last is not None
        raise last
