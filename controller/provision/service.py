"""Provisioning inside the running controller: the configured providers, the renderer that
gives each new VM its own node-bound join token in cloud-init user-data, the addresses VMs
reach the controller at (a lab VM: the lab gateway, forwarded to the loopback NATS and
API), and the engine over them.

The API's URL is known only once the API listens; ``set_api_url`` is called then, before
any request can ask for a VM.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from nats.js import JetStreamContext

from controller.enroll import TokenService
from controller.errors import ConfigError
from controller.models import NodeRecord
from controller.provision.bootstrap import BootConfig, render_user_data
from controller.provision.contract import Network, Provider, ProvisionError
from controller.provision.engine import Engine, installation_id, provision_engine
from controller.provision.model import GroupSpec, InfraSpec
from controller.provision.refresh import CatalogStore
from controller.provision.registry import providers_from_config
from controller.state.table import Table

log = logging.getLogger("barista.controller.provision")

# A VM must enroll within this long of being asked for (boot + install): a day covers a
# slow cloud; the token is one-time and bound to the node's name anyway.
BOOT_TOKEN_TTL = 24 * 3600.0


@dataclass(frozen=True)
class AgentEndpoints:
    """Where one provider's VMs reach the controller."""

    nats_urls: list[str]
    api_url: str  # http(s)://host:port (the installer is at <api_url>/install.sh)


@runtime_checkable
class LabCloud(Protocol):
    """A provider whose VMs run on this machine and reach it at a gateway address (the
    ``local`` lab cloud): the controller's loopback NATS and API are forwarded there."""

    @property
    def gateway_ip(self) -> str: ...

    async def bring_up(self) -> None: ...


class LabGateways:
    """For ``local`` providers: a forwarder on the lab's gateway address to the controller's
    loopback NATS and API, made when the lab is up and remade when its gateway moved (a
    lab taken down when empty comes back on a new address)."""

    def __init__(self, *, nats_url: Callable[[], str], api_url: Callable[[], str]) -> None:
        self._nats_url = nats_url
        self._api_url = api_url
        self._stack: dict[str, AsyncExitStack] = {}
        self._at: dict[str, tuple[str, AgentEndpoints]] = {}

    async def endpoints(self, name: str, provider: LabCloud) -> AgentEndpoints:
        from controller.provision.lab.gateway import GatewayForwarder

        await provider.bring_up()
        gw = provider.gateway_ip
        cached = self._at.get(name)
        if cached is not None and cached[0] == gw:
            return cached[1]
        await self._close(name)
        nats = urllib.parse.urlsplit(self._nats_url())
        api = urllib.parse.urlsplit(self._api_url())
        if gw in ("127.0.0.1", "::1"):  # process mode: the VMs share the host's loopback
            found = AgentEndpoints([self._nats_url()], self._api_url())
            self._at[name] = (gw, found)
            return found
        stack = AsyncExitStack()
        fw = await stack.enter_async_context(GatewayForwarder(host=gw, routes={
            0: (nats.hostname or "127.0.0.1", nats.port or 4222),
            1: (api.hostname or "127.0.0.1", api.port or 443)}))
        self._stack[name] = stack
        found = AgentEndpoints([f"{nats.scheme}://{gw}:{fw.ports[0]}"],
                               f"{api.scheme}://{gw}:{fw.ports[1]}")
        self._at[name] = (gw, found)
        log.info("lab %s: VMs reach NATS and the installer at %s (forwarded to loopback)",
                 name, gw)
        return found

    async def _close(self, name: str) -> None:
        self._at.pop(name, None)
        stack = self._stack.pop(name, None)
        if stack is not None:
            await stack.aclose()

    async def close(self) -> None:
        for name in list(self._stack):
            await self._close(name)


