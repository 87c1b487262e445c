"""Filesystem usage per real mount point, as Telegraf's `disk` input reports it.

Mounts come from /proc/self/mounts, chosen by the agent config's globs (``disk_mount_points``,
``disk_ignore_mount_points``, ``disk_fs``, ``disk_ignore_fs``). A mount whose statvfs fails
is reported, not skipped: its point carries ``device_error`` = the errno (0 when healthy),
so a dead or unreadable mount shows on a dashboard instead of vanishing from it.
"""

from __future__ import annotations

import logging
import os

from agent.collectors.base import (
    MAX_TAG_VALUES,
    CapWarner,
    CollectorOptions,
    FieldValue,
    MetricPoint,
    NameFilter,
    cap_names,
    percent,
    read_text,
)

log = logging.getLogger("barista.agent.collectors")


def _unescape(text: str) -> str:
    r"""/proc/self/mounts writes space, tab, newline and backslash as \040 \011 \012 \134."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[tuple[str, str, str, str]]:
    """(device, mount point, fstype, options) per line of /proc/self/mounts."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((_unescape(parts[0]), _unescape(parts[1]), parts[2], parts[3]))
    return out


def nodev_types(text: str) -> frozenset[str]:
    """The filesystem types /proc/filesystems marks "nodev" (no block device behind them)."""
    pairs = (line.split() for line in text.splitlines())
    return frozenset(p[1] for p in pairs if len(p) == 2 and p[0] == "nodev")


class DiskCollector:
    """Measurement `disk`, tags path/device/fstype/mode, one point per real mount point."""

    name = "disk"

    def __init__(
        self, options: CollectorOptions | None = None, *, max_mounts: int = MAX_TAG_VALUES
    ) -> None:
        opts = options or CollectorOptions()
        self._proc = opts.proc
        self._paths = NameFilter(opts.disk_mount_points, opts.disk_ignore_mount_points)
        self._fstypes = NameFilter(opts.disk_fs, opts.disk_ignore_fs)
        # Mount paths become tag values: bounded so a host with hundreds of mounts
        # cannot create hundreds of series; the kept ones are the first in path order.
        self._max_mounts = max_mounts
        self._cap = CapWarner(log, "mount points", max_mounts)
        self._failing: set[str] = set()  # mounts logged as failing, until they recover

    def _mounts(self) -> dict[str, tuple[str, str, str]]:
        """Mount point -> (device, fstype, mode) for the chosen filesystems, deduplicated."""
        text = read_text(f"{self._proc}/self/mounts")
        if text is None:
            return _psutil_mounts(self._paths, self._fstypes)
        # Without an fs include list, only filesystems on a device (psutil's all=False).
        nodev = frozenset() if self._fstypes.include_given else nodev_types(
            read_text(f"{self._proc}/filesystems") or ""
        )
        mounts: dict[str, tuple[str, str, str]] = {}
        for device, path, fstype, opts in parse_mounts(text):
            if fstype in nodev or device == "none" or not self._fstypes(fstype):
                continue
            if not self._paths(path):
                continue
            # Telegraf strips /dev/ from the device tag.
            mode = "ro" if "ro" in opts.split(",") else "rw"
            mounts.setdefault(path, (device.removeprefix("/dev/"), fstype, mode))  # over-mounts
        return mounts

    def collect(self) -> list[MetricPoint]:
        mounts = self._mounts()
        paths, dropped = cap_names(mounts, self._max_mounts)
        self._cap.dropped(dropped)
        points: list[MetricPoint] = []
        for path in paths:
            device, fstype, mode = mounts[path]
            tags = {"path": path, "device": device, "fstype": fstype, "mode": mode}
            try:
                fields = _usage(path)
            except FileNotFoundError:
                continue  # unmounted between listing and statvfs: nothing to report
            except OSError as exc:
                if path not in self._failing:
                    self._failing.add(path)
                    log.warning("statvfs %s (%s on %s) failed: %s", path, fstype, device, exc)
                points.append(MetricPoint("disk", {"device_error": exc.errno or -1}, tags))
                continue
            if path in self._failing:
                self._failing.discard(path)
                log.info("statvfs %s works again", path)
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
        "device_error": 0,
    }


def _psutil_mounts(paths: NameFilter, fstypes: NameFilter) -> dict[str, tuple[str, str, str]]:
    """Other platforms (no /proc): psutil's list of the physical filesystems."""
    import psutil  # ~0.9 MB of RSS: only where /proc is missing

    mounts: dict[str, tuple[str, str, str]] = {}
    for part in psutil.disk_partitions(all=False):
        path, fstype = str(part.mountpoint), str(part.fstype)
        if fstypes(fstype) and paths(path):
            mode = "ro" if "ro" in str(part.opts).split(",") else "rw"
            mounts.setdefault(path, (str(part.device).removeprefix("/dev/"), fstype, mode))
    return mounts
