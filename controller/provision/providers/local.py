"""The ``local`` provider: the lab cloud on this host (``controller.provision.lab``).

A VM is a network namespace in a simulated region (root) or a process tree on loopback
(process mode, without root). Everything the provider knows it reads from the lab's state
file, so a restarted controller finds its VMs again by tag, like on a real cloud.

State map: a VM being made is PENDING; powered on is RUNNING (whether its agent is up is
the engine's business); powered off, or its init died, is STOPPED; deleted is TERMINATED.
``cleanup`` takes the whole lab down once no VM of any infra is left in it, so that a
deleted infra leaves no namespace, interface, process or file behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from controller.provision.contract import (
    TAG_NODE,
    CapacityError,
    Catalog,
    Image,
    Instance,
    InstanceState,
    InvalidRequestError,
    LaunchRequest,
    Network,
    NetworkRequest,
    NotFoundError,
    Placement,
    ProvisionError,
    Region,
    Size,
)
from controller.provision.lab import Lab, LabConfig
from controller.provision.lab.errors import LabError
from controller.provision.lab.lab import NoCapacity
from controller.provision.lab.state import LabState, Mode, VmState

log = logging.getLogger("barista.provision.local")

NAME = "local"

STATE_MAP: Mapping[str, InstanceState] = MappingProxyType({
    "creating": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopped": InstanceState.STOPPED,
    "terminated": InstanceState.TERMINATED,
})

# (name, vCPUs, memory GB): the lab shares the host's CPUs; the size is a label.
SIZES = (("lab.small", 1, 0.5), ("lab.medium", 2, 2.0), ("lab.large", 2, 4.0))
# Every lab VM runs the host's own filesystem under its private overlays.
IMAGES = ("ubuntu-24.04", "ubuntu-22.04", "debian-12")


class LocalProvider:
    """``Provider`` for the lab cloud in ``data_dir`` (made on first use)."""

    def __init__(
        self,
        *,
        data_dir: Path,
        config: LabConfig | None = None,
        mode: Mode | None = None,
        prefix: str | None = None,
    ) -> None:
        self.config = (config or LabConfig()).validate()
        self.lab = Lab(data_dir=data_dir, config=self.config, mode=mode, prefix=prefix)
        self._catalog = _catalog(self.config)
        self.mode: Mode = self.lab.mode
        if self.mode == "process":
            log.warning("local provider in process mode (no root): VMs are process trees on "
                        "loopback, without namespaces, hostnames, WAN delays or NAT")

    @property
    def name(self) -> str:
        return NAME

    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def gateway_ip(self) -> str:
        """Where the VMs reach the controller (its NATS and installer must listen here)."""
        return self.lab.gateway_ip

    async def bring_up(self) -> None:
        """Bring the lab up (its gateway with it), so that ``gateway_ip`` is where it is."""
        await self._up()

    async def ensure_network(self, request: NetworkRequest) -> Network:
        self._region(request.region)
        state = await self._up()
        rs = state.region(request.region)
        assert rs is not None
        gateway = state.gateway.host_ip if state.gateway else "127.0.0.1"
        return Network(
            id=rs.netns or f"{state.prefix}-{rs.name}",
            region=rs.name,
            cidr=rs.lan or rs.subnet,
            subnet_id=rs.subnet,
            extra={
                "kind": rs.kind,
                "gateway": gateway,
                # The lab's regions have no firewall: every port (WireGuard's too) is open
                # between regions; a private site lets nothing in through its NAT.
                "firewall": "nat, no inbound" if rs.kind == "private" else "open",
                # A public region's addresses are routable from every region: a VM's
                # private address is its public one; a private site's VMs have none.
                "public_address": "none" if rs.kind == "private" else "private",
            },
        )

    async def run_instances(
        self, placement: Placement, network: Network, requests: Sequence[LaunchRequest]
    ) -> list[Instance]:
        self._region(placement.region)
        state = await self._up()
        out: list[Instance] = []
        for req in requests:
            self._check(req, placement.region)
            existing = _find(state, req.name)
            if existing is not None:
                if existing.power == "stopped":
                    existing = await self._call(self.lab.start_vm(existing.id), placement.region)
                out.append(self._instance(existing))
                continue
            try:
                vm = await self.lab.create_vm(
                    name=req.name, region=placement.region, size=req.size, image=req.image,
                    user_data=req.user_data, tags={**req.tags, TAG_NODE: req.name},
                )
            except NoCapacity as exc:
                raise CapacityError(str(exc), provider=NAME, region=placement.region,
                                    scope="region") from None
            except LabError as exc:
                raise ProvisionError(f"lab VM {req.name}: {exc}", provider=NAME,
                                     region=placement.region) from None
            log.info("lab VM %s (%s) created in %s at %s", vm.id, req.name, vm.region,
                     vm.private_ip)
            out.append(self._instance(vm))
            state = self.lab.read() or state
        return out

    async def query_instances(
        self, tags: Mapping[str, str], *, region: str | None = None
    ) -> list[Instance]:
        out = []
        for vm in self.lab.vms():
            if region is not None and vm.region != region:
                continue
            if all(vm.tags.get(k) == v for k, v in tags.items()):
                out.append(self._instance(vm))
        return out

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            self._known(region, vm_id)
            await self._call(self.lab.stop_vm(vm_id), region)

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            self._known(region, vm_id)
            await self._call(self.lab.start_vm(vm_id), region)

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            self._known(region, vm_id)
            await self._call(self.lab.reboot_vm(vm_id), region)

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            self._known(region, vm_id)
            await self._call(self.lab.terminate_vm(vm_id), region)
            log.info("lab VM %s terminated", vm_id)

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        """The lab's regions are shared by every infra: the lab goes when no VM is left."""
        if any(vm.power != "terminated" for vm in self.lab.vms()):
            return
        if self.lab.read() is None:
            return
        removed = await self.lab.down()
        log.info("lab %s taken down (no VM left): %s", self.lab.data_dir,
                 {k: len(v) for k, v in removed.items()})

    # -- helpers ------------------------------------------------------------------------

    async def _up(self) -> LabState:
        try:
            return await self.lab.up()
        except LabError as exc:
            raise ProvisionError(f"the lab could not be brought up: {exc}",
                                 provider=NAME, scope="provider") from None

    async def _call(self, op: Awaitable[VmState], region: str) -> VmState:
        try:
            return await op
        except LabError as exc:
            raise ProvisionError(str(exc), provider=NAME, region=region) from None

    def _region(self, region: str) -> Region:
        r = self._catalog.regions.get(region)
        if r is None:
            raise InvalidRequestError(
                f"unknown region {region!r} (the lab has {', '.join(self._catalog.regions)})",
                provider=NAME, region=region, code="UnknownRegion",
            )
        return r

    def _check(self, req: LaunchRequest, region: str) -> None:
        size = self._catalog.sizes.get(req.size)
        if size is None or not size.offered_in(region):
            raise InvalidRequestError(f"unknown size {req.size!r}", provider=NAME,
                                      region=region, code="UnknownSize")
        if req.image not in self._catalog.images and req.image not in {
                i.id for i in self._catalog.images.values()}:
            raise InvalidRequestError(f"unknown image {req.image!r}", provider=NAME,
                                      region=region, code="UnknownImage")

    def _known(self, region: str, vm_id: str) -> VmState:
        vm = self.lab.vm(vm_id)
        if vm is None or vm.region != region:
            raise NotFoundError(f"no lab VM {vm_id} in {region}", provider=NAME, region=region)
        return vm

    def _instance(self, vm: VmState) -> Instance:
        state = STATE_MAP[vm.power]
        if state is InstanceState.RUNNING and not self.lab.vm_running(vm):
            state = InstanceState.STOPPED
        extra = {"mode": self.mode, "hostname": vm.hostname}
        phase = self.lab.phase(vm.id)
        if phase:
            extra["boot"] = phase
        return Instance(
            id=vm.id, name=vm.name, placement=Placement(NAME, vm.region), state=state,
            size=vm.size, image=vm.image, private_ip=vm.private_ip, public_ip=vm.public_ip,
            tags=dict(vm.tags), launched_at=vm.created_at, extra=extra,
        )


def _find(state: LabState, name: str) -> VmState | None:
    for vm in state.vms.values():
        if vm.name == name and vm.power != "terminated":
            return vm
    return None


def _catalog(config: LabConfig) -> Catalog:
    regions = {
        r.name: Region(name=r.name, latitude=r.latitude, longitude=r.longitude,
                       display=r.display or r.name)
        for r in config.regions
    }
    sizes = {
        name: Size(name=name, vcpus=cpus, memory_gb=mem,
                   price_hour={r: 0.0 for r in regions})
        for name, cpus, mem in SIZES
    }
    images = {name: Image(name=name, id="host") for name in IMAGES}
    return Catalog(provider=NAME, regions=regions, sizes=sizes, images=images)
