"""Provisioning benchmark: N nodes over 4 sim clouds, until every node is Ready.

Each sim has an API latency of 100-300 ms, boots a VM in 20 +- 5 s and allows 10 calls/s
(a token bucket, throttling beyond it); the engine's own limits are set to the same.
Ready means what it means in production: the VM runs *and* its agent enrolled and is
online. With ``--agents real`` every VM boots a real agent runtime (in this process, or in
``--procs`` worker processes) that enrolls with its node's join token over the
controller's NATS. ``--agents none`` boots no agent: nodes can then never be Ready, so it
reports only the time until every VM *runs* (``running_s``), not a Ready ratio.

    python bench/provision.py --n 100 --n 1000 [--agents real|none] [--procs 2]
    python bench/provision.py --clouds sdk --n 100   # aws, gcp, azure through their SDKs

``--clouds sdk`` runs aws (moto), gcp and azure (the REST fakes) and one sim through the
real SDK code paths, with real-cloud API latency; see bench/_sdk_clouds.py.

Prints one JSON line per N: {"bench": "provision", "n", "wall_s", "slowest_boot_s",
"floor_s", "ratio", "calls_per_node", ...}. ratio = wall time until all Ready / (the
slowest node's own boot time + the rate-limit floor). ``--clouds sdk`` adds
"ratio_ideal" = wall time / max over nodes of (the network setup the node's cloud
requires before that node's create, as its fake drew it + the floor + the node's own boot
time); bench/_sdk_clouds.py defines it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sdk_clouds import ReadyTimes, add_arguments, measure_sdk  # the file next to this one

log = logging.getLogger("barista.bench.provision")

PROVIDERS = ["sim-a", "sim-b", "sim-c", "sim-d"]
REGIONS = {"sim-a": ["east-1", "west-1"], "sim-b": ["eu-1", "east-1"],
           "sim-c": ["west-1", "eu-1"], "sim-d": ["ap-1", "east-1"]}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- agent worker processes (--procs): boot configs in on stdin, agents started ----------


async def worker(args: argparse.Namespace) -> None:
    import msgspec

    from agent.config import AgentConfig
    from agent.runtime import Agent
    from controller.provision.bootstrap import BootConfig

    agents: list[Agent] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    decoder = msgspec.json.Decoder(BootConfig)
    tasks: set[asyncio.Task[None]] = set()

    async def start(cfg: BootConfig, vm_id: str) -> None:
        agent = Agent(config=AgentConfig(
            nats_urls=cfg.nats_urls, token=cfg.join_token,
            state_dir=Path(args.state) / vm_id, hostname=cfg.hostname or cfg.node_name,
            collectors=[], metrics_interval=3600.0, buffer_batches=4))
        await agent.start()
        agents.append(agent)

    while True:
        line = await reader.readline()
        if not line or line.strip() == b"STOP":
            break
        vm_id, _, body = line.decode().strip().partition(" ")
        task = asyncio.create_task(start(decoder.decode(body.encode()), vm_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


def spawn_worker(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--worker", "--state", str(state)],
                            stdin=subprocess.PIPE)


# -- the measurement ------------------------------------------------------------------


def renderer(c: Any) -> Any:
    """The engine's user-data renderer on controller ``c``: a join token per node."""
    from controller.provision.bootstrap import BootConfig, render_user_data
    from controller.provision.model import GroupSpec, InfraSpec

    async def render(infra: InfraSpec, group: GroupSpec, node: str, labels: Any,
                     network: Any) -> str:
        issued = await c.tokens.create(labels=dict(labels), ttl=3600)
        return render_user_data(BootConfig(
            join_token=c.tokens.join_text(issued.token), node_name=node,
            nats_urls=[c.agent_nats_url], controller_keys=[],
            installer_url="http://127.0.0.1:1/install.sh", hostname=node))

    return render


