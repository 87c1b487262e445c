"""The agent's trusted command-signing keys, as signing-key rotations change them.

A rotation step (protocol KeyRotation) is applied only when a key the agent already trusts
signed it, once, in order of its number; the resulting key set is kept in the state dir
(0600), so a restarted agent trusts what it trusted before. A step missed while offline is
fetched from the controller (key sync) at start and after every reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.files import write_private
from protocol import codec
from protocol.errors import CommandRejected, ProtocolError
from protocol.messages import (
    ErrorReply,
    KeyRotation,
    KeySyncReply,
    KeySyncRequest,
    SignedKeyRotation,
)
from protocol.signing import CommandVerifier, load_public_key

# Sends an encoded KeySyncRequest, returns the encoded reply.
Request = Callable[[bytes], Awaitable[bytes]]


class KeyRing:
    """The verifier's key set and the last rotation step applied, persisted in ``path``."""

    def __init__(
        self, *, verifier: CommandVerifier, path: Path, log: logging.Logger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._path = path
        self._clock = clock
        self.log = log
        self.seq = 0
        self.applied = 0
        # Rotation steps refused: not signed by a trusted key, or malformed.
        self.refused = 0
        self._lock = asyncio.Lock()

    def load(self) -> bool:
        """Take the persisted key set (it descends, by signed steps, from the configured or
        enrolled keys, and so replaces them). False when there is none or it is unusable."""
        try:
            data = json.loads(self._path.read_text())
            keys = {str(k): float(v) for k, v in dict(data["keys"]).items()}
            seq = int(data["seq"])
            self._verifier.set_keys(keys)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("trusted keys file %s unusable (%s); using the configured keys",
                             self._path, exc)
            return False
        self.seq = seq
        return True

    def _save(self) -> None:
        data = {"seq": self.seq, "keys": self._verifier.trusted_keys()}
        write_private(self._path, json.dumps(data, indent=1).encode())

    async def handle(self, signed: SignedKeyRotation, *, via: str) -> bool:
        """Apply one step; True when the key set changed. Never raises."""
        async with self._lock:
            return await self._apply(signed, via=via)

    async def _apply(self, signed: SignedKeyRotation, *, via: str) -> bool:
        try:
            rot = self._verifier.verify_rotation(signed)
        except (CommandRejected, ProtocolError) as exc:
            if self._adds_nothing(signed):
                # A step before this agent's time (it was given the resulting keys at
                # enrollment): signed by a key it never knew, and changes nothing here.
                return False
            self.refused += 1
            self.log.warning("key rotation refused (%s): %s", via, exc.reason)
            return False
        if rot.seq <= self.seq:
            return False  # applied already (a broadcast and a sync can both bring it)
        keys = self._verifier.trusted_keys()
        try:
            load_public_key(rot.new_key)
        except ValueError as exc:
            self.refused += 1
            self.log.warning("key rotation %d refused: new key %s", rot.seq, exc)
            return False
        if rot.finish:
            keys.pop(rot.old_key, None)
            keys.setdefault(rot.new_key, 0.0)
        else:
            keys[rot.new_key] = 0.0
            if rot.old_key in keys and rot.old_key != rot.new_key:
                keys[rot.old_key] = rot.old_key_expires
        self._verifier.set_keys(keys)
        self.seq = rot.seq
        self.applied += 1
        try:
            await asyncio.to_thread(self._save)
        except OSError as exc:
            self.log.warning("trusted keys not saved (%s): a restart forgets rotation %d",
                             exc, rot.seq)
        self.log.info("key rotation %d applied (%s): trusting %d key(s)%s", rot.seq, via,
                      len(keys), ", old key dropped" if rot.finish else "")
        return True

    def _adds_nothing(self, signed: SignedKeyRotation) -> bool:
        """Whether an unverified step would change nothing if applied: one this agent is
        past already, or one whose new key it trusts (it never removes a key unverified)."""
        try:
            rot = codec.decode(signed.payload, KeyRotation)
        except ProtocolError:
            return False
        return rot.seq <= self.seq or rot.new_key in self._verifier.trusted_keys()

    async def sync(self, request: Request, *, node_id: str) -> int:
        """Fetch and apply the steps after the last one applied; how many were applied.
        Errors are logged (the next reconnect or start tries again), never raised."""
        try:
            raw = await request(codec.encode(KeySyncRequest(node_id=node_id, after=self.seq)))
            reply = codec.decode(raw)
        except Exception as exc:
            self.log.warning("key sync failed: %s", getattr(exc, "reason", exc) or
                             type(exc).__name__)
            return 0
        if isinstance(reply, ErrorReply):
            self.log.warning("key sync refused by the controller: %s", reply.message)
            return 0
        if not isinstance(reply, KeySyncReply):
            self.log.warning("key sync: unexpected %s reply", type(reply).__name__)
            return 0
        applied = 0
        async with self._lock:
            for signed in sorted(reply.rotations, key=_seq_of):
                applied += await self._apply(signed, via="sync")
        return applied


def _seq_of(signed: SignedKeyRotation) -> int:
    try:
        return codec.decode(signed.payload, KeyRotation).seq
    except ProtocolError:
        return 0
