"""Google Compute Engine behind the provider contract (google-cloud-compute, REST transport).

One VPC network per infra (``barista-<infra>``, custom subnets), a subnet per region, a
firewall rule opening the WireGuard UDP port to the instances' network tag (SSH only when
asked). Instances carry our tags as GCP labels, get the rendered cloud-init as the
``user-data`` metadata item (read by cloud-init's GCE datasource) and an external IP.
Long-running operations are waited on through the zone/region/global operations clients
(``operation.result()`` polls the public endpoint whatever the client was given).
Calls are synchronous in the SDK and run in the worker threads of the provider's
``RequestMeter``, which keeps every request within ``API_LIMITS``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
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
from controller.provision.limits import ApiLimits, RequestMeter, gather_all, gather_launches
from controller.provision.refresh import Fetched, Progress

log = logging.getLogger("barista.controller.provision.gcp")

NAME = "gcp"

# Compute Engine rate quotas are per project and per minute ("Compute Engine rate
# quotas", cloud.google.com/compute/api-quota): the "Queries" group (mutation methods,
# compute.googleapis.com/default) and "Read requests" (*.get) default to 1,500 requests per
# minute each, 403 rateLimitExceeded beyond. One bucket for the project at 1500/60 = 25/s,
# bursts of 25 (not the whole minute's 1,500: the quota window is not aligned with ours).
API_LIMITS = ApiLimits(rate=25.0, burst=25, concurrency=8, batch=50)

# Instance.status -> ours. GCP's "TERMINATED" is a stopped VM (it can be started again);
# a deleted instance is simply gone (404 / absent from lists).
STATE_MAP: Mapping[str, InstanceState] = {
    "PROVISIONING": InstanceState.PENDING,
    "STAGING": InstanceState.PENDING,
    "RUNNING": InstanceState.RUNNING,
    "STOPPING": InstanceState.STOPPING,
    "SUSPENDING": InstanceState.STOPPING,
    "TERMINATED": InstanceState.STOPPED,
    "SUSPENDED": InstanceState.STOPPED,
    "REPAIRING": InstanceState.UNKNOWN,
}

# Operation error codes (Compute Engine "Troubleshooting" / error reference) -> contract.
OPERATION_ERRORS: Mapping[str, type[ProvisionError]] = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": CapacityError,
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": CapacityError,
    "RESOURCE_POOL_EXHAUSTED": CapacityError,
    "QUOTA_EXCEEDED": QuotaError,
    "RATE_LIMIT_EXCEEDED": TransientError,
    "RESOURCE_NOT_READY": TransientError,
    "INTERNAL_ERROR": TransientError,
    "RESOURCE_NOT_FOUND": NotFoundError,
    "PERMISSION_DENIED": CredentialsError,
}

# HTTP error reasons (``error.errors[].reason``) that refine the status code.
REASONS: Mapping[str, type[ProvisionError]] = {
    "quotaExceeded": QuotaError,
    "rateLimitExceeded": TransientError,
    "userRateLimitExceeded": TransientError,
    "resourceNotReady": TransientError,
    "backendError": TransientError,
    "forbidden": CredentialsError,
    "accessNotConfigured": CredentialsError,
    "insufficientPermissions": CredentialsError,
    "notFound": NotFoundError,
}

_STATUS: Mapping[int, type[ProvisionError]] = {
    400: InvalidRequestError, 401: CredentialsError, 403: CredentialsError,
    404: NotFoundError, 429: TransientError, 500: TransientError, 502: TransientError,
    503: TransientError, 504: TransientError,
}


def map_error(exc: Exception, *, region: str = "", zone: str = "") -> ProvisionError:
    """A google-api-core / google-auth exception as the contract's typed error."""
    from google.api_core import exceptions as gx
    from google.auth import exceptions as ax

    if isinstance(exc, gx.GoogleAPICallError):
        reasons = [str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, dict)]
        if not reasons and getattr(exc, "reason", None):
            reasons = [str(exc.reason)]
        kind = next((REASONS[r] for r in reasons if r in REASONS), None)
        if kind is None:
            kind = _STATUS.get(int(exc.code or 0), InvalidRequestError)
        code = reasons[0] if reasons else str(exc.code)
        return kind(f"gcp: {exc.message}", provider=NAME, region=region, zone=zone, code=code)
    if isinstance(exc, ax.DefaultCredentialsError):
        return CredentialsError(
            "gcp: no application default credentials (run `gcloud auth application-default "
            "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file)",
            provider=NAME, region=region, code="DefaultCredentialsError")
    if isinstance(exc, ax.RefreshError):
        return CredentialsError(f"gcp: credentials refused: {exc}", provider=NAME,
                                region=region, code="RefreshError")
    if isinstance(exc, ax.TransportError | ConnectionError | TimeoutError):
        return TransientError(f"gcp: {exc}", provider=NAME, region=region, zone=zone,
                              code=type(exc).__name__)
    return TransientError(f"gcp: unexpected {type(exc).__name__}: {exc}", provider=NAME,
                          region=region, zone=zone, code=type(exc).__name__)


