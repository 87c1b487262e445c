"""``Lab``: one local lab cloud in a data dir — bring it up, add and power VMs, report its
status, and take everything down again (also what a crashed owner left behind).

Modes: ``netns`` (root: namespaces, the WAN router, NAT) or ``process`` (no root: a VM is a
process tree with its own directories on loopback; no namespaces, hostnames, delays or NAT
— ``status`` says so).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from controller.provision.lab import net, shaping
from controller.provision.lab.errors import LabConfigError, LabError
from controller.provision.lab.router import read_stats
from controller.provision.lab.state import (
    GATEWAY,
    LabConfig,
    LabState,
    Mode,
    RouterState,
    StateFile,
    VmState,
    check_prefix,
    free_vm_ip,
    new_prefix,
    now,
    plan_regions,
)
from controller.provision.lab.topology import Topology, router_config
from controller.provision.lab.vm import Machines, boot_seconds, read_status

log = logging.getLogger("barista.lab")

TERMINATED_KEEP = 600.0  # terminated VMs stay in the state (answering queries) this long


class NoCapacity(LabError):
    def __init__(self, region: str) -> None:
        self.region = region
        super().__init__(f"region {region} has no free address left")


class VmStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    region: str
    private_ip: str
    public_ip: str
    power: str
    running: bool
    phase: str = ""  # the init's: booting, user-data, services, running, stopping, failed
    boot_s: float | None = None
    processes: int = 0
    hostname: str = ""


class LinkStatus(msgspec.Struct, frozen=True, kw_only=True):
    a: str
    b: str
    rtt_ms: float
    loss: float
    packets: int = 0  # forwarded, both ways
    lost: int = 0


class RegionStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    subnet: str
    lan: str
    gateway_ip: str
    netns: str
    vms: int


class LabStatus(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    mode: Mode
    data_dir: str
    up: bool
    note: str = ""
    gateway: str = ""  # where VMs reach the controller
    gateway_bridge: str = ""
    router: str = ""  # "tun pid 1234 (running)"
    router_backend: str = ""
    regions: list[RegionStatus] = []
    links: list[LinkStatus] = []
    vms: list[VmStatus] = []
    no_route: int = 0


class Lab:
    """One lab cloud, found again by its data dir (the state file there names its prefix)."""

    def __init__(
        self,
        *,
        data_dir: Path,
        config: LabConfig | None = None,
        prefix: str | None = None,
        mode: Mode | None = None,
        python: str = sys.executable,
    ) -> None:
        data_dir = data_dir.resolve()  # the lab's daemons get absolute paths
        self.data_dir = data_dir
        self.file = StateFile(data_dir)
        self._config = (config or LabConfig()).validate()
        self._prefix = check_prefix(prefix) if prefix else None
        self._mode: Mode = mode or ("netns" if net.have_root() else "process")
        if self._mode == "netns":
            if not net.have_root():
                raise LabError("the netns lab needs root; use mode='process' without it")
            missing = net.tools_missing()
            if missing:
                raise LabError(f"the netns lab needs {', '.join(missing)} (Debian: "
                               "iproute2, nftables, util-linux)")
        self.topology = Topology(data_dir=data_dir, python=python)
        self.machines = Machines(data_dir=data_dir, python=python)
        self._lock = asyncio.Lock()

    # -- whole lab ----------------------------------------------------------------------

    def read(self) -> LabState | None:
        return self.file.read()

    @property
    def mode(self) -> Mode:
        """The mode of the lab in the data dir, or the one a new lab would get."""
        st = self.file.read()
        return st.mode if st is not None else self._mode

    @property
    def prefix(self) -> str:
        st = self.file.read()
        if st is not None:
            return st.prefix
        if self._prefix is None:
            self._prefix = new_prefix()
        return self._prefix

    async def up(self) -> LabState:
        """Create the lab (idempotent; a dead router is restarted)."""
        async with self._lock:
            with self.file.locked():
                state = self.file.read()
                if state is not None and not state.regions:
                    # A plan cut short by a crash: sweep what it made, plan again.
                    await asyncio.to_thread(net.sweep, state.prefix)
                    state = None
                if state is None:
                    state = self._plan()  # journals itself before it makes anything
                    self.file.write(state)
            if state.mode == "netns":
                await self.topology.build(state)
                if not net.alive(state.router.pid, state.router.pid_start):
                    pid, start = await asyncio.to_thread(self.topology.start_router, state)
                    if state.router.backend == "netem":
                        await shaping.apply(router_config(state, self.data_dir))
                    with self.file.change() as st:
                        st.router.pid, st.router.pid_start = pid, start
            with self.file.change() as st:
                st.up = True
                state = st
            log.info("lab %s up in %s (%s)", state.prefix, self.data_dir, state.mode)
            return state

    def _plan(self) -> LabState:
        prefix = self.prefix
        # The probe namespace of the netem check carries the prefix too: journal it first.
        self.file.write(LabState(prefix=prefix, mode=self._mode, config=self._config,
                                 created_at=now()))
        netns = self._mode == "netns"
        state = LabState(
            prefix=prefix,
            mode=self._mode,
            config=self._config,
            created_at=now(),
            regions=plan_regions(self._config, netns=netns, prefix=prefix),
            router=RouterState(netns=f"{prefix}-wan" if netns else "",
                               backend=self._delay_backend(prefix) if netns else "none"),
        )
        if netns:
            with net.host_lock():
                state.gateway = self.topology.plan_gateway(prefix)
                self.file.write(state)  # journal before the first host object
                # The host bridge is made under the host lock: no other lab can take the
                # subnet between choosing it and holding it.
                net.run(["ip", "link", "add", state.gateway.bridge, "type", "bridge"])
                net.run(["ip", "addr", "add", f"{state.gateway.host_ip}/29",
                         "dev", state.gateway.bridge])
        return state

    def _delay_backend(self, prefix: str) -> Literal["tun", "netem"]:
        wanted = self._config.delay_backend
        if wanted == "router":
            return "tun"
        has = shaping.probe_netem(prefix)
        if wanted == "netem" and not has:
            raise LabConfigError("delay_backend", "this kernel has no netem "
                                 "(tc: Specified qdisc kind is unknown)")
        return "netem" if has else "tun"

    async def down(self) -> dict[str, list[str]]:
        """Remove everything of this lab, the data dir included; safe after a crash."""
        async with self._lock:
            state = self.file.read()
            prefix = state.prefix if state is not None else self._prefix
            if prefix is None:
                return {}
            self.topology.reap()
            removed = await asyncio.to_thread(net.sweep, prefix, data_dir=self.data_dir)
            self.topology.reap()
            self.machines.reap()
            return removed

    def status(self) -> LabStatus:
        state = self.file.read()
        if state is None:
            raise LabError(f"no lab in {self.data_dir}")
        return self._status(state)

    def _status(self, state: LabState) -> LabStatus:
        stats = read_stats(self.data_dir / "router-stats.json")
        alive = net.alive(state.router.pid, state.router.pid_start)
        router = ""
        if state.mode == "netns":
            router = (f"{state.router.backend} pid {state.router.pid} "
                      f"({'running' if alive else 'not running'}) in {state.router.netns}")
        names = [r.name for r in state.regions] + ([GATEWAY] if state.mode == "netns" else [])
        links = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                cfg = state.config.link(a, b)
                fwd = lost = 0
                if stats is not None:
                    for key in (f"{a}>{b}", f"{b}>{a}"):
                        ps = stats.pairs.get(key)
                        if ps is not None:
                            fwd += ps.forwarded
                            lost += ps.lost
                links.append(LinkStatus(a=a, b=b, rtt_ms=cfg.rtt_ms, loss=cfg.loss,
                                        packets=fwd, lost=lost))
        vms = []
        for vm in sorted(state.vms.values(), key=lambda v: v.seq):
            if vm.power == "terminated":
                continue
            running = self.machines.running(state, vm)
            st = read_status(self.data_dir, vm.id) if running else {}
            vms.append(VmStatus(
                id=vm.id, name=vm.name, region=vm.region, private_ip=vm.private_ip,
                public_ip=vm.public_ip, power=vm.power, running=running,
                phase=str(st.get("phase", "")), boot_s=boot_seconds(self.data_dir, vm.id),
                processes=len(self.machines.pids(state, vm)) if running else 0,
                hostname=vm.hostname,
            ))
        note = ""
        if state.mode == "process":
            note = ("process mode (no root): VMs are process trees on loopback with their own "
                    "directories; no namespaces, hostnames, WAN delays or NAT")
        elif state.router.backend == "tun":
            note = "no netem in this kernel: the WAN router delays and drops packets itself"
        else:
            note = "netem delays and drops packets on each region's wan0; the router forwards"
        return LabStatus(
            prefix=state.prefix, mode=state.mode, data_dir=str(self.data_dir), up=state.up,
            note=note,
            gateway=state.gateway.host_ip if state.gateway else "127.0.0.1",
            gateway_bridge=state.gateway.bridge if state.gateway else "",
            router=router, router_backend=state.router.backend,
            regions=[
                msgspec.structs.replace(
                    RegionStatus(name=r.name, kind=r.kind, subnet=r.subnet, lan=r.lan,
                                 gateway_ip=r.gateway_ip, netns=r.netns, vms=0),
                    vms=sum(1 for v in vms if v.region == r.name),
                )
                for r in state.regions
            ],
            links=links, vms=vms, no_route=stats.no_route if stats else 0,
        )

    @property
    def gateway_ip(self) -> str:
        """Where the VMs reach the controller: it must listen on this address."""
        state = self.file.read()
        if state is None or state.gateway is None:
            return "127.0.0.1"
        return state.gateway.host_ip

    # -- VMs ----------------------------------------------------------------------------

    async def create_vm(
        self,
        *,
        name: str,
        region: str,
        size: str,
        image: str,
        user_data: str,
        tags: Mapping[str, str],
        hostname: str = "",
    ) -> VmState:
        """A new VM, booted. The VM is journaled before anything is made for it."""
        async with self._lock:
            with self.file.change() as state:
                if not state.up:
                    raise LabError("the lab is not up")
                rs = state.region(region)
                if rs is None:
                    raise LabConfigError("region", f"unknown region {region!r}")
                self._prune(state)
                ip = free_vm_ip(state, rs) if state.mode == "netns" else "127.0.0.1"
                if ip is None:
                    raise NoCapacity(region)
                seq = state.next_seq
                state.next_seq += 1
                vm = VmState(
                    id=f"{state.prefix}-vm{seq}", seq=seq, name=name, region=region,
                    size=size, image=image, private_ip=ip,
                    public_ip="" if rs.kind == "private" else ip,
                    tags=dict(tags), power="creating", created_at=now(), changed_at=now(),
                    hostname=hostname or name,
                )
                state.vms[vm.id] = vm
            snapshot = state
        self.machines.write_user_data(vm, user_data)
        if snapshot.mode == "netns":
            await self.machines.plug(snapshot, vm, rs)
        pid, start = self.machines.boot(snapshot, vm)
        with self.file.change() as state:
            cur = state.vms[vm.id]
            cur.power, cur.init_pid, cur.init_start, cur.changed_at = "running", pid, start, now()
            return cur

    def vm(self, vm_id: str) -> VmState | None:
        state = self.file.read()
        return None if state is None else state.vms.get(vm_id)

    def vms(self) -> list[VmState]:
        state = self.file.read()
        return [] if state is None else sorted(state.vms.values(), key=lambda v: v.seq)

    async def stop_vm(self, vm_id: str) -> VmState:
        state, vm = self._get(vm_id)
        if vm.power == "terminated":
            return vm
        await asyncio.to_thread(self.machines.halt, state, vm)
        return self._set_power(vm_id, "stopped")

    async def start_vm(self, vm_id: str) -> VmState:
        state, vm = self._get(vm_id)
        if vm.power == "terminated":
            raise LabError(f"VM {vm_id} is terminated")
        if self.machines.running(state, vm):
            return vm
        pid, start = self.machines.boot(state, vm)
        return self._set_power(vm_id, "running", pid=pid, start=start)

    async def reboot_vm(self, vm_id: str) -> VmState:
        await self.stop_vm(vm_id)
        return await self.start_vm(vm_id)

    async def terminate_vm(self, vm_id: str) -> VmState:
        state, vm = self._get(vm_id)
        if vm.power != "terminated":
            await self.machines.destroy(state, vm)
        return self._set_power(vm_id, "terminated")

    def exec_argv(self, vm_id: str) -> list[str]:
        """The command prefix that runs a command inside VM ``vm_id``."""
        state, vm = self._get(vm_id)
        return self.machines.exec_argv(state, vm)

    def boot_seconds(self, vm_id: str) -> float | None:
        return boot_seconds(self.data_dir, vm_id)

    def phase(self, vm_id: str) -> str:
        return str(read_status(self.data_dir, vm_id).get("phase", ""))

    def vm_running(self, vm: VmState) -> bool:
        state = self.file.read()
        return state is not None and self.machines.running(state, vm)

    def _get(self, vm_id: str) -> tuple[LabState, VmState]:
        state = self.file.read()
        if state is None or vm_id not in state.vms:
            raise KeyError(vm_id)
        return state, state.vms[vm_id]

    def _set_power(self, vm_id: str, power: Literal["running", "stopped", "terminated"],
                   *, pid: int = 0, start: int = 0) -> VmState:
        with self.file.change() as state:
            vm = state.vms[vm_id]
            vm.power, vm.changed_at = power, now()
            vm.init_pid, vm.init_start = pid, start
            return vm

    def _prune(self, state: LabState) -> None:
        cutoff = time.time() - TERMINATED_KEEP
        for vm_id in [v.id for v in state.vms.values()
                      if v.power == "terminated" and v.changed_at < cutoff]:
            del state.vms[vm_id]
