"""What exists: the VMs a provider reports for our tags (adopted as the truth) and the
agents online in the ``nodes`` table; a node is Ready when both say so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence

import msgspec

from controller.errors import Conflict, NotFound
from controller.models import NodeRecord
from controller.provision.contract import TAG_GROUP, Instance, InstanceState
from controller.provision.engine.calls import ProviderCalls
from controller.provision.engine.records import _index, _Infra, _Node, node_name
from controller.provision.engine.views import Views
from controller.provision.model import GroupSpec

log = logging.getLogger("barista.controller.provision")


class Observation(ProviderCalls, Views):
    """Observation of both sources of truth, and the Ready check that joins them."""

    async def _observe_all(self, inf: _Infra) -> None:
        await asyncio.gather(*(self._observe(inf, g) for g in inf.record.spec.groups
                               if g.provider not in self._refused))

    async def _observe(self, inf: _Infra, g: GroupSpec, regions: Collection[str] | None = None
                       ) -> list[Instance]:
        """Query the group's VMs (in ``regions`` only when given) and absorb the answer."""
        prov = self._providers[g.provider]
        tags = self._tags(inf.name, g.name)
        found: list[Instance] = []
        asked = [r for r in self._regions(g) if regions is None or r in regions]

        async def one(region: str) -> list[Instance]:
            self._last_query[(g.provider, region, inf.name)] = self._clock()
            return await self._call(prov, region, "query_instances",
                                    lambda: prov.query_instances(tags, region=region))

        for part in await asyncio.gather(*(one(r) for r in asked)):
            found += part
        self._absorb(inf, g, found, None if regions is None else set(asked))
        return found

    def _absorb(self, inf: _Infra, g: GroupSpec, found: Sequence[Instance],
                regions: Collection[str] | None = None) -> None:
        """Take what the provider reports as the truth for group ``g`` (in ``regions``)."""
        retire = set(inf.record.retire.get(g.name, []))
        for i in range(g.count):
            name = node_name(inf.name, g.name, i)
            inf.nodes.setdefault(name, _Node(name, g.name, i))
        by_name: dict[str, list[Instance]] = {}
        for inst in found:
            if inst.state.gone:
                continue
            by_name.setdefault(inst.name, []).append(inst)
        for vm_id in [k for k, v in inf.leaks.items() if v.tags.get(TAG_GROUP) == g.name
                      and (regions is None or v.placement.region in regions)]:
            del inf.leaks[vm_id]
        for name, insts in by_name.items():
            node = inf.nodes.get(name)
            idx = _index(name)
            if node is None and name in retire:
                node = inf.nodes[name] = _Node(name, g.name, idx, phase="deleting")
            if node is None:
                for inst in insts:
                    inf.leaks[inst.id] = inst
                continue
            # One VM per name: the one we know, else the oldest; any other one is a leak.
            known = node.vm_id
            insts.sort(key=lambda i: (i.id != known, i.launched_at, i.id))
            keep, extra = insts[0], insts[1:]
            for inst in extra:
                inf.leaks[inst.id] = inst
            self._adopt(inf, node, keep)
        for node in inf.nodes.values():
            if regions is not None and (node.placement is None
                                        or node.placement.region not in regions):
                continue
            if node.group == g.name and node.vm_id and node.name not in by_name:
                # The VM is gone (or its create never happened).
                node.vm_id, node.vm_state = "", None
                if node.phase not in ("deleting", "deleted", "failed"):
                    node.phase = "planned"
        inf.changed.set()

    def _adopt(self, inf: _Infra, node: _Node, inst: Instance) -> None:
        node.vm_id = inst.id
        node.vm_state = inst.state
        node.placement = inst.placement
        node.private_ip, node.public_ip = inst.private_ip, inst.public_ip
        rec = self._by_node.get((inf.name, node.name))
        if rec is not None:
            node.node_id = rec.id
            node.online = rec.status == "online" and not rec.revoked
        if node.phase in ("deleting", "deleted"):
            return
        if inst.state is InstanceState.STOPPED:
            node.phase = "stopped"
        elif inst.state is InstanceState.STOPPING:
            node.phase = "stopping"
        elif node.phase in ("planned", "creating", "failed"):
            node.phase = "running" if inst.state is InstanceState.RUNNING else "booting"
            node.error = node.reason = ""
        self._check_ready(inf, node)

    def _on_node(self, node_id: str, rec: NodeRecord | None) -> None:
        if rec is None:
            for key, old in list(self._by_node.items()):
                if old.id == node_id:
                    del self._by_node[key]
                    self._node_changed(key, None)
            return
        if not rec.infra or not rec.infra_node:
            return
        key = (rec.infra, rec.infra_node)
        self._by_node[key] = rec
        self._node_changed(key, rec)

    def _node_changed(self, key: tuple[str, str], rec: NodeRecord | None) -> None:
        inf = self._infras.get(key[0])
        if inf is None:
            return
        node = inf.nodes.get(key[1])
        if node is None:
            return
        node.node_id = rec.id if rec is not None else ""
        node.online = rec is not None and rec.status == "online" and not rec.revoked
        self._check_ready(inf, node)
        inf.changed.set()

    def _check_ready(self, inf: _Infra, node: _Node) -> None:
        if node.phase in ("deleting", "deleted", "stopping", "stopped", "failed"):
            return
        if node.online and node.vm_state is InstanceState.RUNNING:
            if node.phase != "ready":
                node.phase = "ready"
                node.error = ""
                self._emit(inf, group=node.group, node=node.name, phase="ready")
                if node.linked_vm != node.vm_id and node.node_id:
                    node.linked_vm = node.vm_id
                    self._spawn(self._link(node.node_id, node.vm_id))
        elif node.phase == "ready":
            node.phase = "running" if node.vm_state is InstanceState.RUNNING else "booting"

    async def _link(self, node_id: str, vm_id: str) -> None:
        def apply(cur: NodeRecord) -> NodeRecord | None:
            return None if cur.vm_id == vm_id else msgspec.structs.replace(cur, vm_id=vm_id)

        try:
            await self._nodes.mutate(node_id, apply)
        except (NotFound, Conflict) as exc:
            log.info("node %s: vm id not linked: %s", node_id, exc)
        except Exception as exc:
            log.warning("node %s: vm id not linked: %s", node_id, exc)
