"""The REST API v1: ``make_app`` builds the aiohttp application (middleware, one route table
per resource, one typed key per service); ``ApiServer`` serves it on host:port."""

from __future__ import annotations

import logging

from aiohttp import web

from controller.api import keys
from controller.api.middleware import MAX_BODY, auth_middleware, error_middleware
from controller.api.routes import apps, jobs, metrics, nodes, status, tokens
from controller.service import RunningController

log = logging.getLogger("barista.controller.api")


def make_app(controller: RunningController, *, api_token: str) -> web.Application:
    """The API over a running controller. It owns no background work: the services are
    the controller's, and they outlive the API."""
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=MAX_BODY)
    app[keys.API_TOKEN] = api_token
    app[keys.STATUS] = controller
    app[keys.FLEET] = controller.fleet
    app[keys.NODE_ADMIN] = controller
    app[keys.TOKENS] = controller.tokens
    app[keys.TOKEN_RECORDS] = controller.tokens_table
    app[keys.AGENT_BOOTSTRAP] = keys.AgentBootstrap(
        nats_url=controller.agent_nats_url,
        controller_key=controller.secrets.signer.public_key_b64,
    )
    app[keys.METRICS_HUB] = controller.hub
    app[keys.JOBS] = controller.jobs
    app[keys.DEPLOYER] = controller.deployer
    for module in (status, nodes, metrics, tokens, jobs, apps):
        app.add_routes(module.routes())
    return app


class ApiServer:
    """Runs the API on host:port; port 0 picks a free one."""

    def __init__(self, controller: RunningController, *, host: str, port: int) -> None:
        self.app = make_app(controller, api_token=controller.secrets.api_token)
        self.host = host
        self.port = port
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> ApiServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        log.info("API listening on %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
