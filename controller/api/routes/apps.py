"""REST routes for app deploys: deploy (JSON or YAML), list, show, rollback, remove."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controller.api.keys import DEPLOYER
from controller.api.middleware import read_body
from controller.apps.deployer import AppRecord, parse_spec


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


async def deploy_app(request: web.Request) -> web.Response:
    d = request.app[DEPLOYER]
    raw = await read_body(request)
    ctype = request.content_type.lower()
    spec = parse_spec(raw, yaml_text="yaml" in ctype)
    await d.deploy(spec)
    if _wait(request):
        await d.wait(spec.name)
        return web.json_response(d.status(spec.name), status=200)
    return web.json_response(d.status(spec.name), status=202)


async def list_apps(request: web.Request) -> web.Response:
    return web.json_response({"apps": [_summary(r) for r in request.app[DEPLOYER].all()]})


async def get_app(request: web.Request) -> web.Response:
    return web.json_response(request.app[DEPLOYER].status(request.match_info["name"]))


async def rollback_app(request: web.Request) -> web.Response:
    d = request.app[DEPLOYER]
    name = request.match_info["name"]
    await d.rollback(name)
    if _wait(request):
        await d.wait(name)
        return web.json_response(d.status(name), status=200)
    return web.json_response(d.status(name), status=202)


async def delete_app(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DEPLOYER].remove(request.match_info["name"]))


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/apps", deploy_app),
        web.get("/v1/apps", list_apps),
        web.get("/v1/apps/{name}", get_app),
        web.post("/v1/apps/{name}/rollback", rollback_app),
        web.delete("/v1/apps/{name}", delete_app),
    ]
