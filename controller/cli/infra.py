"""`barista infra ...`: create (with a review and live progress per group), ls, show,
delete, scale, suspend, resume, reboot, gc (talks only to the REST API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.cli.client import ApiClient, ApiError
from controller.cli.common import call, client, emit_json, load_mapping

console = Console()
err_console = Console(stderr=True)

SETTLED = ("ready", "degraded", "failed", "suspended", "deleted")
# An infra that settles in one of these did what was asked.
GOOD = {"create": ("ready",), "delete": ("deleted",), "suspend": ("suspended",),
        "resume": ("ready",), "reboot": ("ready",), "scale": ("ready",)}
_STATUS_STYLE = {"ready": "green", "degraded": "yellow", "failed": "red", "deleted": "dim",
                 "suspended": "cyan"}

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")
wait_option = click.option("--wait/--no-wait", default=True, show_default=True,
                           help="follow the progress until the infra settles")


def load_spec(path: Path) -> dict[str, Any]:
    """An infra spec file (YAML or JSON) as the mapping the API takes."""
    return load_mapping(path, "an infra spec (name, groups)")


def _styled(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def _money(v: float | None) -> str:
    return "-" if v is None else f"${v:,.4f}"


def plan_table(plan: dict[str, Any]) -> Table:
    t = Table(title=f"plan for infra {plan['infra']}",
              caption=f"estimated total: {_money(plan.get('total_hour', 0.0))}/hour")
    for col in ("group", "provider", "region/zone", "size", "vCPU", "GB", "create",
                "existing", "$/h each", "$/h"):
        t.add_column(col, justify="right" if col in ("vCPU", "GB", "create", "existing",
                                                     "$/h each", "$/h") else "left")
    for it in plan.get("items", []):
        price = it.get("price_hour")
        total = None if price is None else price * (it.get("count", 0) + it.get("existing", 0))
        where = it["region"] + (f"/{it['zone']}" if it.get("zone") else "")
        t.add_row(it["group"], it["provider"], where, it["size"], str(it.get("vcpus", "-")),
                  str(it.get("memory_gb", "-")), str(it.get("count", 0)),
                  str(it.get("existing", 0)), _money(price), _money(total))
    return t


def print_plan(plan: dict[str, Any]) -> None:
    console.print(plan_table(plan))
    for w in plan.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {w}")


def infra_table(view: dict[str, Any]) -> Table:
    t = Table(title=f"infra {view['name']} — {view['status']}",
              caption=view.get("summary") or None)
    for col in ("node", "group", "phase", "where", "vm", "node id", "private ip",
                "public ip", "error"):
        t.add_column(col)
    for g in view.get("groups", []):
        for n in g.get("nodes", []):
            where = "/".join(x for x in (n.get("provider"), n.get("region"), n.get("zone")) if x)
            t.add_row(n["name"], n["group"], _styled(n["phase"]), where, n.get("vm_id", "-"),
                      n.get("node_id", "-"), n.get("private_ip", "-"),
                      n.get("public_ip", "-") or "-", (n.get("error") or "")[:60])
    return t


def follow(c: ApiClient, name: str, *, show: bool) -> dict[str, Any]:
    """Follow an infra's progress (SSE) until it settles: one bar per group."""
    final: dict[str, Any] | None = None
    if not show:
        for event, data in _events(c, name):
            if event == "end":
                final = data
        return final or call(c.get, f"/v1/infras/{name}")
    bars = Progress(TextColumn("{task.fields[group]:<14}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                    TimeElapsedColumn(), console=console, transient=False)
    tasks: dict[str, Any] = {}

    def bar(group: str, total: int) -> Any:
        if group not in tasks:
            tasks[group] = bars.add_task("", group=group, note="", total=max(total, 1))
        return tasks[group]

    with bars:
        for event, data in _events(c, name):
            if event == "view":
                for g in data.get("groups", []):
                    bar(g["name"], g.get("desired", 0))
            elif event == "progress":
                group = data.get("group") or ""
                if not group:
                    continue
                task = bar(group, data.get("total", 0))
                note = data.get("message") or data.get("phase", "")
                if data.get("node"):
                    note = f"{data['node']}: {note}"
                bars.update(task, completed=data.get("done", 0),
                            total=max(data.get("total", 0), 1), note=note[:60])
            elif event == "end":
                final = data
    return final or call(c.get, f"/v1/infras/{name}")


def _events(c: ApiClient, name: str) -> Any:
    try:
        yield from c.stream(f"/v1/infras/{name}/events", until="settled")
    except ApiError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from None


def _finish(view: dict[str, Any], verb: str, output: str) -> None:
    if output == "json":
        emit_json(view)
    else:
        console.print(infra_table(view))
        console.print(f"infra {view['name']}: {_styled(view['status'])}"
                      + (f" — {view['summary']}" if view.get("summary") else ""))
        for leak in view.get("leaks", []):
            err_console.print(f"[red]leak:[/] {leak} carries this infra's tags beyond what "
                              "the spec asks for (barista infra gc lists orphans)")
    if view.get("status") not in GOOD.get(verb, SETTLED):
        raise SystemExit(1)


@click.group("infra")
def infra_group() -> None:
    """Multi-cloud infrastructures: groups of VMs on any provider, each with an agent."""


@infra_group.command("create")
@click.option("-f", "--file", "spec_file", required=True, type=click.Path(path_type=Path),
              help="infra spec (YAML or JSON)")
@click.option("--dry-run", is_flag=True, help="show the plan and hourly cost; create nothing")
@click.option("-y", "--yes", is_flag=True, help="do not ask before creating")
@wait_option
@output_option
def create(spec_file: Path, dry_run: bool, yes: bool, wait: bool, output: str) -> None:
    """Create an infra, or bring an existing one to its spec (creates only the gap)."""
    spec = load_spec(spec_file)
    c = client()
    plan = call(c.post, "/v1/infras/review", spec)
    if output == "json" and dry_run:
        emit_json(plan)
        return
    if output != "json":
        print_plan(plan)
    if dry_run:
        return
    if output != "json" and not yes and console.is_terminal and not click.confirm(
            "create it?", default=True):
        raise SystemExit(1)
    view = call(c.post, "/v1/infras", spec)
    if not wait:
        if output == "json":
            emit_json(view)
        else:
            console.print(f"infra {view['name']} accepted; follow it with "
                          f"`barista infra show {view['name']}`")
        return
    _finish(follow(c, view["name"], show=output != "json"), "create", output)


@infra_group.command("ls")
@output_option
def ls(output: str) -> None:
    """List infras with their status."""
    data = call(client().get, "/v1/infras")
    if output == "json":
        emit_json(data)
        return
    t = Table()
    for col in ("name", "status", "groups", "summary"):
        t.add_column(col)
    for v in data["infras"]:
        groups = ", ".join(f"{g['name']}:{g.get('ready', 0)}/{g['desired']}"
                           for g in v.get("groups", []))
        t.add_row(v["name"], _styled(v["status"]), groups, v.get("summary", ""))
    console.print(t)


@infra_group.command("show")
@click.argument("name")
@output_option
def show(name: str, output: str) -> None:
    """One infra's nodes: phase, placement, VM and node ids, addresses, errors."""
    view = call(client().get, f"/v1/infras/{name}")
    if output == "json":
        emit_json(view)
    else:
        console.print(infra_table(view))


@infra_group.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="do not ask")
@wait_option
@output_option
def delete(name: str, yes: bool, wait: bool, output: str) -> None:
    """Terminate every VM of an infra (done only once the providers confirm each is gone)."""
    if not yes and console.is_terminal and not click.confirm(
            f"terminate every VM of infra {name}?", default=False):
        raise SystemExit(1)
    c = client()
    view = call(c.delete, f"/v1/infras/{name}")
    if wait:
        view = follow(c, name, show=output != "json")
    if output == "json":
        emit_json(view)
    else:
        console.print(f"infra {name}: {_styled(view.get('status', '?'))}")
    if wait and view.get("status") != "deleted":
        raise SystemExit(1)


def _act(name: str, body: dict[str, Any], wait: bool, output: str) -> None:
    c = client()
    view = call(c.post, f"/v1/infras/{name}/actions", body)
    if wait:
        view = follow(c, name, show=output != "json")
        _finish(view, body["action"], output)
    elif output == "json":
        emit_json(view)
    else:
        console.print(f"infra {name}: {body['action']} accepted")


@infra_group.command("scale")
@click.argument("name")
@click.argument("group")
@click.argument("count", type=click.IntRange(min=0))
@wait_option
@output_option
def scale(name: str, group: str, count: int, wait: bool, output: str) -> None:
    """Scale one group out or in (in: the highest-numbered nodes go first)."""
    _act(name, {"action": "scale", "group": group, "count": count}, wait, output)


def _lifecycle(action: str, doc: str) -> None:
    @infra_group.command(action, help=doc)
    @click.argument("name")
    @click.option("--group", default="", help="only this group")
    @wait_option
    @output_option
    def cmd(name: str, group: str, wait: bool, output: str) -> None:
        _act(name, {"action": action, "group": group}, wait, output)


_lifecycle("suspend", "Stop an infra's VMs (kept, not billed for compute on most clouds).")
_lifecycle("resume", "Start a suspended infra's VMs again.")
_lifecycle("reboot", "Reboot an infra's VMs.")


@infra_group.command("gc")
@click.option("-y", "--yes", is_flag=True, help="remove what is found without asking")
@output_option
def gc(yes: bool, output: str) -> None:
    """VMs carrying our tags that no infra knows (leaks): list, then remove after asking."""
    c = client()
    found = call(c.post, "/v1/infras/gc", {"confirm": False})["orphans"]
    if output == "json" and not yes:
        emit_json({"orphans": found, "removed": False})
        return
    if not found:
        if output == "json":
            emit_json({"orphans": [], "removed": False})
        else:
            console.print("no orphaned VMs")
        return
    if output != "json":
        t = Table(title="VMs with barista tags that no infra knows")
        for col in ("name", "provider", "region", "zone", "vm"):
            t.add_column(col)
        for n in found:
            t.add_row(n["name"], n["provider"], n.get("region", ""), n.get("zone", ""),
                      n.get("vm_id", ""))
        console.print(t)
    if not yes and not (console.is_terminal and click.confirm(
            f"terminate these {len(found)} VM(s)?", default=False)):
        console.print("nothing removed (pass --yes to remove)")
        return
    removed = call(c.post, "/v1/infras/gc",
                   {"confirm": True, "vm_ids": [n["vm_id"] for n in found]}, timeout=600)
    if output == "json":
        emit_json(removed)
    else:
        console.print(f"removed {len(removed['orphans'])} orphaned VM(s)")
