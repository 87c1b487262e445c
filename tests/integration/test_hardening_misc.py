"""Regression tests for issue 8 findings 3, 9, 11, 12 and 13, against real servers and agents.

Attacks come from raw nats-py clients holding a real node's nkey (or the controller's own
credentials, for the KV store) and from raw HTTP against the real aiohttp API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from agent.runtime import Agent
from controller.models import NodeRecord
from controller.nats.server import NatsServer
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import Event, Heartbeat, JobOutput, MetricsDropped
from tests.fixtures.controller import AgentFactory, controller_config, run_cli
from tests.fixtures.enroll import node_opts
from tests.fixtures.wait import wait_for

GARBAGE = b"\xc1 not a node record \xff"  # 0xc1 is never valid msgpack


@contextlib.asynccontextmanager
async def as_node(controller: RunningController, agent: Agent) -> AsyncIterator[NATS]:
    """A raw client holding ``agent``'s own nkey: what a compromised node can send."""
    assert agent.state is not None
    nc = await nats.connect(
        controller.nats_url,
        **node_opts(agent),
        inbox_prefix=agent.state.inbox_prefix.encode(),
        allow_reconnect=False,
    )
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def as_controller(controller: RunningController) -> AsyncIterator[NATS]:
    """A raw client with the controller's credentials (full JetStream and KV access)."""
    assert controller.natsd is not None
    nc = await nats.connect(controller.nats_url, **controller.natsd.controller_credentials())
    try:
        yield nc
    finally:
        await nc.close()


async def start_stoppable(agents: AgentFactory, **labels: str) -> Agent:
    """A real agent the test stops itself (``await agent.__aexit__(None, None, None)``);
    the factory's stack stops it too if the test fails first."""
    assert agents.controller.tokens is not None
    token = (await agents.controller.tokens.create(labels=labels)).token
    agent = Agent(config=agents.config(token))
    await agent.__aenter__()

    async def stop_if_running() -> None:
        if agent.nc is not None and not agent.nc.is_closed:
            await agent.__aexit__(None, None, None)

    agents.stack.push_async_callback(stop_if_running)
    return agent


# -- finding 3: one bad node record froze liveness for the whole fleet -------------------


async def test_f03_bad_node_record_does_not_freeze_liveness(
    controller: RunningController, agents: AgentFactory, api: tuple[str, str]
) -> None:
    fleet = controller.fleet
    assert fleet is not None and controller.nodes is not None
    # The corrupted node is enrolled first, so a sweep meets it before the others.
    victim = await start_stoppable(agents, role="victim")
    dying = await start_stoppable(agents, role="dying")
    await wait_for(lambda: fleet.get(dying.node_id).status == "online", 10, "online")
    await victim.__aexit__(None, None, None)  # its record now needs a transition too
    async with as_controller(controller) as raw:
        kv = await raw.jetstream().key_value("nodes")
        await kv.put(victim.node_id, GARBAGE)
        await kv.put("no-such-node", GARBAGE)
        # The watch delivers both within milliseconds; the stale window is 0.8 s.
        await dying.__aexit__(None, None, None)
        await wait_for(lambda: fleet.get(dying.node_id).status == "stale", 10, "stale")
        await wait_for(lambda: fleet.get(dying.node_id).status == "offline", 10, "offline")
        stored, _ = await controller.nodes.fetch(dying.node_id)
        assert stored.status == "offline"  # persisted, not only in memory
        await wait_for(
            lambda: controller.stats.rejected["bad_record"] >= 2, 10, "bad records counted"
        )
        # Counted once per bad revision, not once per sweep that trips over it.
        seen = controller.stats.rejected["bad_record"]
        # Part of what is tested: about five liveness sweeps (one per stale_after / 4) pass.
        await asyncio.sleep(5 * controller.config.stale_after / 4)
        assert controller.stats.rejected["bad_record"] == seen
        # The bad node stays known (its last good record), the sweep reports it as stuck.
        assert fleet.get(victim.node_id).id == victim.node_id
        assert victim.node_id in fleet.stuck()
        status = controller.status()
        bad = status["bad_records"]
        assert isinstance(bad, dict)
        assert bad["by_bucket"]["nodes"] >= 2
        assert sorted(bad["keys"]["nodes"]) == sorted([victim.node_id, "no-such-node"])
        assert "bad_record" in str(status["last_rejection"])
        # `barista status -o json` shows it
        url, token = api
        code, out, err = await run_cli("status", "-o", "json", url=url, token=token)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["rejected"]["bad_record"] == seen
        assert shown["bad_records"]["by_bucket"]["nodes"] >= 2
        assert "oversized_batches" in shown
        # The informer still follows the bucket: a good write repairs the key.
        repaired = NodeRecord(id=victim.node_id, hostname="repaired", identity="U" + "A" * 55,
                              status="offline")
        await kv.put(victim.node_id, msgspec.msgpack.encode(repaired))
        await wait_for(lambda: fleet.get(victim.node_id).hostname == "repaired", 10, "repair")
        assert victim.node_id not in controller.nodes.bad_keys()


