"""REST routes for overlay networks: create, list, show (members and addresses), remove,
the latency/loss matrix, and a member's key rotation."""

from __future__ import annotations

import msgspec
from aiohttp import web

from controller.api.access import note, principal, requires
from controller.api.keys import MESH
from controller.api.middleware import json_body
from controller.errors import BadRequest, Forbidden, NotFound
from controller.mesh.networks import NetworkRecord, NetworkSpec


def _visible(request: web.Request, name: str) -> NetworkRecord:
    try:
        return request.app[MESH].networks.get(name)
    except NotFound:
        raise NotFound(f"no network named {name!r} (barista net ls lists them)") from None


def _view(request: web.Request, net: NetworkRecord, *, members: bool) -> dict[str, object]:
    mesh = request.app[MESH]
    state = mesh.distributor.state(net.name)
    who = principal(request)
    out: dict[str, object] = {
        **net.public(),
        "generation": state.generation if state else 0,
        "members": len(state.peers) if state else 0,
        "conflicts": dict(mesh.distributor.conflicts.get(net.name, {})),
    }
    if members:
        views = mesh.distributor.member_views(net)
        # A scoped token sees the members inside its scope only.
        out["member_list"] = [v for v in views if (n := mesh.distributor.nodes.get(
            str(v["node_id"]))) is None or who.sees(n.labels)]
        out["addresses"] = [
            {"address": lease.address, "node_id": lease.node_id, "state": lease.state,
             "released_at": lease.released_at or None}
            for lease in mesh.ipam.leases(net.name)]
    return out


@requires("operator")
async def create_network(request: web.Request) -> web.Response:
    body = await json_body(request)
    try:
        spec = msgspec.convert(body, NetworkSpec)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"bad network: {exc} (e.g. {{\"name\": \"corp\", \"cidr\": "
                         "\"100.96.0.0/12\", \"selector\": \"env=prod\"}})") from None
    note(request, target=spec.name, selector=spec.selector)
    who = principal(request)
    if (spec.selector or spec.infras) and not (who.covers(spec.selector) and not (
            spec.infras and not who.scope.is_empty)):
        raise Forbidden(f"network {spec.name!r} would take in nodes outside the scope "
                        f"{who.scope} of token {who.name!r}")
    net = await request.app[MESH].networks.create(spec)
    return web.json_response(_view(request, net, members=False), status=201)


@requires("viewer")
async def list_networks(request: web.Request) -> web.Response:
    mesh = request.app[MESH]
    return web.json_response({"networks": [_view(request, n, members=False)
                                           for n in mesh.networks.list()]})


@requires("viewer")
async def get_network(request: web.Request) -> web.Response:
    net = _visible(request, request.match_info["name"])
    return web.json_response(_view(request, net, members=True))


@requires("viewer")
async def network_members(request: web.Request) -> web.Response:
    net = _visible(request, request.match_info["name"])
    view = _view(request, net, members=True)
    return web.json_response({"network": net.name, "generation": view["generation"],
                              "members": view["member_list"], "conflicts": view["conflicts"]})


@requires("viewer")
async def network_addresses(request: web.Request) -> web.Response:
    net = _visible(request, request.match_info["name"])
    view = _view(request, net, members=True)
    return web.json_response({"network": net.name, "cidr": net.cidr,
                              "addresses": view["addresses"]})


@requires("operator")
async def delete_network(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, target=name)
    _visible(request, name)
    await request.app[MESH].delete_network(name)
    return web.json_response({"name": name, "removed": True})


@requires("viewer")
async def network_matrix(request: web.Request) -> web.Response:
    net = _visible(request, request.match_info["name"])
    by = request.query.get("by", "")
    if by not in ("", "node", "region"):
        raise BadRequest(f"by must be node or region, not {by!r}")
    mesh, who = request.app[MESH], principal(request)

    def visible(node_id: str) -> bool:
        node = mesh.distributor.nodes.get(node_id)
        return node is None or who.sees(node.labels)

    return web.json_response(mesh.matrix.view(
        net.name, by=by, visible=None if who.scope.is_empty else visible))


@requires("operator")
async def rotate_member_key(request: web.Request) -> web.Response:
    net = _visible(request, request.match_info["name"])
    node_id = request.match_info["node"]
    note(request, target=f"{net.name} {node_id} rotate")
    mesh = request.app[MESH]
    state = mesh.distributor.state(net.name)
    if state is None or node_id not in state.peers:
        raise NotFound(f"node {node_id!r} is no member of network {net.name}")
    node = mesh.distributor.nodes.get(node_id)
    if node is not None:
        principal(request).check_sees(node.labels, f"node {node_id}")
    await mesh.distributor.rotate(node_id, reason="api")
    return web.json_response({"network": net.name, "node_id": node_id, "rotation": "asked"},
                             status=202)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/networks", create_network),
        web.get("/v1/networks", list_networks),
        web.get("/v1/networks/{name}", get_network),
        web.delete("/v1/networks/{name}", delete_network),
        web.get("/v1/networks/{name}/members", network_members),
        web.get("/v1/networks/{name}/addresses", network_addresses),
        web.get("/v1/networks/{name}/matrix", network_matrix),
        web.post("/v1/networks/{name}/members/{node}/rotate", rotate_member_key),
    ]
