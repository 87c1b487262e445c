"""The engine's types: an infra's record in KV ``infras``, the settings, and the
in-memory state of each infra and node."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from controller.provision.contract import (
    CapacityError,
    CredentialsError,
    Instance,
    InstanceState,
    Network,
    Placement,
    ProvisionError,
    QuotaError,
    TransientError,
)
from controller.provision.model import GroupSpec, InfraSpec, InfraStatus, NodePhase

# (infra, group, node name, labels) -> the node's cloud-init user-data (a secret: it
# carries a join token bound to that node, whose labels link the node record to the infra).
# (infra, group, node name, labels, the network it is launched in) -> user-data
UserDataRenderer = Callable[[InfraSpec, GroupSpec, str, Mapping[str, str], Network],
                            Awaitable[str]]
# Forget an enrolled node whose VM is gone (the controller revokes its NATS user first).
ForgetNode = Callable[[str], Awaitable[None]]


class InfraRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One infra's desired state, as kept in KV ``infras``."""

    spec: InfraSpec
    status: InfraStatus = "pending"
    created_at: float = 0.0
    updated_at: float = 0.0
    # group -> node names to remove (a scale-in), until the provider confirmed them gone.
    retire: dict[str, list[str]] = {}
    # group -> why it is not reconciled any more (rolled back, credentials refused) until
    # the next create or action.
    halted: dict[str, str] = {}
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class EngineSettings:
    attempts: int = 8  # tries of one call on transient errors
    backoff: float = 0.5  # first retry delay (doubles, with +-50 % jitter)
    backoff_max: float = 20.0
    poll_interval: float = 0.5  # provider queries while agents come online
    slow_poll: float = 15.0  # and at most this far apart otherwise
    ready_timeout: float = 600.0  # launch -> agent online
    confirmations: int = 3  # consecutive "gone" answers before a delete is done
    confirm_interval: float = 2.0
    delete_timeout: float = 900.0
    state_timeout: float = 600.0  # stop/start reaching the state asked
    keep_deleted: float = 3600.0  # a deleted infra's view stays this long (memory)


@dataclass
class _Node:
    name: str
    group: str
    index: int
    phase: NodePhase = "planned"
    placement: Placement | None = None
    vm_id: str = ""
    vm_state: InstanceState | None = None
    private_ip: str = ""
    public_ip: str = ""
    node_id: str = ""
    online: bool = False
    error: str = ""
    reason: str = ""  # aggregated failure reason ("capacity in zone east-1b")
    launched_at: float = 0.0
    linked_vm: str = ""  # the vm id written into the node record
    trying: Placement | None = None  # where a create of it is in flight


@dataclass
class _Infra:
    name: str
    record: InfraRecord
    nodes: dict[str, _Node] = field(default_factory=dict)
    leaks: dict[str, Instance] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    networks: dict[tuple[str, str], Network] = field(default_factory=dict)
    # ensure_network in flight per (provider, region), shared by every group and batch
    # that needs it (two concurrent ones could each make a VPC); True: started ahead.
    net_tasks: dict[tuple[str, str], tuple[asyncio.Task[Network], bool]] = field(
        default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    deleted_at: float = 0.0


class _Halt(Exception):
    """A group stops (credentials refused): its remaining work is failed with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The journal's "infra" for gc's deletes (no infra name has "_").
GC_JOURNAL = "_gc"


def node_name(infra: str, group: str, index: int) -> str:
    return f"{infra}-{group}-{index}"


def reason_of(exc: ProvisionError) -> str:
    if isinstance(exc, CapacityError):
        return f"capacity in {exc.where}"
    if isinstance(exc, QuotaError):
        return f"quota in {exc.where}"
    if isinstance(exc, CredentialsError):
        return f"credentials refused by provider {exc.provider}"
    if isinstance(exc, TransientError):
        return f"provider {exc.provider} unavailable ({exc.code or 'transient'})"
    return f"{exc.kind} at {exc.where}"


def _index(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def installation_id(data_dir: Path) -> str:
    """This controller installation's TAG_MANAGED value, made once and kept in
    ``data_dir/installation``: VMs carrying another value are never touched (not even by
    gc), so two installations can share a cloud account."""
    path = data_dir / "installation"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"b-{secrets.token_hex(6)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return value
