"""NATS connection helpers shared by enrollment, the metrics outbox and command intake."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from nats.aio.client import Client as NATS


async def connect(**opts: Any) -> NATS:
    """``nats.connect``, but a refused connection's socket is closed now: nats-py leaves it
    open until the next garbage collection, and connects are retried for as long as it
    takes."""
    nc = NATS()
    try:
        await nc.connect(**opts)
    except BaseException:
        # Bounded: after a failed TLS handshake asyncio's wait_closed() never returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)
        raise
    return nc


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter: the delay before retry number ``attempt + 1``."""
    return float(min(cap, base * 2.0 ** min(attempt, 30)) * (0.5 + random.random() / 2))
