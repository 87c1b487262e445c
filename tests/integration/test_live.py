"""Live metrics over the real API: SSE stream filtered by selector and measurement, the
latest-batch endpoint, and `barista top --once` in a subprocess against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from agent.identity import Identity
from controller.service import RunningController
from protocol.messages import EnrollReply
from tests.fixtures.controller import AgentFactory, run_cli
from tests.fixtures.enroll import enroll_raw, signed_request

COLLECTORS = ["cpu", "mem", "net", "load"]


@contextlib.asynccontextmanager
async def sse(
    http: aiohttp.ClientSession, api: tuple[str, str], **params: str
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The metrics stream as an async iterator of parsed ``metrics`` events."""
    url, token = api
    async with http.get(
        url + "/v1/metrics/stream",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=None, sock_read=20),
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")

        async def events() -> AsyncIterator[dict[str, Any]]:
            event, data = "", list[str]()
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if event == "metrics" and data:
                        yield json.loads("\n".join(data))
                    event, data = "", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())

        yield events()


async def take(events: AsyncIterator[dict[str, Any]], n: int, within: float = 10.0) -> list[Any]:
    out: list[dict[str, Any]] = []

    async def run() -> None:
        async for ev in events:
            out.append(ev)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), within)
    return out


async def test_stream_filters_by_selector(
    api, http, controller: RunningController, agents: AgentFactory
):
    aws = await agents.start(labels={"provider": "aws", "region": "us-east-1"},
                             collectors=COLLECTORS)
    gcp = await agents.start(labels={"provider": "gcp", "region": "europe-west1"},
                             collectors=COLLECTORS)
    async with sse(http, api, selector="provider=aws") as events:
        gcp_before = gcp.published_batches
        got = await take(events, 4)
        # gcp kept publishing meanwhile: what it sent was filtered out, not absent.
        assert gcp.published_batches > gcp_before
    assert {b["node_id"] for b in got} == {aws.node_id}
    seqs = [b["seq"] for b in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    names = {p[0] for b in got for p in b["points"]}
    assert {"cpu", "mem", "net", "system"} <= names
    assert got[-1]["tags"]["provider"] == "aws"


async def test_stream_filters_by_measurement(api, http, agents: AgentFactory):
    await agents.start(labels={"provider": "aws"}, collectors=COLLECTORS)
    async with sse(http, api, measurement="mem") as events:
        got = await take(events, 2)
    points = [p for b in got for p in b["points"]]
    assert points and {p[0] for p in points} == {"mem"}
    assert all(0 <= p[1]["used_percent"] <= 100 for p in points)


async def test_stream_bad_selector_is_400_json(api, http):
    url, token = api
    async with http.get(
        url + "/v1/metrics/stream",
        params={"selector": "provider in (aws"},
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/json")
        body = await r.json()
    assert body["error"] == "bad_selector" and "selector" in body["message"]
    assert body["details"]["position"] == len("provider in (aws")


async def _enroll_silent_node(controller: RunningController, tmp_path: Path) -> str:
    """A node enrolled over NATS that never publishes metrics."""
    assert controller.tokens is not None
    tok = await controller.tokens.create(labels={"provider": "onprem"})
    ident = Identity(tmp_path / "silent.nk")
    req, key = signed_request(tok.token, ident, hostname="silent")
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply)
    assert reply.ok, reply
    return reply.node_id


async def test_latest_metrics_endpoint(
    api, http, controller: RunningController, agents: AgentFactory, tmp_path: Path
):
    url, token = api
    h = {"Authorization": f"Bearer {token}"}
    agent = await agents.start(labels={"provider": "aws"}, collectors=COLLECTORS)
    silent = await _enroll_silent_node(controller, tmp_path)
    async with sse(http, api, selector="provider=aws") as events:
        await take(events, 1)  # a batch went through the controller
    async with http.get(url + f"/v1/nodes/{agent.node_id}/metrics/latest", headers=h) as r:
        assert r.status == 200
        latest = await r.json()
    assert latest["node_id"] == agent.node_id
    # The controller sees a batch on its subscription before the agent has JetStream's
    # ack for it (published_batches counts acks): compare with the batches it made.
    assert 1 <= latest["seq"] <= agent.outbox.seq
    assert {p[0] for p in latest["points"]} >= {"cpu", "mem"}
    async with http.get(url + f"/v1/nodes/{silent}/metrics/latest", headers=h) as r:
        assert r.status == 404
        body = await r.json()
    assert body["error"] and silent in body["message"]
    async with http.get(url + "/v1/nodes/nosuchnode/metrics/latest", headers=h) as r:
        assert r.status == 404


async def test_top_once_json_subprocess(api, agents: AgentFactory, tmp_path: Path):
    url, token = api
    aws = await agents.start(labels={"provider": "aws", "region": "us-east-1"},
                             collectors=COLLECTORS)
    gcp = await agents.start(labels={"provider": "gcp", "region": "europe-west1"},
                             collectors=COLLECTORS)
    code, out, err = await run_cli("top", "--once", "-o", "json", url=url, token=token,
                                   timeout=30)
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)}
    assert set(rows) == {aws.node_id, gcp.node_id}
    assert rows[aws.node_id]["provider"] == "aws"
    assert rows[gcp.node_id]["region"] == "europe-west1"
    for row in rows.values():
        assert 0 <= row["cpu"] <= 100 and 0 < row["mem"] <= 100
        assert row["load1"] is not None and row["load1"] >= 0

    # a selector narrows it to one node; a bad one is a clear error, not a traceback
    code, out, _ = await run_cli("top", "--once", "-o", "json", "-l", "provider=gcp",
                                 url=url, token=token, timeout=30)
    assert [r["node"] for r in json.loads(out)] == [gcp.node_id]
    code, _, err = await run_cli("top", "--once", "-l", "provider in (aws", url=url,
                                 token=token, timeout=30)
    assert code == 1 and "Error:" in err and "Traceback" not in err


def test_top_net_rate_from_two_batches():
    """Rates come from the difference of cumulative counters, summed over interfaces."""
    from controller.cli.metrics import NodeRow, apply_batch

    def batch(ts_s: float, rx: tuple[int, int], tx: tuple[int, int]) -> dict[str, Any]:
        return {"ts": int(ts_s * 1e9), "points": [
            ["cpu", {"usage_active": 12.5}, {"cpu": "cpu-total"}],
            ["cpu", {"usage_active": 99.0}, {"cpu": "cpu0"}],
            ["mem", {"used_percent": 40.0}],
            ["system", {"load1": 0.25}],
            ["net", {"bytes_recv": rx[0], "bytes_sent": tx[0]}, {"interface": "eth0"}],
            ["net", {"bytes_recv": rx[1], "bytes_sent": tx[1]}, {"interface": "eth1"}],
            "garbage",
        ]}

    row = NodeRow("n1")
    apply_batch(row, batch(100, (1000, 0), (500, 0)))
    assert (row.cpu, row.mem, row.load1, row.net_in) == (12.5, 40.0, 0.25, None)
    apply_batch(row, batch(102, (3000, 2000), (700, 100)))
    assert row.net_in == 2000.0 and row.net_out == 150.0
    apply_batch(row, batch(104, (10, 0), (0, 0)))  # counters reset (reboot): no rate
    assert row.net_in is None and row.net_out is None
