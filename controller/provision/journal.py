"""The journal of provider operations (KV ``infra_ops``): every call that creates, stops,
starts, reboots or deletes VMs is written here *before* it is made and marked after, so an
engine killed at any point knows which calls may have had an effect it never saw.

Resuming does not trust the journal blindly: the provider is queried by tags, what exists
is adopted, and an open create intent only says where (and with which client token) to try
its names first, so a retry lands in the same placement instead of a second one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from controller.errors import NotFound
from controller.provision.contract import Placement
from controller.state.table import Table

OpKind = Literal["create", "terminate", "stop", "start", "reboot"]
OpState = Literal["intent", "done", "failed"]


class OpRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    infra: str
    group: str
    op: OpKind
    provider: str
    region: str
    zone: str = ""
    names: list[str] = []
    ids: list[str] = []  # VM ids: the targets of a delete, what a create made (after)
    client_token: str = ""
    state: OpState = "intent"
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def placement(self) -> Placement:
        return Placement(self.provider, self.region, self.zone)


class Journal:
    def __init__(self, table: Table[OpRecord], *, clock: Callable[[], float] = time.time
                 ) -> None:
        self._table = table
        self._clock = clock

    @staticmethod
    def key(infra: str, op_id: str) -> str:
        return f"{infra}.{op_id}"

    async def intent(self, *, infra: str, group: str, op: OpKind, placement: Placement,
                     names: Sequence[str] = (), ids: Sequence[str] = ()) -> OpRecord:
        now = self._clock()
        rec = OpRecord(id=secrets.token_hex(6), infra=infra, group=group, op=op,
                       provider=placement.provider, region=placement.region,
                       zone=placement.zone, names=list(names), ids=list(ids),
                       client_token=secrets.token_hex(16), created_at=now, updated_at=now)
        await self._table.create(self.key(infra, rec.id), rec)
        return rec

    async def finish(self, rec: OpRecord, *, ids: Sequence[str] = (), error: str = "") -> None:
        """Mark the call as answered (done, or failed with ``error``: it had no effect)."""
        done = msgspec.structs.replace(
            rec, state="failed" if error else "done", error=error[:300],
            ids=list(ids) or rec.ids, updated_at=self._clock())
        await self._table.put(self.key(rec.infra, rec.id), done)

    def open(self, infra: str, *, op: OpKind | None = None, group: str | None = None
             ) -> list[OpRecord]:
        """Calls of ``infra`` that were made (or about to be) but never answered."""
        return sorted((r for r in self._table if r.infra == infra and r.state == "intent"
                       and (op is None or r.op == op) and (group is None or r.group == group)),
                      key=lambda r: r.created_at)

    def all(self, infra: str) -> list[OpRecord]:
        return [r for r in self._table if r.infra == infra]

    async def prune(self, infra: str, *, keep_open: bool = True) -> int:
        """Remove answered ops of ``infra`` (and open ones too when not ``keep_open``:
        once the provider confirmed what exists, they say nothing more)."""
        n = 0
        for rec in self.all(infra):
            if keep_open and rec.state == "intent":
                continue
            try:
                await self._table.delete(self.key(infra, rec.id))
            except NotFound:
                pass
            n += 1
        return n
