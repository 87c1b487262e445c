"""API middleware: JSON errors from one place, bearer-token auth, and request bodies read
within a size limit (``read_body``/``json_body``, the only way routes read a body)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controller import jsontext
from controller.api.keys import API_TOKEN
from controller.errors import BadRequest, BodyTooLarge, ControllerError
from protocol.errors import BaristaError, SelectorError

log = logging.getLogger("barista.controller.api")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
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
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected = request.app[API_TOKEN]
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        return error_response(
            401,
            "unauthorized",
            "missing or wrong API token: send 'Authorization: Bearer <token>' "
            "(the token is in the controller's data dir, file api-token)",
        )
    return await handler(request)


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
