"""`barista keys`: the command-signing keys and their rotation."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Console

from controller.cli.common import call, client, emit_json

console = Console()


def _show(data: dict[str, Any], output: str) -> None:
    if output == "json":
        emit_json(data)
        return
    console.print(f"active key: {data['active']['key_id']}  (rotation step {data['seq']})")
    ret = data.get("retiring")
    if ret:
        left = max(0.0, ret["expires"] - time.time())
        console.print(f"retiring key: {ret['key_id']}  (trusted by agents for another "
                      f"{left / 3600:.1f}h, or until `barista keys rotate --finish`)")
    for s in data["steps"][-10:]:
        what = (f"finish: dropped {s['old_key_id']}" if s["finish"]
                else f"rotate: added {s['new_key_id']}")
        console.print(f"  step {s['seq']}: {what} (signed by {s['signed_by']})")


@click.group("keys")
def keys_group() -> None:
    """Command-signing keys (agents learn a new key from a message signed by the old)."""


@keys_group.command("ls")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def ls(output: str) -> None:
    """The active key, a retiring one, and the rotation steps."""
    _show(call(client().get, "/v1/keys"), output)


@keys_group.command("rotate")
@click.option("--finish", is_flag=True, help="drop the old key now (end the overlap)")
@click.option("--overlap", default=None,
              help="how long agents keep trusting the old key (default 24h; e.g. 30m, 2h)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def rotate(finish: bool, overlap: str | None, output: str) -> None:
    """Make a new signing key; with --finish, drop the old one."""
    from controller.cli.common import parse_duration

    body: dict[str, Any] = {"finish": True} if finish else {}
    if overlap is not None:
        if finish:
            raise click.UsageError("--overlap has no meaning with --finish")
        body["overlap"] = parse_duration(overlap)
    _show(call(client().post, "/v1/keys/rotate", body), output)
