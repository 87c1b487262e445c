"""The ``ssh`` provider: adopts machines that already exist (on-prem, another cloud) by
running the same installer over SSH that cloud-init runs on a VM we made (asyncssh).

The machines are a pool (``SshSettings.hosts``, "user@host[:port]"); "launching" a node
takes a free machine, writes its boot config (with the join token) through the SSH
channel's standard input into 0600 files — never onto a command line — and runs the join.
What a machine is running is read from the machine itself (``/etc/barista/instance.json``,
the node's name and tags, written before the install), so the provider keeps no state and a
restarted controller finds its nodes again. Host keys are checked against a known_hosts
file or pinned fingerprints; keys come from the operator's ssh-agent or key files.

What the contract's verbs mean here: stop/start stop and start the agent (the machine is
not ours to power off); reboot restarts the agent; terminate uninstalls the agent and
frees the machine; ensure_network and cleanup make and remove nothing (we manage no
network on adopted machines: the operator opens the WireGuard UDP port).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import msgspec

from controller.provision.bootstrap import install_command, read_user_data
from controller.provision.contract import (
    TAG_GROUP,
    CapacityError,
    Catalog,
    CredentialsError,
    Image,
    Instance,
    InstanceState,
    InvalidRequestError,
    LaunchRequest,
    Network,
    NetworkRequest,
    NotFoundError,
    Placement,
    ProvisionError,
    Region,
    Size,
    TransientError,
)

log = logging.getLogger("barista.controller.provision.ssh")

NAME = "ssh"
MARKER = "/etc/barista/instance.json"
BOOT_CONFIG = "/etc/barista/join.json"
INSTALLED_TOOL = "/opt/barista-agent/bootstrap.py"
EXISTING = "existing"  # the only size and image: the machine as it is


@dataclass(frozen=True, slots=True)
class SshHost:
    user: str
    host: str
    port: int = 22

    @property
    def id(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_host(spec: str) -> SshHost:
    """"user@host[:port]" (IPv6 as "user@[addr]:port"); ValueError naming what is wrong."""
    user, sep, rest = spec.strip().rpartition("@")
    if not sep or not user or not rest:
        raise ValueError(f"ssh host {spec!r} must be user@host[:port]")
    port = 22
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"ssh host {spec!r}: bad port")
            port = _port(spec, tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = _port(spec, p)
    else:
        host = rest
    if not host:
        raise ValueError(f"ssh host {spec!r} has no host")
    return SshHost(user=user, host=host, port=port)


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"ssh host {spec!r}: port must be 1-65535")
    return int(text)


@dataclass(frozen=True)
class SshSettings:
    """The machines to adopt and how to trust them. ``fingerprints``: host id (or host) ->
    "SHA256:..." pinned instead of known_hosts. ``client_keys``: key files; () = the
    operator's ssh-agent and default keys. ``groups``: a node group's own machines (its
    GroupSpec.hosts); a group not listed draws from ``hosts``."""

    hosts: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    known_hosts: str = ""  # a known_hosts file; "" = ~/.ssh/known_hosts
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    client_keys: tuple[str, ...] = ()
    region: str = "default"
    connect_timeout: float = 15.0
    command_timeout: float = 600.0
    concurrency: int = 16


class _PinnedHostKey(asyncssh.SSHClient):
    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        return bool(key.get_fingerprint("sha256") == self._fingerprint)


class SshProvider:
    def __init__(self, *, settings: SshSettings) -> None:
        self._settings = settings
        self._hosts = {h.id: h for h in (parse_host(s) for s in settings.hosts)}
        self._groups = {g: [parse_host(s).id for s in specs]
                        for g, specs in settings.groups.items()}
        for ids in self._groups.values():
            for host_id in ids:
                self._hosts.setdefault(host_id, parse_host(host_id))
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._launch = asyncio.Lock()  # two batches never take the same free machine

    @property
    def name(self) -> str:
        return NAME

    def catalog(self) -> Catalog:
        region = self._settings.region
        return Catalog(
            provider=NAME,
            regions={region: Region(name=region, latitude=0.0, longitude=0.0,
                                    display="machines adopted over SSH")},
            sizes={EXISTING: Size(name=EXISTING, vcpus=0, memory_gb=0.0,
                                  price_hour={region: 0.0})},
            images={EXISTING: Image(name=EXISTING, id=EXISTING)},
        )

    # -- plumbing ----------------------------------------------------------------------

    def _error(self, host: SshHost, exc: BaseException) -> ProvisionError:
        region = self._settings.region
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return CredentialsError(
                f"{host.id}: its host key is not the trusted one ({exc.reason}); refusing "
                "to send anything", provider=NAME, region=region, code="host_key")
        if isinstance(exc, asyncssh.PermissionDenied):
            return CredentialsError(f"{host.id}: authentication refused ({exc.reason})",
                                    provider=NAME, region=region, code="auth")
        return TransientError(f"{host.id}: {type(exc).__name__}: {exc}", provider=NAME,
                              region=region, code="unreachable")

    async def _run(self, host: SshHost, command: str, *, stdin: bytes | None = None,
                   root: bool = True) -> asyncssh.SSHCompletedProcess:
        """``command`` (sh) on ``host``, as root (sudo -n for another user); ``stdin``
        goes through the channel, never onto a command line."""
        s = self._settings
        options: dict[str, Any] = {"username": host.user, "port": host.port,
                                   "connect_timeout": s.connect_timeout}
        pin = s.fingerprints.get(host.id) or s.fingerprints.get(host.host)
        if pin:
            # No known_hosts entry: the callback decides, before authentication.
            options["known_hosts"] = ([], [], [])
            options["client_factory"] = lambda: _PinnedHostKey(pin)
        elif s.known_hosts:
            options["known_hosts"] = s.known_hosts
        if s.client_keys:
            options["client_keys"] = list(s.client_keys)
        if root and host.user != "root":
            command = f"sudo -n sh -c {shlex.quote(command)}"
        async with self._slots:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes
                # with the command's end (gh-86296), and the engine's pass it is part of
                # then goes on after a delete or a stop cancelled it.
                async with asyncssh.connect(host.host, **options) as conn:
                    async with asyncio.timeout(s.command_timeout):
                        return await conn.run(command, input=stdin, check=False,
                                              encoding=None)
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise self._error(host, exc) from None

    async def _write_private(self, host: SshHost, path: str, data: bytes) -> None:
        d = shlex.quote(path.rsplit("/", 1)[0])
        p = shlex.quote(path)
        res = await self._run(host, f"umask 077; mkdir -p {d} && chmod 700 {d} && "
                              f"cat > {p}.tmp && mv -f {p}.tmp {p}", stdin=data)
        if res.exit_status != 0:
            raise InvalidRequestError(f"{host.id}: cannot write {path}: {_tail(res.stderr)}",
                                      provider=NAME, region=self._settings.region,
                                      code="write_failed")

    async def _observe(self, host: SshHost) -> Instance | None:
        """What the machine runs for us, or None when it is free."""
        res = await self._run(
            host, f"cat {MARKER} 2>/dev/null || exit 3; echo; "
                  f"if [ -f {INSTALLED_TOOL} ]; then python3 {INSTALLED_TOOL} status; fi",
            root=True)
        if res.exit_status == 3:
            return None
        out = _text(res.stdout).strip().splitlines()
        try:
            marker = json.loads(out[0])
            status = json.loads(out[-1]) if len(out) > 1 else {}
        except (IndexError, ValueError):
            raise TransientError(f"{host.id}: unreadable {MARKER}", provider=NAME,
                                 region=self._settings.region, code="bad_marker") from None
        state = (InstanceState.RUNNING if status.get("running") else
                 InstanceState.STOPPED if status.get("installed") else InstanceState.PENDING)
        return Instance(
            id=host.id, name=str(marker.get("name", "")),
            placement=Placement(provider=NAME, region=self._settings.region),
            state=state, size=EXISTING, image=EXISTING, private_ip=host.host,
            public_ip=host.host, tags=dict(marker.get("tags", {})),
            launched_at=float(marker.get("launched_at", 0.0)),
            extra={"node_id": str(status.get("node_id", "")),
                   "agent_version": str(status.get("version", ""))},
        )

    async def _observe_all(self, ids: Sequence[str]) -> dict[str, Instance | None]:
        found = await asyncio.gather(*(self._observe(self._hosts[i]) for i in ids))
        return dict(zip(ids, found, strict=True))

    def _host(self, host_id: str) -> SshHost:
        host = self._hosts.get(host_id)
        if host is None:
            raise NotFoundError(f"{host_id} is not one of the ssh provider's machines",
                                provider=NAME, region=self._settings.region)
        return host

    # -- the contract ------------------------------------------------------------------

    async def ensure_network(self, request: NetworkRequest) -> Network:
        # Adopted machines keep their own network; nothing is made, so nothing to clean.
        return Network(id=f"{NAME}-{request.infra}", region=request.region, cidr=request.cidr,
                       extra={"note": "not managed: open UDP "
                                      f"{request.wireguard_port} on the machines yourself"})

    async def run_instances(self, placement: Placement, network: Network,
                            requests: Sequence[LaunchRequest]) -> list[Instance]:
        async with self._launch:
            pool = sorted({i for r in requests for i in self._pool(r)})
            observed = await self._observe_all(pool)
            by_name = {inst.name: inst for inst in observed.values() if inst is not None}
            free = [i for i in pool if observed[i] is None]
            out: list[Instance] = []
            todo: list[tuple[SshHost, LaunchRequest]] = []
            for req in requests:
                have = by_name.get(req.name)
                if have is not None and have.state is InstanceState.RUNNING:
                    out.append(have)
                    continue
                if have is not None:
                    todo.append((self._hosts[have.id], req))  # an install left unfinished
                    continue
                mine = [i for i in self._pool(req) if i in free]
                if not mine:
                    raise CapacityError(
                        f"no free machine for {req.name}: all of "
                        f"{', '.join(self._pool(req)) or '(none listed)'} are taken",
                        provider=NAME, region=placement.region, scope="region")
                free.remove(mine[0])
                todo.append((self._hosts[mine[0]], req))
            out += await asyncio.gather(*(self._adopt(h, r) for h, r in todo))
            return out

    def _pool(self, req: LaunchRequest) -> list[str]:
        group = req.tags.get(TAG_GROUP, "")
        if group in self._groups:
            return self._groups[group]
        return [parse_host(s).id for s in self._settings.hosts]

    async def _adopt(self, host: SshHost, req: LaunchRequest) -> Instance:
        try:
            boot = read_user_data(req.user_data)
        except ValueError as exc:
            raise InvalidRequestError(f"{req.name}: {exc}", provider=NAME,
                                      region=self._settings.region) from None
        # The marker first: a controller killed mid-install finds the machine by its tags.
        marker = {"name": req.name, "tags": dict(req.tags), "launched_at": time.time()}
        await self._write_private(host, MARKER, json.dumps(marker).encode())
        await self._write_private(host, BOOT_CONFIG, msgspec.json.encode(boot))
        log.info("adopting %s as node %s", host.id, req.name)
        res = await self._run(host, install_command(boot))
        if res.exit_status != 0:
            raise InvalidRequestError(
                f"{host.id}: the installer failed: {_tail(res.stderr)}", provider=NAME,
                region=self._settings.region, code="install_failed")
        inst = await self._observe(host)
        if inst is None:
            raise TransientError(f"{host.id}: the machine lost its marker during the install",
                                 provider=NAME, region=self._settings.region)
        return inst

    async def query_instances(self, tags: Mapping[str, str], *,
                              region: str | None = None) -> list[Instance]:
        """Every adopted machine carrying ``tags``. An unreachable machine is an error
        (TransientError), not an absence: a delete must not be confirmed by silence."""
        if region is not None and region != self._settings.region:
            return []
        observed = await self._observe_all(sorted(self._hosts))
        return [inst for inst in observed.values() if inst is not None
                and all(inst.tags.get(k) == v for k, v in tags.items())]

    async def _tool(self, region: str, ids: Sequence[str], verb: str) -> None:
        hosts = [self._host(i) for i in ids]

        async def one(host: SshHost) -> None:
            res = await self._run(host, f"[ ! -f {INSTALLED_TOOL} ] || "
                                        f"python3 {INSTALLED_TOOL} {verb}")
            if res.exit_status != 0:
                raise InvalidRequestError(f"{host.id}: agent {verb} failed: "
                                          f"{_tail(res.stderr)}", provider=NAME,
                                          region=region, code=f"{verb}_failed")

        await asyncio.gather(*(one(h) for h in hosts))

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._tool(region, ids, "stop")

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._tool(region, ids, "start")

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._tool(region, ids, "stop")
        await self._tool(region, ids, "start")

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._tool(region, ids, "uninstall")
        hosts = [self._host(i) for i in ids]
        await asyncio.gather(*(self._run(h, f"rm -f {MARKER} {BOOT_CONFIG}") for h in hosts))

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        return None  # ensure_network made nothing


def _text(data: Any) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else str(data or "")


def _tail(data: Any, limit: int = 600) -> str:
    lines = [line for line in _text(data).strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:] or "(no output)"
