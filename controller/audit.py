"""The audit trail: every mutating API call and every job, appended to the AUDIT stream.

Records say who (token name and role), what (method, path, action, or the job's command
summary), on which nodes (selector, scope, expected set) and how it ended. They never
carry a secret: no request body is copied, jobs give env *names* only, and callers pass
only the fields listed in ``AuditRecord``. A failed append is logged and counted, never
turned into a failed call (the call has already happened).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from controller.state.streams import AUDIT
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.audit")

# A command summary in the trail is cut here: enough to recognise it.
COMMAND_MAX = 200
# The expected node ids a job record lists (the count is always whole): keeps one record
# well inside NATS's max_payload for very large fleets.
EXPECTED_MAX = 10_000
READ_MAX = 1000


class AuditRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    at: float
    kind: Literal["api", "job.submitted", "job.finished"]
    who: str
    role: str = ""
    scope: str = ""
    # api calls
    method: str = ""
    path: str = ""
    action: str = ""
    status: int = 0
    # jobs (and what an api call acted on: an app name, a token name, a job id)
    target: str = ""
    selector: str = ""
    job_id: str = ""
    command: str = ""
    env_keys: list[str] = []
    expected: list[str] = []
    expected_count: int = 0
    counts: dict[str, int] = {}
    outcome: str = ""


def command_summary(*, action: str, argv: list[str], shell: str) -> str:
    text = shell or " ".join(argv) or action
    return text if len(text) <= COMMAND_MAX else text[: COMMAND_MAX - 1] + "…"


class AuditLog:
    """Appends to and reads the AUDIT stream through the controller's JetStream context."""

    def __init__(self, *, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subject = subjects.audit
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(AuditRecord)
        self.failures = 0

    async def append(self, record: AuditRecord) -> None:
        try:
            await self._js.publish(self._subject, self._encoder.encode(record), stream=AUDIT)
        except Exception as exc:  # the audited act is done; losing its record is logged
            self.failures += 1
            log.error("audit record not stored (%s %s by %s): %s", record.kind,
                      record.action or record.job_id, record.who, exc)

    async def read(self, *, since: float = 0.0, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` records at or after ``since``, oldest first."""
        limit = max(1, min(READ_MAX, limit))
        info = await self._js.stream_info(AUDIT)
        first, seq = info.state.first_seq, info.state.last_seq
        out: list[AuditRecord] = []
        while seq >= first and seq > 0 and len(out) < limit:
            try:
                msg = await self._js.get_msg(AUDIT, seq)
            except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
                seq -= 1
                continue
            seq -= 1
            if msg.data is None:
                continue
            try:
                rec = self._decoder.decode(msg.data)
            except msgspec.DecodeError:
                continue
            if rec.at < since:
                break
            out.append(rec)
        out.reverse()
        return out


def to_json(record: AuditRecord) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(record)
    return out
