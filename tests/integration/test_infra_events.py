"""The infra progress stream (server-sent events) through the real API: the view first,
one ``progress`` event per engine step, and ``end`` with the settled infra."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.api.app import ApiServer
from controller.cli.client import ApiClient, ApiError
from controller.service import Controller
from tests.fixtures.controller import controller_config


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiClient]:
    # Every launch fails for lack of capacity: the infra settles at once, without agents.
    cfg = controller_config(tmp_path / "ctl", providers={"sim-a": {
        "kind": "sim", "boot_time": 0.05,
        "failures": [{"op": "run_instances", "error": "capacity", "times": 0}]}})
    async with Controller(cfg) as c, ApiServer(c, host="127.0.0.1", port=0) as server:
        c.provisioning.set_api_url(server.url)
        yield ApiClient(server.url, c.secrets.api_token, ca_file="/nonexistent")


async def test_infra_events_stream_until_settled(api: ApiClient) -> None:
    spec = {"name": "ev", "groups": [{"name": "g", "provider": "sim-a",
                                      "regions": ["east-1"], "size": "small", "count": 2}]}
    await asyncio.to_thread(api.post, "/v1/infras", spec)
    events: list[tuple[str, Any]] = await asyncio.wait_for(asyncio.to_thread(
        lambda: list(api.stream("/v1/infras/ev/events", until="settled"))), 60)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1, kinds
    assert kinds[0] == "view" and set(kinds[1:-1]) == {"progress"}, kinds
    end = events[-1][1]
    assert end["name"] == "ev" and end["status"] == "failed", end
    # Every step the engine took reached the stream, each for this infra.
    assert all(d["infra"] == "ev" for e, d in events if e == "progress")
    # Unknown infras are 404 before any stream starts.
    with pytest.raises(ApiError) as err:
        await asyncio.to_thread(lambda: list(api.stream("/v1/infras/nope/events")))
    assert err.value.status == 404, err.value
