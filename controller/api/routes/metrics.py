"""Live metrics: a node's latest batch, and the SSE stream of batches."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec
from aiohttp import web

from controller.api import sse
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

    async def items() -> AsyncGenerator[sse.Item, None]:
        try:
            yield "stream open"
            while True:
                batch = await sse.next_or_none(sub.queue, 15)
                yield sse.KEEPALIVE if batch is None else ("metrics",
                                                           msgspec.to_builtins(batch))
        finally:
            unsubscribe()

    return await sse.serve(request, items())


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/nodes/{id}/metrics/latest", latest_metrics),
        web.get("/v1/metrics/stream", metrics_stream),
    ]
