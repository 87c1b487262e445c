"""The mesh side of the controller in one piece: networks, IPAM, the distributor and the
matrix, built from their tables and started and stopped together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from controller.mesh.deltas import DEFAULT_WINDOW, MeshDistributor, MeshNode, MeshState, Reject
from controller.mesh.ipam import DEFAULT_QUARANTINE, Ipam, Lease
from controller.mesh.matrix import Matrix
from controller.mesh.networks import Membership, NetworkRecord, Networks
from controller.models import NodeRecord
from controller.state.table import Table
from protocol.subjects import Subjects


@dataclass(frozen=True)
class MeshTables:
    networks: Table[NetworkRecord]
    ipam: Table[Lease]
    mesh_nodes: Table[MeshNode]
    states: Table[MeshState]


class MeshService:
    """``async with MeshService(...)``: the distributor and the matrix run inside."""

    def __init__(
        self,
        *,
        tables: MeshTables,
        nodes: Table[NodeRecord],
        nc: NATS,
        js: JetStreamContext,
        subjects: Subjects,
        reject: Reject,
        window: float = DEFAULT_WINDOW,
        quarantine: float = DEFAULT_QUARANTINE,
        matrix_interval: float = 10.0,
        max_state: int | None = None,
        infra_networks: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        self.ipam = Ipam(tables.ipam, quarantine=quarantine)
        self.membership = Membership(infra_networks=infra_networks)
        # The relay choice asks the matrix for region RTTs; the matrix asks the
        # distributor's state for members: built in this order, tied by callables.
        self.matrix = Matrix(states=tables.states.get, nc=nc, js=js, subjects=subjects,
                             reject=reject, interval=matrix_interval)
        self.distributor = MeshDistributor(
            networks=tables.networks, nodes=nodes, mesh_nodes=tables.mesh_nodes,
            states=tables.states, ipam=self.ipam, membership=self.membership, nc=nc, js=js,
            subjects=subjects, reject=reject, window=window,
            # What one message may carry on this server (a snapshot is one message).
            max_state=max_state if max_state is not None else nc.max_payload - 4096,
            region_rtt=self._region_rtt)
        self.networks = Networks(tables.networks, vpc_ranges=self.distributor.vpc_ranges)
        self._stack = AsyncExitStack()

    def _region_rtt(self, a: str, b: str) -> float | None:
        vals = [r for n in self.networks.list() if (r := self.matrix.region_rtt(n.name)(a, b))
                is not None]
        return min(vals) if vals else None

    async def __aenter__(self) -> MeshService:
        await self._stack.enter_async_context(self.matrix)
        await self._stack.enter_async_context(self.distributor)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def in_network(self, node: NodeRecord) -> bool:
        """Whether ``node`` is a member of some network (its agent starts the overlay)."""
        return any(self.membership.is_member(net, node) for net in self.networks.table)

    def use_infra_networks(self, fn: Callable[[str], Sequence[str]] | None) -> None:
        """Plug in an infra's ``networks:`` (infra name -> network names); call
        ``infras_changed()`` whenever an infra spec changes."""
        self.membership.use_infra_networks(fn)
        self.distributor.mark_all()

    def infras_changed(self) -> None:
        self.distributor.mark_all()

    async def delete_network(self, name: str) -> None:
        """Remove a network: its members get a last delta that takes everyone out."""
        await self.networks.delete(name)
        self.distributor.mark(name)

    def status(self) -> dict[str, object]:
        return {"networks": len(self.networks.list()), **self.distributor.stats,
                "ipam": dict(self.ipam.stats), "matrix": dict(self.matrix.stats),
                "invites": dict(self.distributor.invites.stats)}
