"""`barista ingest`'s server process: ingest workers (METRICS -> InfluxDB) on their own,
joining the controller's durable consumer, until SIGTERM/SIGINT or ``stop``."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from typing import Any

import nats
import nats.js.errors

from controller.config import ControllerConfig
from controller.ingest.errors import SinkConfigError
from controller.ingest.service import IngestService, sink_config_of
from controller.ingest.sinks import make_sink
from controller.state.streams import METRICS
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.ingest.process")


async def run_ingest(cfg: ControllerConfig, stop: asyncio.Event | None = None) -> None:
    """Connect, wait for the METRICS stream, run the workers until ``stop`` or a signal."""
    sink_config = sink_config_of(cfg)
    if sink_config is None:
        raise SinkConfigError("no sink: influx_kind is empty")
    make_sink(sink_config)  # a bad sink config fails now, not after NATS is reached
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    creds: dict[str, Any] = (
        {"user": cfg.nats_user, "password": cfg.nats_password} if cfg.nats_user
        else {"user_credentials": cfg.nats_creds} if cfg.nats_creds else {})
    if cfg.nats_ca_file:  # a NATS serving TLS: trust its CA only
        creds["tls"] = ssl.create_default_context(cafile=cfg.nats_ca_file)
    nc = await nats.connect(
        cfg.nats_url, name="barista-ingest", max_reconnect_attempts=-1,
        reconnect_time_wait=0.5, **creds,
    )
    try:
        js = nc.jetstream()
        # The controller owns the stream's config; this process only waits for it.
        while not stop.is_set():
            try:
                await js.stream_info(METRICS)
                break
            except nats.js.errors.NotFoundError:
                log.warning("ingest: no METRICS stream yet (is the controller running?)")
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except TimeoutError:
                    pass
        if stop.is_set():
            return
        async with IngestService(
            js=js, sink_config=sink_config, workers=cfg.ingest_workers,
            subjects=Subjects(cfg.subject_prefix), name="ingest-proc",
        ) as svc:
            log.info("ingest: running %d worker(s) into %s", len(svc.workers), svc.sink.name)
            await stop.wait()
            log.info("ingest: stopping (%s)", json.dumps(
                {k: svc.status()[k] for k in ("batches", "points", "write_errors")}))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        try:
            await asyncio.wait_for(nc.drain(), 5)
        except Exception:
            await nc.close()
