"""REST routes for app deploys: deploy (JSON or YAML), list, show, rollback, remove."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controller.api.access import note, principal, requires
from controller.api.keys import DEPLOYER
from controller.api.middleware import read_body
from controller.apps.deployer import AppRecord, parse_spec
from controller.auth import check_covers


def _wait(request: web.Request) -> bool:
    return request.query.get("wait", "").lower() in ("1", "true", "yes")


def _summary(rec: AppRecord) -> dict[str, Any]:
    return {
        "name": rec.name,
        "version": rec.current.version,
        "previous": rec.previous.version if rec.previous else None,
        "selector": rec.current.selector,
        "nodes": len(rec.assignments),
        "rollout": msgspec.to_builtins(rec.rollout),
    }


def _in_scope(request: web.Request, name: str) -> AppRecord:
    rec = request.app[DEPLOYER].get(name)
    check_covers(principal(request).scope, rec.current.selector, f"app {name!r}")
    return rec


@requires("operator")
async def deploy_app(request: web.Request) -> web.Response:
    d = request.app[DEPLOYER]
    raw = await read_body(request)
    ctype = request.content_type.lower()
    spec = parse_spec(raw, yaml_text="yaml" in ctype)
    note(request, target=f"{spec.name}@{spec.version}", selector=spec.selector)
    await d.deploy(spec, scope=principal(request).scope)
    if _wait(request):
        await d.wait(spec.name)
        return web.json_response(d.status(spec.name), status=200)
    return web.json_response(d.status(spec.name), status=202)


@requires("viewer")
async def list_apps(request: web.Request) -> web.Response:
    who = principal(request)
    return web.json_response({"apps": [_summary(r) for r in request.app[DEPLOYER].all()
                                       if who.covers(r.current.selector)]})


@requires("viewer")
async def get_app(request: web.Request) -> web.Response:
    rec = _in_scope(request, request.match_info["name"])
    return web.json_response(request.app[DEPLOYER].status(rec.name))


@requires("operator")
async def rollback_app(request: web.Request) -> web.Response:
    d = request.app[DEPLOYER]
    name = request.match_info["name"]
    note(request, target=name)
    _in_scope(request, name)
    await d.rollback(name, scope=principal(request).scope)
    if _wait(request):
        await d.wait(name)
        return web.json_response(d.status(name), status=200)
    return web.json_response(d.status(name), status=202)


@requires("operator")
async def delete_app(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, target=name)
    return web.json_response(await request.app[DEPLOYER].remove(
        name, scope=principal(request).scope))


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/apps", deploy_app),
        web.get("/v1/apps", list_apps),
        web.get("/v1/apps/{name}", get_app),
        web.post("/v1/apps/{name}/rollback", rollback_app),
        web.delete("/v1/apps/{name}", delete_app),
    ]
