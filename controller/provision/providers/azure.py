"""Azure Virtual Machines behind the provider contract (azure-mgmt-compute, -network,
-resource, azure-identity).

One resource group per infra and region (``barista-<infra>-<region>``) holding the VNet,
its subnet, the network security group (WireGuard UDP in; SSH only when asked) and, per
VM, a static public IP, a NIC and the VM itself with the cloud-init user-data as
``custom_data``. Every resource carries our tags. Long-running operations go through the
SDK's pollers (``polling_interval`` 0 in tests); the SDK's own retries are off (the engine
owns retries and rate limits). Calls are synchronous in the SDK and run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.provision.contract import (
    TAG_INFRA,
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
from controller.provision.refresh import Fetched, Progress

log = logging.getLogger("barista.controller.provision.azure")

NAME = "azure"
ADMIN_USER = "barista"

# instanceView PowerState/<x> -> ours; provisioningState overrides while creating/deleting.
POWER_MAP: Mapping[str, InstanceState] = {
    "starting": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "deallocating": InstanceState.STOPPING,
    "stopped": InstanceState.STOPPED,
    "deallocated": InstanceState.STOPPED,
}

# ARM error codes ("Troubleshoot common Azure deployment errors") -> contract.
ERROR_MAP: Mapping[str, type[ProvisionError]] = {
    "TooManyRequests": TransientError,
    "RetryableError": TransientError,
    "InternalServerError": TransientError,
    "ServiceUnavailable": TransientError,
    "InternalExecutionError": TransientError,
    "AllocationFailed": CapacityError,
    "ZonalAllocationFailed": CapacityError,
    "OverconstrainedAllocationRequest": CapacityError,
    "OverconstrainedZonalAllocationRequest": CapacityError,
    "SkuNotAvailable": CapacityError,
    "QuotaExceeded": QuotaError,
    "OperationNotAllowed": QuotaError,  # what ARM answers when a vCPU quota is reached
    "PublicIPCountLimitReached": QuotaError,
    "AuthenticationFailed": CredentialsError,
    "InvalidAuthenticationToken": CredentialsError,
    "InvalidAuthenticationTokenTenant": CredentialsError,
    "AuthorizationFailed": CredentialsError,
    "SubscriptionNotFound": CredentialsError,
    "ResourceNotFound": NotFoundError,
    "ResourceGroupNotFound": NotFoundError,
    "NotFound": NotFoundError,
}
_STATUS: Mapping[int, type[ProvisionError]] = {
    401: CredentialsError, 403: CredentialsError, 404: NotFoundError, 429: TransientError,
    500: TransientError, 502: TransientError, 503: TransientError, 504: TransientError,
}


def map_error(exc: Exception, *, region: str = "", zone: str = "") -> ProvisionError:
    """An azure-core / azure-identity exception as the contract's typed error."""
    from azure.core import exceptions as ax

    if isinstance(exc, ax.ClientAuthenticationError):
        return CredentialsError(
            f"azure: credentials refused or missing ({exc.message}); sign in with `az login`, "
            "or set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET (DefaultAzureCredential)",
            provider=NAME, region=region, code="ClientAuthenticationError")
    if isinstance(exc, ax.HttpResponseError):
        code = ""
        if exc.error is not None and exc.error.code:
            code = str(exc.error.code)
        kind = ERROR_MAP.get(code) or _STATUS.get(int(exc.status_code or 0),
                                                  InvalidRequestError)
        msg = exc.error.message if exc.error is not None and exc.error.message else exc.message
        return kind(f"azure: {msg}", provider=NAME, region=region, zone=zone,
                    code=code or str(exc.status_code))
    if isinstance(exc, ax.ServiceRequestError | ax.ServiceResponseError | ConnectionError |
                  TimeoutError):
        return TransientError(f"azure: {exc}", provider=NAME, region=region, zone=zone,
                              code=type(exc).__name__)
    try:
        from azure.identity import CredentialUnavailableError
    except ImportError:  # pragma: no cover - azure-identity is in the [azure] extra
        CredentialUnavailableError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, CredentialUnavailableError):
        return CredentialsError(
            "azure: no credentials found (sign in with `az login`, or set AZURE_CLIENT_ID, "
            "AZURE_TENANT_ID and AZURE_CLIENT_SECRET)", provider=NAME, region=region,
            code="CredentialUnavailableError")
    return TransientError(f"azure: unexpected {type(exc).__name__}: {exc}", provider=NAME,
                          region=region, zone=zone, code=type(exc).__name__)


