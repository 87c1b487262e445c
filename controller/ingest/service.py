"""IngestService: one sink and N IngestWorkers sharing the durable consumer, as one component.

Used inside the controller (when a sink is configured) and by `barista ingest`, a separate
process whose workers load-balance with the controller's on the same durable consumer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from nats.js import JetStreamContext

from controller.ingest.errors import SinkConfigError
from controller.ingest.sinks import InfluxV1Sink, InfluxV2Sink, SinkConfig, make_sink
from controller.ingest.worker import IngestWorker
from controller.state.streams import METRICS
from protocol.subjects import Subjects

if TYPE_CHECKING:
    from controller.config import ControllerConfig

log = logging.getLogger("barista.controller.ingest")


def sink_config_of(config: ControllerConfig) -> SinkConfig | None:
    """The sink the controller's settings describe; None when influx_kind is empty (off)."""
    kind: Literal["influx1", "influx2"]
    if not config.influx_kind:
        return None
    if config.influx_kind == "influx1":
        kind = "influx1"
    elif config.influx_kind == "influx2":
        kind = "influx2"
    else:
        raise SinkConfigError(
            f"influx_kind {config.influx_kind!r} must be influx1, influx2 or empty"
        )
    return SinkConfig(
        kind=kind,
        url=config.influx_url,
        db=config.influx_db,
        rp=config.influx_rp,
        user=config.influx_user,
        password=config.influx_password,
        token=config.influx_token,
        org=config.influx_org,
        bucket=config.influx_bucket,
    )


class IngestService:
    """``async with IngestService(js=js, sink_config=cfg, workers=2) as svc: ...``

    The METRICS stream must exist (the controller creates it; `barista ingest` waits for
    it). Raises SinkConfigError for an incomplete sink config.
    """

    def __init__(
        self,
        *,
        js: JetStreamContext,
        sink_config: SinkConfig,
        workers: int = 1,
        stream: str = METRICS,
        durable: str = "ingest",
        subjects: Subjects | None = None,
        name: str = "ingest",
        create_database: bool = True,
        **worker_options: Any,
    ) -> None:
        if workers < 1:
            raise ValueError(f"ingest workers must be >= 1, not {workers}")
        self.js = js
        self.sink_config = sink_config
        self.create_database = create_database
        # Built now so that a bad configuration fails before anything starts.
        self.sink: InfluxV1Sink | InfluxV2Sink = make_sink(sink_config)
        self.workers = [
            IngestWorker(
                js=js,
                sink=self.sink,
                stream=stream,
                durable=durable,
                subjects=subjects,
                name=f"{name}-{i}",
                **worker_options,
            )
            for i in range(workers)
        ]
        self._started = False

    async def __aenter__(self) -> IngestService:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if isinstance(self.sink, InfluxV1Sink) and self.create_database:
            # Convenience for a fresh influxd; a user without the right to create it gets
            # a warning, and writes keep retrying until someone creates it.
            error = await self.sink.create_database()
            if error:
                log.warning("ingest: could not create database %s: %s", self.sink.db, error)
        for worker in self.workers:
            await worker.start()
        log.info("ingest: %d worker(s) writing to %s", len(self.workers), self.sink.name)

    async def stop(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):  # stop the others whatever one does
                await worker.stop()
        await self.sink.close()
        self._started = False

    def status(self) -> dict[str, Any]:
        """Totals over the workers, and each worker's own figures."""
        per = [w.status() for w in self.workers]
        errors = [w.stats.last_error for w in self.workers if w.stats.last_error]
        writes = [w.stats.last_write for w in self.workers if w.stats.last_write]
        return {
            "sink": self.sink.name,
            "workers": per,
            "batches": sum(w.stats.batches for w in self.workers),
            "points": sum(w.stats.points for w in self.workers),
            "malformed": sum(w.stats.malformed for w in self.workers),
            "rejected": sum(w.stats.rejected for w in self.workers),
            "write_errors": sum(w.stats.write_errors for w in self.workers),
            # names and values the encoder had to replace, and tags, fields and points it
            # dropped, summed over the workers (infra/influxdb/README.md lists the rules)
            "line_protocol": _sum_counts(w.encoder.counts.as_dict() for w in self.workers),
            "backing_off": any(w.backing_off for w in self.workers),
            "last_error": errors[-1] if errors else None,
            "last_write": max(writes) if writes else None,
        }


def _sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = dict.fromkeys(("replaced", "dropped_tags", "dropped_fields",
                                          "dropped_points"), 0)
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total
