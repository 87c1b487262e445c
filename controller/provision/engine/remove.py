"""Removing VMs: journaled terminate/stop/start/reboot calls, a delete done only after
``confirmations`` answers in a row that the VM is gone, rollback, scale-in, the delete
of a whole infra, and ``gc`` of VMs with our tag that the state does not know."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import msgspec

from controller.errors import NotFound
from controller.models import NodeRecord
from controller.provision.contract import (
    TAG_GROUP,
    TAG_INFRA,
    TAG_MANAGED,
    Instance,
    InstanceState,
    NotFoundError,
    Placement,
    Provider,
    ProvisionError,
)
from controller.provision.engine.observe import Observation
from controller.provision.engine.records import GC_JOURNAL, _Infra, _Node
from controller.provision.journal import OpKind
from controller.provision.model import GroupSpec, NodeView

log = logging.getLogger("barista.controller.provision")


class Removal(Observation):
    """Terminating with confirmation, rollback, retire, delete, and gc."""

    async def _journaled_power(self, prov: Provider, op: OpKind, region: str,
                               ids: Sequence[str], *, infra: str, group: str,
                               names: Sequence[str] = ()) -> None:
        fn = {"terminate": prov.terminate_instances, "stop": prov.stop_instances,
              "start": prov.start_instances, "reboot": prov.reboot_instances}[op]
        if not ids:
            return
        rec = None
        if infra:  # every delete is journaled; gc's under GC_JOURNAL
            rec = await self._journal.intent(infra=infra, group=group, op=op,
                                             placement=Placement(prov.name, region),
                                             names=names, ids=ids)
        try:
            await self._call(prov, region, f"{op}_instances", lambda: fn(region, list(ids)))
        except NotFoundError:
            # One of them is already gone: do the others one by one.
            for vm_id in ids:
                with contextlib.suppress(NotFoundError):
                    await self._call(prov, region, f"{op}_instances",
                                     lambda v=vm_id: fn(region, [v]))  # type: ignore[misc]
        except ProvisionError as exc:
            if rec is not None:
                await self._journal.finish(rec, error=exc.message)
            raise
        if rec is not None:
            await self._journal.finish(rec)

    async def _terminate_confirmed(self, prov: Provider, tags: Mapping[str, str],
                                   insts: Sequence[Instance], *, infra: str, group: str
                                   ) -> None:
        """Terminate ``insts`` and return once the provider said ``confirmations`` times
        in a row that each is gone (re-terminating any that comes back alive)."""
        s = self.settings
        by_region: dict[str, list[Instance]] = {}
        for i in insts:
            by_region.setdefault(i.placement.region, []).append(i)

        async def region_run(region: str, targets: list[Instance]) -> None:
            ids = [i.id for i in targets]
            await self._journaled_power(prov, "terminate", region, ids, infra=infra,
                                        group=group, names=[i.name for i in targets])
            streak = dict.fromkeys(ids, 0)
            start = self._clock()
            while min(streak.values(), default=s.confirmations) < s.confirmations:
                if self._clock() - start > s.delete_timeout:
                    raise TimeoutError(f"{prov.name}/{region}: VMs still present after "
                                       f"{s.delete_timeout:g}s: {sorted(streak)[:5]}")
                await self._sleep(s.confirm_interval)
                seen = {i.id: i for i in await self._call(
                    prov, region, "query_instances",
                    lambda: prov.query_instances(tags, region=region))}
                alive = []
                for vm_id in ids:
                    inst = seen.get(vm_id)
                    if inst is None or inst.state.gone:
                        streak[vm_id] += 1
                    else:
                        streak[vm_id] = 0
                        if inst.state is not InstanceState.TERMINATING:
                            alive.append(vm_id)
                if alive:  # the terminate was lost (or the VM came back): again
                    await self._journaled_power(prov, "terminate", region, alive,
                                                infra=infra, group=group)

        await asyncio.gather(*(region_run(r, t) for r, t in by_region.items()))

    async def _remove(self, inf: _Infra, g: GroupSpec, nodes: Sequence[_Node]) -> None:
        prov = self._providers[g.provider]
        for n in nodes:
            n.phase = "deleting"
            self._emit(inf, group=g.name, node=n.name, phase="deleting")
        insts = [Instance(id=n.vm_id, name=n.name, placement=n.placement, state=InstanceState
                          .UNKNOWN, size="") for n in nodes if n.vm_id and n.placement]
        await self._terminate_confirmed(prov, self._tags(inf.name, g.name), insts,
                                        infra=inf.name, group=g.name)
        await self._forget_nodes(inf, {n.name for n in nodes})
        for n in nodes:
            n.phase = "deleted"
            n.vm_id, n.vm_state = "", None
            n.node_id, n.online = "", False
            self._emit(inf, group=g.name, node=n.name, phase="deleted")

    async def _forget_nodes(self, inf: _Infra, names: Collection[str] | None) -> None:
        """Forget the node records of ``names`` (None: every node of the infra), found by
        their link, not by memory: after a restart a VM already gone left no trace here."""
        slots = asyncio.Semaphore(32)  # each one revokes a NATS user: done side by side

        async def forget(rec: NodeRecord) -> None:
            async with slots:
                try:
                    await self._forget(rec.id)
                except NotFound:
                    pass
                except Exception as exc:
                    log.warning("infra %s: node %s not forgotten: %s", inf.name, rec.id, exc)

        await asyncio.gather(*(forget(rec) for (infra, name), rec in list(self._by_node.items())
                               if infra == inf.name and (names is None or name in names)))

    async def _rollback(self, inf: _Infra, g: GroupSpec, failed: list[_Node]) -> None:
        reasons = Counter(n.reason for n in failed)
        why = ", ".join(f"{k} x{v}" for k, v in reasons.items())
        msg = f"rolled back: {len(failed)} of {g.count} failed ({why})"
        self._emit(inf, group=g.name, phase="deleting", message=msg)
        victims = [n for n in self._group_nodes(inf, g) if n.vm_id]
        await self._remove(inf, g, victims)
        for n in self._group_nodes(inf, g):
            n.phase = "failed"
            n.reason = n.reason or "rolled back"
            n.error = msg
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, halted={**r.halted, g.name: msg}))
        self._emit(inf, group=g.name, phase="failed", message=msg)

    async def _retire(self, inf: _Infra, g: GroupSpec, names: list[str]) -> None:
        nodes = [inf.nodes[n] for n in names if n in inf.nodes]
        # Highest index first: what is left is always 0..count-1.
        nodes.sort(key=lambda n: -n.index)
        await self._remove(inf, g, nodes)
        for n in nodes:
            inf.nodes.pop(n.name, None)
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, retire={k: v for k, v in r.retire.items() if k != g.name}))

    async def _delete_run(self, inf: _Infra) -> None:
        spec = inf.record.spec
        try:
            await asyncio.gather(*(self._delete_group(inf, g) for g in spec.groups))
        except (ProvisionError, TimeoutError) as exc:
            msg = exc.message if isinstance(exc, ProvisionError) else str(exc)
            self._emit(inf, phase="deleting", message=f"delete not finished: {msg}; "
                       "delete again to retry")
            log.error("infra %s: delete not finished: %s", inf.name, msg)
            return
        # Networks, firewalls... once no VM of the infra is left.
        for prov_name, region in sorted({(g.provider, r) for g in spec.groups
                                         for r in self._regions(g)}):
            prov = self._providers[prov_name]
            with contextlib.suppress(NotFoundError):
                await self._call(prov, region, "cleanup",
                                 lambda p=prov, r=region: p.cleanup(  # type: ignore[misc]
                                     self._tags(inf.name), region=r))
        await self._forget_nodes(inf, None)
        await self._journal.prune(inf.name, keep_open=False)
        with contextlib.suppress(NotFound):
            await self._table.delete(inf.name)
        inf.record = msgspec.structs.replace(inf.record, status="deleted",
                                             updated_at=self._wall())
        inf.deleted_at = self._clock()
        inf.leaks.clear()
        self._emit(inf, phase="deleted", message="every VM confirmed gone")

    async def _delete_group(self, inf: _Infra, g: GroupSpec) -> None:
        found = await self._observe(inf, g)
        alive = [i for i in found if not i.state.gone]
        for n in self._group_nodes(inf, g):
            if n.vm_id:
                n.phase = "deleting"
        self._emit(inf, group=g.name, phase="deleting", message=f"{len(alive)} VM(s)")
        await self._terminate_confirmed(self._providers[g.provider],
                                        self._tags(inf.name, g.name), alive,
                                        infra=inf.name, group=g.name)
        names = [n.name for n in inf.nodes.values() if n.group == g.name]
        names += [name for (infra, name), rec in self._by_node.items()
                  if infra == inf.name and rec.group == g.name]
        await self._forget_nodes(inf, set(names))
        for n in list(inf.nodes.values()):
            if n.group != g.name:
                continue
            n.phase, n.vm_id, n.vm_state, n.node_id, n.online = "deleted", "", None, "", False
        for vm_id in [k for k, v in inf.leaks.items() if v.tags.get(TAG_GROUP) == g.name]:
            del inf.leaks[vm_id]
        self._emit_group(inf, g)

    async def gc(self, *, confirm: bool, vm_ids: Collection[str] | None = None
                 ) -> list[NodeView]:
        found: list[tuple[Provider, Instance]] = []
        for prov in self._providers.values():
            if prov.name in self._refused:
                continue
            instances = await self._call(prov, "", "query_instances",
                                         lambda p=prov: p.query_instances(  # type: ignore[misc]
                                             {TAG_MANAGED: self._installation}))
            for inst in instances:
                if inst.state.gone or inst.state is InstanceState.TERMINATING:
                    continue
                if not self._known(inst):
                    found.append((prov, inst))
        views = [NodeView(name=i.name, group=i.tags.get(TAG_GROUP, ""), phase="running"
                          if i.state is InstanceState.RUNNING else "booting",
                          provider=p.name, region=i.placement.region, zone=i.placement.zone,
                          vm_id=i.id, error=f"infra {i.tags.get(TAG_INFRA, '?')}: unknown "
                          "to the state") for p, i in found]
        if not confirm:
            return views
        chosen = [(p, i) for p, i in found if vm_ids is None or i.id in vm_ids]
        by_prov: dict[str, list[Instance]] = {}
        for p, i in chosen:
            by_prov.setdefault(p.name, []).append(i)
        await asyncio.gather(*(self._terminate_confirmed(
            self._providers[p], {TAG_MANAGED: self._installation}, insts, infra=GC_JOURNAL,
            group="")
            for p, insts in by_prov.items()))
        await self._journal.prune(GC_JOURNAL, keep_open=False)
        for _, i in chosen:
            inf = self._infras.get(i.tags.get(TAG_INFRA, ""))
            if inf is not None:
                inf.leaks.pop(i.id, None)
        chosen_ids = {i.id for _, i in chosen}
        return [msgspec.structs.replace(v, phase="deleted") if v.vm_id in chosen_ids else v
                for v in views]

    async def _finish_gc(self) -> None:
        """A gc confirmed by the operator and cut short by a restart: finish its deletes."""
        for op in self._journal.open(GC_JOURNAL):
            prov = self._providers.get(op.provider)
            if prov is None:
                continue
            insts = [Instance(id=i, name=n, placement=op.placement, state=InstanceState.UNKNOWN,
                              size="") for i, n in zip(op.ids, op.names, strict=False)]
            try:
                await self._terminate_confirmed(prov, {TAG_MANAGED: self._installation},
                                                insts, infra=GC_JOURNAL, group="")
            except (ProvisionError, TimeoutError) as exc:
                log.warning("gc: resuming the delete of %s failed: %s", op.ids, exc)
                return
        await self._journal.prune(GC_JOURNAL, keep_open=False)

    def _known(self, inst: Instance) -> bool:
        inf = self._infras.get(inst.tags.get(TAG_INFRA, ""))
        if inf is None or inf.record.status == "deleted":
            return False
        if inf.record.status == "deleting":
            return True  # being removed right now
        node = inf.nodes.get(inst.name)
        if node is not None and node.vm_id == inst.id:
            return True
        if any(inst.name in op.names or inst.id in op.ids
               for op in self._journal.open(inf.name)):
            return True  # a create in flight: its answer has not arrived yet
        return False
