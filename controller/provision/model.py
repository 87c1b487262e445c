"""The infra model the engine, the API and the CLI share: the spec a user writes (kept as
desired state in KV ``infras``), the views the engine reports, the plan of a review and
the progress events of a run, plus the ``Infras`` protocol the API calls.

Spec parsing and validation (errors that name the field) live in ``spec.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Literal, Protocol

import msgspec

# Labels every node of an infra carries (with provider, region and zone), so selectors,
# `barista run --infra NAME` and metrics tags reach an infra or one of its groups.
LABEL_INFRA = "infra"
LABEL_GROUP = "group"

PartialFailure = Literal["continue", "rollback"]
InfraStatus = Literal[
    "pending",
    "creating",
    "ready",
    "degraded",
    "failed",
    "suspending",
    "suspended",
    "resuming",
    "deleting",
    "deleted",
]
NodePhase = Literal[
    "planned",
    "creating",
    "booting",
    "running",
    "ready",
    "stopping",
    "stopped",
    "rebooting",
    "deleting",
    "deleted",
    "failed",
]


class SizeQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``size: {vcpus: 2, memory_gb: 4}``: the cheapest catalog size with at least these."""

    vcpus: int
    memory_gb: float


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    provider: str
    # In order of preference: "region" or "region/zone". Failover walks this list.
    regions: list[str]
    size: str | SizeQuery
    image: str = "ubuntu-24.04"
    count: int = 1
    labels: dict[str, str] = {}
    on_partial_failure: PartialFailure = "continue"
    public_ip: bool = True
    ssh_from: list[str] = []  # CIDRs allowed to SSH in; [] = port 22 closed
    # An OpenSSH public key put on the VMs (aws: imported as a key pair of the infra).
    ssh_public_key: str = ""
    # ``ssh`` provider only: the machines to adopt ("user@host[:port]").
    hosts: list[str] = []


class InfraSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    groups: list[GroupSpec]
    labels: dict[str, str] = {}
    # Overlay networks (issue 12) the infra's nodes join.
    networks: list[str] = []
    description: str = ""


Action = Literal["scale", "suspend", "resume", "reboot"]


class InfraAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    action: Action
    group: str = ""  # "" = every group
    count: int | None = None  # scale only: the group's new count


# -- what the engine reports -----------------------------------------------------------


class NodeView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str  # "<infra>-<group>-<index>"
    group: str
    phase: NodePhase
    provider: str
    region: str = ""
    zone: str = ""
    vm_id: str = ""
    node_id: str = ""  # the enrolled node's id once its agent joined
    private_ip: str = ""
    public_ip: str = ""
    error: str = ""  # last failure, for the operator (never a secret)


class GroupView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    provider: str
    desired: int
    ready: int = 0
    running: int = 0
    pending: int = 0
    failed: int = 0
    # Why nodes failed, aggregated: {"capacity in zone-b": 2}.
    reasons: dict[str, int] = {}
    nodes: list[NodeView] = []


class InfraView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    status: InfraStatus
    spec: InfraSpec
    groups: list[GroupView] = []
    created_at: float = 0.0
    updated_at: float = 0.0
    # One line like "Running 98/100, Failed 2 (capacity in zone-b)".
    summary: str = ""
    leaks: list[str] = []  # VMs found beyond what the spec asks for (by vm id)


class PlanItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    group: str
    provider: str
    region: str
    zone: str = ""
    size: str
    vcpus: int = 0
    memory_gb: float = 0.0
    image: str = ""
    count: int  # VMs to create here (the gap, not the total)
    existing: int = 0
    price_hour: float | None = None  # per VM, USD; None when the catalog has no price


class Plan(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    infra: str
    items: list[PlanItem]
    total_hour: float = 0.0  # USD per hour for everything the infra will run
    warnings: list[str] = []


class Progress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One step of a run, streamed to the API (SSE) and the CLI's progress bars."""

    infra: str
    group: str = ""
    node: str = ""
    phase: NodePhase | InfraStatus
    message: str = ""
    done: int = 0  # nodes of the group that reached their goal
    total: int = 0
    at: float = 0.0


class Infras(Protocol):
    """What the API needs from the provisioning engine."""

    def parse(self, raw: bytes, *, yaml_text: bool) -> InfraSpec:
        """A spec from the API's body (JSON, or YAML), validated against the providers'
        catalogs; ``BadRequest`` naming the field otherwise."""
        ...

    async def review(self, spec: InfraSpec) -> Plan: ...

    async def create(self, spec: InfraSpec) -> InfraView:
        """Store the desired state and start reconciling in the background; a spec for an
        existing infra updates it (a re-run creates only the gap)."""
        ...

    async def delete(self, name: str) -> InfraView: ...

    async def act(self, name: str, action: InfraAction) -> InfraView: ...

    def get(self, name: str) -> InfraView | None: ...

    def infras(self) -> list[InfraView]: ...

    def subscribe(self, fn: Callable[[Progress], None]) -> Callable[[], None]:
        """Call ``fn`` for every progress step; returns the unsubscribe function."""
        ...

    async def gc(self, *, confirm: bool, vm_ids: Collection[str] | None = None) -> list[NodeView]:
        """VMs carrying our tags that the state does not know; removed when ``confirm``
        (only those in ``vm_ids`` when given: what the operator was shown and agreed to)."""
        ...
