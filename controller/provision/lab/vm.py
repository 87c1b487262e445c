"""A lab VM's machine: its network namespace and veth into the region bridge, its directory
("disk") under the lab's data dir, and its init process (``vminit``) in its own UTS and
mount namespaces; power on, off and delete.

Stop kills every process of the VM (init first, so that its services get SIGTERM) and keeps
the namespace, address and disk; start boots the init again, which does not re-run the
user-data (cloud-init's once-per-instance) but starts the units the installer enabled.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from agent.files import write_private
from controller.provision.lab import net
from controller.provision.lab.state import LabState, RegionState, VmState
from controller.provision.lab.topology import child_env

STOP_GRACE = 8.0


def vm_dir(data_dir: Path, vm_id: str) -> Path:
    return data_dir / "vms" / vm_id


def read_status(data_dir: Path, vm_id: str) -> dict[str, Any]:
    try:
        return dict(json.loads((vm_dir(data_dir, vm_id) / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


class Machines:
    """VM power operations for one lab (both modes); the caller keeps the state file."""

    def __init__(self, *, data_dir: Path, python: str = sys.executable) -> None:
        self.data_dir = data_dir
        self.python = python
        self._inits: dict[str, int] = {}  # inits we started, to reap

    # -- network ------------------------------------------------------------------------

    async def plug(self, state: LabState, vm: VmState, region: RegionState) -> None:
        """The VM's namespace, its ``eth0`` in the region bridge, address and route."""
        subnet = ipaddress.IPv4Network(region.lan or region.subnet)
        gateway = str(subnet.network_address + 1)
        if vm.id not in net.netns_list():
            await net.arun(["ip", "netns", "add", vm.id])
        peer = f"v{vm.seq}"
        have = await net.arun(["ip", "-n", vm.id, "-br", "link", "show", "eth0"], check=False)
        if not have.strip():
            await net.arun(["ip", "link", "add", "eth0", "netns", vm.id, "type", "veth",
                            "peer", "name", peer, "netns", region.netns])
        await net.ip_many(region.netns, [["link", "set", peer, "master", "br0", "up"]])
        await net.arun(net.sysctl_argv(vm.id, {"net.ipv6.conf.all.disable_ipv6": "1",
                                               "net.ipv6.conf.default.disable_ipv6": "1"}))
        await net.ip_many(vm.id, [
            ["link", "set", "lo", "up"],
            ["addr", "replace", f"{vm.private_ip}/{subnet.prefixlen}", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["route", "replace", "default", "via", gateway, "dev", "eth0"],
        ])

    # -- power --------------------------------------------------------------------------

    def write_user_data(self, vm: VmState, user_data: str) -> None:
        d = vm_dir(self.data_dir, vm.id)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        write_private(d / "user-data", user_data.encode(), durable=False)

    def boot(self, state: LabState, vm: VmState) -> tuple[int, int]:
        """Start the VM's init; returns its pid and start time."""
        d = vm_dir(self.data_dir, vm.id)
        d.mkdir(parents=True, exist_ok=True)
        (d / "status.json").unlink(missing_ok=True)
        argv = [self.python, "-m", "controller.provision.lab.vminit", "--vm-dir", str(d),
                "--hostname", vm.hostname or vm.name]
        for p in state.config.extra_path:
            argv += ["--extra-path", p]
        if state.mode == "netns":
            argv = ["ip", "netns", "exec", vm.id, "unshare", "--uts", "--mount",
                    "--propagation", "private", "--", *argv]
        else:
            argv.append("--process-mode")
        pid = net.spawn(argv, env=child_env(state.prefix, **{net.ENV_VM: vm.id}),
                        log=d / "init.log")
        self._inits[vm.id] = pid
        return pid, _start_of(pid)

    def pids(self, state: LabState, vm: VmState) -> list[int]:
        """Every process of the VM: in its namespace, or marked with its id."""
        found = set(net.netns_pids(vm.id)) if state.mode == "netns" else set()
        found.update(_marked_vm(state.prefix, vm.id))
        found.discard(os.getpid())
        return sorted(found)

    def running(self, state: LabState, vm: VmState) -> bool:
        self.reap()
        if state.mode == "process":
            return net.alive(vm.init_pid, vm.init_start)
        return net.alive(vm.init_pid, vm.init_start) or bool(net.netns_pids(vm.id))

    def halt(self, state: LabState, vm: VmState) -> None:
        """Power off: SIGTERM the init (it stops its services), then kill what is left."""
        if net.alive(vm.init_pid, vm.init_start):
            net.kill_pids([vm.init_pid], grace=STOP_GRACE)
        rest = self.pids(state, vm)
        if rest:
            net.kill_pids(rest)
        self.reap()

    async def destroy(self, state: LabState, vm: VmState) -> None:
        self.halt(state, vm)
        if state.mode == "netns" and vm.id in net.netns_list():
            await net.arun(["ip", "netns", "delete", vm.id])
        shutil.rmtree(vm_dir(self.data_dir, vm.id), ignore_errors=True)

    def reap(self) -> None:
        live = set(net.reap(list(self._inits.values())))
        self._inits = {k: p for k, p in self._inits.items() if p in live}

    def exec_argv(self, state: LabState, vm: VmState) -> list[str]:
        """The prefix that runs a command inside the VM (its network, hostname and mounts)."""
        if state.mode == "process":
            return []
        return ["nsenter", "-t", str(vm.init_pid), "-n", "-u", "-m", "--"]


def boot_seconds(data_dir: Path, vm_id: str) -> float | None:
    """From init start to the end of the user-data (None while it runs)."""
    st = read_status(data_dir, vm_id)
    if "user_data_done" in st and "boot_started" in st:
        return float(st["user_data_done"]) - float(st["boot_started"])
    return None


def _start_of(pid: int) -> int:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        start = net.pid_start(pid)
        if start:
            return start
        time.sleep(0.01)
    return 0


def _marked_vm(prefix: str, vm_id: str) -> list[int]:
    needle = f"{net.ENV_VM}={vm_id}".encode()
    return [p for p in net.marked_pids(prefix) if _has_env(p, needle)]


def _has_env(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
