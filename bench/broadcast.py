"""Broadcast benchmark: ping N real agents and gather every reply; baseline raw NATS.

Agents run the real agent runtime (verify signature, TTL, replay cache, selector, executor),
many per process, each with its own NATS connection and its own nkey identity, against the
controller's embedded nats-server. The baseline uses the same server, the same N
identities and connections, and responders that answer with no work on the same subjects
(a broadcast out, each answer on the node's own results subject).

    python bench/broadcast.py --n 1000 --n 5000 [--rounds 20]

Prints one JSON line per N: {"bench": "broadcast", "n", "p50_ms", "p99_ms",
"baseline_p50_ms", "ratio", ...}. ``tokens_s``: making the N join tokens; ``enroll_s``:
from starting the agent processes until every agent is enrolled, connected and
subscribed; ``enroll_cpu_s``: the CPU seconds each party spent in that time (on a shared
machine a steadier figure than the wall time): the controller, nats-server and the agent
processes (their whole life until ready, imports included). ``BENCH_PROFILE=PATH``
profiles each agent process's start (until its agents are ready) into ``PATH.<part>``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("barista.bench")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of this process (all its threads), or of ``pid``."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def filesystem_of(path: Path) -> str:
    """The type of the file system ``path`` is on (/proc/mounts: its longest mount point)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) \
                and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- worker processes -----------------------------------------------------------------


def unfreeze(args: argparse.Namespace) -> None:
    """Give the collector back everything (see --no-gc-freeze), with one full collection
    now, during the warm-up round: the broadcast rounds then run with the collector in
    the state it would have reached on its own, not with a full collection pending."""
    if args.gc_freeze:
        gc.unfreeze()
        gc.collect()


async def worker_agents(args: argparse.Namespace) -> None:
    from agent.config import AgentConfig
    from agent.runtime import Agent

    tokens = json.loads(Path(args.tokens).read_text())[args.part :: args.parts]
    agents: list[Agent] = []
    sem = asyncio.Semaphore(args.starting)

    async def start(i: int, token: str) -> None:
        cfg = AgentConfig(nats_urls=[args.nats_url], token=token,
                          state_dir=Path(args.state) / f"a{args.part}-{i}",
                          hostname=f"bench-{args.part}-{i}",
                          metrics_interval=3600.0, buffer_batches=4,
                          mesh_enabled=args.mesh)
        agent = Agent(config=cfg, collectors=[])
        async with sem:
            await agent.start()
        agents.append(agent)
        if args.gc_freeze:
            gc.freeze()

    profile = os.environ.get("BENCH_PROFILE")  # where the agents' start goes
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    await asyncio.gather(*(start(i, t) for i, t in enumerate(tokens)))
    if profile:
        prof.disable()
        prof.dump_stats(f"{profile}.{args.part}")
    print("READY", len(agents), round(cpu_seconds(), 2), flush=True)
    unfreeze(args)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


async def worker_raw(args: argparse.Namespace) -> None:
    import nats

    from agent.connection import flush_all, nkey_jwt_auth
    from agent.identity import EnrollState, Identity

    conns = []
    sem = asyncio.Semaphore(64)
    subject = "barista.cmd.all"

    async def start(state_dir: Path) -> None:
        st = EnrollState.load(state_dir / "state.json")
        assert st is not None
        async with sem:
            if st.nats_jwt:  # operator mode: the node's JWT and its nkey
                ident = Identity(state_dir / "identity.nk")
                auth = nkey_jwt_auth(lambda: st.nats_jwt, ident.sign)
            else:
                auth = {"nkeys_seed": str(state_dir / "identity.nk")}
            nc = await nats.connect(args.nats_url, **auth,
                                    inbox_prefix=st.inbox_prefix.encode())

        results = f"barista.node.{st.node_id}.results"

        async def respond(msg: Msg) -> None:  # no work: the floor NATS itself sets
            await nc.publish(results, b"")

        await nc.subscribe(subject, cb=respond)
        # Subscribed before READY, as an agent's command subscriptions are (one nats-py
        # flush can come back before the server has the SUB: agent.connection.flush_all).
        await flush_all(nc, 60)
        conns.append(nc)
        if args.gc_freeze:
            gc.freeze()

    dirs = sorted(p for p in Path(args.state).iterdir() if p.is_dir())[args.part :: args.parts]
    await asyncio.gather(*(start(d) for d in dirs))
    print("READY", len(conns), flush=True)
    unfreeze(args)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(nc.close() for nc in conns), return_exceptions=True)