@dataclass(frozen=True)
class AzureImage:
    publisher: str
    offer: str
    sku: str
    version: str = "latest"


@dataclass(frozen=True)
class AzureSettings:
    subscription_id: str
    base_url: str | None = None  # tests: https://127.0.0.1:PORT (a fake of ARM)
    connection_verify: str | bool = True  # a CA bundle path for the fake's certificate
    polling_interval: float | None = None  # tests: 0
    images: Mapping[str, AzureImage] = field(default_factory=lambda: {
        "ubuntu-24.04": AzureImage("Canonical", "ubuntu-24_04-lts", "server"),
        "ubuntu-22.04": AzureImage("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"),
    })
    # An OpenSSH public key for the admin user; "" = a throwaway key whose private half is
    # never kept (Azure requires one; nobody logs in: the agent is the way in).
    ssh_public_key: str = ""
    # `barista catalog refresh azure`: the public Retail Prices API ("" = prices not asked).
    prices_url: str = "https://prices.azure.com/api/retail/prices"


def _throwaway_ssh_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode() + " barista-unused"


_ID = re.compile(r"/resourceGroups/([^/]+)/providers/Microsoft\.Compute/virtualMachines/([^/]+)$",
                 re.IGNORECASE)


def _models(kind: str) -> Any:
    """An SDK's model classes. Typed as Any on purpose: newer azure-mgmt releases type
    their models with a ``properties=`` envelope, older ones only take the flattened
    keywords both accept at run time (what we use, and what the tests check is sent)."""
    import importlib

    return importlib.import_module({"compute": "azure.mgmt.compute.models",
                                    "network": "azure.mgmt.network.models",
                                    "resource": "azure.mgmt.resource.resources.models"}[kind])


def _zone_number(zone: str) -> str:
    """"eastus-2" -> "2" (Azure zones are numbers within a region)."""
    return zone.rsplit("-", 1)[-1] if zone else ""