def operation_error(op: Any, *, region: str, zone: str = "") -> ProvisionError | None:
    """The typed error of a finished operation, or None when it succeeded."""
    errors = list(op.error.errors) if op.error and op.error.errors else []
    if not errors:
        return None
    first = errors[0]
    kind = OPERATION_ERRORS.get(first.code, InvalidRequestError)
    return kind(f"gcp: {first.message or first.code}", provider=NAME, region=region,
                zone=zone, code=first.code)


@dataclass(frozen=True)
class GcpSettings:
    project: str
    # Tests: "http://127.0.0.1:PORT" (a fake of the REST API) with anonymous credentials.
    api_endpoint: str | None = None
    credentials_file: str = ""  # a service-account key; "" = application default
    anonymous: bool = False
    # Image name -> image URL (a family resolves to its newest image).
    images: Mapping[str, str] = field(default_factory=lambda: {
        "ubuntu-24.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
        "ubuntu-22.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts",
    })
    disk_gb: int = 20
    operation_timeout: float = 300.0


def _label_filter(tags: Mapping[str, str]) -> str:
    """GCE list filter: each expression in parentheses, all must hold."""
    return " ".join(f'(labels.{k} = "{v}")' for k, v in sorted(tags.items()))


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def request_id(name: str, tags: Mapping[str, str], zone: str) -> str:
    """GCE's idempotency key (a UUID): the same insert retried is done once. The zone is
    part of it: GCE answers a repeated id with the first operation, failed or not, so a
    failover to another zone must be a new request."""
    seed = f"barista/{tags.get(TAG_MANAGED, '')}/{tags.get(TAG_INFRA, '')}/{name}/{zone}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, seed))


