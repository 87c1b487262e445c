"""NATS client helpers the controller shares: a flush that never breaks the connection, a
first connect that tells a foreign operator apart, JetStream calls retried while a cluster
starts.

nats-py's ``flush(timeout)`` cancels its PONG future on timeout but leaves it queued; the
late PONG then raises InvalidStateError inside the client's read loop, which ends for good
(the connection reads nothing more and never reconnects). A slow server is normal weather,
so a flush here is never left to time out inside nats-py: we stop *waiting* for it after
``timeout`` and let the PONG (or the next reconnect, which drops queued PONGs) settle it.
And one nats-py flush confirms less than it says: see ``flush_all``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS

from controller.errors import ConfigError

log = logging.getLogger("barista.controller.nats")

# The timeout handed to nats-py, which must never expire before the PONG can come.
_ABANDON = 3600


async def flush_all(nc: NATS, pong_wait: int = _ABANDON) -> None:
    """Two nats-py flushes, so that the PONG confirms every command sent before the call.

    nats-py writes a flush's PING to the socket at once, ahead of the commands still in its
    pending buffer (its flusher task writes them a moment later), so that PONG may come
    before the server has read them: a SUB not yet in place, say. The second PING leaves
    after the first PONG, behind them. The agent's twin: agent.connection.flush_all."""
    await nc.flush(timeout=pong_wait)
    await nc.flush(timeout=pong_wait)


class Flusher:
    """Owns the flushes still in flight; ``close()`` cancels them (at controller stop)."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[None]] = set()

    async def flush(self, nc: NATS, wait: float = 10.0) -> bool:
        """True when the server confirmed everything sent so far within ``wait`` seconds."""
        if nc.is_closed or not nc.is_connected:
            return False
        fut = asyncio.ensure_future(flush_all(nc))
        done, _ = await asyncio.wait({fut}, timeout=wait)
        if done:
            try:
                fut.result()
            except Exception as exc:  # closed or reconnecting: the caller goes on
                log.debug("flush failed: %s", exc)
                return False
            return True
        self._pending.add(fut)
        fut.add_done_callback(self._settle)
        log.warning("NATS did not confirm a flush within %.0fs; going on", wait)
        return False

    def _settle(self, fut: asyncio.Future[None]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not log it as never retrieved

    def close(self) -> None:
        for fut in list(self._pending):
            fut.cancel()
        self._pending.clear()


async def check_admitted(url: str, opts: dict[str, Any], trust_dir: str) -> None:
    """One connect as the controller's state user, not retried: an external NATS that
    refuses it trusts another operator (nats-py would retry an authorization error for
    ever). Any other failure (not up yet, say) is left to the retrying connects."""
    nc = NATS()
    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                         connect_timeout=5, **opts)
    except Exception as exc:
        if "authorization" in str(exc).lower():
            raise ConfigError(
                f"the NATS at {url} refused the controller's user from {trust_dir}/creds "
                f"({exc}): its servers trust another operator; give each the include file "
                f"{trust_dir}/server/barista.conf of `barista nats init`") from None
    finally:
        # Bounded, and now: nats-py leaves a refused connection's socket to the GC.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)


async def when_available(
    fn: Callable[[], Awaitable[None]], *, what: str, within: float = 30.0
) -> None:
    """``fn()``, retried while JetStream answers 503 (a cluster that is still starting:
    "JetStream not enabled for account" until the account is set up on every server)."""
    deadline = time.monotonic() + within
    warned = False
    while True:
        try:
            await fn()
            return
        except nats.js.errors.ServiceUnavailableError as exc:
            if time.monotonic() > deadline:
                raise
            if not warned:
                log.warning("JetStream is not available yet for %s (%s); retrying for up "
                            "to %.0fs", what, exc.description, within)
                warned = True
            await asyncio.sleep(0.25)
