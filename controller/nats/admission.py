"""Node admission: which node identities the NATS server lets in (the ``NodeAdmission``
seam) and its implementations: ``OperatorAdmission`` (NATS operator mode, on the embedded
server or on any NATS deployment set up by ``barista nats init``: a node is admitted by a
user JWT signed for its nkey, nothing changes on the server), and nothing at all for a NATS
that is not ours (``UnmanagedAdmission``: nodes are not isolated from each other).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from controller.nats.account import AccountStore, FleetAccount, share
from controller.nats.operator import (
    ACCOUNT_CLAIMS_UPDATES,
    CLAIMS_UPDATE,
    DEFAULT_USER_TTL,
    OperatorTrust,
    Permissions,
)
from controller.nats.permissions import NodeAccess, node_permissions
from protocol.subjects import Subjects

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger("barista.controller.auth")


class NodeAdmission(Protocol):
    """Admits node identities to NATS. Enrollment and the controller see only this."""

    @property
    def managed(self) -> bool:
        """Whether nodes are isolated by their own identity (node_permissions); False when
        NATS is not ours to manage and nodes connect with what the operator gave them."""
        ...

    async def admit(self, access: NodeAccess) -> None:
        """Let ``access`` in; returns once the server accepts that identity."""
        ...

    async def credentials(self, access: NodeAccess) -> str:
        """What the node connects with besides its nkey: a user JWT in operator mode, ""
        otherwise. Raises RevokedUser for a revoked identity."""
        ...

    async def remove(self, nkey: str) -> None:
        """Stop admitting ``nkey`` (in operator mode: revoke it, connections included)."""
        ...

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Admit exactly ``nodes`` (after loading state at start)."""
        ...


class UnmanagedAdmission:
    """An external NATS without barista's trust (no ``barista nats init``): its operator
    admits nodes, all with the credentials they were given; nothing to do here."""

    @property
    def managed(self) -> bool:
        return False

    async def admit(self, access: NodeAccess) -> None:
        return None

    async def credentials(self, access: NodeAccess) -> str:
        return ""

    async def remove(self, nkey: str) -> None:
        return None

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        return None


