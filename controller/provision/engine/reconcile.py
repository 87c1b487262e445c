"""A reconcile pass: networks started ahead, then each group observed, its scale-in
retired, its gap launched and watched until Ready, rolled back or halted by its errors."""

from __future__ import annotations

import asyncio
import logging

import msgspec

from controller.provision.contract import CredentialsError, ProvisionError
from controller.provision.engine.launch import Launching
from controller.provision.engine.records import _Halt, _Infra, reason_of
from controller.provision.engine.remove import Removal
from controller.provision.model import GroupSpec

log = logging.getLogger("barista.controller.provision")


class Reconciler(Launching, Removal):
    """One reconcile pass over an infra's groups."""

    async def _reconcile(self, inf: _Infra) -> None:
        if inf.record.status != "creating":
            inf.record = await self._set_status(inf, "creating")
        # Every network the pass will likely need, started now and side by side (they
        # are idempotent): each cloud's and region's setup overlaps the others' and the
        # groups' queries, instead of starting at each group's first launch.
        for g in inf.record.spec.groups:
            if g.count and g.provider not in self._refused and not inf.record.halted.get(
                    g.name):
                for region in self._network_regions(inf, g):
                    if (g.provider, region) in inf.networks:
                        continue  # made by an earlier pass
                    self._network_task(inf, self._providers[g.provider], g, region,
                                       ahead=True)
        try:
            await asyncio.gather(*(self._reconcile_group(inf, g)
                                   for g in inf.record.spec.groups))
        finally:
            self._drop_network_tasks(inf)
        # Every call of this pass was answered, and what older open intents (a killed
        # engine's) may have made was observed and adopted at its start: none is needed.
        await self._journal.prune(inf.name, keep_open=False)
        status = self._outcome(inf)
        inf.record = await self._set_status(inf, status)
        self._emit(inf, phase=status, message=self._summary(inf))

    async def _reconcile_group(self, inf: _Infra, g: GroupSpec) -> None:
        try:
            halted = inf.record.halted.get(g.name)
            if halted:
                self._fail(inf, [n for n in self._group_nodes(inf, g) if not n.vm_id], halted)
                return
            if g.provider in self._refused:
                raise _Halt(f"credentials refused by provider {g.provider}: "
                            f"{self._refused[g.provider]}")
            await self._observe(inf, g)  # while the networks started ahead are made
            retire = inf.record.retire.get(g.name, [])
            if retire:
                await self._retire(inf, g, retire)
            want = [n for n in self._group_nodes(inf, g)]
            missing = [n for n in want if not n.vm_id]
            if missing:
                # Nodes are watched for Ready while their creates are in flight: a cloud
                # whose create answers only when the VM booted (ARM) has each node Ready
                # when it is, not when its whole batch is answered.
                launch = asyncio.ensure_future(self._launch(inf, g, missing))
                try:
                    await self._await_ready(inf, g, launch)
                finally:
                    if not launch.done():
                        launch.cancel()
                    await asyncio.wait([launch])
                launch.result()
            await self._await_ready(inf, g)
            failed = [n for n in self._group_nodes(inf, g) if n.phase == "failed"]
            if failed and g.on_partial_failure == "rollback":
                await self._rollback(inf, g, failed)
            else:
                self._emit_group(inf, g)
        except CredentialsError as exc:
            await self._halt_group(inf, g, f"credentials refused by provider {g.provider}: "
                                           f"{exc.message}")
        except _Halt as exc:
            await self._halt_group(inf, g, exc.reason)
        except (ProvisionError, TimeoutError) as exc:
            # Retries exhausted, a delete not confirmed...: this pass of the group is over;
            # the next create or action tries again.
            reason = reason_of(exc) if isinstance(exc, ProvisionError) else str(exc)
            log.warning("infra %s group %s: %s", inf.name, g.name, reason)
            self._fail(inf, [n for n in self._group_nodes(inf, g) if n.phase != "ready"
                             and not n.vm_id], reason)
            self._emit(inf, group=g.name, phase="failed", message=reason)

    async def _halt_group(self, inf: _Infra, g: GroupSpec, reason: str) -> None:
        self._fail(inf, [n for n in self._group_nodes(inf, g) if n.phase != "ready"], reason)
        inf.record = await self._mutate(inf, lambda r: msgspec.structs.replace(
            r, halted={**r.halted, g.name: reason}))
        self._emit(inf, group=g.name, phase="failed", message=reason)
