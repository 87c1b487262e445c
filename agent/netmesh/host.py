"""The host side of an overlay interface: address, MTU, link state, routes, forwarding and
sockets, through iproute2 -- in the agent's own network namespace, or (lab and tests, where
one process drives several simulated machines) in a named one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.netmesh.errors import HostCommandFailed

CLONE_NEWNET = 0x40000000
ROUTE_PROTO = "static"  # the routes we add carry it, so we remove only ours


@dataclass(frozen=True, slots=True)
class Host:
    """``netns`` "": the agent's own namespace (production); else ``ip netns`` name."""

    netns: str = ""

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    async def run(self, argv: list[str], *, check: bool = True) -> str:
        full = self.wrap(argv)
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise HostCommandFailed(full, proc.returncode or 0, err.decode(errors="replace"))
        return out.decode(errors="replace")

    async def spawn(self, argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*self.wrap(argv), **kw)

    async def _json(self, argv: list[str]) -> list[dict[str, Any]]:
        text = await self.run(argv)
        data = json.loads(text) if text.strip() else []
        return data if isinstance(data, list) else []

    async def link_exists(self, ifname: str) -> bool:
        return bool(await self.run(["ip", "link", "show", "dev", ifname], check=False))

    async def delete_link(self, ifname: str) -> None:
        await self.run(["ip", "link", "del", "dev", ifname], check=False)

    async def set_link(self, ifname: str, *, mtu: int) -> None:
        await self.run(["ip", "link", "set", "dev", ifname, "mtu", str(mtu), "up"])

    async def set_address(self, ifname: str, address: str, prefixlen: int) -> None:
        """Make ``address/prefixlen`` the interface's one address (others removed)."""
        want = ipaddress.ip_interface(f"{address}/{prefixlen}")
        await self.run(["ip", "addr", "replace", str(want), "dev", ifname])
        for entry in await self._json(["ip", "-j", "addr", "show", "dev", ifname]):
            for info in entry.get("addr_info", []):
                if info.get("family") not in ("inet", "inet6") or info.get("scope") == "link":
                    continue
                have = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
                if have != want:
                    await self.run(["ip", "addr", "del", str(have), "dev", ifname], check=False)

    async def set_routes(self, ifname: str, prefixes: Iterable[str]) -> None:
        """Routes over the interface for ``prefixes`` (beyond the address's own prefix);
        routes we added before and no longer want are removed."""
        want = {str(ipaddress.ip_network(p)) for p in prefixes}
        have: set[str] = set()
        for family in ("-4", "-6"):
            for r in await self._json(["ip", "-j", family, "route", "show", "dev", ifname,
                                       "proto", ROUTE_PROTO]):
                dst = r.get("dst", "")
                if dst and dst != "default":
                    net = ipaddress.ip_network(dst if "/" in dst else
                                               f"{dst}/{32 if family == '-4' else 128}")
                    have.add(str(net))
        for prefix in sorted(want - have):
            await self.run(["ip", "route", "replace", prefix, "dev", ifname, "proto",
                            ROUTE_PROTO])
        for prefix in sorted(have - want):
            await self.run(["ip", "route", "del", prefix, "dev", ifname, "proto", ROUTE_PROTO],
                           check=False)

    async def set_forwarding(self, on: bool) -> None:
        value = "1" if on else "0"
        await self.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={value}"])
        await self.run(["sysctl", "-q", "-w", f"net.ipv6.conf.all.forwarding={value}"],
                       check=False)

    def open_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket living in this host's namespace (setns on a short-lived thread, so the
        calling thread's namespace never changes)."""
        if not self.netns:
            return socket.socket(family, kind, proto)
        result: list[socket.socket | BaseException] = []

        def inside() -> None:
            import ctypes  # only for a named namespace (lab, tests): ~0.3 MB of RSS

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.netns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(socket.socket(family, kind, proto))
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=inside, name=f"netns-{self.netns}")
        thread.start()
        thread.join()
        got = result[0]
        if isinstance(got, BaseException):
            raise got
        return got
