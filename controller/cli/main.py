"""The `barista` command line: server, nodes, tokens, demo (talks to the REST API)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from controller.cli.apps import app_group
from controller.cli.auth import audit_group, auth_group
from controller.cli.catalog import catalog_group, provider_group
from controller.cli.client import ApiClient, ApiError
from controller.cli.common import call, client, emit_json, parse_duration, with_infra
from controller.cli.infra import infra_group
from controller.cli.keys import keys_group
from controller.cli.lab import lab_group
from controller.cli.metrics import influx_options, ingest, top
from controller.cli.nats import nats_group
from controller.cli.net import net_group

console = Console()
err_console = Console(stderr=True)





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
@click.option("--nats-trust", type=click.Path(path_type=Path, file_okay=False),
              help="the dir `barista nats init --out` wrote for that NATS (node isolation)")
@click.option("--stream-replicas", type=click.IntRange(1, 5),
              help="replicas of the streams and new KV buckets (default 1; 3 on a cluster)")
@click.option("--nats-port", type=int, help="port for the embedded NATS (default: free port)")
@click.option("--api-host", help="API listen address (default 127.0.0.1)")
@click.option("--api-port", type=int, help="API port (default 8640; 0 = any free port)")
@click.option("--tls/--no-tls", default=None,
              help="TLS for NATS and the API with the controller's own CA (default: on; "
              "--no-tls only for the demo and loopback)")
@click.option("--tls-name", "tls_names", multiple=True,
              help="extra DNS name or IP of the server certificate (repeat)")
@influx_options
def server(
    config_file: Path | None,
    data_dir: Path | None,
    nats_url: str | None,
    nats_trust: Path | None,
    stream_replicas: int | None,
    nats_port: int | None,
    api_host: str | None,
    api_port: int | None,
    tls: bool | None,
    tls_names: tuple[str, ...],
    influx: dict[str, Any],
) -> None:
    """Run the controller (embedded NATS unless --nats-url is given)."""
    from controller.cli.serve import serve_forever
    from controller.config import ControllerConfig
    from controller.errors import ControllerError

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = ControllerConfig.load(
            config_file,
            {
                "data_dir": data_dir,
                "nats_url": nats_url,
                "nats_trust": str(nats_trust) if nats_trust else None,
                "stream_replicas": stream_replicas,
                "nats_port": nats_port,
                "api_host": api_host,
                "api_port": api_port,
                "tls": tls,
                "tls_names": list(tls_names) or None,
                **influx,
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
    tls = data.get("tls") or {}
    if tls.get("nats") or tls.get("api"):
        console.print(
            f"tls: nats {'on' if tls.get('nats') else '[red]off[/red]'}, "
            f"api {'on' if tls.get('api') else '[red]off[/red]'}   "
            f"CA sha256 {tls.get('nats_ca_sha256') or tls.get('ca_sha256')}")
    else:
        console.print("tls: [red]off[/red] (plain NATS and API: loopback or demo only)")
    if data["nats"].get("isolation") == "operator":
        console.print("node isolation: on (each node its own NATS JWT, revocable)")
    else:
        console.print("node isolation: [red]off[/red] (external NATS without barista's trust: "
                      "any node can publish as another; fix: `barista nats init`)")
    console.print("nodes: " + ", ".join(f"{k} {v}" for k, v in data["nodes"].items()))
    if data["rejected"]:
        console.print(f"rejected messages: {data['rejected']} (last: {data['last_rejection']})")
    bad = data.get("bad_records") or {}
    if bad.get("total"):
        console.print(f"bad stored records: {bad['by_bucket']} (keys: {bad.get('keys', {})})")
    if data.get("oversized_batches"):
        console.print(f"oversized metric batches refused: {data['oversized_batches']}")
    ingest = data.get("ingest") or {}
    if ingest:
        console.print(
            f"ingest: {ingest.get('points', 0)} points in {ingest.get('batches', 0)} batches "
            f"to {ingest.get('sink')}; malformed {ingest.get('malformed', 0)}, "
            f"refused by the store {ingest.get('rejected', 0)}"
        )
        lp = ingest.get("line_protocol") or {}
        if any(lp.values()):
            # What the encoder had to change to write at all (infra/influxdb/README.md).
            console.print(
                "line protocol: "
                f"{lp.get('replaced', 0)} names/values with characters replaced (U+FFFD), "
                f"dropped: {lp.get('dropped_tags', 0)} tags, {lp.get('dropped_fields', 0)} "
                f"fields, {lp.get('dropped_points', 0)} points"
            )


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
        # A revoked node is cut off NATS for good, whatever its liveness still says.
        shown = "revoked" if n.get("revoked") else n["status"]
        style = {"online": "green", "stale": "yellow", "offline": "red",
                 "revoked": "red"}.get(shown, "")
        table.add_row(
            n["id"],
            f"[{style}]{shown}[/{style}]",
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


@nodes.command("revoke")
@click.argument("node_id")
@output_option
def nodes_revoke(node_id: str, output: str) -> None:
    """Revoke a node: it is disconnected at once and cannot reconnect or renew."""
    n = call(client().post, f"/v1/nodes/{node_id}/revoke")
    if output == "json":
        emit_json(n)
        return
    console.print(f"node {node_id} revoked")


@nodes.command("rm")
@click.argument("node_id")
@output_option
def nodes_rm(node_id: str, output: str) -> None:
    """Delete a node (its NATS user is revoked first)."""
    data = call(client().delete, f"/v1/nodes/{node_id}")
    if output == "json":
        emit_json(data)
        return
    console.print(f"node {node_id} deleted")


# -- tokens -------------------------------------------------------------------------------


@main.group()
def token() -> None:
    """Join tokens for new machines."""


@token.command("create")
@click.option("--label", "labels", multiple=True, help="label the node gets (k=v, repeat)")
@click.option("--ttl", default="24h", show_default=True, help="lifetime (e.g. 30m, 24h, 7d)")
@click.option("--description", default="")
@click.option("--node", "node_name", default="", help="bind the token to this node name "
              "(the machine's hostname; it becomes the node id)")
@click.option("--join-url", default="", help="the controller's API as the joining machine "
              "reaches it (default: the URL this CLI uses)")
@output_option
def token_create(labels: tuple[str, ...], ttl: str, description: str, node_name: str,
                 join_url: str, output: str) -> None:
    """Create a one-time join token and print the one-line join that adopts a machine."""
    from protocol.errors import SelectorError
    from protocol.selectors import parse_labels

    try:
        label_map = parse_labels(list(labels))
    except SelectorError as exc:
        raise click.BadParameter(exc.reason, param_hint="--label") from None
    data = call(
        client().post,
        "/v1/tokens",
        {"labels": label_map, "ttl": parse_duration(ttl), "description": description,
         "node_name": node_name, **({"join_url": join_url} if join_url else {})},
    )
    if output == "json":
        emit_json(data)
        return
    console.print(f"[bold]token[/bold] (shown once): {data['token']}")
    console.print(f"expires: {time.ctime(data['expires_at'])}   labels: {data['labels']}")
    if data.get("ca_sha256"):
        console.print(f"pins the NATS CA sha256 {data['ca_sha256']}: the agent checks it "
                      "before it sends anything")
    else:
        console.print("[yellow]pins no CA[/yellow]: the controller's NATS serves no TLS")
    if data.get("node_name"):
        console.print(f"bound to node {data['node_name']}: only a machine of that hostname "
                      "can enroll with it")
    console.print("\n[bold]join a machine[/bold] (as root): save the join token in a file "
                  "only root can read, then run the one-line join, which reads it from "
                  "standard input (never from a command line); installer flags such as "
                  "--label k=v go after 'barista-join':")
    console.print("  (umask 077; cat > join-token)   # paste the join token below, then Ctrl-D",
                  soft_wrap=True, highlight=False)
    print(f"  {data['join_line']}")
    console.print("join token:", highlight=False)
    print(data.get("join_token", data["token"]))


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


# -- jobs ---------------------------------------------------------------------------------

STATUS_STYLE = {"ok": "green", "failed": "red", "timeout": "red", "no-response": "yellow",
                "rejected": "magenta", "error": "red", "skipped": "dim"}


def results_table(job: dict[str, Any], *, full: bool = False) -> Table:
    table = Table(title=f"job {job['id']}")
    for col in ("NODE", "STATUS", "EXIT", "TIME", "OUTPUT"):
        table.add_column(col, overflow="fold")
    for r in job["results"]:
        out = (r.get("stdout") or "").rstrip()
        err = (r.get("stderr") or "").rstrip()
        text = out if full else (out.splitlines() or [""])[-1][:80]
        if r.get("stdout_truncated"):
            text += " [truncated]"
        if r["status"] != "ok":
            extra = r.get("reason") or (err.splitlines() or [""])[-1][:80]
            text = f"{text} {extra}".strip()
        if r["status"] == "ok" and job["spec"].get("action") in ("ping", "facts"):
            data = r.get("data") or {}
            text = json.dumps(data.get("facts", data), sort_keys=True)[:80]
        style = STATUS_STYLE.get(r["status"], "")
        name = r["node_id"] + ("" if r.get("expected", True) else " (unexpected)")
        table.add_row(name, f"[{style}]{r['status']}[/{style}]",
                      "" if r.get("exit_code") is None else str(r["exit_code"]),
                      f"{r.get('duration', 0):.2f}s", text)
    return table


def job_exit_code(job: dict[str, Any]) -> int:
    counts = job["counts"]
    bad = sum(v for k, v in counts.items() if k != "ok")
    return 0 if bad == 0 and job["status"] == "done" else 1


def follow_job(api: ApiClient, job_id: str, expected: int, *, stream_output: bool,
               quiet: bool) -> dict[str, Any]:
    """Follow a job's events with a progress bar; return the finished job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[summary]}"),
                        TimeElapsedColumn(), console=err_console, transient=True,
                        disable=quiet)
    counts: dict[str, int] = {}
    with progress:
        task = progress.add_task(f"job {job_id}", total=max(expected, 1), summary="")
        try:
            for event, data in api.stream(f"/v1/jobs/{job_id}/events"):
                if event == "result":
                    counts[data["status"]] = counts.get(data["status"], 0) + 1
                    progress.update(task, completed=sum(counts.values()),
                                    summary=" ".join(f"{k}:{v}" for k, v in
                                                     sorted(counts.items())))
                elif event == "output" and stream_output:
                    d = data.get("data", {})
                    progress.console.print(f"[cyan]{data.get('node_id')}[/cyan] "
                                           f"{str(d.get('data', '')).rstrip()}")
                elif event == "done":
                    break
        except ApiError as exc:
            raise click.ClickException(exc.message) from None
    result: dict[str, Any] = call(api.get, f"/v1/jobs/{job_id}")
    return result


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-l", "--selector", default="", help="label selector of the target nodes")
@click.option("--infra", "infra", default="", help="only the nodes of this infra")
@click.option("--node", "targets", multiple=True, help="target node id (repeat)")
@click.option("--action", type=click.Choice(["exec", "ping", "facts"]), default="exec",
              show_default=True)
