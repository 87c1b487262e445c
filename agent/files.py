"""Private (0600) files written whole: the one atomic writer of the agent and the controller.

Imports nothing of ours, so the controller uses it too (its secrets, the NATS config).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` (mode 0600) by rename, so that a reader sees the old or the
    new content, whole. The temporary file has a name of its own, so two writers at once
    (two threads saving the same state) do not mix. ``durable``: fsync the file before the
    rename and the directory after it, so that the new content survives a power loss too."""
    # What tempfile.mkstemp does (O_EXCL, 0600, a random name), without importing tempfile
    # and the shutil/bz2/lzma it pulls in: ~0.8 MB of the agent's RSS.
    tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
