"""The audit trail (admin only: it names every token and every scope)."""

from __future__ import annotations

import math

from aiohttp import web

from controller.api.access import requires
from controller.api.keys import AUDIT
from controller.audit import READ_MAX, to_json
from controller.errors import BadRequest


@requires("admin")
async def list_audit(request: web.Request) -> web.Response:
    """``since``: a Unix time (records at or after it); ``limit``: the newest N."""
    try:
        since = float(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("since must be a Unix time and limit a number") from None
    if not math.isfinite(since) or not 1 <= limit <= READ_MAX:
        raise BadRequest(f"since must be a Unix time and limit between 1 and {READ_MAX}")
    records = await request.app[AUDIT].read(since=since, limit=limit)
    return web.json_response({"records": [to_json(r) for r in records]})


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/audit", list_audit)]
