"""Agent footprint at steady state: RSS and CPU of the real agent (`python -m agent`, enrolled
against a real controller, default collectors and interval, started with the interpreter
flags of the systemd unit: ``-P -OO``) against Debian's
prometheus-node-exporter scraped at the same interval, side by side. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.bootstrap import AGENT_FLAGS
from controller.config import ControllerConfig
from controller.nats.server import free_port
from controller.service import Controller

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: split after its closing parenthesis.
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def process(args: list[str], log_path: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        stop(proc)


def scrape(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return len(resp.read())


class Sampler:
    """RSS samples and CPU seconds of one pid over the measured window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[float] = []
        self.cpu0 = cpu_seconds(pid)

    def sample(self) -> None:
        self.rss.append(rss_mb(self.pid))

    def result(self, wall: float) -> dict[str, float]:
        cpu = cpu_seconds(self.pid) - self.cpu0
        return {
            "rss_mb": round(sum(self.rss) / len(self.rss), 2),
            "rss_max_mb": round(max(self.rss), 2),
            "cpu_pct": round(100 * cpu / wall, 3),
        }


async def run(
    seconds: float, interval: float, warmup: float, root: Path, *, tls: bool = True,
    flags: list[str] = AGENT_FLAGS,
) -> dict[str, object]:
    cfg = ControllerConfig(data_dir=root / "controller", api_port=0, metrics_interval=interval,
                           tls=tls)
    async with Controller(cfg) as controller:
        token = controller.tokens.join_text(
            (await controller.tokens.create(labels={"provider": "bench"})).token)
        token_file = root / "join-token"  # 0600, never on the agent's command line
        token_file.write_text(token)
        token_file.chmod(0o600)
        agent_args = [
            sys.executable, *flags, "-m", "agent", "--nats-url", controller.agent_nats_url,
            "--token-file", str(token_file), "--state-dir", str(root / "agent"),
            "--hostname", "bench",
            "--controller-key", controller.secrets.signer.public_key_b64,
            "--log-level", "warning",
        ]
        port = free_port()
        exporter_args = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with process(agent_args, root / "agent.log", env) as agent, \
                process(exporter_args, root / "node-exporter.log") as exporter:
            metrics_url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 30
            # Readiness polls: the agent and node-exporter have no event we could await.
            while not controller.stats.metric_batches:
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited: {(root / 'agent.log').read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("agent sent no metrics within 30 s")
                await asyncio.sleep(0.1)
            while True:
                try:
                    await asyncio.to_thread(scrape, metrics_url)
                    break
                except OSError:
                    if exporter.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("node-exporter did not come up") from None
                    await asyncio.sleep(0.1)
            await asyncio.sleep(warmup)
            a, b = Sampler(agent.pid), Sampler(exporter.pid)
            batches0 = controller.stats.metric_batches
            start = time.monotonic()
            next_scrape = start
            while (now := time.monotonic()) - start < seconds:
                if now >= next_scrape:
                    await asyncio.to_thread(scrape, metrics_url)
                    next_scrape += interval
                a.sample()
                b.sample()
                await asyncio.sleep(1.0)
            wall = time.monotonic() - start
            value, baseline = a.result(wall), b.result(wall)
            batches = controller.stats.metric_batches - batches0
    return {
        "bench": "agent_footprint",
        "value": value,
        "baseline": baseline,
        "ratio": {
            "rss": round(value["rss_mb"] / baseline["rss_mb"], 3),
            "cpu": round(value["cpu_pct"] / baseline["cpu_pct"], 3)
            if baseline["cpu_pct"] else None,
        },
        "seconds": round(wall, 1),
        "interval": interval,
        "agent_batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="agent metrics interval and node-exporter scrape interval")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="wait after the first batch before measuring")
    parser.add_argument("--no-tls", action="store_true",
                        help="plain NATS (default: TLS with the pinned CA, as in production)")
    parser.add_argument("--python-flags", default=" ".join(AGENT_FLAGS),
                        help="the agent's interpreter flags (default: as the systemd unit and "
                             "the installer's supervisor start it)")
    args = parser.parse_args()
    flags = args.python_flags.split()
    with tempfile.TemporaryDirectory(prefix="barista-bench-footprint-") as tmp:
        result = asyncio.run(run(args.seconds, args.interval, args.warmup, Path(tmp),
                                 tls=not args.no_tls, flags=flags))
    result["tls"] = not args.no_tls
    result["python_flags"] = " ".join(flags)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
