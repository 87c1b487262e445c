"""Facts about the machine the agent runs on (host, OS, CPU, memory, distro).

Cheap to collect: no subprocesses, a handful of syscalls and one small file read.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from typing import Any

log = logging.getLogger("barista.agent.facts")

OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release(5) text: KEY=value lines, values optionally quoted."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _read_os_release() -> dict[str, str]:
    for path in OS_RELEASE_PATHS:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return parse_os_release(f.read(64 * 1024))
        except OSError:
            continue
    return {}


def _mem_total() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    import psutil

    return int(psutil.virtual_memory().total)


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except FileNotFoundError:
        pass
    import psutil

    return float(psutil.boot_time())


def collect_facts(agent_version: str) -> dict[str, Any]:
    """Return this machine's facts; keys missing on this platform are simply absent."""
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
        "agent_version": agent_version,
    }
    # /proc first (psutil costs ~0.9 MB of RSS for two numbers); psutil where there is no
    # /proc; facts stay useful without these.
    try:
        facts["mem_total"] = _mem_total()
    except Exception as exc:
        log.warning("cannot read total memory: %s", exc)
    try:
        boot = _boot_time()
        facts["boot_time"] = boot
        facts["uptime"] = max(0.0, time.time() - boot)
    except Exception as exc:
        log.warning("cannot read boot time: %s", exc)
    release = _read_os_release()
    if release:
        facts["distro"] = release.get("PRETTY_NAME") or release.get("NAME", "")
        if "ID" in release:
            facts["distro_id"] = release["ID"]
        if "VERSION_ID" in release:
            facts["distro_version"] = release["VERSION_ID"]
    return facts
