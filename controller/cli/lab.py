"""`barista lab status|down`: the local lab cloud on this host (read from its state file,
not through the API: the lab is host plumbing, and ``down`` must work with no controller)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import msgspec
from rich.console import Console
from rich.table import Table

from controller.cli.common import emit_json
from controller.provision.lab import Lab
from controller.provision.lab import net as labnet
from controller.provision.lab.errors import LabError
from controller.provision.lab.state import Mode, check_prefix

console = Console()
err_console = Console(stderr=True)

DEFAULT_DIR = Path(".barista") / "lab"  # the controller's default data dir, its lab/

dir_option = click.option(
    "--dir", "lab_dir", type=click.Path(path_type=Path), default=DEFAULT_DIR, show_default=True,
    help="the lab's data dir (the controller's data dir + /lab)",
)
output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
)


@click.group("lab")
def lab_group() -> None:
    """The local lab cloud: regions, WAN router, VMs (network namespaces)."""


@lab_group.command("status")
@dir_option
@output_option
def status(lab_dir: Path, output: str) -> None:
    """Regions, WAN delays, the router and the VMs of the lab in --dir."""
    try:
        st = Lab(data_dir=lab_dir, mode=_mode_of(lab_dir)).status()
    except LabError as exc:
        err_console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    if output == "json":
        emit_json(msgspec.to_builtins(st))
        return
    console.print(f"lab [bold]{st.prefix}[/bold] ({st.mode}) in {st.data_dir}: "
                  f"{'up' if st.up else 'not up'}")
    if st.note:
        console.print(f"[yellow]{st.note}[/yellow]")
    if st.mode == "netns":
        console.print(f"gateway (controller) {st.gateway} on bridge {st.gateway_bridge}")
        console.print(f"WAN router: {st.router}; dropped (no route): {st.no_route}")
    regions = Table("region", "kind", "link", "VM subnet", "gateway", "namespace", "VMs")
    for r in st.regions:
        regions.add_row(r.name, r.kind, r.subnet, r.lan or r.subnet, r.gateway_ip, r.netns,
                        str(r.vms))
    console.print(regions)
    if st.mode == "netns":
        links = Table("a", "b", "rtt ms", "loss", "packets", "lost")
        for link in st.links:
            links.add_row(link.a, link.b, f"{link.rtt_ms:g}", f"{link.loss:g}",
                          str(link.packets), str(link.lost))
        console.print(links)
    vms = Table("id", "name", "region", "private ip", "public ip", "power", "boot", "procs",
                "boot s")
    for v in st.vms:
        power = v.power if v.running or v.power != "running" else "running (init dead)"
        vms.add_row(v.id, v.name, v.region, v.private_ip, v.public_ip or "-", power,
                    v.phase or "-", str(v.processes),
                    f"{v.boot_s:.2f}" if v.boot_s is not None else "-")
    console.print(vms)


@lab_group.command("down")
@dir_option
@click.option("--prefix", help="sweep this lab prefix (bl + 6 hex) even without a state file")
@output_option
def down(lab_dir: Path, prefix: str | None, output: str) -> None:
    """Remove everything of the lab: processes, namespaces, interfaces, nft tables, files.

    Works after a crash: it sweeps by the prefix recorded in the state file (or given)."""
    try:
        if prefix is not None:
            prefix = check_prefix(prefix)
        lab = Lab(data_dir=lab_dir, prefix=prefix, mode=_mode_of(lab_dir))
        if lab.read() is None and prefix is None:
            err_console.print(f"no lab in {lab_dir} (give --prefix to sweep one by name)")
            sys.exit(1)
        swept = lab.prefix
        removed = asyncio.run(lab.down())
        left = labnet.leftovers(swept, lab_dir)
    except LabError as exc:
        err_console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    if output == "json":
        emit_json({"removed": removed, "left": left})
    else:
        for kind, items in removed.items():
            if items:
                console.print(f"removed {len(items)} {kind}: {' '.join(items)}")
        rest = {k: v for k, v in left.items() if v}
        if rest:
            err_console.print(f"[red]still there: {rest}[/red]")
        else:
            console.print("nothing of the lab is left")
    if any(left.values()):
        sys.exit(1)


def _mode_of(lab_dir: Path) -> Mode | None:
    """The recorded mode, so that ``status`` of a process-mode lab works as root too."""
    try:
        state = Lab(data_dir=lab_dir, mode="process").read()
    except LabError:
        return None
    return state.mode if state is not None else None
