"""Run the controller and its API until told to stop (used by `barista server` and the demo)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from controller.api.app import ApiServer
from controller.config import ControllerConfig, default_client_config_path, write_client_config
from controller.service import Controller, RunningController

log = logging.getLogger("barista.controller")


@dataclass
class Running:
    controller: RunningController
    api: ApiServer


@asynccontextmanager
async def running_controller(
    config: ControllerConfig, *, write_client: bool = True
) -> AsyncIterator[Running]:
    async with Controller(config) as controller:
        async with ApiServer(controller, host=config.api_host, port=config.api_port) as api:
            controller.provisioning.set_api_url(api.url)
            if write_client:
                path = config.client_config or default_client_config_path()
                tls = controller.tls
                write_client_config(
                    path, url=api.url, token=controller.secrets.api_token,
                    ca_file=str(tls.ca_file) if tls is not None else "",
                    ca_sha256=tls.ca_sha256 if tls is not None else "",
                )
                log.info("CLI config written to %s", path)
            yield Running(controller, api)


async def serve_forever(config: ControllerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_controller(config) as run:
        log.info(
            "barista controller serving API on %s, NATS on %s", run.api.url, run.controller.nats_url
        )
        await stop.wait()
        log.info("shutting down")
