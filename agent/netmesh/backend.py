"""WireGuard backends behind one interface, and their registry.

- ``wireguard-go``: the userspace implementation, one supervised process per interface,
  configured over its UAPI socket (agent/netmesh/uapi.py). What the tests and the lab use.
- ``kernel``: in-kernel WireGuard over generic netlink (agent/netmesh/kernel.py). The
  module does not exist on these build machines (no ``wireguard`` genetlink family, ``ip
  link add type wireguard`` fails with "Unknown device type"), so ``auto`` detects it and
  falls back to wireguard-go; its message building is unit-tested.

Every change is peer by peer: a backend is handed peer operations, never a whole peer list
to replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from agent.netmesh.errors import BackendUnavailable, NetmeshError, UapiError
from agent.netmesh.host import Host
from agent.netmesh.uapi import DeviceOp, DeviceState, PeerOp, UapiClient, encode_set

UAPI_DIR = Path("/var/run/wireguard")
IFNAME_MAX = 15


class Backend(Protocol):
    name: str

    async def up(self, ifname: str) -> None:
        """Make the interface exist and the backend ready to configure it."""

    async def down(self, ifname: str) -> None:
        """Remove the interface (and whatever process serves it)."""

    def alive(self, ifname: str) -> bool:
        """Whether the interface's backend still runs (False: ``up`` again, reapply)."""

    async def get(self, ifname: str) -> DeviceState: ...

    async def set(self, ifname: str, device: DeviceOp | None, peers: Sequence[PeerOp]) -> None:
        """Apply ``device`` settings and ``peers`` operations in one transaction (callers
        pass one peer per call: a refused one then fails alone)."""


def check_ifname(ifname: str) -> str:
    if not ifname or len(ifname) > IFNAME_MAX or not all(c.isalnum() or c in "-_" for c in
                                                          ifname):
        raise NetmeshError(f"interface name {ifname!r} must be 1-{IFNAME_MAX} characters of "
                           "letters, digits, '-' or '_'")
    return ifname


@dataclass(slots=True)
class _GoProcess:
    proc: asyncio.subprocess.Process | None  # None: adopted from an earlier agent run
    watch: asyncio.Task[None] | None = None
    exited: bool = False


