"""What the agent must remember across its own restart, kept in its state dir (0600 files).

SeenLog: the ids of accepted commands until their TTL passes, so that a command captured
on the wire cannot run again after a restart. RunLedger: the process groups of running
commands, so that an agent killed with -9 finds and ends what it started when it comes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent.files import fsync_dir, write_private

log = logging.getLogger("barista.agent.ledger")

# Appended lines beyond the live ones before the log is rewritten with only the live ones.
_COMPACT_SLACK = 1024
# How long reap() waits for a killed group to be gone (init reaps the orphans).
_REAP_WAIT = 3.0


class _Seen(msgspec.Struct, array_like=True):
    id: str
    until: float


class SeenLog:
    """An append-only log of (command id, forget-after) lines, fsynced per record.

    Bounded: once the log holds twice the live ids of its last rewrite plus
    ``_COMPACT_SLACK`` lines, expired ids are dropped and it is rewritten atomically with
    the live ones only. A torn last line (power loss mid-write) is skipped on load. Thread-safe:
    ``record`` runs in a worker thread so the fsync does not stall the event loop.
    """

    def __init__(
        self, path: Path, *, max_entries: int = 200_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self._max = max_entries
        self._clock = clock
        self._live: dict[str, float] = {}
        self._lines = 0
        self._compact_at = _COMPACT_SLACK
        self._fd: int | None = None
        # False while the log is a new file whose directory entry was not fsynced yet
        self._entry_durable = True
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(_Seen)

    def load(self) -> list[tuple[str, float]]:
        """Read the ids that are still live, rewrite the log with them, open it for appends."""
        now = self._clock()
        live: dict[str, float] = {}
        found = True
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        entry = self._decoder.decode(line)
                    except msgspec.DecodeError:
                        continue  # a torn or foreign line: skip it, keep the rest
                    if math.isfinite(entry.until) and entry.until >= now:
                        live[entry.id] = max(entry.until, live.get(entry.id, 0.0))
        except FileNotFoundError:
            found = False
        if len(live) > self._max:  # keep those that stay longest (most to protect)
            live = dict(sorted(live.items(), key=lambda kv: kv[1])[-self._max :])
        with self._lock:
            self._live = live
            if found:
                self._compact()
            else:  # a first start: nothing to rewrite; the new entry is made durable
                self._open_append()  # with the first record (no fsync on the way up)
                self._entry_durable = False
        return list(live.items())

    def record(self, command_id: str, until: float) -> None:
        """Append one id and fsync it; only then may the command run. Raises OSError."""
        line = self._encoder.encode(_Seen(command_id, until)) + b"\n"
        with self._lock:
            if self._fd is None:
                raise OSError(f"{self.path} is not open (load() not called or closed)")
            os.write(self._fd, line)
            os.fdatasync(self._fd)
            if not self._entry_durable:  # the log's own directory entry, once
                fsync_dir(self.path.parent)
                self._entry_durable = True
            self._live[command_id] = until
            self._lines += 1
            if self._lines > self._compact_at:
                now = self._clock()
                self._live = {k: v for k, v in self._live.items() if v >= now}
                self._compact()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @property
    def entries(self) -> int:
        return len(self._live)

    def _compact(self) -> None:
        """Rewrite the log with the live ids only (caller holds the lock)."""
        data = b"".join(self._encoder.encode(_Seen(k, v)) + b"\n" for k, v in self._live.items())
        write_private(self.path, data)  # durable: the file and its directory entry
        self._entry_durable = True
        self._open_append()

    def _open_append(self) -> None:
        """(Re)open the log for appends, 0600, counting the live ids as its lines."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)
        self._lines = len(self._live)
        # Twice the live ids: the rewrite costs as much as the appends since the last one.
        self._compact_at = 2 * self._lines + _COMPACT_SLACK


# -- running commands ---------------------------------------------------------------------


