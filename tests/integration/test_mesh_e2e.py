"""The whole overlay: the real controller (networks, IPAM, deltas, relays, matrix) driving
agent/netmesh with real wireguard-go in network namespaces over real NATS.

Each lab machine is an enrolled node (an in-process agent for its identity) whose NetMesh
talks to the controller on the node's own subjects with the node's own credentials, as the
agent runtime does: MeshJoin, snapshots, network-wide deltas, resyncs, health, rotation.
Lab: a and b public, n1 and n2 each behind its own NAT (tests/fixtures/meshlab.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.netmesh.probes import PROBE_PORT
from agent.runtime import Agent
from controller.mesh.networks import NetworkSpec
from controller.service import Controller, RunningController
from protocol.mesh import key_bytes
from tests.fixtures.controller import AgentFactory, controller_config, wait_for
from tests.fixtures.meshlab import Lab, mesh_lab, ping
from tests.fixtures.meshnode import Member, join

__all__ = ["mesh_lab"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
log = logging.getLogger("tests.mesh_e2e")
NET = "corp"


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    mesh_lab.add_public("a", 1)
    mesh_lab.add_public("b", 2)
    mesh_lab.add_nat("n1", 11)
    mesh_lab.add_nat("n2", 12)
    return mesh_lab


async def _pings(lab: Lab, members: list[Member], count: int, deadline: float
                 ) -> dict[str, tuple[int, int, str]]:
    async def one(x: Member, y: Member) -> tuple[str, tuple[int, int, str]]:
        return f"{x.name}->{y.name}", await ping(lab.nodes[x.name].ns, y.address(),
                                                 count=count, deadline=deadline)

    return dict(await asyncio.gather(*(one(x, y) for x in members for y in members
                                       if x is not y)))


async def all_pairs_ping(lab: Lab, members: list[Member]) -> None:
    """Every ordered pair answers 3 of 3 pings, once the tunnels are up: NAT'ed nodes open
    theirs with keepalives (2 s here), and a relayed pair needs both hops' handshakes."""
    async def up() -> bool:
        results = await _pings(lab, members, 1, 2)
        return all(received == 1 for _, received, _ in results.values())

    await wait_for(up, 30, "every pair answers a ping")
    results = await _pings(lab, members, 3, 10)
    bad = {pair: out for pair, (sent, received, out) in results.items()
           if not sent == received == 3}
    assert not bad, f"pairs that lost pings: {bad}"
    assert len(results) == len(members) * (len(members) - 1)


@pytest.fixture
async def fleet(controller: RunningController, agents: AgentFactory, lab: Lab,
                tmp_path: Path) -> AsyncIterator[dict[str, Member]]:
    await controller.mesh.networks.create(NetworkSpec(
        name=NET, cidr="198.19.0.0/16", selector="mesh=on", keepalive=2))
    async with contextlib.AsyncExitStack() as stack:
        members = {name: await join(lab, name, controller, agents, stack, tmp_path)
                   for name in ("a", "b", "n1", "n2")}
        yield members


async def test_controller_drives_the_overlay_across_nat(
    controller: RunningController, lab: Lab, fleet: dict[str, Member],
) -> None:
    members = list(fleet.values())
    ids = {m.node_id for m in members}
    await wait_for(lambda: all(m.peers() == ids - {m.node_id} for m in members), 20,
                   "every member has every other")
    state = controller.mesh.distributor.state(NET)
    assert state is not None
    a, b, n1, n2 = (fleet[n] for n in ("a", "b", "n1", "n2"))
    # The NAT'ed nodes got relays with public addresses, spread over both.
    assert {state.peers[n1.node_id].relay, state.peers[n2.node_id].relay} == \
        {a.node_id, b.node_id}
    await all_pairs_ping(lab, members)  # 12 pairs, both directions, through NAT and relays

    # The matrix fills from the members' probes over the overlay.
    await wait_for(lambda: sum(1 for p in controller.mesh.matrix.pairs(NET) if p.rtt_ms > 0)
                   >= 12, 20, "all 12 pairs measured")
    regions = {(r["src_region"], r["dst_region"])
               for r in controller.mesh.matrix.view(NET, by="region")["regions"]}  # type: ignore[attr-defined]
    assert ("lab/public", "lab/site-11") in regions

    # Removal: b's node is deleted; within 5 s no member has b's key, and the member
    # that b relayed for moved to a and still reaches everyone.
    b_key = key_bytes(b.mesh.public_key)

    async def b_gone() -> bool:
        for m in (a, n1, n2):
            st = await m.mesh.backend.get(m.mesh.ifname(NET))
            if b_key in st.peers:
                return False
        return True

    await controller.delete_node(b.node_id)
    await wait_for(b_gone, 5, "b out of every peer's WireGuard config")
    rest = [a, n1, n2]
    await wait_for(lambda: all(m.peers() == {x.node_id for x in rest} - {m.node_id}
                               for m in rest), 5)
    state = controller.mesh.distributor.state(NET)
    assert state is not None and state.peers[n1.node_id].relay == a.node_id == \
        state.peers[n2.node_id].relay
    await all_pairs_ping(lab, rest)