_NAME_OK = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class GcpProvider:
    def __init__(self, *, settings: GcpSettings, catalog: Catalog,
                 credentials_factory: Callable[[], Any] | None = None,
                 limits: ApiLimits = API_LIMITS) -> None:
        self.api_limits = limits
        self._meter = RequestMeter(limits, name=NAME)
        self._settings = settings
        self._catalog = self._shipped = catalog
        self._credentials_factory = credentials_factory
        self._clients: dict[str, Any] = {}
        # network name -> its firewall rules' operations being waited on, and the request
        # that made them (to make them again when one failed).
        self._firewalls: dict[str, tuple[asyncio.Task[None], NetworkRequest]] = {}

    @property
    def name(self) -> str:
        return NAME

    def catalog(self) -> Catalog:
        return self._catalog

    def shipped_catalog(self) -> Catalog:
        return self._shipped

    def use_catalog(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def fetch_catalog(self, progress: Progress) -> Fetched:
        from controller.provision.providers import gcp_catalog

        return await gcp_catalog.fetch(self._list, self._settings.project,
                                       sorted(self._shipped.regions), progress)

    async def _list(self, kind: str, op: str, **kwargs: Any) -> list[Any]:
        """A listing call with its pages followed, in the worker thread (no SDK retries:
        a failure is the caller's to retry)."""
        def run() -> list[Any]:
            return list(getattr(self._client(kind), op)(retry=None, timeout=60, **kwargs))

        try:
            return await asyncio.to_thread(run)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc) from None

    # -- plumbing ----------------------------------------------------------------------

    def _credentials(self) -> Any:
        if self._credentials_factory is not None:
            return self._credentials_factory()
        if self._settings.anonymous:
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()  # type: ignore[no-untyped-call]
        if self._settings.credentials_file:
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                self._settings.credentials_file,
                scopes=["https://www.googleapis.com/auth/compute"])
        import google.auth

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/compute"])
        return creds

    def _client(self, kind: str) -> Any:
        c = self._clients.get(kind)
        if c is None:
            from google.api_core.client_options import ClientOptions
            from google.cloud import compute_v1

            opts = ClientOptions(api_endpoint=self._settings.api_endpoint) \
                if self._settings.api_endpoint else None
            c = getattr(compute_v1, kind)(transport="rest", client_options=opts,
                                          credentials=self._credentials())
            self._clients[kind] = c
        return c

    async def _call(self, kind: str, op: str, *, region: str = "", zone: str = "",
                    **kwargs: Any) -> Any:
        def run() -> Any:
            return getattr(self._client(kind), op)(**kwargs)

        try:
            return await self._meter.run(region, run)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc, region=region, zone=zone) from None

    async def _wait(self, op: Any, *, region: str = "", zone: str = "") -> None:
        """Wait for a long-running operation through the operations client."""
        from google.cloud import compute_v1

        project = self._settings.project
        deadline = asyncio.get_running_loop().time() + self._settings.operation_timeout
        while True:
            if zone:
                done = await self._call(
                    "ZoneOperationsClient", "wait", region=region, zone=zone,
                    request=compute_v1.WaitZoneOperationRequest(
                        project=project, zone=zone, operation=op.name))
            elif region:
                done = await self._call(
                    "RegionOperationsClient", "wait", region=region,
                    request=compute_v1.WaitRegionOperationRequest(
                        project=project, region=region, operation=op.name))
            else:
                done = await self._call(
                    "GlobalOperationsClient", "wait",
                    request=compute_v1.WaitGlobalOperationRequest(
                        project=project, operation=op.name))
            if done.status == compute_v1.Operation.Status.DONE:
                err = operation_error(done, region=region, zone=zone)
                if err is not None:
                    raise err
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TransientError(f"gcp: operation {op.name} not done after "
                                     f"{self._settings.operation_timeout:.0f} s",
                                     provider=NAME, region=region, zone=zone, code="TIMEOUT")

    # -- network -----------------------------------------------------------------------

    def _net_name(self, infra: str) -> str:
        return f"barista-{infra}"

    def _subnet_cidr(self, cidr: str, region: str) -> str:
        """A /20 of the infra's range per region, stable by the region's catalog order."""
        net = ipaddress.ip_network(cidr)
        prefix = max(net.prefixlen, min(20, net.prefixlen + 4))
        regions = sorted(self._catalog.regions)
        idx = regions.index(region) if region in regions else 0
        subnets = list(net.subnets(new_prefix=prefix))
        if idx >= len(subnets):
            raise QuotaError(f"gcp: {cidr} has no room for a subnet in {region}",
                             provider=NAME, region=region)
        return str(subnets[idx])

    async def _insert_resource(self, kind: str, request: Any, *, region: str = "",
                               wait_region: str = "") -> None:
        """Insert a resource and wait for its operation; one that exists already (409
        alreadyExists: made by an earlier pass, or by one killed before its wait) is
        taken as it is. Inserting first, not a get then an insert, saves a round trip on
        the critical path of a new infra and costs the same request on a re-run."""
        try:
            op = await self._call(kind, "insert", region=region, request=request)
        except InvalidRequestError as exc:
            if exc.code == "alreadyExists":
                return
            raise
        await self._wait(op, region=wait_region)

    async def ensure_network(self, request: NetworkRequest) -> Network:
        from google.cloud import compute_v1

        p, region = self._settings.project, request.region
        name = self._net_name(request.infra)
        if not _NAME_OK.match(name):
            raise InvalidRequestError(f"gcp: {name!r} is not a valid resource name",
                                      provider=NAME, region=region)
        # The subnet and the firewall rules need the network done (GCE answers
        # resourceNotReady before): network, then both side by side. Instances refer to
        # the subnet, not to the rules (they match by network tag): the network is
        # returned once the subnet is done and the rules' inserts were accepted; their
        # operations are waited on behind (``_firewalls``), by every launch in it too.
        await self._insert_resource("NetworksClient", compute_v1.InsertNetworkRequest(
            project=p, network_resource=compute_v1.Network(
                name=name, auto_create_subnetworks=False,
                description=f"barista infra {request.infra}")), region=region)
        sub_name = f"{name}-{region}"
        cidr = self._subnet_cidr(request.cidr, region)

        async def subnet() -> None:
            await self._insert_resource("SubnetworksClient", compute_v1.InsertSubnetworkRequest(
                project=p, region=region, subnetwork_resource=compute_v1.Subnetwork(
                    name=sub_name, ip_cidr_range=cidr,
                    network=f"projects/{p}/global/networks/{name}")),
                region=region, wait_region=region)

        await gather_all(self._start_firewalls(name, request), subnet())
        return Network(id=name, region=region, cidr=cidr, subnet_id=sub_name,
                       firewall_id=f"{name}-wg", extra={"infra": request.infra})

    async def _start_firewalls(self, network: str, request: NetworkRequest) -> None:
        """Insert the network's firewall rules (WireGuard; SSH when asked) and leave their
        operations waited on in ``_firewalls[network]``. Rules whose operations are still
        in flight are kept; otherwise they are inserted again (409 alreadyExists: there;
        one removed since, or whose operation failed, is made again)."""
        running = self._firewalls.get(network)
        if running is not None and not running[0].done():
            return
        region = request.region
        rules = [(f"{network}-wg", "udp", request.wireguard_port, ["0.0.0.0/0"])]
        if request.ssh_from:
            rules.append((f"{network}-ssh", "tcp", 22, list(request.ssh_from)))
        ops = await gather_all(*(self._insert_firewall(n, network, proto, port, src, region)
                                 for n, proto, port, src in rules))

        async def wait() -> None:
            try:
                await gather_all(*(self._wait(op) for op in ops if op is not None))
            except ProvisionError as exc:
                log.error("gcp: firewall rules of network %s failed: %s", network,
                          exc.message)
                raise

        task = asyncio.ensure_future(wait())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read: logged
        self._firewalls[network] = (task, request)

    async def _insert_firewall(self, fw_name: str, network: str, proto: str, port: int,
                               sources: list[str], region: str) -> Any:
        """The insert's operation, or None when the rule exists (409 alreadyExists)."""
        from google.cloud import compute_v1

        p = self._settings.project
        try:
            return await self._call("FirewallsClient", "insert", region=region,
                                    request=compute_v1.InsertFirewallRequest(
                project=p, firewall_resource=compute_v1.Firewall(
                    name=fw_name, network=f"projects/{p}/global/networks/{network}",
                    direction="INGRESS",
                    allowed=[compute_v1.Allowed(I_p_protocol=proto, ports=[str(port)])],
                    source_ranges=sources, target_tags=[network])))
        except InvalidRequestError as exc:
            if exc.code == "alreadyExists":
                return None
            raise

    async def _firewalls_done(self, network: Network) -> None:
        """Wait for the network's firewall operations; one that failed is inserted again
        (once), and its error raised when that fails too. Firewall rules are global
        resources of the project: a quota or capacity error blocks the whole provider
        (no failover to a region whose launches would need the same rules)."""
        for attempt in (0, 1):
            held = self._firewalls.get(network.id)
            if held is None:
                return  # made before this provider started (or by another one)
            task, request = held
            await asyncio.wait([task])  # (shared: not cancelled with this wait)
            exc = None if task.cancelled() else task.exception()
            if not task.cancelled() and exc is None:
                return
            if attempt == 0:
                await self._start_firewalls(network.id, request)
                continue
            if not isinstance(exc, ProvisionError):
                raise TransientError(f"gcp: firewall rules of network {network.id} not "
                                     "waited on", provider=NAME, region=network.region)
            raise type(exc)(f"gcp: firewall rules of network {network.id}: {exc.message}",
                            provider=NAME, region=network.region, code=exc.code,
                            scope="provider") from None

    # -- instances ---------------------------------------------------------------------

    async def run_instances(self, placement: Placement, network: Network,
                            requests: Sequence[LaunchRequest]) -> list[Instance]:
        region = placement.region
        zone = placement.zone or f"{region}-a"
        for req in requests:
            if not _NAME_OK.match(req.name):
                raise InvalidRequestError(f"gcp: {req.name!r} is not a valid instance name",
                                          provider=NAME, region=region, zone=zone)
        # Inserted straight away, not after a list of what exists: an insert is idempotent
        # (its request id; a name the zone has already is 409 alreadyExists, taken as
        # made), which keeps a round trip off the first launches' path. One list for the
        # batch then (not a get per name) returns what carries our tags.
        tags = {k: v for k, v in requests[0].tags.items()  # what the batch shares
                if all(r.tags.get(k) == v for r in requests)} if requests else {}
        # The network's firewall rules are waited on beside the launches (the instances
        # match them by network tag, they need not exist first); when they failed, the
        # batch fails with their error once its launches were answered. Its VMs exist: a
        # retry (the engine's, on a transient error) finds them (409, same request id).
        firewalls = asyncio.ensure_future(self._firewalls_done(network))
        try:
            async def launch(req: LaunchRequest) -> list[str]:
                try:
                    await self._insert(req, zone=zone, region=region, network=network)
                except InvalidRequestError as exc:
                    if exc.code != "alreadyExists":
                        raise
                return [req.name]

            made = gather_launches(await asyncio.gather(*(launch(r) for r in requests),
                                                        return_exceptions=True))
            existing = await self._in_zone(zone, region, tags, made) if made else {}
        except BaseException:
            firewalls.cancel()  # the rules' own wait goes on (shielded)
            await asyncio.wait([firewalls])
            if not firewalls.cancelled():
                firewalls.exception()  # the launches' error is the one raised
            raise
        await firewalls
        return [existing[r.name] for r in requests if r.name in existing]

    async def _in_zone(self, zone: str, region: str, tags: Mapping[str, str],
                       names: Sequence[str]) -> dict[str, Instance]:
        """The instances named ``names`` in ``zone`` carrying ``tags``, by name (one list
        request a page)."""
        from google.cloud import compute_v1

        wanted = set(names)
        pages = await self._call("InstancesClient", "list", region=region, zone=zone,
                                 request=compute_v1.ListInstancesRequest(
                                     project=self._settings.project, zone=zone,
                                     filter=_label_filter(tags)))

        def collect() -> list[Any]:
            return [r for r in pages if r.name in wanted]

        try:
            raws = await self._meter.run(region, collect)
        except Exception as exc:
            raise map_error(exc, region=region, zone=zone) from None
        return {r.name: self._instance(r) for r in raws}

    async def _insert(self, req: LaunchRequest, *, zone: str, region: str,
                      network: Network) -> None:
        from google.cloud import compute_v1

        p = self._settings.project
        image = self._settings.images.get(req.image, req.image if "/" in req.image else "")
        if not image:
            raise InvalidRequestError(
                f"gcp: unknown image {req.image!r} (known: "
                f"{', '.join(sorted(self._settings.images))}, or give an image URL)",
                provider=NAME, region=region, zone=zone)
        labels = {**req.tags, TAG_NODE: req.name}
        inst = compute_v1.Instance(
            name=req.name,
            machine_type=f"zones/{zone}/machineTypes/{req.size}",
            labels=labels,
            tags=compute_v1.Tags(items=[network.id]),
            metadata=compute_v1.Metadata(items=[
                compute_v1.Items(key="user-data", value=req.user_data)]),
            disks=[compute_v1.AttachedDisk(
                boot=True, auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=image, disk_size_gb=self._settings.disk_gb,
                    labels=labels))],
            network_interfaces=[compute_v1.NetworkInterface(
                network=f"projects/{p}/global/networks/{network.id}",
                subnetwork=f"projects/{p}/regions/{region}/subnetworks/{network.subnet_id}",
                access_configs=[compute_v1.AccessConfig(name="External NAT",
                                                        type_="ONE_TO_ONE_NAT")])],
            shielded_instance_config=compute_v1.ShieldedInstanceConfig(
                enable_secure_boot=True),
        )
        op = await self._call("InstancesClient", "insert", region=region, zone=zone,
                              request=compute_v1.InsertInstanceRequest(
                                  project=p, zone=zone, instance_resource=inst,
                                  request_id=request_id(req.name, req.tags, zone)))
        await self._wait(op, region=region, zone=zone)

    def _instance(self, raw: Any) -> Instance:
        zone = _last(raw.zone) if raw.zone else ""
        region = zone.rsplit("-", 1)[0] if zone else ""
        nic = raw.network_interfaces[0] if raw.network_interfaces else None
        public = ""
        if nic is not None and nic.access_configs:
            public = nic.access_configs[0].nat_i_p or ""
        return Instance(
            id=str(raw.id) if raw.id else raw.name,
            name=dict(raw.labels).get(TAG_NODE, raw.name),
            placement=Placement(NAME, region, zone),
            state=STATE_MAP.get(raw.status, InstanceState.UNKNOWN),
            size=_last(raw.machine_type) if raw.machine_type else "",
            private_ip=(nic.network_i_p if nic is not None else "") or "",
            public_ip=public,
            tags=dict(raw.labels),
            extra={"self_link": raw.self_link or "", "gce_name": raw.name},
        )

    async def query_instances(self, tags: Mapping[str, str], *,
                              region: str | None = None) -> list[Instance]:
        from google.cloud import compute_v1

        pages = await self._call(
            "InstancesClient", "aggregated_list", region=region or "",
            request=compute_v1.AggregatedListInstancesRequest(
                project=self._settings.project, filter=_label_filter(tags)))

        def collect() -> list[Any]:
            found = []
            for _scope, scoped in pages:  # iterating fetches further pages
                found.extend(scoped.instances)
            return found

        try:  # further pages are further requests: metered too
            raws = await self._meter.run(region or "", collect)
        except Exception as exc:
            raise map_error(exc, region=region or "") from None
        out = [self._instance(r) for r in raws]
        return [i for i in out if region is None or i.placement.region == region]

    async def _each(self, op: str, region: str, ids: Sequence[str]) -> None:
        """Run ``op`` (stop/start/reset/delete) on instances given by GCE name (the
        Instance.id we return is the numeric id; both are accepted)."""
        from google.cloud import compute_v1

        if not ids:
            return
        wanted = set(ids)
        known = [i for i in await self.query_instances({}, region=region)
                 if i.id in wanted or i.extra.get("gce_name") in wanted]
        missing = wanted - {i.id for i in known} - {i.extra.get("gce_name") for i in known}
        if missing and op != "delete":
            raise NotFoundError(f"gcp: no instance {sorted(missing)} in {region}",
                                provider=NAME, region=region, code="notFound")
        requests = {"stop": compute_v1.StopInstanceRequest,
                    "start": compute_v1.StartInstanceRequest,
                    "reset": compute_v1.ResetInstanceRequest,
                    "delete": compute_v1.DeleteInstanceRequest}
        async def one(inst: Instance) -> None:
            zone = inst.placement.zone
            op_ = await self._call("InstancesClient", op, region=region, zone=zone,
                                   request=requests[op](project=self._settings.project,
                                                        zone=zone,
                                                        instance=inst.extra["gce_name"]))
            await self._wait(op_, region=region, zone=zone)

        await asyncio.gather(*(one(i) for i in known))  # side by side, within the limits
        if missing:
            raise NotFoundError(f"gcp: no instance {sorted(missing)} in {region}",
                                provider=NAME, region=region, code="notFound")

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("stop", region, ids)

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("start", region, ids)

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("reset", region, ids)

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("delete", region, ids)

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        """Remove the infra's subnet in ``region``; the network and its firewall rules
        go with the last subnet. Kept while a VM still uses them."""
        from google.cloud import compute_v1

        infra = tags.get(TAG_INFRA, "")
        if not infra:
            raise InvalidRequestError("gcp: cleanup needs the infra tag", provider=NAME,
                                      region=region)
        p, name = self._settings.project, self._net_name(infra)
        live = await self.query_instances({TAG_INFRA: infra})
        if any(i.placement.region == region for i in live):
            log.warning("gcp: infra %s still has VMs in %s; network kept", infra, region)
            return
        sub = f"{name}-{region}"
        try:
            op = await self._call("SubnetworksClient", "delete", region=region,
                                  request=compute_v1.DeleteSubnetworkRequest(
                                      project=p, region=region, subnetwork=sub))
            await self._wait(op, region=region)
        except NotFoundError:
            pass
        if live:
            return
        left = await self._call("SubnetworksClient", "aggregated_list",
                                request=compute_v1.AggregatedListSubnetworksRequest(
                                    project=p, filter=f'(network = "https://www.googleapis.'
                                    f'com/compute/v1/projects/{p}/global/networks/{name}")'))

        def count() -> int:
            return sum(len(s.subnetworks) for _r, s in left)

        if await self._meter.run(region, count):
            return
        self._firewalls.pop(name, None)
        for fw in (f"{name}-wg", f"{name}-ssh"):
            try:
                await self._wait(await self._call("FirewallsClient", "delete", project=p,
                                                  firewall=fw))
            except NotFoundError:
                pass
        try:
            await self._wait(await self._call("NetworksClient", "delete", project=p,
                                              network=name))
        except NotFoundError:
            pass
        log.info("gcp: removed network %s", name)


