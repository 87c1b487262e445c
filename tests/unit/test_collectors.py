"""The psutil collectors against this machine's real /proc, and the set that isolates them."""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil
import pytest

from agent.collectors.base import (
    MAX_TAG_VALUES,
    Collector,
    CollectorOptions,
    MetricPoint,
    cap_names,
)
from agent.collectors.cpu import CpuCollector
from agent.collectors.disk import DiskCollector
from agent.collectors.diskio import DiskIOCollector
from agent.collectors.mem import MemCollector
from agent.collectors.net import NetCollector
from agent.collectors.scheduler import (
    DEFAULT_COLLECTORS,
    CollectorSet,
    build_collectors,
)
from protocol.codec import decode, encode
from protocol.messages import MetricBatch

# collector -> (measurement -> (tag keys, fields that must be present))
EXPECTED: dict[str, dict[str, tuple[set[str], set[str]]]] = {
    "cpu": {
        "cpu": (
            {"cpu"},
            {
                "usage_user", "usage_system", "usage_idle", "usage_iowait", "usage_irq",
                "usage_softirq", "usage_steal", "usage_guest", "usage_nice", "usage_active",
            },
        )
    },
    "mem": {
        "mem": (set(), {"total", "available", "used", "free", "available_percent",
                        "used_percent"}),
        "swap": (set(), {"total", "used", "free", "used_percent", "in", "out"}),
    },
    "disk": {
        "disk": (
            {"path", "device", "fstype", "mode"},
            {"total", "free", "used", "used_percent", "inodes_total", "inodes_free",
             "inodes_used"},
        )
    },
    "diskio": {
        "diskio": ({"name"}, {"reads", "writes", "read_bytes", "write_bytes", "read_time",
                              "write_time"}),
    },
    "net": {
        "net": (
            {"interface"},
            {"bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "err_in", "err_out",
             "drop_in", "drop_out"},
        )
    },
    "load": {"system": (set(), {"load1", "load5", "load15", "n_cpus"})},
    "system": {"system": (set(), {"uptime", "boot_time", "n_users"})},
    "processes": {
        "processes": (
            set(),
            {"total", "running", "sleeping", "stopped", "zombies", "idle", "blocked",
             "total_threads"},
        )
    },
    "kernel": {"kernel": (set(), {"interrupts", "context_switches", "processes_forked",
                                  "boot_time"})},
    "kernel_vmstat": {"kernel_vmstat": (set(), {"pgmajfault", "pgfault"})},
    "pressure": {"pressure": ({"resource", "type"}, {"avg10", "avg60", "avg300", "total"})},
    "nstat": {"nstat": ({"name"}, set())},
    "netstat": {"netstat": (set(), {"tcp_inuse", "tcp_orphan", "tcp_time_wait"})},
    "conntrack": {"conntrack": (set(), {"ip_conntrack_count", "ip_conntrack_max"})},
    "linux_sysctl_fs": {"linux_sysctl_fs": (set(), {"file-nr", "file-max", "inode-nr"})},
    "timex": {"timex": (set(), {"sync_status", "offset_seconds", "maxerror_seconds",
                                "frequency_adjustment_ratio", "status"})},
    "link": {"link": ({"interface"}, {"up", "admin_up", "mtu", "speed"})},
}  # fmt: skip
# Fields that may be negative: a signed clock offset or frequency, "unknown" link speed
# (-1), and the few nstat counters the kernel prints signed (TcpMaxConn is -1).
SIGNED = {"offset_seconds", "frequency_adjustment_ratio", "speed", "TcpMaxConn"}

CPU_PARTS = (
    "usage_user", "usage_system", "usage_idle", "usage_nice", "usage_iowait", "usage_irq",
    "usage_softirq", "usage_steal", "usage_guest", "usage_guest_nice",
)  # fmt: skip


def _cpu_total() -> float:
    return float(sum(psutil.cpu_times()))


