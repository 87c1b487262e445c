"""Suspend, resume and reboot: the journaled power calls per group, then the wait for
the state asked (stopped, or Ready again)."""

from __future__ import annotations

import asyncio

from controller.provision.contract import InstanceState, ProvisionError
from controller.provision.engine.launch import Launching
from controller.provision.engine.records import _Infra, _Node, reason_of
from controller.provision.engine.remove import Removal
from controller.provision.journal import OpKind
from controller.provision.model import GroupSpec, InfraStatus, NodePhase


class Power(Launching, Removal):
    """Stop, start and reboot of an infra's groups."""

    async def _power_run(self, inf: _Infra, op: OpKind, group: str) -> None:
        groups = [g for g in inf.record.spec.groups if not group or g.name == group]
        await asyncio.gather(*(self._power_group(inf, g, op) for g in groups),
                             return_exceptions=False)
        if op == "stop":
            status: InfraStatus = "suspended"
        else:
            status = self._outcome(inf)
        inf.record = await self._set_status(inf, status)
        self._emit(inf, phase=status, message=self._summary(inf))

    async def _power_group(self, inf: _Infra, g: GroupSpec, op: OpKind) -> None:
        prov = self._providers[g.provider]
        await self._observe(inf, g)
        nodes = [n for n in self._group_nodes(inf, g) if n.vm_id and n.placement]
        phases: dict[str, NodePhase] = {"stop": "stopping", "start": "booting",
                                        "reboot": "rebooting"}
        phase = phases[op]
        by_region: dict[str, list[_Node]] = {}
        for n in nodes:
            by_region.setdefault(n.placement.region, []).append(n)  # type: ignore[union-attr]
            n.phase = phase
            if op != "stop":
                n.online = False  # it must come online again to be Ready
        self._emit(inf, group=g.name, phase=phase, message=f"{op} {len(nodes)} VM(s)")
        try:
            for region, ns in by_region.items():
                await self._journaled_power(prov, op, region, [n.vm_id for n in ns],
                                            infra=inf.name, group=g.name,
                                            names=[n.name for n in ns])
        except ProvisionError as exc:
            self._fail(inf, nodes, reason_of(exc), exc.message)
            return
        if op == "stop":
            start = self._clock()
            while any(n.vm_state is not InstanceState.STOPPED for n in nodes if n.vm_id):
                if self._clock() - start > self.settings.state_timeout:
                    self._fail(inf, [n for n in nodes if n.vm_state is not InstanceState
                                     .STOPPED], "did not stop")
                    return
                await self._sleep(self.settings.poll_interval)
                await self._observe(inf, g)
            for n in nodes:
                n.phase = "stopped"
            self._emit_group(inf, g)
            return
        for n in nodes:
            n.launched_at = self._clock()
            n.vm_state = InstanceState.PENDING
        await self._await_ready(inf, g)
        self._emit_group(inf, g)
