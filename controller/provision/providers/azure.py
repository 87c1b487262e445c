"""Azure Virtual Machines behind the provider contract (azure-mgmt-compute, -network,
-resource, azure-identity).

One resource group per infra and region (``barista-<infra>-<region>``) holding the VNet,
its subnet, the network security group (WireGuard UDP in; SSH only when asked; on each
VM's NIC) and, per VM, a static public IP, a NIC and the VM itself with the cloud-init user-data as
``custom_data``. Every resource carries our tags. Long-running operations go through the
SDK's pollers (``polling_interval`` 0 in tests), except VM creation: a batch of VMs is
followed with one list of the resource group per round, not one poll per VM. The SDK's own
retries are off (the engine owns retries). Calls are synchronous in the SDK and run in the
worker threads of the provider's ``RequestMeter``, which keeps them within ``API_LIMITS``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
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
from controller.provision.limits import ApiLimits, RequestMeter, gather_all, gather_launches
from controller.provision.refresh import Fetched, Progress

log = logging.getLogger("barista.controller.provision.azure")

NAME = "azure"
# VM network interface configurations (NIC + public IP made and deleted by Compute with the
# VM) need networkApiVersion 2020-11-01 or later.
NETWORK_API_VERSION = "2020-11-01"

# Azure Resource Manager throttles per subscription, per principal and per region with
# token buckets since 2024 ("Understand how Azure Resource Manager throttles requests",
# learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling):
# reads bucket 250 refilled at 25/s, writes 200 at 10/s, deletes 200 at 10/s. One bucket
# per region for all our requests at the smallest refill (10/s) with bursts of 200. (The
# Compute resource provider's own per-operation limits come on top; they are larger than
# what one create of 100 VMs asks.)
API_LIMITS = ApiLimits(rate=0.0, burst=0, region_rate=10.0, region_burst=200,
                       concurrency=8, batch=50)
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
    # A network resource referred to while it is still being made or updated (its
    # operation not done): ARM says to retry.
    "ReferencedResourceNotProvisioned": TransientError,
    "AnotherOperationInProgress": TransientError,
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


def provisioning_error(vm: Any, *, region: str, zone: str) -> ProvisionError:
    """The typed error of a VM whose provisioning failed, from its instance view's
    ``ProvisioningState/failed/<code>`` status."""
    statuses = vm.instance_view.statuses if vm.instance_view is not None else []
    for st in statuses or []:
        code = str(st.code or "")
        if code.startswith("ProvisioningState/failed"):
            err = code.split("/", 2)[2] if code.count("/") >= 2 else ""
            kind = ERROR_MAP.get(err, InvalidRequestError)
            return kind(f"azure: {st.message or err or 'provisioning failed'}",
                        provider=NAME, region=region, zone=zone, code=err)
    return InvalidRequestError(f"azure: VM {vm.name} failed to provision", provider=NAME,
                               region=region, zone=zone, code="ProvisioningFailed")


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
    status_poll: float = 5.0  # between lists of a resource group while VMs are created
    operation_timeout: float = 900.0
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
                 credential_factory: Callable[[], Any] | None = None,
                 limits: ApiLimits = API_LIMITS) -> None:
        self.api_limits = limits
        self._meter = RequestMeter(limits, name=NAME)
        self._settings = settings
        self._catalog = self._shipped = catalog
        self._credential_factory = credential_factory
        self._clients: dict[str, Any] = {}
        self._ssh_key = settings.ssh_public_key
        # VM resource id (lower) -> (its vmId, private IP, public IP): what a query joined
        # once. Forgotten when we stop, start or delete it.
        self._addresses: dict[str, tuple[str, str, str]] = {}

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
            self._catalog_listing, self._arm_json, self._prices_json if url else None, url,
            self._settings.subscription_id, sorted(self._shipped.regions), progress)

    async def _catalog_listing(self, kind: str, path: str, **kwargs: Any) -> list[Any]:
        """A paged listing for the catalog refresh, every page read in a worker thread
        (not metered per region: a refresh is a few dozen calls, made on request)."""
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
            return await self._meter.run(region, run)
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
        """The resource group, then the NSG and the VNet side by side: the NSG goes on each
        VM's NIC (``_create_vm``), not on the subnet, so the VNet does not refer to it
        (ARM refuses a reference to a resource not yet provisioned:
        ReferencedResourceNotProvisioned, which would put the two in series). A VNet
        made before with the NSG on its subnet keeps it (a PUT replaces the subnets: its
        VMs' NICs have none), the NSG then done first, as ARM needs."""
        nm, rm = _models("network"), _models("resource")

        region, tags = request.region, {**request.tags, TAG_INFRA: request.infra}
        rg = self._rg(request.infra, region)
        vnet_name = f"barista-{request.infra}"

        async def existing_vnet() -> Any:
            try:
                return await self._call("network", "virtual_networks.get", rg, vnet_name,
                                        region=region)
            except NotFoundError:  # the VNet, or its resource group (made beside this)
                return None

        _, old = await gather_all(
            self._call("resource", "resource_groups.create_or_update", rg,
                       rm.ResourceGroup(location=region, tags=tags), region=region),
            existing_vnet())
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
        net = ipaddress.ip_network(request.cidr)
        prefix = max(net.prefixlen, min(20, net.prefixlen + 4))
        subnet_cidr = str(next(net.subnets(new_prefix=prefix)))
        old_subnet = next((sn for sn in (old.subnets or []) if sn.name == "nodes"), None) \
            if old is not None else None
        legacy = old_subnet is not None and old_subnet.network_security_group is not None

        async def nsg() -> Any:
            return await self._call(
                "network", "network_security_groups.begin_create_or_update", rg, nsg_name,
                nm.NetworkSecurityGroup(location=region, tags=tags, security_rules=rules),
                region=region, wait=True)

        async def vnet(nsg_id: str = "") -> Any:
            subnet = nm.Subnet(name="nodes", address_prefix=subnet_cidr)
            if nsg_id:
                subnet = nm.Subnet(name="nodes", address_prefix=subnet_cidr,
                                   network_security_group=nm.NetworkSecurityGroup(id=nsg_id))
            return await self._call(
                "network", "virtual_networks.begin_create_or_update", rg, vnet_name,
                nm.VirtualNetwork(location=region, tags=tags,
                                  address_space=nm.AddressSpace(address_prefixes=[request.cidr]),
                                  subnets=[subnet]),
                region=region, wait=True)

        if legacy:
            made_nsg = await nsg()
            made_vnet = await vnet(str(made_nsg.id))
        else:
            made_nsg, made_vnet = await gather_all(nsg(), vnet())
        subnet_id = next(sn.id for sn in made_vnet.subnets if sn.name == "nodes")
        return Network(id=str(made_vnet.id), region=region, cidr=request.cidr,
                       subnet_id=str(subnet_id), firewall_id=str(made_nsg.id),
                       extra={"infra": request.infra, "resource_group": rg})

    # -- instances ---------------------------------------------------------------------

    async def run_instances(self, placement: Placement, network: Network,
                            requests: Sequence[LaunchRequest]) -> list[Instance]:
        region = placement.region
        rg = network.extra.get("resource_group") or self._rg(network.extra.get("infra", ""),
                                                             region)
        if not requests:
            return []
        # One list of the resource group's VMs for the batch (not a get per name).
        vms = {str(vm.name): vm for vm in await self._list(
            "compute", "virtual_machines.list", rg, region=region)}
        failed = [str(vms[r.name].id) for r in requests if r.name in vms
                  and str(vms[r.name].provisioning_state) == "Failed"]
        if failed:
            # A failed allocation leaves the VM (and its NIC and IP, pinned to the failed
            # zone) behind; they go before another zone is tried.
            await self.terminate_instances(region, failed)
        todo = [r for r in requests if r.name not in vms
                or str(vms[r.name].provisioning_state) == "Failed"]
        made = gather_launches(await asyncio.gather(
            *(self._create_vm(r, rg, placement, network) for r in todo),
            return_exceptions=True))
        if made:
            await self._settle(rg, placement, made)
        names = {r.name for r in requests}
        return [i for i in await self._instances_in(rg, region) if i.name in names
                and (i.name not in made or i.extra.get("provisioning") != "Failed")]

    async def _settle(self, rg: str, placement: Placement, made: Collection[str]
                      ) -> None:
        """Wait until none of the VMs just created is still being created, with one list of
        the resource group per round (not a poll per VM); a VM whose creation failed
        raises its operation's error (a capacity error fails over to another zone) when
        none of them was made."""
        region, zone = placement.region, placement.zone
        deadline = asyncio.get_running_loop().time() + self._settings.operation_timeout
        while True:
            states = {str(vm.name): str(vm.provisioning_state) for vm in await self._list(
                "compute", "virtual_machines.list", rg, region=region)}
            busy = [n for n in made if states.get(n) in ("Creating", "Updating")]
            if not busy:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TransientError(f"azure: VMs {busy[:5]} still being created after "
                                     f"{self._settings.operation_timeout:.0f} s",
                                     provider=NAME, region=region, code="TIMEOUT")
            await asyncio.sleep(self._settings.status_poll)
        bad = [n for n in made if states.get(n) == "Failed"]
        if not bad:
            return
        errors: list[ProvisionError] = []
        for n in bad:  # the instance view says why (ProvisioningState/failed/<code>)
            vm = await self._call("compute", "virtual_machines.get", rg, n,
                                  expand="instanceView", region=region)
            errors.append(provisioning_error(vm, region=region, zone=zone))
        if len(bad) == len(made):
            raise errors[0]
        for e in errors:
            log.warning("azure %s: %s", region, e.message)

    async def _create_vm(self, req: LaunchRequest, rg: str, placement: Placement,
                         network: Network) -> list[str]:
        """PUT the VM with its NIC and public IP made by Compute with it (network interface
        configurations, deleted with the VM): one request per VM, its operation not polled
        (``polling=False``: the SDK's poller would poll it from a thread of its own); the
        batch is followed by ``_settle``."""
        cm = _models("compute")

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
            network_profile=cm.NetworkProfile(
                network_api_version=NETWORK_API_VERSION,
                network_interface_configurations=[
                    cm.VirtualMachineNetworkInterfaceConfiguration(
                        name=f"{req.name}-nic", primary=True, delete_option="Delete",
                        network_security_group=cm.SubResource(id=network.firewall_id),
                        ip_configurations=[cm.VirtualMachineNetworkInterfaceIPConfiguration(
                            name="ipconfig1", primary=True,
                            subnet=cm.SubResource(id=network.subnet_id),
                            public_ip_address_configuration=cm
                            .VirtualMachinePublicIPAddressConfiguration(
                                name=f"{req.name}-ip", delete_option="Delete",
                                sku=cm.PublicIPAddressSku(name="Standard"),
                                public_ip_allocation_method="Static"))])]),
        )
        await self._call("compute", "virtual_machines.begin_create_or_update", rg, req.name,
                         vm, polling=False, region=region, zone=zone)
        return [req.name]

    async def _list(self, kind: str, path: str, *args: Any, region: str, **kwargs: Any
                    ) -> list[Any]:
        """Every item of a list request (each further page is a further request)."""
        pages = await self._call(kind, path, *args, region=region, **kwargs)

        def collect() -> list[Any]:
            return list(pages)

        try:
            return await self._meter.run(region, collect)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc, region=region) from None

    async def _instances_in(self, rg: str, region: str, vms: Sequence[Any] | None = None
                            ) -> list[Instance]:
        """The VMs of a resource group with their addresses: one list each of VMs (when
        not given), NICs and public IPs, joined here (not a get per VM)."""
        if vms is None:
            vms = await self._list("compute", "virtual_machines.list", rg,
                                   expand="instanceView", region=region)
        if not vms:
            return []
        # A VM's addresses, once known, are kept (its NIC is made and deleted with it, its
        # public IP is static): the NICs and public IPs are listed only while one of the
        # VMs has none known yet, so a query while VMs boot is one list.
        known = [self._addresses.get(str(vm.id).lower()) for vm in vms]
        if all(k is not None and k[0] == str(vm.vm_id or "") for k, vm in
               zip(known, vms, strict=True)):
            return [self._instance(vm, rg, {}, {}, k[1:] if k else None)
                    for vm, k in zip(vms, known, strict=True)]
        nics, pips = await asyncio.gather(
            self._list("network", "network_interfaces.list", rg, region=region),
            self._list("network", "public_ip_addresses.list", rg, region=region))
        by_nic = {str(n.id).lower(): n for n in nics}
        by_pip = {str(p.id).lower(): p for p in pips}
        out = [self._instance(vm, rg, by_nic, by_pip) for vm in vms]
        for vm, inst in zip(vms, out, strict=True):
            if inst.private_ip and inst.public_ip:
                self._addresses[str(vm.id).lower()] = (str(vm.vm_id or ""), inst.private_ip,
                                                       inst.public_ip)
        return out

    def _instance(self, vm: Any, rg: str, nics: Mapping[str, Any], pips: Mapping[str, Any],
                  addresses: tuple[str, str] | None = None) -> Instance:
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
        private_ip, public_ip = addresses or ("", "")
        refs = vm.network_profile.network_interfaces if vm.network_profile else []
        nic = nics.get(str(refs[0].id).lower()) if refs else None
        if nic is not None and nic.ip_configurations:
            cfg = nic.ip_configurations[0]
            private_ip = cfg.private_ip_address or ""
            if cfg.public_ip_address is not None and cfg.public_ip_address.id:
                pip = pips.get(str(cfg.public_ip_address.id).lower())
                public_ip = (pip.ip_address or "") if pip is not None else ""
        tags = dict(vm.tags or {})
        return Instance(
            id=str(vm.id), name=tags.get(TAG_NODE, str(vm.name)),
            placement=Placement(NAME, region, zone), state=state,
            size=str(vm.hardware_profile.vm_size) if vm.hardware_profile else "",
            private_ip=private_ip, public_ip=public_ip, tags=tags,
            extra={"resource_group": rg, "vm_id": str(vm.vm_id or ""),
                   "provisioning": prov})

    async def query_instances(self, tags: Mapping[str, str], *,
                              region: str | None = None) -> list[Instance]:
        vms = await self._list("compute", "virtual_machines.list_all", status_only="true",
                               region=region or "")
        by_rg: dict[str, list[Any]] = {}
        for vm in vms:
            have = dict(vm.tags or {})
            if any(have.get(k) != v for k, v in tags.items()):
                continue
            if region is not None and str(vm.location) != region:
                continue
            m = _ID.search(str(vm.id))
            by_rg.setdefault(m.group(1) if m else "", []).append(vm)
        parts = await asyncio.gather(*(self._instances_in(rg, region or str(v[0].location), v)
                                       for rg, v in by_rg.items()))
        return [i for part in parts for i in part]

    def _split(self, vm_id: str, region: str) -> tuple[str, str]:
        m = _ID.search(vm_id)
        if m is None:
            raise NotFoundError(f"azure: {vm_id!r} is not a VM resource id", provider=NAME,
                                region=region, code="NotFound")
        return m.group(1), m.group(2)

    async def _each(self, op: str, region: str, ids: Sequence[str]) -> None:
        for vm_id in ids:
            self._addresses.pop(vm_id.lower(), None)

        async def one(vm_id: str) -> None:
            rg, name = self._split(vm_id, region)
            await self._call("compute", f"virtual_machines.{op}", rg, name, region=region,
                             wait=True)

        await asyncio.gather(*(one(i) for i in ids))  # side by side, within the limits

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_deallocate", region, ids)  # stopped and not billed

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_start", region, ids)

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        await self._each("begin_restart", region, ids)

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        """Delete each VM (side by side); its OS disk, NIC and public IP go with it
        (delete_option). A NIC or IP left by a VM made before that (or by hand) is
        deleted after it."""
        for vm_id in ids:
            self._addresses.pop(vm_id.lower(), None)

        async def one(vm_id: str) -> None:
            rg, name = self._split(vm_id, region)
            await self._call("compute", "virtual_machines.begin_delete", rg, name,
                             region=region, wait=True)

        await asyncio.gather(*(one(i) for i in ids))
        by_rg: dict[str, set[str]] = {}
        for vm_id in ids:
            rg, name = self._split(vm_id, region)
            by_rg.setdefault(rg, set()).add(name)
        for rg, names in by_rg.items():
            for kind, path, suffix in (("network", "network_interfaces", "-nic"),
                                       ("network", "public_ip_addresses", "-ip")):
                try:
                    left = await self._list(kind, f"{path}.list", rg, region=region)
                except NotFoundError:
                    continue
                for res in left:
                    if str(res.name).removesuffix(suffix) in names:
                        await self._gone_ok(kind, f"{path}.begin_delete", rg, str(res.name),
                                            region=region)

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
