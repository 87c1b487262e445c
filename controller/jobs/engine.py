"""Fleet commands: scatter-gather over NATS, rolling batches, and a job history in JetStream.

A job computes the expected node set from the inventory and a selector, publishes one signed
command (broadcast) or one per node (direct, for small sets, batches and any env values),
gathers replies on an inbox, finishes as soon as every expected node answered, and accounts
for every node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from controller.audit import EXPECTED_MAX, AuditLog, AuditRecord, command_summary
from controller.auth import narrow
from controller.errors import BadRequest, NotFound
from controller.events import result_data_json
from controller.fleet import Fleet
from controller.models import NodeRecord
from controller.nats.client import Flusher
from controller.state.streams import JOBS
from controller.state.table import Table
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    Command,
    CommandAction,
    CommandResult,
    Event,
    JobFinished,
    JobOutput,
    JobStarted,
)
from protocol.selectors import Selector
from protocol.signing import Signer
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.jobs")

# A node's outcome in one job (not its liveness: that is controller.models.NodeStatus).
NodeOutcome = Literal["ok", "failed", "timeout", "no-response", "rejected", "error", "skipped"]
JobStatus = Literal["running", "done", "stopped", "interrupted"]
FAILURES: frozenset[str] = frozenset({"failed", "timeout", "no-response", "rejected", "error"})
ACTIONS = ("ping", "facts", "exec", "reconcile")
# Up to this many targets a job publishes per node; above it, one broadcast.
DIRECT_MAX = 16
# Time a node gets beyond the command's own timeout to deliver its reply.
REPLY_GRACE = 2.0
# Agents refuse commands whose TTL (timeout + grace + 30 s) exceeds a day; keep below it.
MAX_TIMEOUT = 23 * 3600.0
_BATCH = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


def _outcome(status: str) -> NodeOutcome:
    return status if status in ("ok", "failed", "timeout", "rejected", "error") else "error"  # type: ignore[return-value]


class JobSpec(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    action: str = "exec"
    selector: str = ""
    targets: list[str] = []
    argv: list[str] = []
    shell: str = ""
    env: dict[str, str] = {}
    cwd: str = ""
    user: str = ""
    timeout: float = 60.0
    output_cap: int = 64 * 1024
    stream_output: bool = False
    batch: str = ""  # "10" nodes or "25%" of the expected set; empty = all at once
    pause: float = 0.0  # seconds between batches
    max_failures: str = ""  # "3" or "10%": stop the rollout when exceeded
    mode: Literal["auto", "broadcast", "direct"] = "auto"

    def command(
        self, *, id: str, job_id: str, issued_at: float, ttl: float, selector: str,
        targets: list[str],
    ) -> Command:
        """The signed-to-be wire command of this spec (the one place a JobSpec becomes a
        Command): the fields they share go over as they are; validate() checked action."""
        carried = {name: getattr(self, name) for name in _CARRIED_COMMAND_FIELDS}
        return Command(
            **carried, id=id, job_id=job_id, issued_at=issued_at, ttl=ttl,
            action=cast(CommandAction, self.action), selector=selector, targets=targets,
        )


# What a JobSpec passes to its Command unchanged (action, selector, targets: per batch).
_CARRIED_COMMAND_FIELDS = tuple(
    name for name in Command.__struct_fields__
    if name in JobSpec.__struct_fields__ and name not in ("action", "selector", "targets")
)


class NodeResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    node_id: str
    status: NodeOutcome
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    reason: str = ""
    data: dict[str, Any] = {}
    expected: bool = True
    batch: int = 0
    at: float = 0.0

    @classmethod
    def of(cls, res: CommandResult, *, expected: bool, batch: int) -> NodeResult:
        """The job's record of a node's wire result (the one place they are converted):
        the fields the two share go over as they are; status and data are converted."""
        carried = {name: getattr(res, name) for name in _CARRIED_RESULT_FIELDS}
        return cls(**carried, status=_outcome(res.status), data=result_data_json(res.data),
                   expected=expected, batch=batch, at=time.time())


# What a node's CommandResult and the job's NodeResult share, copied by NodeResult.of.
_CARRIED_RESULT_FIELDS = tuple(
    name for name in CommandResult.__struct_fields__
    if name in NodeResult.__struct_fields__ and name not in ("status", "data")
)


class JobRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    spec: JobSpec
    created_at: float
    created_by: str = ""
    # The submitter's role and scope (a selector ANDed with spec.selector: the nodes the
    # job may reach); empty for unscoped submitters and the controller's own jobs.
    role: str = ""
    scope: str = ""
    expected: list[str] = []
    status: JobStatus = "running"
    finished_at: float = 0.0
    counts: dict[str, int] = {}
    stop_reason: str = ""
    batches: int = 1
    unexpected: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "action": self.spec.action,
            "command": self.spec.shell or " ".join(self.spec.argv) or self.spec.action,
            "selector": self.spec.selector,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "scope": self.scope,
            "finished_at": self.finished_at or None,
            "expected": len(self.expected),
            "counts": self.counts,
            "stop_reason": self.stop_reason,
            "batches": self.batches,
            "unexpected": self.unexpected,
        }


def parse_count(text: str, total: int, what: str) -> int | None:
    """'10' -> 10, '25%' -> ceil(25% of total); '' -> None."""
    if not text:
        return None
    m = _BATCH.match(text)
    if not m:
        raise BadRequest(f"{what} {text!r} must be a number or a percentage like 25%")
    n = int(m.group(1))
    if m.group(2):
        if not 0 <= n <= 100:
            raise BadRequest(f"{what} {text!r}: a percentage must be between 0% and 100%")
        return math.ceil(total * n / 100)
    return n


def validate(spec: JobSpec) -> Selector:
    if spec.action not in ACTIONS:
        raise BadRequest(f"unknown action {spec.action!r}; expected one of {', '.join(ACTIONS)}")
    if spec.action == "exec" and not (spec.argv or spec.shell):
        raise BadRequest("an exec job needs a command: argv or shell")
    if spec.argv and spec.shell:
        raise BadRequest("give argv or shell, not both")
    if not math.isfinite(spec.timeout) or not math.isfinite(spec.pause):
        raise BadRequest("timeout and pause must be numbers of seconds")
    if not (0 < spec.timeout <= MAX_TIMEOUT):
        raise BadRequest(f"timeout must be between 0 and {int(MAX_TIMEOUT)} seconds")
    if spec.output_cap < 0 or spec.output_cap > 1024 * 1024:
        raise BadRequest("output_cap must be between 0 and 1 MiB")
    if spec.pause < 0 or spec.pause > 3600:
        raise BadRequest("pause must be between 0 and 3600 seconds")
    parse_count(spec.batch, 100, "batch")
    parse_count(spec.max_failures, 100, "max_failures")
    if spec.batch and parse_count(spec.batch, 100, "batch") == 0:
        raise BadRequest("batch must be at least 1 node (or 1%)")
    return Selector.parse(spec.selector)


class _Run:
    """The state of one running job (memory only; results are persisted as they come)."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.results: dict[str, NodeResult] = {}
        self.waiting: set[str] = set()
        self.batch = 0
        self.batch_done = asyncio.Event()
        self.listeners: list[asyncio.Queue[tuple[str, Any]]] = []
        self.done = asyncio.Event()
        self.expected = frozenset(record.expected)
        self.unpublished: list[bytes] = []

    def notify(self, kind: str, payload: Any) -> None:
        for q in list(self.listeners):
            try:
                q.put_nowait((kind, payload))
            except asyncio.QueueFull:
                pass  # a slow reader misses live items; it can fetch the job afterwards


