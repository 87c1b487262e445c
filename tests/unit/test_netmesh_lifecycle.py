"""NetMesh without a network yet (no WireGuard call is made): its tick loop stops when
closed, also when woken in the same moment, and the rotating node's switch waits for the
controller's word that every peer has its next key (or for its own timeout)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.netmesh.backend import WireguardGoBackend
from agent.netmesh.mesh import NetMesh
from protocol import codec
from protocol.messages import MeshKeyRotation, MeshPeer, MeshRotateKey, MeshSnapshot, Message
from tests.fixtures.wait import wait_for


def _mesh(tmp: Path, sent: list[Message], **kw: float) -> NetMesh:
    async def publish(msg: Message) -> None:
        sent.append(msg)

    return NetMesh(node_id="n-1", state_dir=tmp, backend=WireguardGoBackend(), probes=False,
                   publish=publish, **kw)  # type: ignore[arg-type]


async def test_close_ends_a_tick_loop_woken_in_the_same_moment(tmp_path: Path) -> None:
    # Python 3.11's asyncio.wait_for swallowed a cancel that came with the wake-up
    # (gh-86296): close() then waited for ever (the e2e teardown past 120 s).
    for i in range(10):
        mesh = _mesh(tmp_path / str(i), [])
        await mesh.__aenter__()
        await asyncio.sleep(0.01)
        mesh._wake.set()  # what a delta during a rotation does, just before close
        await asyncio.wait_for(mesh.close(), 5)
        assert not mesh._tasks


async def test_switch_waits_for_the_word_that_every_peer_has_the_key(tmp_path: Path) -> None:
    sent: list[Message] = []
    mesh = _mesh(tmp_path, sent, switch_timeout=30.0)
    async with mesh:
        old = mesh.public_key
        assert await mesh.handle_rotate(codec.encode(MeshRotateKey(reason="test"))) == "rotated"
        nxt = mesh.keys.next_public
        assert nxt and isinstance(sent[-1], MeshKeyRotation) and sent[-1].phase == "announce"
        # A word for another key changes nothing; garbage is counted.
        assert await mesh.handle_rotate(MeshRotateKey(ready_key=old)) == "ignored"
        assert await mesh.handle_rotate(b"\x00junk") == "rejected"
        assert mesh.stats.rejected == 1
        await asyncio.sleep(0.3)
        assert mesh.public_key == old and mesh.keys.next_public == nxt  # still waiting
        assert await mesh.handle_rotate(MeshRotateKey(ready_key=nxt)) == "ready"
        await wait_for(lambda: mesh.public_key == nxt, 2, "switched on the word")
        assert mesh.keys.old is not None and mesh.keys.old.public_b64 == old
        switched = [m for m in sent if isinstance(m, MeshKeyRotation) and m.phase == "switched"]
        assert [(m.public_key, m.next_public_key) for m in switched] == [(old, nxt)]


async def test_switch_without_the_word_after_the_timeout(tmp_path: Path) -> None:
    sent: list[Message] = []
    mesh = _mesh(tmp_path, sent, switch_timeout=0.5)
    async with mesh:
        old, nxt = mesh.public_key, await mesh.rotate_key()
        # Our own entry with the next key (the controller published the announcement),
        # from a controller that never says "ready": we switch switch_timeout later.
        own = MeshPeer(node_id="n-1", public_key=old, next_public_key=nxt,
                       address="198.19.0.1")
        mesh.views["ov"] = mesh._view_of(MeshSnapshot(network="ov", generation=1, own=own,
                                                      cidr="198.19.0.0/16"))
        await mesh._own_changed(mesh.views.pop("ov"))
        await asyncio.sleep(0.2)
        assert mesh.public_key == old
        await wait_for(lambda: mesh.public_key == nxt, 3, "switched after the timeout")
