"""The `barista` command line: server, nodes, tokens, demo (talks to the REST API)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from controller.client import ApiClient, ApiError

console = Console()
err_console = Console(stderr=True)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 90, 30s, 15m, 2h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def client() -> ApiClient:
    try:
        return ApiClient()
    except ApiError as exc:
        raise click.ClickException(exc.message) from None


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from None


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    d = max(0.0, time.time() - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="output format",
)


@click.group()
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug)")
def main(verbose: int) -> None:
    """barista: a multi-cloud control plane (controller, fleet, metrics, overlay)."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(logging.DEBUG, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# -- server -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="TOML file with a [controller] table",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="state, keys, embedded NATS")
@click.option("--nats-url", help="use this NATS instead of starting the embedded one")
@click.option("--nats-port", type=int, help="port for the embedded NATS (default: free port)")
@click.option("--api-host", help="API listen address (default 127.0.0.1)")
@click.option("--api-port", type=int, help="API port (default 8640; 0 = any free port)")
def server(
    config_file: Path | None,
    data_dir: Path | None,
    nats_url: str | None,
    nats_port: int | None,
    api_host: str | None,
    api_port: int | None,
) -> None:
    """Run the controller (embedded NATS unless --nats-url is given)."""
    from controller.config import ControllerConfig
    from controller.errors import ControllerError
    from controller.serve import serve_forever

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = ControllerConfig.load(
            config_file,
            {
                "data_dir": data_dir,
                "nats_url": nats_url,
                "nats_port": nats_port,
                "api_host": api_host,
                "api_port": api_port,
            },
        )
        asyncio.run(serve_forever(cfg))
    except ControllerError as exc:
        raise click.ClickException(exc.message) from None
    except KeyboardInterrupt:
        pass


@main.command()
@output_option
def status(output: str) -> None:
    """Controller status: NATS, node counts, rejected messages."""
    data = call(client().get, "/v1/status")
    if output == "json":
        emit_json(data)
        return
    console.print(
        f"ready: {data['ready']}   nats: {data['nats']['url']} "
        f"({'embedded' if data['nats']['embedded'] else 'external'})"
    )
    console.print("nodes: " + ", ".join(f"{k} {v}" for k, v in data["nodes"].items()))
    if data["rejected"]:
        console.print(f"rejected messages: {data['rejected']} (last: {data['last_rejection']})")


# -- nodes --------------------------------------------------------------------------------


@main.group()
def nodes() -> None:
    """List and inspect nodes."""


@nodes.command("ls")
@click.option("-l", "--selector", default="", help="label selector, e.g. 'provider=aws,!spot'")
@click.option("--status", "status_", type=click.Choice(["online", "stale", "offline"]))
@output_option
def nodes_ls(selector: str, status_: str | None, output: str) -> None:
    """List nodes, optionally filtered by a label selector."""
    data = call(client().get, "/v1/nodes", selector=selector, status=status_)
    if output == "json":
        emit_json(data["nodes"])
        return
    table = Table()
    for col in ("ID", "STATUS", "PROVIDER", "REGION", "LAST SEEN", "LABELS"):
        table.add_column(col)
    for n in data["nodes"]:
        labels = n["labels"]
        style = {"online": "green", "stale": "yellow", "offline": "red"}.get(n["status"], "")
        table.add_row(
            n["id"],
            f"[{style}]{n['status']}[/{style}]",
            labels.get("provider", "-"),
            labels.get("region", "-"),
            ago(n.get("last_seen")),
            ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        )
    console.print(table)
    console.print(f"{len(data['nodes'])} node(s)")


@nodes.command("show")
@click.argument("node_id")
@output_option
def nodes_show(node_id: str, output: str) -> None:
    """Show one node."""
    n = call(client().get, f"/v1/nodes/{node_id}")
    if output == "json":
        emit_json(n)
        return
    for key in ("id", "hostname", "status", "agent_version"):
        console.print(f"[bold]{key}[/bold]: {n.get(key)}")
    console.print(f"[bold]last seen[/bold]: {ago(n.get('last_seen'))}")
    console.print(f"[bold]enrolled[/bold]: {time.ctime(n['enrolled_at'])}")
    console.print(
        "[bold]labels[/bold]: " + ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
    )
    console.print("[bold]facts[/bold]:")
    for k, v in sorted(n.get("facts", {}).items()):
        console.print(f"  {k}: {v}")


# -- tokens -------------------------------------------------------------------------------


@main.group()
def token() -> None:
    """Join tokens for new machines."""


@token.command("create")
@click.option("--label", "labels", multiple=True, help="label the node gets (k=v, repeat)")
@click.option("--ttl", default="24h", show_default=True, help="lifetime (e.g. 30m, 24h, 7d)")
@click.option("--description", default="")
@output_option
def token_create(labels: tuple[str, ...], ttl: str, description: str, output: str) -> None:
    """Create a one-time join token."""
    from protocol.errors import SelectorError
    from protocol.selectors import parse_labels

    try:
        label_map = parse_labels(list(labels))
    except SelectorError as exc:
        raise click.BadParameter(exc.reason, param_hint="--label") from None
    data = call(
        client().post,
        "/v1/tokens",
        {"labels": label_map, "ttl": parse_duration(ttl), "description": description},
    )
    if output == "json":
        emit_json(data)
        return
    console.print(f"[bold]token[/bold] (shown once): {data['token']}")
    console.print(f"expires: {time.ctime(data['expires_at'])}   labels: {data['labels']}")
    console.print("start an agent with:")
    console.print(
        f"  barista-agent --nats-url {data['nats_url']} --token {data['token']} "
        f"--controller-key {data['controller_key']}",
        soft_wrap=True,
    )


@token.command("ls")
@output_option
def token_ls(output: str) -> None:
    """List join tokens (never their secrets)."""
    data = call(client().get, "/v1/tokens")
    if output == "json":
        emit_json(data["tokens"])
        return
    table = Table()
    for col in ("ID", "STATE", "EXPIRES", "USED BY", "LABELS"):
        table.add_column(col)
    for t in data["tokens"]:
        table.add_row(
            t["id"],
            t["state"],
            time.ctime(t["expires_at"]),
            t["used_by"] or "-",
            ",".join(f"{k}={v}" for k, v in sorted(t["labels"].items())),
        )
    console.print(table)


# -- demo ---------------------------------------------------------------------------------


@main.command()
@click.option("--duration", default=None, help="stop after this long (default: until Ctrl-C)")
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--data-dir", type=click.Path(path_type=Path), help="default: a new temp dir")
@output_option
def demo(duration: str | None, agents: int, data_dir: Path | None, output: str) -> None:
    """Controller + embedded NATS + local agents labelled as three clouds, live."""
    from controller.demo import demo_main

    seconds = parse_duration(duration) if duration else None
    sys.exit(demo_main(seconds, data_dir, agents, output))


if __name__ == "__main__":
    main()
