"""Facts about the machine the agent runs on (host, OS, CPU, memory, distro), and its
underlay: the addresses and VPC range the overlay and the controller's CIDR checks use.

Cheap to collect: no subprocesses, a handful of syscalls and one small file read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import platform
import socket
import time
from typing import Any
from urllib.parse import urlparse

from protocol.mesh import FACT_PRIVATE_IP, FACT_PUBLIC_IP, FACT_VPC_CIDR

log = logging.getLogger("barista.agent.facts")

OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
# ``mesh_public_address`` words (the boot config's ``underlay``, from the provider):
# "none" = no public address (a private site, a VM without one), "private" = the private
# address is itself reachable from everywhere (the lab's public regions, a bare host).
PUBLIC_NONE = "none"
PUBLIC_IS_PRIVATE = "private"


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


def guess_private_address(nats_urls: list[str]) -> str:
    """The address this machine uses towards its NATS server (a UDP connect sends nothing),
    or "" when that is loopback or unknown."""
    for url in nats_urls:
        host = urlparse(url).hostname
        if not host:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 4222))
                address = str(s.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return ""


def interface_network(address: str) -> str:
    """The network of the interface holding ``address`` (its address with its prefix, as a
    network: "198.18.1.0/24"), or "" when no interface here has it."""
    import psutil

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) != ip:
                    continue
                return str(ipaddress.ip_network(f"{ip}/{a.netmask}", strict=False))
            except ValueError:
                continue
    return ""


def underlay_facts(*, nats_urls: list[str], private: str = "", public: str = "",
                   vpc_cidr: str = "") -> dict[str, str]:
    """``private_ip`` (configured, else the address that routes to the controller),
    ``public_ip`` (configured; "" behind NAT or unknown; PUBLIC_IS_PRIVATE: the private
    one), ``vpc_cidr`` (configured, else the prefix of the interface holding the private
    address). Keys with nothing known are left out, except ``public_ip``."""
    private = private or guess_private_address(nats_urls)
    if public == PUBLIC_IS_PRIVATE:
        public = private
    elif public == PUBLIC_NONE:
        public = ""
    out = {FACT_PUBLIC_IP: public}
    if private:
        out[FACT_PRIVATE_IP] = private
        try:
            vpc_cidr = vpc_cidr or interface_network(private)
        except Exception as exc:
            log.warning("cannot read the interfaces for the VPC range: %s", exc)
    if vpc_cidr:
        out[FACT_VPC_CIDR] = vpc_cidr
    return out