@click.option("--shell/--no-shell", default=None,
              help="run through /bin/sh -c (default: when CMD is one word with spaces)")
@click.option("--timeout", default="60s", show_default=True, help="per-node command timeout")
@click.option("--batch", default="", help="rolling batches: N nodes or P% of them")
@click.option("--pause", default="0", help="pause between batches (e.g. 10s)")
@click.option("--max-failures", default="", help="stop the rollout above N or P% failures")
@click.option("--env", "envs", multiple=True, help="KEY=VALUE for the command (repeat)")
@click.option("--cwd", default="")
@click.option("--user", default="", help="run as this user (agent must allow it)")
@click.option("--stream", is_flag=True, help="stream output lines as they come")
@click.option("--async", "async_", is_flag=True, help="print the job id and return at once")
@output_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(selector: str, infra: str, targets: tuple[str, ...], action: str, shell: bool | None,
        timeout: str, batch: str, pause: str, max_failures: str, envs: tuple[str, ...],
        cwd: str, user: str, stream: bool, async_: bool, output: str,
        command: tuple[str, ...]) -> None:
    """Run a command on every node the selector matches:  barista run -l role=web -- uptime"""
    selector = with_infra(selector, infra)
    if action == "exec" and not command:
        raise click.UsageError("give a command after --, e.g. barista run -l role=web -- uptime")
    env: dict[str, str] = {}
    for item in envs:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r} must be KEY=VALUE", param_hint="--env")
        env[k] = v
    use_shell = shell if shell is not None else (len(command) == 1 and " " in command[0])
    spec: dict[str, Any] = {
        "action": action, "selector": selector, "targets": list(targets),
        "timeout": parse_duration(timeout), "batch": batch, "pause": parse_duration(pause),
        "max_failures": max_failures, "env": env, "cwd": cwd, "user": user,
        "stream_output": stream,
    }
    if action == "exec":
        if use_shell:
            spec["shell"] = " ".join(command)
        else:
            spec["argv"] = list(command)
    api = client()
    job = call(api.post, "/v1/jobs", spec)
    if async_:
        if output == "json":
            emit_json(job)
        else:
            console.print(f"job {job['id']} started on {job['expected']} node(s); follow it with "
                          f"`barista jobs show {job['id']} --follow`")
        return
    if job["expected"] == 0 and output != "json":
        err_console.print(f"[yellow]no node matches selector {selector!r}[/yellow]")
    final = follow_job(api, job["id"], job["expected"], stream_output=stream,
                       quiet=output == "json")
    if output == "json":
        emit_json(final)
    else:
        console.print(results_table(final))
        console.print(_job_line(final))
    sys.exit(job_exit_code(final))