# -- finding 9: one node could evict everyone's metrics ----------------------------------


@pytest.fixture
async def small_stream_controller(tmp_path: Path) -> AsyncIterator[RunningController]:
    """A controller whose METRICS stream is small (16 MiB), so eviction is quick to reach."""
    cfg = controller_config(tmp_path / "controller", metrics_max_bytes=16 << 20)
    async with Controller(cfg) as c:
        yield c


async def _per_subject(controller: RunningController) -> dict[str, int]:
    assert controller.js is not None
    info = await controller.js.stream_info("METRICS", subjects_filter=">")
    return dict(info.state.subjects or {})


async def test_f09_one_node_cannot_evict_other_nodes_metrics(
    small_stream_controller: RunningController, tmp_path: Path
) -> None:
    controller = small_stream_controller
    s = controller.subjects
    factory = AgentFactory(controller, tmp_path / "agents")
    async with factory.stack:
        noisy = await factory.start()
        others = [await factory.start(), await factory.start()]
        await wait_for(
            lambda: all(
                controller.hub.latest(a.node_id) is not None for a in [noisy, *others]
            ), 10, "batches from every node",
        )
        before = await _per_subject(controller)
        assert all(before.get(s.metrics(a.node_id), 0) >= 1 for a in others)
        # The first batch of every other node, by stream sequence: it must survive.
        assert controller.js is not None
        first = {
            a.node_id: (await controller.js.get_msg(
                "METRICS", subject=s.metrics(a.node_id), seq=1, next=True)).seq
            for a in others
        }
        async def others_intact() -> None:
            after = await _per_subject(controller)
            for a in others:  # nothing of the other nodes was pushed out
                assert after.get(s.metrics(a.node_id), 0) >= before[s.metrics(a.node_id)]
                oldest = await controller.js.get_msg(
                    "METRICS", subject=s.metrics(a.node_id), seq=1, next=True)
                assert oldest.seq == first[a.node_id]

        refused = 0
        async with as_node(controller, noisy) as mallory:
            js = mallory.jetstream()
            subject = s.metrics(noisy.node_id)
            for i in range(20):  # 20 x ~1 MB junk on the node's own subject
                try:
                    await js.publish(subject, bytes([i]) * 1_000_000, timeout=5)
                except nats.js.errors.BadRequestError as exc:
                    assert "size" in (exc.description or "").lower()
                    refused += 1
            await others_intact()
            assert refused == 20
            # under the size cap, but far more than the node's per-subject share
            cap = (await controller.js.stream_info("METRICS")).config.max_msgs_per_subject
            assert cap is not None and 0 < cap < 100
            for _ in range(cap + 40):
                await js.publish(subject, b"j" * (200 * 1024), timeout=5)
        await others_intact()
        assert (await _per_subject(controller))[subject] <= cap  # it lost only its own
        await wait_for(
            lambda: controller.stats.rejected["oversized_batch"] >= 20, 10, "oversized counted"
        )
        assert controller.status()["oversized_batches"] == controller.stats.rejected[
            "oversized_batch"]


async def test_f09_existing_metrics_stream_gets_the_bounds(
    nats_server_noauth: NatsServer, tmp_path: Path
) -> None:
    """A store made by an older controller (no per-subject limit, 1 MiB messages) is updated."""
    nc = await nats.connect(nats_server_noauth.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(
            name="METRICS", subjects=["barista.node.*.metrics"], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, max_bytes=1 << 30, max_msg_size=1 << 20,
        ))
        cfg = controller_config(tmp_path / "c", nats_url=nats_server_noauth.url)
        async with Controller(cfg):
            info = await js.stream_info("METRICS")
        assert info.config.max_msg_size == 256 * 1024
        assert info.config.max_msg_size == cfg.metrics_max_batch
        assert info.config.max_msgs_per_subject == controller_status_cap(cfg)
    finally:
        await nc.close()


def controller_status_cap(cfg: Any) -> int:
    from controller.state.streams import per_node_batches

    return per_node_batches(max_age=cfg.metrics_max_age, max_bytes=cfg.metrics_max_bytes,
                            max_batch=cfg.metrics_max_batch, interval=cfg.metrics_interval)


