"""Named API tokens (admin only): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from aiohttp import web

from controller.api.access import note, principal, requires
from controller.api.keys import API_TOKENS
from controller.api.middleware import json_body
from controller.errors import BadRequest


@requires("admin")
async def create_api_token(request: web.Request) -> web.Response:
    body = await json_body(request)
    name, role, scope = body.get("name"), body.get("role"), body.get("scope", "")
    if not isinstance(name, str) or not isinstance(role, str):
        raise BadRequest("an API token needs a name and a role (viewer, operator, admin)")
    note(request, target=name, selector=scope if isinstance(scope, str) else "")
    issued = await request.app[API_TOKENS].create(
        name=name, role=role, scope=scope, ttl=body.get("ttl"),
        created_by=principal(request).name)
    tokens = request.app[API_TOKENS]
    out = issued.record.public(tokens.now())
    out["token"] = issued.secret
    return web.json_response(out, status=201)


@requires("admin")
async def list_api_tokens(request: web.Request) -> web.Response:
    tokens = request.app[API_TOKENS]
    now = tokens.now()
    return web.json_response({"tokens": [t.public(now) for t in tokens.all()]})


@requires("admin")
async def revoke_api_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, target=name)
    tokens = request.app[API_TOKENS]
    rec = await tokens.revoke(name)
    return web.json_response(rec.public(tokens.now()))


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/auth/tokens", create_api_token),
        web.get("/v1/auth/tokens", list_api_tokens),
        web.delete("/v1/auth/tokens/{name}", revoke_api_token),
    ]
