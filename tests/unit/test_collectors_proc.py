"""Every value the collectors derive, checked against the kernel's files read directly here.

Each test reads the /proc files it needs once, copies them into a snapshot directory, runs
the collector on that snapshot and recomputes every field from the same bytes with
Telegraf's (gopsutil's) formulas written out independently below. A second check runs the
collector on the live /proc for the values that do not move between two reads.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from agent.collectors.base import CollectorOptions, MetricPoint
from agent.collectors.conntrack import ConntrackCollector
from agent.collectors.disk import DiskCollector
from agent.collectors.kernel import KernelCollector
from agent.collectors.link import LinkCollector
from agent.collectors.mem import MemCollector
from agent.collectors.net import NetCollector
from agent.collectors.netstat import NetstatCollector
from agent.collectors.nstat import NstatCollector
from agent.collectors.pressure import PressureCollector
from agent.collectors.sysctl_fs import SysctlFsCollector
from agent.collectors.system import SystemCollector
from agent.collectors.timex import TimexCollector
from agent.collectors.vmstat import VmstatCollector

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")


def snapshot(tmp: Path, *files: str) -> CollectorOptions:
    """Copy /proc/<file> for each file that exists into tmp/<file>; options pointing there."""
    for name in files:
        src = Path("/proc") / name
        if not src.exists():
            continue
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return CollectorOptions(proc=str(tmp))


def meminfo_kb(text: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+):\s+(\d+)", text, re.M)}


def one(points: list[MetricPoint], measurement: str) -> MetricPoint:
    (point,) = [p for p in points if p.measurement == measurement]
    return point


def test_mem_fields_are_telegrafs_formulas_on_meminfo(tmp_path: Path) -> None:
    opts = snapshot(tmp_path, "meminfo", "vmstat")
    raw = meminfo_kb((tmp_path / "meminfo").read_text())
    kb = {k: v * 1024 for k, v in raw.items()}  # every line but HugePages_* is in kB
    points = MemCollector(opts).collect()
    mem, swap = one(points, "mem").fields, one(points, "swap").fields

    cached = kb["Cached"] + kb["SReclaimable"]
    used = kb["MemTotal"] - kb["MemFree"] - kb["Buffers"] - cached
    assert mem["total"] == kb["MemTotal"]
    assert mem["free"] == kb["MemFree"]
    assert mem["buffered"] == kb["Buffers"]
    assert mem["cached"] == cached
    assert mem["used"] == used
    assert mem["available"] == kb["MemAvailable"]
    assert mem["used_percent"] == pytest.approx(100 * used / kb["MemTotal"], rel=1e-12)
    assert mem["available_percent"] == pytest.approx(
        100 * kb["MemAvailable"] / kb["MemTotal"], rel=1e-12
    )
    # The identity Telegraf's used keeps and psutil >= 7.1's does not.
    assert mem["used"] + mem["free"] + mem["buffered"] + mem["cached"] == mem["total"]
    for key, field in {
        "Dirty": "dirty", "Writeback": "write_back", "WritebackTmp": "write_back_tmp",
        "Committed_AS": "committed_as", "CommitLimit": "commit_limit",
        "PageTables": "page_tables", "Slab": "slab", "SReclaimable": "sreclaimable",
        "SUnreclaim": "sunreclaim", "Mapped": "mapped", "SwapCached": "swap_cached",
        "Shmem": "shared", "Active": "active", "Inactive": "inactive",
        "VmallocTotal": "vmalloc_total", "VmallocUsed": "vmalloc_used",
        "VmallocChunk": "vmalloc_chunk", "Hugepagesize": "huge_page_size",
        "SwapTotal": "swap_total", "SwapFree": "swap_free", "HighTotal": "high_total",
        "HighFree": "high_free", "LowTotal": "low_total", "LowFree": "low_free",
    }.items():  # fmt: skip
        assert mem[field] == kb.get(key, 0), field
    assert mem["huge_pages_total"] == raw["HugePages_Total"]  # a count, not kB
    assert mem["huge_pages_free"] == raw["HugePages_Free"]

    vmstat = dict(line.split() for line in (tmp_path / "vmstat").read_text().splitlines())
    assert swap["total"] == kb["SwapTotal"] and swap["free"] == kb["SwapFree"]
    assert swap["used"] == kb["SwapTotal"] - kb["SwapFree"]
    assert swap["in"] == int(vmstat["pswpin"]) * 4096
    assert swap["out"] == int(vmstat["pswpout"]) * 4096

    live = one(MemCollector().collect(), "mem").fields
    assert live["total"] == meminfo_kb(Path("/proc/meminfo").read_text())["MemTotal"] * 1024


def test_kernel_and_vmstat_fields_are_the_kernels_counters(tmp_path: Path) -> None:
    opts = snapshot(tmp_path, "stat", "vmstat", "sys/kernel/random/entropy_avail")
    stat = {
        line.split()[0]: line.split()[1:] for line in (tmp_path / "stat").read_text().splitlines()
    }
    kernel = one(KernelCollector(opts).collect(), "kernel").fields
    assert kernel["interrupts"] == int(stat["intr"][0])
    assert kernel["context_switches"] == int(stat["ctxt"][0])
    assert kernel["processes_forked"] == int(stat["processes"][0])
    assert kernel["boot_time"] == int(stat["btime"][0])
    entropy = tmp_path / "sys/kernel/random/entropy_avail"
    if entropy.exists():
        assert kernel["entropy_avail"] == int(entropy.read_text())

    vm = one(VmstatCollector(opts).collect(), "kernel_vmstat").fields
    expected = {k: int(v) for k, v in
                (line.split() for line in (tmp_path / "vmstat").read_text().splitlines())}
    assert vm == expected
    assert "pgmajfault" in vm  # major page faults; oom_kill exists since Linux 4.13
    system = one(SystemCollector(opts).collect(), "system").fields
    assert system["boot_time"] == int(stat["btime"][0])


def test_pressure_is_proc_pressure(tmp_path: Path) -> None:
    files = [f"pressure/{r}" for r in ("cpu", "memory", "io")]
    opts = snapshot(tmp_path, *files)
    if not (tmp_path / "pressure/cpu").exists():
        pytest.skip("kernel without PSI")
    points = PressureCollector(opts).collect()
    got = {(p.tags["resource"], p.tags["type"]): p.fields for p in points}
    expected = {}
    for name in files:
        resource = name.split("/")[1]
        for line in (tmp_path / name).read_text().splitlines():
            kind, *items = line.split()
            if resource == "cpu" and kind == "full":
                continue  # Telegraf leaves it out
            values = dict(item.split("=") for item in items)
            expected[(resource, kind)] = {
                "avg10": float(values["avg10"]), "avg60": float(values["avg60"]),
                "avg300": float(values["avg300"]), "total": int(values["total"]),
            }  # fmt: skip
    assert got == expected
    assert ("cpu", "some") in got and ("memory", "full") in got and ("io", "some") in got


def test_nstat_has_telegrafs_names_and_every_counter(tmp_path: Path) -> None:
    opts = snapshot(tmp_path, "net/netstat", "net/snmp", "net/snmp6")
    by_name = {p.tags["name"]: p.fields for p in NstatCollector(opts).collect()}
    for file in ("netstat", "snmp"):
        lines = (tmp_path / "net" / file).read_text().splitlines()
        expected = {}
        for header, values in zip(lines[::2], lines[1::2], strict=True):
            prefix = header.split()[0][:-1]
            for k, v in zip(header.split()[1:], values.split()[1:], strict=True):
                expected[prefix + k] = int(v)
        assert by_name[file] == expected
    snmp = by_name["snmp"]
    netstat = by_name["netstat"]
    for field in ("TcpRetransSegs", "TcpCurrEstab", "TcpInSegs"):
        assert field in snmp
    for field in ("TcpExtListenDrops", "TcpExtListenOverflows"):
        assert field in netstat
    if (tmp_path / "net/snmp6").exists():
        expected6 = {k: int(v) for k, v in
                     (line.split() for line in (tmp_path / "net/snmp6").read_text().splitlines())}
        assert by_name["snmp6"] == expected6


def test_netstat_is_sockstat(tmp_path: Path) -> None:
    opts = snapshot(tmp_path, "net/sockstat", "net/sockstat6")
    fields = one(NetstatCollector(opts).collect(), "netstat").fields
    tcp = (tmp_path / "net/sockstat").read_text().split("TCP:")[1].split("\n")[0].split()
    tcp_map = dict(zip(tcp[::2], map(int, tcp[1::2]), strict=True))
    assert fields["tcp_inuse"] == tcp_map["inuse"]
    assert fields["tcp_orphan"] == tcp_map["orphan"]
    assert fields["tcp_time_wait"] == tcp_map["tw"]
    assert fields["tcp_alloc"] == tcp_map["alloc"]
    used = re.search(r"sockets: used (\d+)", (tmp_path / "net/sockstat").read_text())
    assert used is not None and fields["sockets_used"] == int(used[1])


def test_sysctl_fs_and_conntrack_against_their_limits(tmp_path: Path) -> None:
    files = ["file-nr", "inode-state", "dentry-state", "aio-nr", "aio-max-nr"]
    opts = snapshot(tmp_path, *(f"sys/fs/{f}" for f in files),
                    "sys/net/netfilter/nf_conntrack_count", "sys/net/netfilter/nf_conntrack_max")
    fs = one(SysctlFsCollector(opts).collect(), "linux_sysctl_fs").fields
    allocated, _unused, maximum = (tmp_path / "sys/fs/file-nr").read_text().split()
    assert fs["file-nr"] == int(allocated) and fs["file-max"] == int(maximum)
    inode = (tmp_path / "sys/fs/inode-state").read_text().split()
    assert (fs["inode-nr"], fs["inode-free-nr"], fs["inode-preshrink-nr"]) == tuple(
        map(int, inode[:3])
    )
    dentry = (tmp_path / "sys/fs/dentry-state").read_text().split()
    assert fs["dentry-nr"] == int(dentry[0]) and fs["dentry-unused-nr"] == int(dentry[1])
    assert fs["aio-max-nr"] == int((tmp_path / "sys/fs/aio-max-nr").read_text())
    live = one(SysctlFsCollector().collect(), "linux_sysctl_fs").fields
    assert live["file-max"] == int(Path("/proc/sys/fs/file-max").read_text())

    count = tmp_path / "sys/net/netfilter/nf_conntrack_count"
    points = ConntrackCollector(opts).collect()
    if not count.exists():
        assert points == []  # module not loaded: nothing tracked, no point
        return
    ct = one(points, "conntrack").fields
    assert ct["ip_conntrack_count"] == float(count.read_text())
    assert ct["ip_conntrack_max"] == float(
        (tmp_path / "sys/net/netfilter/nf_conntrack_max").read_text()
    )


def test_net_counters_are_proc_net_dev(tmp_path: Path) -> None:
    opts = snapshot(tmp_path, "net/dev")
    opts = CollectorOptions(proc=opts.proc, net_interfaces=("*",))
    got = {p.tags["interface"]: p.fields for p in NetCollector(opts).collect()}
    for line in (tmp_path / "net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        name, cols = name.strip(), [int(c) for c in rest.split()]
        if name not in got:
            continue  # down
        assert got[name] == {
            "bytes_recv": cols[0], "packets_recv": cols[1], "err_in": cols[2],
            "drop_in": cols[3], "bytes_sent": cols[8], "packets_sent": cols[9],
            "err_out": cols[10], "drop_out": cols[11],
        }, name  # fmt: skip
    assert "lo" in got  # an include list that matches lo reports it


def test_link_state_mtu_and_speed_are_the_interfaces() -> None:
    opts = CollectorOptions(net_interfaces=("*",))
    links = {p.tags["interface"]: p.fields for p in LinkCollector(opts).collect()}
    assert "lo" in links
    for name, fields in links.items():
        sysfs = Path("/sys/class/net") / name
        if not sysfs.exists() or int((sysfs / "ifindex").read_text()) != socket.if_nametoindex(
            name
        ):
            continue  # sysfs of another network namespace: nothing to compare with
        flags = int((sysfs / "flags").read_text(), 16)
        assert fields["admin_up"] == (flags & 0x1 != 0), name
        assert fields["mtu"] == int((sysfs / "mtu").read_text()), name
        try:
            speed = int((sysfs / "speed").read_text())
        except OSError:
            speed = -1
        assert fields["speed"] == (speed if speed >= 0 else -1), name
    assert links["lo"]["mtu"] == int(Path("/sys/class/net/lo/mtu").read_text())
    # Down interfaces are reported by link (that is its point), not by net.
    down = [n for n, f in links.items() if not f["admin_up"]]
    net = {p.tags["interface"] for p in NetCollector(opts).collect()}
    assert not set(down) & net


def test_timex_reads_the_kernels_clock_state() -> None:
    (point,) = TimexCollector().collect()
    f = point.fields
    assert f["sync_status"] in (0, 1)
    # STA_UNSYNC (0x40) set <=> the kernel says TIME_ERROR for an unsynchronised clock.
    assert (int(f["status"]) & 0x40 != 0) == (f["sync_status"] == 0) or f["sync_status"] == 1
    assert float(f["maxerror_seconds"]) >= 0 and float(f["tick_seconds"]) > 0
    assert 0.99 < float(f["frequency_adjustment_ratio"]) < 1.01  # within ±500 ppm


def test_a_failing_statvfs_is_reported_not_skipped(tmp_path: Path) -> None:
    # A mount table naming a mount point that cannot be statvfs'd by us: a path through
    # a regular file gives ENOTDIR, the same path the collector takes for EIO or ESTALE.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "self").mkdir()
    (tmp_path / "self/mounts").write_text(
        f"/dev/vdz {blocker}/mnt ext4 rw,relatime 0 0\n/dev/vda / ext4 ro 0 0\n"
    )
    (tmp_path / "filesystems").write_text("nodev\tproc\n\text4\n")
    points = DiskCollector(CollectorOptions(proc=str(tmp_path))).collect()
    by_path = {p.tags["path"]: p for p in points}
    bad = by_path[f"{blocker}/mnt"]
    assert bad.fields == {"device_error": 20}  # ENOTDIR
    assert bad.tags == {"path": f"{blocker}/mnt", "device": "vdz", "fstype": "ext4",
                        "mode": "rw"}
    assert by_path["/"].fields["device_error"] == 0 and by_path["/"].tags["mode"] == "ro"


def test_disk_globs_choose_mounts_and_filesystems(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "data dir").mkdir()
    (tmp_path / "self/mounts").write_text(
        f"/dev/vda / ext4 rw 0 0\nserver:/x {tmp_path} nfs4 rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        f"/dev/vdb {tmp_path}/data\\040dir xfs rw 0 0\n"  # a space, as the kernel writes it
    )
    (tmp_path / "filesystems").write_text("nodev\ttmpfs\nnodev\tnfs4\n\text4\n\txfs\n")
    data = f"{tmp_path}/data dir"

    def paths(**kw: tuple[str, ...]) -> set[str]:
        opts = CollectorOptions(proc=str(tmp_path), **kw)  # type: ignore[arg-type]
        return {p.tags["path"] for p in DiskCollector(opts).collect()}

    assert paths() == {"/", data}  # nodev types (tmpfs, nfs4) left out by default
    assert paths(disk_mount_points=(f"{tmp_path}/*",)) == {data}
    assert paths(disk_ignore_mount_points=(f"{tmp_path}*",)) == {"/"}
    assert paths(disk_fs=("tmpfs",), disk_ignore_fs=()) == {"/run"}
    assert paths(disk_fs=("nfs*",), disk_ignore_fs=()) == {str(tmp_path)}
