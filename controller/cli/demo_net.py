"""The demo's overlay on the lab cloud: its nodes joined into one WireGuard network, a fleet
command that pings every other member's overlay address from each node (both directions,
counted), and the latency / loss matrix by region pair next to the delays the lab's WAN
router sets."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from controller.cli.net import region_table, within
from controller.errors import Conflict, NotFound
from controller.mesh.networks import NetworkSpec
from controller.service import RunningController

NETWORK = "demo-net"
CIDR = "198.19.77.0/24"
PINGS = 3
JOIN_TIMEOUT = 120.0  # every member has its address (snapshots reached them)
TUNNEL_TIMEOUT = 120.0  # every pair measured over the overlay (first health reports: 10 s)
_PING_LINE = re.compile(r"^(\S+) (\d+) (\d+)$")


@dataclass
class OverlayResult:
    members: int = 0
    pairs: int = 0
    pairs_ok: int = 0
    pings: list[dict[str, Any]] = field(default_factory=list)
    regions: list[dict[str, Any]] = field(default_factory=list)
    within_lab: bool = False
    error: str = ""

    def public(self) -> dict[str, Any]:
        return {"network": NETWORK, "cidr": CIDR, "members": self.members,
                "pairs": self.pairs, "pairs_ok": self.pairs_ok, "pings": self.pings,
                "regions": self.regions, "within_lab": self.within_lab, "error": self.error}


def ping_script(addresses: list[str], count: int = PINGS) -> str:
    """What every node runs: ping each address that is not its own, one line per target:
    ``<address> <sent> <received>``. ``-w`` (a deadline for all the answers), not ``-W``:
    with ``-W`` ping gives up on a reply two RTTs after the last one came, which a loaded
    machine's 140 ms path exceeds (a late answer counted as lost)."""
    targets = " ".join(shlex.quote(a) for a in addresses)
    return (
        f"for a in {targets}; do\n"
        '  ip -o addr show | grep -q " inet $a/" && continue\n'
        f'  out=$(ping -n -q -c {count} -i 0.2 -w 5 "$a" 2>&1)\n'
        '  set -- $(echo "$out" | sed -n "s/^\\([0-9]*\\) packets transmitted, '
        '\\([0-9]*\\) received.*/\\1 \\2/p")\n'
        '  echo "$a ${1:-0} ${2:-0}"\n'
        "done\n"
    )


def parse_pings(stdout: str) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for line in stdout.splitlines():
        m = _PING_LINE.match(line.strip())
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def lab_rtt(c: RunningController) -> Callable[[str, str], float | None]:
    """What the lab sets between two overlay regions ("lab/lab-us"): 0 within a region."""
    provider: Any = c.provisioning.providers.get("lab")
    config = getattr(provider, "config", None)

    def rtt(a: str, b: str) -> float | None:
        ra, rb = a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]
        if config is None:
            return None
        return 0.0 if ra == rb else float(config.link(ra, rb).rtt_ms)

    return rtt


