"""The agent runtime's overlay over real NATS: an enrolled agent sends MeshJoin with its
WireGuard public key, brings its interface up when a snapshot arrives on its own subject,
applies deltas from the network's subject, rejects garbage, asks for a resync on a gap,
and rotates its key when asked. The test plays the controller's mesh part on the
controller's own NATS connection (the node permissions are the real ones)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from agent.runtime import Agent
from controller.service import RunningController
from protocol import codec
from protocol.mesh import key_bytes
from protocol.messages import (
    FactsUpdate,
    MeshDelta,
    MeshHealth,
    MeshInvite,
    MeshJoin,
    MeshKeyRotation,
    MeshPeer,
    MeshResyncRequest,
    MeshRotateKey,
    MeshSnapshot,
)
from tests.fixtures.controller import AgentFactory
from tests.fixtures.meshlab import Lab, mesh_lab, ping
from tests.fixtures.wait import wait_for

__all__ = ["mesh_lab"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    mesh_lab.add_public("a", 1)
    mesh_lab.add_public("b", 2)
    return mesh_lab


async def test_agent_joins_applies_snapshots_and_deltas_and_rotates(
        controller: RunningController, agents: AgentFactory, lab: Lab) -> None:
    subjects = controller.subjects
    got: list[Any] = []

    async def collect(msg: Msg) -> None:
        got.append((msg.subject, codec.decode(msg.data)))

    for subject in (subjects.mesh_join_any, subjects.mesh_resync_any, subjects.mesh_key_any,
                    subjects.mesh_health_any, subjects.facts_any):
        await controller.nc.subscribe(subject, cb=collect)
    started: dict[str, Agent] = {}
    for name in ("a", "b"):
        node = lab.nodes[name]
        started[name] = await agents.start(
            labels={"site": name}, mesh_enabled=True, mesh_netns=node.ns,
            mesh_public_address=node.underlay, mesh_ifname_prefix=lab.ifname_prefix(node),
            mesh_health_interval=1.0 if name == "a" else 3600)
        # In no network of the real controller: no overlay until invited (the test plays
        # the controller's part, as below).
        assert started[name].mesh is None
        await controller.nc.publish(subjects.mesh_snapshot(started[name].node_id),
                                    codec.encode(MeshInvite(networks=["ov"])))
    joins = await wait_for(lambda: {m.node_id: m for _, m in got if isinstance(m, MeshJoin)}
                           if sum(isinstance(m, MeshJoin) for _, m in got) >= 2 else None,
                           10, "two MeshJoins")
    assert joins is not None
    entries: dict[str, MeshPeer] = {}
    for name, agent in started.items():
        join = joins[agent.node_id]
        assert agent.mesh is not None and join.public_key == agent.mesh.public_key
        # the node record names the key (recorded when the node joined, kept since)
        await wait_for(lambda a=agent, j=join: controller.fleet.get(a.node_id).wg_public_key
                       == j.public_key, 5, "the key in the node record")
        assert [e.host for e in join.endpoints] == [lab.nodes[name].underlay]
        entries[name] = MeshPeer(node_id=agent.node_id, public_key=join.public_key,
                                 address=lab.nodes[name].overlay, endpoints=join.endpoints)

    def snapshot(name: str, generation: int) -> MeshSnapshot:
        return MeshSnapshot(network="ov", generation=generation, own=entries[name],
                            cidr="198.19.0.0/16",
                            peers=[p for n, p in entries.items() if n != name], epoch="e1")

    a, b = started["a"], started["b"]
    for name, agent in started.items():
        await controller.nc.publish(subjects.mesh_snapshot(agent.node_id),
                                    codec.encode(snapshot(name, 3)))
    # (ping picks its source address when it starts: wait until the interface is set up)
    await wait_for(lambda: all(x.mesh and x.mesh.plan("ov") for x in (a, b)), 10,
                   "both nodes applied their snapshot")
    # The first handshake can miss the peer's config by a moment (WireGuard alone retries
    # only after 5 s; netmesh pokes a new peer and re-adds a silent one after 1 s, see
    # test_netmesh.py's first-ping test): wait for the tunnel, then count a steady stream.

    async def tunnel_up() -> bool:
        return (await ping(lab.nodes["a"].ns, lab.nodes["b"].overlay, count=1,
                           deadline=2))[1] == 1

    await wait_for(tunnel_up, 15, "the tunnel from a to b")
    sent, received, out = await ping(lab.nodes["a"].ns, lab.nodes["b"].overlay, count=3)
    assert sent == received == 3, out
    assert a.mesh is not None and b.mesh is not None
    # A late invitation (a retry, a second controller) once the overlay runs: ignored, not
    # refused as a bad snapshot, and the view stays.
    rejected = a.mesh.stats.rejected
    await controller.nc.publish(subjects.mesh_snapshot(a.node_id),
                                codec.encode(MeshInvite(networks=["ov"])))
    await wait_for(lambda: a.mesh is not None and a.mesh.stats.invites == 1, 5,
                   "the late invitation ignored")
    assert a.mesh.stats.rejected == rejected and a.mesh.views["ov"].generation == 3
    # A delta on the network subject (as the controller's JetStream publish delivers it),
    # then garbage and a gap.
    entries["b"] = msgspec.structs.replace(entries["b"], allowed_ips=["10.88.0.0/24"])
    delta = MeshDelta(network="ov", generation=4, from_generation=3, changed=[entries["b"]],
                      epoch="e1")
    await controller.nc.publish(subjects.mesh_delta("ov"), codec.encode(delta))
    await wait_for(lambda: a.mesh is not None and a.mesh.views["ov"].generation == 4, 5,
                   "delta applied")
    state = await a.mesh.backend.get(a.mesh.ifname("ov"))
    assert "10.88.0.0/24" in state.peers[key_bytes(entries["b"].public_key)].allowed_ips
    await controller.nc.publish(subjects.mesh_delta("ov"), b"\xc1not msgpack")
    gap = MeshDelta(network="ov", generation=9, from_generation=8, epoch="e1")
    await controller.nc.publish(subjects.mesh_delta("ov"), codec.encode(gap))
    await wait_for(lambda: a.mesh is not None and a.mesh.stats.rejected >= 1
                   and a.mesh.stats.gaps >= 1, 5, "garbage rejected, gap seen")
    await wait_for(lambda: any(isinstance(m, MeshResyncRequest) and m.reason == "gap"
                               and m.node_id == a.node_id for _, m in got), 5, "resync asked")
    assert a.mesh.views["ov"].generation == 4
    # Health on a's own subject: b's handshake age, counters and probe RTT over the overlay.

    def b_seen_by_a() -> Any:
        for subject, m in got:
            if isinstance(m, MeshHealth) and subject == subjects.mesh_health(a.node_id):
                seen = {p.node_id: p for p in m.peers}.get(b.node_id)
                if seen is not None and seen.received > 0:
                    return seen
        return None

    seen = await wait_for(b_seen_by_a, 10, "a's health report about b")
    assert seen.rtt_ms > 0 and 0 <= seen.handshake_age < 60 and seen.rx_bytes > 0
    assert seen.loss < 1.0 and not seen.relayed
    # Rotation, asked by the controller: the node announces a new key on its key subject.
    await controller.nc.publish(subjects.mesh_rotate(b.node_id),
                                codec.encode(MeshRotateKey(reason="test")))
    announce = await wait_for(lambda: next((m for s, m in got if isinstance(m, MeshKeyRotation)
                                            and s == subjects.mesh_key(b.node_id)), None),
                              5, "rotation announced")
    assert announce is not None
    assert announce.phase == "announce" and announce.public_key == entries["b"].public_key
    assert announce.next_public_key == b.mesh.keys.next_public
    # Garbage on the node's own rotate subject is counted, not acted on.
    await controller.nc.publish(subjects.mesh_rotate(b.node_id), b"junk")
    await wait_for(lambda: b.mesh is not None and b.mesh.stats.rejected >= 1, 5,
                   "rotate garbage rejected")
    # a's underlay changes while it runs (a new public address): a FactsUpdate says so, and
    # its next MeshJoin carries the new endpoint.
    moved = "198.18.250.1"
    a.config.mesh_public_address = moved
    assert await a.refresh_underlay()
    update = await wait_for(lambda: next((m for _, m in got if isinstance(m, FactsUpdate)
                                          and m.node_id == a.node_id), None),
                            5, "a's FactsUpdate")
    assert update is not None and update.facts["public_ip"] == moved
    assert a.mesh_link is not None
    await a.mesh_link.announce("test")
    await wait_for(lambda: any(isinstance(m, MeshJoin) and m.node_id == a.node_id
                               and [e.host for e in m.endpoints] == [moved] for _, m in got),
                   5, "a's MeshJoin with its new endpoint")
