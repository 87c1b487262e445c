"""Command-signing keys and their rotation: the active key signs, a retiring one stays
trusted by agents during the overlap, and every rotation step is kept for offline agents.

Files (data dir, 0600): ``signing-key.pem`` is always the active key; ``signing-keys/``
holds the private key of a retiring key until the rotation finishes (and a new key for
the instant between announcing it and taking it into use, so a crash loses nothing).
Steps (protocol KeyRotation, each signed by a key the agents trust at that point) are kept
in the KV bucket ``keys`` as ``step-<seq>``, published on the broadcast command subject and
served to each node on its key-sync subject (answered only to its own inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from agent.files import write_private
from controller.errors import BadRequest, Conflict
from controller.state.streams import KEYS_BUCKET
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    Command,
    ErrorReply,
    KeyRotation,
    KeySyncReply,
    KeySyncRequest,
    SignedCommand,
    SignedKeyRotation,
)
from protocol.signing import CommandSigner, key_id
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.keys")

DEFAULT_OVERLAP = 24 * 3600.0
MAX_OVERLAP = 30 * 24 * 3600.0
STEP_PREFIX = "step-"


# Seconds between two sends of the missed steps to one node (send_missed).
MISSED_INTERVAL = 30.0


def step_key(seq: int) -> str:
    return f"{STEP_PREFIX}{seq:010d}"


class SigningKeys:
    """The controller's signer (protocol.signing.Signer) and the rotation of its key."""

    def __init__(
        self,
        *,
        data_dir: Path,
        active: CommandSigner,
        kv: KeyValue,
        nc: NATS,
        subjects: Subjects,
        refuse_reply: Callable[[Msg], None],
        default_overlap: float = DEFAULT_OVERLAP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = data_dir
        self._active = active
        self._kv = kv
        self._nc = nc
        self._subjects = subjects
        self._refuse_reply = refuse_reply
        self._default_overlap = default_overlap
        self._clock = clock
        self._steps: dict[int, SignedKeyRotation] = {}
        self._last: KeyRotation | None = None
        # The keys new nodes are told at enrollment; updated in place (Enrollment holds it).
        self.enroll_keys: list[str] = [active.public_key_b64]
        # The rotation step enroll_keys result from (updated with them, never apart: a new
        # agent starts its key ring at this step).
        self.enroll_seq = 0
        # node id -> when its missed steps were last sent (send_missed)
        self._sent_missed: dict[str, float] = {}
        self.missed_interval = MISSED_INTERVAL
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.stats = {"syncs": 0, "syncs_refused": 0, "rotations": 0, "finished": 0,
                      "missed_sent": 0}

    # -- Signer ------------------------------------------------------------------------

    @property
    def public_key_b64(self) -> str:
        return self._active.public_key_b64

    @property
    def key_id(self) -> str:
        return self._active.key_id

    def sign(self, cmd: Command) -> SignedCommand:
        return self._active.sign(cmd)

    # -- state -------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._last.seq if self._last is not None else 0

    def retiring(self) -> KeyRotation | None:
        """The step that started the rotation in progress, or None."""
        last = self._last
        return last if last is not None and not last.finish else None

    def _pem_path(self, kid: str) -> Path:
        return self._dir / "signing-keys" / f"{kid}.pem"

    async def start(self) -> None:
        """Load the steps; finish a rotation a crash interrupted; run the auto-finish."""
        # Steps are numbered 1, 2, ... without gaps (each is created as last + 1) and never
        # deleted: read as many as the bucket holds, in order, and ask for no missing key
        # (kv.keys() would leave a watch consumer behind).
        held = (await self._kv.status()).values
        for seq in range(1, held + 1):
            try:
                entry = await self._kv.get(step_key(seq))
            except nats.js.errors.KeyNotFoundError:
                log.error("key rotation step %s missing from bucket %s", step_key(seq),
                          KEYS_BUCKET.name)
                break
            try:
                signed = codec.decode(entry.value or b"", SignedKeyRotation)
                rot = codec.decode(signed.payload, KeyRotation)
                if rot.seq != seq:
                    raise ProtocolError(f"step {step_key(seq)} says it is step {rot.seq}")
            except ProtocolError as exc:
                log.error("key rotation step %s unreadable: %s", step_key(seq), exc.reason)
                break
            self._steps[rot.seq] = signed
            self._last = rot
        last = self._last
        if last is not None and last.new_key != self._active.public_key_b64:
            await asyncio.to_thread(self._adopt, last.new_key)
        self._update_enroll_keys()
        self._task = asyncio.create_task(self._auto_finish(), name="key-auto-finish")

    def _adopt(self, public_key: str) -> None:
        """Take ``public_key`` as the active key (the last step names it: a crash came
        between announcing it and swapping the key file)."""
        path = self._pem_path(key_id(public_key))
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            log.error("the last key rotation step names key %s, whose private key is not in "
                      "%s: agents may refuse this controller's commands", key_id(public_key),
                      path.parent)
            return
        signer = CommandSigner.from_pem(pem)
        write_private(self._dir / "signing-key.pem", pem)
        self._active = signer
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.warning("completed an interrupted key rotation: active key %s", signer.key_id)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _update_enroll_keys(self) -> None:
        keys = [self._active.public_key_b64]
        ret = self.retiring()
        if ret is not None and ret.old_key and ret.old_key != keys[0]:
            keys.append(ret.old_key)
        self.enroll_keys[:] = keys
        self.enroll_seq = self.seq

    def view(self) -> dict[str, Any]:
        ret = self.retiring()
        out: dict[str, Any] = {
            "seq": self.seq,
            "active": {"key_id": self.key_id, "public_key": self.public_key_b64},
            "retiring": None,
            "steps": [],
        }
        if ret is not None:
            out["retiring"] = {"key_id": key_id(ret.old_key), "public_key": ret.old_key,
                               "expires": ret.old_key_expires}
        for seq in sorted(self._steps):
            rot = codec.decode(self._steps[seq].payload, KeyRotation)
            out["steps"].append({
                "seq": rot.seq, "issued_at": rot.issued_at, "finish": rot.finish,
                "new_key_id": key_id(rot.new_key),
                "old_key_id": key_id(rot.old_key) if rot.old_key else "",
                "signed_by": self._steps[seq].key_id,
            })
        return out

    # -- rotation ------------------------------------------------------------------------

    async def rotate(self, *, overlap: float | None = None) -> dict[str, Any]:
        """Make a new key, announce it signed by the current one, sign with it from now
        on. The old key stays trusted for ``overlap`` seconds or until ``finish``."""
        overlap = self._default_overlap if overlap is None else overlap
        if not (0 < overlap <= MAX_OVERLAP):
            raise BadRequest(f"overlap must be between 0 and {MAX_OVERLAP:.0f} seconds")
        async with self._lock:
            if self.retiring() is not None:
                raise Conflict("a key rotation is in progress: finish it first "
                               "(barista keys rotate --finish)")
            old, new = self._active, CommandSigner.generate()
            now = self._clock()
            rot = KeyRotation(seq=self.seq + 1, issued_at=now, new_key=new.public_key_b64,
                              old_key=old.public_key_b64, not_before=now,
                              old_key_expires=now + overlap)
            signed = old.sign_rotation(rot)
            # The new key and the old one are on disk before anything names the new one.
            await asyncio.to_thread(self._write_pem, new)
            await asyncio.to_thread(self._write_pem, old)
            await self._record(rot, signed)
            await asyncio.to_thread(write_private, self._dir / "signing-key.pem", new.to_pem())
            self._active = new
            with contextlib.suppress(FileNotFoundError):
                self._pem_path(new.key_id).unlink()
            self._update_enroll_keys()
            self.stats["rotations"] += 1
            log.info("signing key rotated: %s -> %s (old key trusted until %.0f)",
                     old.key_id, new.key_id, rot.old_key_expires)
        await self._publish(signed)
        self._changed.set()
        return self.view()

    async def finish(self) -> dict[str, Any]:
        """Drop the retiring key: agents are told (signed by the new key) and forget it."""
        async with self._lock:
            ret = self.retiring()
            if ret is None:
                raise Conflict("no key rotation in progress")
            rot = KeyRotation(seq=self.seq + 1, issued_at=self._clock(),
                              new_key=self._active.public_key_b64, old_key=ret.old_key,
                              finish=True)
            signed = self._active.sign_rotation(rot)
            await self._record(rot, signed)
            with contextlib.suppress(FileNotFoundError):
                self._pem_path(key_id(ret.old_key)).unlink()
            self._update_enroll_keys()
            self.stats["finished"] += 1
            log.info("key rotation finished: key %s dropped", key_id(ret.old_key))
        await self._publish(signed)
        self._changed.set()
        return self.view()

    def _write_pem(self, signer: CommandSigner) -> None:
        path = self._pem_path(signer.key_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_private(path, signer.to_pem())

    async def _record(self, rot: KeyRotation, signed: SignedKeyRotation) -> None:
        try:
            await self._kv.create(step_key(rot.seq), codec.encode(signed))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"key rotation step {rot.seq} exists already (another "
                           "controller rotating at the same time?)") from None
        self._steps[rot.seq] = signed
        self._last = rot

    async def _publish(self, signed: SignedKeyRotation) -> None:
        """Best effort: an agent that misses it catches up by key sync."""
        try:
            await self._nc.publish(self._subjects.cmd_all, codec.encode(signed))
        except Exception as exc:
            log.warning("key rotation not broadcast (%s): agents catch up by key sync", exc)

    async def _auto_finish(self) -> None:
        """Finish the rotation in progress when its overlap has passed."""
        while True:
            self._changed.clear()
            ret = self.retiring()
            wait = None if ret is None else max(0.0, ret.old_key_expires - self._clock())
            if wait is not None and wait <= 0:
                try:
                    await self.finish()
                except Exception:
                    log.exception("automatic finish of the key rotation failed; retrying")
                    await asyncio.sleep(10)
                continue
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with
            # a change (gh-86296), and stop() then waits for this loop for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()

    async def send_missed(self, node_id: str, after: int) -> None:
        """Send the steps after ``after`` to one node's command subject (its heartbeat says
        it is behind: it enrolled as a rotation happened), at most every ``missed_interval``
        seconds per node. Best effort, like the broadcast."""
        now = time.monotonic()
        last = self._sent_missed.get(node_id)
        if last is not None and now - last < self.missed_interval:
            return
        if len(self._sent_missed) > 100_000:
            self._sent_missed.clear()
        self._sent_missed[node_id] = now
        subject = self._subjects.cmd_node(node_id)
        try:
            for seq in sorted(s for s in self._steps if s > after):
                await self._nc.publish(subject, codec.encode(self._steps[seq]))
        except Exception as exc:
            log.debug("missed key rotations not sent to %s: %s", node_id, exc)
            return
        self.stats["missed_sent"] += 1

    # -- key sync ------------------------------------------------------------------------

    async def handle_sync(self, msg: Msg) -> None:
        """Answer a node's KeySyncRequest with the steps after the one it names, only to
        that node's own inbox (the subject, which only it may publish on, names it)."""
        subjects = self._subjects
        node_id = subjects.node_id_of(msg.subject)
        if node_id is None or not subjects.is_node_reply(node_id, msg.reply):
            self._refuse_reply(msg)
            return
        try:
            req = codec.decode(msg.data, KeySyncRequest, max_size=4096)
            if req.node_id != node_id:
                raise ProtocolError(f"key sync for node {req.node_id!r} asked on node "
                                    f"{node_id!r}'s subject")
        except ProtocolError as exc:
            self.stats["syncs_refused"] += 1
            await msg.respond(codec.encode(ErrorReply(code="bad_request", message=exc.reason)))
            return
        self.stats["syncs"] += 1
        steps = [self._steps[s] for s in sorted(self._steps) if s > req.after]
        await msg.respond(codec.encode(KeySyncReply(rotations=steps)))
