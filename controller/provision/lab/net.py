"""The lab's network plumbing: ``ip`` (iproute2) and ``nft`` run as subprocesses with
argument lists (never a shell string), process bookkeeping by pid, and the sweep that
removes everything carrying a lab prefix.

Only the gateway bridge and its veth end live in the host namespace (their connected /29 is
the only route the lab adds there); everything else is inside the lab's namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from controller.provision.lab.errors import CommandFailed, LabError
from controller.provision.lab.state import GATEWAY_LINK_PREFIX, GATEWAY_POOL

log = logging.getLogger("barista.lab.net")

ENV_PREFIX = "BARISTA_LAB_PREFIX"  # every process the lab starts carries it (the sweep's mark)
ENV_VM = "BARISTA_LAB_VM"
NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


def have_root() -> bool:
    return os.geteuid() == 0


def tools_missing() -> list[str]:
    return [t for t in ("ip", "nft", "unshare", "nsenter") if shutil.which(t) is None]


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """Run one command, return its stdout; ``CommandFailed`` (argv, code, stderr) else."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise CommandFailed(argv, -1, f"timed out after {COMMAND_TIMEOUT}s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr)
    return proc.stdout


async def arun(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """``run`` without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with the
    # command's end (gh-86296), and the lab VM's launch or delete then goes on past it.
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate(input.encode() if input is not None else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(argv, -1, f"timed out after {COMMAND_TIMEOUT}s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode or -1, err.decode(errors="replace"))
    return out.decode(errors="replace")


async def ip_many(netns: str | None, commands: Sequence[Sequence[str]]) -> None:
    """``ip [-n NS] -batch -``: many ip commands in one process (one argument list each;
    the batch format splits on blanks, so no argument may contain one)."""
    argv, text = batch_input(netns, commands)
    await arun(argv, input=text)


def ip_many_sync(netns: str | None, commands: Sequence[Sequence[str]]) -> None:
    argv, text = batch_input(netns, commands)
    run(argv, input=text)


def batch_input(netns: str | None, commands: Sequence[Sequence[str]]) -> tuple[list[str], str]:
    lines = []
    for cmd in commands:
        for arg in cmd:
            if not arg or any(c.isspace() for c in arg) or '"' in arg or "\\" in arg:
                raise LabError(f"ip batch argument {arg!r} is not a plain word")
        lines.append(" ".join(cmd))
    return ["ip", *(["-n", netns] if netns else []), "-batch", "-"], "\n".join(lines) + "\n"


def sysctl_argv(netns: str, settings: dict[str, str]) -> list[str]:
    return ["ip", "netns", "exec", netns, "sysctl", "-q", "-w",
            *(f"{k}={v}" for k, v in settings.items())]


def nft_argv(netns: str | None) -> list[str]:
    return [*(["ip", "netns", "exec", netns] if netns else []), "nft", "-f", "-"]


def spawn(argv: Sequence[str], *, env: dict[str, str], log: Path) -> int:
    """Start a daemon of the lab in its own session, output appended to ``log``; returns
    its pid. No ``Popen``: the lab outlives the object that started it; ``reap`` collects
    the exit status when the daemon ends while we still run."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawnp(argv[0], list(argv), env, file_actions=actions, setsid=True)


def reap(pids: Sequence[int]) -> list[int]:
    """Collect the children among ``pids`` that ended; returns those still running."""
    left = []
    for pid in pids:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # not our child (started by another process) or already collected
        if done == 0:
            left.append(pid)
    return left


# -- what exists ------------------------------------------------------------------------


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def host_links() -> list[str]:
    out = run(["ip", "-j", "link", "show"])
    return [link["ifname"] for link in json.loads(out or "[]")]


def host_nft_tables() -> list[str]:
    """``family name`` of every nft table in the host namespace."""
    out = run(["nft", "-j", "list", "tables"], check=False)
    try:
        items = json.loads(out or "{}").get("nftables", [])
    except json.JSONDecodeError:
        return []
    return [f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i]


def netns_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def pid_start(pid: int) -> int:
    """The process's start time in clock ticks (0 if gone): pid + start name one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return 0
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    return pid > 0 and start > 0 and pid_start(pid) == start


def marked_pids(prefix: str) -> list[int]:
    """Processes whose environment carries ``BARISTA_LAB_PREFIX=<prefix>``: everything the
    lab started, also in a namespace already deleted or in process mode."""
    needle = f"{ENV_PREFIX}={prefix}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], *, grace: float = 3.0) -> None:
    """SIGTERM each pid, SIGKILL what is left after ``grace`` seconds; by pid only."""
    starts = {p: pid_start(p) for p in pids}
    live = [p for p, s in starts.items() if s]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_start(p) == starts[p]]
        if live:
            time.sleep(0.05)
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_start(p) == starts[p]]
        if live:
            time.sleep(0.02)


# -- the gateway subnet on the host -----------------------------------------------------


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """A host-wide lock without a file: an abstract unix socket only one process can bind
    (released by the kernel when the holder dies). Serializes gateway subnet choice."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                sock.bind("\0barista-lab-host-lock")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError("another lab holds the host lock for more than 30 s") from None
                time.sleep(0.02)
        yield
    finally:
        sock.close()


def free_gateway_subnet() -> ipaddress.IPv4Network:
    """A /29 of ``GATEWAY_POOL`` no host interface has an address in (call under
    ``host_lock``)."""
    out = run(["ip", "-j", "-4", "addr", "show"])
    used = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network)
    for subnet in GATEWAY_POOL.subnets(new_prefix=GATEWAY_LINK_PREFIX):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise LabError(f"no free gateway subnet left in {GATEWAY_POOL} (too many labs?)")


