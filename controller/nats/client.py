"""NATS client helpers the controller shares: a flush that never breaks the connection.

nats-py's ``flush(timeout)`` cancels its PONG future on timeout but leaves it queued; the
late PONG then raises InvalidStateError inside the client's read loop, which ends for good
(the connection reads nothing more and never reconnects). A slow server is normal weather,
so a flush here is never left to time out inside nats-py: we stop *waiting* for it after
``timeout`` and let the PONG (or the next reconnect, which drops queued PONGs) settle it.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS

log = logging.getLogger("barista.controller.nats")

# The timeout handed to nats-py, which must never expire before the PONG can come.
_ABANDON = 3600


class Flusher:
    """Owns the flushes still in flight; ``close()`` cancels them (at controller stop)."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[None]] = set()

    async def flush(self, nc: NATS, wait: float = 10.0) -> bool:
        """True when the server confirmed everything sent so far within ``wait`` seconds."""
        if nc.is_closed or not nc.is_connected:
            return False
        fut = asyncio.ensure_future(nc.flush(timeout=_ABANDON))
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
