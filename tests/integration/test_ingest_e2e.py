"""Ingest end to end: real agents -> NATS JetStream -> the controller's ingest workers ->
a real InfluxDB 1.x; Telegraf-shaped data with node tags, and no loss across an outage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import Agent
from controller.service import Controller, RunningController
from tests.fixtures.controller import AgentFactory, controller_config
from tests.fixtures.influx import InfluxDB1
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.influx

DB = "barista"
COLLECTORS = ["cpu", "mem", "net"]


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, influx: InfluxDB1, **overrides: Any
) -> AsyncIterator[tuple[RunningController, AgentFactory]]:
    cfg = controller_config(
        tmp_path / "controller", influx_kind="influx1", influx_url=influx.url, influx_db=DB,
        **overrides,
    )
    async with Controller(cfg) as controller:
        factory = AgentFactory(controller, tmp_path / "agents")
        async with factory.stack:
            yield controller, factory


async def start_agents(factory: AgentFactory) -> list[Agent]:
    return [
        await factory.start(labels={"provider": "aws", "region": "us-east-1"},
                            collectors=COLLECTORS, metrics_interval=0.5),
        await factory.start(labels={"provider": "gcp", "region": "europe-west1"},
                            collectors=COLLECTORS, metrics_interval=0.5),
    ]


async def query(influx: InfluxDB1, q: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(influx.query, q, DB)


async def mem_counts(influx: InfluxDB1) -> dict[str, int]:
    """Points of `mem` per node: the agent's mem collector adds exactly one per batch."""
    try:
        series = await query(influx, 'SELECT count("used_percent") FROM "mem" GROUP BY "node"')
    except RuntimeError as exc:  # the database does not exist yet
        if "database not found" in str(exc):
            return {}
        raise
    return {s["tags"]["node"]: int(s["values"][0][1]) for s in series}


