"""Ingest throughput: points/s through NATS -> JetStream -> IngestWorker -> InfluxDB 1.x,
against direct bulk line-protocol writes of the same points to the same influxd. Batches
are what the real collectors produce on this host, widened to a server's core/disk count.

Each round runs every variant once, in a rotating order, each into a database of its own,
and waits for influxd to go quiet in between (it compacts in the background); the figures
are medians over the rounds. Variants:

- ``live``: the batches are published while the workers ingest, by a child process (as
  agents would, from their own machines) - the headline ``value``;
- ``drain``: the stream is filled first, then the workers drain it (the backlog after an
  InfluxDB outage);
- ``direct``: bulk writes of the same points, pre-encoded, 1 and 2 writes in flight (the
  workers keep up to 2); the better median is the ``baseline``.

Prints one JSON line. Also reports the encoder's lines/s, and the v1 (/write, aiohttp)
against the v2 (influxdb-client async) sink on VictoriaMetrics. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.ingest.lineproto import LineEncoder
from controller.ingest.sinks import InfluxV1Sink, InfluxV2Sink, Sink
from controller.ingest.worker import IngestWorker
from controller.nats.server import NatsServer
from controller.state.streams import METRICS, ensure_stream, metrics_stream_config
from protocol.codec import encode
from protocol.messages import MetricBatch, MetricPoint
from protocol.subjects import Subjects
from tests.fixtures.influx import InfluxDB1, Victoria

BASE_TS = 1_700_000_000_000_000_000
VARIANTS = ["direct1", "direct2", "live", "drain"]


def real_points() -> list[MetricPoint]:
    """One batch of this host's real collectors (default set), as the agent sends it."""
    from agent.collectors.scheduler import CollectorSet, build_collectors

    cs = CollectorSet(build_collectors())
    cs.collect_all()  # the cpu collector reports deltas: the second call has usage_*
    time.sleep(0.2)
    points, errors = cs.collect_all()
    if errors:
        print(f"collector errors (ignored): {errors}", file=sys.stderr)
    return points


def server_template(
    points: list[MetricPoint], cores: int, disks: int, ifaces: int
) -> list[MetricPoint]:
    """The real batch widened to a bigger server: per-core cpu, disk, diskio and net
    points copied from the real ones under new tag values (same fields and types)."""
    out = [p for p in points if p.measurement not in ("cpu", "disk", "diskio", "net")]
    by = {m: [p for p in points if p.measurement == m] for m in ("cpu", "disk", "diskio", "net")}
    cpu_total = [p for p in by["cpu"] if p.tags.get("cpu") == "cpu-total"]
    per_core = [p for p in by["cpu"] if p.tags.get("cpu") != "cpu-total"] or cpu_total
    out += cpu_total
    out += [
        MetricPoint("cpu", dict(per_core[i % len(per_core)].fields), {"cpu": f"cpu{i}"})
        for i in range(cores)
    ]
    if by["disk"]:
        out += [
            MetricPoint(
                "disk",
                dict(by["disk"][0].fields),
                {**by["disk"][0].tags, "path": f"/data{i}", "device": f"sd{i}1"},
            )
            for i in range(disks)
        ]
    if by["diskio"]:
        out += [
            MetricPoint("diskio", dict(by["diskio"][0].fields), {"name": f"sd{i}"})
            for i in range(disks)
        ]
    if by["net"]:
        out += [
            MetricPoint("net", dict(by["net"][0].fields), {"interface": f"eth{i}"})
            for i in range(ifaces)
        ]
    return out


def make_batch(node: str, seq: int, template: list[MetricPoint]) -> MetricBatch:
    """The template with its numbers moved a little per interval (counters grow)."""
    pts = []
    for p in template:
        fields = {
            k: (v + seq if type(v) is int else v * (1 + seq % 7 / 100) if type(v) is float else v)
            for k, v in p.fields.items()
        }
        pts.append(MetricPoint(p.measurement, fields, p.tags))
    return MetricBatch(
        node_id=node,
        seq=seq,
        ts=BASE_TS + seq * 10_000_000_000,
        points=pts,
        tags={
            "node": node,
            "infra": "inf1",
            "group": "g1",
            "provider": "aws",
            "region": "us-east-1",
            "zone": "us-east-1a",
        },
    )


def bench_encode(batches: list[MetricBatch]) -> float:
    enc = LineEncoder()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        n = sum(enc.encode(b).count(b"\n") for b in batches)
        best = max(best, n / (time.perf_counter() - start))
    return best