@dataclass
class WireguardGoBackend:
    """wireguard-go per interface. Its UAPI socket is ``/var/run/wireguard/<ifname>.sock``
    on the shared filesystem: two network namespaces using the same interface name collide,
    so the lab gives every node its own interface names (or its own /var/run)."""

    host: Host = field(default_factory=Host)
    binary: str = "wireguard-go"
    uapi_dir: Path = UAPI_DIR
    start_timeout: float = 10.0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("barista.netmesh"))
    name: str = "wireguard-go"
    _procs: dict[str, _GoProcess] = field(default_factory=dict)

    def client(self, ifname: str) -> UapiClient:
        return UapiClient(self.uapi_dir / f"{check_ifname(ifname)}.sock")

    async def _answers(self, ifname: str) -> bool:
        try:
            await self.client(ifname).get()
            return True
        except UapiError:
            return False

    async def up(self, ifname: str) -> None:
        check_ifname(ifname)
        if shutil.which(self.binary) is None:
            raise BackendUnavailable(self.name, f"{self.binary} not found")
        current = self._procs.get(ifname)
        if current is not None and not current.exited:
            return
        exists, answers = await self.host.link_exists(ifname), await self._answers(ifname)
        if exists and answers:
            # Left by an earlier agent run (killed): adopt it, its sessions stay up.
            self._procs[ifname] = _GoProcess(proc=None)
            self.log.info("interface %s: adopted the running wireguard-go", ifname)
            return
        if answers:
            # The socket path is shared by every network namespace on this filesystem.
            raise BackendUnavailable(self.name, f"{self.uapi_dir}/{ifname}.sock belongs to "
                                     "a wireguard-go in another network namespace: give this "
                                     "node its own interface prefix or its own /var/run")
        await self.host.delete_link(ifname)  # a stale TUN without its daemon
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        proc = await self.host.spawn(
            [self.binary, "-f", ifname], stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
        entry = _GoProcess(proc=proc)
        self._procs[ifname] = entry
        entry.watch = asyncio.create_task(self._watch(ifname, entry), name=f"wg-go-{ifname}")
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while not await self._answers(ifname):
            if entry.exited:
                raise BackendUnavailable(self.name, f"wireguard-go for {ifname} exited at "
                                         f"start (code {proc.returncode})")
            if asyncio.get_running_loop().time() > deadline:
                await self.down(ifname)
                raise BackendUnavailable(self.name, f"no UAPI socket for {ifname} after "
                                         f"{self.start_timeout}s")
            await asyncio.sleep(0.02)
        self.log.info("interface %s: wireguard-go started (pid %d)", ifname, proc.pid)

    async def _watch(self, ifname: str, entry: _GoProcess) -> None:
        assert entry.proc is not None and entry.proc.stderr is not None
        try:
            async for line in entry.proc.stderr:
                # wireguard-go logs no key material at level "error"
                self.log.warning("wireguard-go %s: %s", ifname,
                                 line.decode(errors="replace").rstrip()[:300])
            await entry.proc.wait()
        finally:
            entry.exited = True
            if self._procs.get(ifname) is entry:
                self.log.warning("interface %s: wireguard-go exited (code %s)", ifname,
                                 entry.proc.returncode)

    def alive(self, ifname: str) -> bool:
        entry = self._procs.get(ifname)
        return entry is not None and not entry.exited

    def pid(self, ifname: str) -> int | None:
        entry = self._procs.get(ifname)
        return entry.proc.pid if entry is not None and entry.proc is not None else None

    async def down(self, ifname: str) -> None:
        entry = self._procs.pop(ifname, None)
        await self.host.delete_link(ifname)  # wireguard-go exits when its TUN goes
        if entry is None or entry.proc is None:
            return
        proc = entry.proc
        try:
            async with asyncio.timeout(3):  # (not wait_for: see mesh._tick_loop)
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # by its pid: our own child
            await proc.wait()
        if entry.watch is not None:
            entry.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry.watch
        with contextlib.suppress(FileNotFoundError):
            (self.uapi_dir / f"{ifname}.sock").unlink()

    async def get(self, ifname: str) -> DeviceState:
        return await self.client(ifname).get()

    async def set(self, ifname: str, device: DeviceOp | None, peers: Sequence[PeerOp]) -> None:
        await self.client(ifname).set(encode_set(device, list(peers)))


def _kernel_backend(host: Host, log: logging.Logger) -> Backend:
    from agent.netmesh.kernel import KernelBackend

    return KernelBackend(host=host, log=log)


def _go_backend(host: Host, log: logging.Logger) -> Backend:
    return WireguardGoBackend(host=host, log=log)


BackendFactory = Callable[[Host, logging.Logger], Backend]
BACKENDS: Mapping[str, BackendFactory] = MappingProxyType({
    "wireguard-go": _go_backend,
    "kernel": _kernel_backend,
})


def select_backend(preference: str, *, host: Host, log: logging.Logger) -> Backend:
    """``auto``: the kernel's WireGuard where the module exists, else wireguard-go."""
    if preference == "auto":
        from agent.netmesh.kernel import kernel_wireguard_available

        available, reason = kernel_wireguard_available(host)
        if available:
            return BACKENDS["kernel"](host, log)
        log.info("kernel WireGuard unavailable (%s): using wireguard-go", reason)
        return BACKENDS["wireguard-go"](host, log)
    try:
        factory = BACKENDS[preference]
    except KeyError:
        raise NetmeshError(f"unknown WireGuard backend {preference!r} (known: auto, "
                           f"{', '.join(BACKENDS)})") from None
    return factory(host, log)
