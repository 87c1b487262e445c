"""``sim``: a simulated cloud for tests and benchmarks, with the contract's exact semantics.

API latency, boot time, a token-bucket rate limit (``TransientError("throttled")`` beyond
it), capacity per zone (``CapacityError``), injected failures and a count of every call.
A VM "boots" after its boot time by reading its rendered user-data and handing the
``BootConfig`` to the injected ``boot`` callback (tests start a real agent runtime there),
so enrollment and Ready are real. Many sims with different names can run side by side.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from controller.provision.bootstrap import BootConfig, read_user_data
from controller.provision.contract import (
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
    QuotaError,
    Region,
    Size,
    TransientError,
)

log = logging.getLogger("barista.controller.provision.sim")

Op = Literal["ensure_network", "run_instances", "query_instances", "stop_instances",
             "start_instances", "reboot_instances", "terminate_instances", "cleanup"]
ErrorKind = Literal["transient", "capacity", "quota", "credentials", "invalid"]

# Stops the agent a sim VM booted (on stop, reboot, terminate).
Halt = Callable[[], Awaitable[None]]
# Called when a VM has booted: start what the user-data says (an agent); returns its halt.
BootFn = Callable[[BootConfig, Instance], Awaitable[Halt | None]]
# Test hook around each call: ("before" | "after", op), awaited inside the call.
Hook = Callable[[str, str], Awaitable[None]]


class FailureRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fail calls of ``op`` (in ``region``/``zone`` when given) with ``error``: skip the
    first ``after`` matching calls, then fail ``times`` of them (0: every one), each with
    ``probability`` (drawn from the sim's seeded RNG)."""

    op: Op
    error: ErrorKind
    region: str = ""
    zone: str = ""
    after: int = 0
    times: int = 1
    probability: float = 1.0
    message: str = "injected failure"


class SimSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    latency_min: float = 0.0  # seconds per API call, uniform in [min, max]
    latency_max: float = 0.0
    boot_time: float = 1.0  # seconds from launch to running (and the boot callback)
    boot_jitter: float = 0.0  # uniform +- around boot_time
    stop_time: float = 0.0
    terminate_time: float = 0.0
    gone_after: float = 0.0  # a terminated VM is still listed (as terminated) this long
    rate: float = 0.0  # API calls per second; 0 = unlimited
    burst: int = 0  # bucket size; 0 = max(1, rate)
    rate_scope: Literal["provider", "region"] = "provider"
    # Live VMs a placement holds: {"east-1/east-1a": 10} or {"east-1": 40}.
    capacity: dict[str, int] = {}
    failures: list[FailureRule] = []
    seed: int = 0
    max_batch: int = 50  # VMs per run_instances call (like RunInstances MaxCount)
    # True: a name that exists is returned, not created again (the contract's default);
    # False: a harsher cloud that creates a duplicate, to test the engine's own guard.
    idempotent_names: bool = True
    public_ip: bool = True


def default_catalog(provider: str) -> Catalog:
    regions = {
        "east-1": Region("east-1", 39.0, -77.5, ("east-1a", "east-1b", "east-1c"), "US East"),
        "west-1": Region("west-1", 45.6, -121.2, ("west-1a", "west-1b"), "US West"),
        "eu-1": Region("eu-1", 50.1, 8.7, ("eu-1a", "eu-1b"), "Europe"),
        "ap-1": Region("ap-1", 35.7, 139.7, ("ap-1a",), "Asia Pacific"),
    }
    factor = {"east-1": 1.0, "west-1": 1.05, "eu-1": 1.12, "ap-1": 1.2}

    def priced(base: float, only: tuple[str, ...] = ()) -> dict[str, float]:
        return {r: round(base * f, 4) for r, f in factor.items() if not only or r in only}

    big = ("east-1", "eu-1")
    sizes = {
        "small": Size("small", 1, 1.0, priced(0.0104)),
        "medium": Size("medium", 2, 4.0, priced(0.0416)),
        "large": Size("large", 4, 16.0, priced(0.1664)),
        "xlarge": Size("xlarge", 8, 32.0, priced(0.3328, big), regions=big),
        "compute": Size("compute", 4, 8.0, priced(0.17)),
    }
    images = {
        "ubuntu-24.04": Image("ubuntu-24.04", "sim-img-ubuntu-2404"),
        "debian-12": Image("debian-12", "sim-img-debian-12"),
    }
    return Catalog(provider=provider, regions=regions, sizes=sizes, images=images)