# -- catalog ---------------------------------------------------------------------------

_REGIONS = (
    Region("us-central1", 41.26, -95.86, ("us-central1-a", "us-central1-b", "us-central1-c",
                                          "us-central1-f"), "Iowa"),
    Region("us-east1", 33.19, -80.01, ("us-east1-b", "us-east1-c", "us-east1-d"),
           "South Carolina"),
    Region("europe-west1", 50.45, 3.82, ("europe-west1-b", "europe-west1-c",
                                         "europe-west1-d"), "Belgium"),
    Region("europe-west4", 53.44, 6.84, ("europe-west4-a", "europe-west4-b",
                                         "europe-west4-c"), "Netherlands"),
    Region("asia-northeast3", 37.56, 126.98, ("asia-northeast3-a", "asia-northeast3-b",
                                              "asia-northeast3-c"), "Seoul"),
)

# Prices: controller/provision/providers/prices.py (data, with its sources).
_SIZES = (
    Size("e2-micro", 2, 1.0), Size("e2-small", 2, 2.0), Size("e2-medium", 2, 4.0),
    Size("e2-standard-2", 2, 8.0), Size("n2-standard-2", 2, 8.0),
    Size("t2a-standard-1", 1, 4.0, arch="arm64"),
)


def default_catalog() -> Catalog:
    from controller.provision.providers.prices import prices

    return Catalog(
        provider=NAME,
        regions={r.name: r for r in _REGIONS},
        sizes={s.name: Size(s.name, s.vcpus, s.memory_gb, prices(NAME, s.name), s.arch)
               for s in _SIZES},
        images={"ubuntu-24.04": Image("ubuntu-24.04", "projects/ubuntu-os-cloud/global/"
                                      "images/family/ubuntu-2404-lts-amd64"),
                "ubuntu-22.04": Image("ubuntu-22.04", "projects/ubuntu-os-cloud/global/"
                                      "images/family/ubuntu-2204-lts")},
    )