class OperatorAdmission:
    """NATS operator mode: a node is admitted by signing a user JWT for its own nkey (with
    the fleet account's signing key and node_permissions), so enrolling changes nothing on
    the server -- no config write, no reload, no dropped handshake. Removal revokes the
    nkey in the fleet account JWT and pushes it over ``system_nc`` (a system-account
    connection): every server of the deployment closes the node's connections and refuses
    it from then on.

    ``account``: the fleet account's state shared by every controller of the deployment
    (controller.nats.account). A revocation is merged into it by compare-and-set before the
    JWT is pushed, and what other controllers add is merged into this one's JWT and pushed
    as it arrives, so that no controller's push drops another's revocation. None: this
    controller's trust dir is the only record (a lone controller without state)."""

    def __init__(
        self,
        *,
        trust: OperatorTrust,
        subjects: Subjects,
        system_nc: NATS | None,
        ttl: float = DEFAULT_USER_TTL,
        account: AccountStore | None = None,
    ) -> None:
        self._trust = trust
        self._subjects = subjects
        self._system_nc = system_nc
        self._ttl = ttl
        self._account = account
        self._unfollow: Callable[[], None] | None = None
        self._watching: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Pushes and shared writes coalesce: one that starts after a caller's change
        # carries it, so 1,000 revocations at once (an infra deleted) cost a few pushes and
        # compare-and-sets, not 1,000 in a row.
        self._push = _Coalesced(self._push_now)
        self._share = _Coalesced(self._share_now)

    @property
    def managed(self) -> bool:
        return True

    @property
    def ttl(self) -> float:
        return self._ttl

    async def admit(self, access: NodeAccess) -> None:
        # The JWT from credentials() is the admission; nothing changes on the server.
        return None

    async def credentials(self, access: NodeAccess) -> str:
        perms = Permissions.from_config(node_permissions(self._subjects, access.node_id))
        return self._trust.user_jwt(
            access.nkey, name=access.node_id, permissions=perms, ttl=self._ttl
        )

    def is_revoked(self, nkey: str) -> bool:
        return self._trust.is_revoked(nkey)

    @property
    def settled(self) -> bool:
        """No push or shared write started by a watch (another controller's change, anyone's
        push) is running: what this controller pushes from its current state has landed."""
        return not self._tasks

    async def remove(self, nkey: str) -> None:
        """Revoke ``nkey``: written to the trust dir first (a failed push is applied at the
        next start, see sync), merged into the shared state, then pushed -- pushed also
        when the shared write fails (its error is raised after the push)."""
        if self._account is None and self._trust.is_revoked(nkey):
            return
        self._trust.revoke(nkey)
        try:
            if self._account is not None:
                await self._share()
        finally:
            await self._push()

    async def sync(self, nodes: Iterable[NodeAccess]) -> None:
        """Nothing to list (every JWT names its node). This dir's revocations and the
        shared ones are merged (both ways), the shared state is followed from now on, and
        the fleet account JWT is pushed, so that a revocation whose push failed before --
        this controller's or another's -- is in force now."""
        if self._account is not None:
            # What the bucket held when it was opened first (no round trip), so that even
            # a failed write below leaves nothing out of the JWT pushed now.
            cached = self._account.get(self._trust.fleet_account)
            if cached is not None:
                self._trust.merge(cached.revocations, cached.signing_keys)
            if self._unfollow is None:
                self._unfollow = self._account.subscribe(self._on_shared)
            try:
                await self._share()
            except Exception as exc:  # KV trouble is not the servers' config: go on
                log.warning("could not merge revocations into the shared fleet account "
                            "state (%s); the next change tries again", exc)
        if self._system_nc is not None and not self._watching:
            # Anyone's account push (a controller of an older version, `nsc push`, a stale
            # JWT): one that drops a revocation is answered with ours at once.
            for subject in (CLAIMS_UPDATE, *(s.format(self._trust.fleet_account)
                                             for s in ACCOUNT_CLAIMS_UPDATES)):
                self._watching.append(
                    await self._system_nc.subscribe(subject, cb=self._on_pushed))
        await self._push()

    async def close(self) -> None:
        """Stop following the shared state; pushes still running are cancelled."""
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        for sub in self._watching:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to stop
                log.debug("unsubscribing from account updates: %s", exc)
        self._watching.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_shared(self, key: str, record: FleetAccount | None) -> None:
        """A change of the shared record: another controller's write, or our own."""
        if key != self._trust.fleet_account:
            return
        if record is None:
            # Never an un-revocation: this JWT keeps what it has, and writes it back.
            log.warning("the shared fleet account record was deleted; writing it again")
            self._spawn(self._share, "share")
            return
        if self._trust.merge(record.revocations, record.signing_keys):
            log.info("fleet account: another controller shared revocations (%d in all); "
                     "pushing the account JWT", len(record.revocations))
            self._spawn(self._push, "push")
        mine = self._trust.revocations
        if (any(record.revocations.get(k, -1) < v for k, v in mine.items())
                or not set(self._trust.signing_keys) <= set(record.signing_keys)):
            self._spawn(self._share, "share")  # the record lacks some of ours

    async def _on_pushed(self, msg: Msg) -> None:
        """An account JWT pushed to the servers, ours or anyone's."""
        before = self._trust.revocations
        try:
            lacks = self._trust.lacks(msg.data.decode("ascii", "replace"))
        except Exception:  # never let one message end the subscription
            log.exception("checking a pushed account JWT failed")
            return
        if lacks:
            log.warning("a fleet account JWT without some of its revocations was pushed to "
                        "NATS (not by this controller's current state); pushing ours again")
            self._spawn(self._push, "push")
        if self._account is not None and (lacks or self._trust.revocations != before):
            self._spawn(self._share, "share")  # what it carried that the record lacks

    def _spawn(self, fn: Callable[[], Awaitable[None]], what: str) -> None:
        async def run() -> None:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged; the next change or start tries again
                log.warning("fleet account %s failed: %s", what, exc)

        task = asyncio.create_task(run(), name=f"fleet-account-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_now(self) -> None:
        if self._system_nc is None:
            return
        try:
            await self._trust.push_fleet(self._system_nc)
        except Exception as exc:
            # The revocation is in the trust dir and the shared state, pushed again at the
            # next change or start (and in the embedded server's preload).
            log.warning("could not push the fleet account JWT to nats-server: %s", exc)
            raise

    async def _share_now(self) -> None:
        """Merge this trust's revocations and signing keys into the shared record (CAS)
        and take in what others added."""
        assert self._account is not None
        record = await share(self._account, self._trust.fleet_account,
                             self._trust.revocations, self._trust.signing_keys)
        self._trust.merge(record.revocations, record.signing_keys)


class _Coalesced:
    """Runs ``fn`` one call at a time; a caller returns once a run that *started after its
    call* is done (that run carried its change), so N callers at once cost two runs, not N."""

    def __init__(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._fn = fn
        self._lock = asyncio.Lock()
        self._wanted = 0
        self._done = 0

    async def __call__(self) -> None:
        self._wanted += 1
        mine = self._wanted
        async with self._lock:
            if self._done >= mine:
                return  # a run that started after our call already carried it
            carries = self._wanted
            await self._fn()
            self._done = carries
