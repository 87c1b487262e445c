"""File handles, inodes, dentries and AIO against their limits (/proc/sys/fs), as
Telegraf's `linux_sysctl_fs` input names them: ``file-nr`` (allocated handles) against
``file-max``, ``inode-nr``, ``inode-free-nr``, ``dentry-nr``, ``aio-nr``, ``aio-max-nr``..."""

from __future__ import annotations

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint, read_text

_SINGLE = ("aio-nr", "aio-max-nr", "dquot-nr", "dquot-max", "super-nr", "super-max")
# file -> the field of each column ("" = not reported), Telegraf's lists
_LISTS = {
    "inode-state": ("inode-nr", "inode-free-nr", "inode-preshrink-nr"),
    "dentry-state": ("dentry-nr", "dentry-unused-nr", "dentry-age-limit", "dentry-want-pages"),
    "file-nr": ("file-nr", "", "file-max"),
}


def sysctl_fs_fields(read: dict[str, str]) -> dict[str, FieldValue]:
    """Fields from the texts of the /proc/sys/fs files that exist (file name -> text)."""
    fields: dict[str, FieldValue] = {}
    for name in _SINGLE:
        if name in read:
            fields[name] = int(read[name].split()[0])
    for file, names in _LISTS.items():
        if file in read:
            for name, value in zip(names, read[file].split(), strict=False):
                if name:
                    fields[name] = int(value)
    return fields


class SysctlFsCollector:
    """Measurement `linux_sysctl_fs`, no tags."""

    name = "linux_sysctl_fs"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        self._dir = f"{(options or CollectorOptions()).proc}/sys/fs"

    def collect(self) -> list[MetricPoint]:
        texts = {}
        for file in (*_SINGLE, *_LISTS):
            text = read_text(f"{self._dir}/{file}")
            if text is not None and text.strip():
                texts[file] = text
        fields = sysctl_fs_fields(texts)
        return [MetricPoint("linux_sysctl_fs", fields)] if fields else []
