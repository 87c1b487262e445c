"""Live metrics: a node's latest batch, and the SSE stream of batches."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from controller.api.access import requires
from controller.api.keys import METRICS_HUB
from controller.api.routes.nodes import node_in_scope, selector_of
from controller.errors import NotFound


@requires("viewer")
async def latest_metrics(request: web.Request) -> web.Response:
    node = node_in_scope(request, request.match_info["id"])
    batch = request.app[METRICS_HUB].latest(node.id)
    if batch is None:
        raise NotFound(f"no metrics received from node {node.id} since the controller started")
    return web.json_response(msgspec.to_builtins(batch))


@requires("viewer")
async def metrics_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``metrics`` event per batch matching selector/measurement."""
    selector = selector_of(request)
    measurements = frozenset(m for m in request.query.getall("measurement", []) if m)
    sub, unsubscribe = request.app[METRICS_HUB].subscribe(selector, measurements)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    try:
        await resp.write(b": stream open\n\n")
        while True:
            try:
                batch = await asyncio.wait_for(sub.queue.get(), 15)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            data = msgspec.json.encode(msgspec.to_builtins(batch))
            await resp.write(b"event: metrics\ndata: " + data + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()
    return resp


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/nodes/{id}/metrics/latest", latest_metrics),
        web.get("/v1/metrics/stream", metrics_stream),
    ]