def _let_cpu_time_pass() -> None:
    """Spin until the kernel's CPU counters advance, so a cpu delta is never empty."""
    start = _cpu_total()
    deadline = time.monotonic() + 5
    while _cpu_total() - start < 0.05 and time.monotonic() < deadline:
        sum(range(10_000))


def _collect_twice(collector: Collector) -> list[MetricPoint]:
    collector.collect()
    _let_cpu_time_pass()
    return collector.collect()


def _by(points: list[MetricPoint], measurement: str) -> list[MetricPoint]:
    return [p for p in points if p.measurement == measurement]


@pytest.mark.parametrize("name", DEFAULT_COLLECTORS)
def test_collector_emits_documented_shape(name: str) -> None:
    (collector,) = build_collectors([name])
    assert collector.name == name
    points = _collect_twice(collector)
    expected = EXPECTED[name]
    by_measurement = {p.measurement for p in points}
    assert by_measurement <= set(expected)
    # Every machine this runs on has CPUs, memory, a root filesystem and processes.
    if name in ("cpu", "mem", "load", "system", "processes", "disk", "kernel",
                "kernel_vmstat", "nstat", "netstat", "linux_sysctl_fs", "link"):
        assert by_measurement == set(expected)
    for p in points:
        tag_keys, fields = expected[p.measurement]
        assert set(p.tags) == tag_keys, p
        assert fields <= set(p.fields), (fields - set(p.fields), p)
        for key, value in p.fields.items():
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, p)
            assert value >= 0 or key in SIGNED, (key, p)
        assert all(isinstance(v, str) and v for v in p.tags.values()), p
        assert p.ts == 0


def test_points_survive_the_wire() -> None:
    points, errors = CollectorSet(build_collectors()).collect_all()
    assert errors == {}
    batch = MetricBatch(node_id="n1", seq=1, ts=time.time_ns(), points=points)
    assert decode(encode(batch), MetricBatch).points == points


def test_cpu_percentages_sum_to_100() -> None:
    cpu = CpuCollector()
    assert cpu.collect() == []  # the first call only primes
    _let_cpu_time_pass()
    points = cpu.collect()
    tags = {p.tags["cpu"] for p in points}
    assert "cpu-total" in tags
    assert tags - {"cpu-total"} <= {f"cpu{i}" for i in range(psutil.cpu_count() or 1)}
    for p in points:
        values = [float(p.fields[k]) for k in CPU_PARTS]
        assert all(0.0 <= v <= 100.0 for v in values), p
        assert sum(values) == pytest.approx(100.0, abs=0.5), p
        active = float(p.fields["usage_active"])
        assert active == pytest.approx(100.0 - float(p.fields["usage_idle"]), abs=0.01)
    total = next(p for p in points if p.tags["cpu"] == "cpu-total")
    assert float(total.fields["usage_active"]) > 0  # _let_cpu_time_pass burnt some CPU


def test_cpu_state_belongs_to_the_instance() -> None:
    first = CpuCollector()
    first.collect()
    _let_cpu_time_pass()
    assert first.collect() != []
    # A second agent in the same process starts from scratch: no shared module state.
    assert CpuCollector().collect() == []


def test_mem_and_swap_values_are_sane() -> None:
    points = MemCollector().collect()
    (mem,) = _by(points, "mem")
    (swap,) = _by(points, "swap")
    f = mem.fields
    assert 0 < int(f["used"]) <= int(f["total"])
    assert 0 < int(f["available"]) <= int(f["total"])
    assert int(f["free"]) <= int(f["total"])
    assert 0 <= float(f["used_percent"]) <= 100
    assert 0 <= float(f["available_percent"]) <= 100
    assert float(f["used_percent"]) == pytest.approx(100 * int(f["used"]) / int(f["total"]))
    s = swap.fields
    assert int(s["used"]) <= int(s["total"])
    assert 0 <= float(s["used_percent"]) <= 100


