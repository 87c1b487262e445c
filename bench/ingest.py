"""Ingest throughput: points/s through NATS -> JetStream -> IngestWorker -> InfluxDB 1.x,
against direct bulk line-protocol writes of the same points to the same influxd.

Prints one JSON line. Also reports batch_to_lines lines/s, and the v1 (/write, aiohttp)
against the v2 (influxdb-client async) sink on VictoriaMetrics. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.ingest.lineproto import LineEncoder
from controller.ingest.sinks import InfluxV1Sink, InfluxV2Sink, Sink
from controller.ingest.worker import IngestWorker, ensure_metrics_stream
from controller.natsd import NatsServer
from protocol.codec import encode
from protocol.messages import MetricBatch, MetricPoint
from protocol.subjects import Subjects
from tests.fixtures.influx import InfluxDB1, Victoria

BASE_TS = 1_700_000_000_000_000_000


def make_batch(node: str, seq: int, cores: int = 4) -> MetricBatch:
    """What one agent sends per interval (~20 points, ~120 fields): Telegraf-like schema."""
    pts = [
        MetricPoint(
            "cpu",
            {f: 1.5 + i + seq % 7 for i, f in enumerate(
                ["usage_user", "usage_system", "usage_idle", "usage_iowait", "usage_irq",
                 "usage_softirq", "usage_steal", "usage_active"])},
            {"cpu": c},
        )
        for c in ["cpu-total", *(f"cpu{i}" for i in range(cores))]
    ]
    pts.append(MetricPoint("mem", {
        "total": 8 << 30, "available": 4 << 30, "used": 3 << 30, "free": 1 << 30,
        "used_percent": 37.5, "available_percent": 50.0, "cached": 123456, "buffers": 1234}))
    pts.append(MetricPoint("swap", {"total": 1000, "used": 0, "free": 1000, "used_percent": 0.0}))
    for path in ["/", "/boot"]:
        pts.append(MetricPoint("disk", {
            "total": 100, "used": 50 + seq, "free": 50, "used_percent": 50.0,
            "inodes_total": 10, "inodes_used": 5},
            {"path": path, "device": "sda1", "fstype": "ext4"}))
    for dev in ["sda", "sdb"]:
        pts.append(MetricPoint("diskio", {
            "reads": seq, "writes": 2, "read_bytes": 3, "write_bytes": 4, "read_time": 5,
            "write_time": 6, "io_time": 7}, {"name": dev}))
    for iface in ["eth0", "lo"]:
        pts.append(MetricPoint("net", {
            "bytes_sent": seq, "bytes_recv": 2 * seq, "packets_sent": 3, "packets_recv": 4,
            "err_in": 0, "err_out": 0, "drop_in": 0, "drop_out": 0}, {"interface": iface}))
    pts.append(MetricPoint("system", {
        "load1": 0.5, "load5": 0.4, "load15": 0.3, "n_cpus": cores, "uptime": 1000 + seq,
        "n_users": 1}))
    pts.append(MetricPoint("processes", {"total": 100, "running": 2, "sleeping": 98, "zombies": 0}))
    return MetricBatch(
        node_id=node, seq=seq, ts=BASE_TS + seq * 10_000_000_000, points=pts,
        tags={"node": node, "infra": "inf1", "group": "g1", "provider": "aws",
              "region": "us-east-1", "zone": "us-east-1a"},
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
    nats_url: str, sink: Sink, batches: list[MetricBatch], total: int, workers: int
) -> float:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subjects = Subjects()
        await ensure_metrics_stream(js, subjects=subjects.stream_subjects_metrics)
        payloads = [(subjects.metrics(b.node_id), encode(b)) for b in batches]
        async with _workers(js, sink, workers) as ws:
            start = time.perf_counter()
            for i in range(0, len(payloads), 500):
                for subject, data in payloads[i : i + 500]:
                    await js.publish_async(subject, data)
                await js.publish_async_completed()
            # the workers' counters are plain ints, there is no event to await
            while sum(w.stats.points for w in ws) < total:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return total / (time.perf_counter() - start)
    finally:
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
    parser.add_argument("--no-victoria", action="store_true")
    args = parser.parse_args()

    batches = [make_batch(f"n{n}", s) for s in range(args.intervals) for n in range(args.nodes)]
    data = chunks(batches, 5000)
    total = sum(n for _, n in data)
    result: dict[str, object] = {"bench": "ingest", "points": total, "batches": len(batches)}
    result["encode_lines_per_s"] = round(bench_encode(batches))

    with tempfile.TemporaryDirectory(prefix="barista-bench-ingest-") as tmp:
        root = Path(tmp)
        natsd = NatsServer(data_dir=root / "nats", auth=False)
        influx = InfluxDB1(root / "influx")
        natsd.start()
        try:
            influx.start()
            influx.create_db("direct")
            influx.create_db("pipeline")
            v1 = InfluxV1Sink(influx.url, "direct")
            v1p = InfluxV1Sink(influx.url, "pipeline")
            try:
                baseline = await direct(v1, data)
                value = await pipeline(natsd.url, v1p, batches, total, args.workers)
            finally:
                await v1.close()
                await v1p.close()
            result.update(value=round(value), baseline=round(baseline),
                          ratio=round(value / baseline, 3))
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
        for name, sink in [
            ("victoria_v1_sink_pps", InfluxV1Sink(vm.url, "b")),
            ("victoria_v2_sink_pps", InfluxV2Sink(vm.url, "t", "o", "b")),
        ]:
            try:
                out[name] = round(await direct(sink, data))
            finally:
                await sink.close()
    finally:
        vm.stop()
    return out


if __name__ == "__main__":
    asyncio.run(main())
