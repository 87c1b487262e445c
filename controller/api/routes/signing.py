"""Command-signing keys: show them, rotate the key, finish a rotation."""

from __future__ import annotations

from aiohttp import web

from controller.api.access import requires
from controller.api.keys import SIGNING_KEYS
from controller.api.middleware import json_body
from controller.errors import BadRequest


@requires("viewer")
async def list_keys(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIGNING_KEYS].view())


@requires("admin")  # the key that authorises every command on every node
async def rotate(request: web.Request) -> web.Response:
    """``{}``: start a rotation (``overlap``: seconds the old key stays trusted);
    ``{"finish": true}``: drop the old key now."""
    body = await json_body(request)
    unknown = set(body) - {"finish", "overlap"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    finish = body.get("finish", False)
    if not isinstance(finish, bool):
        raise BadRequest("finish must be true or false")
    overlap = body.get("overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int | float)):
        raise BadRequest("overlap must be a number of seconds")
    keys = request.app[SIGNING_KEYS]
    if finish:
        if overlap is not None:
            raise BadRequest("overlap has no meaning with finish")
        return web.json_response(await keys.finish())
    return web.json_response(await keys.rotate(overlap=overlap), status=201)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/keys", list_keys),
        web.post("/v1/keys/rotate", rotate),
    ]