def test_disk_values_are_sane_and_pseudo_filesystems_skipped() -> None:
    points = DiskCollector().collect()
    assert any(p.tags["path"] == "/" for p in points)
    for p in points:
        f = p.fields
        assert p.tags["fstype"] not in {"tmpfs", "proc", "sysfs", "overlay", "devtmpfs"}
        assert not p.tags["device"].startswith("/dev/")
        assert p.tags["mode"] in {"ro", "rw"}
        assert int(f["used"]) <= int(f["total"])
        assert int(f["free"]) <= int(f["total"])
        assert 0 <= float(f["used_percent"]) <= 100
        assert int(f["inodes_used"]) + int(f["inodes_free"]) == int(f["inodes_total"])
    assert len({p.tags["path"] for p in points}) == len(points)  # one point per mount


def test_counters_never_go_backwards(tmp_path: os.PathLike[str]) -> None:
    first, _ = CollectorSet(build_collectors(["diskio", "net", "mem"])).collect_all()
    # Some real I/O between the two samples.
    path = os.path.join(tmp_path, "blob")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    second, _ = CollectorSet(build_collectors(["diskio", "net", "mem"])).collect_all()

    def key(p: MetricPoint) -> tuple[str, tuple[tuple[str, str], ...]]:
        return p.measurement, tuple(sorted(p.tags.items()))

    counters = {
        "diskio": ("reads", "writes", "read_bytes", "write_bytes", "read_time", "write_time",
                   "io_time", "weighted_io_time"),
        "net": ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "err_in",
                "err_out", "drop_in", "drop_out"),
        "swap": ("in", "out"),
    }  # fmt: skip
    before = {key(p): p for p in first if p.measurement in counters}
    after = {key(p): p for p in second if p.measurement in counters}
    common = set(before) & set(after)
    assert {k[0] for k in common} >= {"swap"}
    for k in common:
        for field in counters[k[0]]:
            if field in before[k].fields:
                assert int(after[k].fields[field]) >= int(before[k].fields[field]), (k, field)


def test_net_skips_loopback_unless_an_include_list_names_it() -> None:
    assert all(p.tags["interface"] != "lo" for p in NetCollector().collect())
    if not psutil.net_if_stats()["lo"].isup:
        pytest.skip("lo is down in this network namespace")
    only_lo = NetCollector(CollectorOptions(net_interfaces=("lo",))).collect()
    assert [p.tags["interface"] for p in only_lo] == ["lo"]
    everything = NetCollector(CollectorOptions(net_interfaces=("*",))).collect()
    assert "lo" in {p.tags["interface"] for p in everything}
    ignored = NetCollector(
        CollectorOptions(net_interfaces=("*",), net_ignore_interfaces=("l?",))
    ).collect()
    assert "lo" not in {p.tags["interface"] for p in ignored}


def test_load_and_system_values_are_sane() -> None:
    points, errors = CollectorSet(build_collectors(["load", "system"])).collect_all()
    assert errors == {}
    load, system = points
    assert load.fields["n_cpus"] == psutil.cpu_count()
    assert float(load.fields["load1"]) >= 0
    assert int(system.fields["boot_time"]) <= time.time()
    assert int(system.fields["uptime"]) >= 0


def test_processes_counts_add_up() -> None:
    (collector,) = build_collectors(["processes"])
    (point,) = collector.collect()
    f = {k: int(v) for k, v in point.fields.items()}
    states = sum(v for k, v in f.items() if k not in ("total", "total_threads"))
    assert states == f["total"]
    assert f["total"] >= 1
    assert f["running"] >= 1  # this test process is running while it reads /proc
    assert f["total_threads"] >= f["total"]
    assert point.tags == {}  # counts only, never per-process tags


class Boom:
    """A collector that fails until told to recover."""

    name = "boom"

    def __init__(self) -> None:
        self.broken = True

    def collect(self) -> list[MetricPoint]:
        if self.broken:
            raise RuntimeError("sensor on fire")
        return [MetricPoint("boom", {"ok": 1})]


