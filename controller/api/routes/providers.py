"""The configured providers: list, a credentials check, and the catalog search (sizes that
fit, cheapest or nearest first; regions with coordinates)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from controller.api.access import requires
from controller.api.keys import PROVIDERS
from controller.errors import BadRequest, NotFound
from controller.provision.catalog import offers, parse_point
from controller.provision.contract import TAG_MANAGED, Catalog, Provider, ProvisionError

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


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/providers", list_providers),
        web.post("/v1/providers/{name}/check", check_provider),
        web.get("/v1/catalog/sizes", catalog_sizes),
        web.get("/v1/catalog/regions", catalog_regions),
    ]