@dataclass
class SimStats:
    """Every API call the sim answered (throttled ones included)."""

    calls: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    concurrent: int = 0
    max_concurrent: int = 0
    # (time, op, region) of every call, for calls-per-second checks.
    log: list[tuple[float, str, str]] = field(default_factory=list)
    launches: Counter[str] = field(default_factory=Counter)  # VMs created per name
    boots: int = 0
    boot_errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def max_in_window(self, window: float = 1.0, *, region: str | None = None) -> int:
        """The most calls started within any ``window`` seconds."""
        times = sorted(t for t, _, r in self.log if region is None or r == region)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


@dataclass
class _Bucket:
    rate: float
    size: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.size, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0 - 1e-9:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _VM:
    id: str
    name: str
    placement: Placement
    size: str
    image: str
    user_data: str
    tags: dict[str, str]
    state: InstanceState
    launched_at: float
    boot_s: float
    private_ip: str
    public_ip: str
    terminated_at: float = 0.0
    halt: Halt | None = None
    task: asyncio.Task[None] | None = None

    def view(self) -> Instance:
        return Instance(id=self.id, name=self.name, placement=self.placement, state=self.state,
                        size=self.size, image=self.image, private_ip=self.private_ip,
                        public_ip=self.public_ip, tags=dict(self.tags),
                        launched_at=self.launched_at,
                        extra={"boot_s": f"{self.boot_s:.3f}"})