class Bootstrapper:
    """Renders one VM's user-data: a one-time join token bound to the node's name and
    carrying its infra labels, the controller's keys, the NATS URL and installer it reaches,
    and the CA pin. The text is a secret (it carries the token) and is never logged."""

    def __init__(
        self,
        *,
        tokens: TokenService,
        providers: Mapping[str, Provider],
        controller_keys: Callable[[], list[str]],
        ca_sha256: str,
        endpoints: Callable[[str, Provider], Awaitable[AgentEndpoints]],
        reuse_venv: str = "",
        token_ttl: float = BOOT_TOKEN_TTL,
    ) -> None:
        self._tokens = tokens
        self._providers = providers
        self._keys = controller_keys
        self._ca = ca_sha256
        self._endpoints = endpoints
        self._reuse_venv = reuse_venv
        self._ttl = token_ttl

    async def render(self, spec: InfraSpec, group: GroupSpec, node_name: str,
                     labels: Mapping[str, str], network: Network) -> str:
        provider = self._providers.get(group.provider)
        if provider is None:
            raise ProvisionError(f"no provider {group.provider!r} configured",
                                 provider=group.provider, scope="provider")
        where = await self._endpoints(group.provider, provider)
        issued = await self._tokens.create(labels=dict(labels), ttl=self._ttl, node_name=node_name,
                                           description=f"infra {spec.name} node {node_name}")
        boot = BootConfig(
            join_token=self._tokens.join_text(issued.token), node_name=node_name,
            nats_urls=where.nats_urls, controller_keys=self._keys(),
            installer_url=f"{where.api_url}/install.sh", ca_sha256=self._ca,
            labels={k: v for k, v in labels.items() if not k.startswith("barista-")},
            hostname=node_name, reuse_venv=self._reuse_venv,
            underlay=underlay_of(group, network))
        return render_user_data(boot)


def underlay_of(group: GroupSpec, network: Network) -> dict[str, str]:
    """The boot config's ``underlay``: the VM's subnet and whether it has a public address
    (a provider that knows says so in its network's ``extra["public_address"]``)."""
    out = {"vpc_cidr": network.cidr} if network.cidr else {}
    public = "none" if not group.public_ip else network.extra.get("public_address", "")
    if public:
        out["public_address"] = public
    return out


class Provisioning:
    """The controller's provisioning: ``async with`` builds the providers from config and
    runs the engine; ``engine`` is what the API serves as ``Infras``."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        nodes: Table[NodeRecord],
        tokens: TokenService,
        providers: Mapping[str, Mapping[str, Any]],
        data_dir: Path,
        nats_url: Callable[[], str],
        controller_keys: Callable[[], list[str]],
        ca_sha256: str,
        forget_node: Callable[[str], Awaitable[None]] | None = None,
        reuse_venv: str = "",
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._nodes = nodes
        self._tokens = tokens
        self._config = providers
        self._data_dir = data_dir
        self._nats_url = nats_url
        self._keys = controller_keys
        self._ca = ca_sha256
        self._forget = forget_node
        self._reuse_venv = reuse_venv
        self._replicas = replicas
        self._api_url = ""
        self._stack = AsyncExitStack()
        self._engine: Engine | None = None
        self.providers: dict[str, Provider] = {}
        # `barista catalog refresh`: the providers' catalog overlays (data dir catalog/).
        self.catalogs = CatalogStore(data_dir / "catalog")

    def set_api_url(self, url: str) -> None:
        self._api_url = url

    def api_url(self) -> str:
        if not self._api_url:
            raise ConfigError("the API is not listening yet: VMs cannot be given the "
                              "installer's address")
        return self._api_url

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("provisioning is not running")
        return self._engine

    async def _endpoints(self, name: str, provider: Provider, gateways: LabGateways
                         ) -> AgentEndpoints:
        if isinstance(provider, LabCloud):
            return await gateways.endpoints(name, provider)
        return AgentEndpoints([self._nats_url()], self.api_url())

    async def __aenter__(self) -> Provisioning:
        configs: dict[str, Mapping[str, Any]] = {}
        for name, raw in self._config.items():
            if str(raw.get("kind", name)) == "local" and "data_dir" not in raw:
                raw = {**raw, "data_dir": str(self._data_dir / "providers" / name)}  # a lab's home
            configs[name] = raw
        self.providers = providers_from_config(configs)
        self.catalogs.apply_all(self.providers)
        gateways = LabGateways(nats_url=self._nats_url, api_url=self.api_url)
        self._stack.push_async_callback(gateways.close)

        async def endpoints(name: str, provider: Provider) -> AgentEndpoints:
            return await self._endpoints(name, provider, gateways)

        boot = Bootstrapper(tokens=self._tokens, providers=self.providers,
                            controller_keys=self._keys, ca_sha256=self._ca,
                            endpoints=endpoints, reuse_venv=self._reuse_venv)
        self._engine = await self._stack.enter_async_context(provision_engine(
            js=self._js, nodes=self._nodes, providers=self.providers, renderer=boot.render,
            installation=installation_id(self._data_dir), forget_node=self._forget,
            replicas=self._replicas))
        if self.providers:
            log.info("providers: %s", ", ".join(sorted(self.providers)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._engine = None
        await self._stack.aclose()
