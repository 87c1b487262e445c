"""The lab cloud's figures (root): ping RTT per region pair against the configured one,
TCP throughput through the userspace WAN router against the plain bridge in one region
(iperf3), and VM boot times. One JSON line; everything runs inside the lab's namespaces.

    sudo python -m bench.lab [--vms 10] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controller.provision.lab import Lab, LabConfig, LinkConfig, RegionConfig
from controller.provision.lab.state import DEFAULT_LINKS, DEFAULT_REGIONS, GATEWAY

UD = "#cloud-config\nruncmd:\n  - [sh, -c, 'hostname > /etc/barista-hostname']\n"
RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


async def run_in(lab: Lab, vm: str, argv: list[str], limit: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(*lab.exec_argv(vm), *argv,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), limit)
    return out.decode()


async def booted(lab: Lab, vm: str, limit: float = 30) -> float:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        b = lab.boot_seconds(vm)
        if b is not None:
            return b
        await asyncio.sleep(0.01)
    raise TimeoutError(vm)


async def iperf(lab: Lab, server: str, client: str, ip: str, seconds: float) -> float:
    srv = await asyncio.create_subprocess_exec(
        *lab.exec_argv(server), "iperf3", "-s", "-1", "-B", ip,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            out = await run_in(lab, server, ["ss", "-ltn"])
            if ":5201" in out:
                break
            await asyncio.sleep(0.05)
        res = json.loads(await run_in(lab, client, ["iperf3", "-c", ip, "-t", str(seconds),
                                                    "-J"], limit=seconds + 30))
        return float(res["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        # The one-off server ends by itself; kill() of an ended child would reap it
        # behind asyncio's back (Popen.send_signal polls first).
        try:
            await asyncio.wait_for(srv.wait(), 10)
        except TimeoutError:
            srv.kill()
            await srv.wait()


async def main(vms: int, seconds: float) -> dict[str, object]:
    regions = (*DEFAULT_REGIONS, RegionConfig(name="t-a"), RegionConfig(name="t-b"))
    config = LabConfig(regions=regions,
                       links=(*DEFAULT_LINKS, LinkConfig(a="t-a", b="t-b", rtt_ms=0)))
    base = Path(tempfile.mkdtemp(prefix="barista-bench-lab-"))
    lab = Lab(data_dir=base / "lab", config=config)
    out: dict[str, object] = {"bench": "lab"}
    try:
        t0 = time.monotonic()
        await lab.up()
        out["lab_up_s"] = round(time.monotonic() - t0, 3)
        # One VM per default region, measured pairwise.
        ids: dict[str, str] = {}
        for r in DEFAULT_REGIONS:
            vm = await lab.create_vm(name=f"p-{r.name}", region=r.name, size="lab.small",
                                     image="ubuntu-24.04", user_data=UD, tags={})
            ids[r.name] = vm.id
        for vm_id in ids.values():
            await booted(lab, vm_id)
        rtts = []
        names = list(ids)
        for i, a in enumerate(names):
            for b in [*names[i + 1:], GATEWAY]:
                # Nothing reaches into the private site: its pings go out of the NAT.
                x, y = (b, a) if b == "lab-onprem" else (a, b)
                src = ids[x]
                dst_ip = lab.gateway_ip if y == GATEWAY else _ip(lab, ids[y])
                text = await run_in(lab, src, ["ping", "-n", "-q", "-c", "20", "-i", "0.05",
                                               dst_ip])
                m = RTT.search(text)
                rtts.append({
                    "pair": f"{a}<->{b}", "configured_ms": config.link(a, b).rtt_ms,
                    "min_ms": float(m.group(1)) if m else None,
                    "avg_ms": float(m.group(2)) if m else None,
                    "mdev_ms": float(m.group(4)) if m else None,
                })
        out["rtt"] = rtts
        # Throughput: two VMs in one region (kernel bridge) vs across the router (0 ms).
        ta = await lab.create_vm(name="t-a0", region="t-a", size="lab.small",
                                 image="ubuntu-24.04", user_data=UD, tags={})
        ta2 = await lab.create_vm(name="t-a1", region="t-a", size="lab.small",
                                  image="ubuntu-24.04", user_data=UD, tags={})
        tb = await lab.create_vm(name="t-b0", region="t-b", size="lab.small",
                                 image="ubuntu-24.04", user_data=UD, tags={})
        for v in (ta, ta2, tb):
            await booted(lab, v.id)
        bridge = [await iperf(lab, ta2.id, ta.id, ta2.private_ip, seconds) for _ in range(2)]
        router = [await iperf(lab, tb.id, ta.id, tb.private_ip, seconds) for _ in range(2)]
        out["throughput_mbit"] = {"bridge_same_region": [round(x) for x in bridge],
                                  "router_0ms": [round(x) for x in router],
                                  "ratio_router_to_bridge": round(
                                      statistics.mean(router) / statistics.mean(bridge), 4)}
        # Boot: from the create call to the end of the user-data, VMs one after another.
        created, boots = [], []
        for i in range(vms):
            t = time.monotonic()
            vm = await lab.create_vm(name=f"b-{i}", region="lab-eu", size="lab.small",
                                     image="ubuntu-24.04", user_data=UD, tags={})
            created.append(time.monotonic() - t)
            boots.append(await booted(lab, vm.id) + created[-1])
        out["boot"] = {"vms": vms, "create_call_ms_median": round(statistics.median(created)
                                                                   * 1000, 1),
                       "create_to_user_data_done_ms_median": round(
                           statistics.median(boots) * 1000, 1),
                       "max_ms": round(max(boots) * 1000, 1)}
        t = time.monotonic()
        removed = await lab.down()
        out["down_s"] = round(time.monotonic() - t, 3)
        out["down_removed"] = {k: len(v) for k, v in removed.items()}
    finally:
        await lab.down()
        shutil.rmtree(base, ignore_errors=True)
    return out


def _ip(lab: Lab, vm_id: str) -> str:
    vm = lab.vm(vm_id)
    if vm is None:
        raise SystemExit(f"VM {vm_id} vanished")
    return vm.private_ip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.vms, args.seconds))))
    sys.exit(0)
