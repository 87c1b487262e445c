"""Fleet jobs: submit (optionally waiting), list, show with results, and the SSE progress."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from aiohttp import web

from controller.api import sse
from controller.api.access import note, principal, requires
from controller.api.keys import JOBS
from controller.api.middleware import json_body
from controller.auth import Principal, narrow
from controller.errors import BadRequest, Forbidden
from controller.events import event_json
from controller.jobs.engine import JobEngine, JobRecord, JobSpec
from protocol.selectors import Selector


def _visible(who: Principal, job: JobRecord) -> bool:
    """A scoped token sees only jobs confined to (at least) its own scope: by the scope
    they ran under or by their own selector."""
    if not who.scoped:
        return True
    reach = narrow(Selector.parse(job.spec.selector), Selector.parse(job.scope))
    return who.covers(str(reach))


def _job_in_scope(request: web.Request, job_id: str) -> JobRecord:
    job = request.app[JOBS].get(job_id)
    who = principal(request)
    if not _visible(who, job):
        raise Forbidden(f"job {job_id} is outside the scope {who.scope} of token {who.name!r}")
    return job


@requires("operator")
async def create_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    body = await json_body(request)
    try:
        spec = msgspec.convert(body, JobSpec)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid job: {exc}") from None
    who = principal(request)
    note(request, selector=spec.selector)
    record = await jobs.submit(spec, created_by=who.name, role=who.role, scope=who.scope)
    note(request, job_id=record.id)
    if request.query.get("wait") in ("1", "true", "yes"):
        record = await jobs.wait(record.id)
        return web.json_response(await _job_view(jobs, record.id), status=200)
    out = record.summary()
    out["expected_nodes"] = record.expected
    return web.json_response(out, status=202)


async def _job_view(jobs: JobEngine, job_id: str) -> dict[str, Any]:
    job = jobs.get(job_id)
    out = job.summary()
    out["spec"] = msgspec.to_builtins(job.spec)
    out["expected_nodes"] = job.expected
    out["results"] = [msgspec.to_builtins(r) for r in await jobs.results(job_id)]
    return out


@requires("viewer")
async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "50"))))
    except ValueError:
        raise BadRequest("limit must be a number") from None
    who = principal(request)
    jobs = request.app[JOBS]
    if who.scoped:
        recent = [j for j in jobs.recent(len(jobs.records)) if _visible(who, j)][:limit]
    else:
        recent = jobs.recent(limit)
    return web.json_response({"jobs": [j.summary() for j in recent]})


@requires("viewer")
async def get_job(request: web.Request) -> web.Response:
    job = _job_in_scope(request, request.match_info["id"])
    return web.json_response(await _job_view(request.app[JOBS], job.id))


@requires("viewer")
async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: ``result`` per node as it arrives, ``output`` for streamed output, then ``done``."""
    jobs = request.app[JOBS]
    job_id = request.match_info["id"]
    _job_in_scope(request, job_id)  # 404 or 403 before the stream starts
    queue, stop = jobs.listen(job_id)

    async def items() -> AsyncGenerator[sse.Item, None]:
        try:
            for r in await jobs.results(job_id):
                yield "result", msgspec.to_builtins(r)
            while queue is not None:
                got = await sse.next_or_none(queue, 15)
                if got is None:
                    yield sse.KEEPALIVE
                    continue
                kind, payload = got
                if kind == "result":
                    yield "result", msgspec.to_builtins(payload)
                elif kind == "event":
                    yield ("output" if payload.type == "job.output" else "progress",
                           event_json(payload))
                elif kind == "done":
                    break
            yield "done", jobs.get(job_id).summary()
        finally:
            stop()

    return await sse.serve(request, items())


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/jobs", create_job),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.get("/v1/jobs/{id}/events", job_events),
    ]