def chunks(batches: list[MetricBatch], size: int) -> list[tuple[bytes, int]]:
    enc, out, buf, n = LineEncoder(), [], [], 0
    for b in batches:
        lines = enc.encode(b)
        buf.append(lines)
        n += lines.count(b"\n")
        if n >= size:
            out.append((b"".join(buf), n))
            buf, n = [], 0
    if buf:
        out.append((b"".join(buf), n))
    return out


async def direct(sink: Sink, data: list[tuple[bytes, int]], concurrency: int = 1) -> float:
    """Points/s of bulk writes of pre-encoded chunks through ``sink``."""
    total = sum(n for _, n in data)
    sem = asyncio.Semaphore(concurrency)

    async def one(lines: bytes, n: int) -> None:
        async with sem:
            await sink.write(lines, points=n)

    start = time.perf_counter()
    await asyncio.gather(*(one(lines, n) for lines, n in data))
    return total / (time.perf_counter() - start)


async def pipeline(
    nats_url: str,
    sink: Sink,
    payloads: list[tuple[str, bytes]],
    total: int,
    workers: int,
    *,
    drain: bool = False,
) -> float:
    """Points/s through the workers. ``drain``: the stream is filled before they start;
    otherwise a child process publishes while they ingest (bench/_publish.py)."""
    nc = await nats.connect(nats_url)
    publisher = None
    try:
        js = nc.jetstream()
        await ensure_stream(js, metrics_stream_config(subjects=Subjects().stream_subjects_metrics))
        await js.purge_stream(METRICS)
        if drain:
            for i in range(0, len(payloads), 500):
                for subject, data in payloads[i : i + 500]:
                    await js.publish_async(subject, data)
                await js.publish_async_completed()
        else:
            publisher = await _publisher(nats_url, payloads)
        async with _workers(js, sink, workers) as ws:
            start = time.perf_counter()
            if publisher is not None:
                assert publisher.stdin is not None
                publisher.stdin.write(b"go\n")
                await publisher.stdin.drain()
            # the workers' counters are plain ints, there is no event to await
            while sum(w.stats.points for w in ws) < total:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return total / (time.perf_counter() - start)
    finally:
        if publisher is not None:
            if publisher.returncode is None:
                publisher.kill()
            await publisher.wait()
        await nc.close()


async def _publisher(
    nats_url: str, payloads: list[tuple[str, bytes]]
) -> asyncio.subprocess.Process:
    """The publishing child, connected and waiting for its start line."""
    path = Path(tempfile.gettempdir()) / f"barista-bench-payloads-{os.getpid()}.msgpack"
    path.write_bytes(msgspec.msgpack.encode(payloads))
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("_publish.py")),
            nats_url,
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        if line.strip() != b"ready":
            child.kill()
            await child.wait()
            raise RuntimeError(f"publisher did not start: {line!r}")
        return child
    finally:
        # the child has read it (it says ready only after): the file can go now
        path.unlink(missing_ok=True)


async def settle(pid: int, *, quiet: float = 10.0, limit: float = 20.0) -> None:
    """Wait until influxd uses under ``quiet`` % of a core (background compactions done)."""
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    deadline = time.monotonic() + limit
    calm = 0
    while time.monotonic() < deadline and calm < 2:
        await asyncio.sleep(0.5)
        calm = calm + 1 if proc.cpu_percent(None) < quiet else 0


async def pipeline_procs(
    nats_url: str, influx_url: str, db: str, batches: list[MetricBatch], total: int, procs: int
) -> float:
    """The same, with the workers as `barista ingest` processes (one worker each) sharing
    the durable consumer: how ingest scales past one core."""
    import subprocess
    import sys

    nc = await nats.connect(nats_url)
    children = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before the measured part
            [
                sys.executable,
                "-m",
                "controller.cli",
                "ingest",
                "--nats-url",
                nats_url,
                "--influx-kind",
                "influx1",
                "--influx-url",
                influx_url,
                "--influx-db",
                db,
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(procs)
    ]
    try:
        js = nc.jetstream()
        subjects = Subjects()
        await ensure_stream(js, metrics_stream_config(subjects=subjects.stream_subjects_metrics))
        payloads = [(subjects.metrics(b.node_id), encode(b)) for b in batches]
        deadline = time.monotonic() + 30
        while True:  # the workers create the durable consumer when they start
            try:
                await js.consumer_info(METRICS, "ingest")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # every process subscribed
        start = time.perf_counter()
        for i in range(0, len(payloads), 500):
            for subject, data in payloads[i : i + 500]:
                await js.publish_async(subject, data)
            await js.publish_async_completed()
        last = (await js.stream_info(METRICS)).state.last_seq
        while True:  # acked only after InfluxDB took the write
            info = await js.consumer_info(METRICS, "ingest")
            if info.ack_floor.stream_seq >= last:
                break
            await asyncio.sleep(0.01)
        return total / (time.perf_counter() - start)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        await nc.close()


