"""The lab's configuration and its state file: what exists, under which prefix, at which
addresses. Written before anything is created (a journal), so ``lab down`` can sweep by
prefix after any crash.

Addressing (all inside 198.18.0.0/16; 198.19.0.0/16 stays free for test overlays):

- region ``k`` (1-based, catalog order): 198.18.k.0/24, its gateway 198.18.k.1 on the
  region bridge, VMs from .10;
- a private region ``k`` additionally has a LAN 198.18.(100+k).0/24 behind its NAT: the
  VMs live there, 198.18.k.1 is the site's one public address, and no route leads to the
  LAN from anywhere else;
- the gateway link: one /29 in 198.18.248.0/21 chosen per lab among those no host
  interface uses, so that labs of parallel tests never share a host subnet: host bridge
  .1 (where the controller listens for the VMs), the lab's gateway namespace .2.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import msgspec

from agent.files import write_private
from controller.provision.lab.errors import LabConfigError

PREFIX_LEN = 8  # "bl" + 6 hex
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")
GATEWAY_POOL = ipaddress.IPv4Network("198.18.248.0/21")
GATEWAY_LINK_PREFIX = 29
FIRST_VM_HOST = 10
LAST_VM_HOST = 250
MAX_REGIONS = 99

Mode = Literal["netns", "process"]
RegionKind = Literal["public", "private"]
VmPower = Literal["creating", "running", "stopped", "terminated"]


def new_prefix() -> str:
    """A fresh lab prefix: every namespace, interface and process of the lab carries it."""
    return "bl" + secrets.token_hex(3)


def check_prefix(prefix: str) -> str:
    if len(prefix) != PREFIX_LEN or not prefix.startswith("bl"):
        raise LabConfigError("prefix", f"{prefix!r} is not 'bl' followed by 6 hex digits")
    try:
        int(prefix[2:], 16)
    except ValueError:
        raise LabConfigError("prefix", f"{prefix!r} is not 'bl' followed by 6 hex digits") from None
    if prefix != prefix.lower():
        raise LabConfigError("prefix", f"{prefix!r} must be lower case")
    return prefix


class RegionConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    latitude: float = 0.0
    longitude: float = 0.0
    kind: RegionKind = "public"
    display: str = ""


class LinkConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The WAN between two regions: round-trip time (half of it each way) and loss (each
    way, a probability per packet). ``b`` may be ``gateway``: the controller's link."""

    a: str
    b: str
    rtt_ms: float
    loss: float = 0.0


GATEWAY = "gateway"

DEFAULT_REGIONS = (
    RegionConfig(name="lab-us", latitude=38.9, longitude=-77.0, display="Lab US (Virginia)"),
    RegionConfig(name="lab-eu", latitude=50.1, longitude=8.7, display="Lab EU (Frankfurt)"),
    RegionConfig(name="lab-ap", latitude=37.5, longitude=127.0, display="Lab AP (Seoul)"),
    RegionConfig(
        name="lab-onprem", latitude=36.35, longitude=127.38, kind="private",
        display="Lab on-prem site (Daejeon, behind NAT)",
    ),
)
DEFAULT_LINKS = (
    LinkConfig(a="lab-us", b="lab-eu", rtt_ms=80),
    LinkConfig(a="lab-us", b="lab-ap", rtt_ms=140),
    LinkConfig(a="lab-eu", b="lab-ap", rtt_ms=120),
    LinkConfig(a="lab-onprem", b="lab-ap", rtt_ms=12),
    LinkConfig(a="lab-onprem", b="lab-us", rtt_ms=130),
    LinkConfig(a="lab-onprem", b="lab-eu", rtt_ms=110),
)


class LabConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How to build a lab. Pairs missing from ``links`` get ``default_rtt_ms``; the
    gateway (controller) link gets ``gateway_rtt_ms`` unless a link names it."""

    regions: tuple[RegionConfig, ...] = DEFAULT_REGIONS
    links: tuple[LinkConfig, ...] = DEFAULT_LINKS
    default_rtt_ms: float = 50.0
    gateway_rtt_ms: float = 0.0
    seed: int = 0  # the loss draws are reproducible
    # Directories put first on PATH for the user-data's commands (a host venv's bin/).
    extra_path: tuple[str, ...] = ()
    # Who delays: "auto" = netem where the kernel has it, else the userspace router.
    delay_backend: Literal["auto", "router", "netem"] = "auto"

    def validate(self) -> LabConfig:
        names = [r.name for r in self.regions]
        if not names:
            raise LabConfigError("regions", "at least one region is needed")
        if len(names) > MAX_REGIONS:
            raise LabConfigError("regions", f"at most {MAX_REGIONS} regions")
        for i, r in enumerate(self.regions):
            if not r.name or GATEWAY == r.name or not all(c.isalnum() or c == "-" for c in r.name):
                raise LabConfigError(f"regions[{i}].name", f"{r.name!r} is not a region name")
        if len(set(names)) != len(names):
            raise LabConfigError("regions", "duplicate region name")
        known = {*names, GATEWAY}
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                value = getattr(link, end)
                if value not in known:
                    raise LabConfigError(f"links[{i}].{end}", f"unknown region {value!r}")
            if link.a == link.b:
                raise LabConfigError(f"links[{i}]", "a link joins two different regions")
            if not 0 <= link.rtt_ms <= 10_000:
                raise LabConfigError(f"links[{i}].rtt_ms", f"{link.rtt_ms} is not in 0..10000")
            if not 0 <= link.loss < 1:
                raise LabConfigError(f"links[{i}].loss", f"{link.loss} is not in [0, 1)")
        if not 0 <= self.default_rtt_ms <= 10_000:
            raise LabConfigError("default_rtt_ms", f"{self.default_rtt_ms} is not in 0..10000")
        if not 0 <= self.gateway_rtt_ms <= 10_000:
            raise LabConfigError("gateway_rtt_ms", f"{self.gateway_rtt_ms} is not in 0..10000")
        return self

    def link(self, a: str, b: str) -> LinkConfig:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        rtt = self.gateway_rtt_ms if GATEWAY in (a, b) else self.default_rtt_ms
        return LinkConfig(a=a, b=b, rtt_ms=rtt)


# -- the state file --------------------------------------------------------------------


class RegionState(msgspec.Struct, kw_only=True):
    name: str
    index: int
    kind: RegionKind
    subnet: str  # the region link: 198.18.k.0/24
    gateway_ip: str  # 198.18.k.1: the VMs' default gateway (public) / the site's address
    lan: str = ""  # private regions: the LAN behind NAT, where the VMs are
    netns: str = ""  # the region's router namespace ("" in process mode)


class GatewayState(msgspec.Struct, kw_only=True):
    subnet: str
    host_ip: str  # on the host bridge: the controller listens here for the VMs
    ns_ip: str  # the gateway namespace's end (the VMs' traffic arrives from here, NATed)
    bridge: str  # host interface names (the only host objects of the lab)
    veth: str
    netns: str


class VmState(msgspec.Struct, kw_only=True):
    id: str  # = its netns name: "<prefix>-vm<seq>"
    seq: int
    name: str
    region: str
    size: str
    image: str
    private_ip: str
    public_ip: str
    tags: dict[str, str] = {}
    power: VmPower = "creating"
    created_at: float = 0.0
    changed_at: float = 0.0
    hostname: str = ""
    # process mode: the VM's init, identified by pid and start time (never a reused pid).
    init_pid: int = 0
    init_start: int = 0


class RouterState(msgspec.Struct, kw_only=True):
    netns: str = ""
    pid: int = 0
    pid_start: int = 0
    backend: Literal["tun", "netem", "none"] = "tun"


class LabState(msgspec.Struct, kw_only=True):
    prefix: str
    mode: Mode
    config: LabConfig
    created_at: float
    regions: list[RegionState] = []
    gateway: GatewayState | None = None
    router: RouterState = msgspec.field(default_factory=RouterState)
    vms: dict[str, VmState] = {}
    next_seq: int = 1
    up: bool = False  # every region, the router and the gateway were made

    def region(self, name: str) -> RegionState | None:
        for r in self.regions:
            if r.name == name:
                return r
        return None


def plan_regions(config: LabConfig, *, netns: bool, prefix: str) -> list[RegionState]:
    out = []
    for i, r in enumerate(config.regions, start=1):
        subnet = ipaddress.IPv4Network(f"198.18.{i}.0/24")
        lan = f"198.18.{100 + i}.0/24" if r.kind == "private" else ""
        out.append(
            RegionState(
                name=r.name,
                index=i,
                kind=r.kind,
                subnet=str(subnet),
                gateway_ip=str(subnet.network_address + 1),
                lan=lan,
                netns=f"{prefix}-r{i}" if netns else "",
            )
        )
    return out


def vm_network(region: RegionState) -> ipaddress.IPv4Network:
    """The subnet a region's VMs get their addresses in."""
    return ipaddress.IPv4Network(region.lan or region.subnet)


def free_vm_ip(state: LabState, region: RegionState) -> str | None:
    used = {
        vm.private_ip for vm in state.vms.values()
        if vm.region == region.name and vm.power != "terminated"
    }
    net = vm_network(region)
    for host in range(FIRST_VM_HOST, LAST_VM_HOST + 1):
        ip = str(net.network_address + host)
        if ip not in used:
            return ip
    return None


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(LabState)


class StateFile:
    """``state.json`` in the lab's data dir, read and changed under an exclusive ``flock``
    (the provider, ``lab status`` and ``lab down`` may run in different processes)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "state.json"
        self._lock_path = data_dir / "state.lock"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> LabState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _DEC.decode(raw)
        except msgspec.DecodeError as exc:
            raise LabConfigError(str(self.path), f"lab state file is unreadable: {exc}") from None

    def write(self, state: LabState) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.path, _ENC.encode(state), durable=False)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def change(self) -> Iterator[LabState]:
        """Read, let the caller change, write back: all under the lock."""
        with self.locked():
            state = self.read()
            if state is None:
                raise LabConfigError(str(self.path), "no lab here (state file missing)")
            yield state
            self.write(state)


def now() -> float:
    return time.time()