# Counts and logs a message refused off the wire: (where, subject, why).
RejectMessage = Callable[[str, str, ProtocolError], None]
# Counts a refused request: (where, reason).
RefuseRequest = Callable[[str, str], None]


class JobEngine:
    """Runs jobs for one controller; job records live in KV, results in the JOBS stream.

    Commands go out and results come in on ``nc`` (the peer connection); finished jobs'
    results are read back from the JOBS stream through ``js``.
    """

    def __init__(
        self,
        *,
        records: Table[JobRecord],
        fleet: Fleet,
        nc: NATS,
        js: JetStreamContext,
        subjects: Subjects,
        signer: Signer,
        reject: RejectMessage,
        refuse: RefuseRequest,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.records = records
        self._fleet = fleet
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._signer = signer
        self._reject = reject
        self._refuse = refuse
        self._audit = audit
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._recent: dict[str, list[NodeResult]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"replies": 0, "bad_replies": 0}
        self._flusher = Flusher()
        self._result_encoder = msgspec.msgpack.Encoder()
        self._sub: Subscription | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self._mark_interrupted()
        self._sub = await self._nc.subscribe(self._subjects.results_any, cb=self._on_result,
                                             pending_msgs_limit=1_000_000)

    async def stop(self) -> None:
        self._flusher.close()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def _mark_interrupted(self) -> None:
        """Jobs left 'running' by a controller that is gone, past any possible end."""
        now = self._clock()
        for job in self.records:
            if job.status != "running" or job.id in self._runs:
                continue
            longest = (job.spec.timeout + REPLY_GRACE + job.spec.pause) * max(1, job.batches)
            if now > job.created_at + longest + 60:

                def mark(cur: JobRecord) -> JobRecord | None:
                    if cur.status != "running":
                        return None
                    return msgspec.structs.replace(
                        cur, status="interrupted", finished_at=now,
                        stop_reason="the controller running it stopped before it finished",
                    )

                try:
                    await self.records.mutate(job.id, mark)
                except Exception as exc:
                    log.warning("could not mark job %s interrupted: %s", job.id, exc)

    # -- submit ----------------------------------------------------------------------

    def expected_nodes(self, spec: JobSpec, selector: Selector) -> list[NodeRecord]:
        fleet = self._fleet
        if spec.targets:
            nodes = []
            for node_id in spec.targets:
                node = fleet.nodes.get(node_id)
                if node is None:
                    raise NotFound(f"target node {node_id!r} not found")
                nodes.append(node)
            return [n for n in nodes if selector.matches(n.labels)]
        return list(fleet.select(selector))

    async def submit(self, spec: JobSpec, *, created_by: str = "", role: str = "",
                     scope: Selector | None = None) -> JobRecord:
        """Start a job. ``scope`` (a scoped API token's selector) is ANDed with the job's
        selector before the expected set is computed and anything is signed: a node
        outside it is never targeted, even when named in ``targets`` (then it is left
        out of the expected set, as a target the selector does not match is)."""
        scope = scope or Selector()
        selector = narrow(validate(spec), scope)
        nodes = self.expected_nodes(spec, selector)
        if spec.mode == "broadcast" and spec.env:
            reason = ("mode broadcast with env is refused: every node reads the broadcast "
                      "subject, so the env values would reach nodes the job does not target; "
                      "a job with env is sent to each node on its own subject (mode auto or "
                      "direct)")
            self._refuse("job_broadcast_env", reason)
            raise BadRequest(reason)
        if spec.mode == "broadcast" and (spec.targets or (spec.batch and parse_count(
                spec.batch, len(nodes), "batch") not in (None, len(nodes)))):
            raise BadRequest("mode broadcast sends one message to every node the selector "
                             "matches; it cannot target a node list or run batches (use mode "
                             "direct or auto)")
        now = self._clock()
        job_id = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)
        size = parse_count(spec.batch, len(nodes), "batch") or len(nodes) or 1
        record = JobRecord(
            id=job_id,
            spec=spec,
            created_at=now,
            created_by=created_by,
            role=role,
            scope=str(scope),
            expected=[n.id for n in nodes],
            batches=max(1, math.ceil(len(nodes) / max(1, size))),
        )
        await self.records.create(job_id, record)
        await self._audit_job(record, "job.submitted")
        run = _Run(record)
        self._runs[job_id] = run
        task = asyncio.create_task(self._run(run, nodes, size), name=f"job-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("job %s: %s on %d node(s) (selector %r, by %s)", job_id, spec.action,
                 len(nodes), spec.selector, created_by or "-")
        return record

    async def run(self, spec: JobSpec, *, created_by: str = "") -> JobRecord:
        record = await self.submit(spec, created_by=created_by)
        return await self.wait(record.id)

    async def _audit_job(self, job: JobRecord, kind: str) -> None:
        """The job's audit record: who, what (a command summary and env *names*, never env
        values), where (selector, scope, expected nodes) and, once done, the counts."""
        if self._audit is None:
            return
        spec = job.spec
        await self._audit.append(AuditRecord(
            at=self._clock(), kind="job.finished" if kind == "job.finished" else "job.submitted",
            who=job.created_by or "-", role=job.role, scope=job.scope, job_id=job.id,
            action=spec.action, selector=spec.selector,
            command=command_summary(action=spec.action, argv=spec.argv, shell=spec.shell),
            env_keys=sorted(spec.env), expected=job.expected[:EXPECTED_MAX],
            expected_count=len(job.expected), counts=dict(job.counts),
            outcome=job.status if kind == "job.finished" else "",
        ))

    async def wait(self, job_id: str) -> JobRecord:
        run = self._runs.get(job_id)
        if run is not None:
            await run.done.wait()
        job = self.records.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    # -- running ---------------------------------------------------------------------

    async def _run(self, run: _Run, nodes: list[NodeRecord], size: int) -> None:
        job = run.record
        spec = job.spec
        stop_reason = ""
        try:
            threshold = parse_count(spec.max_failures, len(nodes), "max_failures")
            batches = [nodes[i : i + size] for i in range(0, len(nodes), size)] or [[]]
            for i, batch in enumerate(batches):
                run.batch = i
                await self._run_batch(run, batch, broadcast=self._broadcast(spec, batches))
                await self._persist(run)
                failures = sum(1 for r in run.results.values() if r.status in FAILURES
                               and r.expected)
                if threshold is not None and failures > threshold and i < len(batches) - 1:
                    stop_reason = (f"stopped after batch {i + 1}/{len(batches)}: {failures} "
                                   f"failure(s) exceed max_failures {spec.max_failures}")
                    for rest in batches[i + 1 :]:
                        for node in rest:
                            self._record(run, NodeResult(node_id=node.id, status="skipped",
                                                         reason="rollout stopped",
                                                         batch=i + 1, at=self._clock()))
                    break
                if spec.pause and i < len(batches) - 1:
                    await asyncio.sleep(spec.pause)
        except asyncio.CancelledError:
            stop_reason = "controller shutting down"
            raise
        except Exception as exc:
            log.exception("job %s failed", job.id)
            stop_reason = f"internal error: {exc}"
        finally:
            await self._finish(run, stop_reason)

    @staticmethod
    def _broadcast(spec: JobSpec, batches: list[list[NodeRecord]]) -> bool:
        if spec.env:
            # Env values may be secrets; the broadcast subject is read by every node.
            return False
        if spec.mode != "auto":
            return spec.mode == "broadcast"
        return len(batches) == 1 and not spec.targets and len(batches[0]) > DIRECT_MAX

    def _command(self, run: _Run, *, targets: list[str], selector: str) -> bytes:
        spec = run.record.spec
        cmd = spec.command(
            id=secrets.token_hex(12),
            job_id=run.record.id,
            issued_at=self._clock(),
            ttl=spec.timeout + REPLY_GRACE + 30,
            selector=selector,
            targets=targets,
        )
        return codec.encode(self._signer.sign(cmd))

    async def _run_batch(self, run: _Run, batch: list[NodeRecord], *, broadcast: bool) -> None:
        spec = run.record.spec
        nc, subjects = self._nc, self._subjects
        now = self._clock()
        reachable = []
        for node in batch:
            if node.status == "offline":
                # Not waited for; a real reply, should one come, replaces this.
                self._record(run, NodeResult(node_id=node.id, status="no-response",
                                             reason="node is offline", batch=run.batch, at=now))
            else:
                reachable.append(node)
        run.waiting = {n.id for n in reachable} - set(run.results)
        run.batch_done.clear()
        if not run.waiting:
            return
        if broadcast:
            # The agents match the selector themselves: it carries the scope too.
            selector = str(narrow(Selector.parse(spec.selector),
                                   Selector.parse(run.record.scope)))
            await nc.publish(subjects.cmd_all, self._command(run, targets=[],
                                                             selector=selector))
        else:
            for node in reachable:
                await nc.publish(subjects.cmd_node(node.id),
                                 self._command(run, targets=[node.id], selector=""))
        await self._flusher.flush(nc)
        # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with the
        # batch's last reply (gh-86296), and a job stopped by shutdown ran its next batch.
        try:
            async with asyncio.timeout(spec.timeout + REPLY_GRACE):
                await run.batch_done.wait()
        except TimeoutError:
            pass
        at = self._clock()
        for node_id in sorted(run.waiting):
            self._record(run, NodeResult(
                node_id=node_id, status="no-response", batch=run.batch, at=at,
                reason=f"no reply within {spec.timeout + REPLY_GRACE:.0f}s (lost or went away)"))
        run.waiting = set()

    async def _on_result(self, msg: Msg) -> None:
        """Every node's results arrive here; the subject names the node that sent it (NATS
        permissions let a node publish only under its own id), the body must agree."""
        try:
            res = codec.decode(msg.data, CommandResult)
            if res.node_id != self._subjects.node_id_of(msg.subject):
                raise ProtocolError(f"result for node {res.node_id!r} sent by another node")
        except ProtocolError as exc:
            self.stats["bad_replies"] += 1
            self._reject("results", msg.subject, exc)
            return
        self.stats["replies"] += 1
        run = self._runs.get(res.job_id)
        if run is None:
            self._late(res)
            return
        self._accept(run, res)

    def _late(self, res: CommandResult) -> None:
        """An answer after the job finished (early finish does not wait for nodes outside
        the expected set): still recorded, never silently dropped."""
        recent = self._recent.get(res.job_id)
        if recent is None or any(r.node_id == res.node_id for r in recent):
            return  # another controller's job, or this node already has its result
        late = NodeResult.of(res, expected=False, batch=0)
        if not late.reason:
            late.reason = "answered after the job finished"
        recent.append(late)
        nc = self._nc
        if nc.is_connected:
            task = asyncio.ensure_future(nc.publish(self._subjects.job_results(res.job_id),
                                                    self._result_encoder.encode(late)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _accept(self, run: _Run, res: CommandResult) -> None:
        node_id = res.node_id
        prior = run.results.get(node_id)
        if prior is not None and prior.reason != "node is offline":
            return  # first answer wins
        self._record(run, NodeResult.of(res, expected=node_id in run.expected,
                                        batch=run.batch))
        run.waiting.discard(node_id)
        if not run.waiting:
            run.batch_done.set()

    def _record(self, run: _Run, result: NodeResult) -> None:
        if result.expected and result.node_id not in run.expected:
            result = msgspec.structs.replace(result, expected=False)
        run.results[result.node_id] = result
        if run.listeners:
            run.notify("result", result)
        run.unpublished.append(self._result_encoder.encode(result))

    async def _persist(self, run: _Run) -> None:
        """Results into the JOBS stream, in one go per batch: core publishes, no round trip
        per node on the hot path; the flush in _finish makes sure they left."""
        pending, run.unpublished = run.unpublished, []
        nc = self._nc
        if not pending or not nc.is_connected:
            return
        subject = self._subjects.job_results(run.record.id)
        for data in pending:
            await nc.publish(subject, data)

    async def _finish(self, run: _Run, stop_reason: str) -> None:
        counts: dict[str, int] = {}
        for r in run.results.values():
            if r.expected:
                counts[r.status] = counts.get(r.status, 0) + 1
        unexpected = sum(1 for r in run.results.values() if not r.expected)
        status: JobStatus = "stopped" if stop_reason else "done"
        final = msgspec.structs.replace(run.record, status=status, finished_at=self._clock(),
                                        counts=counts, stop_reason=stop_reason,
                                        unexpected=unexpected)
        try:
            await self._persist(run)
            await self._flusher.flush(self._nc)
            await self.records.put(final.id, final)
        except Exception as exc:
            log.error("job %s: result not saved: %s", final.id, exc)
        run.record = final
        self._recent[final.id] = list(run.results.values())
        while len(self._recent) > 50:
            self._recent.pop(next(iter(self._recent)))
        await self._audit_job(final, "job.finished")
        run.notify("done", final)
        run.done.set()
        self._runs.pop(final.id, None)
        log.info("job %s %s: %s%s", final.id, status, counts,
                 f" ({stop_reason})" if stop_reason else "")

    def on_node_event(self, event: Event) -> str | None:
        """Relay an agent's job progress event (streamed output) to the job's listeners.

        Only a node the job targets speaks about it: returns why an event is refused (the
        caller counts it), None when it was relayed or concerns no running job.
        """
        if not isinstance(event.payload, JobStarted | JobOutput | JobFinished):
            return None
        job_id = event.payload.job_id
        run = self._runs.get(job_id)
        record = run.record if run is not None else self.records.get(job_id)
        if record is None:
            return None  # no such job: nothing to relay it to
        expected = run.expected if run is not None else frozenset(record.expected)
        if event.node_id not in expected:
            return (f"node {event.node_id} sent {event.type} for job {job_id}, "
                    "which does not target it")
        if run is not None:
            run.notify("event", event)
        return None

    # -- reads -----------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        job = self.records.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        run = self._runs.get(job_id)
        return run.record if run is not None else job

    def recent(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first (running ones as they are now)."""
        jobs = sorted(self.records, key=lambda j: j.created_at, reverse=True)
        return [self._runs[j.id].record if j.id in self._runs else j for j in jobs[:limit]]

    async def results(self, job_id: str) -> list[NodeResult]:
        self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            return sorted(run.results.values(), key=lambda r: r.node_id)
        if job_id in self._recent:
            return sorted(self._recent[job_id], key=lambda r: r.node_id)
        return await self._load_results(job_id)

    async def _load_results(self, job_id: str) -> list[NodeResult]:
        """Read a finished job's results back from the JOBS stream (after a restart)."""
        js = self._js
        subject = self._subjects.job_results(job_id)
        out: dict[str, NodeResult] = {}
        decoder = msgspec.msgpack.Decoder(NodeResult)
        info = await js.stream_info(JOBS, subjects_filter=subject)
        if not (info.state.subjects or {}).get(subject):
            return []
        sub = await js.subscribe(subject, stream=JOBS, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5)
                except Exception:
                    break
                try:
                    r = decoder.decode(msg.data)
                except msgspec.DecodeError:
                    r = None
                if r is not None:
                    prior = out.get(r.node_id)
                    if prior is None or prior.reason == "node is offline":
                        out[r.node_id] = r
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return sorted(out.values(), key=lambda r: r.node_id)

    def listen(self, job_id: str) -> tuple[asyncio.Queue[tuple[str, Any]] | None,
                                           Callable[[], None]]:
        run = self._runs.get(job_id)
        if run is None:
            return None, lambda: None
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=10_000)
        run.listeners.append(q)

        def stop() -> None:
            if q in run.listeners:
                run.listeners.remove(q)

        return q, stop