async def measure(n: int, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    import msgspec

    from agent.config import AgentConfig
    from agent.runtime import Agent
    from controller.config import ControllerConfig
    from controller.provision.bootstrap import BootConfig
    from controller.provision.contract import Instance, InstanceState
    from controller.provision.engine import EngineSettings, provision_engine
    from controller.provision.limits import ApiLimits
    from controller.provision.providers.sim import SimProvider, SimSettings
    from controller.provision.spec import spec_from_obj
    from controller.service import Controller

    cfg = ControllerConfig(data_dir=base / "controller", api_port=0, tls=False,
                           heartbeat_interval=10.0, stale_after=60.0, offline_after=120.0)
    result: dict[str, Any] = {"bench": "provision", "n": n, "providers": len(PROVIDERS),
                              "agents": args.agents, "procs": args.procs if
                              args.agents == "real" else 0,
                              "latency_ms": [int(args.latency[0] * 1000),
                                             int(args.latency[1] * 1000)],
                              "boot_s": [args.boot, args.jitter], "rate_per_s": args.rate,
                              "batch": args.batch}
    agents: list[Agent] = []
    workers: list[subprocess.Popen[bytes]] = []
    booted = [0]
    encoder = msgspec.json.Encoder()

    async with Controller(cfg) as c:
        render = renderer(c)

        async def boot_here(config: BootConfig, inst: Instance) -> None:
            agent = Agent(config=AgentConfig(
                nats_urls=config.nats_urls, token=config.join_token,
                state_dir=base / "vms" / inst.id, hostname=config.hostname,
                collectors=[], metrics_interval=3600.0, buffer_batches=4))
            await agent.start()
            agents.append(agent)
            booted[0] += 1

        async def boot_there(config: BootConfig, inst: Instance) -> None:
            w = workers[booted[0] % len(workers)]
            booted[0] += 1
            assert w.stdin is not None
            w.stdin.write(inst.id.encode() + b" " + encoder.encode(config) + b"\n")
            w.stdin.flush()

        boot = None
        if args.agents == "real":
            if args.procs:
                workers += [spawn_worker(base / "vms") for _ in range(args.procs)]
                boot = boot_there
            else:
                boot = boot_here
        settings = SimSettings(latency_min=args.latency[0], latency_max=args.latency[1],
                               boot_time=args.boot, boot_jitter=args.jitter, rate=args.rate,
                               burst=int(args.rate), max_batch=args.batch, seed=11)
        sims = {name: SimProvider(settings, name=name, boot=boot)
                for name in PROVIDERS}
        limits = {name: ApiLimits(rate=args.rate, burst=int(args.rate), concurrency=8,
                                  batch=args.batch) for name in PROVIDERS}
        per = [n // len(PROVIDERS) + (1 if i < n % len(PROVIDERS) else 0)
               for i in range(len(PROVIDERS))]
        spec = spec_from_obj({"name": "bench", "groups": [
            {"name": f"g{i}", "provider": p, "regions": REGIONS[p], "size": "small",
             "count": per[i]} for i, p in enumerate(PROVIDERS)]},
            catalogs={p: s.catalog() for p, s in sims.items()})
        try:
            async with provision_engine(js=c.js, nodes=c.nodes, providers=sims,
                                        renderer=render, installation="bench",
                                        limits=limits, settings=EngineSettings(),
                                        forget_node=c.delete_node) as engine:
                ready = ReadyTimes(engine, n)
                ready_at, t0 = ready.at, ready.t0
                await engine.create(spec)
                if args.agents == "real":
                    await asyncio.wait_for(ready.done.wait(), args.timeout)
                    wall = time.monotonic() - t0
                    result["wall_s"] = round(wall, 2)
                else:
                    while sum(1 for s in sims.values() for i in s.live()
                              if i.state is InstanceState.RUNNING) < n:
                        if time.monotonic() - t0 > args.timeout:
                            raise TimeoutError("VMs not running in time")
                        await asyncio.sleep(0.05)
                    wall = time.monotonic() - t0
                    result["running_s"] = round(wall, 2)
                ready.close()
                view = engine.get("bench")
                assert view is not None
                result["summary"] = view.summary
                calls = sum(s.stats.total for s in sims.values())
                boots = [float(i.extra["boot_s"]) for s in sims.values() for i in s.live()]
                slowest = max(boots)
                # The rate-limit floor: the calls every provider must make before its last
                # VM can be asked for (one query per region, the network, the batches),
                # beyond what the bucket's burst absorbs, at the allowed rate.
                floor = 0.0
                for i, p in enumerate(PROVIDERS):
                    needed = len(REGIONS[p]) + 1 + math.ceil(per[i] / args.batch)
                    floor = max(floor, max(0, needed - int(args.rate)) / args.rate)
                result.update({
                    "slowest_boot_s": round(slowest, 2),
                    "floor_s": round(floor, 2),
                    "ratio": round(wall / (slowest + floor), 3),
                    "calls": calls,
                    "calls_per_node": round(calls / n, 2),
                    "calls_by_op": dict(sum((s.stats.calls for s in sims.values()),
                                            start=__import__("collections").Counter())),
                    "throttled": sum(s.stats.throttled for s in sims.values()),
                    "max_calls_in_1s": max(s.stats.max_in_window(1.0) for s in sims.values()),
                    "max_concurrent": max(s.stats.max_concurrent for s in sims.values()),
                })
                if ready_at:
                    # Where the time after each VM's boot went: to its agent's enrollment
                    # (agent start + the controller's enroll handling), then to the
                    # engine seeing it Ready (node record watch + a provider query).
                    offset = time.time() - time.monotonic()
                    booted_at = {i.name: i.launched_at + float(i.extra["boot_s"])
                                 for s in sims.values() for i in s.live()}
                    enrolled = {r.infra_node: r.enrolled_at - offset for r in c.nodes
                                if r.infra == "bench"}
                    enroll_lag = sorted(enrolled[k] - booted_at[k] for k in enrolled
                                        if k in booted_at)
                    detect_lag = sorted(ready_at[k] + t0 - enrolled[k] for k in ready_at
                                        if k in enrolled)
                    for key, lags in (("enroll_lag_s", enroll_lag), ("ready_lag_s", detect_lag)):
                        if lags:
                            result[key] = {"p50": round(lags[len(lags) // 2], 2),
                                           "p99": round(lags[int(len(lags) * 0.99)], 2),
                                           "max": round(lags[-1], 2)}
                    order = sorted(ready_at.values())
                    result["first_ready_s"] = round(order[0], 2)
                    result["p50_ready_s"] = round(order[len(order) // 2], 2)
                # Tear down (not timed), as a user would.
                t1 = time.monotonic()
                for s in sims.values():  # the agents stop with their VMs
                    s.settings = msgspec.structs.replace(s.settings, latency_min=0.0,
                                                         latency_max=0.0, rate=0.0)
                await engine.delete("bench")
                await engine.wait_idle("bench")
                result["delete_s"] = round(time.monotonic() - t1, 2)
                result["left_after_delete"] = sum(len(s.live()) for s in sims.values())
        finally:
            for s in sims.values():
                await s.aclose()
            await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
            for w in workers:
                if w.stdin is not None:
                    try:
                        w.stdin.write(b"STOP\n")
                        w.stdin.close()
                    except BrokenPipeError:
                        pass
            for w in workers:
                try:
                    await asyncio.to_thread(w.wait, 60)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait(10)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, action="append", help="nodes (repeat; default 100)")
    p.add_argument("--agents", choices=["real", "none"], default="real")
    p.add_argument("--procs", type=int, default=0,
                   help="worker processes for the agents (0: in this process)")
    p.add_argument("--latency", type=float, nargs=2, default=[0.1, 0.3])
    p.add_argument("--boot", type=float, default=20.0)
    p.add_argument("--jitter", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--worker", action="store_true")
    add_arguments(p)
    p.add_argument("--state")
    args = p.parse_args()
    raise_nofile()
    logging.basicConfig(level=logging.ERROR)
    if args.worker:
        asyncio.run(worker(args))
        return
    for n in args.n or [100]:
        with tempfile.TemporaryDirectory(prefix="barista-bench-") as tmp:
            if args.clouds == "sdk":
                out = asyncio.run(measure_sdk(n, args, Path(tmp), renderer))
            else:
                out = asyncio.run(measure(n, args, Path(tmp)))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
