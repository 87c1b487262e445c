"""App deploys as desired state: specs, the ``apps``/``app_status`` buckets, rolling rollouts.

A rollout assigns the new version batch by batch, asks the batch to reconcile, gates on the
nodes' reported health and rolls back to the previous version when failures exceed the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import shlex
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import msgspec
from nats.aio.msg import Msg

from controller import jsontext
from controller.auth import check_covers, narrow
from controller.errors import BadRequest, Conflict, NotFound
from controller.fleet import Fleet
from controller.jobs.engine import MAX_TIMEOUT, JobEngine, JobSpec, NodeResult, parse_count
from controller.models import NodeRecord
from controller.state.table import Table
from protocol import codec
from protocol.errors import ProtocolError, SelectorError
from protocol.messages import (
    AppArtifact,
    AppRelease,
    AppReport,
    AppState,
    AppStatus,
    AppSyncReply,
    AppSyncRequest,
    ErrorReply,
    Event,
    HealthCheck,
)
from protocol.names import valid_app_name, valid_app_version
from protocol.selectors import Selector
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.deploy")

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_SPEC_BYTES = 256 * 1024
# An app's state on one node, as the node reports it (the wire's AppState).
NodeAppState = AppState
RolloutStatus = Literal["rolling", "done", "failed", "rolled-back"]
TERMINAL = frozenset({"running", "failed", "unhealthy"})


# --- the spec -----------------------------------------------------------------------


class ArtifactSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    url: str
    sha256: str
    dest: str = ""


class HealthSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    cmd: str = ""
    http: str = ""
    retries: int = 10
    interval: float = 1.0
    timeout: float = 5.0


class AppSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    version: str
    artifacts: list[ArtifactSpec] = []
    install: list[str] = []
    start: list[str] = []
    stop: list[str] = []
    env: dict[str, str] = {}
    unit: str = ""  # systemd unit text: becomes install/start/stop steps
    health: HealthSpec | None = None
    selector: str = ""
    batch: str = ""  # "1" node or "25%"; empty = all at once
    max_failures: str = "0"
    health_timeout: float = 300.0
    step_timeout: float = 300.0

    def release(self) -> AppRelease:
        """What a node gets over the wire (the unit expanded into steps)."""
        install, start, stop = list(self.install), list(self.start), list(self.stop)
        if self.unit:
            path = f"/etc/systemd/system/barista-{self.name}.service"
            install.append(f"printf '%s\\n' {shlex.quote(self.unit)} > {path}")
            install.append("systemctl daemon-reload")
            start.append(f"systemctl restart barista-{self.name}.service")
            stop.insert(0, f"systemctl stop barista-{self.name}.service || true")
        health = None
        if self.health is not None:
            h = self.health
            health = HealthCheck(cmd=h.cmd, http=h.http, retries=h.retries,
                                 interval=h.interval, timeout=h.timeout)
        return AppRelease(
            name=self.name, version=self.version,
            artifacts=[AppArtifact(url=a.url, sha256=a.sha256.lower(), dest=a.dest)
                       for a in self.artifacts],
            install=install, start=start, stop=stop, env=dict(self.env), health=health,
            step_timeout=self.step_timeout,
        )


def parse_spec(data: bytes | str | dict[str, Any], *, yaml_text: bool = False) -> AppSpec:
    """An AppSpec from a dict, JSON or YAML text; ``BadRequest`` names the bad field."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_SPEC_BYTES:
            raise BadRequest(f"app spec is larger than {MAX_SPEC_BYTES} bytes")
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        try:
            if yaml_text:
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = jsontext.loads(text, "app spec")
        except BadRequest:
            raise
        except Exception as exc:
            kind = "YAML" if yaml_text else "JSON"
            raise BadRequest(f"app spec is not valid {kind}: {exc}") from None
    else:
        raw = data
    if not isinstance(raw, dict):
        raise BadRequest("app spec must be a mapping (name, version, artifacts, steps, ...)")
    for key in ("name", "version"):
        if key not in raw or raw[key] in (None, ""):
            raise BadRequest(f"app spec: field '{key}' is required")
    # YAML turns `version: 1.0` into a float; a version is text.
    if isinstance(raw.get("version"), int | float) and not isinstance(raw["version"], bool):
        raw = {**raw, "version": str(raw["version"])}
    for key in ("install", "start", "stop"):
        if isinstance(raw.get(key), str):
            raw = {**raw, key: [raw[key]]}
    try:
        spec = msgspec.convert(raw, AppSpec)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"app spec: {_field_message(exc)}") from None
    validate_spec(spec)
    return spec


