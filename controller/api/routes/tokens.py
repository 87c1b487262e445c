"""Join tokens: create (shown once, with what an agent needs to join) and list."""

from __future__ import annotations

import time

from aiohttp import web

from controller.api.access import note, principal, requires
from controller.api.keys import AGENT_BOOTSTRAP, TOKEN_RECORDS, TOKENS
from controller.api.middleware import json_body
from controller.errors import BadRequest
from controller.provision.bootstrap import join_line
from protocol.selectors import parse_labels


@requires("operator")
async def create_token(request: web.Request) -> web.Response:
    body = await json_body(request)
    labels = body.get("labels", {})
    if isinstance(labels, list):
        labels = parse_labels(labels)
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise BadRequest("labels must be an object of strings or a list of 'k=v'")
    ttl = body.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise BadRequest("ttl must be a number of seconds")
    # A scoped token enrolls only nodes inside its scope.
    principal(request).check_sees(labels, "a join token for labels "
                                  f"{','.join(f'{k}={v}' for k, v in sorted(labels.items()))!r}")
    node_name = body.get("node_name", "")
    if not isinstance(node_name, str):
        raise BadRequest("node_name must be a string")
    issued = await request.app[TOKENS].create(
        labels=labels, ttl=ttl, description=str(body.get("description", "")),
        node_name=node_name,
    )
    bootstrap = request.app[AGENT_BOOTSTRAP]
    note(request, target=issued.record.id)
    out = issued.record.public()
    out["token"] = issued.token
    # What the agent is given: the token and, in NATS operator mode, the (public) JWT of
    # the enroll identity after "~".
    out["join_token"] = request.app[TOKENS].join_text(issued.token)
    out["nats_url"] = bootstrap.nats_url
    out["controller_key"] = bootstrap.controller_key
    out["ca_sha256"] = bootstrap.ca_sha256
    # The one-line join (token on its standard input), for the address machines reach the
    # API at: join_url if given, else the one this request came to.
    join_url = body.get("join_url") or f"{request.scheme}://{request.host}"
    if not isinstance(join_url, str):
        raise BadRequest("join_url must be a string")
    try:
        out["join_line"] = join_line(join_url, bootstrap.api_ca_sha256)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    out["install_url"] = f"{join_url.rstrip('/')}/install.sh"
    return web.json_response(out, status=201)


@requires("viewer")
async def list_tokens(request: web.Request) -> web.Response:
    records = request.app[TOKEN_RECORDS]
    who = principal(request)
    now = time.time()
    out = []
    for t in sorted(records, key=lambda t: t.created_at):
        if not who.sees(t.labels):
            continue
        item = t.public()
        item["state"] = "used" if t.used_by else ("expired" if t.expires_at < now else "valid")
        out.append(item)
    return web.json_response({"tokens": out})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/tokens", create_token),
        web.get("/v1/tokens", list_tokens),
    ]