class SimProvider:
    """A simulated cloud. An async context manager: leaving it halts every booted agent."""

    def __init__(
        self,
        settings: SimSettings | None = None,
        *,
        name: str = "sim",
        boot: BootFn | None = None,
        hook: Hook | None = None,
        catalog: Catalog | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings or SimSettings()
        self._name = name
        self._catalog = catalog or default_catalog(name)
        self.boot = boot
        self.hook = hook
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(self.settings.seed)
        self.stats = SimStats()
        self.vms: dict[str, _VM] = {}
        self.networks: dict[tuple[str, str], Network] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._rule_hits: Counter[int] = Counter()
        self._rule_fired: Counter[int] = Counter()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_boot: set[asyncio.Task[object]] = set()
        self.credentials_ok = True

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> SimProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._in_boot:  # agents being started: let them finish, then halt them
            await asyncio.wait(set(self._in_boot), timeout=30)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        halts = [vm.halt for vm in self.vms.values() if vm.halt is not None]
        for vm in self.vms.values():
            vm.halt = None
        await asyncio.gather(*(h() for h in halts), return_exceptions=True)

    # -- the contract ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def catalog(self) -> Catalog:
        return self._catalog

    async def ensure_network(self, request: NetworkRequest) -> Network:
        async with self._call("ensure_network", request.region):
            self._region(request.region)
            key = (request.infra, request.region)
            net = self.networks.get(key)
            if net is None:
                n = next(self._ids)
                net = Network(id=f"net-{n}", region=request.region, cidr=request.cidr,
                              subnet_id=f"subnet-{n}", firewall_id=f"fw-{n}",
                              extra={"udp": str(request.wireguard_port)})
                self.networks[key] = net
            return net

    async def run_instances(
        self, placement: Placement, network: Network, requests: Sequence[LaunchRequest]
    ) -> list[Instance]:
        async with self._call("run_instances", placement.region, placement.zone):
            region = self._region(placement.region)
            if placement.zone and placement.zone not in region.zones:
                raise InvalidRequestError(f"no zone {placement.zone} in {placement.region}",
                                          provider=self.name, region=placement.region)
            if len(requests) > self.settings.max_batch:
                raise InvalidRequestError(
                    f"at most {self.settings.max_batch} instances per call, "
                    f"asked {len(requests)}", provider=self.name, region=placement.region)
            out: list[Instance] = []
            new: list[LaunchRequest] = []
            for req in requests:
                existing = self._by_name(req.name, req.tags) if (
                    self.settings.idempotent_names) else None
                if existing is not None:
                    out.append(existing.view())
                else:
                    new.append(req)
            for req in new:
                size = self._catalog.sizes.get(req.size)
                if size is None or not size.offered_in(placement.region):
                    raise InvalidRequestError(f"size {req.size} not offered in "
                                              f"{placement.region}", provider=self.name,
                                              region=placement.region, code="InvalidSize")
                if req.image not in {i.id for i in self._catalog.images.values()}:
                    raise InvalidRequestError(f"unknown image {req.image}", provider=self.name,
                                              region=placement.region, code="InvalidImage")
            self._check_capacity(placement, len(new))
            for req in new:
                out.append(self._launch(placement, req).view())
            return out

    async def query_instances(
        self, tags: Mapping[str, str], *, region: str | None = None
    ) -> list[Instance]:
        async with self._call("query_instances", region or ""):
            now = self._clock()
            out = []
            for vm in list(self.vms.values()):
                if vm.state is InstanceState.TERMINATED and (
                        now - vm.terminated_at >= self.settings.gone_after):
                    del self.vms[vm.id]
                    continue
                if region is not None and vm.placement.region != region:
                    continue
                if all(vm.tags.get(k) == v for k, v in tags.items()):
                    out.append(vm.view())
            return out

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        async with self._call("stop_instances", region):
            for vm in self._vms(region, ids):
                if vm.state in (InstanceState.RUNNING, InstanceState.PENDING):
                    self._cancel(vm)
                    vm.state = InstanceState.STOPPING
                    self._spawn(self._stop(vm))

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        async with self._call("start_instances", region):
            for vm in self._vms(region, ids):
                if vm.state is InstanceState.STOPPED:
                    vm.state = InstanceState.PENDING
                    vm.task = self._spawn(self._boot(vm))

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        async with self._call("reboot_instances", region):
            for vm in self._vms(region, ids):
                if vm.state is InstanceState.RUNNING:
                    self._cancel(vm)
                    vm.task = self._spawn(self._boot(vm, halt_first=True))

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        async with self._call("terminate_instances", region):
            for vm in self._vms(region, ids):
                if vm.state in (InstanceState.TERMINATING, InstanceState.TERMINATED):
                    continue
                self._cancel(vm)
                vm.state = InstanceState.TERMINATING
                self._spawn(self._terminate(vm))

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        async with self._call("cleanup", region):
            infra = tags.get("barista-infra", "")
            in_use = any(vm.tags.get("barista-infra") == infra and vm.placement.region == region
                         and vm.state is not InstanceState.TERMINATED
                         for vm in self.vms.values())
            if not in_use:
                self.networks.pop((infra, region), None)

    # -- the simulation --------------------------------------------------------------

    def live(self) -> list[Instance]:
        """Every VM not terminated (a test's view of what the cloud bills)."""
        return [vm.view() for vm in self.vms.values()
                if vm.state not in (InstanceState.TERMINATED, InstanceState.TERMINATING)]

    def _region(self, name: str) -> Region:
        region = self._catalog.regions.get(name)
        if region is None:
            raise InvalidRequestError(f"unknown region {name}", provider=self.name, region=name,
                                      code="InvalidRegion")
        return region

    def _by_name(self, name: str, tags: Mapping[str, str]) -> _VM | None:
        infra = tags.get("barista-infra")
        for vm in self.vms.values():
            if vm.name == name and vm.tags.get("barista-infra") == infra and vm.state not in (
                    InstanceState.TERMINATING, InstanceState.TERMINATED):
                return vm
        return None

    def _vms(self, region: str, ids: Sequence[str]) -> list[_VM]:
        out = []
        for vm_id in ids:
            vm = self.vms.get(vm_id)
            if vm is None or vm.placement.region != region:
                raise NotFoundError(f"no instance {vm_id} in {region}", provider=self.name,
                                    region=region, code="InvalidInstanceID.NotFound")
            out.append(vm)
        return out

    def _check_capacity(self, placement: Placement, n: int) -> None:
        caps = self.settings.capacity
        for key, scope in ((f"{placement.region}/{placement.zone}", "zone"),
                           (placement.region, "region")):
            if key not in caps:
                continue
            used = sum(1 for vm in self.vms.values()
                       if vm.state not in (InstanceState.TERMINATED, InstanceState.TERMINATING)
                       and (vm.placement.region == placement.region and (
                           scope == "region" or vm.placement.zone == placement.zone)))
            if used + n > caps[key]:
                raise CapacityError(
                    f"insufficient capacity in {key} ({caps[key] - used} left, asked {n})",
                    provider=self.name, region=placement.region, zone=placement.zone,
                    code="InsufficientInstanceCapacity",
                    scope="zone" if scope == "zone" else "region")

    def _launch(self, placement: Placement, req: LaunchRequest) -> _VM:
        n = next(self._ids)
        s = self.settings
        boot_s = max(0.0, s.boot_time + self._rng.uniform(-s.boot_jitter, s.boot_jitter))
        vm = _VM(id=f"i-{self.name}-{n:06d}", name=req.name, placement=placement, size=req.size,
                 image=req.image, user_data=req.user_data, tags=dict(req.tags),
                 state=InstanceState.PENDING, launched_at=self._clock(), boot_s=boot_s,
                 private_ip=f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}",
                 public_ip=f"198.18.{(n >> 8) & 255}.{n & 255}" if s.public_ip else "")
        self.vms[vm.id] = vm
        self.stats.launches[req.name] += 1
        vm.task = self._spawn(self._boot(vm))
        return vm

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel(self, vm: _VM) -> None:
        if vm.task is not None and not vm.task.done() and vm.task is not asyncio.current_task():
            vm.task.cancel()
        vm.task = None

    async def _halt(self, vm: _VM) -> None:
        halt, vm.halt = vm.halt, None
        if halt is not None:
            try:
                await halt()
            except Exception:
                log.exception("sim %s: halting the agent of %s failed", self.name, vm.name)

    async def _boot(self, vm: _VM, *, halt_first: bool = False) -> None:
        if halt_first:
            await self._halt(vm)
        await self._sleep(vm.boot_s)
        vm.state = InstanceState.RUNNING
        self.stats.boots += 1
        if self.boot is None:
            return
        try:
            config = read_user_data(vm.user_data)
        except ValueError as exc:
            self.stats.boot_errors.append(f"{vm.name}: {exc}")
            return
        # From here the boot is not cancelled (an agent half started would leak): a stop or
        # terminate meanwhile halts it as soon as it is up.
        vm.task = None
        me = asyncio.current_task()
        if me is not None:
            self._in_boot.add(me)
        try:
            halt = await self.boot(config, vm.view())
        except Exception as exc:
            self.stats.boot_errors.append(f"{vm.name}: {type(exc).__name__}: {exc}")
            log.warning("sim %s: boot of %s failed: %s", self.name, vm.name, exc)
            return
        finally:
            if me is not None:
                self._in_boot.discard(me)
        vm.halt = halt
        if vm.state is not InstanceState.RUNNING:
            await self._halt(vm)

    async def _stop(self, vm: _VM) -> None:
        await self._halt(vm)
        await self._sleep(self.settings.stop_time)
        if vm.state is InstanceState.STOPPING:
            vm.state = InstanceState.STOPPED

    async def _terminate(self, vm: _VM) -> None:
        await self._halt(vm)
        await self._sleep(self.settings.terminate_time)
        vm.state = InstanceState.TERMINATED
        vm.terminated_at = self._clock()

    # -- one API call: count, rate limit, failures, latency ---------------------------

    def _call(self, op: Op, region: str, zone: str = "") -> _Call:
        return _Call(self, op, region, zone)

    def _admit(self, op: Op, region: str, zone: str) -> None:
        now = self._clock()
        st = self.stats
        st.calls[op] += 1
        st.log.append((now, op, region))
        if not self.credentials_ok:
            raise CredentialsError("the access key was refused (AuthFailure)",
                                   provider=self.name, code="AuthFailure")
        s = self.settings
        if s.rate > 0:
            key = region if s.rate_scope == "region" else ""
            size = float(s.burst or max(1, int(s.rate)))
            bucket = self._buckets.setdefault(key, _Bucket(s.rate, size, size, now))
            if not bucket.take(now):
                st.throttled += 1
                raise TransientError("throttled: request rate exceeded", provider=self.name,
                                     region=region, code="RequestLimitExceeded")
        for i, rule in enumerate(s.failures):
            if rule.op != op or (rule.region and rule.region != region) or (
                    rule.zone and rule.zone != zone):
                continue
            self._rule_hits[i] += 1
            if self._rule_hits[i] <= rule.after:
                continue
            if rule.times and self._rule_fired[i] >= rule.times:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            self._rule_fired[i] += 1
            raise _error(rule, provider=self.name, region=region, zone=zone)

    def _latency(self) -> float:
        s = self.settings
        return self._rng.uniform(s.latency_min, max(s.latency_min, s.latency_max))