class _workers:
    def __init__(self, js: object, sink: Sink, n: int) -> None:
        self.ws = [
            IngestWorker(js=js, sink=sink, name=f"w{i}", max_wait=0.2)  # type: ignore[arg-type]
            for i in range(n)
        ]

    async def __aenter__(self) -> list[IngestWorker]:
        for w in self.ws:
            await w.start()
        return self.ws

    async def __aexit__(self, *exc: object) -> None:
        for w in self.ws:
            await w.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--intervals", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=4, help="each variant this many times (4: once per position)"
    )
    parser.add_argument("--no-victoria", action="store_true")
    parser.add_argument(
        "--procs", type=int, default=0, help="also measure N `barista ingest` processes (0: skip)"
    )
    parser.add_argument("--cores", type=int, default=64, help="per-core cpu points per batch")
    parser.add_argument("--disks", type=int, default=16, help="disk and diskio points per batch")
    parser.add_argument("--ifaces", type=int, default=8, help="net points per batch")
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="this host's real batch as it is, not widened to a server",
    )
    args = parser.parse_args()

    real = real_points()
    template = (
        real if args.host_only else server_template(real, args.cores, args.disks, args.ifaces)
    )
    batches = [
        make_batch(f"n{n}", s, template) for s in range(args.intervals) for n in range(args.nodes)
    ]
    data = chunks(batches, 5000)
    total = sum(n for _, n in data)
    result: dict[str, object] = {
        "bench": "ingest",
        "points": total,
        "batches": len(batches),
        "points_per_batch": len(template),
        "workers": args.workers,
        "msg_bytes": len(encode(batches[0])),
    }
    result["encode_lines_per_s"] = round(bench_encode(batches))

    with tempfile.TemporaryDirectory(prefix="barista-bench-ingest-") as tmp:
        root = Path(tmp)
        natsd = NatsServer(data_dir=root / "nats", auth=False)
        influx = InfluxDB1(root / "influx")
        natsd.start()
        try:
            influx.start()
            assert influx.proc is not None
            runs: dict[str, list[float]] = {k: [] for k in VARIANTS}
            payloads = [(Subjects().metrics(b.node_id), encode(b)) for b in batches]
            for r in range(args.rounds):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for kind in order:
                    db = f"{kind}_{r}"
                    influx.create_db(db)
                    sink = InfluxV1Sink(influx.url, db)
                    try:
                        if kind.startswith("direct"):
                            pps = await direct(sink, data, int(kind[-1]))
                        else:
                            pps = await pipeline(
                                natsd.url,
                                sink,
                                payloads,
                                total,
                                args.workers,
                                drain=kind == "drain",
                            )
                    finally:
                        await sink.close()
                    runs[kind].append(pps)
                    print(
                        f"round {r + 1}/{args.rounds} {kind}: {pps:,.0f} points/s", file=sys.stderr
                    )
                    await settle(influx.proc.pid)
            med = {k: statistics.median(v) for k, v in runs.items()}
            baseline = max(med["direct1"], med["direct2"])
            result.update(
                value=round(med["live"]),
                baseline=round(baseline),
                ratio=round(med["live"] / baseline, 3),
                drain_value=round(med["drain"]),
                drain_ratio=round(med["drain"] / baseline, 3),
                rounds=args.rounds,
                runs={k: [round(x) for x in v] for k, v in runs.items()},
            )
            if args.procs:
                influx.create_db("procs")
                pv = await pipeline_procs(
                    natsd.url, influx.url, "procs", batches, total, args.procs
                )
                result.update(
                    procs=args.procs, procs_value=round(pv), procs_ratio=round(pv / baseline, 3)
                )
            if not args.no_victoria:
                result.update(await sinks_on_victoria(root / "vm", data))
        finally:
            influx.stop()
            natsd.stop()
    print(json.dumps(result))


async def sinks_on_victoria(root: Path, data: list[tuple[bytes, int]]) -> dict[str, int]:
    """The same chunks through the v1 sink (/write, pre-gzipped in a thread) and the v2 sink
    (influxdb-client async, which gzips inside the loop)."""
    vm = Victoria(root)
    vm.start()
    out = {}
    try:
        sinks: list[tuple[str, Sink]] = [
            ("victoria_v1_sink_pps", InfluxV1Sink(vm.url, "b")),
            ("victoria_v2_sink_pps", InfluxV2Sink(vm.url, "t", "o", "b")),
        ]
        for name, sink in sinks:
            try:
                out[name] = round(await direct(sink, data))
            finally:
                await sink.close()
    finally:
        vm.stop()
    return out


if __name__ == "__main__":
    asyncio.run(main())
