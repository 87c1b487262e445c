"""The mesh control side against a real nats-server: simulated members (raw NATS clients
with their nodes' own credentials) join, get snapshots and deltas, resync after a gap, are
removed within seconds, rotate keys in two phases; bad input is counted; the API and CLI."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.runtime import Agent
from controller.mesh.errors import AddressesExhausted
from controller.mesh.ipam import Ipam, Lease
from controller.mesh.networks import NetworkRecord, NetworkSpec
from controller.models import NodeRecord
from controller.nats.server import NatsServer
from controller.service import Controller, RunningController
from controller.state.streams import IPAM_BUCKET, open_bucket
from controller.state.table import Table
from protocol import codec
from protocol.mesh import public_endpoint
from protocol.messages import (
    FactsUpdate,
    MeshDelta,
    MeshEndpoint,
    MeshHealth,
    MeshInvite,
    MeshJoin,
    MeshKeyRotation,
    MeshPeerHealth,
    MeshResyncRequest,
    MeshRotateKey,
    MeshSnapshot,
    MetricBatch,
)
from tests.fixtures.controller import AgentFactory, controller_config, run_cli, wait_for
from tests.fixtures.enroll import node_opts
from tests.fixtures.influx import InfluxDB1
from tests.fixtures.nats import confirm

CIDR = "198.19.0.0/16"


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class SimNode:
    """A member as the controller sees it: its node's own NATS identity, a WireGuard public
    key, endpoints; it records the snapshots and deltas it receives."""

    def __init__(self, agent: Agent, nc: NATS, *, public: str = "", private: str = "",
                 vpc: str = "", region: str = "") -> None:
        assert agent.state is not None
        self.agent = agent
        self.node_id = agent.state.node_id
        self.nc = nc
        self.key = wg_key()
        self.endpoints = []
        if private:
            self.endpoints.append(MeshEndpoint(host=private, kind="private", network=vpc,
                                               region=region))
        if public:
            self.endpoints.append(MeshEndpoint(host=public, kind="public", region=region))
        self.region = region
        self.snapshots: list[MeshSnapshot] = []
        self.invites: list[MeshInvite] = []
        self.deltas: list[MeshDelta] = []
        self.rotate_asks: list[MeshRotateKey] = []
        self.raw: list[Msg] = []  # snapshots and deltas as they came
        self.delta_bytes = 0

    async def listen(self, network: str) -> None:
        s = self.agent.subjects

        async def on_snapshot(msg: Msg) -> None:
            self.raw.append(msg)
            # The node's snapshot subject also carries the invitations of a member that
            # has not joined yet.
            got = codec.decode(msg.data)
            if isinstance(got, MeshInvite):
                self.invites.append(got)
            else:
                self.snapshots.append(cast(MeshSnapshot, got))

        async def on_delta(msg: Msg) -> None:
            self.raw.append(msg)
            self.delta_bytes += len(msg.data)
            self.deltas.append(codec.decode(msg.data, MeshDelta))

        async def on_rotate(msg: Msg) -> None:
            self.rotate_asks.append(codec.decode(msg.data, MeshRotateKey))

        await self.nc.subscribe(s.mesh_snapshot(self.node_id), cb=on_snapshot)
        await self.nc.subscribe(s.mesh_delta(network), cb=on_delta)
        await self.nc.subscribe(s.mesh_rotate(self.node_id), cb=on_rotate)
        # In place before the controller sends (an invitation, another member's delta).
        await confirm(self.nc)

    async def join(self, accepts: list[str] | None = None) -> None:
        await self.nc.publish(self.agent.subjects.mesh_join(self.node_id), codec.encode(
            MeshJoin(node_id=self.node_id, public_key=self.key, endpoints=self.endpoints,
                     region=self.region, accepts=accepts or [])))
        await self.nc.flush()

    async def send(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)
        await self.nc.flush()

    def view(self) -> tuple[int, dict[str, str]]:
        """(generation, node id -> key) from the last snapshot plus the deltas after it,
        applied as an agent does (a delta only on top of its base)."""
        if not self.snapshots:
            return 0, {}
        snap = self.snapshots[-1]
        gen = snap.generation
        peers = {p.node_id: p.public_key for p in snap.peers}
        for d in self.deltas:
            if d.from_generation != gen:
                continue
            for p in d.added + d.changed:
                if p.node_id != self.node_id:
                    peers[p.node_id] = p.public_key
            for nid in d.removed:
                peers.pop(nid, None)
            gen = d.generation
        return gen, peers


@pytest.fixture
async def sims(agents: AgentFactory) -> AsyncIterator[list[NATS]]:
    conns: list[NATS] = []
    yield conns
    for nc in conns:
        await nc.close()


async def sim(agents: AgentFactory, conns: list[NATS], labels: dict[str, str],
              **kw: str) -> SimNode:
    agent = await agents.start(labels=labels)
    nc = await nats.connect(agents.controller.agent_nats_url, **node_opts(agent))
    conns.append(nc)
    return SimNode(agent, nc, **kw)


async def make_net(c: RunningController, name: str = "corp", **kw: object) -> None:
    spec = NetworkSpec(name=name, cidr=CIDR, selector="mesh=on", **kw)  # type: ignore[arg-type]
    await c.mesh.networks.create(spec)


async def test_snapshot_compressed_only_for_who_reads_it_and_deltas_plain(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    """A node that says it reads zlib gets its snapshot compressed (the same snapshot as a
    node that does not say so gets plain); members get each delta as a plain message (no
    JetStream reply inbox, no headers), and the stream MESH keeps it all the same."""
    await make_net(controller)
    fleet = [await sim(agents, sims, {"mesh": "on", "region": "eu"}, private=f"10.1.0.{i}",
                       vpc="vpc-eu", region="eu", public=f"198.18.1.{i}") for i in range(1, 9)]
    for n in fleet:
        await n.listen("corp")
        await n.join()
    await wait_for(lambda: all(len(n.view()[1]) == 7 for n in fleet), 10, "eight members")
    old, new = fleet[0], fleet[1]
    for n in (old, new):
        n.raw.clear()
        n.snapshots.clear()
    await old.join()
    await new.join(accepts=[codec.ZLIB])
    await wait_for(lambda: old.snapshots and new.snapshots, 5, "both snapshots")
    plain, packed = old.raw[-1].data, new.raw[-1].data
    assert plain[0] & 0xF0 == 0x80  # a MessagePack map, as before
    assert packed[0] in (0xC7, 0xC8, 0xC9) and len(packed) < len(plain) * 0.6
    assert len(old.snapshots[-1].peers) == len(new.snapshots[-1].peers) == 7
    assert {p.public_key for p in old.snapshots[-1].peers} >= {new.key}
    state = controller.mesh.distributor.state("corp")
    assert state is not None and state.peers[new.node_id].public_key == new.key

    # One more member: every member gets one plain delta; the stream has it too.
    await controller.mesh.distributor.settled()
    for n in fleet:
        n.raw.clear()
    last = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.99")
    await last.listen("corp")
    await last.join(accepts=[codec.ZLIB])
    await wait_for(lambda: all(last.node_id in n.view()[1] for n in fleet), 5, "the ninth")
    deltas = [m for n in fleet for m in n.raw if m.subject.endswith(".delta")]
    assert len(deltas) == len(fleet)
    assert all(not m.reply and not m.headers for m in deltas)
    stored = await controller.js.get_last_msg("MESH", controller.subjects.mesh_delta("corp"))
    assert stored.data == deltas[0].data
    assert controller.mesh.distributor.stats["store_misses"] == 0


async def test_delta_not_kept_by_the_stream_is_sent_again_once_it_is_back(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    """The stream MESH gone: the delta still reaches the members at once (plain message),
    the controller counts that the stream did not keep it and sends it again until it
    does; members take the repeat as stale, their generations stay unbroken."""
    dist = controller.mesh.distributor
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    await a.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5, "a's snapshot")
    await dist.settled()
    config = (await controller.js.stream_info("MESH")).config
    await controller.js.delete_stream("MESH")
    b = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.2")
    await b.listen("corp")
    await b.join()
    await wait_for(lambda: b.node_id in a.view()[1], 5, "a sees b, stream or not")
    await wait_for(lambda: dist.stats["store_misses"] >= 1, 10, "a store miss counted")
    assert not b.snapshots  # its snapshot waits for the round to succeed
    await controller.js.add_stream(config)
    await wait_for(lambda: b.snapshots, 20, "b's snapshot once the stream is back")
    await dist.settled()
    state = dist.state("corp")
    assert state is not None
    last = await controller.js.get_last_msg("MESH", controller.subjects.mesh_delta("corp"))
    assert last.data is not None
    kept = codec.decode(last.data, MeshDelta)
    assert kept.generation == state.generation and b.node_id in {p.node_id for p in kept.added}
    assert a.view() == (state.generation, {b.node_id: b.key})
    gens = [d.generation for d in a.deltas]
    assert gens == sorted(gens) and len(set(gens)) < len(gens)  # the repeat, and in order


async def test_join_snapshot_deltas_gap_resync_and_removal(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on", "region": "eu"}, public="198.18.1.10",
                  private="10.1.0.10", vpc="vpc-eu", region="eu")
    b = await sim(agents, sims, {"mesh": "on", "region": "us"}, private="10.2.0.10",
                  vpc="vpc-us", region="us")
    c = await sim(agents, sims, {"mesh": "on"}, private="10.3.0.10", vpc="site", region="dc")
    outsider = await sim(agents, sims, {"mesh": "off"}, public="198.18.9.9")
    for n in (a, b, c, outsider):
        await n.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5, "a's snapshot")
    snap = a.snapshots[-1]
    assert snap.own.node_id == a.node_id and snap.peers == []
    assert ipaddress.ip_address(snap.own.address) in ipaddress.ip_network(CIDR)
    assert (snap.cidr, snap.mtu, snap.port) == (CIDR, 1420, 51820)

    await b.join()
    await c.join()
    await wait_for(lambda: b.snapshots and c.snapshots, 5, "b's and c's snapshots")
    await wait_for(lambda: set(a.view()[1]) == {b.node_id, c.node_id}, 5, "a sees b, c")
    # Deltas carry full entries, one per changed member, in unbroken generations.
    gens = [(d.from_generation, d.generation) for d in a.deltas]
    assert all(x[1] == y[0] for x, y in itertools.pairwise(gens)), gens
    added = {p.node_id: p for d in a.deltas for p in d.added}
    assert added[b.node_id].public_key == b.key
    # b and c are both private in different networks: each names a as its relay.
    assert added[b.node_id].relay == a.node_id and added[c.node_id].relay == a.node_id
    # Addresses are distinct and inside the network.
    state = controller.mesh.distributor.state("corp")
    assert state is not None
    addrs = [p.address for p in state.peers.values()]
    assert len(set(addrs)) == 3
    # The node outside the selector got nothing, and joining does not make it a member.
    await outsider.join()
    await controller.mesh.distributor.settled()
    assert outsider.snapshots == [] and outsider.node_id not in state.peers

    # A gap: c asks for a resync and gets the current generation.
    gen_before = controller.mesh.distributor.state("corp").generation  # type: ignore[union-attr]
    await c.send(c.agent.subjects.mesh_resync(c.node_id), codec.encode(
        MeshResyncRequest(node_id=c.node_id, network="corp", generation=1, reason="gap")))
    await wait_for(lambda: len(c.snapshots) >= 2, 5, "c's resync snapshot")
    assert c.snapshots[-1].generation == gen_before
    assert {p.node_id for p in c.snapshots[-1].peers} == {a.node_id, b.node_id}

    # Removal: deleting b takes it out of every member within seconds (one delta).
    t0 = time.monotonic()
    await controller.delete_node(b.node_id)
    await wait_for(lambda: b.node_id not in a.view()[1] and b.node_id not in c.view()[1],
                   5, "b removed at a and c")
    assert time.monotonic() - t0 < 5
    last = a.deltas[-1]
    assert last.removed == [b.node_id] and not last.added and not last.changed
    # b's address is released and quarantined, not reused.
    leases = {lease.address: lease for lease in controller.mesh.ipam.leases("corp")}
    b_addr = next(x for x in addrs if x not in {p.address for p in
                                                 controller.mesh.distributor.state(  # type: ignore[union-attr]
                                                     "corp").peers.values()})
    assert leases[b_addr].state == "released"


async def test_a_new_public_address_reaches_every_member_and_new_joiners(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.10", private="10.1.0.10",
                  vpc="vpc-a", region="eu")
    b = await sim(agents, sims, {"mesh": "on"}, public="198.18.2.10")
    for n in (a, b):
        await n.listen("corp")
    await a.join()
    await b.join()
    await wait_for(lambda: set(b.view()[1]) == {a.node_id}, 5, "b sees a")

    def public_of_a_at_b() -> str:
        for d in reversed(b.deltas):
            for p in d.added + d.changed:
                if p.node_id == a.node_id:
                    ep = public_endpoint(p.endpoints)
                    return ep.host if ep else ""
        return ""

    assert public_of_a_at_b() == "198.18.1.10"
    # a's VM was stopped and started: another public address. Its agent says so.
    await a.send(a.agent.subjects.facts(a.node_id), codec.encode(FactsUpdate(
        node_id=a.node_id, facts={"public_ip": "198.18.7.7", "private_ip": "10.1.0.10",
                                  "os": "Linux"})))
    await wait_for(lambda: public_of_a_at_b() == "198.18.7.7", 5, "a's new endpoint at b")
    changed = b.deltas[-1]
    assert [p.node_id for p in changed.changed] == [a.node_id]
    assert not changed.added and not changed.removed
    # Only the address moved: the private endpoint and the regions are as a joined.
    entry = changed.changed[0]
    assert [(ep.kind, ep.host, ep.network) for ep in entry.endpoints] == [
        ("private", "10.1.0.10", "vpc-a"), ("public", "198.18.7.7", "")]
    assert entry.region == "eu" and entry.public_key == a.key
    node = controller.nodes.get(a.node_id)
    assert node is not None and node.facts["public_ip"] == "198.18.7.7"
    assert controller.mesh.distributor.stats["underlay_changes"] == 1
    # A member joining later gets the new endpoint in its snapshot.
    c = await sim(agents, sims, {"mesh": "on"}, public="198.18.3.10")
    await c.listen("corp")
    await c.join()
    await wait_for(lambda: c.snapshots, 5, "c's snapshot")
    peer_a = next(p for p in c.snapshots[-1].peers if p.node_id == a.node_id)
    assert public_endpoint(peer_a.endpoints).host == "198.18.7.7"  # type: ignore[union-attr]
    # The same facts again: no delta, nothing written.
    gen = controller.mesh.distributor.state("corp").generation  # type: ignore[union-attr]
    await a.send(a.agent.subjects.facts(a.node_id), codec.encode(FactsUpdate(
        node_id=a.node_id, facts={"public_ip": "198.18.7.7", "private_ip": "10.1.0.10",
                                  "os": "Linux"})))
    # Behind NAT now: the public endpoint goes (a's second update is handled before it).
    await a.send(a.agent.subjects.facts(a.node_id), codec.encode(FactsUpdate(
        node_id=a.node_id, facts={"public_ip": "", "private_ip": "10.1.0.10"})))
    await wait_for(lambda: public_of_a_at_b() == "" and b.deltas[-1].changed, 5,
                   "a without a public endpoint at b")
    assert controller.mesh.distributor.state("corp").generation == gen + 1  # type: ignore[union-attr]
    assert controller.mesh.distributor.stats["underlay_changes"] == 2


async def test_members_that_have_not_joined_are_invited_until_they_join(
    controller: RunningController, agents: AgentFactory, sims: list[NATS]
) -> None:
    """A member without a MeshJoin (its agent runs no overlay yet) is sent a MeshInvite on
    its own snapshot subject, again with backoff, and no more once it joined; a node
    outside the network is sent none."""
    controller.mesh.distributor.invites.first_retry = 0.3
    member = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    outsider = await sim(agents, sims, {"mesh": "off"}, public="198.18.1.2")
    for n in (member, outsider):
        await n.listen("corp")
    await make_net(controller)
    await wait_for(lambda: len(member.invites) >= 2, 10, "an invitation, then another")
    assert member.invites[0].networks == ["corp"] and not member.snapshots
    await member.join()
    await wait_for(lambda: member.snapshots, 5, "the snapshot after the join")
    await controller.mesh.distributor.settled()
    invited = len(member.invites)
    await asyncio.sleep(1.5)  # > first_retry * 4: retries would have come by now
    assert len(member.invites) == invited and not outsider.invites
    assert controller.mesh.status()["invites"] == controller.mesh.distributor.invites.stats


async def test_enroll_reply_says_whether_the_node_is_in_a_network(
    controller: RunningController, agents: AgentFactory
) -> None:
    await make_net(controller)
    inside = await agents.start(labels={"mesh": "on"})
    outside = await agents.start(labels={"mesh": "off"})
    assert inside.state is not None and outside.state is not None
    assert inside.state.mesh and not outside.state.mesh
    assert inside.state.mesh_invites and outside.state.mesh_invites


async def test_burst_is_coalesced_into_one_delta(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    first = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    await first.listen("corp")
    await first.join()
    await wait_for(lambda: first.snapshots, 5, "first snapshot")
    others = [await sim(agents, sims, {"mesh": "on"}, public=f"198.18.1.{i}")
              for i in range(2, 6)]
    n_before = len(first.deltas)
    # A burst within two seconds: four concurrent joins (each an IPAM compare-and-set and a
    # KV write) landed over more than half a second in a loaded full-suite run.
    controller.mesh.distributor.window = 2.0
    await asyncio.gather(*(o.join() for o in others))
    await wait_for(lambda: len(first.view()[1]) == 4, 5, "four joined")
    new = first.deltas[n_before:]
    assert len(new) == 1, [(len(d.added), d.generation) for d in new]
    assert len(new[0].added) == 4


async def test_two_phase_key_rotation(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    b = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.2")
    for n in (a, b):
        await n.listen("corp")
        await n.join()
    await wait_for(lambda: b.node_id in a.view()[1], 5, "a sees b")
    # The controller asks b to rotate (API/CLI path); b announces a new key.
    await controller.mesh.distributor.rotate(b.node_id, reason="test")
    await wait_for(lambda: b.rotate_asks, 5, "rotate ask")
    new_key, old_key = wg_key(), b.key
    s = b.agent.subjects
    await b.send(s.mesh_key(b.node_id), codec.encode(MeshKeyRotation(
        node_id=b.node_id, phase="announce", public_key=old_key, next_public_key=new_key)))

    def entry_at_a() -> tuple[str, str] | None:
        for d in reversed(a.deltas):
            for p in d.changed + d.added:
                if p.node_id == b.node_id:
                    return p.public_key, p.next_public_key
        return None

    await wait_for(lambda: entry_at_a() == (old_key, new_key), 5, "announce delta")
    # a says its WireGuard has b's next key; when every peer of b did (a is the only one),
    # the controller tells b to switch. A word about another key is stale, ignored.
    acks = controller.mesh.distributor.rotation.stats
    for key in (wg_key(), new_key):
        await a.send(a.agent.subjects.mesh_key(a.node_id), codec.encode(MeshKeyRotation(
            node_id=a.node_id, phase="ready", public_key=old_key, next_public_key=key,
            peer=b.node_id)))
    word = await wait_for(lambda: next((r for r in b.rotate_asks if r.ready_key), None), 5,
                          "the switch word to b")
    assert word is not None and word.ready_key == new_key
    assert acks["ready"] == 1 and acks["ready_stale"] == 1 and acks["released"] == 1
    await b.send(s.mesh_key(b.node_id), codec.encode(MeshKeyRotation(
        node_id=b.node_id, phase="switched", public_key=old_key, next_public_key=new_key)))
    await wait_for(lambda: entry_at_a() == (new_key, ""), 5, "switched delta")
    assert a.view()[1][b.node_id] == new_key
    # A replayed announce for the old key is stale: refused and counted.
    before = controller.stats.rejected["mesh_key"]
    await b.send(s.mesh_key(b.node_id), codec.encode(MeshKeyRotation(
        node_id=b.node_id, phase="announce", public_key=old_key, next_public_key=wg_key())))
    await wait_for(lambda: controller.stats.rejected["mesh_key"] == before + 1, 5)


async def test_bad_input_is_refused_and_counted(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    await a.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5)
    s, nid = a.agent.subjects, a.node_id
    rejected = controller.stats.rejected
    base = dict(rejected)
    bad = [
        (s.mesh_join(nid), b"\xc1garbage"),
        (s.mesh_join(nid), codec.encode(MeshJoin(node_id=nid, public_key="not-a-key"))),
        (s.mesh_join(nid), codec.encode(MeshJoin(node_id=nid, public_key=wg_key(),
                                                 endpoints=[MeshEndpoint(host="nope")]))),
        (s.mesh_join(nid), codec.encode(MeshJoin(node_id="someone-else", public_key=wg_key()))),
        (s.mesh_resync(nid), codec.encode(MeshResyncRequest(node_id=nid, network="nosuch"))),
        (s.mesh_resync(nid), codec.encode(MeshResyncRequest(node_id=nid, network="a.b"))),
        (s.mesh_health(nid), codec.encode(MeshHealth(node_id=nid, network="nosuch", ts=1.0))),
        (s.mesh_health(nid), codec.encode(MeshHealth(node_id=nid, network="corp", ts=1.0,
                                                     generation=10**6))),
        (s.mesh_key(nid), codec.encode(MeshKeyRotation(
            node_id=nid, phase="switched", public_key=a.key, next_public_key=wg_key()))),
    ]
    for subject, data in bad:
        await a.send(subject, data)

    def counted() -> bool:
        return (rejected["mesh_join"] - base.get("mesh_join", 0) >= 4
                and rejected["mesh_resync"] - base.get("mesh_resync", 0) >= 2
                and rejected["mesh_health"] - base.get("mesh_health", 0) >= 2
                and rejected["mesh_key"] - base.get("mesh_key", 0) >= 1)

    await wait_for(counted, 5, "every bad message counted")
    # Nothing reached the published state: a's entry is as it joined.
    state = controller.mesh.distributor.state("corp")
    assert state is not None and state.peers[nid].public_key == a.key
    status = controller.status()
    assert status["rejected"]["mesh_join"] >= 4  # type: ignore[index]


async def test_address_survives_restart_and_overlap_refused(
    tmp_path: Path, agents: AgentFactory, sims: list[NATS], controller: RunningController,
) -> None:
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1", private="10.7.0.5",
                  vpc="vpc-a")
    await a.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5)
    address = a.snapshots[-1].own.address
    # The agent restarts: it joins again and keeps its address and the generation.
    gen = a.snapshots[-1].generation
    await a.join()
    await wait_for(lambda: len(a.snapshots) >= 2, 5)
    assert a.snapshots[-1].own.address == address and a.snapshots[-1].generation == gen
    # A network overlapping corp, or a's private address, is refused naming both.
    from controller.mesh.errors import CidrOverlap

    with pytest.raises(CidrOverlap, match="network corp"):
        await controller.mesh.networks.create(NetworkSpec(name="other", cidr="198.19.4.0/24"))
    with pytest.raises(CidrOverlap, match=f"node {a.node_id}"):
        await controller.mesh.networks.create(NetworkSpec(name="other", cidr="10.7.0.0/16"))


async def test_controller_restart_keeps_addresses_and_generation(tmp_path: Path) -> None:
    cfg = controller_config(tmp_path / "c")
    async with Controller(cfg) as c:
        factory = AgentFactory(c, tmp_path / "agents")
        conns: list[NATS] = []
        async with factory.stack:
            await make_net(c)
            nodes = [await sim(factory, conns, {"mesh": "on"}, public=f"198.18.1.{i}")
                     for i in (1, 2)]
            for n in nodes:
                await n.listen("corp")
                await n.join()
            await wait_for(lambda: all(n.snapshots and len(n.view()[1]) == 1 for n in nodes),
                           5)
            await c.mesh.distributor.settled()
            before = c.mesh.distributor.state("corp")
            assert before is not None
            for nc in conns:
                await nc.close()
    async with Controller(cfg) as c2:
        await asyncio.wait_for(c2.mesh.distributor.settled(), 5)
        after = c2.mesh.distributor.state("corp")
        assert after is not None
        # Nothing changed: no new generation, the same addresses.
        assert after.generation == before.generation
        assert {k: p.address for k, p in after.peers.items()} == \
            {k: p.address for k, p in before.peers.items()}


async def test_matrix_api_cli_and_metrics(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
    api: tuple[str, str], http: aiohttp.ClientSession,
) -> None:
    url, token = api
    auth = {"Authorization": f"Bearer {token}"}
    code, out, err = await run_cli("net", "create", "corp", "--cidr", CIDR, "-l", "mesh=on",
                                   "-o", "json", url=url, token=token)
    assert code == 0, err
    assert json.loads(out)["cidr"] == CIDR
    code, out, err = await run_cli("net", "create", "dup", "--cidr", "198.19.128.0/17",
                                   url=url, token=token)
    assert code != 0 and "overlaps network corp" in err
    eu = await sim(agents, sims, {"mesh": "on", "region": "eu"}, public="198.18.1.1",
                   region="eu")
    us1 = await sim(agents, sims, {"mesh": "on", "region": "us"}, public="198.18.2.1",
                    region="us")
    us2 = await sim(agents, sims, {"mesh": "on", "region": "us"}, public="198.18.2.2",
                    region="us")
    members = (eu, us1, us2)
    for n in members:
        await n.listen("corp")
        await n.join()
    await wait_for(lambda: all(n.snapshots and len(n.view()[1]) == 2 for n in members), 5)
    gen = controller.mesh.distributor.state("corp").generation  # type: ignore[union-attr]
    rtt = {("eu", "us"): 80.0, ("us", "eu"): 80.0, ("us", "us"): 2.0}
    for n in members:
        peers = [MeshPeerHealth(node_id=p.node_id, handshake_age=4.0, rx_bytes=100,
                                tx_bytes=200, rtt_ms=rtt[(n.region, p.region)] + 1.0,
                                loss=0.0, sent=10, received=10)
                 for p in members if p is not n]
        await n.send(n.agent.subjects.mesh_health(n.node_id), codec.encode(MeshHealth(
            node_id=n.node_id, network="corp", ts=time.time(), generation=gen, peers=peers,
            window=10.0)))
    await wait_for(lambda: controller.mesh.matrix.view("corp")["reported_pairs"] == 6, 5)
    async with http.get(f"{url}/v1/networks/corp/matrix", headers=auth) as r:
        assert r.status == 200
        body = await r.json()
    assert body["expected_pairs"] == 6 and len(body["pairs"]) == 6
    async with http.get(f"{url}/v1/networks/corp/matrix?by=region", headers=auth) as r:
        regions = {(x["src_region"], x["dst_region"]): x for x in (await r.json())["regions"]}
    assert regions[("eu", "us")]["rtt_ms"] == 81.0 and regions[("eu", "us")]["pairs"] == 2
    assert regions[("us", "us")]["rtt_ms"] == 3.0
    code, out, err = await run_cli("net", "matrix", "corp", "--by", "region", "-o", "json",
                                   url=url, token=token)
    assert code == 0, err
    assert {(x["src_region"], x["dst_region"]) for x in json.loads(out)["regions"]} == \
        {("eu", "us"), ("us", "eu"), ("us", "us")}
    code, out, err = await run_cli("net", "show", "corp", "-o", "json", url=url, token=token)
    assert code == 0, err
    shown = json.loads(out)
    assert {m["node_id"] for m in shown["member_list"]} == {n.node_id for n in members}
    assert len({a["address"] for a in shown["addresses"]}) == 3
    code, out, err = await run_cli("net", "members", "corp", "-o", "json", url=url,
                                   token=token)
    assert code == 0, err
    assert len(json.loads(out)["members"]) == 3
    code, out, err = await run_cli("net", "addresses", "corp", url=url, token=token)
    assert code == 0, err
    assert all(n.node_id in out for n in members)
    code, out, _ = await run_cli("net", "ls", "-o", "json", url=url, token=token)
    assert [n["name"] for n in json.loads(out)["networks"]] == ["corp"]

    # The matrix goes into METRICS as one batch (ingest writes it to InfluxDB).
    js = controller.js
    sub = await js.subscribe(controller.subjects.metrics("_mesh_corp"), ordered_consumer=True)
    assert await controller.mesh.matrix.publish("corp") == 6 + 3
    msg = await sub.next_msg(timeout=5)
    batch = codec.decode(msg.data, MetricBatch)
    lat = [p for p in batch.points if p.measurement == "mesh_latency"]
    assert len(lat) == 6 and all({"src", "dst", "src_region", "dst_region"} <= set(p.tags)
                                 for p in lat)
    assert batch.tags["network"] == "corp"
    await sub.unsubscribe()

    # A viewer may read but not write.
    vt = await controller.api_tokens.create(name="v", role="viewer")
    vauth = {"Authorization": f"Bearer {vt.secret}"}
    async with http.get(f"{url}/v1/networks", headers=vauth) as r:
        assert r.status == 200
    async with http.delete(f"{url}/v1/networks/corp", headers=vauth) as r:
        assert r.status == 403
    # A token scoped to region=us sees only the pairs between its nodes.
    st = await controller.api_tokens.create(name="us", role="viewer", scope="region=us")
    async with http.get(f"{url}/v1/networks/corp/matrix",
                        headers={"Authorization": f"Bearer {st.secret}"}) as r:
        scoped = await r.json()
    assert {(p["src"], p["dst"]) for p in scoped["pairs"]} == \
        {(us1.node_id, us2.node_id), (us2.node_id, us1.node_id)}
    # Removing the network takes every member out in one last delta.
    code, _, err = await run_cli("net", "rm", "corp", "-y", url=url, token=token)
    assert code == 0, err
    await wait_for(lambda: all(n.view()[1] == {} and n.deltas[-1].removed for n in members),
                   5, "network gone at every member")


# -- IPAM: two controllers on one KV --------------------------------------------------


async def _ipam_on(url: str, **kw: object) -> tuple[NATS, Table[Lease], Ipam]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    table: Table[Lease] = Table(await open_bucket(js, IPAM_BUCKET), Lease, name="ipam")
    await table.start()
    return nc, table, Ipam(table, **kw)  # type: ignore[arg-type]


async def test_ipam_never_gives_one_address_to_two_nodes_with_two_controllers(
    nats_server_noauth: NatsServer,
) -> None:
    """Two IPAMs (as in two controllers) on one KV bucket race: 60 nodes each, 30 of them
    the same nodes at the same moment, in a /26 (62 addresses): every node ends with one
    address, no address has two nodes, and the 63rd node finds the network full."""
    now = [1000.0]
    net = NetworkRecord(name="race", cidr="198.19.0.0/26")
    a_nc, a_table, a = await _ipam_on(nats_server_noauth.url, clock=lambda: now[0],
                                      quarantine=60.0)
    b_nc, b_table, b = await _ipam_on(nats_server_noauth.url, clock=lambda: now[0],
                                      quarantine=60.0)
    try:
        shared = [f"n{i}" for i in range(30)]
        only_a = [f"a{i}" for i in range(16)]
        only_b = [f"b{i}" for i in range(16)]
        got_a, got_b = await asyncio.gather(
            asyncio.gather(*(a.assign(net, n) for n in shared + only_a)),
            asyncio.gather(*(b.assign(net, n) for n in shared + only_b)))
        by_node_a = dict(zip(shared + only_a, got_a, strict=True))
        by_node_b = dict(zip(shared + only_b, got_b, strict=True))
        # The same node got the same address from both controllers.
        assert all(by_node_a[n] == by_node_b[n] for n in shared)
        everyone = {**by_node_a, **by_node_b}
        assert len(everyone) == 62 and len(set(everyone.values())) == 62
        assert a.stats["conflicts"] + b.stats["conflicts"] > 0  # they did race
        # What the server holds agrees: one holder per address key.
        fresh_nc, fresh_table, fresh = await _ipam_on(nats_server_noauth.url)
        try:
            holders = {lease.address: lease.node_id for lease in fresh.leases("race")}
            assert holders == {addr: node for node, addr in everyone.items()}
        finally:
            await fresh_table.stop()
            await fresh_nc.close()
        with pytest.raises(AddressesExhausted):
            await a.assign(net, "one-too-many")
        # Released: quarantined, so the full network stays full until it is over.
        released = await a.release("race", "n0")
        assert released == everyone["n0"]
        with pytest.raises(AddressesExhausted) as err:
            await b.assign(net, "newcomer")
        assert err.value.details["quarantined"] == 1
        # The node itself is no longer assigned; after the quarantine the address goes.
        now[0] += 61.0
        assert await b.assign(net, "newcomer") == released
        # A node keeps its address across assign calls (an agent restart asks again).
        assert await a.assign(net, "a3") == by_node_a["a3"]
    finally:
        for t in (a_table, b_table):
            await t.stop()
        await a_nc.close()
        await b_nc.close()


async def test_two_controllers_publish_each_generation_once(
    nats_server_noauth: NatsServer, tmp_path: Path,
) -> None:
    """Two controllers on one NATS: both see every change, only one publishes each
    generation (compare-and-set on the published state); members see unbroken deltas."""
    url = nats_server_noauth.url
    async with Controller(controller_config(tmp_path / "c1", nats_url=url)) as c1, \
            Controller(controller_config(tmp_path / "c2", nats_url=url)) as c2:
        factory = AgentFactory(c1, tmp_path / "agents")
        conns: list[NATS] = []
        try:
            async with factory.stack:
                await make_net(c1)
                await wait_for(lambda: c2.mesh.networks.table.get("corp"), 5)
                first = await sim(factory, conns, {"mesh": "on"}, public="198.18.1.1")
                await first.listen("corp")
                await first.join()
                await wait_for(lambda: first.snapshots, 5)
                others = [await sim(factory, conns, {"mesh": "on"}, public=f"198.18.1.{i}")
                          for i in range(2, 7)]
                for o in others:
                    await o.join()
                await wait_for(lambda: len(first.view()[1]) == 5, 10, "five peers")
                gens = [d.generation for d in first.deltas]
                assert len(gens) == len(set(gens)), gens  # no generation published twice
                # Each generation was published by one controller: together they
                # published exactly the deltas the member saw (plus the first, before
                # it listened... it listened first), no more.
                await c1.mesh.distributor.settled()
                await c2.mesh.distributor.settled()
                published = sum(c.mesh.distributor.stats["deltas"] for c in (c1, c2))
                info = await c1.js.stream_info("MESH")
                assert info.state.messages == published
                sub = await c1.js.subscribe(c1.subjects.mesh_delta("corp"),
                                            ordered_consumer=True)
                stored = [codec.decode((await sub.next_msg(timeout=5)).data, MeshDelta)
                          for _ in range(published)]
                await sub.unsubscribe()
                assert [d.generation for d in stored] == list(range(1, published + 1))
                assert all(d.from_generation == d.generation - 1 for d in stored)

                def gen(c: RunningController) -> int:
                    st = c.mesh.distributor.state("corp")
                    return st.generation if st else -1

                # Both controllers' informers agree on the published state.
                await wait_for(lambda: gen(c1) == gen(c2) == published, 5)
        finally:
            for nc in conns:
                await nc.close()


@pytest.mark.influx
async def test_matrix_lands_in_influxdb(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    """The matrix goes the metrics' way: METRICS -> ingest -> a real InfluxDB 1.x, as
    mesh_latency (per pair) and mesh_region_latency (per region pair)."""
    cfg = controller_config(tmp_path / "c", influx_kind="influx1", influx_url=influxdb1.url,
                            influx_db="barista")
    async with Controller(cfg) as c:
        factory = AgentFactory(c, tmp_path / "agents")
        conns: list[NATS] = []
        try:
            async with factory.stack:
                await make_net(c)
                a = await sim(factory, conns, {"mesh": "on"}, public="198.18.1.1", region="eu")
                b = await sim(factory, conns, {"mesh": "on"}, public="198.18.2.1", region="us")
                for n in (a, b):
                    await n.listen("corp")
                    await n.join()
                await wait_for(lambda: all(len(n.view()[1]) == 1 for n in (a, b)), 5)
                for n, other, rtt in ((a, b, 80.5), (b, a, 79.5)):
                    await n.send(n.agent.subjects.mesh_health(n.node_id), codec.encode(
                        MeshHealth(node_id=n.node_id, network="corp", ts=time.time(),
                                   peers=[MeshPeerHealth(node_id=other.node_id, rtt_ms=rtt,
                                                         handshake_age=2.0)])))
                await wait_for(lambda: c.mesh.matrix.view("corp")["reported_pairs"] == 2, 5)
                assert await c.mesh.matrix.publish("corp") == 2 + 2

                async def rows() -> dict[tuple[str, str], float] | None:
                    try:
                        series = await asyncio.to_thread(
                            influxdb1.query, 'SELECT last("rtt_ms") FROM "mesh_latency" '
                            'GROUP BY "src", "dst"', "barista")
                    except RuntimeError:
                        return None
                    return {(s["tags"]["src"], s["tags"]["dst"]): s["values"][0][1]
                            for s in series} or None

                got = await wait_for(cast(Any, rows), 15, "mesh_latency in InfluxDB",
                                     interval=0.2)
                assert got == {(a.node_id, b.node_id): 80.5, (b.node_id, a.node_id): 79.5}
        finally:
            for nc in conns:
                await nc.close()


async def test_leaving_the_selector_or_revocation_removes_the_node(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    await make_net(controller)
    a, b, c = [await sim(agents, sims, {"mesh": "on"}, public=f"198.18.1.{i}")
               for i in (1, 2, 3)]
    for n in (a, b, c):
        await n.listen("corp")
        await n.join()
    await wait_for(lambda: set(a.view()[1]) == {b.node_id, c.node_id}, 5)

    def relabel(rec: NodeRecord) -> NodeRecord:
        return msgspec.structs.replace(rec, labels={**rec.labels, "mesh": "off"})

    await controller.nodes.mutate(b.node_id, relabel)
    await wait_for(lambda: set(a.view()[1]) == {c.node_id}, 5, "b left the selector")
    await controller.revoke_node(c.node_id)
    await wait_for(lambda: a.view()[1] == {}, 5, "c revoked")
    assert a.deltas[-1].removed == [c.node_id]


async def test_a_network_made_after_its_members_joined_sends_each_its_snapshot(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    """Nodes joined (the agent's MeshJoin at start) before any network took them in:
    when one does, each member gets its snapshot unasked, so it builds the network and
    subscribes to its deltas (a delta alone is for those that already have it)."""
    a, b = [await sim(agents, sims, {"mesh": "on"}, public=f"198.18.1.{i}") for i in (1, 2)]
    for n in (a, b):
        await n.listen("late")
        await n.join()
    await asyncio.wait_for(controller.mesh.distributor.settled(), 5)
    assert not a.snapshots and not b.snapshots  # no network yet: nothing to send
    await make_net(controller, "late")
    await wait_for(lambda: a.snapshots and b.snapshots, 5, "both members got a snapshot")
    assert len(a.snapshots) == len(b.snapshots) == 1  # once, not once per delta
    assert a.view()[1] == {b.node_id: b.key} and b.view()[1] == {a.node_id: a.key}
    c = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.3")
    await c.listen("late")
    await c.join()  # a joiner asks: one snapshot for it, the others get the delta only
    await wait_for(lambda: set(a.view()[1]) == {b.node_id, c.node_id}, 5)
    assert len(c.snapshots) == 1 and len(a.snapshots) == len(b.snapshots) == 1


async def test_state_too_large_for_one_message_is_refused_clearly(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A network whose snapshot would not fit one NATS message keeps its last published
    generation and says why (no half-written state, no crash of the loop)."""
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    await a.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5)
    dist = controller.mesh.distributor
    gen = dist.state("corp").generation  # type: ignore[union-attr]
    dist.max_state = 300  # one member fits, two do not
    b = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.2")
    await b.join()
    await wait_for(lambda: "over the 300 bytes one NATS message may carry" in caplog.text, 5)
    assert dist.state("corp").generation == gen  # type: ignore[union-attr]
    dist.max_state = 1 << 20  # raised: the pending join goes through
    await wait_for(lambda: b.node_id in a.view()[1], 10, "b published after the limit rose")


async def test_beacon_tells_members_the_current_generation(
    controller: RunningController, agents: AgentFactory, sims: list[NATS],
) -> None:
    """A member that missed a delta learns of it from the beacon (an empty delta at the
    current generation, from = to): it sees a gap and resyncs; one that is current
    ignores it as stale."""
    await make_net(controller)
    a = await sim(agents, sims, {"mesh": "on"}, public="198.18.1.1")
    await a.listen("corp")
    await a.join()
    await wait_for(lambda: a.snapshots, 5)
    controller.mesh.distributor.beacon_interval = 0.3
    gen = controller.mesh.distributor.state("corp").generation  # type: ignore[union-attr]
    await wait_for(lambda: any(d.from_generation == d.generation == gen and not d.added
                               for d in a.deltas), 5, "a beacon")
    assert a.view()[0] == gen  # applied as an agent does: nothing changes
