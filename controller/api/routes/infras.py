"""REST routes for infras: review (the plan, nothing created), create/update, list, show,
delete, lifecycle actions, orphan gc, and each infra's progress as server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from aiohttp import web

from controller.api import sse
from controller.api.access import note, principal, requires
from controller.api.keys import INFRAS
from controller.api.middleware import json_body, read_body
from controller.errors import BadRequest, NotFound
from controller.provision.model import (
    LABEL_GROUP,
    LABEL_INFRA,
    InfraAction,
    InfraSpec,
    InfraView,
    Progress,
)

# An infra's run is over for a follower once it reaches one of these.
SETTLED = frozenset({"ready", "degraded", "failed", "suspended", "deleted"})
KEEPALIVE_S = 15.0


def _builtins(obj: object) -> Any:
    return msgspec.to_builtins(obj)


def group_labels(spec: InfraSpec) -> list[dict[str, str]]:
    """The labels each group's nodes will carry (what a scoped token must see)."""
    out = []
    for g in spec.groups:
        labels = {**spec.labels, **g.labels, LABEL_INFRA: spec.name, LABEL_GROUP: g.name,
                  "provider": g.provider}
        out.append(labels)
    return out


def _check_spec_scope(request: web.Request, spec: InfraSpec) -> None:
    who = principal(request)
    for g, labels in zip(spec.groups, group_labels(spec), strict=True):
        who.check_sees(labels, f"infra {spec.name!r} group {g.name!r}")


def _in_scope(request: web.Request, name: str) -> InfraView:
    view = request.app[INFRAS].get(name)
    if view is None or view.status == "deleted":
        raise NotFound(f"no infra named {name!r} (barista infra ls lists them)")
    if not all(principal(request).sees(labels) for labels in group_labels(view.spec)):
        # Outside the scope it does not exist for this token: 404, not a hint.
        raise NotFound(f"no infra named {name!r} (barista infra ls lists them)")
    return view


async def _spec_of(request: web.Request) -> InfraSpec:
    raw = await read_body(request)
    if not raw:
        raise BadRequest("send an infra spec (JSON, or YAML with Content-Type "
                         "application/yaml); barista infra create -f spec.yaml does")
    return request.app[INFRAS].parse(raw, yaml_text="yaml" in request.content_type.lower())


@requires("operator")
async def review_infra(request: web.Request) -> web.Response:
    spec = await _spec_of(request)
    _check_spec_scope(request, spec)
    return web.json_response(_builtins(await request.app[INFRAS].review(spec)))


@requires("operator")
async def create_infra(request: web.Request) -> web.Response:
    spec = await _spec_of(request)
    note(request, target=spec.name)
    _check_spec_scope(request, spec)
    existing = request.app[INFRAS].get(spec.name)
    if existing is not None and existing.status != "deleted":
        _in_scope(request, spec.name)
    view = await request.app[INFRAS].create(spec)
    return web.json_response(_builtins(view), status=202)


@requires("viewer")
async def list_infras(request: web.Request) -> web.Response:
    who = principal(request)
    out = []
    for view in request.app[INFRAS].infras():
        if view.status == "deleted":
            continue
        if all(who.sees(labels) for labels in group_labels(view.spec)):
            out.append(_builtins(msgspec.structs.replace(
                view, groups=[msgspec.structs.replace(g, nodes=[]) for g in view.groups])))
    return web.json_response({"infras": out})


@requires("viewer")
async def get_infra(request: web.Request) -> web.Response:
    return web.json_response(_builtins(_in_scope(request, request.match_info["name"])))


@requires("operator")
async def delete_infra(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, target=name)
    _in_scope(request, name)
    return web.json_response(_builtins(await request.app[INFRAS].delete(name)), status=202)


@requires("operator")
async def act_on_infra(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await json_body(request)
    try:
        action = msgspec.convert(body, InfraAction)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"bad infra action: {exc} (e.g. {{\"action\": \"scale\", "
                         "\"group\": \"web\", \"count\": 5}})") from None
    note(request, target=f"{name} {action.action}{' ' + action.group if action.group else ''}")
    view = _in_scope(request, name)
    if action.group and action.group not in {g.name for g in view.spec.groups}:
        raise BadRequest(f"infra {name!r} has no group {action.group!r} (groups: "
                         f"{', '.join(g.name for g in view.spec.groups)})")
    if action.action == "scale":
        if action.count is None or action.count < 0 or not action.group:
            raise BadRequest("scale needs a group and a count >= 0")
    elif action.count is not None:
        raise BadRequest(f"{action.action} takes no count")
    return web.json_response(_builtins(await request.app[INFRAS].act(name, action)),
                             status=202)


@requires("operator")
async def gc_infras(request: web.Request) -> web.Response:
    body = await json_body(request)
    confirm = body.get("confirm", False)
    if not isinstance(confirm, bool):
        raise BadRequest("confirm must be true or false")
    vm_ids = body.get("vm_ids")
    if vm_ids is not None and (not isinstance(vm_ids, list)
                               or not all(isinstance(v, str) for v in vm_ids)):
        raise BadRequest("vm_ids must be a list of VM ids (what gc listed)")
    if confirm:
        note(request, target="orphans " + ",".join(vm_ids or ["all"])[:200])
    found = await request.app[INFRAS].gc(confirm=confirm, vm_ids=vm_ids)
    return web.json_response({"orphans": _builtins(found), "removed": confirm})


@requires("viewer")
async def infra_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``progress`` event per step of this infra; with
    ``?until=settled`` the stream ends (``event: end``) once the infra settles."""
    name = request.match_info["name"]
    _in_scope(request, name)
    until_settled = request.query.get("until") == "settled"
    infras = request.app[INFRAS]
    queue: asyncio.Queue[Progress] = asyncio.Queue(maxsize=10_000)

    def on_progress(p: Progress) -> None:
        if p.infra == name:
            try:
                queue.put_nowait(p)
            except asyncio.QueueFull:
                pass  # a reader this far behind re-reads the infra's view instead

    unsubscribe = infras.subscribe(on_progress)

    async def items() -> AsyncGenerator[sse.Item, None]:
        try:
            view = infras.get(name)
            if view is not None:
                yield "view", view
            while True:
                view = infras.get(name)
                if until_settled and queue.empty() and (view is None or view.status in SETTLED):
                    break
                p = await sse.next_or_none(queue, KEEPALIVE_S if not until_settled else 1)
                yield sse.KEEPALIVE if p is None else ("progress", p)
            final = infras.get(name)
            yield "end", final if final is not None else {}
        finally:
            unsubscribe()

    return await sse.serve(request, items())


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/infras/review", review_infra),
        web.post("/v1/infras/gc", gc_infras),
        web.post("/v1/infras", create_infra),
        web.get("/v1/infras", list_infras),
        web.get("/v1/infras/{name}", get_infra),
        web.delete("/v1/infras/{name}", delete_infra),
        web.post("/v1/infras/{name}/actions", act_on_infra),
        web.get("/v1/infras/{name}/events", infra_events),
    ]