async def _wait(console: Console, what: str, total: int, count: Callable[[], int],
                within_s: float, stop: asyncio.Event) -> bool:
    """A progress bar until ``count()`` reaches ``total`` (True), or ``within_s`` passes or
    the demo is stopped (False)."""
    bar = Progress(TextColumn(f"{what:<24}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=False)
    task = bar.add_task("", total=max(total, 1))
    deadline = time.monotonic() + within_s
    with bar:
        while True:
            n = count()
            bar.update(task, completed=n)
            if n >= total:
                return True
            if stop.is_set() or time.monotonic() > deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def overlay(c: RunningController, console: Console, stop: asyncio.Event,
                  infra: str) -> OverlayResult:
    """Join the infra's nodes into NETWORK, ping all pairs over it, show the matrix."""
    from controller.jobs.engine import JobSpec

    res = OverlayResult()
    nodes = {n.id: n for n in c.fleet.select(f"infra={infra}")}
    res.members = n = len(nodes)
    res.pairs = n * (n - 1)
    console.print(f"overlay: [cyan]barista net create {NETWORK} --cidr {CIDR} --infra "
                  f"{infra}[/cyan] (WireGuard, wireguard-go in every VM)")
    mesh = c.mesh
    with contextlib.suppress(Conflict):  # a re-run on a kept data dir
        await mesh.networks.create(NetworkSpec(name=NETWORK, cidr=CIDR, infras=[infra],
                                               description="barista demo"))

    def addressed() -> int:
        state = mesh.distributor.state(NETWORK)
        return sum(1 for nid in nodes if state is not None and nid in state.peers
                   and state.peers[nid].address)

    def measured(since: float = 0.0) -> int:
        return sum(1 for p in mesh.matrix.pairs(NETWORK)
                   if p.rtt_ms >= 0 and p.src in nodes and p.dst in nodes and p.ts >= since)

    t = time.monotonic()
    if not await _wait(console, "members with an address", n, addressed, JOIN_TIMEOUT, stop):
        res.error = (f"only {addressed()} of {n} nodes got an address in {NETWORK} within "
                     f"{JOIN_TIMEOUT:.0f}s (barista net show {NETWORK}; the agents' logs "
                     "in the VMs' /var/log/barista-agent.log)")
        console.print(f"[red]overlay: {res.error}[/red]")
        return res
    if not await _wait(console, "pairs measured over it", res.pairs, measured,
                       TUNNEL_TIMEOUT, stop):
        # Not fatal: the pings below say which pairs do not answer.
        console.print(f"[yellow]overlay: {measured()} of {res.pairs} pairs measured within "
                      f"{TUNNEL_TIMEOUT:.0f}s; pinging anyway[/yellow]")
    state = mesh.distributor.state(NETWORK)
    assert state is not None
    address = {nid: state.peers[nid].address for nid in nodes}
    console.print(f"overlay {NETWORK} up: {n} members, {res.pairs} pairs in "
                  f"{time.monotonic() - t:.1f}s")
    console.print(f"fleet command: every node pings the {n - 1} other overlay addresses, "
                  f"{PINGS} each (up to 5 s a target) ...")
    job = await c.jobs.run(JobSpec(shell=ping_script(sorted(address.values())),
                                   selector=f"infra={infra}", timeout=60),
                           created_by="demo")
    by_address = {a: nid for nid, a in address.items()}
    results = {r.node_id: r for r in await c.jobs.results(job.id)}
    for src in sorted(nodes):
        r = results.get(src)
        got = parse_pings(r.stdout if r is not None else "")
        for dst in sorted(nodes):
            if dst == src:
                continue
            sent, received = got.get(address[dst], (0, 0))
            res.pings.append({"src": src, "dst": dst, "src_host": nodes[src].hostname,
                              "dst_host": nodes[dst].hostname, "dst_address": address[dst],
                              "sent": sent, "received": received})
    res.pairs_ok = sum(1 for p in res.pings if p["sent"] == p["received"] == PINGS)
    unknown = set(parse_pings("\n".join(r.stdout for r in results.values()))) - set(by_address)
    console.print(_ping_table(nodes, res.pings))
    colour = "green" if res.pairs_ok == res.pairs else "red"
    console.print(f"[{colour}]ping over {NETWORK}: {res.pairs_ok}/{res.pairs} pairs answered "
                  f"{PINGS} of {PINGS} (both directions)[/{colour}]"
                  + (f"; answers for unknown addresses {sorted(unknown)}" if unknown else ""))
    # Health reports made after the pings (each covers the window before it; the first
    # ones also count the probes sent before the tunnels were up as lost).
    fresh = time.time()
    await _wait(console, "fresh matrix reports", res.pairs, lambda: measured(fresh),
                TUNNEL_TIMEOUT / 4, stop)
    view = mesh.matrix.view(NETWORK, by="region")
    res.regions = cast(list[dict[str, Any]], view.get("regions", []))
    expected = lab_rtt(c)
    console.print(region_table(NETWORK, res.regions, expected))
    res.within_lab = bool(res.regions) and all(
        within(r["rtt_ms"], expected(r["src_region"], r["dst_region"])) for r in res.regions)
    console.print(f"see it with `barista net matrix {NETWORK} --by region`; the lab's WAN "
                  "router sets the per-region delays (half each way); within a region "
                  "there is none")
    return res


async def remove(c: RunningController) -> None:
    """The demo's network goes with its infra (a kept data dir keeps no stale network)."""
    with contextlib.suppress(NotFound):
        await c.mesh.delete_network(NETWORK)


def _ping_table(nodes: dict[str, Any], pings: list[dict[str, Any]]) -> RichTable:
    """From (rows) -> to (columns): received/sent, green when every ping came back."""
    order = sorted(nodes, key=lambda nid: (nodes[nid].labels.get("region", ""),
                                           nodes[nid].hostname))
    cell = {(p["src"], p["dst"]): p for p in pings}
    t = RichTable(title=f"ping over {NETWORK}: received/sent, from (row) to (column)")
    t.add_column("from \\ to")
    for nid in order:
        t.add_column(nodes[nid].hostname, justify="center")
    for src in order:
        row = [nodes[src].hostname]
        for dst in order:
            p = cell.get((src, dst))
            if p is None:
                row.append("·")
                continue
            ok = p["sent"] == p["received"] == PINGS
            style = "green" if ok else "red"
            row.append(f"[{style}]{p['received']}/{p['sent']}[/{style}]")
        t.add_row(*row)
    return t
