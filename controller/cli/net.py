"""`barista net ...`: create, ls, show, rm, matrix and rotate of overlay networks (talks only
to the REST API)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from controller.cli.common import call, client, emit_json

console = Console()

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")


def _path(name: str) -> str:
    return "/v1/networks/" + urllib.parse.quote(name, safe="")


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def region_table(name: str, rows: list[dict[str, Any]],
                 expected: Callable[[str, str], float | None] | None = None) -> Table:
    """The matrix by region pair (`net matrix --by region`); ``expected``: an RTT to
    compare each pair with (the demo: what the lab's WAN router sets), within 20 %."""
    t = Table(title=f"network {name}: latency by region pair")
    cols = ["from", "to", "pairs", "rtt ms (median)", "min", "max", "loss"]
    for col in cols + (["lab sets", "vs lab"] if expected else []):
        t.add_column(col)
    for r in rows:
        cells = [r["src_region"], r["dst_region"], f"{r['answered']}/{r['pairs']}",
                 _ms(r["rtt_ms"]), _ms(r["rtt_min_ms"]), _ms(r["rtt_max_ms"]),
                 f"{r['loss'] * 100:.1f}%"]
        if expected:
            want = expected(r["src_region"], r["dst_region"])
            cells += [_ms(want), _versus(r["rtt_ms"], want)]
        t.add_row(*cells)
    return t


def within(measured: float | None, want: float | None, *, slack_ms: float = 5.0) -> bool:
    """``measured`` within 20 % of ``want`` (plus ``slack_ms`` for the hosts' own time)."""
    return measured is not None and want is not None and \
        abs(measured - want) <= 0.2 * want + slack_ms


def _versus(measured: float | None, want: float | None) -> str:
    if measured is None or want is None:
        return "-"
    return "[green]ok[/green]" if within(measured, want) else \
        f"[red]off by {measured - want:+.1f}[/red]"


@click.group("net")
def net_group() -> None:
    """Overlay networks (WireGuard) across every cloud and site."""


@net_group.command("create")
@click.argument("name")
@click.option("--cidr", default="100.96.0.0/12", show_default=True,
              help="the overlay's range; must not overlap another network or a node's VPC")
@click.option("--mtu", default=1420, show_default=True, type=int)
@click.option("--port", default=51820, show_default=True, type=int, help="WireGuard UDP port")
@click.option("--keepalive", default=25, show_default=True, type=int,
              help="seconds; keeps NAT'ed nodes' tunnels open (0: off)")
@click.option("-l", "--selector", default="", help="nodes matching this selector join")
@click.option("--infra", "infras", multiple=True, help="the nodes of this infra join (repeat)")
@click.option("--description", default="")
@output_option
def create(name: str, cidr: str, mtu: int, port: int, keepalive: int, selector: str,
           infras: tuple[str, ...], description: str, output: str) -> None:
    """Create network NAME; the nodes the selector (or --infra) picks join it."""
    body = {"name": name, "cidr": cidr, "mtu": mtu, "port": port, "keepalive": keepalive,
            "selector": selector, "infras": list(infras), "description": description}
    net = call(client().post, "/v1/networks", body)
    if output == "json":
        emit_json(net)
        return
    click.echo(f"network {net['name']} created: {net['cidr']}, mtu {net['mtu']}, port "
               f"{net['port']}, members: {net.get('selector') or '-'}"
               f"{' infra ' + ','.join(net['infras']) if net.get('infras') else ''}")


@net_group.command("ls")
@output_option
def ls(output: str) -> None:
    """List networks."""
    data = call(client().get, "/v1/networks")
    if output == "json":
        emit_json(data)
        return
    t = Table()
    for col in ("name", "cidr", "mtu", "port", "members", "generation", "selector"):
        t.add_column(col)
    for n in data["networks"]:
        sel = n.get("selector") or ""
        if n.get("infras"):
            sel = (sel + " " if sel else "") + "infra " + ",".join(n["infras"])
        t.add_row(n["name"], n["cidr"], str(n["mtu"]), str(n["port"]), str(n["members"]),
                  str(n["generation"]), sel or "-")
    console.print(t)


@net_group.command("show")
@click.argument("name")
@output_option
def show(name: str, output: str) -> None:
    """A network, its members and their addresses."""
    net = call(client().get, _path(name))
    if output == "json":
        emit_json(net)
        return
    t = Table(title=f"network {net['name']} {net['cidr']} — generation {net['generation']}")
    for col in ("node", "host", "address", "region", "public", "relay", "status", "key"):
        t.add_column(col)
    for m in net.get("member_list", []):
        key = m["public_key"][:8] + "…" + (" (rotating)" if m.get("next_public_key") else "")
        t.add_row(m["node_id"], m.get("hostname", ""), m["address"], m.get("region") or "-",
                  "yes" if m.get("public") else "no", m.get("relay") or "-",
                  m.get("status", ""), key)
    console.print(t)
    for node, why in sorted(net.get("conflicts", {}).items()):
        click.echo(f"not joined: {node}: {why}", err=True)


@net_group.command("members")
@click.argument("name")
@output_option
def members(name: str, output: str) -> None:
    """The members of a network as its peers see them."""
    data = call(client().get, _path(name) + "/members")
    if output == "json":
        emit_json(data)
        return
    t = Table(title=f"network {name} — generation {data['generation']}")
    for col in ("node", "address", "region", "endpoints", "relay", "status"):
        t.add_column(col)
    for m in data["members"]:
        t.add_row(m["node_id"], m["address"], m.get("region") or "-",
                  " ".join(m.get("endpoints", [])) or "-", m.get("relay") or "-",
                  m.get("status", ""))
    console.print(t)
    for node, why in sorted(data.get("conflicts", {}).items()):
        click.echo(f"not joined: {node}: {why}", err=True)


@net_group.command("addresses")
@click.argument("name")
@output_option
def addresses(name: str, output: str) -> None:
    """The network's address leases (assigned, and released ones still quarantined)."""
    data = call(client().get, _path(name) + "/addresses")
    if output == "json":
        emit_json(data)
        return
    t = Table(title=f"network {name} {data['cidr']}")
    for col in ("address", "node", "state"):
        t.add_column(col)
    for a in data["addresses"]:
        t.add_row(a["address"], a["node_id"], a["state"])
    console.print(t)


@net_group.command("rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="do not ask")
@output_option
def rm(name: str, yes: bool, output: str) -> None:
    """Remove a network: every member drops it at once."""
    if not yes and output != "json":
        click.confirm(f"remove network {name}? every member loses it", abort=True)
    data = call(client().delete, _path(name))
    if output == "json":
        emit_json(data)
        return
    click.echo(f"network {name} removed")


@net_group.command("matrix")
@click.argument("name")
@click.option("--by", type=click.Choice(["node", "region"]), default="node",
              show_default=True)
@output_option
def matrix(name: str, by: str, output: str) -> None:
    """Measured latency and loss between the network's members (or regions)."""
    data = call(client().get, _path(name) + "/matrix", by=by)
    if output == "json":
        emit_json(data)
        return
    if by == "region":
        t = region_table(name, data.get("regions", []))
    else:
        t = Table(title=f"network {name}: {data['reported_pairs']}/{data['expected_pairs']} "
                        "pairs reported")
        for col in ("from", "to", "rtt ms", "loss", "handshake s", "relayed"):
            t.add_column(col)
        for p in data.get("pairs", []):
            t.add_row(p["src"], p["dst"], _ms(p["rtt_ms"]), f"{p['loss'] * 100:.1f}%",
                      _ms(p["handshake_age"]), "yes" if p["relayed"] else "")
    console.print(t)


@net_group.command("rotate")
@click.argument("name")
@click.argument("node")
@output_option
def rotate(name: str, node: str, output: str) -> None:
    """Ask NODE to rotate its WireGuard key (two phases, no connectivity gap)."""
    data = call(client().post, _path(name) + "/members/" + urllib.parse.quote(node, safe="")
                + "/rotate")
    if output == "json":
        emit_json(data)
        return
    click.echo(f"node {node}: key rotation asked")