class _Running(msgspec.Struct, kw_only=True):
    job_id: str
    command_id: str
    pgid: int
    # The leader's start time (clock ticks since boot, /proc/<pid>/stat field 22) and the
    # boot id: together with the pid they name one process, so a reused pid is never hit.
    start: int
    boot: str


@dataclass(frozen=True)
class Orphan:
    """A command that was running when the agent went away; what reap() did about it."""

    job_id: str
    command_id: str
    pgid: int
    killed: bool


class _Stat(msgspec.Struct):
    state: str
    pgrp: int
    session: int
    start: int


def _proc_stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Stat(rest[0].decode(), int(rest[2]), int(rest[3]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _members(pgid: int, not_before: int) -> list[int]:
    """Live (not zombie) processes of the session and group ``pgid`` started no earlier."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if (st is not None and st.pgrp == pgid and st.session == pgid
                and st.start >= not_before and st.state != "Z"):
            out.append(int(name))
    return out


class RunLedger:
    """One small file per running exec command, written when it starts, removed when it ends.

    Not fsynced on purpose: it protects against the agent dying (kill -9, a crash), and the
    page cache survives that; a machine that loses power loses the processes too.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._boot = _boot_id()

    def _path(self, command_id: str) -> Path:
        # The id comes from a signed command, but a file name must never depend on its form.
        return self.directory / (hashlib.sha256(command_id.encode()).hexdigest()[:32] + ".run")

    def started(self, *, job_id: str, command_id: str, pid: int) -> None:
        """Record a command whose process (leader of its own session and group) started."""
        st = _proc_stat(pid)
        rec = _Running(job_id=job_id, command_id=command_id, pgid=pid,
                       start=st.start if st is not None else -1, boot=self._boot)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(self._path(command_id), msgspec.json.encode(rec), durable=False)
        except OSError as exc:
            log.warning("cannot record running command %s (job %s): %s; it would be left "
                        "behind if the agent died", command_id, job_id, exc)

    def ended(self, command_id: str) -> None:
        try:
            self._path(command_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the record of command %s: %s", command_id, exc)

    def reap(self) -> list[Orphan]:
        """At start: SIGKILL every recorded group that is still ours; forget all records."""
        try:
            paths = sorted(self.directory.glob("*.run"))
        except OSError:
            return []
        decoder = msgspec.json.Decoder(_Running)
        orphans: list[Orphan] = []
        killed: list[int] = []
        for path in paths:
            try:
                rec = decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("unreadable record %s dropped: %s", path.name, exc)
                rec = None
            if rec is not None:
                hit = self._kill(rec)
                if hit:
                    killed.append(rec.pgid)
                orphans.append(Orphan(job_id=rec.job_id, command_id=rec.command_id,
                                      pgid=rec.pgid, killed=hit))
            with contextlib.suppress(OSError):
                path.unlink()
        deadline = time.monotonic() + _REAP_WAIT
        while killed and time.monotonic() < deadline:
            killed = [g for g in killed if _members(g, 0)]
            if killed:
                time.sleep(0.02)
        return orphans

    def _kill(self, rec: _Running) -> bool:
        if rec.pgid <= 1 or rec.start < 0 or not rec.boot or rec.boot != self._boot:
            return False  # another boot: nothing it started can still run
        leader = _proc_stat(rec.pgid)
        if leader is not None and leader.start != rec.start:
            return False  # the pid now names another process
        if leader is None or leader.state == "Z":
            # The leader is gone; a pid in use as a group id is never reused, so members
            # left in a session and group of that id (started since) are the command's.
            if not _members(rec.pgid, rec.start):
                return False
        try:
            os.killpg(rec.pgid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.warning("cannot kill process group %d of command %s: %s",
                        rec.pgid, rec.command_id, exc)
            return False
        log.warning("killed process group %d of command %s (job %s) left running by a "
                    "previous agent", rec.pgid, rec.command_id, rec.job_id)
        return True


__all__ = ["Orphan", "RunLedger", "SeenLog"]
