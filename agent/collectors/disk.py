"""Filesystem usage per real mount point, as Telegraf's `disk` input reports it."""

from __future__ import annotations

import logging
import os

import psutil

from agent.collectors.base import (
    MAX_TAG_VALUES,
    CapWarner,
    FieldValue,
    MetricPoint,
    cap_names,
    percent,
)

log = logging.getLogger("barista.agent.collectors")

# Telegraf's default ignore_fs plus the kernel's virtual filesystems: they have no disk
# behind them. psutil's all=False already drops "nodev" types (and so NFS/CIFS, whose
# statvfs can hang on a dead server), this is the second line of defence.
PSEUDO_FSTYPES = frozenset(
    {
        "tmpfs", "devtmpfs", "devfs", "iso9660", "overlay", "aufs", "squashfs", "ramfs",
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "hugetlbfs", "debugfs",
        "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl", "autofs", "nsfs",
        "binfmt_misc", "rpc_pipefs", "efivarfs", "fuse.lxcfs", "fuse.gvfsd-fuse", "nfs",
        "nfs4", "cifs", "smb3", "sshfs", "fuse.sshfs",
    }
)  # fmt: skip

# Container runtimes and kubelet mount volumes under per-container/per-pod directories
# whose names are ids: as tag values they would grow without bound as pods come and go.
IGNORED_MOUNT_PREFIXES = (
    "/var/lib/kubelet/",
    "/var/lib/docker/",
    "/var/lib/containers/",
    "/run/containerd/",
    "/run/k3s/",
    "/snap/",
    "/proc/",
    "/sys/",
)


class DiskCollector:
    """Measurement `disk`, tags path/device/fstype/mode, one point per real mount point."""

    name = "disk"

    def __init__(
        self,
        *,
        ignore_fstypes: frozenset[str] = PSEUDO_FSTYPES,
        ignore_mount_prefixes: tuple[str, ...] = IGNORED_MOUNT_PREFIXES,
        max_mounts: int = MAX_TAG_VALUES,
    ) -> None:
        self._ignore_fstypes = ignore_fstypes
        self._ignore_prefixes = ignore_mount_prefixes
        # Mount paths become tag values: bounded so a host with hundreds of mounts
        # cannot create hundreds of series; the kept ones are the first in path order.
        self._max_mounts = max_mounts
        self._cap = CapWarner(log, "mount points", max_mounts)

    def _mounts(self) -> dict[str, tuple[str, str, str]]:
        """Mount point -> (device, fstype, mode) for the real filesystems, deduplicated."""
        mounts: dict[str, tuple[str, str, str]] = {}
        for part in psutil.disk_partitions(all=False):
            path = str(part.mountpoint)
            fstype = str(part.fstype)
            if fstype in self._ignore_fstypes or path.startswith(self._ignore_prefixes):
                continue
            # Telegraf strips /dev/ from the device tag.
            device = str(part.device).removeprefix("/dev/")
            mode = "ro" if "ro" in str(part.opts).split(",") else "rw"
            mounts.setdefault(path, (device, fstype, mode))  # over-mounts: keep the first
        return mounts

    def collect(self) -> list[MetricPoint]:
        mounts = self._mounts()
        paths, dropped = cap_names(mounts, self._max_mounts)
        self._cap.dropped(dropped)
        points: list[MetricPoint] = []
        for path in paths:
            device, fstype, mode = mounts[path]
            try:
                fields = _usage(path)
            except OSError as exc:
                # A mount that vanished between listing and statvfs is not an error.
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("statvfs %s failed: %s", path, exc)
                continue
            tags = {"path": path, "device": device, "fstype": fstype, "mode": mode}
            points.append(MetricPoint("disk", fields, tags))
        return points


def _usage(path: str) -> dict[str, FieldValue]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize  # what a non-root user can still write, like df
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    inodes_used = max(0, st.f_files - st.f_ffree)
    return {
        "total": total,
        "free": free,
        "used": used,
        # used / (used + free), not used / total: df's and Telegraf's figure, which
        # reaches 100 when non-root writes start failing despite the root reserve.
        "used_percent": percent(used, used + free),
        "inodes_total": st.f_files,
        "inodes_free": st.f_ffree,
        "inodes_used": inodes_used,
        "inodes_used_percent": percent(inodes_used, st.f_files),
    }