# -- the sweep --------------------------------------------------------------------------


def sweep(prefix: str, *, data_dir: Path | None = None) -> dict[str, list[str]]:
    """Remove everything carrying ``prefix``: processes (in the lab's namespaces and marked
    by environment), namespaces, host interfaces, host nft tables, and ``data_dir``.
    Safe to repeat; returns what it removed."""
    removed: dict[str, list[str]] = {"processes": [], "netns": [], "links": [], "nft": []}
    ours = [ns for ns in netns_list() if ns == prefix or ns.startswith(prefix + "-")]
    pids: set[int] = set(marked_pids(prefix))
    for ns in ours:
        pids.update(netns_pids(ns))
    pids.discard(os.getpid())
    if pids:
        kill_pids(sorted(pids))
        removed["processes"] = [str(p) for p in sorted(pids)]
    for ns in ours:
        try:
            run(["ip", "netns", "delete", ns])
            removed["netns"].append(ns)
        except CommandFailed as exc:
            log.warning("lab %s: netns %s not deleted: %s", prefix, ns, exc.stderr)
    if have_root():
        for name in host_links():
            if name.startswith(prefix):
                with contextlib.suppress(CommandFailed):
                    run(["ip", "link", "delete", name])
                    removed["links"].append(name)
        for table in host_nft_tables():
            family, name = table.split(" ", 1)
            if name.startswith(prefix):
                with contextlib.suppress(CommandFailed):
                    run(["nft", "delete", "table", family, name])
                    removed["nft"].append(table)
    if data_dir is not None and data_dir.exists():
        _unmount_under(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
    return removed


def _unmount_under(path: Path) -> None:
    """Mounts made in the VMs' own mount namespaces never show in ours; this only catches a
    mount that leaked into the host's namespace (it should not happen)."""
    real = str(path.resolve())
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for target in sorted((t for t in targets if t.startswith(real + "/")), reverse=True):
        with contextlib.suppress(CommandFailed):
            run(["umount", "-l", target])


def leftovers(prefix: str, data_dir: Path | None = None) -> dict[str, list[str]]:
    """What still carries ``prefix`` (empty lists when the lab is gone)."""
    out = {
        "netns": [ns for ns in netns_list() if ns.startswith(prefix)],
        "links": [n for n in host_links() if n.startswith(prefix)] if have_root() else [],
        "nft": [t for t in host_nft_tables() if t.split(" ", 1)[1].startswith(prefix)]
        if have_root() else [],
        "processes": [str(p) for p in marked_pids(prefix)],
        "files": [str(data_dir)] if data_dir is not None and data_dir.exists() else [],
    }
    return out
