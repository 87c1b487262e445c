"""Overlay networks (KV ``networks``): the spec, its checks (a CIDR overlapping another
network's or a node's VPC range is refused, naming both), and which nodes are members."""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated

import msgspec

from controller.errors import Conflict, NotFound
from controller.mesh.errors import BadNetwork, CidrOverlap
from controller.models import NodeRecord
from controller.state.table import Table
from protocol.errors import SelectorError
from protocol.mesh import FACT_PRIVATE_IP as FACT_PRIVATE_IP
from protocol.mesh import FACT_PUBLIC_IP as FACT_PUBLIC_IP
from protocol.mesh import FACT_VPC_CIDR
from protocol.selectors import Selector

log = logging.getLogger("barista.controller.mesh")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_CIDR = "100.96.0.0/12"
DEFAULT_MTU = 1420
DEFAULT_PORT = 51820
DEFAULT_KEEPALIVE = 25
# The label provisioned nodes carry (controller.provision.model.LABEL_INFRA).
LABEL_INFRA = "infra"
LABEL_REGION = "region"
# Where a node's addresses and VPC range come from: its facts (what the agent reports,
# protocol.mesh FACT_*), else its labels (what provisioning or a join token set).
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")


class NetworkSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `barista net create` sends (and an infra spec's network names refer to)."""

    name: str
    cidr: str = DEFAULT_CIDR
    mtu: Annotated[int, msgspec.Meta(ge=1280, le=9000)] = DEFAULT_MTU
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = DEFAULT_PORT
    keepalive: Annotated[int, msgspec.Meta(ge=0, le=3600)] = DEFAULT_KEEPALIVE
    selector: str = ""
    infras: list[str] = []
    description: str = ""


class NetworkRecord(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """A network as kept in KV ``networks`` (key: its name)."""

    name: str
    cidr: str
    mtu: int = DEFAULT_MTU
    port: int = DEFAULT_PORT
    keepalive: int = DEFAULT_KEEPALIVE
    # Members: nodes matching the selector ("" matches none), or carrying infra=<one of
    # infras>, or whose infra's spec lists this network.
    selector: str = ""
    infras: list[str] = []
    description: str = ""
    created_at: float = 0.0
    # One incarnation of the network: a network removed and made again gets a new one,
    # so its members reset their generation instead of calling the new one stale.
    epoch: str = ""

    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    def public(self) -> dict[str, object]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def check_name(name: object, what: str = "network name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadNetwork("name", f"{what} {name!r} must be 1-32 lower-case letters, digits "
                         "or '-', starting and ending with a letter or digit")
    return name


def parse_cidr(cidr: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise BadNetwork("cidr", f"{cidr!r} is not a network in CIDR notation ({exc})") from None
    # At least two usable host addresses, and not so large that a free-address scan cannot
    # finish (an IPv6 /64 is fine: the scan is bounded by the members, not the range).
    if net.num_addresses < 4:
        raise BadNetwork("cidr", f"{cidr} is too small (at least a /{net.max_prefixlen - 2})")
    if net.is_loopback or net.is_multicast or net.is_link_local:
        raise BadNetwork("cidr", f"{cidr} is a loopback, multicast or link-local range")
    return net


def validate(spec: NetworkSpec) -> NetworkSpec:
    check_name(spec.name)
    parse_cidr(spec.cidr)
    try:
        Selector.parse(spec.selector)
    except SelectorError as exc:
        raise BadNetwork("selector", str(exc)) from None
    for infra in spec.infras:
        check_name(infra, "infra name")
    if len(spec.description) > 500:
        raise BadNetwork("description", "at most 500 characters")
    return spec


def _value(node: NodeRecord, key: str) -> str:
    return node.facts.get(key) or node.labels.get(key) or ""


def node_address(node: NodeRecord, key: str) -> IPAddress | None:
    """The node's private or public address (FACT_PRIVATE_IP / FACT_PUBLIC_IP), if valid."""
    raw = _value(node, key).strip()
    if not raw:
        return None
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        return None


def node_vpc_ranges(node: NodeRecord) -> list[IPNetwork]:
    """The node's VPC ranges (FACT_VPC_CIDR), else its private address as a host route."""
    out: list[IPNetwork] = []
    for part in _value(node, FACT_VPC_CIDR).split(","):
        if part.strip():
            try:
                out.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                continue
    if not out:
        addr = node_address(node, FACT_PRIVATE_IP)
        if addr is not None:
            out.append(ipaddress.ip_network(addr))
    return out


def node_vpc(node: NodeRecord) -> str:
    """A node's private network id: its VPC range(s), else "" (its own, shared with none)."""
    return ",".join(str(n) for n in node_vpc_ranges(node)
                    if n.num_addresses > 1) or ""


VpcRange = tuple[str, IPNetwork]  # (whose range, in words; the range)


def node_ranges(node: NodeRecord) -> list[VpcRange]:
    """A node's VPC ranges, each with the words that name it in an error."""
    return [(f"the VPC range of node {node.id} ({node.hostname})", vpc)
            for vpc in node_vpc_ranges(node)]


def check_overlaps(
    cidr: str, *, name: str, networks: Iterable[NetworkRecord], vpcs: Iterable[VpcRange]
) -> None:
    """Refuse ``cidr`` when it overlaps another network's CIDR or a node's VPC range."""
    mine = parse_cidr(cidr)
    for other in networks:
        if other.name == name:
            continue
        theirs = other.network()
        if theirs.version == mine.version and mine.overlaps(theirs):
            raise CidrOverlap(cidr, f"network {other.name}", other.cidr)
    for owner, vpc in vpcs:
        if vpc.version == mine.version and mine.overlaps(vpc):
            raise CidrOverlap(cidr, owner, str(vpc))


class Membership:
    """Which nodes belong to a network: the selector, the network's infras, or an infra
    whose spec lists the network (``infra_networks``: infra name -> its networks)."""

    def __init__(self, *, infra_networks: Callable[[str], Sequence[str]] | None = None) -> None:
        self._infra_networks = infra_networks
        self._selectors: dict[str, tuple[str, Selector]] = {}

    def use_infra_networks(self, fn: Callable[[str], Sequence[str]] | None) -> None:
        """Where an infra's ``networks:`` come from (the provisioning engine, once it
        runs in the controller); the distributor must be marked dirty after a change."""
        self._infra_networks = fn

    def _selector(self, net: NetworkRecord) -> Selector | None:
        if not net.selector:
            return None
        cached = self._selectors.get(net.name)
        if cached is None or cached[0] != net.selector:
            cached = (net.selector, Selector.parse(net.selector))
            self._selectors[net.name] = cached
        return cached[1]

    def is_member(self, net: NetworkRecord, node: NodeRecord) -> bool:
        if node.revoked:
            return False
        sel = self._selector(net)
        if sel is not None and sel.matches(node.labels):
            return True
        infra = node.labels.get(LABEL_INFRA, "")
        if not infra:
            return False
        if infra in net.infras:
            return True
        if self._infra_networks is not None:
            try:
                return net.name in self._infra_networks(infra)
            except Exception:
                log.exception("looking up the networks of infra %s failed", infra)
        return False

    def members(self, net: NetworkRecord, nodes: Iterable[NodeRecord]) -> list[NodeRecord]:
        return sorted((n for n in nodes if self.is_member(net, n)), key=lambda n: n.id)

    @staticmethod
    def conflicting(net: NetworkRecord, ranges: Iterable[VpcRange]) -> str:
        """Why a would-be member cannot join (a VPC range of it overlaps the network)."""
        mine = net.network()
        for owner, vpc in ranges:
            if vpc.version == mine.version and mine.overlaps(vpc):
                return f"{owner} {vpc} overlaps network {net.name} ({net.cidr})"
        return ""


class Networks:
    """Create, list, show and remove networks; CIDR checks against the others and the
    nodes. Two controllers creating one name: KV create decides, the loser gets Conflict."""

    def __init__(
        self, table: Table[NetworkRecord], *, vpc_ranges: Callable[[], Iterable[VpcRange]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self._vpc_ranges = vpc_ranges
        self._clock = clock

    def get(self, name: str) -> NetworkRecord:
        net = self.table.get(name)
        if net is None:
            raise NotFound(f"no network named {name!r} (barista net ls lists them)")
        return net

    def list(self) -> list[NetworkRecord]:
        return sorted(self.table, key=lambda n: n.name)

    async def create(self, spec: NetworkSpec) -> NetworkRecord:
        validate(spec)
        if self.table.get(spec.name) is not None:
            raise Conflict(f"network {spec.name!r} already exists")
        check_overlaps(spec.cidr, name=spec.name, networks=self.table,
                       vpcs=self._vpc_ranges())
        record = NetworkRecord(
            name=spec.name, cidr=str(parse_cidr(spec.cidr)), mtu=spec.mtu, port=spec.port,
            keepalive=spec.keepalive, selector=spec.selector, infras=list(spec.infras),
            description=spec.description, created_at=self._clock(),
            epoch=secrets.token_hex(4))
        await self.table.create(spec.name, record)
        # Another controller may have created an overlapping one at the same moment: the
        # later of two overlapping networks (by KV revision) gives way.
        for other in list(self.table):
            if other.name == spec.name:
                continue
            if other.network().version == record.network().version and \
                    other.network().overlaps(record.network()) and \
                    self.table.revision(other.name) < self.table.revision(spec.name):
                await self.table.delete(spec.name)
                raise CidrOverlap(record.cidr, f"network {other.name}", other.cidr)
        log.info("network %s created (%s)", spec.name, record.cidr)
        return record

    async def delete(self, name: str) -> None:
        self.get(name)
        await self.table.delete(name)
        log.info("network %s removed", name)
