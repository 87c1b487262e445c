"""The REST API v1: ``make_app`` builds the aiohttp application (middleware, one route table
per resource, one typed key per service); ``ApiServer`` serves it on host:port."""

from __future__ import annotations

import logging

from aiohttp import web

from controller.api import keys
from controller.api.middleware import (
    MAX_BODY,
    audit_middleware,
    auth_middleware,
    error_middleware,
)
from controller.api.routes import (
    apps,
    audit,
    auth,
    bootstrap,
    infras,
    jobs,
    metrics,
    networks,
    nodes,
    providers,
    signing,
    status,
    tokens,
)
from controller.provision.bootstrap import BootstrapFiles, ca_der_of
from controller.service import RunningController

log = logging.getLogger("barista.controller.api")


def make_app(controller: RunningController, *, api_token: str) -> web.Application:
    """The API over a running controller. It owns no background work: the services are
    the controller's, and they outlive the API."""
    # Outermost first: the audit sees the status error_middleware made of an exception.
    app = web.Application(middlewares=[audit_middleware, error_middleware, auth_middleware],
                          client_max_size=MAX_BODY)
    app[keys.API_TOKEN] = api_token
    app[keys.API_TOKENS] = controller.api_tokens
    app[keys.AUDIT] = controller.audit
    app[keys.STATUS] = controller
    app[keys.FLEET] = controller.fleet
    app[keys.NODE_ADMIN] = controller
    app[keys.TOKENS] = controller.tokens
    app[keys.TOKEN_RECORDS] = controller.tokens_table
    app[keys.AGENT_BOOTSTRAP] = keys.AgentBootstrap(
        nats_url=controller.agent_nats_url,
        controller_key=controller.secrets.signer.public_key_b64,
        ca_sha256=controller.agent_ca_sha256,
        api_ca_sha256=controller.tls.ca_sha256 if controller.tls is not None else "",
    )
    app[keys.BOOTSTRAP] = BootstrapFiles(
        data_dir=controller.config.data_dir,
        nats_url=controller.agent_nats_url,
        controller_keys=controller.signing_keys.enroll_keys,
        ca_sha256=controller.tls.ca_sha256 if controller.tls is not None else "",
        ca_der=ca_der_of(controller.tls.ca_file) if controller.tls is not None else b"",
        nats_ca_sha256=controller.agent_ca_sha256,
    )
    app[keys.METRICS_HUB] = controller.hub
    app[keys.JOBS] = controller.jobs
    app[keys.DEPLOYER] = controller.deployer
    app[keys.SIGNING_KEYS] = controller.signing_keys
    app[keys.MESH] = controller.mesh
    app[keys.INFRAS] = controller.infras
    app[keys.PROVIDERS] = controller.provisioning.providers
    app[keys.CATALOGS] = controller.provisioning.catalogs
    for module in (status, nodes, metrics, tokens, jobs, apps, auth, audit, signing,
                   bootstrap, networks, infras, providers):
        app.add_routes(module.routes())
    return app


class ApiServer:
    """Runs the API on host:port; port 0 picks a free one. HTTPS with the controller's own
    certificate when it has one (config tls), plain HTTP otherwise (said so in the log)."""

    def __init__(self, controller: RunningController, *, host: str, port: int) -> None:
        self.app = make_app(controller, api_token=controller.secrets.api_token)
        self.host = host
        self.port = port
        self.tls = controller.tls
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    async def __aenter__(self) -> ApiServer:
        await self._runner.setup()
        ssl_context = self.tls.server_context() if self.tls is not None else None
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        if self.tls is None:
            log.warning("API listening on %s without TLS (tls = false): tokens travel in "
                        "the clear; use this only on loopback", self.url)
        else:
            log.info("API listening on %s (TLS, CA sha256 %s)", self.url, self.tls.ca_sha256)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
