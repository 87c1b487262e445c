"""API middleware: the audit trail of mutating calls, JSON errors from one place,
bearer-token auth against each route's declared role, and request bodies read within a size
limit (``read_body``/``json_body``, the only way routes read a body)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controller import jsontext
from controller.api.access import NOTES, PRINCIPAL, required_role
from controller.api.keys import API_TOKENS, AUDIT
from controller.audit import AuditRecord
from controller.errors import BadRequest, BodyTooLarge, ControllerError, Unauthorized
from protocol.errors import BaristaError, SelectorError

log = logging.getLogger("barista.controller.api")

MAX_BODY = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, details: Any = None) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                              exc.text or exc.reason)
    except ControllerError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details)
    except SelectorError as exc:
        return error_response(400, exc.code, str(exc), {"position": exc.position})
    except BaristaError as exc:
        return error_response(400, exc.code, str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the controller log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one authorisation point: the route's declared role (controller.api.access)
    against the caller's token. 401: no valid token; 403: the role is not enough."""
    route_role = required_role(request.match_info.handler)
    if route_role == "public":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer":
        secret = ""
    try:
        who = request.app[API_TOKENS].authenticate(secret.strip())
    except Unauthorized as exc:
        return error_response(401, exc.code, exc.message)
    request[PRINCIPAL] = who
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route: its 404/405
    if route_role is None:
        # Fail closed: a route that declares no role is nobody's (a test guards this).
        log.error("route %s %s declares no role; refused", request.method, request.path)
        return error_response(500, "internal", "this route declares no role; refused")
    if not who.allows(route_role):
        return error_response(
            403, "forbidden",
            f"{request.method} {_route_path(request)} needs role {route_role}; token "
            f"{who.name!r} has role {who.role}")
    return await handler(request)


def _route_path(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else request.path


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every mutating call by an authenticated caller, with its final status,
    goes to the audit trail (no body is copied: what a handler wants named it notes)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        who = request.get(PRINCIPAL)
        if who is not None:
            notes = request.get(NOTES, {})
            handler_fn = request.match_info.handler
            await request.app[AUDIT].append(AuditRecord(
                at=time.time(), kind="api", who=who.name, role=who.role,
                scope=str(who.scope), method=request.method, path=request.path,
                action=getattr(handler_fn, "__name__", ""), status=status,
                target=notes.get("target", ""), selector=notes.get("selector", ""),
                job_id=notes.get("job_id", ""),
            ))


async def read_body(request: web.Request) -> bytes:
    """The request body, refused with 413 over MAX_BODY (every route reads through here)."""
    if request.content_length and request.content_length > MAX_BODY:
        raise BodyTooLarge(f"request body over {MAX_BODY} bytes")
    return await request.read()


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (empty body: {}); anything else is BadRequest."""
    raw = await read_body(request)
    data = jsontext.loads(raw) if raw else {}
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data
