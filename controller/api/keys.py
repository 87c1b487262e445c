"""One typed aiohttp ``AppKey`` per service the API's handlers use; make_app fills them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from controller.apps.deployer import Deployer
from controller.audit import AuditLog
from controller.auth import ApiTokens
from controller.enroll import TokenService
from controller.fleet import Fleet
from controller.jobs.engine import JobEngine
from controller.keys import SigningKeys
from controller.live import MetricsHub
from controller.mesh.service import MeshService
from controller.models import NodeRecord, TokenRecord
from controller.provision.bootstrap import BootstrapFiles
from controller.provision.contract import Provider
from controller.provision.model import Infras
from controller.provision.refresh import CatalogStore
from controller.state.table import Table


class ControllerStatus(Protocol):
    """What /readyz and /v1/status read from the running controller."""

    def ready_to_serve(self) -> bool: ...

    def status(self) -> dict[str, object]: ...


class NodeAdmin(Protocol):
    """Revoking and deleting nodes (the running controller: NATS user and record)."""

    async def revoke_node(self, node_id: str) -> NodeRecord: ...

    async def delete_node(self, node_id: str) -> None: ...


@dataclass(frozen=True)
class AgentBootstrap:
    """What a join token's holder needs besides the token: the NATS URL for agents, the
    controller's command-signing public key, and the pin of the CA NATS serves (also in
    the token itself; "" when NATS is plain)."""

    nats_url: str
    controller_key: str
    ca_sha256: str = ""
    # The API's own CA pin, which the one-line join checks ("" without TLS).
    api_ca_sha256: str = ""


API_TOKEN = web.AppKey("api_token", str)
API_TOKENS = web.AppKey("api_tokens", ApiTokens)
AUDIT = web.AppKey("audit", AuditLog)
STATUS: web.AppKey[ControllerStatus] = web.AppKey("status")
FLEET = web.AppKey("fleet", Fleet)
NODE_ADMIN: web.AppKey[NodeAdmin] = web.AppKey("node_admin")
TOKENS = web.AppKey("tokens", TokenService)
TOKEN_RECORDS: web.AppKey[Table[TokenRecord]] = web.AppKey("token_records")
AGENT_BOOTSTRAP = web.AppKey("agent_bootstrap", AgentBootstrap)
BOOTSTRAP = web.AppKey("bootstrap", BootstrapFiles)
METRICS_HUB = web.AppKey("metrics_hub", MetricsHub)
JOBS = web.AppKey("jobs", JobEngine)
DEPLOYER = web.AppKey("deployer", Deployer)
SIGNING_KEYS = web.AppKey("signing_keys", SigningKeys)
INFRAS: web.AppKey[Infras] = web.AppKey("infras")
PROVIDERS: web.AppKey[Mapping[str, Provider]] = web.AppKey("providers")
CATALOGS: web.AppKey[CatalogStore] = web.AppKey("catalogs")
MESH = web.AppKey("mesh", MeshService)  # overlay networks (issue 12)
