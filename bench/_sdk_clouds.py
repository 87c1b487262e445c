"""``bench/provision.py --clouds sdk``: N nodes over aws, gcp and azure through their real
SDKs (boto3 against moto, google-cloud-compute against FakeGce, azure-mgmt-* against
FakeArm over HTTPS, all from ``tests/fakes/clouds.py``, importable because the bench puts
the repo root on sys.path) and one ``sim``, every VM booting a real agent.

The clouds answer with the latency of the real ones (``CloudTimes``: every request
``--latency`` s; GCE operations DONE after ``--gcp-op`` s; ARM operations after
``--azure-lro`` s with ``Retry-After: --retry-after``; an ARM VM create ends when the VM
booted) and the SDK providers run with their documented API limits (``API_LIMITS`` in
each provider module). The figures are the sim run's; the rate-limit floor of a cloud is
the requests it received up to its last VM create beyond its bucket's burst, at its rate.
``first_create_s`` per cloud is when its first VM create arrived (what its network,
subnet and firewall took: not in the floor), ``last_ready_s`` when its last node was
Ready. ``--agents``/``--procs`` do not apply: the agents run in this process.

``ratio`` (unchanged) leaves out the network setup a cloud needs before its first VM
create, which no engine can skip. ``ratio_ideal`` puts it in, per node: ideal_i = (the
serial chain of requests and operations the node's cloud requires before that create, as
the fakes drew them in this run: ``Clouds.prerequisites``, ``prerequisites_s``; 0 for the
sim) + that cloud's rate-limit floor + the node's own boot time; ``ideal_s`` = max_i
ideal_i, ``ratio_ideal`` = wall / ``ideal_s``. The chain is a lower bound: it is read from
the fakes' records, not the engine's, counts no poll interval (an operation is seen the
moment it is done, Retry-After notwithstanding), no lookup and no engine time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

NODES_BY = ("aws", "gcp", "azure", "sim")
GROUPS = {"aws": ("us-east-1", "t3.micro"), "gcp": ("us-central1", "e2-small"),
          "azure": ("eastus", "Standard_B1s"), "sim": ("east-1", "small")}


class ReadyTimes:
    """Seconds from now until each node became Ready, from the engine's progress events;
    ``done`` is set once ``n`` nodes are. ``close()`` unsubscribes."""

    def __init__(self, engine: Any, n: int) -> None:
        self.t0 = time.monotonic()
        self.at: dict[str, float] = {}
        self.done = asyncio.Event()
        self._n = n
        self.close = engine.subscribe(self._on_progress)

    def _on_progress(self, ev: Any) -> None:
        if ev.node and ev.phase == "ready" and ev.node not in self.at:
            self.at[ev.node] = time.monotonic() - self.t0
            if len(self.at) == self._n:
                self.done.set()


def floor_of(limits: Any, calls: int) -> float:
    rate, burst = (limits.rate, limits.burst) if limits.rate > 0 else (
        limits.region_rate, limits.region_burst)
    return max(0, calls - burst) / rate if rate > 0 else 0.0


async def measure_sdk(n: int, args: argparse.Namespace, base: Path, render_of: Any
                      ) -> dict[str, Any]:
    from controller.config import ControllerConfig
    from controller.provision.contract import Instance
    from controller.provision.engine import EngineSettings, provision_engine
    from controller.provision.limits import ApiLimits
    from controller.provision.providers.sim import SimProvider, SimSettings
    from controller.provision.spec import spec_from_obj
    from controller.service import Controller
    from tests.fakes.clouds import AgentBooter, CloudTimes, sdk_clouds

    times = CloudTimes(api=(args.latency[0], args.latency[1]),
                       gcp_op=(args.gcp_op[0], args.gcp_op[1]),
                       azure_lro=(args.azure_lro[0], args.azure_lro[1]),
                       azure_retry_after=args.retry_after)
    result: dict[str, Any] = {
        "bench": "provision", "clouds": "sdk", "n": n, "providers": list(NODES_BY),
        "agents": "real", "latency_ms": [int(x * 1000) for x in args.latency],
        "gcp_op_s": args.gcp_op, "azure_lro_s": args.azure_lro,
        "retry_after_s": args.retry_after, "boot_s": [args.boot, args.jitter],
        "sim_rate_per_s": args.rate, "batch": args.batch}
    cfg = ControllerConfig(data_dir=base / "controller", api_port=0, tls=False,
                           heartbeat_interval=10.0, stale_after=60.0, offline_after=120.0)
    per = [n // len(NODES_BY) + (1 if i < n % len(NODES_BY) else 0)
           for i in range(len(NODES_BY))]
    # The SDKs' first import takes seconds of CPU (google-cloud-compute, azure-mgmt-*):
    # done before the clock starts, as in a controller that has been up for a while.
    t_import = time.monotonic()
    import boto3  # noqa: F401
    import google.cloud.compute_v1  # noqa: F401
    from azure.mgmt.compute import ComputeManagementClient  # noqa: F401
    from azure.mgmt.network import NetworkManagementClient  # noqa: F401
    from azure.mgmt.resource.resources import ResourceManagementClient  # noqa: F401
    result["sdk_import_s"] = round(time.monotonic() - t_import, 2)
    async with Controller(cfg) as c:
        booter = AgentBooter(asyncio.get_running_loop(), base / "vms", boot=args.boot,
                             jitter=args.jitter)
        sim_agents: list[Any] = []

        async def boot_sim(config: Any, inst: Instance) -> None:
            from agent.config import AgentConfig
            from agent.runtime import Agent

            agent = Agent(config=AgentConfig(
                nats_urls=config.nats_urls, token=config.join_token,
                state_dir=base / "vms" / inst.id, hostname=config.hostname,
                collectors=[], metrics_interval=3600.0, buffer_batches=4))
            await agent.start()
            sim_agents.append(agent)

        with sdk_clouds(base, times=times, on_create=booter) as clouds:
            sim = SimProvider(SimSettings(
                latency_min=args.latency[0], latency_max=args.latency[1],
                boot_time=args.boot, boot_jitter=args.jitter, rate=args.rate,
                burst=int(args.rate), max_batch=args.batch, seed=11), name="sim",
                boot=boot_sim)
            providers: dict[str, Any] = {**clouds.providers(azure_poll=args.azure_poll),
                                         "sim": sim}
            limits = {"sim": ApiLimits(rate=args.rate, burst=int(args.rate), concurrency=8,
                                       batch=args.batch)}
            used = {p: limits.get(p) or providers[p].api_limits for p in NODES_BY}
            result["limits"] = {p: [lim.rate, lim.burst, lim.region_rate, lim.region_burst,
                                    lim.concurrency] for p, lim in used.items()}
            spec = spec_from_obj({"name": "bench", "groups": [
                {"name": f"g{p}", "provider": p, "regions": [GROUPS[p][0]],
                 "size": GROUPS[p][1], "count": per[i]} for i, p in enumerate(NODES_BY)]},
                catalogs={p: prov.catalog() for p, prov in providers.items()})
            try:
                async with provision_engine(js=c.js, nodes=c.nodes, providers=providers,
                                            renderer=render_of(c), installation="bench",
                                            limits=limits, settings=EngineSettings(),
                                            forget_node=c.delete_node) as engine:
                    ready = ReadyTimes(engine, n)
                    ready_at, t0 = ready.at, ready.t0
                    await engine.create(spec)
                    try:
                        await asyncio.wait_for(ready.done.wait(), args.timeout)
                    except TimeoutError:
                        view = engine.get("bench")
                        raise TimeoutError(f"not Ready in {args.timeout}s: "
                                           f"{view.summary if view else '?'}") from None
                    wall = time.monotonic() - t0
                    ready.close()
                    calls = clouds.calls()
                    calls["sim"] = Counter(sim.stats.calls)
                    upto = clouds.before_last_create()
                    upto["sim"] = sum(sim.stats.calls.values())  # as the sim run counts
                    boots = dict(clouds.boots)
                    boots.update({i.name: float(i.extra["boot_s"]) for i in sim.live()})
                    slowest = max(boots.values())
                    floors = {p: floor_of(used[p], upto[p]) for p in NODES_BY}
                    total = sum(sum(v.values()) for v in calls.values())
                    view = engine.get("bench")
                    order = sorted(ready_at.values())
                    # Where each cloud's time went: until its first VM create (network,
                    # subnet, firewall...), and until its last node was Ready.
                    t0_wall = time.time() - (time.monotonic() - t0)
                    result["first_create_s"] = {
                        p: round(min(v - t0_wall for k, v in booter.created_at.items()
                                     if k.startswith(f"bench-g{p}-")), 2)
                        for p in NODES_BY if p != "sim"}
                    result["last_ready_s"] = {
                        p: round(max(v for k, v in ready_at.items()
                                     if k.startswith(f"bench-g{p}-")), 2) for p in NODES_BY}
                    # The per-node ideal: each node's cloud's required network chain as
                    # the fakes drew it (Clouds.prerequisites) + its cloud's rate-limit
                    # floor + the node's own boot time.
                    pre = clouds.prerequisites("bench")
                    chain = {p: pre[p]["chain_s"] for p in pre}
                    chain["sim"] = 0.0
                    cloud_of = {f"bench-g{p}-{j}": p for i, p in enumerate(NODES_BY)
                                for j in range(per[i])}
                    ideal = {k: chain[p] + floors[p] + boots[k] for k, p in cloud_of.items()}
                    worst = max(ideal, key=lambda k: ideal[k])
                    result["prerequisites_s"] = {p: {k: round(v, 2) for k, v in links.items()}
                                                 for p, links in pre.items()}
                    result["ideal_by_provider_s"] = {
                        p: round(max(v for k, v in ideal.items() if cloud_of[k] == p), 2)
                        for p in NODES_BY}
                    result.update({
                        "wall_s": round(wall, 2), "summary": view.summary if view else "",
                        "slowest_boot_s": round(slowest, 2),
                        "floor_s": round(max(floors.values()), 2),
                        "ratio": round(wall / (slowest + max(floors.values())), 3),
                        "ideal_s": round(ideal[worst], 2), "ideal_node": worst,
                        "ratio_ideal": round(wall / ideal[worst], 3),
                        "calls": total, "calls_per_node": round(total / n, 2),
                        "calls_per_node_by_provider": {
                            p: round(sum(calls[p].values()) / per[i], 2)
                            for i, p in enumerate(NODES_BY)},
                        "calls_by_api": {p: dict(sorted(calls[p].items()))
                                         for p in NODES_BY},
                        "calls_before_last_create": upto,
                        "throttled_sim": sim.stats.throttled,
                        "first_ready_s": round(order[0], 2),
                        "p50_ready_s": round(order[len(order) // 2], 2),
                    })
                    # Tear down (not timed), as a user would: the agents stop with the VMs.
                    t1 = time.monotonic()
                    await booter.stop()
                    await asyncio.gather(*(a.stop() for a in sim_agents),
                                         return_exceptions=True)
                    await engine.delete("bench")
                    await engine.wait_idle("bench")
                    result["delete_s"] = round(time.monotonic() - t1, 2)
                    left = clouds.leftovers("bench")
                    left["sim"] = [i.id for i in sim.live()]
                    result["left_after_delete"] = {p: len(v) for p, v in left.items()}
            finally:
                await sim.aclose()
                await booter.stop()
                await asyncio.gather(*(a.stop() for a in sim_agents), return_exceptions=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clouds", choices=["sim", "sdk"], default="sim",
                   help="sim: 4 sim clouds; sdk: aws (moto) + gcp + azure (fakes) + sim")
    p.add_argument("--gcp-op", type=float, nargs=2, default=[2.0, 6.0],
                   help="sdk: seconds until a GCE operation is DONE (uniform)")
    p.add_argument("--azure-lro", type=float, nargs=2, default=[2.0, 6.0],
                   help="sdk: seconds until an ARM operation (not a VM create) is done")
    p.add_argument("--retry-after", type=int, default=2,
                   help="sdk: the Retry-After ARM sends on operations in progress")
    p.add_argument("--azure-poll", type=float, default=2.0,
                   help="sdk: seconds between lists of a resource group while VMs are made")
