"""The fleet account's state that every controller of a deployment shares, in JetStream KV
(bucket ``nats_account``, one key: the fleet account's public key).

Several controllers on one NATS deployment (``barista nats init``) each sign and push the
fleet account JWT; a JWT built from one controller's own revocations would undo another's
(the server keeps the last JWT pushed). So the revocations -- and the account's signing
keys -- live here, written by compare-and-set (a revocation is merged into the latest
record, never into a stale copy), and each controller follows the bucket: whatever another
controller adds is merged into its own JWT and pushed (``OperatorAdmission``), so that the
last push any controller makes carries every revocation.

Merging is a union (the later time of each key): nothing here ever un-revokes a node, and a
controller that holds a revocation the record lacks (a record lost, or written before this
bucket existed) writes it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import msgspec

from controller.errors import Conflict, NotFound

# Compare-and-set attempts before giving up (writers retry at once on a conflict).
CAS_RETRIES = 10


class FleetAccount(msgspec.Struct, frozen=True, kw_only=True):
    """Revocations (user public key or "*" -> unix time) and signing keys (public)."""

    revocations: dict[str, int] = {}
    signing_keys: list[str] = []


class AccountStore(Protocol):
    """Where the record is kept: a controller.state Table[FleetAccount] (KV ``nats_account``,
    mirrored in memory by a watch)."""

    name: str

    async def fetch(self, key: str) -> tuple[FleetAccount, int]: ...

    async def create(self, key: str, record: FleetAccount) -> int: ...

    async def update(self, key: str, record: FleetAccount, *, revision: int) -> int: ...

    def get(self, key: str) -> FleetAccount | None: ...

    def subscribe(
        self, fn: Callable[[str, FleetAccount | None], None]) -> Callable[[], None]: ...


def merged(
    current: FleetAccount | None, revocations: Mapping[str, int], signing_keys: Iterable[str]
) -> FleetAccount:
    """``current`` with ``revocations`` and ``signing_keys`` added (union, later times)."""
    revs = dict(current.revocations) if current is not None else {}
    for key, when in revocations.items():
        revs[key] = max(revs.get(key, 0), int(when))
    keys = set(current.signing_keys) if current is not None else set()
    keys.update(signing_keys)
    return FleetAccount(revocations=revs, signing_keys=sorted(keys))


async def share(
    table: AccountStore, key: str, revocations: Mapping[str, int],
    signing_keys: Iterable[str],
) -> FleetAccount:
    """Merge into the stored record by compare-and-set (created when missing); retried on a
    concurrent write. Returns the record as stored now (what others added included)."""
    keys = list(signing_keys)
    for _ in range(CAS_RETRIES):
        try:
            current: FleetAccount | None
            current, revision = await table.fetch(key)
        except NotFound:
            current, revision = None, 0
        new = merged(current, revocations, keys)
        if new == current:
            return new
        try:
            if current is None:
                await table.create(key, new)
            else:
                await table.update(key, new, revision=revision)
            return new
        except Conflict:
            continue
    raise Conflict(f"{table.name} {key!r}: too many concurrent writers")