def _job_line(job: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(job["counts"].items())) or "no nodes"
    took = (job["finished_at"] or time.time()) - job["created_at"]
    line = f"{job['status']}: {counts} ({job['expected']} expected, {took:.2f}s)"
    if job.get("unexpected"):
        line += f", {job['unexpected']} unexpected repl(ies)"
    if job.get("stop_reason"):
        line += f"\n{job['stop_reason']}"
    return line


@main.group()
def jobs() -> None:
    """Job history: list, show and follow jobs."""


@jobs.command("ls")
@click.option("--limit", default=20, show_default=True)
@output_option
def jobs_ls(limit: int, output: str) -> None:
    """List recent jobs."""
    data = call(client().get, "/v1/jobs", limit=limit)
    if output == "json":
        emit_json(data["jobs"])
        return
    table = Table()
    table.add_column("ID", no_wrap=True)
    for col in ("STATUS", "COMMAND", "SELECTOR", "NODES", "RESULT", "WHEN"):
        table.add_column(col)
    for j in data["jobs"]:
        table.add_row(j["id"], j["status"], j["command"][:40], j["selector"] or "*",
                      str(j["expected"]),
                      " ".join(f"{k}:{v}" for k, v in sorted(j["counts"].items())),
                      ago(j["created_at"]))
    console.print(table)