async def test_rotation_asked_by_the_controller_keeps_the_stream(
    controller: RunningController, lab: Lab, fleet: dict[str, Member],
) -> None:
    members = list(fleet.values())
    ids = {m.node_id for m in members}
    await wait_for(lambda: all(m.peers() == ids - {m.node_id} for m in members), 20)
    a, b = fleet["a"], fleet["b"]
    old = b.mesh.public_key
    stream = asyncio.create_task(ping(lab.nodes[a.name].ns, b.address(), count=50,
                                      interval=0.1, deadline=15))
    await asyncio.sleep(1.0)
    await controller.mesh.distributor.rotate(b.node_id, reason="test")
    await wait_for(lambda: b.rotations, 5, "the node was asked")
    new = await b.rotations[0]
    assert new != old

    def committed() -> bool:
        st = controller.mesh.distributor.state(NET)
        return st is not None and st.peers[b.node_id].public_key == new and \
            not st.peers[b.node_id].next_public_key

    await wait_for(committed, 10, "rotation committed by the controller")
    sent, received, out = await stream
    log.info("rotation: a -> b lost %d of %d pings", sent - received, sent)
    assert received == 50 and sent - received <= 10, out  # at most 1 s of a 10/s stream
    for m in members:
        if m is b:
            continue

        async def moved(m: Member = m) -> bool:
            keys = set((await m.mesh.backend.get(m.mesh.ifname(NET))).peers)
            return key_bytes(new) in keys and key_bytes(old) not in keys

        await wait_for(moved, 10, f"{m.name} has only b's new key")


async def test_controller_restart_changes_nothing_on_the_data_path(
    lab: Lab, tmp_path: Path,
) -> None:
    """The controller (and its embedded nats-server) stops and comes back on its data dir
    while a 10/s ping stream runs over the overlay: no ping lost, the same peers and keys
    in WireGuard, the same generation afterwards."""
    cfg = controller_config(tmp_path / "controller")
    async with contextlib.AsyncExitStack() as controllers:
        first = contextlib.AsyncExitStack()
        await controllers.enter_async_context(first)
        c = await first.enter_async_context(Controller(cfg))
        async with contextlib.AsyncExitStack() as stack:
            agents = AgentFactory(c, tmp_path / "agents")
            await stack.enter_async_context(agents.stack)
            await c.mesh.networks.create(NetworkSpec(
                name=NET, cidr="198.19.0.0/16", selector="mesh=on", keepalive=2))
            members = [await join(lab, name, c, agents, stack, tmp_path)
                       for name in ("a", "n1")]
            a, n1 = members
            await wait_for(lambda: a.peers() == {n1.node_id} and n1.peers() == {a.node_id},
                           20)
            await all_pairs_ping(lab, members)
            state = c.mesh.distributor.state(NET)
            assert state is not None

            async def wg_peers() -> list[set[bytes]]:
                return [set((await m.mesh.backend.get(m.mesh.ifname(NET))).peers)
                        for m in members]

            before = await wg_peers()
            stream = asyncio.create_task(ping(lab.nodes["n1"].ns, a.address(), count=40,
                                              interval=0.1, deadline=15))
            await asyncio.sleep(0.5)
            await first.aclose()  # the controller and its nats-server are gone
            c2 = await controllers.enter_async_context(Controller(cfg))
            await asyncio.wait_for(c2.mesh.distributor.settled(), 10)
            sent, received, out = await stream
            assert sent == received == 40, out
            assert await wg_peers() == before
            after = c2.mesh.distributor.state(NET)
            assert after is not None and after.generation == state.generation
            assert after.peers == state.peers


