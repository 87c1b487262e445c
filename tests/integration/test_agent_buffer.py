"""The agent's offline buffer across a real NATS restart: bounded, drop-oldest, counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.runtime import Agent
from controller.service import Controller
from protocol import codec
from protocol.messages import Event, MetricBatch, MetricsDropped
from tests.fixtures.controller import controller_config
from tests.fixtures.wait import wait_for


async def stream_batches(js, node_id: str) -> list[MetricBatch]:
    return await read_stream(js, "METRICS", f"barista.node.{node_id}.metrics", MetricBatch)


async def read_stream(js, stream: str, subject: str, kind):
    sub = await js.pull_subscribe(subject, stream=stream)
    out = []
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=1)
            except TimeoutError:
                break
            for m in msgs:
                out.append(codec.decode(m.data, kind))
                await m.ack()
    finally:
        await sub.unsubscribe()
    return out


@pytest.mark.slow
async def test_nats_restart_loses_nothing_within_the_buffer(nats_server_noauth, tmp_path: Path):
    srv = nats_server_noauth
    cfg = controller_config(tmp_path / "ctl", nats_url=srv.url)
    async with Controller(cfg) as c:
        tok = await c.tokens.create(labels={"provider": "aws"})
        agent = Agent(
            config=AgentConfig(
                nats_urls=[srv.url],
                token=tok.token,
                state_dir=tmp_path / "a",
                hostname="buf",
                collectors=["load"],
                metrics_interval=0.1,
                heartbeat_interval=0.2,
                buffer_batches=30,
            )
        )
        async with agent:
            await wait_for(lambda: agent.published_batches >= 3, 10, "first batches")
            await asyncio.to_thread(srv.stop)
            # offline: collection goes on into the ring until it overflows
            await wait_for(lambda: agent.dropped_total >= 5, 20, "the ring to overflow")
            await asyncio.to_thread(srv.start)
            await wait_for(lambda: not agent.buffer, 30, "the buffer to drain")
            last_seq = agent.outbox.seq
            dropped = agent.dropped_total
        stored = await stream_batches(c.js, agent.node_id)
        # The drop report is an event, kept in the EVENTS stream like every node event.
        events = await read_stream(c.js, "EVENTS", f"barista.node.{agent.node_id}.events", Event)
    seqs = sorted(b.seq for b in stored)
    assert len(seqs) == len(set(seqs)), "a batch was stored twice"
    # every batch that was not dropped from the bounded ring is in the stream
    missing = set(range(1, last_seq + 1)) - set(seqs)
    assert len(missing) == dropped
    report = next(e for e in events if e.type == "metrics.dropped")
    assert isinstance(report.payload, MetricsDropped)
    assert report.payload.dropped >= 5 and report.severity == "warning"
    # batches carry the cumulative count, so the last one stored reports every drop
    assert max(b.dropped for b in stored) == dropped


async def test_ring_drops_oldest_and_counts(tmp_path: Path):
    agent = Agent(
        config=AgentConfig(nats_urls=["nats://127.0.0.1:9"], state_dir=tmp_path, buffer_batches=3)
    )
    for i in range(5):
        agent.enqueue(f"id{i}", b"x%d" % i)
    assert [m for m, _ in agent.buffer] == ["id2", "id3", "id4"]
    assert agent.dropped_total == 2