def test_failing_collector_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    boom = Boom()
    cset = CollectorSet([boom, MemCollector()])
    caplog.set_level(logging.INFO, logger="barista.agent.collectors")

    for _ in range(3):
        points, errors = cset.collect_all()
        assert {p.measurement for p in points} == {"mem", "swap"}
        assert errors == {"boom": "RuntimeError: sensor on fire"}
    assert cset.failures == {"boom": 3}
    failed = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failed) == 1  # rate-limited: once per outage, not per interval
    assert failed[0].exc_info is not None

    boom.broken = False
    points, errors = cset.collect_all()
    assert errors == {}
    assert "boom" in {p.measurement for p in points}
    assert any("recovered" in r.getMessage() for r in caplog.records)

    boom.broken = True
    cset.collect_all()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert cset.failures == {"boom": 4}
    assert set(cset.last_duration_ms) == {"boom", "mem"}


async def test_collect_async_runs_off_the_event_loop() -> None:
    seen: list[int] = []

    class Where:
        name = "where"

        def collect(self) -> list[MetricPoint]:
            seen.append(threading.get_ident())
            return [MetricPoint("where", {"n": 1})]

    points, errors = await CollectorSet([Where(), Boom()]).collect_async()
    assert [p.measurement for p in points] == ["where"]
    assert "boom" in errors
    assert seen and seen[0] != threading.get_ident()


def test_build_collectors_by_name() -> None:
    assert tuple(c.name for c in build_collectors()) == DEFAULT_COLLECTORS
    assert [c.name for c in build_collectors(["net", "cpu", "net"])] == ["net", "cpu"]
    # Fresh instances every time: two agents never share cpu state.
    a, b = build_collectors(["cpu"]), build_collectors(["cpu"])
    assert a[0] is not b[0]


def test_build_collectors_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown collector\(s\) 'gpu'.*valid: cpu, mem"):
        build_collectors(["cpu", "gpu"])
    with pytest.raises(ValueError, match="not the string 'cpu'"):
        build_collectors("cpu")


def test_collector_set_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"duplicate collector name.*mem"):
        CollectorSet([MemCollector(), MemCollector()])


def test_cap_names_is_bounded_and_stable() -> None:
    names = [f"veth{i:04d}" for i in range(1000)]
    kept, dropped = cap_names(names, MAX_TAG_VALUES)
    assert len(kept) == MAX_TAG_VALUES and dropped == 1000 - MAX_TAG_VALUES
    assert cap_names(reversed(names), MAX_TAG_VALUES) == (kept, dropped)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        cap_names(names, -1)


def test_caps_bound_real_tag_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="barista.agent.collectors")
    capped: list[Collector] = [
        DiskCollector(max_mounts=1),
        DiskIOCollector(max_devices=1),
        # lo plus eth0 here: 2 > 1
        NetCollector(CollectorOptions(net_interfaces=("*",)), max_interfaces=1),
    ]
    for collector in capped:
        for _ in range(3):
            assert len(collector.collect()) <= 1
    if sum(st.isup for st in psutil.net_if_stats().values()) > 1:
        assert any(
            "network interfaces over the cap" in r.getMessage() for r in caplog.records
        )
    if (psutil.cpu_count() or 1) > 1:
        cpu = CpuCollector(max_cpus=1)
        points = _collect_twice(cpu)
        assert {p.tags["cpu"] for p in points} == {"cpu-total"}


def test_tag_values_do_not_grow_across_intervals() -> None:
    cset = CollectorSet(build_collectors())
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    sizes = []
    for _ in range(5):
        _let_cpu_time_pass()
        points, errors = cset.collect_all()
        assert errors == {}
        for p in points:
            seen.setdefault(p.measurement, set()).add(tuple(sorted(p.tags.items())))
        sizes.append(sum(len(v) for v in seen.values()))
    assert sizes[-1] == sizes[1]  # after the cpu priming call, no new series appear
    for measurement, series in seen.items():
        # cpu: one per core plus cpu-total; everything else within the per-tag cap.
        assert len(series) <= MAX_TAG_VALUES + 1, measurement
