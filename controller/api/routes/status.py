"""Health, readiness and the controller's status."""

from __future__ import annotations

from aiohttp import web

from controller.api.access import requires
from controller.api.keys import STATUS


@requires("public")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@requires("public")
async def readyz(request: web.Request) -> web.Response:
    ok = request.app[STATUS].ready_to_serve()
    return web.json_response({"ready": ok}, status=200 if ok else 503)


@requires("viewer")
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS].status())


def routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/v1/status", status),
    ]
