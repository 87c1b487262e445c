"""Mesh benchmark. Part (a): convergence of N lab machines (netns, wireguard-go, real
controller and agent/netmesh over NATS), time from the last join until every pair talks.
Part (b): control-plane bytes for one join (and one removal) with N simulated members,
against N x one peer entry.

Part (a): a third of the machines public in one simulated cloud, a third public in another,
a third each behind its own NAT; all enrolled and their NetMesh running, then every
MeshJoin at once; the clock runs from the last one until each ordered pair has had an
answer over the overlay (the members' own UDP probes, every 0.2 s), and a ping sweep of
every ordered pair (counted) confirms it. Needs root, wireguard-go, ping, nft.

    sudo python bench/mesh.py --part a [--n 30] [--runs 2]

Besides the phases, part (a) says what the run cost while the clock ran: ``bench_cpu_frac``
(this one process: the controller and all N agents' netmesh and probers, of one core),
``wg_cpu_frac`` (all wireguard-go processes), ``loop_lag_*_s`` (how late a 10 ms sleep
woke), ``udp_rcvbuf_drops`` (datagrams the members' namespaces dropped for a full socket
buffer), ``probes`` (sent, answered in time, answered after the timeout and the slowest
of those), ``mesh_stats`` (re-adds, one-way re-adds, apply errors, summed), and for the
five slowest pairs when each end saw the tunnel's handshake and the pair's re-adds.

A real controller runs against its own nats-server (loopback, no auth, so that simulated
members can publish as any node); N nodes are written into its state as enrolled members
of one network (the distributor publishes them as it would real ones). Each member is one
NATS subscription on the network's delta subject (spread over a few connections): what
they receive is counted, as is what the controller publishes (each delta once, the
joiner's snapshot once). Then a node joins with a real MeshJoin over NATS, and another
one is deleted.

    python bench/mesh.py --part b [--n 1000] [--runs 3]

Prints one JSON line per run: {"bench": "mesh", "part": "b", "n", "entry_bytes",
"baseline_bytes" (N x entry), "published_bytes", "published_ratio", "delivered_bytes",
"delivered_ratio", "full_push_bytes" (every member sent the whole peer list, as Netmaker
does), ...}. Parts (a) convergence and (c) throughput need the netns lab (agent side).

What is counted. ``published``: what the controller sends (each delta once, the joiner's
snapshot once; NATS copies a message to each subscriber). ``delivered``: the payloads all
members and the joiner receive, the figure the target (<= 2 x N x entry) is about: at best
N x entry (the joiner's entry to each member) + the joiner's N peers.
``delivered_wire``: what the server writes to those sockets, i.e. delivered plus each
message's MSG/HMSG line (subject, sid, reply inbox, sizes), headers and CRLF (wire_bytes).
The joiner sends MeshJoin with ``accepts: ["zlib"]`` as agent/netmesh does, so its snapshot
is compressed (``snapshot_uncompressed_bytes`` says what it was). The periodic beacon is not
the join's and is kept out (``beacon_per_member_bytes`` says what one costs a member).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.config import ControllerConfig
from controller.mesh.deltas import MeshNode
from controller.mesh.networks import NetworkSpec
from controller.models import NodeRecord
from controller.nats.client import flush_all
from controller.nats.server import NatsServer
from controller.service import Controller, RunningController
from protocol import codec
from protocol.messages import MeshDelta, MeshEndpoint, MeshJoin, MeshSnapshot

log = logging.getLogger("barista.bench.mesh")
NET = "bench"
CIDR = "198.19.0.0/16"
CONNECTIONS = 10


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def member(i: int) -> tuple[NodeRecord, MeshNode]:
    """Simulated node i: a third public, the rest private in one of several VPCs."""
    node_id = f"sim{i:05d}-{i % 251:02x}ab{i % 13:x}"
    region = ("aws/us-east-1", "gcp/europe-west1", "onprem/dc1")[i % 3]
    eps = [MeshEndpoint(host=f"10.{i % 3}.{i // 250 % 250}.{i % 250 + 1}", kind="private",
                        network=f"vpc-{i % 3}", region=region)]
    if i % 3 != 2:
        eps.append(MeshEndpoint(host=f"198.18.{i // 250 % 250}.{i % 250 + 1}",
                                kind="public", region=region))
    node = NodeRecord(id=node_id, hostname=node_id, identity="U" + node_id,
                      labels={"mesh": "on", "region": region}, enrolled_at=time.time())
    return node, MeshNode(node_id=node_id, public_key=wg_key(), endpoints=eps, region=region)


async def wait_until(pred: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def wire_bytes(msg: object) -> int:
    """What the server wrote to the subscriber's socket for ``msg``: the MSG / HMSG line
    (subject, sid, reply, sizes), the headers block, the payload and its CRLF."""
    data: bytes = msg.data  # type: ignore[attr-defined]
    headers: dict[str, str] | None = msg.headers  # type: ignore[attr-defined]
    reply: str = msg.reply  # type: ignore[attr-defined]
    hdr = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
           if headers else "")
    sizes = f"{len(hdr)} {len(hdr) + len(data)}" if hdr else str(len(data))
    line = (f"{'HMSG' if hdr else 'MSG'} {msg.subject} {msg.sid} "  # type: ignore[attr-defined]
            f"{reply + ' ' if reply else ''}{sizes}\r\n")
    return len(line) + len(hdr) + len(data) + 2


class Fleet:
    """N member subscriptions on the delta subject, counting what each receives (payload,
    and all that the server sends for it: see wire_bytes)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.wire = 0
        self.messages = 0
        self.deltas: list[MeshDelta] = []
        self.conns: list[object] = []

    async def start(self, url: str, c: RunningController, n: int) -> None:
        import nats

        subject = c.subjects.mesh_delta(NET)
        per = -(-n // CONNECTIONS)
        for k in range(CONNECTIONS):
            nc = await nats.connect(url, pending_size=256 << 20)
            self.conns.append(nc)
            for _ in range(min(per, n - k * per)):
                first = not self.deltas and k == 0 and self.messages == 0

                async def on_delta(msg, keep: bool = first) -> None:  # type: ignore[no-untyped-def]
                    self.bytes += len(msg.data)
                    self.wire += wire_bytes(msg)
                    self.messages += 1
                    if keep:
                        self.deltas.append(codec.decode(msg.data, MeshDelta))

                await nc.subscribe(subject, cb=on_delta, pending_msgs_limit=1 << 20,
                                   pending_bytes_limit=1 << 30)
            # In place before the controller publishes (controller.nats.client.flush_all).
            await flush_all(nc, 60)

    def reset(self) -> None:
        self.bytes = self.wire = self.messages = 0
        self.deltas.clear()

    async def close(self) -> None:
        for nc in self.conns:
            await nc.close()  # type: ignore[attr-defined]


def _dump_tasks() -> None:
    """SIGUSR1: every task's stack to stderr (where a run that hangs is waiting)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def run_b(n: int, base: Path) -> dict[str, object]:
    import signal

    import nats

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)

    srv = NatsServer(data_dir=base / "nats", auth=False, max_payload=8 << 20)
    srv.start()
    try:
        cfg = ControllerConfig(data_dir=base / "c", nats_url=srv.url, api_port=0, tls=False)
        async with Controller(cfg) as c:
            dist = c.mesh.distributor
            await c.mesh.networks.create(NetworkSpec(name=NET, cidr=CIDR, selector="mesh=on"))
            t0 = time.monotonic()
            # N enrolled members, written as enrollment and MeshJoin would write them.
            sims = [member(i) for i in range(n)]
            dist.window = 0.5
            for i in range(0, n, 200):
                await asyncio.gather(*(c.nodes.put(node.id, node) for node, _ in sims[i:i + 200]))
                await asyncio.gather(*(dist.mesh_nodes.put(node.id, mn)
                                       for node, mn in sims[i:i + 200]))
            await wait_until(lambda: (s := dist.state(NET)) is not None and len(s.peers) == n,
                             120, f"{n} members published")
            fill_s = time.monotonic() - t0
            log.info("%d: members published", n)
            dist.window = 0.05
            # The beacon (every 30 s, each member one ~75-byte empty delta) is periodic
            # traffic, not the join's: kept out of the window (a long fill used to put one
            # in it, counted as the join's and ending the wait before the join's delta).
            dist.beacon_interval = 1e9
            fleet = Fleet()
            await fleet.start(srv.url, c, n)
            log.info("%d: fleet subscribed", n)
            joiner, joiner_mn = member(n)
            state_before = dist.state(NET)
            assert state_before is not None
            listener = await nats.connect(srv.url, pending_size=256 << 20)
            snaps: list[bytes] = []
            snap_wire: list[int] = []

            async def on_snap(msg) -> None:  # type: ignore[no-untyped-def]
                snaps.append(msg.data)
                snap_wire.append(wire_bytes(msg))

            await listener.subscribe(c.subjects.mesh_snapshot(joiner.id), cb=on_snap)
            await listener.flush()
            before = dict(dist.stats)
            await asyncio.wait_for(dist.settled(), 30)
            t_join = time.monotonic()
            # The join: the node is enrolled, then its agent sends MeshJoin over NATS.
            await c.nodes.put(joiner.id, joiner)
            await listener.publish(c.subjects.mesh_join(joiner.id), codec.encode(MeshJoin(
                node_id=joiner.id, public_key=joiner_mn.public_key,
                endpoints=joiner_mn.endpoints, region=joiner_mn.region,
                accepts=[codec.ZLIB])))  # as agent/netmesh/link.py sends it
            await wait_until(lambda: snaps and fleet.messages >= n, 60, "join delivered")
            join_s = time.monotonic() - t_join
            log.info("%d: join delivered", n)
            await asyncio.wait_for(dist.settled(), 30)
            await asyncio.sleep(0.3)  # anything late would be counted too
            published = (dist.stats["delta_bytes"] - before["delta_bytes"]
                         + dist.stats["snapshot_bytes"] - before["snapshot_bytes"])
            deltas = dist.stats["deltas"] - before["deltas"]
            state = dist.state(NET)
            assert state is not None
            entry = len(msgspec.msgpack.encode(state.peers[joiner.id]))
            delta_size = len(codec.encode(fleet.deltas[-1])) if fleet.deltas else 0
            snap = codec.decode(snaps[-1], MeshSnapshot)
            assert len(snap.peers) == n
            delivered = fleet.bytes + sum(len(s) for s in snaps)
            delivered_wire = fleet.wire + sum(snap_wire)
            beacon = len(codec.encode(MeshDelta(network=NET, generation=state_before.generation,
                                                from_generation=state_before.generation,
                                                epoch=state_before.epoch)))
            plain_snapshot = len(codec.encode(snap))
            received_per_member = fleet.bytes / max(1, fleet.messages)
            state_bytes = len(msgspec.msgpack.encode(state))
            baseline = n * entry
            # One removal: the joiner is deleted again.
            fleet.reset()
            before = dict(dist.stats)
            t_rm = time.monotonic()
            await c.nodes.delete(joiner.id)
            await wait_until(lambda: fleet.messages >= n, 60, "removal delivered")
            rm_s = time.monotonic() - t_rm
            log.info("%d: removal delivered", n)
            await asyncio.wait_for(dist.settled(), 30)
            rm_published = dist.stats["delta_bytes"] - before["delta_bytes"]
            rm_delivered = fleet.bytes
            await fleet.close()
            await listener.close()
            return {
                "bench": "mesh", "part": "b", "n": n,
                "entry_bytes": entry, "baseline_bytes": baseline,
                "join_deltas": deltas, "delta_bytes": delta_size,
                "snapshot_bytes": len(snaps[-1]),
                "published_bytes": published,
                "published_ratio": round(published / baseline, 3),
                "delivered_bytes": delivered,
                "delivered_ratio": round(delivered / baseline, 3),
                "delivered_wire_bytes": delivered_wire,
                "delivered_wire_ratio": round(delivered_wire / baseline, 3),
                "snapshot_uncompressed_bytes": plain_snapshot,
                "received_per_member_bytes": round(received_per_member, 1),
                "full_push_bytes": n * plain_snapshot,
                "full_push_ratio": round(n * plain_snapshot / baseline, 1),
                "beacon_per_member_bytes": beacon,
                "removal_published_bytes": rm_published,
                "removal_delivered_bytes": rm_delivered,
                "removal_delivered_ratio": round(rm_delivered / baseline, 3),
                "controller_state_write_bytes": state_bytes,
                "join_to_all_members_s": round(join_s, 3),
                "removal_to_all_members_s": round(rm_s, 3),
                "fill_s": round(fill_s, 2),
            }
    finally:
        srv.stop()


async def run_a(n: int, base: Path) -> dict[str, object]:
    import contextlib
    import signal
    import uuid

    from tests.fixtures.controller import AgentFactory, controller_config
    from tests.fixtures.meshlab import Lab, lab_available, ping
    from tests.fixtures.meshnode import Member, join

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    reason = lab_available()
    if reason:
        raise SystemExit(f"part a: {reason}")
    lab = Lab(prefix=f"bm{uuid.uuid4().hex[:4]}")
    names: list[str] = []
    try:
        await asyncio.to_thread(lab.start)
        for i in range(n):
            kind = i % 3
            if kind == 2:
                name = f"nat{i}"
                await asyncio.to_thread(lab.add_nat, name, 41 + i // 3)
            else:
                name = f"{'aws' if kind == 0 else 'gcp'}{i}"
                await asyncio.to_thread(lab.add_public, name, 1 + i)
            names.append(name)
        cfg = controller_config(base / "controller")
        async with Controller(cfg) as c, contextlib.AsyncExitStack() as stack:
            await c.mesh.networks.create(NetworkSpec(name="corp", cidr=CIDR,
                                                     selector="mesh=on", keepalive=2))
            agents = AgentFactory(c, base / "agents")
            await stack.enter_async_context(agents.stack)
            t_enroll = time.monotonic()
            members: list[Member] = []
            for name in names:
                members.append(await join(lab, name, c, agents, stack, base / "mesh",
                                          send_join=False,
                                          options={"health_interval": 3600.0,
                                                   "probe_interval": 0.2}))
            enroll_s = time.monotonic() - t_enroll
            log.info("%d: enrolled, netmesh up (%.1f s); joining", n, enroll_s)
            dist = c.mesh.distributor
            stats0 = dict(dist.stats)
            events = _Events()
            logging.getLogger("barista.netmesh").addHandler(events)
            logging.getLogger("barista.netmesh").setLevel(logging.INFO)
            lags: list[float] = []
            lag = asyncio.create_task(_loop_lag(lags))
            wg_cpu0 = _wg_cpu(members)
            drops0 = _udp_drops(members)
            cpu0 = time.process_time()
            t0 = time.monotonic()
            await asyncio.gather(*(m.join() for m in members))
            t_last = time.monotonic()
            wall_last = time.time()
            events.t0 = t_last
            first_rtt: dict[tuple[str, str], float] = {}
            by_id = {m.node_id: m for m in members}
            reached: dict[tuple[str, str], float] = {}
            want = n * (n - 1)
            views_s = 0.0
            # Phases, each the first poll (every 0.05 s) that saw it, from the last MeshJoin:
            # the controller has every member in its published state / has sent every
            # snapshot; per member: snapshot applied (it has its address), its view holds
            # all n - 1 peers (snapshot + deltas), its WireGuard config holds them all
            # (the plan applied: direct peers, and relayed ones through their relay).
            phase: dict[str, float] = {}
            per: dict[str, dict[str, float]] = {k: {} for k in ("snapshot", "view", "applied")}
            deadline = t_last + 120
            while len(reached) < want and time.monotonic() < deadline:
                now = time.monotonic()
                state_now = dist.state("corp")
                if "published_all" not in phase and state_now is not None \
                        and len(state_now.peers) == n:
                    phase["published_all"] = now - t_last
                if "snapshots_sent" not in phase and \
                        dist.stats["snapshots"] - stats0["snapshots"] >= n:
                    phase["snapshots_sent"] = now - t_last
                for m in members:
                    if m.node_id not in per["snapshot"] and "corp" in m.mesh.views:
                        per["snapshot"][m.node_id] = now - t_last
                    if m.node_id not in per["view"] and len(m.peers()) == n - 1:
                        per["view"][m.node_id] = now - t_last
                    pl = m.mesh.plan("corp")
                    if m.node_id not in per["applied"] and pl is not None \
                            and len(pl.peers) + len(pl.via) >= n - 1:
                        per["applied"][m.node_id] = now - t_last
                if not views_s and all(len(m.peers()) == n - 1 for m in members):
                    views_s = now - t_last
                for m in members:
                    prober = m.mesh.prober("corp")
                    if prober is None:
                        continue
                    for peer_id, probes in prober.window.items():
                        if probes.received and (m.node_id, peer_id) not in reached \
                                and peer_id in by_id:
                            reached[(m.node_id, peer_id)] = now - t_last
                            first_rtt[(m.node_id, peer_id)] = probes.rtts[0]
                await asyncio.sleep(0.05)
            converged = max(reached.values()) if len(reached) == want else None
            window_s = time.monotonic() - t_last
            cpu_s = time.process_time() - cpu0
            wg_cpu_s = _wg_cpu(members) - wg_cpu0
            udp_drops = _udp_drops(members) - drops0
            lag.cancel()
            logging.getLogger("barista.netmesh").removeHandler(events)
            # WireGuard's own clock of each tunnel's (last, in so short a run the first)
            # handshake, read once now: no polling needed for its precision.
            handshakes: list[float] = []
            tunnels: list[tuple[float, str, str]] = []
            name_by_key = {base64.b64decode(m.mesh.public_key): m.name for m in members}
            for m in members:
                dev = await m.mesh.backend.get(m.mesh.ifname("corp"))
                for key, p in dev.peers.items():
                    if p.last_handshake > 0:
                        handshakes.append(p.last_handshake - wall_last)
                        tunnels.append((p.last_handshake - wall_last, m.name,
                                        name_by_key.get(key, "?")))
            name_of = {m.node_id: m.name for m in members}
            slowest = sorted(reached.items(), key=lambda kv: -kv[1])[:5]
            hs_at = {(a, b): t for t, a, b in tunnels}
            probers = [(m, m.mesh.prober("corp")) for m in members]

            def pair_detail(a: str, b: str, t: float) -> dict[str, object]:
                ma, mb = by_id[a], by_id[b]
                pa = ma.mesh.prober("corp")
                w = pa.window.get(b) if pa is not None else None
                ev = [[round(e[0], 2), name_of.get(e[1], e[1]), e[3]] for e in events.got
                      if {e[1], e[2]} == {a, b}]
                return {"pair": [ma.name, mb.name], "reached_s": round(t, 2),
                        "first_rtt_s": round(first_rtt.get((a, b), -1), 3),
                        "handshake_s": [_r(hs_at.get((ma.name, mb.name))),
                                        _r(hs_at.get((mb.name, ma.name)))],
                        "sent": w.sent if w else 0, "received": w.received if w else 0,
                        "late": w.late if w else 0, "events": ev}
            log.info("%d: %d/%d pairs reached; ping sweep", n, len(reached), want)
            # Confirmation: every ordered pair, one ping each, 40 at a time.
            sem = asyncio.Semaphore(40)

            async def one(x: Member, y: Member) -> bool:
                async with sem:
                    _sent, received, _ = await ping(lab.nodes[x.name].ns, y.address(),
                                                    count=1, deadline=3)
                    return received == 1

            t_sweep = time.monotonic()
            oks = await asyncio.gather(*(one(x, y) for x in members for y in members
                                         if x is not y))
            sweep_s = time.monotonic() - t_sweep
            state = c.mesh.distributor.state("corp")
            return {
                "bench": "mesh", "part": "a", "n": n,
                "public": sum(1 for nm in names if not nm.startswith("nat")),
                "behind_nat": sum(1 for nm in names if nm.startswith("nat")),
                "pairs": want, "pairs_reached": len(reached),
                "convergence_s": round(converged, 3) if converged is not None else None,
                "all_views_s": round(views_s, 3),
                "joins_sent_s": round(t_last - t0, 3),
                "p50_pair_s": round(sorted(reached.values())[len(reached) // 2], 3)
                if reached else None,
                "slowest_pairs": [[name_of[a], name_of[b], round(t, 2)]
                                  for (a, b), t in slowest],
                "slowest_detail": [pair_detail(a, b, t) for (a, b), t in slowest],
                # while the clock ran: the whole bench process (controller, 30 agents'
                # netmesh and probers) on its one core, and all wireguard-go processes
                "window_s": round(window_s, 2),
                "bench_cpu_frac": round(cpu_s / window_s, 2) if window_s else None,
                "wg_cpu_frac": round(wg_cpu_s / window_s, 2) if window_s else None,
                "loop_lag_max_s": _quantile(lags, "max"),
                "loop_lag_p90_s": round(sorted(lags)[len(lags) * 9 // 10], 3) if lags else None,
                "mesh_stats": {k: sum(getattr(m.mesh.stats, k) for m in members)
                               for k in ("readds", "one_way", "apply_errors", "resyncs")},
                "probes": {"sent": sum(sum(w.sent for w in p.window.values())
                                       for _, p in probers if p),
                           "received": sum(sum(w.received for w in p.window.values())
                                           for _, p in probers if p),
                           "late": sum(p.late for _, p in probers if p),
                           "late_max_s": round(max((p.late_max for _, p in probers if p),
                                                   default=0.0), 2)},
                "readd_events": len(events.got),
                "udp_rcvbuf_drops": udp_drops,
                "phases_s": {
                    **{k: round(v, 3) for k, v in phase.items()},
                    **{f"{k}_{q}": _quantile(list(v.values()), q) for k, v in per.items()
                       for q in ("p50", "max")},
                    "handshake_p50": _quantile(handshakes, "p50"),
                    "handshake_max": _quantile(handshakes, "max"),
                    "pair_reached_p50": _quantile(list(reached.values()), "p50"),
                    "pair_reached_max": _quantile(list(reached.values()), "max"),
                },
                "members_missing_phase": {k: n - len(v) for k, v in per.items() if len(v) < n},
                "tunnels_handshaken": len(handshakes),
                # Tunnels whose last handshake came more than 4 s after the last member had
                # its whole config applied: a first handshake retried (REKEY_TIMEOUT, 5 s),
                # or a second handshake (WireGuard keeps only the last one's time).
                "tunnels_late": sum(1 for t in handshakes
                                    if t > max(per["applied"].values(), default=0.0) + 4.0),
                # The latest handshakes, with when each side had the other configured.
                "slowest_handshakes": [
                    [a, b, round(t, 2), _applied(per, members, a), _applied(per, members, b)]
                    for t, a, b in sorted(tunnels, reverse=True)[:6]],
                "controller": {k: dist.stats[k] - stats0[k]
                               for k in ("deltas", "snapshots", "flushes", "joins", "resyncs")},
                "ping_sweep_ok": sum(oks), "ping_sweep_pairs": len(oks),
                "ping_sweep_s": round(sweep_s, 2),
                "generation": state.generation if state else 0,
                "deltas": c.mesh.distributor.stats["deltas"],
                "enroll_and_start_s": round(enroll_s, 1),
                "load1": round(os.getloadavg()[0], 2),
            }
    finally:
        await asyncio.to_thread(lab.stop)


class _Events(logging.Handler):
    """The netmesh re-adds (no handshake yet / one way): (s from the last join, node id,
    peer node id, kind)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = time.monotonic()
        self.got: list[tuple[float, str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        kind = "readd" if "yet; re-adding" in msg else "one_way" if "nothing from it" in msg \
            else ""
        if kind and isinstance(record.args, tuple) and len(record.args) >= 2:
            self.got.append((time.monotonic() - self.t0, record.name.rsplit(".", 1)[-1],
                             str(record.args[1]), kind))


async def _loop_lag(out: list[float]) -> None:
    """How late a 10 ms sleep wakes, over and over: the event loop's backlog."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(0.01)
        out.append(loop.time() - t - 0.01)


def _wg_cpu(members: list[Any]) -> float:
    """CPU seconds used so far by the members' wireguard-go processes."""
    total = 0
    for m in members:
        pid = m.mesh.backend.pid(m.mesh.ifname("corp"))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _udp_drops(members: list[Any]) -> int:
    """UDP datagrams the members' namespaces dropped for a full receive buffer so far (the
    probers' sockets and wireguard-go's: /proc/<pid>/net is the pid's namespace)."""
    total = 0
    for m in members:
        pid = m.mesh.backend.pid(m.mesh.ifname("corp"))
        try:
            lines = [ln.split() for ln in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
                     if ln.startswith("Udp:")]
            total += int(lines[1][lines[0].index("RcvbufErrors")])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _r(v: float | None) -> float | None:
    return round(v, 2) if v is not None else None


def _applied(per: dict[str, dict[str, float]], members: list[Any], name: str) -> float | None:
    got = [per["applied"].get(m.node_id) for m in members if m.name == name]
    return round(got[0], 2) if got and got[0] is not None else None


def _quantile(values: list[float], q: str) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2] if q == "p50" else ordered[-1], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["a", "b"], default="b",
                   help="a: convergence of N lab machines; b: control-plane bytes per join "
                        "(c, throughput: bench/mesh_dataplane.py)")
    p.add_argument("--n", type=int, help="machines (a: 30) or simulated members (b: 1000)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("-v", "--verbose", action="store_true", help="say each phase (stderr)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        log.setLevel(logging.INFO)
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="barista-bench-mesh-") as tmp:
            if args.part == "a":
                result = asyncio.run(run_a(args.n or 30, Path(tmp)))
            else:
                result = asyncio.run(run_b(args.n or 1000, Path(tmp)))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
