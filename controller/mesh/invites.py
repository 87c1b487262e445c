"""Invitations: a node runs no overlay until it is in a network. The distributor finds
the members that have not joined (no MeshJoin, so no ``mesh_nodes`` entry) and this sends
each a MeshInvite on its own snapshot subject (only the controller and the node itself may
publish there); the agent then makes its WireGuard key and sends MeshJoin.

A node is invited at once when it becomes an unjoined member or comes back online (its
``status_changed_at`` moved), and again with a doubling interval while it stays unjoined
(an invitation sent while it was away is gone: core NATS). Nodes that are not online are
not sent anything: they are invited when they are back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from protocol import codec
from protocol.messages import MeshInvite
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.mesh")

FIRST_RETRY = 5.0
MAX_RETRY = 300.0
REACHABLE = ("online", "stale")


@dataclass(frozen=True, slots=True)
class Unjoined:
    """A member of a network without a mesh_nodes entry, as the distributor saw it."""

    status: str
    status_changed_at: float


@dataclass(slots=True)
class _Sent:
    marker: float  # the status_changed_at it was last invited under
    next_at: float
    interval: float


class Invites:
    def __init__(self, *, nc: NATS, subjects: Subjects, first_retry: float = FIRST_RETRY,
                 max_retry: float = MAX_RETRY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nc = nc
        self._subjects = subjects
        self.first_retry = first_retry
        self.max_retry = max_retry
        self._clock = clock
        # network -> node id -> the member as last seen unjoined
        self.unjoined: dict[str, dict[str, Unjoined]] = {}
        self._sent: dict[str, _Sent] = {}
        self.stats = {"invites": 0, "invite_errors": 0}

    def update(self, network: str, members: dict[str, Unjoined]) -> None:
        """The unjoined members of ``network`` now (all of them; {} when none or gone)."""
        if members:
            self.unjoined[network] = members
        else:
            self.unjoined.pop(network, None)

    async def send_due(self) -> int:
        """Invite every unjoined reachable member that is due; how many were sent."""
        wanted: dict[str, tuple[list[str], Unjoined]] = {}
        for network, members in sorted(self.unjoined.items()):
            for node_id, m in members.items():
                nets, _ = wanted.setdefault(node_id, ([], m))
                nets.append(network)
        for node_id in set(self._sent) - set(wanted):
            del self._sent[node_id]
        now = self._clock()
        sent = 0
        for node_id, (nets, m) in sorted(wanted.items()):
            if m.status not in REACHABLE:
                continue
            prev = self._sent.get(node_id)
            if prev is not None and prev.marker == m.status_changed_at:
                if now < prev.next_at:
                    continue
                interval = min(prev.interval * 2, self.max_retry)
            else:
                interval = self.first_retry
            self._sent[node_id] = _Sent(marker=m.status_changed_at, next_at=now + interval,
                                        interval=interval)
            try:
                await self._nc.publish(self._subjects.mesh_snapshot(node_id),
                                       codec.encode(MeshInvite(networks=nets)))
            except Exception as exc:  # a disconnect: due again at the next round
                self.stats["invite_errors"] += 1
                del self._sent[node_id]
                log.debug("mesh invitation to %s not sent: %s", node_id, exc)
                continue
            sent += 1
        self.stats["invites"] += sent
        return sent
