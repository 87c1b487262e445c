"""A node's facts after enrollment, against the real embedded nats-server and controller: an
agent restarted with other facts (a VM stopped and started with a new public address, an
upgrade) updates its record, as does an underlay change while it runs; bad FactsUpdates are
refused and counted, and what is kept is bounded as at enrollment."""

from __future__ import annotations

import dataclasses

import nats
from nats.aio.client import Client as NATS

from agent.runtime import Agent
from controller.service import RunningController
from protocol import codec
from protocol.messages import FactsUpdate, Heartbeat
from tests.fixtures.controller import AgentFactory
from tests.fixtures.enroll import node_opts
from tests.fixtures.wait import wait_for


def _facts(controller: RunningController, node_id: str) -> dict[str, str]:
    node = controller.nodes.get(node_id)
    assert node is not None
    return node.facts


async def test_restarted_agent_sends_its_current_facts(
    controller: RunningController, agents: AgentFactory,
) -> None:
    agent = await agents.start(mesh_public_address="198.51.100.7")
    nid = agent.node_id
    assert _facts(controller, nid)["public_ip"] == "198.51.100.7"  # from the enrollment
    await agent.stop()
    # Stopped and started again with another public address (a cloud VM's ephemeral IP)
    # and a new agent version: no re-enrollment, the record follows.
    config = dataclasses.replace(agent.config, mesh_public_address="203.0.113.9")
    again = Agent(config=config, version="0.2.0")
    async with again:
        assert again.node_id == nid
        await wait_for(lambda: _facts(controller, nid).get("public_ip") == "203.0.113.9", 10,
                       "the new public address in the node's record")
        facts = _facts(controller, nid)
        assert facts["agent_version"] == "0.2.0"
        assert controller.stats.facts_updates == 1
        assert controller.status()["facts_updates"] == 1


async def test_underlay_change_while_running_is_sent(
    controller: RunningController, agents: AgentFactory,
) -> None:
    agent = await agents.start(mesh_public_address="198.51.100.7", facts_interval=0.2)
    nid = agent.node_id
    assert _facts(controller, nid)["public_ip"] == "198.51.100.7"
    # The address the agent's underlay reports changes under it (here: its setting).
    agent.config.mesh_public_address = "203.0.113.20"
    await wait_for(lambda: _facts(controller, nid).get("public_ip") == "203.0.113.20", 10,
                   "the changed public address in the record")
    assert agent.facts["public_ip"] == "203.0.113.20"
    # Nothing changed since: nothing is sent (the loop keeps looking).
    assert not await agent.refresh_underlay()
    agent.config.mesh_public_address = "none"  # behind NAT now
    await wait_for(lambda: _facts(controller, nid).get("public_ip") == "", 10,
                   "no public address in the record")


async def test_bad_facts_are_refused_and_counted_and_kept_bounded(
    controller: RunningController, agents: AgentFactory,
) -> None:
    agent = await agents.start()
    nid, s = agent.node_id, agent.subjects
    before = dict(_facts(controller, nid))
    nc: NATS = await nats.connect(controller.agent_nats_url, **node_opts(agent))
    try:
        bad = [
            b"\xc1garbage",
            codec.encode(FactsUpdate(node_id="someone-else", facts={"public_ip": "1.2.3.4"})),
            codec.encode(FactsUpdate(node_id=nid, facts={"x": "y" * 70_000})),  # oversized
            codec.encode(Heartbeat(node_id=nid, seq=1, ts=1.0)),  # not a FactsUpdate
        ]
        for data in bad:
            await nc.publish(s.facts(nid), data)
        await nc.flush()
        await wait_for(lambda: controller.stats.rejected["facts"] >= len(bad), 10,
                       "every bad FactsUpdate counted")
        assert _facts(controller, nid) == before
        assert controller.stats.facts_updates == 0
        # A valid one with too much in it: kept as enrollment keeps facts (64 keys, keys
        # of 64 characters, values of 256).
        many = {f"{i:03d}" + "k" * 70: "v" * 300 for i in range(100)}
        await nc.publish(s.facts(nid), codec.encode(FactsUpdate(node_id=nid, facts=many)))
        await nc.flush()
        await wait_for(lambda: controller.stats.facts_updates == 1, 10, "the bounded update")
    finally:
        await nc.close()
    kept = _facts(controller, nid)
    assert len(kept) == 64
    assert all(len(k) == 64 and len(v) == 256 for k, v in kept.items())
    assert controller.stats.rejected["facts"] == 4  # the valid one was not counted
    assert controller.status()["rejected"]["facts"] == 4  # type: ignore[index]
