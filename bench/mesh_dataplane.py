"""Overlay data plane (issue 12, bench (c) and figures): iperf3 throughput and ping RTT over
the tunnel agent/netmesh builds, against the same wireguard-go tunnel configured by hand
with `wg`, in the same pair of network namespaces, alternating, same run; and the ping
gap of a two-phase key rotation (10 pings/s).

    sudo python -m bench.mesh_dataplane [--seconds 5] [--runs 6]

One JSON line. Needs root, wireguard-go, wg, iperf3, ping (.ci/install-system-deps).

The comparison, made as fair as this can be on a shared machine: both tunnels are up side
by side the whole time (same namespaces, same wireguard-go binary, the same MTU: checked,
``link_differences`` lists whatever differs between the two interfaces as `ip -d link`
shows them); the trials alternate A B B A ..., each an iperf3 run of ``--seconds`` with its
first second left out (TCP slow start, -O 1); every trial is reported with the load at its
start, and the figure is the median of the per-pair ratios (each pair ran back to back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent.netmesh.backend import WireguardGoBackend
from agent.netmesh.host import Host
from agent.netmesh.keys import PrivateKey
from agent.netmesh.mesh import NetMesh
from tests.fixtures.meshlab import Lab, MiniController, ping, rtt_avg_ms

PROBES = [True]  # --no-probes: the overlay without its RTT/loss probes (1 per peer per s)


async def _sh(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode().strip()}")
    return out.decode()


async def iperf(lab: Lab, server: str, client: str, address: str, seconds: float) -> float:
    """Gbit/s received, client -> server, over ``address``."""
    srv = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", lab.nodes[server].ns, "iperf3", "-s", "-1", "-B", address,
        "-p", "5201", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):  # bounded: the server needs a moment to listen
            out = await _sh("ip", "netns", "exec", lab.nodes[client].ns, "timeout",
                            str(int(seconds) + 16), "iperf3", "--connect-timeout", "2000",
                            "-c", address, "-p", "5201", "-t", str(seconds), "-O", "1", "-J",
                            check=False)
            data = json.loads(out) if out.strip().startswith("{") else {}
            if "end" in data and "sum_received" in data["end"]:
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            await asyncio.sleep(0.1)
        raise RuntimeError(f"iperf3 to {address} never ran: {out[:300]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            srv.kill()
        await srv.wait()


@contextlib.asynccontextmanager
async def overlay(lab: Lab, tmp: Path, *, commit_delay: float = 0.0) -> Any:
    async with contextlib.AsyncExitStack() as stack:
        ctl = await stack.enter_async_context(MiniController(commit_delay=commit_delay))
        meshes = {}
        for name in ("a", "b"):
            node = lab.nodes[name]
            host = Host(node.ns)
            mesh = await stack.enter_async_context(NetMesh(
                node_id=name, state_dir=tmp / name, backend=WireguardGoBackend(host=host),
                host=host, publish=ctl.publisher(name), ifname_prefix=lab.ifname_prefix(node),
                health_interval=3600, probes=PROBES[0]))
            meshes[name] = ctl.meshes[name] = mesh
            ctl.members[name] = ctl.entry(node, mesh.public_key)
        await ctl.push_snapshots()
        yield ctl, meshes


@contextlib.asynccontextmanager
async def hand_tunnel(lab: Lab, tmp: Path) -> Any:
    """wireguard-go + `wg set` by hand: 198.19.1.1 <-> 198.19.1.2, keys from files."""
    keys = {n: PrivateKey.generate() for n in ("a", "b")}
    procs = []
    names = {n: f"{lab.prefix}h{lab.nodes[n].index}" for n in ("a", "b")}
    try:
        for n, other in (("a", "b"), ("b", "a")):
            node, peer = lab.nodes[n], lab.nodes[other]
            keyfile = tmp / f"hand-{n}.key"
            keyfile.write_text(keys[n].to_base64() + "\n")
            os.chmod(keyfile, 0o600)
            procs.append(await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", node.ns, "wireguard-go", "-f", names[n],
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=dict(os.environ, WG_PROCESS_FOREGROUND="1")))
            for _ in range(100):
                if Path(f"/var/run/wireguard/{names[n]}.sock").exists():
                    break
                await asyncio.sleep(0.02)
            ns = ["ip", "netns", "exec", node.ns]
            await _sh(*ns, "wg", "set", names[n], "private-key", str(keyfile),
                      "listen-port", "51830", "peer", keys[other].public_b64,
                      "endpoint", f"{peer.underlay}:51830",
                      "allowed-ips", f"198.19.1.{peer.index}/32")
            await _sh(*ns, "ip", "addr", "add", f"198.19.1.{node.index}/24", "dev", names[n])
            await _sh(*ns, "ip", "link", "set", names[n], "mtu", "1420", "up")
        yield "198.19.1.2"
    finally:
        for n in ("a", "b"):
            await _sh("ip", "-n", lab.nodes[n].ns, "link", "del", names[n], check=False)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


LINK_FACTS = ("mtu", "qdisc", "txqlen", "gso_max_size", "gso_max_segs", "gro_max_size",
              "tso_max_size", "num_tx_queues", "num_rx_queues")


async def link_facts(ns: str, ifname: str) -> dict[str, Any]:
    """What `ip -d link` says of an interface that could change its throughput."""
    out = json.loads(await _sh("ip", "-n", ns, "-j", "-d", "link", "show", "dev", ifname))[0]
    facts = {k: out.get(k) for k in LINK_FACTS}
    facts["tun_flags"] = {k: v for k, v in out.get("linkinfo", {}).get("info_data", {}).items()
                          if k not in ("user", "group")}
    return facts


async def tunnels_of(ns: str, prefix: str) -> list[str]:
    links = json.loads(await _sh("ip", "-n", ns, "-j", "link", "show"))
    return sorted(x["ifname"] for x in links if x["ifname"].startswith(prefix))


def wg_go_pids(ifnames: list[str]) -> list[int]:
    """The wireguard-go processes serving ``ifnames`` (this lab's own, by their argv)."""
    want = {("wireguard-go", "-f", name) for name in ifnames}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = tuple((proc / "cmdline").read_bytes().decode().split("\0")[:-1])
        except OSError:
            continue
        if argv[-3:] in want and Path(argv[0]).name.endswith("wireguard-go"):
            pids.append(int(proc.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` so far (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def _progress(what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


async def rotation_gap(lab: Lab, tmp: Path) -> dict[str, Any]:
    _progress("rotation")
    async with overlay(lab, tmp / "rot", commit_delay=2.0) as (ctl, meshes):
        await ping(lab.nodes["a"].ns, lab.nodes["b"].overlay, count=3, interval=0.1)
        stream = asyncio.create_task(ping(lab.nodes["a"].ns, lab.nodes["b"].overlay,
                                          count=60, interval=0.1, deadline=20))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        new = await meshes["b"].rotate_key()
        for _ in range(200):
            if ctl.members["b"].public_key == new and not ctl.members["b"].next_public_key:
                break
            await asyncio.sleep(0.05)
        committed = time.monotonic() - t0
        sent, received, _ = await stream
    lost = sent - received  # ping -c 60 -w 20 sends until 60 are answered
    return {"rotation_lost_pings": lost, "rotation_gap_s": round(lost * 0.1, 2),
            "rotation_commit_s": round(committed, 2)}


async def main(seconds: float, runs: int) -> dict[str, Any]:
    lab = Lab(prefix=f"nb{uuid.uuid4().hex[:4]}")
    out: dict[str, Any] = {"bench": "mesh_dataplane", "seconds": seconds, "runs": runs,
                           "probes": PROBES[0], "load1": round(os.getloadavg()[0], 2)}
    try:
        lab.start()
        lab.add_public("a", 1)
        lab.add_public("b", 2)
        with tempfile.TemporaryDirectory() as tmp:
            ours: list[float] = []
            hand: list[float] = []
            trials: list[dict[str, Any]] = []
            # Both tunnels up side by side (other ports, other prefixes), measured in
            # alternation, so that both see the same share of this shared machine.
            async with overlay(lab, Path(tmp) / "o") as _, \
                    hand_tunnel(lab, Path(tmp)) as address:
                ns_a = lab.nodes["a"].ns
                mine = await tunnels_of(ns_a, lab.ifname_prefix(lab.nodes["a"]))
                handmade = f"{lab.prefix}h{lab.nodes['a'].index}"
                if len(mine) != 1:
                    raise RuntimeError(f"expected one overlay interface in {ns_a}: {mine}")
                facts = {"ours": await link_facts(ns_a, mine[0]),
                         "hand": await link_facts(ns_a, handmade)}
                out["link_differences"] = {k: [facts["ours"][k], facts["hand"][k]]
                                           for k in facts["ours"]
                                           if facts["ours"][k] != facts["hand"][k]}
                out["mtu"] = facts["ours"]["mtu"]
                ns_b = lab.nodes["b"].ns
                mine_b = await tunnels_of(ns_b, lab.ifname_prefix(lab.nodes["b"]))
                pids = {"ours": wg_go_pids([mine[0], *mine_b]),
                        "hand": wg_go_pids([handmade, f"{lab.prefix}h{lab.nodes['b'].index}"])}
                if any(len(v) != 2 for v in pids.values()):
                    raise RuntimeError(f"expected two wireguard-go per tunnel: {pids}")
                per_cpu: dict[str, list[float]] = {"ours": [], "hand": []}
                for target, rtts in ((lab.nodes["b"].overlay, "rtt_overlay_ms"),
                                     (address, "rtt_hand_ms")):
                    _, _, text = await ping(lab.nodes["a"].ns, target, count=20,
                                            interval=0.05)
                    out[rtts] = rtt_avg_ms(text)
                for i in range(runs):
                    pair = [("ours", lab.nodes["b"].overlay), ("hand", address)]
                    for kind, target in pair if i % 2 == 0 else reversed(pair):
                        _progress(f"iperf3 {kind} run {i}")
                        load = round(os.getloadavg()[0], 2)
                        cpu0 = cpu_seconds(pids[kind])
                        gbps = await iperf(lab, "b", "a", target, seconds)
                        cpu = cpu_seconds(pids[kind]) - cpu0
                        (ours if kind == "ours" else hand).append(gbps)
                        # Gbit per CPU-second of the tunnel's two wireguard-go: what the
                        # tunnel costs, whatever share of the CPUs the machine left it.
                        per_cpu[kind].append(gbps * seconds / cpu if cpu > 0 else 0.0)
                        trials.append({"run": i, "tunnel": kind, "gbps": round(gbps, 3),
                                       "wg_cpu_s": round(cpu, 2),
                                       "gbit_per_wg_cpu_s": round(per_cpu[kind][-1], 3),
                                       "load1": load})
            _, _, text = await ping(lab.nodes["a"].ns, lab.nodes["b"].underlay, count=20,
                                    interval=0.05)
            out["rtt_underlay_ms"] = rtt_avg_ms(text)
            out["overlay_gbps"] = [round(x, 3) for x in ours]
            out["hand_wg_gbps"] = [round(x, 3) for x in hand]
            out["ratio_per_run"] = [round(o / h, 3) for o, h in zip(ours, hand, strict=True)]
            out["ratio_median"] = round(statistics.median(out["ratio_per_run"]), 3)
            out["ratio_of_medians"] = round(statistics.median(ours) / statistics.median(hand), 3)
            out["trials"] = trials
            # The same comparison per CPU-second (less at the mercy of the machine's load;
            # the wireguard-go CPU covers the whole iperf3 run, its left-out first second
            # too, for both alike).
            out["cpu_efficiency_ratio_of_medians"] = round(
                statistics.median(per_cpu["ours"]) / statistics.median(per_cpu["hand"]), 3)
            out.update(await rotation_gap(lab, Path(tmp)))
    finally:
        lab.stop()
    return out


async def _run(seconds: float, runs: int) -> dict[str, Any]:
    """main(), cancelled (so the lab is torn down) on SIGTERM / SIGINT or after 10 min."""
    task = asyncio.ensure_future(main(seconds, runs))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await asyncio.wait_for(task, 600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=6,
                        help="pairs of trials (ours and by hand, back to back, A B B A ...)")
    parser.add_argument("--no-probes", action="store_true")
    args = parser.parse_args()
    PROBES[0] = not args.no_probes
    print(json.dumps(asyncio.run(_run(args.seconds, args.runs))))
