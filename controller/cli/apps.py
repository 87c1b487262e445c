"""`barista app ...`: deploy, status, ls, rollback, rm (talks only to the REST API)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.cli.client import ApiClient
from controller.cli.common import call, client, emit_json, load_mapping

POLL_INTERVAL = 0.5
FINAL = ("done", "failed", "rolled-back")
_STATE_STYLE = {"running": "green", "installing": "yellow", "pending": "dim",
                "failed": "red", "unhealthy": "red", "removed": "dim"}

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")




def _load_spec(path: Path) -> dict[str, Any]:
    data = load_mapping(path, "an app spec")
    if isinstance(data.get("version"), int | float) and not isinstance(data["version"], bool):
        data["version"] = str(data["version"])
    return data


def status_table(app: dict[str, Any]) -> Table:
    r = app.get("rollout", {})
    title = (f"{app['name']} {app['current']['version']} — rollout {r.get('status')} "
             f"(batch {r.get('batch', 0)}/{r.get('batches', 1)})")
    t = Table(title=title, caption=r.get("message") or None)
    for col in ("node", "node status", "assigned", "version", "state", "error"):
        t.add_column(col)
    for node_id, n in sorted(app.get("nodes", {}).items()):
        state = n.get("state") or "-"
        style = _STATE_STYLE.get(state, "")
        t.add_row(node_id, n.get("node_status") or "-", n.get("assigned") or "-",
                  n.get("version") or "-", f"[{style}]{state}[/]" if style else state,
                  (n.get("error") or "")[:80])
    return t


def _follow(c: ApiClient, name: str, output: str) -> dict[str, Any]:
    """Poll until the rollout ends, showing it live (tables) or quietly (json)."""
    app: dict[str, Any] = call(c.get, f"/v1/apps/{name}")
    if output == "json":
        while app.get("running") or app["rollout"]["status"] not in FINAL:
            time.sleep(POLL_INTERVAL)
            app = call(c.get, f"/v1/apps/{name}")
        return app
    with Live(status_table(app), refresh_per_second=4, transient=False) as live:
        while app.get("running") or app["rollout"]["status"] not in FINAL:
            time.sleep(POLL_INTERVAL)
            app = call(c.get, f"/v1/apps/{name}")
            live.update(status_table(app))
    return app


def _finish(app: dict[str, Any], output: str) -> None:
    if output == "json":
        emit_json(app)
    status = app["rollout"]["status"]
    if status in ("failed", "rolled-back"):
        raise click.ClickException(f"rollout {status}: {app['rollout'].get('message', '')}")


@click.group("app")
def app_group() -> None:
    """App deploys: desired state, rolled out in batches with a health gate."""


@app_group.command("deploy")
@click.option("-f", "--file", "file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="app spec (YAML or JSON)")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="follow the rollout until it ends")
@output_option
def app_deploy(file: Path, wait: bool, output: str) -> None:
    """Deploy (or update) an app from a spec file."""
    c = client()
    spec = _load_spec(file)
    app = call(c.post, "/v1/apps", spec)
    if wait:
        _finish(_follow(c, app["name"], output), output)
    elif output == "json":
        emit_json(app)
    else:
        Console().print(f"rollout of {app['name']} {app['current']['version']} started "
                        f"({len(app.get('nodes', {}))} node(s)); "
                        f"follow it with `barista app status {app['name']}`")


@app_group.command("status")
@click.argument("name")
@output_option
def app_status(name: str, output: str) -> None:
    """One app: rollout and per-node state."""
    app = call(client().get, f"/v1/apps/{name}")
    if output == "json":
        emit_json(app)
    else:
        Console().print(status_table(app))


@app_group.command("ls")
@output_option
def app_ls(output: str) -> None:
    """All apps."""
    apps = call(client().get, "/v1/apps")["apps"]
    if output == "json":
        emit_json(apps)
        return
    t = Table()
    for col in ("name", "version", "previous", "selector", "nodes", "rollout", "message"):
        t.add_column(col)
    for a in apps:
        r = a["rollout"]
        t.add_row(a["name"], a["version"], a.get("previous") or "-", a.get("selector") or "*",
                  str(a["nodes"]), r.get("status", "-"), (r.get("message") or "")[:60])
    Console().print(t)


@app_group.command("rollback")
@click.argument("name")
@click.option("--wait/--no-wait", default=True, show_default=True)
@output_option
def app_rollback(name: str, wait: bool, output: str) -> None:
    """Roll an app back to its previous version."""
    c = client()
    app = call(c.post, f"/v1/apps/{name}/rollback")
    if wait:
        _finish(_follow(c, name, output), output)
    elif output == "json":
        emit_json(app)
    else:
        Console().print(f"rollback of {name} to {app['current']['version']} started")


@app_group.command("rm")
@click.argument("name")
@output_option
def app_rm(name: str, output: str) -> None:
    """Remove an app: its nodes stop it and delete its files."""
    out = call(client().delete, f"/v1/apps/{name}")
    if output == "json":
        emit_json(out)
    else:
        Console().print(f"removed {name} from {len(out['removed_from'])} node(s)")
