"""REST routes for app deploys: deploy (JSON or YAML), list, show, rollback, remove."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controller.api.app import CONTROLLER, read_body
from controller.apps.deployer import AppRecord, Deployer, parse_spec
from controller.errors import ControllerError


class DeployerMissing(ControllerError):
    code = "unavailable"
    status = 503


def _deployer(request: web.Request) -> Deployer:
    d = request.app[CONTROLLER].deployer
    if d is None:
        raise DeployerMissing("the app deployer is not running")
    return d


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
    d = _deployer(request)
    raw = await read_body(request)
    ctype = request.content_type.lower()
    spec = parse_spec(raw, yaml_text="yaml" in ctype)
    await d.deploy(spec)
    if _wait(request):
        await d.wait(spec.name)
        return web.json_response(d.status(spec.name), status=200)
    return web.json_response(d.status(spec.name), status=202)


async def list_apps(request: web.Request) -> web.Response:
    return web.json_response({"apps": [_summary(r) for r in _deployer(request).all()]})


async def get_app(request: web.Request) -> web.Response:
    return web.json_response(_deployer(request).status(request.match_info["name"]))


async def rollback_app(request: web.Request) -> web.Response:
    d = _deployer(request)
    name = request.match_info["name"]
    await d.rollback(name)
    if _wait(request):
        await d.wait(name)
        return web.json_response(d.status(name), status=200)
    return web.json_response(d.status(name), status=202)


async def delete_app(request: web.Request) -> web.Response:
    return web.json_response(await _deployer(request).remove(request.match_info["name"]))


def add_app_routes(app: web.Application) -> None:
    app.router.add_post("/v1/apps", deploy_app)
    app.router.add_get("/v1/apps", list_apps)
    app.router.add_get("/v1/apps/{name}", get_app)
    app.router.add_post("/v1/apps/{name}/rollback", rollback_app)
    app.router.add_delete("/v1/apps/{name}", delete_app)