async def test_real_agents_join_the_network_and_ping_across_nat(
    controller: RunningController, agents: AgentFactory, lab: Lab,
) -> None:
    """The agent runtime with its overlay on (nothing bridged by the test): enrolled
    agents join the network their labels put them in, ping each other across NAT through
    the relay the controller chose, and a deleted node leaves every peer."""
    await controller.mesh.networks.create(NetworkSpec(
        name="lan", cidr="198.19.0.0/16", selector="overlay=yes", keepalive=2))
    controller.mesh.distributor.beacon_interval = 1.0
    started = {}
    for name in ("a", "b", "n1", "n2"):
        node = lab.nodes[name]
        mesh_addr = {"mesh_public_address": node.underlay} if node.public else {
            "mesh_private_address": node.underlay, "mesh_network_id": node.site}
        region = "lab/public" if node.public else f"lab/{node.site}"
        started[name] = await agents.start(
            labels={"overlay": "yes", "region": region}, mesh_enabled=True,
            mesh_netns=node.ns, mesh_backend="wireguard-go",
            mesh_ifname_prefix=lab.ifname_prefix(node), mesh_region=region,
            mesh_health_interval=1.0, **mesh_addr)

    def address(agent: Agent) -> str:
        assert agent.mesh is not None
        view = agent.mesh.views.get("lan")
        return view.own.address if view else ""

    def peers(agent: Agent) -> set[str]:
        assert agent.mesh is not None
        view = agent.mesh.views.get("lan")
        return set(view.peers) if view else set()

    ids = {n: a.state.node_id for n, a in started.items() if a.state is not None}
    # A member whose delta subscription came up after a delta catches up from the beacon.
    await wait_for(lambda: all(peers(a) == set(ids.values()) - {ids[n]}
                               for n, a in started.items()), 20, "every agent has the others")

    async def pairs_ping(names: list[str], count: int) -> dict[str, int]:
        async def one(x: str, y: str) -> tuple[str, int]:
            _, received, _ = await ping(lab.nodes[x].ns, address(started[y]), count=count,
                                        deadline=3 if count == 1 else 10)
            return f"{x}->{y}", received
        return dict(await asyncio.gather(*(one(x, y) for x in names for y in names
                                           if x != y)))

    names = list(started)

    async def up() -> bool:
        return all(r == 1 for r in (await pairs_ping(names, 1)).values())

    await wait_for(up, 30, "every pair answers")
    results = await pairs_ping(names, 3)
    assert results == {k: 3 for k in results} and len(results) == 12, results
    # The matrix fills from the agents' own health reports.
    await wait_for(lambda: sum(1 for p in controller.mesh.matrix.pairs("lan")
                               if p.rtt_ms > 0) == 12, 20, "12 measured pairs")
    # A deleted node is out of every other agent's WireGuard config within 5 s.
    b = started["b"]
    assert b.mesh is not None
    b_key = key_bytes(b.mesh.public_key)
    await controller.delete_node(ids["b"])

    async def b_gone() -> bool:
        for n in ("a", "n1", "n2"):
            mesh = started[n].mesh
            assert mesh is not None
            if b_key in (await mesh.backend.get(mesh.ifname("lan"))).peers:
                return False
        return True

    await wait_for(b_gone, 5, "b out of every peer")


async def test_agent_outside_every_network_runs_no_overlay_until_put_in_one(
    controller: RunningController, agents: AgentFactory, lab: Lab,
) -> None:
    """A node in no network has no WireGuard key, sends no MeshJoin and is in no table;
    put in a network (a selector now matching it) it is invited, joins and reaches its
    peer; restarted, it goes straight back into the overlay with the same key."""
    controller.mesh.distributor.beacon_interval = 1.0
    started = {}
    for name in ("a", "b"):
        node = lab.nodes[name]
        started[name] = await agents.start(
            labels={"team": "blue"}, mesh_enabled=True, mesh_netns=node.ns,
            mesh_backend="wireguard-go", mesh_ifname_prefix=lab.ifname_prefix(node),
            mesh_public_address=node.underlay, mesh_health_interval=3600)
    dist = controller.mesh.distributor
    for agent in started.values():
        assert agent.mesh is None and agent.state is not None and not agent.state.mesh
        assert not (agent.config.state_dir / "wireguard").exists()
        assert dist.mesh_nodes.get(agent.node_id) is None
    assert dist.stats["joins"] == 0
    await controller.mesh.networks.create(NetworkSpec(
        name="blue", cidr="198.19.0.0/16", selector="team=blue", keepalive=2))

    def peers(agent: Agent) -> set[str]:
        view = agent.mesh.views.get("blue") if agent.mesh is not None else None
        return set(view.peers) if view else set()

    a, b = started["a"], started["b"]
    await wait_for(lambda: peers(a) == {b.node_id} and peers(b) == {a.node_id}, 20,
                   "both invited, joined and given the other")
    assert dist.invites.stats["invites"] >= 2
    assert a.state is not None and a.state.mesh and a.mesh is not None
    key = a.mesh.public_key
    await wait_for(lambda: controller.fleet.get(a.node_id).wg_public_key == key, 5,
                   "the key a made when it joined, in its node record")

    async def a_reaches_b() -> bool:
        assert b.mesh is not None
        address = b.mesh.views["blue"].own.address
        return (await ping(lab.nodes["a"].ns, address, count=1, deadline=2))[1] == 1

    await wait_for(a_reaches_b, 20, "a reaches b over the overlay")
    await a.stop()
    async with Agent(config=a.config) as again:
        assert again.mesh is not None and again.mesh.public_key == key  # no invite needed
        await wait_for(lambda: peers(again) == {b.node_id}, 10, "back in the network")
        await wait_for(a_reaches_b, 20, "the restarted a reaches b")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # only asks (signal 0)
    except ProcessLookupError:
        return False
    return True


