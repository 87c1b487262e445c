"""`barista provider ls|check` and `barista catalog sizes|regions|refresh` (the REST API
only)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from controller.cli.client import ApiError
from controller.cli.common import call, client, emit_json

console = Console()

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")


@click.group("provider")
def provider_group() -> None:
    """The providers this controller provisions on ([controller.providers.NAME] tables)."""


@provider_group.command("ls")
@output_option
def provider_ls(output: str) -> None:
    data = call(client().get, "/v1/providers")
    if output == "json":
        emit_json(data)
        return
    t = Table()
    for col in ("name", "kind", "regions", "sizes", "images"):
        t.add_column(col)
    for p in data["providers"]:
        t.add_row(p["name"], p["kind"], ", ".join(p["regions"]), str(p["sizes"]),
                  ", ".join(p["images"]))
    console.print(t)


@provider_group.command("check")
@click.argument("name")
@output_option
def provider_check(name: str, output: str) -> None:
    """Check a provider's credentials with one harmless listing call."""
    data = call(client().post, f"/v1/providers/{name}/check", {}, timeout=120)
    if output == "json":
        emit_json(data)
    elif data["ok"]:
        console.print(f"[green]{name}[/green] ({data['kind']}): {data['message']}")
    else:
        console.print(f"[red]{name}[/red] ({data['kind']}): {data['error']}"
                      f"{' ' + data['code'] if data.get('code') else ''}: {data['message']}")
    if not data["ok"]:
        raise SystemExit(1)


@click.group("catalog")
def catalog_group() -> None:
    """The providers' catalogs: regions, and sizes with their hourly prices."""


def _money(v: Any) -> str:
    return "-" if v is None else f"${v:,.4f}"


@catalog_group.command("sizes")
@click.option("--vcpus", type=click.IntRange(min=0), default=0, help="at least this many")
@click.option("--memory-gb", type=click.FloatRange(min=0), default=0.0, help="at least this")
@click.option("--arch", type=click.Choice(["x86_64", "arm64"]), default=None)
@click.option("--gpus", type=click.IntRange(min=0), default=0)
@click.option("--provider", "providers", multiple=True, help="only this provider (repeat)")
@click.option("--near", default="", help="LAT,LON: nearest regions first")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@output_option
def catalog_sizes(vcpus: int, memory_gb: float, arch: str | None, gpus: int,
                  providers: tuple[str, ...], near: str, limit: int, output: str) -> None:
    """Sizes that fit, cheapest first (or nearest first with --near)."""
    params: dict[str, Any] = {"vcpus": vcpus or None, "memory_gb": memory_gb or None,
                              "arch": arch, "gpus": gpus or None, "near": near or None,
                              "limit": limit, "provider": list(providers) or None}
    data = call(client().get, "/v1/catalog/sizes", **params)
    if output == "json":
        emit_json(data)
        return
    t = Table(caption=f"{len(data['sizes'])} of {data['total']} matching")
    cols = ["provider", "region", "size", "vCPU", "GB", "arch", "$/hour"]
    if near:
        cols.append("km")
    for col in cols:
        t.add_column(col, justify="right" if col in ("vCPU", "GB", "$/hour", "km") else "left")
    for s in data["sizes"]:
        row = [s["provider"], s["region"], s["size"], str(s["vcpus"]), f"{s['memory_gb']:g}",
               s["arch"], _money(s["price_hour"])]
        if near:
            row.append(str(s["distance_km"]))
        t.add_row(*row)
    console.print(t)


@catalog_group.command("regions")
@output_option
def catalog_regions(output: str) -> None:
    data = call(client().get, "/v1/catalog/regions")
    if output == "json":
        emit_json(data)
        return
    t = Table()
    for col in ("provider", "region", "where", "lat", "lon", "zones"):
        t.add_column(col)
    for r in data["regions"]:
        t.add_row(r["provider"], r["region"], r["display"], f"{r['latitude']:.2f}",
                  f"{r['longitude']:.2f}", ", ".join(r["zones"]))
    console.print(t)


@catalog_group.command("refresh")
@click.argument("provider")
@output_option
def catalog_refresh(provider: str, output: str) -> None:
    """Fetch regions, zones, sizes and prices from the cloud's own API (the provider's
    credentials) and keep them as the controller's catalog of PROVIDER. A failure writes
    nothing: the catalog in use stays as it was."""
    result: dict[str, Any] | None = None
    try:
        for event, data in client().stream(f"/v1/catalog/{provider}/refresh", method="POST",
                                           body={}, timeout=600):
            if event == "progress" and output == "table":
                console.print(f"[dim]{data['message']}[/dim]")
            elif event in ("done", "error"):
                result = {"ok": event == "done", **data}
    except ApiError as exc:
        raise click.ClickException(exc.message or exc.code) from None
    if result is None:
        raise click.ClickException("the controller ended the refresh without a result; "
                                   "run it again (the catalog in use is unchanged)")
    if output == "json":
        emit_json(result)
    elif result["ok"]:
        console.print(f"[green]{provider}[/green]: {result['sizes']} sizes in "
                      f"{len(result['regions'])} regions, {result['priced_offers']} of "
                      f"{result['offers']} size-region offers priced "
                      f"(fetched {result['fetched_at']}; {result['source']})")
        for note in result["notes"]:
            console.print(f"[yellow]note[/yellow]: {note}")
    else:
        console.print(f"[red]{provider}[/red]: refresh failed ({result['error']}"
                      f"{' ' + result['code'] if result.get('code') else ''}): "
                      f"{result['message']}; {result['hint']}. Nothing was written; the "
                      "catalog in use is unchanged.")
    if not result["ok"]:
        raise SystemExit(1)
