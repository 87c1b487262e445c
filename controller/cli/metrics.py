"""Metrics commands of the CLI: `barista top` (live table over SSE) and `barista ingest`
(ingest workers as their own process), plus the --influx-* options `barista server` shares.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.cli.client import ApiClient, ApiError
from controller.cli.common import with_infra

log = logging.getLogger("barista.cli.metrics")

# -- shared influx options --------------------------------------------------------------

_INFLUX_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--influx-kind", {"type": click.Choice(["influx1", "influx2"]),
                       "help": "metrics sink: InfluxDB 1.x /write, or the v2 write API"}),
    ("--influx-url", {"help": "e.g. http://127.0.0.1:8086"}),
    ("--influx-db", {"help": "influx1 database (default barista)"}),
    ("--influx-rp", {"help": "influx1 retention policy (default: the database's)"}),
    ("--influx-user", {"help": "influx1 user"}),
    ("--influx-password", {"help": "influx1 password (better: env BARISTA_INFLUX_PASSWORD)"}),
    ("--influx-token", {"help": "influx2 token (better: env BARISTA_INFLUX_TOKEN)"}),
    ("--influx-org", {"help": "influx2 organisation"}),
    ("--influx-bucket", {"help": "influx2 bucket (default barista)"}),
    ("--ingest-workers", {"type": click.IntRange(1, 64),
                          "help": "ingest workers (default 1)"}),
)


def influx_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the --influx-* / --ingest-workers flags; the command gets them as one
    ``influx`` dict of ControllerConfig overrides (None = not given)."""
    names = [opt[2:].replace("-", "_") for opt, _ in _INFLUX_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        influx = {name: kwargs.pop(name, None) for name in names}
        return fn(*args, influx=influx, **kwargs)

    for opt, kw in reversed(_INFLUX_OPTIONS):
        wrapper = click.option(opt, **kw)(wrapper)
    return wrapper


# -- barista ingest ---------------------------------------------------------------------


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file with a [controller] table (same settings as the server)")
@click.option("--nats-url", help="the controller's NATS (e.g. nats://127.0.0.1:4222)")
@click.option("--nats-user", help="NATS user (env BARISTA_NATS_USER)")
@click.option("--nats-password", help="NATS password (better: env BARISTA_NATS_PASSWORD)")
@click.option("--nats-creds", type=click.Path(path_type=Path),
              help="a .creds file, e.g. DIR/creds/state.creds of `barista nats init --out DIR`")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="the controller's data dir: use its NATS credentials (embedded NATS)")
@click.option("--workers", type=click.IntRange(1, 64), help="ingest workers in this process")
@influx_options
def ingest(
    config_file: Path | None,
    nats_url: str | None,
    nats_user: str | None,
    nats_password: str | None,
    nats_creds: Path | None,
    data_dir: Path | None,
    workers: int | None,
    influx: dict[str, Any],
) -> None:
    """Run ingest workers (METRICS stream -> InfluxDB) as their own process until SIGTERM.

    They join the controller's durable consumer, so every process shares the load.
    """
    from controller.config import ControllerConfig
    from controller.errors import ControllerError
    from controller.ingest.process import run_ingest

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    overrides = {**influx, "nats_url": nats_url, "nats_user": nats_user,
                 "nats_password": nats_password, "data_dir": data_dir,
                 "nats_creds": str(nats_creds) if nats_creds else None}
    if workers is not None:
        overrides["ingest_workers"] = workers
    try:
        cfg = ControllerConfig.load(config_file, overrides)
        if not cfg.nats_url:
            raise click.UsageError("--nats-url (or BARISTA_NATS_URL) is required")
        if not cfg.influx_kind:
            raise click.UsageError(
                "no sink: give --influx-kind and --influx-url (or BARISTA_INFLUX_KIND/_URL)"
            )
        if not (cfg.nats_user or cfg.nats_creds) and data_dir is not None:
            state_creds = data_dir / "nats" / "creds" / "state.creds"
            if not state_creds.exists():
                raise click.ClickException(
                    f"{state_creds} does not exist: is {data_dir} the data dir of a "
                    "controller with the embedded NATS that has started once?")
            cfg.nats_creds = str(state_creds)  # operator mode: every identity is a JWT
        asyncio.run(run_ingest(cfg))
    except ControllerError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