def _error(rule: FailureRule, *, provider: str, region: str, zone: str) -> ProvisionError:
    types: dict[str, type[ProvisionError]] = {
        "transient": TransientError, "capacity": CapacityError, "quota": QuotaError,
        "credentials": CredentialsError, "invalid": InvalidRequestError}
    return types[rule.error](rule.message, provider=provider, region=region, zone=zone,
                             code=f"Sim.{rule.error}")


class _Call:
    """One API call: admitted (counted, rate-limited, maybe failed) on entry, half the
    latency before its effect and half after, so a caller cancelled mid-call may or may
    not have had its effect — like a real cloud."""

    def __init__(self, sim: SimProvider, op: Op, region: str, zone: str) -> None:
        self.sim, self.op, self.region, self.zone = sim, op, region, zone
        self.latency = 0.0

    async def __aenter__(self) -> None:
        sim = self.sim
        st = sim.stats
        st.concurrent += 1
        st.max_concurrent = max(st.max_concurrent, st.concurrent)
        try:
            sim._admit(self.op, self.region, self.zone)
            self.latency = sim._latency()
            if sim.hook is not None:
                await sim.hook("before", self.op)
            if self.latency:
                await sim._sleep(self.latency / 2)
        except BaseException:
            st.concurrent -= 1
            raise

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        sim = self.sim
        try:
            if exc_type is None:
                if sim.hook is not None:
                    await sim.hook("after", self.op)
                if self.latency:
                    await sim._sleep(self.latency / 2)
        finally:
            sim.stats.concurrent -= 1