def _field_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # msgspec says "... - at `$.health.http`"; say "field 'health.http': ..." instead.
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", text)
    if m:
        where = m.group(2) or "(top level)"
        return f"field '{where}': {m.group(1)}"
    return text


def validate_spec(spec: AppSpec) -> None:
    if not valid_app_name(spec.name):
        raise BadRequest(f"app spec: field 'name' {spec.name!r} must be 1-40 characters of "
                         "a-z, 0-9 or '-'")
    if not valid_app_version(spec.version):
        raise BadRequest(f"app spec: field 'version' {spec.version!r} must be 1-64 characters "
                         "of letters, digits, '.', '_', '+' or '-', not starting with '.'")
    for i, art in enumerate(spec.artifacts):
        where = f"artifacts[{i}]"
        scheme = urllib.parse.urlsplit(art.url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise BadRequest(f"app spec: field '{where}.url' {art.url!r} must be an http://, "
                             "https:// or file:// URL")
        if not _SHA256.fullmatch(art.sha256):
            raise BadRequest(f"app spec: field '{where}.sha256' must be 64 hex digits "
                             f"(got {art.sha256!r})")
        dest = art.dest or urllib.parse.urlsplit(art.url).path.rsplit("/", 1)[-1]
        if not dest or "/" in dest or dest in (".", "..") or "\0" in dest:
            raise BadRequest(f"app spec: field '{where}.dest' {dest!r} must be a plain file "
                             "name inside the release directory")
    for key in ("install", "start", "stop"):
        for j, step in enumerate(getattr(spec, key)):
            if not step.strip() or "\0" in step:
                raise BadRequest(f"app spec: field '{key}[{j}]' must be a non-empty command")
    for k, v in spec.env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise BadRequest(f"app spec: field 'env' has an invalid variable {k!r}")
    if spec.health is not None:
        h = spec.health
        if h.http:
            u = urllib.parse.urlsplit(h.http)
            if u.scheme not in ("http", "https") or (u.hostname or "") not in LOOPBACK:
                raise BadRequest(f"app spec: field 'health.http' {h.http!r} must be an http "
                                 "URL on 127.0.0.1, localhost or [::1]")
        if not h.cmd and not h.http:
            raise BadRequest("app spec: field 'health' needs 'cmd' or 'http'")
        if not 1 <= h.retries <= 1000:
            raise BadRequest("app spec: field 'health.retries' must be between 1 and 1000")
        if not 0 <= h.interval <= 600 or not 0 < h.timeout <= 600:
            raise BadRequest("app spec: fields 'health.interval'/'health.timeout' must be "
                             "between 0 and 600 seconds")
    try:
        Selector.parse(spec.selector)
    except (SelectorError, ValueError) as exc:
        raise BadRequest(f"app spec: field 'selector' {spec.selector!r} is invalid: {exc}"
                         ) from None
    for key in ("batch", "max_failures"):
        try:
            parse_count(getattr(spec, key), 100, key)
        except BadRequest as exc:
            raise BadRequest(f"app spec: field '{key}': {exc.message}") from None
    if spec.batch and parse_count(spec.batch, 100, "batch") == 0:
        raise BadRequest("app spec: field 'batch' must be at least 1 node (or 1%)")
    limit = MAX_TIMEOUT / 2  # a reconcile job waits for both, within one command TTL
    for key in ("health_timeout", "step_timeout"):
        value = getattr(spec, key)
        if not math.isfinite(value) or not 0 < value <= limit:
            raise BadRequest(f"app spec: field '{key}' must be between 0 and {limit:g} s")
    if spec.health is not None and not all(
        math.isfinite(v) for v in (spec.health.interval, spec.health.timeout)
    ):
        raise BadRequest("app spec: fields 'health.interval'/'health.timeout' must be numbers")


# --- records ------------------------------------------------------------------------


class Rollout(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: RolloutStatus = "rolling"
    version: str = ""
    batch: int = 0
    batches: int = 1
    message: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    failed: dict[str, str] = {}  # node id -> error
    pending: list[str] = []  # assigned while offline; they converge when they return


class AppRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    current: AppSpec
    previous: AppSpec | None = None
    assignments: dict[str, str] = {}  # node id -> version it should run now
    rollout: Rollout = msgspec.field(default_factory=Rollout)

    def spec_for(self, version: str) -> AppSpec | None:
        if self.current.version == version:
            return self.current
        if self.previous is not None and self.previous.version == version:
            return self.previous
        return None


class NodeAppStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    app: str
    node_id: str
    version: str
    state: NodeAppState
    error: str = ""
    at: float = 0.0


def status_key(app: str, node_id: str) -> str:
    return f"{app}.{node_id}"


# --- the deployer -------------------------------------------------------------------


class Deployer:
    """Runs app rollouts for one controller; records in KV ``apps``, node states in
    ``app_status``.

    Rollouts run as "reconcile" jobs through ``jobs``; agents' sync requests are answered on
    ``subjects``' app sync subjects, and one asked with a foreign reply subject goes to
    ``refuse_reply`` unanswered. The tables are started and stopped by their owner.
    """

    def __init__(
        self,
        *,
        apps: Table[AppRecord],
        statuses: Table[NodeAppStatus],
        fleet: Fleet,
        jobs: JobEngine,
        subjects: Subjects,
        refuse_reply: Callable[[Msg], None],
    ) -> None:
        self.apps = apps
        self.statuses = statuses
        self._fleet = fleet
        self._jobs = jobs
        self._subjects = subjects
        self._refuse_reply = refuse_reply
        self._log_after = 0.0  # rate limit for the "app sync refused" warning
        self._rollouts: dict[str, asyncio.Task[None]] = {}
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: asyncio.Queue[NodeAppStatus] = asyncio.Queue(maxsize=100_000)
        self._waiters: set[asyncio.Event] = set()
        self._nudged: dict[str, float] = {}  # node id -> when on_unsynced last told it
        self.stats = {"syncs": 0, "syncs_refused": 0, "status_events": 0, "bad_events": 0}

    async def start(self) -> None:
        self._spawn(self._writer(), "app-status-writer")

    async def stop(self) -> None:
        tasks = list(self._rollouts.values()) + list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- reads -----------------------------------------------------------------------

    def get(self, name: str) -> AppRecord:
        rec = self.apps.get(name)
        if rec is None:
            raise NotFound(f"app {name!r} not found")
        return rec

    def all(self) -> list[AppRecord]:
        return sorted(self.apps, key=lambda r: r.name)

    def node_statuses(self, name: str) -> dict[str, NodeAppStatus]:
        return {s.node_id: s for s in self.statuses if s.app == name}

    def status(self, name: str) -> dict[str, Any]:
        rec = self.get(name)
        out: dict[str, Any] = msgspec.to_builtins(rec)
        # omit_defaults drops empty fields; the API shows them all.
        out["assignments"] = dict(rec.assignments)
        out.setdefault("previous", None)
        out["running"] = name in self._rollouts
        nodes: dict[str, Any] = {}
        statuses = self.node_statuses(name)
        for node_id in sorted(set(rec.assignments) | set(statuses)):
            st = statuses.get(node_id)
            node = self._fleet.nodes.get(node_id)
            nodes[node_id] = {
                "assigned": rec.assignments.get(node_id),
                "version": st.version if st else None,
                "state": st.state if st else "pending",
                "error": st.error if st else "",
                "at": st.at if st else None,
                "node_status": node.status if node else "unknown",
            }
        out["nodes"] = nodes
        return out

    # -- writes ----------------------------------------------------------------------

    async def deploy(self, spec: AppSpec, *, message: str = "",
                     scope: Selector | None = None) -> AppRecord:
        """Store the spec and start its rollout in the background; returns at once.

        ``scope`` (a scoped API token's selector) is ANDed into the stored selector, so
        the app never lands on a node outside it, now or when nodes join later; an
        existing app whose selector the scope does not cover is refused (Forbidden)."""
        validate_spec(spec)
        if scope is not None and not scope.is_empty:
            existing = self.apps.get(spec.name)
            if existing is not None:
                check_covers(scope, existing.current.selector, f"app {spec.name!r}")
            spec = msgspec.structs.replace(
                spec, selector=str(narrow(Selector.parse(spec.selector), scope)))
        if spec.name in self._rollouts or spec.name in self._starting:
            raise Conflict(f"app {spec.name!r} has a rollout in progress; wait for it to end")
        # Reserved before the first await, so two concurrent deploys cannot both start.
        self._starting.add(spec.name)
        try:
            return await self._deploy(spec, message)
        finally:
            self._starting.discard(spec.name)

    async def _deploy(self, spec: AppSpec, message: str) -> AppRecord:
        try:
            selector = Selector.parse(spec.selector)
        except (SelectorError, ValueError) as exc:
            raise BadRequest(f"bad selector {spec.selector!r}: {exc}") from None
        targets = [n.id for n in self._fleet.select(selector)]
        size = parse_count(spec.batch, len(targets), "batch") or len(targets) or 1
        batches = max(1, -(-len(targets) // size))
        rollout = Rollout(status="rolling", version=spec.version, batches=batches,
                          started_at=time.time(),
                          message=message or f"deploying {spec.version} to {len(targets)} node(s)")

        def update(cur: AppRecord) -> AppRecord:
            prev = cur.previous if cur.current.version == spec.version else cur.current
            return msgspec.structs.replace(cur, current=spec, previous=prev, rollout=rollout)

        record: AppRecord | None = None
        if self.apps.get(spec.name) is None:
            try:
                record = AppRecord(name=spec.name, current=spec, rollout=rollout)
                await self.apps.create(spec.name, record)
            except Conflict:  # another controller created it just now
                record = None
        if record is None:
            record = await self.apps.mutate(spec.name, update)
            assert record is not None
        task = asyncio.create_task(self._rollout(spec, targets, size),
                                   name=f"rollout-{spec.name}")
        self._rollouts[spec.name] = task
        task.add_done_callback(lambda _t: self._forget_rollout(spec.name, task))
        log.info("app %s: rollout of %s to %d node(s) in %d batch(es)", spec.name,
                 spec.version, len(targets), batches)
        return record

    def _forget_rollout(self, name: str, task: asyncio.Task[None]) -> None:
        if self._rollouts.get(name) is task:
            del self._rollouts[name]

    async def wait(self, name: str) -> AppRecord:
        task = self._rollouts.get(name)
        if task is not None:
            await asyncio.shield(task)
        return self.get(name)

    async def rollback(self, name: str, *, scope: Selector | None = None) -> AppRecord:
        rec = self.get(name)
        if rec.previous is None:
            raise Conflict(f"app {name!r} has no previous version to roll back to")
        return await self.deploy(rec.previous, message=f"rollback to {rec.previous.version}",
                                 scope=scope)

    async def remove(self, name: str, *, scope: Selector | None = None) -> dict[str, Any]:
        """Forget the app; its nodes stop it (now, or when they come back)."""
        rec = self.get(name)
        if scope is not None:
            check_covers(scope, rec.current.selector, f"app {name!r}")
        task = self._rollouts.get(name)
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.apps.delete(name)
        nodes = self._reachable(sorted(rec.assignments))
        if nodes:
            self._spawn(self._reconcile(nodes, rec.current), f"remove-{name}")
        log.info("app %s removed from %d node(s)", name, len(rec.assignments))
        return {"name": name, "removed_from": sorted(rec.assignments)}

    # -- rollout ---------------------------------------------------------------------

    def _reachable(self, node_ids: list[str]) -> list[str]:
        out = []
        for node_id in node_ids:
            node: NodeRecord | None = self._fleet.nodes.get(node_id)
            if node is not None and node.status != "offline":
                out.append(node_id)
        return out

    async def _assign(self, name: str, versions: dict[str, str | None],
                      **rollout_changes: Any) -> AppRecord:
        """CAS update: node -> version (None = unassign) and rollout fields."""

        def update(cur: AppRecord) -> AppRecord:
            assignments = dict(cur.assignments)
            for node_id, version in versions.items():
                if version is None:
                    assignments.pop(node_id, None)
                else:
                    assignments[node_id] = version
            rollout = msgspec.structs.replace(cur.rollout, **rollout_changes)
            return msgspec.structs.replace(cur, assignments=assignments, rollout=rollout)

        rec = await self.apps.mutate(name, update)
        assert rec is not None
        return rec

    async def _reconcile(self, node_ids: list[str], spec: AppSpec) -> dict[str, NodeResult]:
        """A "reconcile" job on these nodes; node id -> CommandResult data (or reason)."""
        if not node_ids:
            return {}
        timeout = spec.health_timeout + spec.step_timeout
        job = await self._jobs.run(
            JobSpec(action="reconcile", targets=node_ids, timeout=timeout),
            created_by=f"deploy:{spec.name}",
        )
        out: dict[str, NodeResult] = {}
        for r in await self._jobs.results(job.id):
            out[r.node_id] = r
        return out

    async def _outcomes(self, spec: AppSpec, node_ids: list[str],
                        results: dict[str, NodeResult],
                        since: float) -> tuple[dict[str, str], list[str]]:
        """Wait for each node's verdict on spec.version: (failed node -> error, pending)."""
        deadline = time.monotonic() + spec.health_timeout
        failed: dict[str, str] = {}
        pending: list[str] = []
        waiting = set(node_ids)
        for node_id in node_ids:
            res = results.get(node_id)
            if res is None:
                continue
            if res.status == "no-response" and res.reason == "node is offline":
                pending.append(node_id)
                waiting.discard(node_id)
            elif res.status in ("rejected", "error", "failed"):
                failed[node_id] = f"reconcile {res.status}: {res.reason}"
                waiting.discard(node_id)
        while waiting:
            for node_id in sorted(waiting):
                verdict = self._verdict(spec, node_id, results.get(node_id), since)
                if verdict is None:
                    continue
                waiting.discard(node_id)
                if verdict[0] != "running":
                    failed[node_id] = f"{verdict[0]}: {verdict[1]}" if verdict[1] else verdict[0]
            if not waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                for node_id in sorted(waiting):
                    failed[node_id] = (f"no healthy status for {spec.version} within "
                                       f"{spec.health_timeout:g}s")
                break
            ev = asyncio.Event()
            self._waiters.add(ev)
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with
            # a result (gh-86296): the rollout would go on until its health deadline.
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await ev.wait()
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(ev)
        return failed, pending

    def _verdict(self, spec: AppSpec, node_id: str, res: NodeResult | None,
                 since: float) -> tuple[str, str] | None:
        st = _reported(res, spec.name)
        if st is not None and st.version == spec.version and st.state in TERMINAL:
            return st.state, st.error
        rec = self.statuses.get(status_key(spec.name, node_id))
        if rec is not None and rec.version == spec.version and rec.state in TERMINAL \
                and rec.at >= since:
            return rec.state, rec.error
        return None

    async def _rollout(self, spec: AppSpec, targets: list[str], size: int) -> None:
        name = spec.name
        started = time.time()
        rec = self.get(name)
        previous = rec.previous
        threshold = parse_count(spec.max_failures, len(targets), "max_failures") or 0
        batches = [targets[i:i + size] for i in range(0, len(targets), size)]
        # Nodes that no longer match the selector drop the app with the first batch.
        dropped = [n for n in rec.assignments if n not in set(targets)]
        touched: list[str] = []
        failed: dict[str, str] = {}
        pending: list[str] = []
        try:
            for i, batch in enumerate(batches):
                changes: dict[str, str | None] = dict.fromkeys(batch, spec.version)
                if i == 0:
                    changes.update(dict.fromkeys(dropped))
                await self._assign(name, changes, batch=i + 1)
                touched.extend(batch)
                live = self._reachable(batch + (dropped if i == 0 else []))
                since = time.time() - 1.0
                results = await self._reconcile(live, spec)
                offline = [n for n in batch if n not in live]
                f, p = await self._outcomes(spec, [n for n in batch if n in live], results,
                                            since)
                failed.update(f)
                pending.extend(offline + p)
                if len(failed) > threshold:
                    await self._roll_back(spec, previous, touched, failed, i + 1, len(batches))
                    return
            msg = f"{spec.version} on {len(targets) - len(pending)} node(s)"
            if pending:
                msg += f"; {len(pending)} offline node(s) pending: {', '.join(pending)}"
            if failed:
                msg += f"; {len(failed)} failure(s) within max_failures: " + _describe(failed)
            await self._assign(name, {}, status="done", message=msg, failed=failed,
                               pending=pending, finished_at=time.time())
            log.info("app %s: rollout of %s done in %.1fs (%s)", name, spec.version,
                     time.time() - started, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("app %s: rollout of %s failed", name, spec.version)
            try:
                await self._assign(name, {}, status="failed", message=f"internal error: {exc}",
                                   finished_at=time.time())
            except Exception:
                log.exception("app %s: could not record the failed rollout", name)

    async def _roll_back(self, spec: AppSpec, previous: AppSpec | None, touched: list[str],
                         failed: dict[str, str], batch: int, batches: int) -> None:
        name = spec.name
        back = previous.version if previous is not None else None
        msg = (f"rolled back {'to ' + back if back else '(removed)'} after batch "
               f"{batch}/{batches}: {len(failed)} failure(s) exceed max_failures "
               f"{spec.max_failures}: " + _describe(failed))
        log.warning("app %s: %s", name, msg)
        await self._assign(name, dict.fromkeys(touched, back), message=msg, failed=failed)
        target = previous if previous is not None else spec
        live = self._reachable(touched)
        await self._reconcile(live, target)
        await self._assign(name, {}, status="rolled-back", finished_at=time.time())

    # -- agent side --------------------------------------------------------------------

    @staticmethod
    def _version_for(rec: AppRecord, node: NodeRecord) -> str | None:
        version = rec.assignments.get(node.id)
        if version is None and rec.rollout.status == "done":
            # A node that joined (or started matching) after the rollout.
            try:
                if Selector.parse(rec.current.selector).matches(node.labels):
                    version = rec.current.version
            except (SelectorError, ValueError):
                version = None
        return version

    def releases_for(self, node: NodeRecord) -> list[AppRelease]:
        out = []
        for rec in self.apps:
            version = self._version_for(rec, node)
            spec = rec.spec_for(version) if version else None
            if spec is not None:
                out.append(spec.release())
        return out

    def on_unsynced(self, node_id: str, *, every: float = 60.0) -> None:
        """A heartbeat from a node that has not asked for its apps since it started (its
        enrollment said it had none). If releases are assigned to it now (between its
        enrollment and its subscriptions: a reconcile job then would not have reached
        it), a reconcile job tells it; at most once per ``every`` s per node."""
        node = self._fleet.nodes.get(node_id)
        if node is None or not self.releases_for(node):
            return
        now = time.monotonic()
        if now - self._nudged.get(node_id, -every) < every:
            return
        self._nudged = {k: t for k, t in self._nudged.items() if now - t < every}
        self._nudged[node_id] = now
        log.info("node %s has app releases it has not asked for; telling it", node_id)

        async def nudge() -> None:
            try:
                await self._jobs.run(JobSpec(action="reconcile", targets=[node_id],
                                             timeout=60.0), created_by="deploy:sync")
            except Exception as exc:  # its next heartbeat asks again
                log.warning("node %s: app reconcile not sent: %s", node_id, exc)

        self._spawn(nudge(), f"apps-nudge-{node_id}")

    async def handle_sync(self, msg: Msg) -> None:
        """Answer an agent's AppSyncRequest with the releases assigned to it.

        The subject (``<prefix>.node.<id>.apps.sync``, which only that node may publish
        on) proves who asks; the answer goes only to that node's own inbox space, never to
        another subject the request names."""
        subjects = self._subjects
        node_id = subjects.node_id_of(msg.subject)
        if node_id is None or not subjects.is_node_reply(node_id, msg.reply):
            self._refuse_reply(msg)
            return
        try:
            req = codec.decode(msg.data, AppSyncRequest, max_size=16 * 1024)
            if req.node_id != node_id:
                raise ProtocolError(f"sync for node {req.node_id!r} asked on node "
                                    f"{node_id!r}'s subject")
        except ProtocolError as exc:
            self.stats["syncs_refused"] += 1
            if self._log_allowed():
                log.warning("app sync refused: %s (count %d)", exc.reason,
                            self.stats["syncs_refused"])
            await msg.respond(codec.encode(ErrorReply(code="bad_request", message=exc.reason)))
            return
        node = self._fleet.nodes.get(node_id)
        if node is None:
            self.stats["syncs_refused"] += 1
            await msg.respond(codec.encode(ErrorReply(code="not_found",
                                                      message=f"unknown node {node_id}")))
            return
        self.stats["syncs"] += 1
        await msg.respond(codec.encode(AppSyncReply(releases=self.releases_for(node))))

    def on_event(self, event: Event) -> None:
        """Node events: keep "app.status" reports in ``app_status`` (via one writer)."""
        p = event.payload
        if not isinstance(p, AppStatus):
            return
        st = NodeAppStatus(app=p.app, node_id=event.node_id, version=p.version, state=p.state,
                           error=p.error, at=event.ts)
        try:
            if not valid_app_name(st.app):
                raise ValueError(f"bad app name {st.app!r}")
            # Only apps that exist and were ever assigned to this node: a node cannot grow
            # the status bucket with made-up names.
            rec = self.apps.get(st.app)
            known = self.statuses.get(status_key(st.app, event.node_id)) is not None
            node = self._fleet.nodes.get(event.node_id)
            if not known and (rec is None or (
                    event.node_id not in rec.assignments
                    and (node is None or self._version_for(rec, node) is None))):
                raise ValueError(f"app {st.app!r} is not assigned to this node")
        except ValueError as exc:
            self.stats["bad_events"] += 1
            log.warning("bad app.status event from node %s: %s", event.node_id, exc)
            return
        self.stats["status_events"] += 1
        try:
            self._writes.put_nowait(st)
        except asyncio.QueueFull:
            log.warning("app status queue full; dropped a status of node %s", st.node_id)

    def _log_allowed(self, every: float = 10.0) -> bool:
        now = time.monotonic()
        if now < self._log_after:
            return False
        self._log_after = now + every
        return True

    async def _writer(self) -> None:
        while True:
            st = await self._writes.get()
            try:
                await self.statuses.put(status_key(st.app, st.node_id), st)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("app status of node %s not stored: %s", st.node_id, exc)
            for ev in list(self._waiters):
                ev.set()


def _reported(res: NodeResult | None, app: str) -> AppReport | None:
    """What a node's reconcile result says of ``app`` (the job keeps it as JSON)."""
    if res is None or app not in res.data:
        return None
    try:
        return msgspec.convert(res.data[app], AppReport)
    except msgspec.ValidationError:
        return None


def _describe(failed: dict[str, str]) -> str:
    return "; ".join(f"{node}: {err}" for node, err in sorted(failed.items()))