# -- finding 11: deeply nested JSON bodies answered 500 ----------------------------------


@pytest.mark.parametrize("path", ["/v1/tokens", "/v1/jobs", "/v1/apps"])
async def test_f11_deeply_nested_json_is_400(
    api: tuple[str, str], http: aiohttp.ClientSession, path: str
) -> None:
    url, token = api
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"labels": ' + deep + b"}", b'{"ttl": NaN}'):
        async with http.post(url + path, data=body, headers=auth) as r:
            assert r.status == 400, (path, body[:20], await r.text())
            err = await r.json()
        assert err["error"] == "bad_request" and "JSON" in err["message"]
    # still serving
    async with http.get(url + "/v1/status", headers=auth) as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    async with http.post(url + "/v1/tokens", json={"labels": {"a": "b"}}, headers=auth) as r:
        assert r.status == 201


# -- finding 12: heartbeats and events with a non-finite ts were accepted -----------------


async def test_f12_nan_heartbeat_is_rejected_and_does_not_keep_a_node_alive(
    controller: RunningController, agents: AgentFactory
) -> None:
    fleet = controller.fleet
    assert fleet is not None
    agent = await start_stoppable(agents)
    node_id = agent.node_id
    await wait_for(lambda: fleet.last_beat(node_id) is not None, 10, "a heartbeat")
    async with as_node(controller, agent) as mallory:
        await agent.__aexit__(None, None, None)  # the real agent is gone
        last = fleet.last_seen(node_id)
        before = controller.stats.rejected["heartbeat"]
        sent = 0

        async def offline_despite_nan_beats() -> bool:
            nonlocal sent
            if fleet.get(node_id).status == "offline":
                return True
            for ts in (math.nan, math.inf, -math.inf):
                hb = Heartbeat(node_id=node_id, seq=1000 + sent, ts=ts, uptime=1.0)
                await mallory.publish(controller.subjects.heartbeat(node_id), codec.encode(hb))
                sent += 1
            await mallory.flush()
            return False

        # NaN, then infinities, for as long as the node would take to go offline
        await wait_for(offline_despite_nan_beats, controller.config.offline_after * 3,
                       "offline (NaN heartbeats kept it alive)", interval=0.1)
        ev = Event(ts=math.nan, payload=MetricsDropped(dropped=1), node_id=node_id)
        events_before = controller.stats.rejected["events"]
        await mallory.publish(controller.subjects.events(node_id), codec.encode(ev))
        await mallory.flush()
        await wait_for(lambda: controller.stats.rejected["events"] > events_before, 5, "event")
    assert fleet.last_seen(node_id) == last
    await wait_for(lambda: controller.stats.rejected["heartbeat"] >= before + sent, 5, "counted")
    assert "must be a finite number" in controller.stats.last_rejection


# -- finding 13: any node could inject job.output into another node's job ----------------


async def test_f13_job_events_only_from_targeted_nodes(
    controller: RunningController, agents: AgentFactory
) -> None:
    from controller.jobs.engine import JobSpec

    assert controller.jobs is not None
    a = await agents.start(labels={"role": "a"})
    b = await agents.start(labels={"role": "b"})
    job = await controller.jobs.submit(JobSpec(
        shell="echo real; sleep 1; echo end", selector="role=a", timeout=10, stream_output=True,
    ))
    assert job.expected == [a.node_id]
    queue, stop = controller.jobs.listen(job.id)
    assert queue is not None
    try:
        async with as_node(controller, b) as mallory:
            forged = Event(ts=1.0, node_id=b.node_id,
                           payload=JobOutput(job_id=job.id, stream="stdout", data="FORGED\n"))
            for _ in range(3):
                await mallory.publish(controller.subjects.events(b.node_id), codec.encode(forged))
            await mallory.flush()
        done = await controller.jobs.wait(job.id)  # the job runs > 1 s: the forgeries came
    finally:
        stop()
    assert done.counts == {"ok": 1}
    seen: list[Any] = []
    while not queue.empty():
        seen.append(queue.get_nowait())
    events = [p for kind, p in seen if kind == "event"]
    assert events, "the targeted node's own output must still be relayed"
    assert all(e.node_id == a.node_id for e in events)
    assert not any("FORGED" in str(e.payload) for e in events)
    await wait_for(lambda: controller.stats.rejected["job_event"] >= 3, 10, "refusals")
    assert "does not target it" in controller.stats.last_rejection
