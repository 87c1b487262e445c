"""The node inventory: list (selector, status filter), show, revoke and delete."""

from __future__ import annotations

from aiohttp import web

from controller.api.keys import FLEET, NODE_ADMIN
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


async def revoke_node(request: web.Request) -> web.Response:
    """Revoke the node's NATS user (disconnected at once, renewal refused); the record stays,
    marked revoked."""
    node = await request.app[NODE_ADMIN].revoke_node(request.match_info["id"])
    return web.json_response(request.app[FLEET].view(node))


async def delete_node(request: web.Request) -> web.Response:
    """Forget the node, revoking its NATS user first."""
    await request.app[NODE_ADMIN].delete_node(request.match_info["id"])
    return web.json_response({"deleted": request.match_info["id"]})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/nodes", list_nodes),
        web.get("/v1/nodes/{id}", get_node),
        web.post("/v1/nodes/{id}/revoke", revoke_node),
        web.delete("/v1/nodes/{id}", delete_node),
    ]
