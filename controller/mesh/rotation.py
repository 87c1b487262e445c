"""Key rotation, the controller's part between ``announce`` and ``switched``: which peers
have put a rotating node's next key into their WireGuard (their ``ready`` steps), so that
the node switches only when every peer accepts the new key's first handshake (a dropped
initiation is retried by WireGuard only after 5 s). In memory: after a controller restart
the node falls back to its own timeout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Pending:
    key: str
    ready: set[str] = field(default_factory=set)
    released: bool = False


@dataclass
class RotationAcks:
    """Node id -> its rotation in progress and the peers that have its next key."""

    _pending: dict[str, _Pending] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {
        "ready": 0, "ready_stale": 0, "released": 0})

    def announced(self, node_id: str, key: str) -> None:
        cur = self._pending.get(node_id)
        if cur is None or cur.key != key:
            self._pending[node_id] = _Pending(key)

    def forget(self, node_id: str) -> None:
        self._pending.pop(node_id, None)

    def ready(self, node_id: str, key: str, peer: str) -> bool:
        """Note that ``peer`` has ``node_id``'s next key ``key``; False: not the rotation
        in progress (a late or repeated step), ignored."""
        cur = self._pending.get(node_id)
        if cur is None or cur.key != key:
            self.stats["ready_stale"] += 1
            return False
        cur.ready.add(peer)
        self.stats["ready"] += 1
        return True

    def release(self, node_id: str, peers: Iterable[str]) -> str:
        """The key to tell ``node_id`` to switch to, once: when every one of ``peers`` (its
        peers in every network it is in) is ready; "" otherwise."""
        cur = self._pending.get(node_id)
        if cur is None or cur.released or not set(peers) <= cur.ready:
            return ""
        cur.released = True
        self.stats["released"] += 1
        return cur.key


__all__ = ["RotationAcks"]
