"""REST API v1: bearer-token auth, JSON errors from one middleware, SSE streams."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from controller import jsontext
from controller.errors import BadRequest, BodyTooLarge, ControllerError, NotFound
from controller.events import event_json
from controller.jobs.engine import JobSpec
from controller.service import Controller
from protocol.errors import BaristaError, SelectorError
from protocol.selectors import Selector, parse_labels

log = logging.getLogger("barista.controller.api")

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
API_TOKEN: web.AppKey[str] = web.AppKey("api_token", str)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, details: Any = None) -> web.Response:
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
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except ControllerError as exc:
        return _error(exc.status, exc.code, exc.message, exc.details)
    except SelectorError as exc:
        return _error(400, exc.code, str(exc), {"position": exc.position})
    except BaristaError as exc:
        return _error(400, exc.code, str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; see the controller log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected = request.app[API_TOKEN]
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        return _error(
            401,
            "unauthorized",
            "missing or wrong API token: send 'Authorization: Bearer <token>' "
            "(the token is in the controller's data dir, file api-token)",
        )
    return await handler(request)


def _controller(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def _selector(request: web.Request) -> Selector:
    return Selector.parse(request.query.get("selector", ""))


async def read_body(request: web.Request) -> bytes:
    """The request body, refused with 413 over MAX_BODY (every route reads through here)."""
    if request.content_length and request.content_length > MAX_BODY:
        raise BodyTooLarge(f"request body over {MAX_BODY} bytes")
    return await request.read()


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    data = jsontext.loads(raw) if raw else {}
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    c = _controller(request)
    # Both connections: after an embedded nats-server restart each reconnects on its own.
    ok = (c.ready and c.nc is not None and c.nc.is_connected
          and (c.state_nc is None or c.state_nc.is_connected))
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    return web.json_response(_controller(request).status())


async def list_nodes(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.fleet is not None
    nodes = c.fleet.select(_selector(request))
    status_filter = request.query.get("status")
    if status_filter:
        nodes = [n for n in nodes if n.status == status_filter]
    return web.json_response({"nodes": [c.fleet.view(n) for n in nodes]})


async def get_node(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.fleet is not None
    return web.json_response(c.fleet.view(c.fleet.get(request.match_info["id"])))


async def create_token(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.tokens is not None
    body = await _json_body(request)
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
    issued = await c.tokens.create(
        labels=labels, ttl=ttl, description=str(body.get("description", ""))
    )
    out = issued.record.public()
    out["token"] = issued.token
    out["nats_url"] = c.agent_nats_url
    assert c.secrets is not None
    out["controller_key"] = c.secrets.signer.public_key_b64
    return web.json_response(out, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.tokens_table is not None
    now = time.time()
    out = []
    for t in sorted(c.tokens_table, key=lambda t: t.created_at):
        item = t.public()
        item["state"] = "used" if t.used_by else ("expired" if t.expires_at < now else "valid")
        out.append(item)
    return web.json_response({"tokens": out})


async def latest_metrics(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.fleet is not None
    node = c.fleet.get(request.match_info["id"])
    batch = c.hub.latest(node.id)
    if batch is None:
        raise NotFound(f"no metrics received from node {node.id} since the controller started")
    return web.json_response(msgspec.to_builtins(batch))


async def metrics_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``metrics`` event per batch matching selector/measurement."""
    c = _controller(request)
    selector = _selector(request)
    measurements = frozenset(m for m in request.query.getall("measurement", []) if m)
    sub, unsubscribe = c.hub.subscribe(selector, measurements)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    try:
        await resp.write(b": stream open\n\n")
        while True:
            try:
                batch = await asyncio.wait_for(sub.queue.get(), 15)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            data = msgspec.json.encode(msgspec.to_builtins(batch))
            await resp.write(b"event: metrics\ndata: " + data + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()
    return resp


async def create_job(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.jobs is not None
    body = await _json_body(request)
    try:
        spec = msgspec.convert(body, JobSpec)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid job: {exc}") from None
    record = await c.jobs.submit(spec, created_by=f"api@{request.remote or '-'}")
    if request.query.get("wait") in ("1", "true", "yes"):
        record = await c.jobs.wait(record.id)
        return web.json_response(await _job_view(c, record.id), status=200)
    out = record.summary()
    out["expected_nodes"] = record.expected
    return web.json_response(out, status=202)


async def _job_view(c: Controller, job_id: str) -> dict[str, Any]:
    assert c.jobs is not None
    job = c.jobs.get(job_id)
    out = job.summary()
    out["spec"] = msgspec.to_builtins(job.spec)
    out["expected_nodes"] = job.expected
    out["results"] = [msgspec.to_builtins(r) for r in await c.jobs.results(job_id)]
    return out


async def list_jobs(request: web.Request) -> web.Response:
    c = _controller(request)
    assert c.jobs is not None
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "50"))))
    except ValueError:
        raise BadRequest("limit must be a number") from None
    return web.json_response({"jobs": [j.summary() for j in c.jobs.list(limit)]})


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(await _job_view(_controller(request), request.match_info["id"]))


async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: ``result`` per node as it arrives, ``output`` for streamed output, then ``done``."""
    c = _controller(request)
    assert c.jobs is not None
    job_id = request.match_info["id"]
    c.jobs.get(job_id)  # 404 before the stream starts
    queue, stop = c.jobs.listen(job_id)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(event: str, data: Any) -> None:
        await resp.write(f"event: {event}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n")

    try:
        for r in await c.jobs.results(job_id):
            await send("result", msgspec.to_builtins(r))
        if queue is not None:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if kind == "result":
                    await send("result", msgspec.to_builtins(payload))
                elif kind == "event":
                    await send("output" if payload.type == "job.output" else "progress",
                               event_json(payload))
                elif kind == "done":
                    break
        await send("done", c.jobs.get(job_id).summary())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        stop()
    return resp


def make_app(controller: Controller, api_token: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY)
    app[CONTROLLER] = controller
    app[API_TOKEN] = api_token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/nodes", list_nodes)
    app.router.add_get("/v1/nodes/{id}", get_node)
    app.router.add_get("/v1/nodes/{id}/metrics/latest", latest_metrics)
    app.router.add_get("/v1/metrics/stream", metrics_stream)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_get("/v1/jobs/{id}/events", job_events)
    from controller.api.routes.apps import add_app_routes  # imports this module: import here

    add_app_routes(app)
    return app


class ApiServer:
    """Runs the aiohttp app on host:port; port 0 picks a free one."""

    def __init__(self, controller: Controller, *, host: str, port: int) -> None:
        assert controller.secrets is not None
        self.app = make_app(controller, controller.secrets.api_token)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> ApiServer:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("API listening on %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
