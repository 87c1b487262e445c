"""Server-sent events: one response loop for every stream the API serves.

A route hands :func:`serve` an async iterator of what to send: ``(event, data)`` pairs
(``data`` is encoded as JSON) and plain strings, which go out as comments (``: keepalive``).
The loop owns the headers, the framing and a client that goes away; the iterator is
closed in every case, so its ``finally`` is where a route unsubscribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, TypeVar

import msgspec
from aiohttp import web

T = TypeVar("T")

KEEPALIVE = "keepalive"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no"}

Item = tuple[str, Any] | str


def frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n"


async def serve(request: web.Request, items: AsyncGenerator[Item, None]) -> web.StreamResponse:
    resp = web.StreamResponse(headers=HEADERS)
    await resp.prepare(request)
    async with aclosing(items):
        try:
            async for item in items:
                if isinstance(item, str):
                    await resp.write(f": {item}\n\n".encode())
                else:
                    await resp.write(frame(*item))
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away
    return resp


async def next_or_none(queue: asyncio.Queue[T], wait_s: float) -> T | None:
    """The queue's next item, or None after ``wait_s`` (time for a keepalive)."""
    # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with an item
    # (gh-86296), and the stream then outlives its handler's cancel. No item is lost on a
    # timeout: Queue.get takes it only once it runs again.
    try:
        async with asyncio.timeout(wait_s):
            return await queue.get()
    except TimeoutError:
        return None