async def _udp_ports(ns: str) -> set[int]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "ss", "-Hunl", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.decode().splitlines()
            if line.strip()}


async def _links(ns: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "-n", ns, "-o", "link", "show", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode()


async def test_agent_out_of_its_last_network_stops_its_overlay_and_rejoins(
    controller: RunningController, agents: AgentFactory, lab: Lab,
) -> None:
    """Its last network deleted, a node keeps no overlay: no interface, no wireguard-go,
    no WireGuard or probe port, no netmesh tasks, and its peer (still in another network)
    has no entry for it; restarted, it starts none; the network made again, it is taken
    back (the controller sends it a snapshot) and reaches its peer with the same key."""
    controller.mesh.distributor.beacon_interval = 1.0
    started = {}
    for name, labels in (("a", {"team": "blue"}), ("b", {"team": "blue", "green": "yes"})):
        node = lab.nodes[name]
        started[name] = await agents.start(
            labels=labels, mesh_enabled=True, mesh_netns=node.ns,
            mesh_backend="wireguard-go", mesh_ifname_prefix=lab.ifname_prefix(node),
            mesh_public_address=node.underlay, mesh_health_interval=3600)
    a, b = started["a"], started["b"]
    ns_a = lab.nodes["a"].ns
    await controller.mesh.networks.create(NetworkSpec(
        name="blue", cidr="198.19.0.0/16", selector="team=blue", keepalive=2))
    await controller.mesh.networks.create(NetworkSpec(
        name="green", cidr="198.20.0.0/16", selector="green=yes", keepalive=2, port=51821))

    def peers(agent: Agent, net: str = "blue") -> set[str]:
        view = agent.mesh.views.get(net) if agent.mesh is not None else None
        return set(view.peers) if view else set()

    await wait_for(lambda: peers(a) == {b.node_id} and peers(b) == {a.node_id}
                   and b.mesh is not None and "green" in b.mesh.views, 20, "both joined")

    async def a_reaches_b() -> bool:
        assert b.mesh is not None
        address = b.mesh.views["blue"].own.address
        return (await ping(ns_a, address, count=1, deadline=2))[1] == 1

    await wait_for(a_reaches_b, 20, "a reaches b over the overlay")
    assert a.mesh is not None and b.mesh is not None
    ifname, key = a.mesh.ifname("blue"), key_bytes(a.mesh.public_key)
    pid = a.mesh.backend.pid(ifname)  # type: ignore[attr-defined]
    assert pid is not None and _alive(pid)

    async def a_listens() -> bool:
        return {51820, PROBE_PORT} <= await _udp_ports(ns_a)

    await wait_for(a_listens, 10, "a's WireGuard and probe ports open")
    assert ifname in await _links(ns_a)
    b_mesh = b.mesh

    await controller.mesh.delete_network("blue")

    async def a_stopped() -> bool:
        return (a.mesh is None and a.mesh_link is None and not _alive(pid)
                and ifname not in await _links(ns_a)
                and not {51820, PROBE_PORT} & await _udp_ports(ns_a))

    await wait_for(a_stopped, 10, "a's overlay stopped")
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("netmesh-")
                and t not in b_mesh._tasks]
    for net in b_mesh.views:
        assert key not in (await b_mesh.backend.get(b_mesh.ifname(net))).peers
    assert set(b_mesh.views) == {"green"}
    assert a.state is not None and not a.state.mesh and a.state.mesh_left
    # Restarted out of every network (its key still in the state dir): no overlay.
    await a.stop()
    async with Agent(config=a.config) as a:
        assert a.mesh is None and a.mesh_link is None and a._invite_sub is not None

        await controller.mesh.networks.create(NetworkSpec(
            name="blue", cidr="198.19.0.0/16", selector="team=blue", keepalive=2))
        await wait_for(lambda: peers(a) == {b.node_id} and peers(b) == {a.node_id}, 20,
                       "both back in the network")
        assert a.mesh is not None and key_bytes(a.mesh.public_key) == key  # the same key
        await wait_for(a_reaches_b, 20, "a reaches b again")
        assert a.state is not None and a.state.mesh and not a.state.mesh_left
