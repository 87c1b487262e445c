"""Durable state in JetStream KV, with in-memory indexes fed by watches (informer-style).

Writes go through revision compare-and-set so two controllers never clobber each other.
A record that does not decode is skipped and reported (``BadRecord``), never fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from controller.errors import BadRecord, Conflict, NotFound

log = logging.getLogger("barista.controller.state")

T = TypeVar("T", bound=msgspec.Struct)

CAS_RETRIES = 10


class Table(Generic[T]):
    """One KV bucket of typed records, mirrored in memory by a watch."""

    def __init__(
        self,
        kv: KeyValue,
        record_type: type[T],
        *,
        name: str,
        on_bad_record: Callable[[BadRecord], None] | None = None,
    ) -> None:
        self._kv = kv
        self._type = record_type
        self._decoder = msgspec.msgpack.Decoder(record_type)
        self._encoder = msgspec.msgpack.Encoder()
        self.name = name
        self._items: dict[str, T] = {}
        self._revisions: dict[str, int] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._listeners: list[Callable[[str, T | None], None]] = []
        self._on_bad_record = on_bad_record
        # key -> the bad record it holds now (cleared by a good write or a delete). Each
        # bad revision is reported once, however often a sweep or a fetch trips over it.
        self._bad: dict[str, BadRecord] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        # The initial values arrive first, then a None marker.
        async for entry in watcher:
            if entry is None:
                break
            self._apply_safely(entry)
        self._ready.set()
        self._watch_task = asyncio.create_task(self._follow(watcher), name=f"watch-{self.name}")

    async def rewatch(self) -> None:
        """Start the watch afresh, catching up on what changed meanwhile.

        Called after a reconnect: a restarted server may have lost our watch consumer.
        Entries we already know are skipped by revision; deletes arrive as delete markers.
        """
        if self._watch_task is None:
            return
        old, self._watch_task = self._watch_task, None
        old.cancel()
        try:
            await old
        except (asyncio.CancelledError, Exception):
            pass
        delay = 0.2
        while True:
            try:
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        break
                    self._apply_safely(entry)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream may still be recovering its store
                log.info("bucket %s: watch not back yet (%s); retrying", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._watch_task = asyncio.create_task(self._follow(watcher), name=f"watch-{self.name}")

    async def stop(self) -> None:
        if self._watch_task:
            # Cancel until it is done: asyncio.wait_for (inside nats-py's watcher) loses a
            # cancellation that lands as its inner get completes (Python 3.11), and the loop
            # then waits an hour for the next update (seen with 200 enrollments, issue 10).
            while not self._watch_task.done():
                self._watch_task.cancel()
                await asyncio.wait({self._watch_task}, timeout=0.5)
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
            self._watch_task = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        while True:
            try:
                # nats-py leaves KeyWatcher's methods unannotated.
                entry = await watcher.updates(timeout=3600)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                await watcher.stop()  # type: ignore[no-untyped-call]
                raise
            except Exception:
                log.exception("watch on bucket %s failed; retrying", self.name)
                await asyncio.sleep(1)
                continue
            if entry is not None:
                self._apply_safely(entry)

    def _apply_safely(self, entry: KeyValue.Entry) -> None:
        try:
            self._apply(entry)
        except Exception:  # the informer outlives any one entry
            log.exception("bucket %s: applying key %s failed", self.name, entry.key)

    def _apply(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        rev = entry.revision or 0
        if rev and rev <= self._revisions.get(key, 0):
            return  # we already know a newer one (our own write)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._bad.pop(key, None)
            self._items.pop(key, None)
            # Keep the delete's revision (a tombstone): an older put that the watch
            # delivers late must not bring the record back.
            if rev:
                self._revisions[key] = rev
            self._notify(key, None)
            return
        try:
            record = self._decode(key, rev, entry.value)
        except BadRecord:
            # Keep the last good record in memory (nothing is lost, the node stays known);
            # the revision moves on so a late older put cannot win, and a later good write
            # or a compare-and-set against this revision repairs the key.
            if rev:
                self._revisions[key] = rev
            return
        self._bad.pop(key, None)
        self._items[key] = record
        self._revisions[key] = rev
        self._notify(key, record)

    def _decode(self, key: str, rev: int, value: bytes) -> T:
        """Decode one stored value; raises ``BadRecord`` (reported once per revision)."""
        try:
            return self._decoder.decode(value)
        except Exception as exc:  # DecodeError, and RecursionError on deep nesting
            bad = BadRecord(self.name, key, rev, str(exc)[:200] or type(exc).__name__)
        known = self._bad.get(key)
        if known is None or known.revision != rev:
            self._bad[key] = bad
            self._report(bad)
        raise bad

    def _report(self, bad: BadRecord) -> None:
        if self._on_bad_record is None:
            log.error("%s", bad)
            return
        try:
            self._on_bad_record(bad)
        except Exception:
            log.exception("bad-record handler of bucket %s failed", self.name)

    def bad_keys(self) -> list[str]:
        """Keys whose stored record does not decode right now."""
        return sorted(self._bad)

    def subscribe(self, fn: Callable[[str, T | None], None]) -> Callable[[], None]:
        """Call ``fn(key, record_or_None)`` on every change; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _notify(self, key: str, record: T | None) -> None:
        for fn in list(self._listeners):
            try:
                fn(key, record)
            except Exception:
                log.exception("listener on bucket %s failed", self.name)

    # -- reads (memory) --------------------------------------------------------------

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def revision(self, key: str) -> int:
        return self._revisions.get(key, 0)

    # -- writes (KV, compare-and-set) -------------------------------------------------

    async def fetch(self, key: str) -> tuple[T, int]:
        """Read the latest value from the server (not the cache)."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            raise NotFound(f"{self.name} {key!r} not found") from None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            raise NotFound(f"{self.name} {key!r} not found")
        rev = entry.revision or 0
        return self._decode(key, rev, entry.value), rev

    async def create(self, key: str, record: T) -> int:
        try:
            rev = await self._kv.create(key, self._encoder.encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{self.name} {key!r} already exists") from None
        self._remember(key, record, rev)
        return rev

    async def put(self, key: str, record: T) -> int:
        rev = await self._kv.put(key, self._encoder.encode(record))
        self._remember(key, record, rev)
        return rev

    async def update(self, key: str, record: T, *, revision: int) -> int:
        """Write only if the stored revision is still ``revision``; else ``Conflict``."""
        try:
            rev = await self._kv.update(key, self._encoder.encode(record), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{self.name} {key!r} changed concurrently") from None
        self._remember(key, record, rev)
        return rev

    async def mutate(self, key: str, fn: Callable[[T], T | None]) -> T | None:
        """Read-modify-write with CAS, retried on conflict. ``fn`` returning None = no write."""
        for _ in range(CAS_RETRIES):
            current, rev = await self.fetch(key)
            new = fn(current)
            if new is None:
                return current
            try:
                await self.update(key, new, revision=rev)
                return new
            except Conflict:
                continue
        raise Conflict(f"{self.name} {key!r}: too many concurrent writers")

    async def delete(self, key: str) -> None:
        await self._kv.delete(key)
        self._bad.pop(key, None)
        self._items.pop(key, None)
        self._notify(key, None)

    def _remember(self, key: str, record: T, rev: int) -> None:
        if rev >= self._revisions.get(key, 0):
            self._bad.pop(key, None)
            self._items[key] = record
            self._revisions[key] = rev
            self._notify(key, record)
