"""Clock synchronisation from the kernel's NTP state (adjtimex(2) with modes = 0, a
read-only call), as node-exporter's `timex` collector reports it; Telegraf has no such
input. Measurement `timex`: ``sync_status`` (1 when the kernel clock is synchronised,
0 when adjtimex says TIME_ERROR), ``offset_seconds``, ``frequency_adjustment_ratio``,
``maxerror_seconds``, ``estimated_error_seconds``, ``status`` (the STA_* bits),
``loop_time_constant``, ``tick_seconds``, ``tai_offset_seconds``."""

from __future__ import annotations

import os
from typing import Any

from agent.collectors.base import CollectorOptions, FieldValue, MetricPoint

TIME_ERROR = 5
STA_NANO = 0x2000
_PPM16 = 1_000_000.0 * 65536.0  # freq is in ppm with a 16-bit fraction


def timex_fields(state: int, t: Any) -> dict[str, FieldValue]:
    """The fields from adjtimex's return value and its struct timex (or any object with
    the same attribute names)."""
    divisor = 1e9 if t.status & STA_NANO else 1e6
    return {
        "sync_status": 0 if state == TIME_ERROR else 1,
        "offset_seconds": t.offset / divisor,
        "frequency_adjustment_ratio": 1.0 + t.freq / _PPM16,
        "maxerror_seconds": t.maxerror / 1e6,
        "estimated_error_seconds": t.esterror / 1e6,
        "status": int(t.status),
        "loop_time_constant": int(t.constant),
        "tick_seconds": t.tick / 1e6,
        "tai_offset_seconds": int(t.tai),
    }


def _adjtimex() -> Any:
    """A callable returning (state, struct timex); ctypes is imported here only (~0.3 MB
    of RSS, paid only when this collector is enabled)."""
    import ctypes  # not ctypes.util: find_library loads shutil and tempfile, runs ldconfig

    c_long, c_int = ctypes.c_long, ctypes.c_int

    class Timeval(ctypes.Structure):
        _fields_ = [("sec", c_long), ("usec", c_long)]

    class Timex(ctypes.Structure):  # struct timex of <sys/timex.h>
        _fields_ = [
            ("modes", ctypes.c_uint), ("offset", c_long), ("freq", c_long),
            ("maxerror", c_long), ("esterror", c_long), ("status", c_int),
            ("constant", c_long), ("precision", c_long), ("tolerance", c_long),
            ("time", Timeval), ("tick", c_long), ("ppsfreq", c_long), ("jitter", c_long),
            ("shift", c_int), ("stabil", c_long), ("jitcnt", c_long), ("calcnt", c_long),
            ("errcnt", c_long), ("stbcnt", c_long), ("tai", c_int),
            ("reserved", c_int * 11),
        ]  # fmt: skip

    # The interpreter is linked against libc: its own symbol table has adjtimex.
    call = ctypes.CDLL(None, use_errno=True).adjtimex
    call.argtypes = [ctypes.POINTER(Timex)]
    call.restype = c_int

    def read() -> tuple[int, Any]:
        t = Timex()  # modes = 0: read only, needs no privilege
        state = call(ctypes.byref(t))
        if state < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"adjtimex: {os.strerror(err)}")
        return state, t

    return read


class TimexCollector:
    """Measurement `timex`, no tags; nothing where adjtimex is missing (not Linux)."""

    name = "timex"

    def __init__(self, options: CollectorOptions | None = None) -> None:
        del options
        self._read: Any = None

    def collect(self) -> list[MetricPoint]:
        if self._read is None:
            try:
                self._read = _adjtimex()
            except (OSError, AttributeError):  # no libc adjtimex here
                self._read = False
        if self._read is False:
            return []
        state, t = self._read()
        return [MetricPoint("timex", timex_fields(state, t))]