def spawn(mode: str, nats_url: str, state: Path, tokens: Path | None, part: int = 0,
          parts: int = 1, *, gc_freeze: bool = True, mesh: bool = True, starting: int = 256
          ) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", mode, "--nats-url", nats_url,
           "--state", str(state), "--part", str(part), "--parts", str(parts),
           "--starting", str(starting)]
    if not gc_freeze:
        cmd.append("--no-gc-freeze")
    if not mesh:
        cmd.append("--no-mesh")
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def wait_ready_all(procs: list[subprocess.Popen[str]], n: int, timeout: float) -> float:
    """Wait until every worker is ready; the CPU seconds they report having used."""
    return sum(wait_ready(proc, len(range(i, n, len(procs))), timeout)
               for i, proc in enumerate(procs))


def wait_ready(proc: subprocess.Popen[str], n: int, timeout: float) -> float:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {proc.poll()}")
        if line.startswith("READY"):
            _, got, *cpu = line.split()
            if int(got) != n:
                raise RuntimeError(f"worker started {got} of {n}")
            return float(cpu[0]) if cpu else 0.0
    raise RuntimeError("worker not ready in time")


def stop(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- the measurement ------------------------------------------------------------------


async def measure(n: int, rounds: int, base: Path, procs: int, *, gc_freeze: bool = True,
                  mesh: bool = True, agent_state: Path | None = None,
                  starting: int = 256) -> dict[str, object]:
    import nats

    from controller.config import ControllerConfig
    from controller.jobs.engine import JobSpec
    from controller.service import Controller

    # Plain NATS: the baseline and the probes below connect raw, like the agents' peers.
    cfg = ControllerConfig(data_dir=base / "controller", api_port=0, stale_after=600.0,
                           offline_after=1200.0, tls=False)
    result: dict[str, object] = {"bench": "broadcast", "n": n, "agent_processes": procs,
                                 "starting": starting, "gc_freeze": gc_freeze, "mesh": mesh}
    async with Controller(cfg) as c:
        t0 = time.monotonic()
        tokens: list[str] = []
        for i in range(0, n, 64):  # 64 at a time, as concurrent API calls would make them
            made = await asyncio.gather(*(c.tokens.create(ttl=3600)
                                          for _ in range(min(64, n - i))))
            tokens += [c.tokens.join_text(t.token) for t in made]
        tok_file = base / "tokens.json"
        tok_file.write_text(json.dumps(tokens))
        result["tokens_s"] = round(time.monotonic() - t0, 1)
        state = (agent_state or base) / "agents"
        result["agent_state_fs"] = filesystem_of(state.parent)
        nats_pid = c.natsd.pid if c.natsd is not None else None
        t0, cpu0 = time.monotonic(), cpu_seconds()
        nats_cpu0 = cpu_seconds(nats_pid) if nats_pid else 0.0
        workers = [spawn("agents", c.nats_url, state, tok_file, i, procs, gc_freeze=gc_freeze,
                         mesh=mesh, starting=starting) for i in range(procs)]
        try:
            agents_cpu = await asyncio.to_thread(wait_ready_all, workers, n, 900)
            result["enroll_s"] = round(time.monotonic() - t0, 1)
            result["enroll_cpu_s"] = {
                "controller": round(cpu_seconds() - cpu0, 1),
                "nats": round(cpu_seconds(nats_pid) - nats_cpu0, 1) if nats_pid else None,
                "agents": round(agents_cpu, 1),
            }
            while len(c.fleet.select()) < n:  # noqa: ASYNC110 - inventory has no event
                await asyncio.sleep(0.1)
            await c.jobs.run(JobSpec(action="ping", timeout=30))  # warm-up
            ours = []
            for _ in range(rounds):
                t = time.perf_counter()
                job = await c.jobs.run(JobSpec(action="ping", timeout=30))
                ours.append((time.perf_counter() - t) * 1000)
                if job.counts.get("ok") != n:
                    raise RuntimeError(f"round incomplete: {job.counts}")
        finally:
            for w in workers:
                await asyncio.to_thread(stop, w)
        # Baseline: raw scatter-gather, same server, same identities and connections.
        workers = [spawn("raw", c.nats_url, state, None, i, procs, gc_freeze=gc_freeze)
                   for i in range(procs)]
        try:
            await asyncio.to_thread(wait_ready_all, workers, n, 600)
            nc = await nats.connect(c.nats_url, **c.natsd.controller_credentials())  # type: ignore[union-attr]
            base_ms = []
            try:
                for r in range(rounds + 1):
                    done = asyncio.Event()
                    got = [0]

                    async def on_reply(
                        msg: Msg, got: list[int] = got, done: asyncio.Event = done
                    ) -> None:
                        got[0] += 1
                        if got[0] == n:
                            done.set()

                    # Gathered the way jobs gather: every node answers on its own subject.
                    sub = await nc.subscribe("barista.node.*.results", cb=on_reply,
                                             pending_msgs_limit=1_000_000)
                    await nc.flush()
                    t = time.perf_counter()
                    await nc.publish("barista.cmd.all", b"ping")
                    await asyncio.wait_for(done.wait(), 60)
                    if r:  # round 0 warms up
                        base_ms.append((time.perf_counter() - t) * 1000)
                    await sub.unsubscribe()
            finally:
                await nc.close()
        finally:
            for w in workers:
                await asyncio.to_thread(stop, w)
    p50, p99 = statistics.median(ours), percentile(ours, 0.99)
    b50 = statistics.median(base_ms)
    result.update({
        "rounds": rounds,
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "baseline_p50_ms": round(b50, 1),
        "baseline_p99_ms": round(percentile(base_ms, 0.99), 1),
        "ratio": round(p50 / b50, 2),
        "replies_per_s": round(n / (p50 / 1000)),
    })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, action="append", help="agents (repeat; default 1000, 5000)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--worker", choices=["agents", "raw"])
    p.add_argument("--nats-url")
    p.add_argument("--state")
    p.add_argument("--tokens")
    p.add_argument("--procs", type=int, default=2,
                   help="processes hosting the agents (and the raw responders)")
    # One process holds thousands of agents, which no real agent process does: each of
    # Python's full collections walks all of them (measured: 1.1 ms of CPU per agent with
    # 1,500 agents in a process, growing with the number). While they start, the objects of
    # started agents are frozen (gc.freeze) so that collections see only what is new, as in
    # a lone agent; the broadcast rounds run with the collector untouched.
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="leave the agent processes' garbage collector as it is")
    # Agents join the overlay's control plane (a MeshJoin each, a KV write at the
    # controller) as real ones do; --no-mesh measures enrollment and broadcast without it.
    p.add_argument("--no-mesh", dest="mesh", action="store_false",
                   help="agents without the overlay (mesh_enabled = false)")
    p.add_argument("--agent-state", metavar="DIR",
                   help="where the agents' state dirs go (default: the temp dir, with the "
                        "controller's). Every agent fsyncs its identity key and state "
                        "(~0.25 ms of CPU each on ext4 here, and the journal's): 5,000 "
                        "machines' disks on one; /dev/shm shows what that costs")
    # A fleet's machines do not wait for each other: thousands enroll at once. One Python
    # process standing in for thousands starts this many at a time. Measured at 5,000 on
    # this 2-core machine, interleaved, the same code: 64 at a time 20.8, 20.6, 18.4 s;
    # 256: 25.5, 17.3, 17.8 s. With 1,000 the median nats-py connect took 2.5 s, past its
    # 2 s connect timeout.
    p.add_argument("--starting", type=int, default=256, metavar="N",
                   help="agents each worker process starts at once (default 256)")
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    args = p.parse_args()
    raise_nofile()
    logging.basicConfig(level=logging.ERROR)
    if args.worker == "agents":
        asyncio.run(worker_agents(args))
        return
    if args.worker == "raw":
        asyncio.run(worker_raw(args))
        return
    for n in args.n or [1000, 5000]:
        with tempfile.TemporaryDirectory(prefix="barista-bench-") as tmp:
            with tempfile.TemporaryDirectory(prefix="barista-bench-agents-",
                                             dir=args.agent_state) as agent_tmp:
                result = asyncio.run(measure(n, args.rounds, Path(tmp), args.procs,
                                             gc_freeze=args.gc_freeze, mesh=args.mesh,
                                             agent_state=Path(agent_tmp),
                                             starting=args.starting))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
