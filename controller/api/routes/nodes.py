"""The node inventory: list (selector, status filter), show, revoke and delete."""

from __future__ import annotations

from aiohttp import web

from controller.api.access import principal, requires
from controller.api.keys import FLEET, NODE_ADMIN
from controller.models import NodeRecord
from protocol.selectors import Selector


def selector_of(request: web.Request) -> Selector:
    """The query's selector, narrowed to the caller's scope."""
    return principal(request).narrow(Selector.parse(request.query.get("selector", "")))


def node_in_scope(request: web.Request, node_id: str) -> NodeRecord:
    """The node, or 404; 403 when it is outside the caller's scope."""
    node = request.app[FLEET].get(node_id)
    principal(request).check_sees(node.labels, f"node {node.id}")
    return node


@requires("viewer")
async def list_nodes(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    nodes = fleet.select(selector_of(request))
    status_filter = request.query.get("status")
    if status_filter:
        nodes = [n for n in nodes if n.status == status_filter]
    return web.json_response({"nodes": [fleet.view(n) for n in nodes]})


@requires("viewer")
async def get_node(request: web.Request) -> web.Response:
    node = node_in_scope(request, request.match_info["id"])
    return web.json_response(request.app[FLEET].view(node))


@requires("admin")  # cuts a node off NATS for good
async def revoke_node(request: web.Request) -> web.Response:
    """Revoke the node's NATS user (disconnected at once, renewal refused); the record stays,
    marked revoked."""
    node = await request.app[NODE_ADMIN].revoke_node(request.match_info["id"])
    return web.json_response(request.app[FLEET].view(node))


@requires("admin")
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
