"""Views of the in-memory state (``InfraView``, ``GroupView``, ``NodeView``, the
summary line) and the progress events sent to subscribers."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from controller.provision.contract import InstanceState
from controller.provision.engine.base import EngineBase
from controller.provision.engine.records import _Infra, _Node
from controller.provision.model import (
    GroupSpec,
    GroupView,
    InfraStatus,
    InfraView,
    NodePhase,
    NodeView,
    Progress,
)

log = logging.getLogger("barista.controller.provision")


class Views(EngineBase):
    """Views and progress: what the API shows and what subscribers hear; a node's
    failure is recorded and told here."""

    def _group_view(self, inf: _Infra, g: GroupSpec) -> GroupView:
        nodes = sorted((n for n in inf.nodes.values() if n.group == g.name),
                       key=lambda n: n.index)
        mine = [n for n in nodes if n.index < g.count]
        reasons = Counter(n.reason or n.error for n in mine if n.phase == "failed")
        return GroupView(
            name=g.name, provider=g.provider, desired=g.count,
            ready=sum(1 for n in mine if n.phase == "ready"),
            running=sum(1 for n in mine if n.vm_state is InstanceState.RUNNING
                        and n.phase not in ("deleting", "deleted", "failed")),
            pending=sum(1 for n in mine if n.phase in ("planned", "creating", "booting",
                                                       "rebooting")),
            failed=sum(1 for n in mine if n.phase == "failed"),
            reasons=dict(reasons),
            nodes=[self._node_view(n, g) for n in nodes])

    @staticmethod
    def _node_view(n: _Node, g: GroupSpec) -> NodeView:
        p = n.placement
        return NodeView(name=n.name, group=n.group, phase=n.phase, provider=g.provider,
                        region=p.region if p else "", zone=p.zone if p else "",
                        vm_id=n.vm_id, node_id=n.node_id, private_ip=n.private_ip,
                        public_ip=n.public_ip, error=n.error)

    def _view(self, inf: _Infra) -> InfraView:
        groups = [self._group_view(inf, g) for g in inf.record.spec.groups]
        return InfraView(name=inf.name, status=inf.record.status, spec=inf.record.spec,
                         groups=groups, created_at=inf.record.created_at,
                         updated_at=inf.record.updated_at, summary=_summary(groups),
                         leaks=sorted(inf.leaks))

    def _summary(self, inf: _Infra) -> str:
        return _summary([self._group_view(inf, g) for g in inf.record.spec.groups])

    def _emit_group(self, inf: _Infra, g: GroupSpec) -> None:
        v = self._group_view(inf, g)
        self._emit(inf, group=g.name, phase=inf.record.status,
                   message=_summary([v]), done=v.ready, total=v.desired)

    def _emit(self, inf: _Infra, *, phase: NodePhase | InfraStatus, group: str = "",
              node: str = "", message: str = "", done: int = 0, total: int = 0) -> None:
        ev = Progress(infra=inf.name, group=group, node=node, phase=phase, message=message,
                      done=done, total=total, at=self._wall())
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("progress listener failed")

    def _fail(self, inf: _Infra, nodes: Sequence[_Node], reason: str, error: str = "") -> None:
        for n in nodes:
            n.phase = "failed"
            n.reason = reason
            n.error = error or reason
            self._emit(inf, group=n.group, node=n.name, phase="failed", message=n.error)


def _summary(groups: Sequence[GroupView]) -> str:
    desired = sum(g.desired for g in groups)
    running = sum(g.running for g in groups)
    ready = sum(g.ready for g in groups)
    failed = sum(g.failed for g in groups)
    pending = sum(g.pending for g in groups)
    parts = [f"Running {running}/{desired}"]
    if ready != running:
        parts.append(f"Ready {ready}")
    if pending:
        parts.append(f"Pending {pending}")
    if failed:
        reasons: Counter[str] = Counter()
        for g in groups:
            reasons.update(g.reasons)
        why = ", ".join(k if v == failed and len(reasons) == 1 else f"{v} {k}"
                        for k, v in reasons.most_common())
        parts.append(f"Failed {failed} ({why})")
    return ", ".join(parts)
