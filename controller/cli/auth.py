"""`barista auth token ...` (named API tokens with roles and scopes) and `barista audit ls`;
both talk only to the REST API and need an admin token."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from controller.cli.common import call, client, emit_json, parse_duration

console = Console()
output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@click.group("auth")
def auth_group() -> None:
    """API tokens: who may use the API, with which role, on which nodes."""


@auth_group.group("token")
def token_group() -> None:
    """Named API tokens (roles viewer, operator, admin; optional label-selector scope)."""


@token_group.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--scope", default="", help="label selector the token is confined to, "
              "e.g. 'env=dev'")
@click.option("--ttl", default="", help="lifetime (e.g. 12h, 30d); default: no expiry")
@output_option
def token_create(name: str, role: str, scope: str, ttl: str, output: str) -> None:
    """Create an API token; its secret is printed once and stored nowhere."""
    body: dict[str, Any] = {"name": name, "role": role, "scope": scope}
    if ttl:
        body["ttl"] = parse_duration(ttl)
    data = call(client().post, "/v1/auth/tokens", body)
    if output == "json":
        emit_json(data)
        return
    console.print(f"[bold]API token {data['name']}[/bold] (shown once): {data['token']}")
    console.print(f"role: {data['role']}   scope: {data['scope'] or '(all nodes)'}   "
                  f"expires: {_when(data['expires_at']) if data['expires_at'] else 'never'}")
    console.print("use it with BARISTA_TOKEN (environment), never on a command line")


@token_group.command("ls")
@output_option
def token_ls(output: str) -> None:
    """List API tokens (never their secrets)."""
    data = call(client().get, "/v1/auth/tokens")
    if output == "json":
        emit_json(data["tokens"])
        return
    table = Table()
    for col in ("NAME", "ROLE", "SCOPE", "STATE", "EXPIRES", "CREATED BY"):
        table.add_column(col)
    for t in data["tokens"]:
        table.add_row(t["name"], t["role"], t["scope"] or "-", t["state"],
                      _when(t["expires_at"]), t["created_by"] or "-")
    console.print(table)


@token_group.command("revoke")
@click.argument("name")
def token_revoke(name: str) -> None:
    """Revoke an API token: it is refused (401) from now on."""
    data = call(client().delete, "/v1/auth/tokens/" + urllib.parse.quote(name, safe=""))
    console.print(f"API token {data['name']} revoked")


@click.group("audit")
def audit_group() -> None:
    """The audit trail: mutating API calls and jobs."""


@audit_group.command("ls")
@click.option("--since", default="24h", show_default=True, help="how far back (e.g. 1h, 7d)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@output_option
def audit_ls(since: str, limit: int, output: str) -> None:
    """List audit records, oldest first."""
    data = call(client().get, "/v1/audit", since=time.time() - parse_duration(since),
                limit=limit)
    if output == "json":
        emit_json(data["records"])
        return
    table = Table()
    for col in ("AT", "WHO", "ROLE", "WHAT", "SELECTOR", "OUTCOME"):
        table.add_column(col)
    for r in data["records"]:
        if r["kind"] == "api":
            what = f"{r['method']} {r['path']}"
            outcome = str(r.get("status", ""))
        else:
            what = f"{r['kind']} {r['job_id']}: {r.get('command', '')}"
            outcome = (f"{r.get('outcome', '')} {r.get('counts', {})}"
                       if r["kind"] == "job.finished" else f"{len(r.get('expected', []))} node(s)")
        scope = f" [{r['scope']}]" if r.get("scope") else ""
        table.add_row(_when(r["at"]), r["who"], r.get("role", "") + scope, what,
                      r.get("selector", "") or "-", outcome)
    console.print(table)
