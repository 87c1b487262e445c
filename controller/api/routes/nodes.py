"""The node inventory: list (selector, status filter) and show."""

from __future__ import annotations

from aiohttp import web

from controller.api.keys import FLEET
from protocol.selectors import Selector


def selector_of(request: web.Request) -> Selector:
    return Selector.parse(request.query.get("selector", ""))


async def list_nodes(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    nodes = fleet.select(selector_of(request))
    status_filter = request.query.get("status")
    if status_filter:
        nodes = [n for n in nodes if n.status == status_filter]
    return web.json_response({"nodes": [fleet.view(n) for n in nodes]})


async def get_node(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    return web.json_response(fleet.view(fleet.get(request.match_info["id"])))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/nodes", list_nodes),
        web.get("/v1/nodes/{id}", get_node),
    ]
