"""The collector protocol and the small helpers that every collector shares."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate
from typing import Protocol

from protocol.messages import FieldValue, MetricPoint

__all__ = [
    "MAX_TAG_VALUES",
    "CapWarner",
    "Collector",
    "CollectorOptions",
    "FieldValue",
    "MetricPoint",
    "NameFilter",
    "cap_names",
    "parse_name_values",
    "percent",
    "read_text",
]

# Upper bound on the distinct values a per-item tag (cpu, interface, device, mount path)
# can take on one machine. Every series costs memory in InfluxDB forever, and a machine
# with thousands of veths or loop devices must not blow up the fleet's cardinality.
MAX_TAG_VALUES = 64


class Collector(Protocol):
    """One source of metrics. `collect` is synchronous: psutil reads /proc, which is fast."""

    name: str

    def collect(self) -> list[MetricPoint]: ...


def cap_names(names: Iterable[str], limit: int) -> tuple[list[str], int]:
    """Keep the first `limit` names in sorted order; return them and how many were dropped.

    Sorting makes the kept set stable from one interval to the next, so a series does not
    flicker in and out when the order the kernel lists devices in changes.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ordered = sorted(set(names))
    return ordered[:limit], max(0, len(ordered) - limit)


def percent(part: float, whole: float) -> float:
    """`100 * part / whole`, clamped to [0, 100]; 0 when `whole` is not positive."""
    if whole <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 * part / whole))


class CapWarner:
    """Logs once per collector instance that a cap dropped items, not every interval."""

    def __init__(self, logger: logging.Logger, what: str, limit: int) -> None:
        self._logger = logger
        self._what = what
        self._limit = limit
        self._warned = False

    def dropped(self, count: int) -> None:
        if count > 0 and not self._warned:
            self._warned = True
            self._logger.warning(
                "%d %s over the cap of %d are not reported", count, self._what, self._limit
            )


# Telegraf's default ignore_fs plus the kernel's virtual filesystems: they have no disk
# behind them. The disk collector also drops every "nodev" type of /proc/filesystems (and
# so NFS/CIFS, whose statvfs can hang on a dead server) unless disk_fs names it.
DEFAULT_IGNORE_FS = (
    "tmpfs", "devtmpfs", "devfs", "iso9660", "overlay", "aufs", "squashfs", "ramfs",
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "hugetlbfs", "debugfs",
    "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl", "autofs", "nsfs",
    "binfmt_misc", "rpc_pipefs", "efivarfs", "fuse.lxcfs", "fuse.gvfsd-fuse", "nfs",
    "nfs4", "cifs", "smb3", "sshfs", "fuse.sshfs",
)  # fmt: skip

# Container runtimes and kubelet mount volumes under per-container/per-pod directories
# whose names are ids: as tag values they would grow without bound as pods come and go.
DEFAULT_IGNORE_MOUNT_POINTS = (
    "/var/lib/kubelet/*", "/var/lib/docker/*", "/var/lib/containers/*", "/run/containerd/*",
    "/run/k3s/*", "/snap/*", "/proc/*", "/sys/*",
)  # fmt: skip

# ram disks and loop devices (one per snap on Ubuntu) are not storage.
DEFAULT_IGNORE_DEVICES = ("ram*", "loop*")


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    """What the agent config says about which items to report (globs, fnmatch syntax,
    case-sensitive) and where the kernel's files are (tests point these at a snapshot).

    An empty include list means every item; the exclude list is applied after it. Like
    Telegraf's ``interfaces``, an empty ``net_interfaces`` reports every interface but
    loopback ones, and a list that names ``lo`` (or ``*``) reports it too.
    """

    net_interfaces: tuple[str, ...] = ()
    net_ignore_interfaces: tuple[str, ...] = ()
    disk_mount_points: tuple[str, ...] = ()
    disk_ignore_mount_points: tuple[str, ...] = DEFAULT_IGNORE_MOUNT_POINTS
    disk_fs: tuple[str, ...] = ()
    disk_ignore_fs: tuple[str, ...] = DEFAULT_IGNORE_FS
    diskio_devices: tuple[str, ...] = ()
    diskio_ignore_devices: tuple[str, ...] = DEFAULT_IGNORE_DEVICES
    proc: str = "/proc"
    sys: str = "/sys"


class NameFilter:
    """``include`` / ``exclude`` globs compiled into one regex each (fnmatchcase rules)."""

    __slots__ = ("_exclude", "_include", "include_given")

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        include, exclude = tuple(include), tuple(exclude)
        for pattern in (*include, *exclude):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"a name glob must be a non-empty string, not {pattern!r}")
        self.include_given = bool(include)
        self._include = _globs(include)
        self._exclude = _globs(exclude)

    def __call__(self, name: str) -> bool:
        if self._include is not None and self._include.match(name) is None:
            return False
        return self._exclude is None or self._exclude.match(name) is None


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


def read_text(path: str) -> str | None:
    """The whole of a /proc or /sys file as text; None when it does not exist here."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None


def parse_name_values(text: str) -> dict[str, int]:
    """``Name value`` lines (/proc/vmstat, /proc/net/snmp6) as {name: int}; other lines
    are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def read_int(path: str) -> int | None:
    """A file holding one integer (sysctls, /sys attributes); None when absent or not one
    (``speed`` of a link without carrier fails with EINVAL, which is "unknown" too)."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
