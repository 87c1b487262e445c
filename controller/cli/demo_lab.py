"""The demo's fleet on the lab cloud: an infra of three simulated clouds (two public regions
and a private site behind NAT), provisioned through the engine like any infra: the plan,
a live progress bar per group, the nodes' own agents installed by the served installer,
and a verified delete on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from controller.cli.infra import plan_table
from controller.provision.model import InfraSpec
from controller.provision.model import Progress as Step
from controller.service import RunningController

INFRA = "demo"
# (group, lab region, the cloud it stands for)
CLOUDS = (("aws", "lab-us", "aws-sim"), ("gcp", "lab-eu", "gcp-sim"),
          ("onprem", "lab-onprem", "onprem-site"))
PROVIDER = "lab"


def lab_unavailable() -> str | None:
    """Why the lab cloud cannot run here (None: it can)."""
    from controller.provision.lab import net as labnet

    if not labnet.have_root():
        return "not root (the lab cloud needs network namespaces)"
    missing = labnet.tools_missing() + [t for t in ("curl",) if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (run .ci/install-system-deps)"
    return None


def provider_config(base: Path) -> dict[str, dict[str, Any]]:
    return {PROVIDER: {"kind": "local", "data_dir": str(base / "lab")}}


def demo_spec(per_cloud: int) -> InfraSpec:
    return msgspec.convert({
        "name": INFRA,
        "description": "barista demo: three simulated clouds on the lab",
        "groups": [{"name": g, "provider": PROVIDER, "regions": [region],
                    "size": {"vcpus": 1, "memory_gb": 0.5}, "count": per_cloud,
                    "labels": {"cloud": cloud}} for g, region, cloud in CLOUDS],
    }, InfraSpec)


async def _follow(c: RunningController, console: Console, until: set[str],
                  within: float) -> str:
    """Progress bars per group until the infra reaches a status in ``until``."""
    engine = c.infras
    bars = Progress(TextColumn("{task.fields[group]:<8}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                    transient=False)
    view = engine.get(INFRA)
    tasks = {g.name: bars.add_task("", group=g.name, note="", total=max(g.desired, 1))
             for g in (view.groups if view is not None else [])}

    changed = asyncio.Event()

    def on_step(p: Step) -> None:
        if p.infra != INFRA:
            return
        changed.set()
        if not p.group:
            return
        if p.group not in tasks:
            tasks[p.group] = bars.add_task("", group=p.group, note="", total=max(p.total, 1))
        note = f"{p.node}: {p.message or p.phase}" if p.node else (p.message or p.phase)
        bars.update(tasks[p.group], completed=p.done, total=max(p.total, 1), note=note[:50])

    unsubscribe = engine.subscribe(on_step)
    deadline = time.monotonic() + within
    try:
        with bars:
            while True:
                view = engine.get(INFRA)
                status = view.status if view is not None else "deleted"
                if status in until or time.monotonic() > deadline:
                    return status
                changed.clear()
                # Woken by the infra's next step; the timeout only bounds a missed one.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 2.0)
    finally:
        unsubscribe()


async def provision(c: RunningController, console: Console, per_cloud: int) -> bool:
    """Review, create and follow the demo infra; True once every node is Ready."""
    spec = demo_spec(per_cloud)
    plan = await c.infras.review(spec)
    console.print(plan_table(msgspec.to_builtins(plan)))
    console.print(f"provisioning infra [bold]{INFRA}[/bold] on the lab cloud: each VM is a "
                  "network namespace, its agent installed by the controller's installer")
    t = time.monotonic()
    await c.infras.create(spec)
    status = await _follow(c, console, {"ready", "degraded", "failed"}, within=300)
    view = c.infras.get(INFRA)
    console.print(f"infra {INFRA}: {status} in {time.monotonic() - t:.1f}s"
                  + (f" — {view.summary}" if view is not None and view.summary else ""))
    if view is not None:
        for g in view.groups:
            for n in g.nodes:
                where = f"{n.region} {n.private_ip}" + (f" / {n.public_ip}" if n.public_ip
                                                        else " (behind NAT)")
                console.print(f"  {n.name:<16} {n.phase:<8} {where}"
                              + (f" [red]{n.error}[/red]" if n.error else ""))
    return status == "ready"


async def teardown(c: RunningController, console: Console) -> bool:
    """Delete the infra (done when the lab confirms every VM gone) and the lab with it."""
    view = c.infras.get(INFRA)
    if view is None or view.status == "deleted":
        return True
    console.print(f"deleting infra {INFRA} ...")
    await c.infras.delete(INFRA)
    status = await _follow(c, console, {"deleted"}, within=180)
    provider: Any = c.provisioning.providers.get(PROVIDER)
    if provider is not None:
        await provider.lab.down()  # after a failed delete too: the sweep by prefix
    return status == "deleted"
