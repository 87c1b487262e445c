"""Overlay addresses in KV ``ipam``, assigned by compare-and-set: an address is never given to
two nodes (two controllers included), stays with its node across restarts, and after its
release is quarantined before anyone may have it again.

Two kinds of key per network: ``<net>.a.<address>`` (who holds the address; created with
KV create, so exactly one node can win it) and ``<net>.n.<node>`` (the node's address; KV
create again, so two controllers assigning one node at once end up with one address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import Literal

import msgspec

from controller.errors import Conflict, NotFound
from controller.mesh.errors import AddressesExhausted
from controller.mesh.networks import IPAddress, NetworkRecord
from controller.state.table import Table

log = logging.getLogger("barista.controller.mesh.ipam")

LeaseState = Literal["assigned", "released"]
# A released address is not handed out again for this long (a node that comes back from
# a partition with a stale config must not collide with the address's next holder).
DEFAULT_QUARANTINE = 3600.0
# Scans of a full-looking network repeated when it lost addresses to a concurrent writer.
SCAN_RETRIES = 5


class _Raced(Exception):
    """A scan found no free address but lost some to concurrent writers."""


class Lease(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    network: str
    address: str
    node_id: str
    state: LeaseState = "assigned"
    assigned_at: float = 0.0
    released_at: float = 0.0


def _addr_token(address: str) -> str:
    return address.replace(":", "_")


def address_key(network: str, address: str) -> str:
    return f"{network}.a.{_addr_token(address)}"


def node_key(network: str, node_id: str) -> str:
    return f"{network}.n.{node_id}"


def _candidates(net: NetworkRecord) -> Iterator[IPAddress]:
    """Every assignable address in order: not the network address, nor (IPv4) the
    broadcast address."""
    network = net.network()
    last = network.num_addresses - (1 if network.version == 4 else 0)
    base = network.network_address
    for offset in range(1, last):
        yield base + offset


class Ipam:
    """Assign, look up and release overlay addresses; ``table`` is KV ``ipam``."""

    def __init__(
        self, table: Table[Lease], *, quarantine: float = DEFAULT_QUARANTINE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.quarantine = quarantine
        self._clock = clock
        self.stats = {"assigned": 0, "released": 0, "conflicts": 0, "reclaimed": 0}

    # -- reads -----------------------------------------------------------------------

    def address_of(self, network: str, node_id: str) -> str | None:
        lease = self.table.get(node_key(network, node_id))
        return lease.address if lease is not None and lease.state == "assigned" else None

    def leases(self, network: str) -> list[Lease]:
        """The network's address leases (assigned and quarantined), by address."""
        out = [lease for lease in self.table
               if lease.network == network and self.table.get(
                   address_key(network, lease.address)) is lease]
        return sorted(out, key=lambda lease: ipaddress.ip_address(lease.address))

    # -- writes ----------------------------------------------------------------------

    async def assign(self, net: NetworkRecord, node_id: str) -> str:
        """The node's address in ``net``: the one it has, else the first free one."""
        for attempt in range(SCAN_RETRIES):
            try:
                return await self._assign_once(net, node_id)
            except _Raced:
                # Addresses lost to a concurrent writer may come back (another controller
                # assigning the same node gives its spare back): scan again.
                await asyncio.sleep(0.01 * (attempt + 1))
        return await self._assign_once(net, node_id, last=True)

    async def _assign_once(self, net: NetworkRecord, node_id: str, *, last: bool = False) -> str:
        nkey = node_key(net.name, node_id)
        try:
            held, _ = await self.table.fetch(nkey)
            if held.state == "assigned":
                return held.address
        except NotFound:
            pass
        now = self._clock()
        assigned = quarantined = raced = 0
        for addr in _candidates(net):
            address = str(addr)
            akey = address_key(net.name, address)
            cur = self.table.get(akey)
            lease = Lease(network=net.name, address=address, node_id=node_id, assigned_at=now)
            try:
                if cur is None:
                    await self.table.create(akey, lease)
                elif cur.state == "released" and cur.released_at + self.quarantine <= now:
                    await self.table.update(akey, lease, revision=self.table.revision(akey))
                    self.stats["reclaimed"] += 1
                else:
                    if cur.state == "assigned":
                        assigned += 1
                    else:
                        quarantined += 1
                    continue
            except Conflict:
                self.stats["conflicts"] += 1  # another controller took it: the next one
                raced += 1
                continue
            try:
                await self.table.create(nkey, lease)
            except Conflict:
                # Another controller assigned this node at the same moment: keep its
                # address and give ours back (never handed out, so no quarantine).
                self.stats["conflicts"] += 1
                await self.table.delete(akey)
                held, _ = await self.table.fetch(nkey)
                return held.address
            self.stats["assigned"] += 1
            log.info("network %s: %s assigned to node %s", net.name, address, node_id)
            return address
        if raced and not last:
            raise _Raced()
        raise AddressesExhausted(net.name, net.cidr, assigned + raced, quarantined)

    async def release(self, network: str, node_id: str) -> str | None:
        """Release the node's address (quarantined from now on); returns it, or None."""
        nkey = node_key(network, node_id)
        try:
            held, _ = await self.table.fetch(nkey)
        except NotFound:
            return None
        now = self._clock()

        def mark(cur: Lease) -> Lease | None:
            if cur.node_id != node_id or cur.state != "assigned":
                return None
            return msgspec.structs.replace(cur, state="released", released_at=now)

        try:
            await self.table.mutate(address_key(network, held.address), mark)
        except NotFound:
            pass
        await self.table.delete(nkey)
        self.stats["released"] += 1
        log.info("network %s: %s released by node %s (quarantined %.0f s)", network,
                 held.address, node_id, self.quarantine)
        return held.address

    async def drop_network(self, network: str) -> int:
        """Forget every lease of a removed network; returns how many keys went."""
        keys = []
        for lease in list(self.table):
            if lease.network != network:
                continue
            keys.append(address_key(network, lease.address))
            keys.append(node_key(network, lease.node_id))
        gone = 0
        for key in dict.fromkeys(keys):
            if self.table.get(key) is not None:
                await self.table.delete(key)
                gone += 1
        return gone
