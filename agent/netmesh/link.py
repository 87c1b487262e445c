"""The NATS side of the node's overlay: its own snapshot and rotate subjects, each network's
delta subject (one subscription per network: nats-py runs a subscription's callbacks one
after another, so deltas are applied in the order they arrive), and what the node sends
(MeshJoin on start and reconnect, resync requests, rotation steps, health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.facts import guess_private_address as guess_private_address  # re-export
from agent.netmesh.mesh import NetMesh
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    MeshEndpoint,
    MeshHealth,
    MeshJoin,
    MeshKeyRotation,
    MeshResyncRequest,
    MeshRotateKey,
    Message,
)
from protocol.subjects import Subjects


def endpoints_of(*, private: str, public: str, network_id: str, region: str,
                 port: int) -> list[MeshEndpoint]:
    out: list[MeshEndpoint] = []
    if private:
        out.append(MeshEndpoint(host=private, port=port, kind="private", network=network_id,
                                region=region))
    if public:
        out.append(MeshEndpoint(host=public, port=port, kind="public", region=region))
    return out


class MeshLink:
    """Connects a NetMesh to NATS for one node."""

    def __init__(self, *, nc: Callable[[], NATS | None], subjects: Subjects, node_id: str,
                 mesh: NetMesh, endpoints: list[MeshEndpoint], region: str = "",
                 on_left: Callable[[], None] | None = None,
                 log: logging.Logger | None = None) -> None:
        self._nc = nc
        self.subjects = subjects
        self.node_id = node_id
        self.mesh = mesh
        self.endpoints = endpoints
        self.region = region
        # Called when a delta took the node out of its last network (the runtime then
        # stops the overlay: this link, the NetMesh and their tasks).
        self.on_left = on_left
        self.log = log or logging.getLogger(f"barista.agent.{node_id}.mesh")
        self._subs: list[Subscription] = []
        self._deltas: dict[str, Subscription] = {}
        self.rejected = 0  # rotate requests that were not one
        self._rotations: set[asyncio.Future[Any]] = set()
        mesh.publish = self.publish

    async def publish(self, msg: Message) -> None:
        nc = self._nc()
        if nc is None or not nc.is_connected:
            raise ConnectionError("not connected to NATS")
        if isinstance(msg, MeshKeyRotation):
            subject = self.subjects.mesh_key(self.node_id)
        elif isinstance(msg, MeshResyncRequest):
            subject = self.subjects.mesh_resync(self.node_id)
        elif isinstance(msg, MeshHealth):
            subject = self.subjects.mesh_health(self.node_id)
        elif isinstance(msg, MeshJoin):
            subject = self.subjects.mesh_join(self.node_id)
        else:
            raise TypeError(f"no mesh subject for {type(msg).__name__}")
        await nc.publish(subject, codec.encode(msg))

    async def start(self) -> None:
        nc = self._nc()
        assert nc is not None
        self._subs = [
            await nc.subscribe(self.subjects.mesh_snapshot(self.node_id), cb=self._on_snapshot),
            await nc.subscribe(self.subjects.mesh_rotate(self.node_id), cb=self._on_rotate),
        ]
        await self._sync_subscriptions()
        await self.announce("start")

    async def announce(self, reason: str) -> None:
        """MeshJoin (the controller answers with snapshots), and a resync of the networks
        already known (deltas may have been missed while away)."""
        join = MeshJoin(node_id=self.node_id, public_key=self.mesh.public_key,
                        endpoints=self.endpoints, region=self.region,
                        next_public_key=self.mesh.keys.next_public, accepts=[codec.ZLIB])
        try:
            await self.publish(join)
        except Exception as exc:
            self.log.warning("mesh join not sent: %s", exc)
        self.mesh.resync_all(reason)

    async def stop(self) -> None:
        for sub in [*self._subs, *self._deltas.values()]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        self._deltas.clear()

    async def _sync_subscriptions(self) -> None:
        nc = self._nc()
        if nc is None:
            return
        for network in set(self.mesh.views) - set(self._deltas):
            self._deltas[network] = await nc.subscribe(self.subjects.mesh_delta(network),
                                                       cb=self._on_delta)
        for network in set(self._deltas) - set(self.mesh.views):
            with contextlib.suppress(Exception):
                await self._deltas.pop(network).unsubscribe()

    async def _on_snapshot(self, msg: Msg) -> None:
        try:
            await self.mesh.handle_snapshot(msg.data)
            await self._sync_subscriptions()
        except Exception:  # never let one message end the subscription
            self.log.exception("mesh snapshot handling failed")

    async def _on_delta(self, msg: Msg) -> None:
        try:
            was_member = bool(self.mesh.views)
            await self.mesh.handle_delta(msg.data)
            await self._sync_subscriptions()
            if was_member and not self.mesh.views and self.on_left is not None:
                self.on_left()
        except Exception:
            self.log.exception("mesh delta handling failed")

    async def _on_rotate(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, MeshRotateKey)
        except ProtocolError as exc:
            self.rejected += 1
            self.mesh.stats.rejected += 1
            self.log.warning("mesh rotate request rejected: %s", exc)
            return
        if req.ready_key:  # every peer has our next key: switch now
            self.mesh.peers_ready(req.ready_key)
            return
        task = asyncio.ensure_future(self.mesh.rotate_key())
        self._rotations.add(task)  # a reference until done (the loop keeps only weak ones)
        task.add_done_callback(self._rotated)

    def _rotated(self, task: asyncio.Future[Any]) -> None:
        self._rotations.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("mesh key rotation failed: %s", task.exception())
