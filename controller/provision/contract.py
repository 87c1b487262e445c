"""The provider contract: one ``Provider`` protocol every cloud implements, the frozen types
that cross it, the catalog shape, and typed errors that carry their scope.

The engine (``engine/``) only ever talks to providers through this module. A provider is
stateless apart from its SDK clients: everything it needs to find what it made again is in
the tags it puts on every resource (``TAG_*`` below), so a controller restarted at any point
can query what exists instead of trusting memory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from protocol.errors import BaristaError

# Tags (labels on GCP, tags on AWS/Azure) put on every resource we create. Values are
# limited to [a-z0-9-_] and 63 characters so that every cloud accepts them unchanged.
TAG_MANAGED = "barista-managed"  # value: the controller's installation id
TAG_INFRA = "barista-infra"
TAG_GROUP = "barista-group"
TAG_NODE = "barista-node"  # the node's name inside the infra: "<infra>-<group>-<index>"

WIREGUARD_PORT = 51820


class InstanceState(enum.Enum):
    """A VM's state as the provider reports it, mapped by each provider's state map."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    UNKNOWN = "unknown"

    @property
    def gone(self) -> bool:
        return self is InstanceState.TERMINATED


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a VM runs. ``zone`` is empty for providers without zones."""

    provider: str
    region: str
    zone: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.provider, self.region, self.zone) if p)


@dataclass(frozen=True, slots=True)
class Instance:
    """One VM as observed at the provider."""

    id: str
    name: str  # the TAG_NODE value
    placement: Placement
    state: InstanceState
    size: str
    image: str = ""
    private_ip: str = ""
    public_ip: str = ""  # "" for a VM without a public address (private site, NAT)
    tags: Mapping[str, str] = field(default_factory=dict)
    launched_at: float = 0.0
    # Provider-only facts (Libcloud's ``extra``): shown, never interpreted by the engine.
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NetworkRequest:
    """The network + firewall one infra needs in one region: the WireGuard UDP port is
    always open; SSH only when asked."""

    infra: str
    region: str
    cidr: str = "10.64.0.0/16"
    wireguard_port: int = WIREGUARD_PORT
    ssh_from: Sequence[str] = ()  # CIDRs allowed to reach port 22; () = closed
    # An OpenSSH public key for the VMs ("" = none); providers that keep keys as a resource
    # (an EC2 key pair) create it here, tagged, and remove it at cleanup.
    ssh_public_key: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Network:
    """What ``ensure_network`` made (or found): ids are provider-specific."""

    id: str
    region: str
    cidr: str
    subnet_id: str = ""
    firewall_id: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """One VM to create. ``name`` is unique within the infra and is the idempotency key:
    a provider asked for a name that already exists returns the existing VM."""

    name: str
    size: str
    image: str
    user_data: str  # rendered cloud-init; secret (carries a join token): never logged
    tags: Mapping[str, str] = field(default_factory=dict)


# -- catalog ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    latitude: float
    longitude: float
    zones: tuple[str, ...] = ()
    display: str = ""


@dataclass(frozen=True, slots=True)
class Size:
    name: str
    vcpus: int
    memory_gb: float
    # USD per hour by region; a region not listed has no known price (a review says so).
    price_hour: Mapping[str, float] = field(default_factory=dict)
    arch: Literal["x86_64", "arm64"] = "x86_64"
    gpus: int = 0
    gpu_model: str = ""
    # Where the size is offered; () = in every region of the catalog.
    regions: tuple[str, ...] = ()

    def offered_in(self, region: str) -> bool:
        return not self.regions or region in self.regions


@dataclass(frozen=True, slots=True)
class Image:
    name: str  # what a spec says: "ubuntu-24.04"
    id: str  # what the provider wants (an AMI id, an image URL, a URN)
    os: str = "linux"
    arch: Literal["x86_64", "arm64"] = "x86_64"


@dataclass(frozen=True, slots=True)
class Catalog:
    provider: str
    regions: Mapping[str, Region]
    sizes: Mapping[str, Size]
    images: Mapping[str, Image]

    def price(self, size: str, region: str) -> float | None:
        s = self.sizes.get(size)
        return None if s is None else s.price_hour.get(region)


# -- errors ----------------------------------------------------------------------------

Scope = Literal["zone", "region", "provider"]


class ProvisionError(BaristaError):
    """A provider call failed. ``scope`` says how much to block on failover: a capacity
    error in a zone blocks that zone, a quota error the region, bad credentials the whole
    provider. ``code`` is the cloud's own error code, kept for the operator."""

    kind = "provision_error"
    retryable = False
    default_scope: Scope = "region"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        region: str = "",
        zone: str = "",
        code: str = "",
        scope: Scope | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.region = region
        self.zone = zone
        self.code = code
        self.scope: Scope = scope or self.default_scope

    @property
    def where(self) -> str:
        if self.scope == "zone" and self.zone:
            return f"zone {self.zone}"
        if self.scope in ("zone", "region") and self.region:
            return f"region {self.region}"
        return f"provider {self.provider}"


class TransientError(ProvisionError):
    """Throttling, timeouts, 5xx: retry with backoff and jitter."""

    kind = "transient"
    retryable = True


class CapacityError(ProvisionError):
    """The zone (or region) has no capacity for the size: fail over to the next one."""

    kind = "capacity"
    default_scope: Scope = "zone"


class QuotaError(ProvisionError):
    """An account limit: retrying will not help; fail over to another region."""

    kind = "quota"


class CredentialsError(ProvisionError):
    """Missing or refused credentials: nothing on this provider can work until fixed."""

    kind = "credentials"
    default_scope: Scope = "provider"


class NotFoundError(ProvisionError):
    """The resource does not exist (a delete of it is already done)."""

    kind = "not_found"


class InvalidRequestError(ProvisionError):
    """The provider refused the request itself (unknown size or image in that region...)."""

    kind = "invalid"


# -- the protocol ----------------------------------------------------------------------


@runtime_checkable
class Provider(Protocol):
    """The operations every provider implements, with the same meaning everywhere.

    Every call may raise a ``ProvisionError`` subclass; anything else is a bug in the
    provider. Calls are safe to repeat: ``ensure_network`` finds what exists by tag,
    ``run_instances`` returns an existing VM for a name it already has, stop/start/
    reboot/terminate of a VM already in that state succeed, ``terminate`` of an unknown
    id raises ``NotFoundError``.
    """

    @property
    def name(self) -> str: ...

    def catalog(self) -> Catalog: ...

    async def ensure_network(self, request: NetworkRequest) -> Network: ...

    async def run_instances(
        self, placement: Placement, network: Network, requests: Sequence[LaunchRequest]
    ) -> list[Instance]:
        """Create up to one batch of VMs in one placement (the engine sizes the batches)."""
        ...

    async def query_instances(
        self, tags: Mapping[str, str], *, region: str | None = None
    ) -> list[Instance]:
        """Every VM carrying all of ``tags`` (terminated ones may be included)."""
        ...

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None: ...

    async def start_instances(self, region: str, ids: Sequence[str]) -> None: ...

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None: ...

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None: ...

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        """Remove the networks, firewalls, addresses... carrying ``tags`` that no VM uses."""
        ...