# -- barista top ------------------------------------------------------------------------


@dataclass
class NodeRow:
    """What `barista top` shows for one node; rates need two batches of the node."""

    node: str
    provider: str = "-"
    region: str = "-"
    cpu: float | None = None
    mem: float | None = None
    load1: float | None = None
    net_in: float | None = None  # bytes/s
    net_out: float | None = None
    ts: int = 0  # ns, of the last batch
    _net: tuple[int, float, float] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "node", "provider", "region", "cpu", "mem", "net_in", "net_out", "load1", "ts")}

    @property
    def complete(self) -> bool:
        return self.cpu is not None and self.mem is not None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def apply_batch(row: NodeRow, batch: dict[str, Any]) -> None:
    """Update ``row`` from one batch as the SSE stream sends it (points are arrays:
    [measurement, fields, tags?, ts?])."""
    ts = int(batch.get("ts") or 0)
    rx = tx = 0.0
    have_net = False
    for point in batch.get("points") or []:
        if not isinstance(point, list) or len(point) < 2 or not isinstance(point[1], dict):
            continue
        name, fields = point[0], point[1]
        tags = point[2] if len(point) > 2 and isinstance(point[2], dict) else {}
        if name == "cpu" and tags.get("cpu") == "cpu-total":
            row.cpu = _num(fields.get("usage_active"))
        elif name == "mem":
            row.mem = _num(fields.get("used_percent"))
        elif name == "system" and "load1" in fields:
            row.load1 = _num(fields.get("load1"))
        elif name == "net":
            have_net = True
            rx += _num(fields.get("bytes_recv")) or 0.0
            tx += _num(fields.get("bytes_sent")) or 0.0
    if have_net:
        prev = row._net
        if prev is not None and ts > prev[0]:
            dt = (ts - prev[0]) / 1e9
            # Counters that went backwards (reboot, interface gone) give no rate.
            row.net_in = (rx - prev[1]) / dt if rx >= prev[1] else None
            row.net_out = (tx - prev[2]) / dt if tx >= prev[2] else None
        row._net = (ts, rx, tx)
    row.ts = ts


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, div in (("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= div:
            return f"{value / div:.1f} {unit}"
    return f"{value:.0f} B/s"


def top_table(rows: dict[str, NodeRow], title: str = "") -> Table:
    table = Table(title=title or None)
    for col in ("NODE", "PROVIDER", "REGION", "CPU %", "MEM %", "NET IN", "NET OUT", "LOAD1"):
        table.add_column(col, justify="left" if col in ("NODE", "PROVIDER", "REGION") else "right")
    for row in sorted(rows.values(), key=lambda r: (r.provider, r.region, r.node)):
        table.add_row(
            row.node, row.provider, row.region, _fmt(row.cpu, ".1f"), _fmt(row.mem, ".1f"),
            _rate(row.net_in), _rate(row.net_out), _fmt(row.load1, ".2f"),
        )
    return table


class _Reader(threading.Thread):
    """Reads the blocking SSE iterator into a queue, so the UI can refresh on a timer."""

    def __init__(self, api: ApiClient, selector: str) -> None:
        super().__init__(daemon=True, name="barista-top-sse")
        self.api = api
        self.selector = selector
        self.events: queue.Queue[dict[str, Any] | BaseException] = queue.Queue(maxsize=10_000)
        self.opened = threading.Event()

    def run(self) -> None:
        try:
            for event, data in self.api.stream("/v1/metrics/stream", selector=self.selector):
                self.opened.set()
                if event == "metrics" and isinstance(data, dict):
                    self.events.put(data)
        except BaseException as exc:  # handed to the main thread, which reports it
            self.events.put(exc)


@click.command()
@click.option("-l", "--selector", default="", help="label selector, e.g. 'provider=aws'")
@click.option("--infra", default="", help="only the nodes of this infra")
@click.option("--once", is_flag=True,
              help="print one table once every node has reported (or after 10 s), then exit")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="output format")
@click.option("--wait", "wait_s", default=10.0, show_default=True, type=float,
              help="with --once: the longest to wait for every node")
def top(selector: str, infra: str, once: bool, output: str, wait_s: float) -> None:
    """Live CPU, memory, network and load of the nodes a selector picks."""
    selector = with_infra(selector, infra)
    try:
        api = ApiClient()
        nodes = api.get("/v1/nodes", selector=selector)["nodes"]
    except ApiError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from None
    rows: dict[str, NodeRow] = {}

    def refresh_labels() -> None:
        for n in api.get("/v1/nodes", selector=selector)["nodes"]:
            _ensure_row(rows, n)

    for n in nodes:
        _ensure_row(rows, n)
    # Nodes that cannot report are not waited for.
    expected = {n["id"] for n in nodes if n.get("status") != "offline"}
    reader = _Reader(api, selector)
    reader.start()
    console = Console()
    if once:
        _top_once(reader, rows, expected, wait_s, refresh_labels)
        shown = {k: r for k, r in rows.items() if k in expected or r.ts}
        if output == "json":
            click.echo(json.dumps([r.as_dict() for r in _sorted(shown)], indent=2))
        else:
            console.print(top_table(shown))
        return
    _top_follow(reader, rows, output, console, refresh_labels)


def _sorted(rows: dict[str, NodeRow]) -> list[NodeRow]:
    return sorted(rows.values(), key=lambda r: (r.provider, r.region, r.node))


def _ensure_row(rows: dict[str, NodeRow], node: dict[str, Any]) -> NodeRow:
    labels = node.get("labels") or {}
    row = rows.get(node["id"])
    if row is None:
        row = rows[node["id"]] = NodeRow(node["id"])
    row.provider = labels.get("provider", "-")
    row.region = labels.get("region", "-")
    return row


def _next_batch(reader: _Reader, timeout: float) -> dict[str, Any] | None:
    try:
        item = reader.events.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return None
    if isinstance(item, ApiError):
        raise click.ClickException(f"{item.message} [{item.code}]")
    if isinstance(item, BaseException):
        raise click.ClickException(f"metrics stream ended: {type(item).__name__}: {item}")
    return item


def _apply(
    rows: dict[str, NodeRow], batch: dict[str, Any], refresh: Callable[[], None]
) -> NodeRow | None:
    node_id = batch.get("node_id")
    if not isinstance(node_id, str):
        return None
    if node_id not in rows:
        try:
            refresh()  # a node that enrolled after we started: fetch its labels
        except ApiError as exc:
            log.debug("top: cannot refresh node labels: %s", exc.message)
    row = rows.get(node_id) or rows.setdefault(node_id, NodeRow(node_id))
    apply_batch(row, batch)
    return row


def _top_once(
    reader: _Reader,
    rows: dict[str, NodeRow],
    expected: set[str],
    wait_s: float,
    refresh: Callable[[], None],
) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if expected and all(rows[n].complete for n in expected if n in rows):
            return
        batch = _next_batch(reader, deadline - time.monotonic())
        if batch is not None:
            _apply(rows, batch, refresh)


def _top_follow(
    reader: _Reader,
    rows: dict[str, NodeRow],
    output: str,
    console: Console,
    refresh: Callable[[], None],
) -> None:
    if output == "json":
        # One JSON line per node update: easy to pipe into jq.
        while True:
            batch = _next_batch(reader, 1.0)
            if batch is not None and (row := _apply(rows, batch, refresh)) is not None:
                click.echo(json.dumps(row.as_dict()))
                sys.stdout.flush()
    title = "barista top (Ctrl-C to stop)"
    if not console.is_terminal:
        last = 0.0
        while True:
            batch = _next_batch(reader, 1.0)
            if batch is not None:
                _apply(rows, batch, refresh)
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                console.print(top_table(rows, time.strftime("%H:%M:%S")))
    try:
        with Live(top_table(rows, title), console=console, refresh_per_second=4) as live:
            while True:
                batch = _next_batch(reader, 0.5)
                if batch is not None:
                    _apply(rows, batch, refresh)
                    # Drain what queued up meanwhile before re-rendering once.
                    while (more := _next_batch(reader, 0)) is not None:
                        _apply(rows, more, refresh)
                live.update(top_table(rows, title))
    except KeyboardInterrupt:
        pass
