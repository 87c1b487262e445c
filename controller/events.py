"""The wire's typed event payloads and command result data as the API serves them (JSON).

The one place the controller turns protocol payloads into the JSON shapes of /v1/jobs.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.messages import (
    AnyEventPayload,
    AnyResultData,
    AppsReport,
    Event,
    FactsReport,
    Pong,
)


def _fields(struct: msgspec.Struct) -> dict[str, Any]:
    """Every field of a payload by its wire name, defaults included (no tag)."""
    return {
        f.encode_name: msgspec.to_builtins(getattr(struct, f.name))
        for f in msgspec.structs.fields(struct)
    }


def payload_json(payload: AnyEventPayload) -> dict[str, Any]:
    """An event payload as the ``data`` map of the API's event JSON."""
    return _fields(payload)


def event_json(event: Event) -> dict[str, Any]:
    """An event as the API serves it (job progress and output in /v1/jobs/<id>/events)."""
    out: dict[str, Any] = {"kind": "event", "ts": event.ts, "type": event.type}
    if event.node_id:
        out["node_id"] = event.node_id
    if event.severity != "info":
        out["severity"] = event.severity
    if event.message:
        out["message"] = event.message
    data = payload_json(event.payload)
    if data:
        out["data"] = data
    return out


def result_data_json(data: AnyResultData | None) -> dict[str, Any]:
    """A command result's data as jobs keep and serve it: a ping's ``{"pong": true, "labels",
    "facts"}``, the facts themselves, or app name -> status for a reconcile."""
    if isinstance(data, Pong):
        return {"pong": True, "labels": dict(data.labels),
                "facts": msgspec.to_builtins(data.facts)}
    if isinstance(data, FactsReport):
        out: dict[str, Any] = msgspec.to_builtins(data.facts)
        return out
    if isinstance(data, AppsReport):
        return {name: _fields(st) for name, st in data.apps.items()}
    return {}
