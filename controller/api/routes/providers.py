"""The configured providers: list, a credentials check, and the catalog search (sizes that
fit, cheapest or nearest first; regions with coordinates)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

from controller.api.access import requires
from controller.api.keys import CATALOGS, PROVIDERS
from controller.errors import BadRequest, NotFound
from controller.provision.catalog import offers, parse_point
from controller.provision.contract import TAG_MANAGED, Catalog, Provider, ProvisionError
from controller.provision.refresh import Refreshable, refresh, summary

# A tag value no VM carries: the check lists nothing, but needs working credentials.
CHECK_TAGS = {TAG_MANAGED: "barista-credentials-check"}


def _all(request: web.Request) -> Mapping[str, Provider]:
    found: Mapping[str, Provider] = request.app[PROVIDERS]
    return found


def _provider(request: web.Request) -> Provider:
    name = request.match_info["name"]
    p = _all(request).get(name)
    if p is None:
        known = ", ".join(sorted(_all(request))) or "none configured"
        raise NotFound(f"no provider {name!r} (configured: {known}; add a "
                       f"[controller.providers.{name}] table)")
    return p


@requires("viewer")
async def list_providers(request: web.Request) -> web.Response:
    out = []
    for name, p in sorted(_all(request).items()):
        cat = p.catalog()
        out.append({"name": name, "kind": cat.provider, "regions": sorted(cat.regions),
                    "sizes": len(cat.sizes), "images": sorted(cat.images)})
    return web.json_response({"providers": out})


@requires("operator")
async def check_provider(request: web.Request) -> web.Response:
    """One cheap read call with the provider's credentials (a listing by a tag nothing
    carries): ok, or the typed error with what to do."""
    p = _provider(request)
    regions = sorted(p.catalog().regions)
    body: dict[str, Any] = {"name": request.match_info["name"], "kind": p.catalog().provider}
    try:
        await p.query_instances(CHECK_TAGS, region=regions[0] if regions else None)
    except ProvisionError as exc:
        body.update(ok=False, error=exc.kind, code=exc.code, message=exc.message,
                    scope=exc.scope)
        return web.json_response(body)
    body.update(ok=True, message="credentials work (a listing call succeeded)")
    return web.json_response(body)


def _num(request: web.Request, key: str, kind: type[int] | type[float]) -> Any:
    raw = request.query.get(key, "")
    if not raw:
        return 0
    try:
        value = kind(raw)
    except ValueError:
        raise BadRequest(f"{key} must be a number, not {raw!r}") from None
    if value < 0:
        raise BadRequest(f"{key} must be >= 0")
    return value


@requires("viewer")
async def catalog_sizes(request: web.Request) -> web.Response:
    q = request.query
    provs = _all(request)
    wanted = [n for n in q.getall("provider", []) if n]
    for n in wanted:
        if n not in provs:
            raise NotFound(f"no provider {n!r} (configured: {', '.join(sorted(provs))})")
    catalogs: list[Catalog] = [p.catalog() for n, p in sorted(provs.items())
                               if not wanted or n in wanted]
    near = None
    if q.get("near"):
        try:
            near = parse_point(q["near"])
        except ValueError as exc:
            raise BadRequest(f"near: {exc}") from None
    order = q.get("order", "distance" if near else "price")
    if order not in ("price", "distance"):
        raise BadRequest("order must be price or distance")
    arch = q.get("arch", "")
    if arch not in ("", "x86_64", "arm64"):
        raise BadRequest("arch must be x86_64 or arm64")
    limit = _num(request, "limit", int) or 50
    found = offers(catalogs, vcpus=_num(request, "vcpus", int),
                   memory_gb=_num(request, "memory_gb", float), arch=arch,
                   gpus=_num(request, "gpus", int), near=near,
                   order="distance" if order == "distance" else "price")
    return web.json_response({"sizes": [
        {"provider": o.provider, "region": o.region, "size": o.size.name,
         "vcpus": o.size.vcpus, "memory_gb": o.size.memory_gb, "arch": o.size.arch,
         "gpus": o.size.gpus, "price_hour": o.price_hour,
         "distance_km": None if o.distance_km is None else round(o.distance_km)}
        for o in found[:limit]], "total": len(found)})


@requires("viewer")
async def catalog_regions(request: web.Request) -> web.Response:
    out = []
    for name, p in sorted(_all(request).items()):
        for r in p.catalog().regions.values():
            out.append({"provider": name, "region": r.name, "display": r.display,
                        "latitude": r.latitude, "longitude": r.longitude,
                        "zones": list(r.zones)})
    return web.json_response({"regions": out})


# What to do about a failed refresh, by the contract's error kind.
REFRESH_HINTS = {
    "credentials": "check the provider's credentials (`barista provider check {name}`)",
    "transient": "the cloud's API was unavailable or throttled; run the refresh again",
    "quota": "the account's API limits were hit; run the refresh again later",
}


@requires("operator")
async def refresh_catalog(request: web.Request) -> web.StreamResponse:
    """SSE: ``progress`` messages while the cloud is read, then ``done`` (the new catalog's
    summary) or ``error`` (nothing was written; the catalog in use is unchanged)."""
    name = request.match_info["name"]
    p = _provider(request)
    if not isinstance(p, Refreshable):
        raise BadRequest(f"provider {name!r} ({p.catalog().provider}) has no catalog API to "
                         "refresh from; its catalog is the shipped one")
    store = request.app[CATALOGS]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    lines: list[bytes] = []

    def send(event: str, data: Any) -> bytes:
        return f"event: {event}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n"

    def progress(message: str) -> None:
        lines.append(send("progress", {"message": message}))

    async def flush() -> None:
        while lines:
            await resp.write(lines.pop(0))

    task = asyncio.ensure_future(refresh(name, p, store, progress))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            await flush()
        overlay = task.result()
        await flush()
        await resp.write(send("done", summary(overlay, p.catalog())))
    except ProvisionError as exc:
        await flush()
        await resp.write(send("error", {
            "error": exc.kind, "code": exc.code, "message": exc.message,
            "hint": REFRESH_HINTS.get(exc.kind, "nothing was written; fix the cause and run "
                                      "the refresh again").format(name=name)}))
    except (ConnectionResetError, asyncio.CancelledError):
        task.cancel()
    return resp


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/providers", list_providers),
        web.post("/v1/providers/{name}/check", check_provider),
        web.post("/v1/catalog/{name}/refresh", refresh_catalog),
        web.get("/v1/catalog/sizes", catalog_sizes),
        web.get("/v1/catalog/regions", catalog_regions),
    ]
