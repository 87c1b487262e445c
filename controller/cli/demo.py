"""`barista demo`: the controller on its embedded defaults with a live fleet: as root, an
infra of three simulated clouds provisioned on the lab cloud (demo_lab.py); else three
local agent processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table as RichTable

from agent.files import write_private
from controller.cli.serve import running_controller
from controller.config import ControllerConfig
from controller.service import RunningController
from protocol.messages import MetricBatch

DEMO_NODES: tuple[dict[str, str], ...] = (
    {"provider": "aws", "region": "us-east-1", "zone": "us-east-1a"},
    {"provider": "gcp", "region": "europe-west1", "zone": "europe-west1-b"},
    {"provider": "azure", "region": "koreacentral", "zone": "koreacentral-1"},
)


@dataclass
class DemoAgent:
    name: str
    labels: dict[str, str]
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class DemoResult:
    all_online_after: float | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list)
    # The overlay part (lab mode): demo_net.OverlayResult.public(), or why it was skipped.
    network: dict[str, Any] = field(default_factory=dict)

    @property
    def overlay_ok(self) -> bool:
        """No overlay part, or every pair answered every ping over it."""
        net = self.network
        return "skipped" in net or (not net.get("error") and net.get("pairs", 0) > 0
                                    and net.get("pairs_ok") == net.get("pairs"))


def metric(
    batch: MetricBatch | None, measurement: str, fieldname: str, tags: dict[str, str] | None = None
) -> float | None:
    if batch is None:
        return None
    for p in batch.points:
        if p.measurement != measurement or fieldname not in p.fields:
            continue
        if tags and any(p.tags.get(k) != v for k, v in tags.items()):
            continue
        value = p.fields[fieldname]
        return float(value) if isinstance(value, int | float) else None
    return None


def fleet_table(controller: RunningController, title: str) -> RichTable:
    table = RichTable(title=title, expand=False)
    for col in ("node", "provider", "region", "status", "cpu %", "mem %", "load1", "net rx"):
        table.add_column(col, justify="right" if col.endswith(("%", "1", "rx")) else "left")
    for node in controller.fleet.select():
        b = controller.hub.latest(node.id)
        cpu = metric(b, "cpu", "usage_active", {"cpu": "cpu-total"})
        mem = metric(b, "mem", "used_percent")
        load = metric(b, "system", "load1")
        rx = sum(
            float(p.fields.get("bytes_recv", 0))
            for p in (b.points if b else [])
            if p.measurement == "net"
        )
        style = {"online": "green", "stale": "yellow", "offline": "red"}.get(node.status, "")
        table.add_row(
            node.id,
            node.labels.get("provider", "-"),
            node.labels.get("region", "-"),
            f"[{style}]{node.status}[/{style}]",
            "-" if cpu is None else f"{cpu:5.1f}",
            "-" if mem is None else f"{mem:5.1f}",
            "-" if load is None else f"{load:4.2f}",
            "-" if b is None else f"{rx / 1e6:.1f} MB",
        )
    return table


def influx_from_env() -> dict[str, Any]:
    """The sink settings from BARISTA_INFLUX_* (a URL alone means InfluxDB 1.x); {} if none."""
    env = ControllerConfig.load()
    if not env.influx_url:
        return {}
    return {
        f.name: getattr(env, f.name)
        for f in fields(ControllerConfig)
        if f.name.startswith("influx_") or f.name == "ingest_workers"
    } | {"influx_kind": env.influx_kind or "influx1"}


def start_agent(agent: DemoAgent, nats_url: str, token: str, controller_key: str) -> None:
    agent.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The token goes to a 0600 file, never onto the command line (readable by every user).
    token_file = agent.state_dir / "join-token"
    write_private(token_file, token.encode())
    log_f = open(agent.log_path, "ab")
    try:
        agent.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--nats-url",
                nats_url,
                "--token-file",
                str(token_file),
                "--state-dir",
                str(agent.state_dir),
                "--hostname",
                agent.name,
                "--controller-key",
                controller_key,
            ],
            stdout=log_f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log_f.close()


def stop_agents(agents: list[DemoAgent], timeout: float = 10.0) -> None:
    for a in agents:
        if a.proc and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for a in agents:
        if a.proc is None:
            continue
        try:
            a.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait(5)


async def run_demo(
    *,
    duration: float | None,
    data_dir: Path | None,
    agents: int,
    console: Console,
    client_config: Path | None = None,
    mode: str = "auto",
    per_cloud: int = 2,
) -> DemoResult:
    base = data_dir or Path(tempfile.mkdtemp(prefix="barista-demo-"))
    from controller.cli import demo_lab, demo_net

    why_not = demo_lab.lab_unavailable() if mode in ("auto", "lab") else "asked for"
    if mode == "lab" and why_not is not None:
        raise RuntimeError(f"the lab cloud cannot run here: {why_not}")
    lab = why_not is None
    if not lab and mode == "auto":
        console.print(f"[yellow]process mode[/yellow]: {why_not}; the agents run as local "
                      "processes, not on provisioned lab VMs")
    config = ControllerConfig(
        data_dir=base / "controller",
        api_port=0,
        heartbeat_interval=1.0,
        metrics_interval=2.0,
        stale_after=5.0,
        offline_after=15.0,
        # The demo runs on loopback only: plain NATS and API (the log and `barista
        # status` say so).
        tls=False,
        client_config=client_config,
        providers=demo_lab.provider_config(base) if lab else {},
        provision_reuse_venv=sys.prefix if lab else "",
        **influx_from_env(),
    )
    result = DemoResult()
    demo_agents: list[DemoAgent] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    console.print(f"[bold]barista demo[/bold]: data in {base}")
    async with running_controller(config) as run:
        c = run.controller
        console.print(
            f"controller up: API {run.api.url}, embedded NATS {c.nats_url} "
            f"({time.monotonic() - t0:.1f}s)"
        )
        console.print("try, in another terminal: [cyan]barista nodes ls -o json[/cyan]")
        if config.influx_kind:
            console.print(f"metrics → InfluxDB at {config.influx_url} ({config.influx_kind})")
        else:
            console.print(
                "no InfluxDB configured: metrics stay in the NATS METRICS stream "
                "(set BARISTA_INFLUX_URL, and BARISTA_INFLUX_KIND=influx2 with "
                "BARISTA_INFLUX_TOKEN/_ORG/_BUCKET for a v2 API, to store them)",
                highlight=False,
            )
        expected = agents
        if lab:
            expected = per_cloud * len(demo_lab.CLOUDS)
            try:
                if not await demo_lab.provision(c, console, per_cloud):
                    console.print("[red]not every lab node became ready[/red]")
                    stop.set()
                else:
                    result.network = (await demo_net.overlay(c, console, stop,
                                                             demo_lab.INFRA)).public()
                t0 = time.monotonic()  # --duration counts from a ready fleet
                await _watch(c, demo_agents, result, stop, duration, t0, console, expected)
            finally:
                result.nodes = [c.fleet.view(n) for n in c.fleet.select()]
                await demo_net.remove(c)
                if not await demo_lab.teardown(c, console):
                    console.print("[red]the demo infra was not confirmed deleted; "
                                  "`barista lab down` sweeps what is left[/red]")
        for i in range(0 if lab else agents):
            labels = {**DEMO_NODES[i % len(DEMO_NODES)], "infra": "demo", "group": "web"}
            name = f"demo-{labels['provider']}-{i + 1}"
            issued = await c.tokens.create(labels=labels, ttl=600, description=f"demo {name}")
            a = DemoAgent(name, labels, base / "agents" / name, base / "agents" / f"{name}.log")
            start_agent(a, c.agent_nats_url, c.tokens.join_text(issued.token),
                        c.secrets.signer.public_key_b64)
            demo_agents.append(a)
            console.print(
                f"started agent {name} ({labels['provider']}/{labels['region']}), "
                f"pid {a.proc.pid if a.proc else '?'}"
            )
        if not lab:
            why = ("process mode: the agents share this machine's network, with no "
                   "namespaces for WireGuard interfaces, no regions and no lab delays to "
                   "measure")
            result.network = {"skipped": why}
            console.print(f"[yellow]overlay network skipped[/yellow]: {why}; as root "
                          "`barista demo --mode lab` joins the lab nodes into one")
            try:
                await _watch(c, demo_agents, result, stop, duration, t0, console, expected)
            finally:
                console.print("stopping agents ...")
                await asyncio.to_thread(stop_agents, demo_agents)
                result.nodes = [c.fleet.view(n) for n in c.fleet.select()]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    console.print("demo stopped cleanly")
    return result


async def _watch(
    c: RunningController,
    agents: list[DemoAgent],
    result: DemoResult,
    stop: asyncio.Event,
    duration: float | None,
    t0: float,
    console: Console,
    expected: int,
) -> None:
    deadline = None if duration is None else t0 + duration
    interactive = console.is_terminal
    live = (
        Live(fleet_table(c, "fleet"), console=console, refresh_per_second=2)
        if interactive
        else None
    )
    last_plain = 0.0
    showcase: asyncio.Task[None] | None = None
    if live:
        live.start()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            for a in agents:
                if a.proc and a.proc.poll() is not None:
                    tail = a.log_path.read_text(errors="replace").splitlines()[-5:]
                    raise RuntimeError(
                        f"agent {a.name} exited with {a.proc.returncode}:\n" + "\n".join(tail)
                    )
            nodes = c.fleet.select("infra=demo")
            ready = [n for n in nodes if n.status == "online" and c.hub.latest(n.id)]
            if result.all_online_after is None and len(ready) >= expected:
                result.all_online_after = now - t0
                msg = (
                    f"all {expected} nodes online with metrics after "
                    f"{result.all_online_after:.1f}s"
                )
                (live.console if live else console).print(f"[bold green]{msg}[/bold green]")
                showcase = asyncio.create_task(_showcase(c, live.console if live else console))
            if live:
                live.update(fleet_table(c, f"fleet  ({now - t0:.0f}s, Ctrl-C to stop)"))
            elif now - last_plain >= 5:
                last_plain = now
                console.print(fleet_table(c, f"fleet at {now - t0:.0f}s"))
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
    finally:
        if showcase is not None and not showcase.done():
            showcase.cancel()
        if live:
            live.stop()
        console.print(fleet_table(c, "fleet"))


async def _showcase(c: RunningController, console: Console) -> None:
    """What the fleet is for: one signed broadcast to every node, every answer back."""
    from controller.jobs.engine import JobSpec

    try:
        t = time.perf_counter()
        job = await c.jobs.run(
            JobSpec(shell='echo "$(uname -sr) up $(cut -d. -f1 /proc/uptime)s"', timeout=10),
            created_by="demo",
        )
        took = (time.perf_counter() - t) * 1000
        table = RichTable(title=f"broadcast: uname + uptime on every node ({took:.0f} ms)")
        for col in ("node", "status", "output"):
            table.add_column(col)
        for r in await c.jobs.results(job.id):
            table.add_row(r.node_id, r.status, (r.stdout or r.reason).strip()[:60])
        console.print(table)
        console.print(f"job {job.id}: {job.counts} — see it again with "
                      f"`barista jobs show {job.id}`")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        console.print(f"[red]broadcast failed: {exc}[/red]")
    try:
        await _deploy_app(c, console)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        console.print(f"[red]app deploy failed: {exc}[/red]")


async def _deploy_app(c: RunningController, console: Console) -> None:
    """A small app as desired state: artifact with sha256, steps, health gate, batches."""
    import hashlib

    from controller.apps.deployer import parse_spec

    deployer = c.deployer
    artifact = c.config.data_dir / "demo-app" / "hello.sh"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_text('#!/bin/sh\necho "hello from $(hostname) v$1" > hello.txt\n')
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    spec = parse_spec({
        "name": "hello", "version": "1.0.0", "selector": "infra=demo", "batch": "1",
        "max_failures": "0", "health_timeout": 30,
        "artifacts": [{"url": artifact.as_uri(), "sha256": digest}],
        "install": ["chmod +x hello.sh"], "start": ["./hello.sh 1.0.0"],
        "health": {"cmd": "grep -q v1.0.0 hello.txt", "retries": 5, "interval": 0.2},
    })
    t = time.perf_counter()
    await deployer.deploy(spec, message="barista demo")
    record = await deployer.wait("hello")
    status = deployer.status("hello")
    table = RichTable(title=f"app hello {record.rollout.status} in "
                            f"{time.perf_counter() - t:.1f}s (batches of 1, health-gated)")
    for col in ("node", "version", "state"):
        table.add_column(col)
    for node_id, st in status["nodes"].items():
        table.add_row(node_id, str(st["version"]), st["state"])
    console.print(table)
    console.print("see it with `barista app status hello`")


def demo_main(
    duration: float | None,
    data_dir: Path | None,
    agents: int,
    output: str = "table",
    keep: bool = False,
    mode: str = "auto",
    per_cloud: int = 2,
) -> int:
    """Run the demo; a temp data dir is removed after a good run (unless ``keep``) and
    kept, with its logs, after a bad one."""
    console = Console(stderr=output == "json", width=None if sys.stdout.isatty() else 110)
    temp = data_dir is None
    base = data_dir or Path(tempfile.mkdtemp(prefix="barista-demo-"))
    ok = False
    try:
        result = asyncio.run(
            run_demo(duration=duration, data_dir=base, agents=agents, console=console,
                     mode=mode, per_cloud=per_cloud)
        )
        if output == "json":
            print(
                json.dumps(
                    {"all_online_after": result.all_online_after, "nodes": result.nodes,
                     "network": result.network},
                    indent=2,
                )
            )
        ok = result.all_online_after is not None
        if not ok:
            console.print("[red]not every node came online with metrics; see the agent logs[/red]")
            return 1
        ok = result.overlay_ok
        if not ok:
            console.print("[red]the overlay did not carry every pair's pings: "
                          f"{result.network.get('error') or 'see the ping table'}[/red]")
            return 1
        return 0
    finally:
        if temp and ok and not keep:
            shutil.rmtree(base, ignore_errors=True)
            console.print(f"removed {base} (--keep keeps the logs and data)")
        else:
            console.print(f"logs and data are in {base}")
