"""Durable state in JetStream KV, with in-memory indexes fed by watches (informer-style).

Writes go through revision compare-and-set so two controllers never clobber each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import msgspec
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from controller.errors import Conflict, NotFound

log = logging.getLogger("barista.controller.state")

T = TypeVar("T", bound=msgspec.Struct)

CAS_RETRIES = 10


class Table(Generic[T]):
    """One KV bucket of typed records, mirrored in memory by a watch."""

    def __init__(self, kv: KeyValue, record_type: type[T], *, name: str) -> None:
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

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        # The initial values arrive first, then a None marker.
        async for entry in watcher:
            if entry is None:
                break
            self._apply(entry)
        self._ready.set()
        self._watch_task = asyncio.create_task(self._follow(watcher), name=f"watch-{self.name}")

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
            self._watch_task = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        while True:
            try:
                entry = await watcher.updates(timeout=3600)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                await watcher.stop()
                raise
            except Exception:
                log.exception("watch on bucket %s failed; retrying", self.name)
                await asyncio.sleep(1)
                continue
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        rev = entry.revision or 0
        if rev and rev <= self._revisions.get(key, 0):
            return  # we already know a newer one (our own write)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._items.pop(key, None)
            # Keep the delete's revision (a tombstone): an older put that the watch
            # delivers late must not bring the record back.
            if rev:
                self._revisions[key] = rev
            self._notify(key, None)
            return
        try:
            record = self._decoder.decode(entry.value)
        except msgspec.DecodeError as exc:
            log.error("bucket %s key %s holds an undecodable record: %s", self.name, key, exc)
            return
        self._items[key] = record
        self._revisions[key] = rev
        self._notify(key, record)

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
        return self._decoder.decode(entry.value), entry.revision or 0

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
        self._items.pop(key, None)
        self._notify(key, None)

    def _remember(self, key: str, record: T, rev: int) -> None:
        if rev >= self._revisions.get(key, 0):
            self._items[key] = record
            self._revisions[key] = rev
            self._notify(key, record)


async def open_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 5,
    replicas: int = 1,
    ttl: float | None = None,
) -> KeyValue:
    """Open a KV bucket, creating it (file storage) when missing."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    return await js.create_key_value(
        KeyValueConfig(bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas)
    )