class AzureProvider:
    def __init__(self, *, settings: AzureSettings, catalog: Catalog,
                 credential_factory: Callable[[], Any] | None = None) -> None:
        self._settings = settings
        self._catalog = self._shipped = catalog
        self._credential_factory = credential_factory
        self._clients: dict[str, Any] = {}
        self._ssh_key = settings.ssh_public_key

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
        from controller.provision.providers import azure_catalog

        url = self._settings.prices_url
        return await azure_catalog.fetch(
            self._list, self._arm_json, self._prices_json if url else None, url,
            self._settings.subscription_id, sorted(self._shipped.regions), progress)

    async def _list(self, kind: str, path: str, **kwargs: Any) -> list[Any]:
        """A paged listing, every page read in the worker thread."""
        def run() -> list[Any]:
            target: Any = self._client(kind)
            for part in path.split("."):
                target = getattr(target, part)
            return list(target(**kwargs))

        try:
            return await asyncio.to_thread(run)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc) from None

    async def _arm_json(self, url: str) -> Any:
        """GET an ARM path through the SDK's pipeline (its credential, retries off)."""
        def run() -> Any:
            from azure.core.rest import HttpRequest

            resp = self._client("compute").send_request(HttpRequest("GET", url))
            resp.raise_for_status()
            return resp.json()

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            raise map_error(exc) from None

    async def _prices_json(self, url: str) -> Any:
        """GET a Retail Prices page (public, no credentials)."""
        import aiohttp

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s, \
                    s.get(url) as resp:
                if resp.status != 200:
                    kind = _STATUS.get(resp.status, InvalidRequestError)
                    raise kind(f"azure: retail prices answered HTTP {resp.status}",
                               provider=NAME, code=str(resp.status))
                return await resp.json(content_type=None)
        except ProvisionError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TransientError(f"azure: retail prices: {type(exc).__name__}: {exc}",
                                 provider=NAME, code=type(exc).__name__) from None

    # -- plumbing ----------------------------------------------------------------------

    def _client(self, kind: str) -> Any:
        c = self._clients.get(kind)
        if c is None:
            if self._credential_factory is not None:
                credential = self._credential_factory()
            else:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            kwargs: dict[str, Any] = {"retry_total": 0,
                                      "connection_verify": self._settings.connection_verify}
            if self._settings.base_url:
                kwargs["base_url"] = self._settings.base_url
                kwargs["credential_scopes"] = ["https://management.azure.com/.default"]
            if self._settings.polling_interval is not None:
                kwargs["polling_interval"] = self._settings.polling_interval
            client: Any
            if kind == "compute":
                from azure.mgmt.compute import ComputeManagementClient as client
            elif kind == "network":
                from azure.mgmt.network import NetworkManagementClient as client
            else:
                from azure.mgmt.resource.resources import ResourceManagementClient as client
            c = client(credential, self._settings.subscription_id, **kwargs)
            self._clients[kind] = c
        return c

    async def _call(self, kind: str, path: str, *args: Any, region: str = "", zone: str = "",
                    wait: bool = False, **kwargs: Any) -> Any:
        """``path`` like "virtual_machines.begin_start"; ``wait``: poll the LRO to its end."""
        def run() -> Any:
            target: Any = self._client(kind)
            for part in path.split("."):
                target = getattr(target, part)
            out = target(*args, **kwargs)
            return out.result() if wait else out

        try:
            return await asyncio.to_thread(run)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc, region=region, zone=zone) from None

    async def _gone_ok(self, kind: str, path: str, *args: Any, region: str) -> None:
        try:
            await self._call(kind, path, *args, region=region, wait=True)
        except NotFoundError:
            pass

    def _rg(self, infra: str, region: str) -> str:
        return f"barista-{infra}-{region}"

    # -- network -----------------------------------------------------------------------

    async def ensure_network(self, request: NetworkRequest) -> Network:
        nm, rm = _models("network"), _models("resource")

        region, tags = request.region, {**request.tags, TAG_INFRA: request.infra}
        rg = self._rg(request.infra, region)
        await self._call("resource", "resource_groups.create_or_update", rg,
                         rm.ResourceGroup(location=region, tags=tags), region=region)
        rules = [nm.SecurityRule(
            name="wireguard", protocol="Udp", direction="Inbound", access="Allow",
            priority=100, source_address_prefix="*", source_port_range="*",
            destination_address_prefix="*",
            destination_port_range=str(request.wireguard_port))]
        if request.ssh_from:
            rules.append(nm.SecurityRule(
                name="ssh", protocol="Tcp", direction="Inbound", access="Allow", priority=110,
                source_address_prefixes=list(request.ssh_from), source_port_range="*",
                destination_address_prefix="*", destination_port_range="22"))
        nsg_name = f"barista-{request.infra}-nsg"
        nsg = await self._call("network", "network_security_groups.begin_create_or_update",
                               rg, nsg_name, nm.NetworkSecurityGroup(
                                   location=region, tags=tags, security_rules=rules),
                               region=region, wait=True)
        net = ipaddress.ip_network(request.cidr)
        prefix = max(net.prefixlen, min(20, net.prefixlen + 4))
        subnet_cidr = str(next(net.subnets(new_prefix=prefix)))
        vnet_name = f"barista-{request.infra}"
        vnet = await self._call("network", "virtual_networks.begin_create_or_update", rg,
                                vnet_name, nm.VirtualNetwork(
                                    location=region, tags=tags,
                                    address_space=nm.AddressSpace(address_prefixes=[request.cidr]),
                                    subnets=[nm.Subnet(name="nodes", address_prefix=subnet_cidr,
                                                       network_security_group=nm.NetworkSecurityGroup(
                                                           id=nsg.id))]),
                                region=region, wait=True)
        subnet_id = next(s.id for s in vnet.subnets if s.name == "nodes")
        return Network(id=str(vnet.id), region=region, cidr=request.cidr,
                       subnet_id=str(subnet_id), firewall_id=str(nsg.id),
                       extra={"infra": request.infra, "resource_group": rg})

    # -- instances ---------------------------------------------------------------------

    async def run_instances(self, placement: Placement, network: Network,
                            requests: Sequence[LaunchRequest]) -> list[Instance]:
        region = placement.region
        rg = network.extra.get("resource_group") or self._rg(network.extra.get("infra", ""),
                                                             region)
        out = []
        for req in requests:
            vm = None
            try:
                vm = await self._call("compute", "virtual_machines.get", rg, req.name,
                                      region=region)
            except NotFoundError:
                pass
            if vm is not None and str(vm.provisioning_state) == "Failed":
                # A failed allocation leaves the VM (and its NIC and IP, pinned to the
                # failed zone) behind; they go before another zone is tried.
                await self.terminate_instances(region, [str(vm.id)])
                vm = None
            if vm is None:
                await self._create_vm(req, rg, placement, network)
            out.append(await self._get(rg, req.name, region))
        return out

    async def _create_vm(self, req: LaunchRequest, rg: str, placement: Placement,
                         network: Network) -> None:
        cm, nm = _models("compute"), _models("network")

        region, zone = placement.region, placement.zone
        image = self._settings.images.get(req.image)
        if image is None and req.image.count(":") in (2, 3):  # a URN: publisher:offer:sku[:v]
            image = AzureImage(*req.image.split(":"))
        if image is None:
            raise InvalidRequestError(
                f"azure: unknown image {req.image!r} (known: "
                f"{', '.join(sorted(self._settings.images))})", provider=NAME, region=region)
        tags = {**req.tags, TAG_NODE: req.name}
        zones = [_zone_number(zone)] if zone else None
        pip = await self._call("network", "public_ip_addresses.begin_create_or_update", rg,
                               f"{req.name}-ip", nm.PublicIPAddress(
                                   location=region, tags=tags, zones=zones,
                                   sku=nm.PublicIPAddressSku(name="Standard"),
                                   public_ip_allocation_method="Static"),
                               region=region, zone=zone, wait=True)
        nic = await self._call("network", "network_interfaces.begin_create_or_update", rg,
                               f"{req.name}-nic", nm.NetworkInterface(
                                   location=region, tags=tags, ip_configurations=[
                                       nm.NetworkInterfaceIPConfiguration(
                                           name="ipconfig1",
                                           subnet=nm.Subnet(id=network.subnet_id),
                                           public_ip_address=nm.PublicIPAddress(id=pip.id))]),
                               region=region, zone=zone, wait=True)
        if not self._ssh_key:
            self._ssh_key = _throwaway_ssh_key()
        vm = cm.VirtualMachine(
            location=region, tags=tags, zones=zones,
            hardware_profile=cm.HardwareProfile(vm_size=req.size),
            storage_profile=cm.StorageProfile(
                image_reference=cm.ImageReference(publisher=image.publisher, offer=image.offer,
                                                  sku=image.sku, version=image.version),
                os_disk=cm.OSDisk(create_option="FromImage", delete_option="Delete",
                                  managed_disk=cm.ManagedDiskParameters(
                                      storage_account_type="StandardSSD_LRS"))),
            os_profile=cm.OSProfile(
                computer_name=req.name, admin_username=ADMIN_USER,
                custom_data=base64.b64encode(req.user_data.encode()).decode(),
                linux_configuration=cm.LinuxConfiguration(
                    disable_password_authentication=True,
                    ssh=cm.SshConfiguration(public_keys=[cm.SshPublicKey(
                        path=f"/home/{ADMIN_USER}/.ssh/authorized_keys",
                        key_data=self._ssh_key)]))),
            network_profile=cm.NetworkProfile(network_interfaces=[
                cm.NetworkInterfaceReference(id=nic.id, primary=True,
                                             delete_option="Delete")]),
        )
        await self._call("compute", "virtual_machines.begin_create_or_update", rg, req.name,
                         vm, region=region, zone=zone, wait=True)

    async def _get(self, rg: str, name: str, region: str) -> Instance:
        vm = await self._call("compute", "virtual_machines.get", rg, name,
                              expand="instanceView", region=region)
        return await self._instance(vm, rg)

    async def _instance(self, vm: Any, rg: str) -> Instance:
        region = str(vm.location)
        state = InstanceState.UNKNOWN
        prov = str(vm.provisioning_state or "")
        if prov in ("Creating", "Updating") and vm.instance_view is None:
            state = InstanceState.PENDING
        statuses = vm.instance_view.statuses if vm.instance_view is not None else []
        for st in statuses or []:
            if st.code and st.code.startswith("PowerState/"):
                state = POWER_MAP.get(st.code.split("/", 1)[1], InstanceState.UNKNOWN)
        if prov == "Deleting":
            state = InstanceState.TERMINATING
        zone = f"{region}-{vm.zones[0]}" if vm.zones else ""
        private_ip = public_ip = ""
        nics = vm.network_profile.network_interfaces if vm.network_profile else []
        if nics:
            nic_name = nics[0].id.rstrip("/").rsplit("/", 1)[-1]
            try:
                nic = await self._call("network", "network_interfaces.get", rg, nic_name,
                                       region=region)
                cfg = nic.ip_configurations[0]
                private_ip = cfg.private_ip_address or ""
                if cfg.public_ip_address is not None and cfg.public_ip_address.id:
                    pip = await self._call("network", "public_ip_addresses.get", rg,
                                           cfg.public_ip_address.id.rsplit("/", 1)[-1],
                                           region=region)
                    public_ip = pip.ip_address or ""
            except NotFoundError:
                pass
        tags = dict(vm.tags or {})
        return Instance(
            id=str(vm.id), name=tags.get(TAG_NODE, str(vm.name)),
            placement=Placement(NAME, region, zone), state=state,
            size=str(vm.hardware_profile.vm_size) if vm.hardware_profile else "",
            private_ip=private_ip, public_ip=public_ip, tags=tags,
            extra={"resource_group": rg, "vm_id": str(vm.vm_id or "")})

    async def query_instances(self, tags: Mapping[str, str], *,
                              region: str | None = None) -> list[Instance]:
        def listing() -> list[Any]:
            return list(self._client("compute").virtual_machines.list_all(status_only="true"))

        try:
            vms = await asyncio.to_thread(listing)
        except Exception as exc:
            raise map_error(exc, region=region or "") from None
        out = []
        for vm in vms:
            have = dict(vm.tags or {})
            if any(have.get(k) != v for k, v in tags.items()):
                continue
            if region is not None and str(vm.location) != region:
                continue
            m = _ID.search(str(vm.id))
            out.append(await self._instance(vm, m.group(1) if m else ""))
        return out

    def _split(self, vm_id: str, region: str) -> tuple[str, str]:
        m = _ID.search(vm_id)
        if m is None:
            raise NotFoundError(f"azure: {vm_id!r} is not a VM resource id", provider=NAME,
                                region=region, code="NotFound")
        return m.group(1), m.group(2)

    async def _each(self, op: str, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            rg, name = self._split(vm_id, region)
            await self._call("compute", f"virtual_machines.{op}", rg, name, region=region,
                             wait=True)

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_deallocate", region, ids)  # stopped and not billed

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_start", region, ids)

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_restart", region, ids)

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        """Delete each VM, then the NIC and public IP made for it (the OS disk goes with
        the VM: delete_option)."""
        for vm_id in ids:
            rg, name = self._split(vm_id, region)
            await self._call("compute", "virtual_machines.begin_delete", rg, name,
                             region=region, wait=True)
            await self._gone_ok("network", "network_interfaces.begin_delete", rg,
                                f"{name}-nic", region=region)
            await self._gone_ok("network", "public_ip_addresses.begin_delete", rg,
                                f"{name}-ip", region=region)

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        """Delete the infra's resource group in ``region`` (VNet, NSG and anything left in
        it) once no VM of ours is in it."""
        infra = tags.get(TAG_INFRA, "")
        if not infra:
            raise InvalidRequestError("azure: cleanup needs the infra tag", provider=NAME,
                                      region=region)
        live = [i for i in await self.query_instances({TAG_INFRA: infra}, region=region)
                if not i.state.gone]
        if live:
            log.warning("azure: infra %s still has %d VM(s) in %s; resource group kept",
                        infra, len(live), region)
            return
        await self._gone_ok("resource", "resource_groups.begin_delete",
                            self._rg(infra, region), region=region)
        log.info("azure: removed resource group %s", self._rg(infra, region))


# -- catalog ---------------------------------------------------------------------------

_REGIONS = (
    Region("eastus", 37.37, -79.82, ("eastus-1", "eastus-2", "eastus-3"), "East US"),
    Region("westeurope", 52.37, 4.90, ("westeurope-1", "westeurope-2", "westeurope-3"),
           "West Europe"),
    Region("koreacentral", 37.57, 126.98, ("koreacentral-1", "koreacentral-2",
                                           "koreacentral-3"), "Korea Central"),
    Region("southeastasia", 1.28, 103.83, ("southeastasia-1", "southeastasia-2",
                                           "southeastasia-3"), "Southeast Asia"),
    Region("westus2", 47.23, -119.85, ("westus2-1", "westus2-2", "westus2-3"), "West US 2"),
)
# Prices: controller/provision/providers/prices.py (data, with its sources).
_SIZES = (Size("Standard_B1s", 1, 1.0), Size("Standard_B2s", 2, 4.0),
          Size("Standard_D2s_v5", 2, 8.0), Size("Standard_F2s_v2", 2, 4.0))


def default_catalog() -> Catalog:
    from controller.provision.providers.prices import prices

    return Catalog(
        provider=NAME,
        regions={r.name: r for r in _REGIONS},
        sizes={s.name: Size(s.name, s.vcpus, s.memory_gb, prices(NAME, s.name))
               for s in _SIZES},
        images={"ubuntu-24.04": Image("ubuntu-24.04", "Canonical:ubuntu-24_04-lts:server"),
                "ubuntu-22.04": Image("ubuntu-22.04",
                                      "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2")},
    )
