"""The agent's key ring: rotation steps apply once, in order, only when a trusted key
signed them; expiry of a retiring key; a rotation's signature never passes for a command's."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.keyring import KeyRing
from protocol import codec
from protocol.errors import BadSignature, CommandRejected
from protocol.messages import (
    Command,
    KeyRotation,
    KeySyncReply,
    SignedCommand,
    SignedKeyRotation,
)
from protocol.signing import CommandSigner, CommandVerifier

LOG = logging.getLogger("test.keyring")


def ring(
    tmp_path: Path, *keys: str, clock: Callable[[], float] = time.time
) -> tuple[KeyRing, CommandVerifier]:
    v = CommandVerifier(keys, clock=clock)
    return KeyRing(verifier=v, path=tmp_path / "keys.json", log=LOG, clock=clock), v


def step(signer: CommandSigner, seq: int, new: CommandSigner, old: CommandSigner, *,
         finish: bool = False, expires: float = 0.0) -> SignedKeyRotation:
    return signer.sign_rotation(KeyRotation(
        seq=seq, issued_at=time.time(), new_key=new.public_key_b64,
        old_key=old.public_key_b64, old_key_expires=expires, finish=finish))


async def test_chain_applies_in_order_and_persists(tmp_path: Path) -> None:
    a, b, c = (CommandSigner.generate() for _ in range(3))
    kr, v = ring(tmp_path, a.public_key_b64)
    steps = [step(a, 1, b, a), step(b, 2, b, a, finish=True), step(b, 3, c, b),
             step(c, 4, c, b, finish=True)]
    reply = KeySyncReply(rotations=list(reversed(steps)))  # order on the wire is not trusted

    async def request(_: bytes) -> bytes:
        return codec.encode(reply)

    assert await kr.sync(request, node_id="n1") == 4
    assert list(v.trusted_keys()) == [c.public_key_b64] and kr.seq == 4
    # Applied once: replays change nothing.
    assert not await kr.handle(steps[0], via="test") and kr.refused == 0
    saved = json.loads((tmp_path / "keys.json").read_text())
    assert saved == {"seq": 4, "keys": {c.public_key_b64: 0.0}}
    kr2, v2 = ring(tmp_path, a.public_key_b64)
    assert kr2.load() and kr2.seq == 4 and list(v2.trusted_keys()) == [c.public_key_b64]


async def test_unknown_signer_refused_and_counted(tmp_path: Path) -> None:
    a, x = CommandSigner.generate(), CommandSigner.generate()
    kr, v = ring(tmp_path, a.public_key_b64)
    assert not await kr.handle(step(x, 1, x, a), via="test")
    assert kr.refused == 1 and list(v.trusted_keys()) == [a.public_key_b64]
    # ... also a "finish" that would drop the real key
    assert not await kr.handle(step(x, 1, a, a, finish=True), via="test")
    assert list(v.trusted_keys()) == [a.public_key_b64]


async def test_retiring_key_expires_by_itself(tmp_path: Path) -> None:
    a, b = CommandSigner.generate(), CommandSigner.generate()
    now = [1000.0]
    kr, v = ring(tmp_path, a.public_key_b64, clock=lambda: now[0])
    assert await kr.handle(step(a, 1, b, a, expires=1100.0), via="test")
    assert set(v.trusted_keys()) == {a.public_key_b64, b.public_key_b64}
    now[0] = 1101.0
    assert list(v.trusted_keys()) == [b.public_key_b64]
    ping = Command(id="p", job_id="j", issued_at=1050.0, ttl=60.0, action="ping")
    with pytest.raises(BadSignature):
        v.verify(a.sign(ping))
    assert v.verify(b.sign(ping)).id == "p"


def test_rotation_signature_never_passes_for_a_command() -> None:
    a = CommandSigner.generate()
    v = CommandVerifier([a.public_key_b64])
    signed = step(a, 1, a, a)
    as_cmd = SignedCommand(payload=signed.payload, signature=signed.signature,
                           key_id=signed.key_id)
    with pytest.raises(CommandRejected, match="not a command"):
        v.verify(as_cmd)
    cmd_signed = a.sign(Command(id="c", job_id="j", issued_at=time.time(), ttl=5.0,
                                action="ping"))
    with pytest.raises(CommandRejected, match="not a key rotation"):
        v.verify_rotation(SignedKeyRotation(payload=cmd_signed.payload,
                                            signature=cmd_signed.signature))