async def poll(fn: Any, check: Any, within: float, what: str) -> Any:
    """Await ``fn()`` until ``check(value)``; InfluxDB has no event to wait on."""
    last: list[Any] = []

    async def checked() -> tuple[Any] | None:
        value = await fn()
        last[:] = [value]
        return (value,) if check(value) else None

    try:
        got = await wait_for(checked, within, what, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value {last[0] if last else None!r}") from None
    assert got is not None  # wait_for returns a truthy value
    (value,) = got
    return value


async def test_agent_metrics_land_in_influxdb(tmp_path: Path, influxdb1: InfluxDB1):
    async with fleet(tmp_path, influxdb1) as (controller, factory):
        aws, gcp = await start_agents(factory)
        nodes = {aws.node_id, gcp.node_id}
        await poll(lambda: mem_counts(influxdb1), lambda c: set(c) == nodes and
                   min(c.values()) >= 2, 20, "mem points of both nodes")

        series = await query(
            influxdb1,
            'SELECT last("usage_active") FROM "cpu" WHERE "cpu" = \'cpu-total\' '
            'GROUP BY "node", "provider", "region"',
        )
        tags = {s["tags"]["node"]: s["tags"] for s in series}
        assert tags[aws.node_id]["provider"] == "aws"
        assert tags[gcp.node_id] == {"node": gcp.node_id, "provider": "gcp",
                                     "region": "europe-west1"}
        assert all(0 <= s["values"][0][1] <= 100 for s in series)

        keys = await query(influxdb1, 'SHOW FIELD KEYS FROM "mem"')
        fields = {v[0] for v in keys[0]["values"]}
        assert {"total", "available", "used", "used_percent", "available_percent"} <= fields
        keys = await query(influxdb1, 'SHOW FIELD KEYS FROM "cpu"')
        assert {"usage_user", "usage_system", "usage_idle", "usage_active"} <= {
            v[0] for v in keys[0]["values"]
        }
        keys = await query(influxdb1, 'SHOW FIELD KEYS FROM "net"')
        assert {"bytes_recv", "bytes_sent", "packets_recv", "err_in", "drop_out"} <= {
            v[0] for v in keys[0]["values"]
        }
        ifaces = await query(influxdb1, 'SHOW TAG VALUES FROM "net" WITH KEY = "interface"')
        assert "lo" not in {v[1] for v in ifaces[0]["values"]}

        status = controller.status()["ingest"]
        assert isinstance(status, dict)
        assert status["points"] > 0 and status["batches"] > 0
        assert status["write_errors"] == 0 and status["workers"][0]["running"]
        assert "influx1" in status["sink"]
        # Real agents' names need no replacing and nothing is dropped (and it says so).
        assert status["line_protocol"] == {
            "replaced": 0, "dropped_tags": 0, "dropped_fields": 0, "dropped_points": 0,
        }  # fmt: skip
        # Real agents' batches are what the encoder's shape plans are for: a node's first
        # batch plans its shape, and it does not change between intervals.
        worker = status["workers"][0]
        assert worker["encoded_fast"] > 0 and worker["encoded_exact"] == 0, worker


async def stream_counts(controller: RunningController, nodes: set[str]) -> dict[str, int]:
    """Batches JetStream holds per node: what the agents published (duplicates dropped)."""
    assert controller.js is not None
    info = await controller.js.stream_info("METRICS", subjects_filter=">")
    per_subject = info.state.subjects or {}
    return {n: per_subject.get(controller.subjects.metrics(n), 0) for n in nodes}


OUTAGE = int(os.environ.get("BARISTA_OUTAGE_SECONDS", "5"))


@pytest.mark.slow
async def test_influxdb_outage_loses_nothing(tmp_path: Path, influxdb1: InfluxDB1):
    async with fleet(tmp_path, influxdb1, ingest_workers=2) as (controller, factory):
        assert controller.ingest is not None
        for w in controller.ingest.workers:
            w.retry_backoff = (0.1, 1.0)  # retry soon after influxd is back
        agents = await start_agents(factory)
        nodes = {a.node_id for a in agents}
        await poll(lambda: mem_counts(influxdb1), lambda c: set(c) == nodes, 20,
                   "first points")

        await asyncio.to_thread(influxdb1.stop)
        during = sum(a.published_batches for a in agents)
        # OUTAGE s of outage while agents keep collecting and publishing (2 per second
        # each); BARISTA_OUTAGE_SECONDS=60 runs the 60 s case.
        await wait_for(lambda: sum(a.published_batches for a in agents) >= during + 4 * OUTAGE,
                       timeout=2 * OUTAGE + 15, what="agents publishing during the outage")
        await wait_for(lambda: controller.ingest.status()["write_errors"] > 0,
                       timeout=10, what="ingest noticing the outage")
        await asyncio.to_thread(influxdb1.start)
        after = sum(a.published_batches for a in agents)
        await wait_for(lambda: sum(a.published_batches for a in agents) >= after + 4,
                       timeout=10, what="agents publishing after the outage")
        for agent in agents:
            await agent.stop()
        published = {a.node_id: a.published_batches for a in agents}

        in_stream = await stream_counts(controller, nodes)
        # Every batch an agent saw acknowledged is in the stream (the stream may hold one
        # more per agent: a publish in flight when the agent stopped).
        assert all(published[n] <= in_stream[n] <= published[n] + 1 for n in nodes), (
            published, in_stream)
        counts = await poll(lambda: mem_counts(influxdb1), lambda c: c == in_stream, 30,
                            f"InfluxDB to hold every batch of the stream {in_stream}")
        assert counts == in_stream
        assert min(counts.values()) >= 2 * OUTAGE  # the outage at 2 batches/s each
        status = controller.ingest.status()
        assert status["write_errors"] > 0 and status["rejected"] == 0
        assert status["malformed"] == 0 and not status["backing_off"]


async def test_barista_ingest_as_its_own_process(tmp_path: Path, influxdb1: InfluxDB1):
    """`barista ingest` joins the durable consumer from another process (the controller
    here writes nothing itself) and exits cleanly on SIGTERM."""
    cfg = controller_config(tmp_path / "controller")
    async with Controller(cfg) as controller:
        assert controller.ingest is None and controller.status()["ingest"] is None
        factory = AgentFactory(controller, tmp_path / "agents")
        async with factory.stack:
            aws, gcp = await start_agents(factory)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller.cli", "ingest",
                "--nats-url", controller.nats_url, "--data-dir", str(cfg.data_dir),
                "--influx-kind", "influx1", "--influx-url", influxdb1.url,
                "--influx-db", DB, "--workers", "2",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "BARISTA_CONFIG": str(tmp_path / "none.toml")},
            )
            try:
                counts = await poll(
                    lambda: mem_counts(influxdb1),
                    lambda c: set(c) == {aws.node_id, gcp.node_id} and min(c.values()) >= 2,
                    30, "points written by the ingest process",
                )
                assert min(counts.values()) >= 2
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 15)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, err.decode()
            assert b"2 worker(s)" in err and b"Traceback" not in err


def test_barista_ingest_needs_a_sink_and_nats():
    from click.testing import CliRunner

    from controller.cli.main import main

    result = CliRunner().invoke(main, ["ingest", "--nats-url", "nats://127.0.0.1:1"],
                                env={"BARISTA_INFLUX_KIND": None, "BARISTA_INFLUX_URL": None})
    assert result.exit_code == 2 and "no sink" in result.output
    result = CliRunner().invoke(main, ["ingest", "--influx-kind", "influx2",
                                       "--influx-url", "http://127.0.0.1:1"],
                                env={"BARISTA_NATS_URL": None})
    assert result.exit_code == 2 and "--nats-url" in result.output
    result = CliRunner().invoke(main, ["ingest", "--nats-url", "nats://127.0.0.1:1",
                                       "--influx-kind", "influx2",
                                       "--influx-url", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and "influx2 sink needs token, org" in result.output