@jobs.command("show")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="wait for a running job, with progress")
@click.option("--full", is_flag=True, help="whole output, not the last line")
@output_option
def jobs_show(job_id: str, follow: bool, full: bool, output: str) -> None:
    """Show a job and every node's result."""
    api = client()
    job = call(api.get, f"/v1/jobs/{job_id}")
    if follow and job["status"] == "running":
        job = follow_job(api, job_id, job["expected"], stream_output=False,
                         quiet=output == "json")
    if output == "json":
        emit_json(job)
        return
    console.print(results_table(job, full=full))
    console.print(_job_line(job))


# -- demo ---------------------------------------------------------------------------------


@main.command()
@click.option("--duration", default=None, help="stop after this long (default: until Ctrl-C)")
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 50),
              help="process mode: how many local agents")
@click.option("--mode", type=click.Choice(["auto", "lab", "process"]), default="auto",
              show_default=True,
              help="lab: provision an infra on the lab cloud (root); process: local agent "
              "processes; auto: lab where it can run")
@click.option("--per-cloud", default=2, show_default=True, type=click.IntRange(1, 10),
              help="lab mode: nodes per simulated cloud (3 clouds)")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="default: a new temp dir, removed after a good run",
)
@click.option("--keep", is_flag=True, help="keep the temp dir (logs, state) after a good run")
@output_option
def demo(
    duration: str | None, agents: int, mode: str, per_cloud: int, data_dir: Path | None,
    keep: bool, output: str
) -> None:
    """Controller + embedded NATS + a fleet over three clouds, live: provisioned on the lab
    cloud as root (a private site behind NAT among them), else local agent processes."""
    from controller.cli.demo import demo_main

    seconds = parse_duration(duration) if duration else None
    sys.exit(demo_main(seconds, data_dir, agents, output, keep=keep, mode=mode,
                       per_cloud=per_cloud))


main.add_command(top)
main.add_command(ingest)
main.add_command(app_group)
main.add_command(auth_group)
main.add_command(audit_group)
main.add_command(keys_group)
main.add_command(infra_group)
main.add_command(lab_group)
main.add_command(net_group)
main.add_command(nats_group)
main.add_command(provider_group)
main.add_command(catalog_group)

if __name__ == "__main__":
    main()
