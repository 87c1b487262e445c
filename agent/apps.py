"""App reconciler: converge this node to the app releases the controller assigns it.

Asks ``<prefix>.apps.sync`` for the desired releases, downloads and verifies artifacts,
runs stop/install/start steps and the health check, and reports each state as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from agent.files import write_private
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import (
    AnyEventPayload,
    AppArtifact,
    AppRelease,
    AppReport,
    AppState,
    AppStatus,
    AppSyncReply,
    AppSyncRequest,
    ErrorReply,
    Severity,
)
from protocol.names import valid_app_name, valid_app_version

SHELL = "/bin/sh"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
ERROR_TAIL = 2000  # characters of a failing step's output kept in the error

Request = Callable[[bytes], Awaitable[bytes]]
# Publishes an event: the payload, a human message and its severity.
Emit = Callable[[AnyEventPayload, str, Severity], Awaitable[None]]


class SyncError(Exception):
    """The controller could not be asked (unreachable, timeout, refusal)."""


class StepFailed(Exception):
    """A step or download failed; the message is what the node reports."""


class AppReconciler:
    """Owns ``<state_dir>`` (mode 0700): ``state.json`` (name -> running version) and one
    directory per app version holding its artifacts and ``release.json``."""

    def __init__(
        self,
        *,
        state_dir: Path,
        request: Request,
        emit: Emit,
        node_id: Callable[[], str],
        log: logging.Logger | None = None,
        sync_timeout: float = 5.0,
        max_artifact_bytes: int = MAX_ARTIFACT_BYTES,
    ) -> None:
        self.state_dir = state_dir
        self._request = request
        self._emit = emit
        self._node_id = node_id
        self.log = log or logging.getLogger("barista.agent.apps")
        self.sync_timeout = sync_timeout
        self.max_artifact_bytes = max_artifact_bytes
        self.status: dict[str, AppReport] = {}
        self.passes = 0
        self._lock = asyncio.Lock()
        self._requested = 0
        self._completed = 0
        self._queued: asyncio.Task[Any] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._failures = 0
        self._closed = False

    # -- triggering ------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a pass soon; triggers while one is queued coalesce into it."""
        if self._closed or (self._queued is not None and not self._queued.done()):
            return
        self._queued = asyncio.create_task(self._triggered(), name="apps-reconcile")

    async def _triggered(self) -> None:
        try:
            await self.reconcile()
        except SyncError as exc:
            delay = min(30.0, 0.5 * 2 ** min(self._failures, 6)) * (0.5 + random.random() / 2)
            self._failures += 1
            self.log.warning("app sync failed (%s); retrying in %.1fs", exc, delay)
            self._schedule_retry(delay)
        except Exception:
            self.log.exception("app reconcile pass failed")

    def _schedule_retry(self, delay: float) -> None:
        if self._closed or (self._retry is not None and not self._retry.done()):
            return

        async def later() -> None:
            await asyncio.sleep(delay)
            self.trigger()

        self._retry = asyncio.create_task(later(), name="apps-retry")

    async def close(self) -> None:
        self._closed = True
        for task in (self._queued, self._retry):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- one pass --------------------------------------------------------------------

    async def reconcile(self) -> dict[str, AppReport]:
        """Converge now (or share a pass that started after this call); per-app status."""
        self._requested += 1
        wanted = self._requested
        async with self._lock:
            if self._completed >= wanted:
                return self.view()
            covers = self._requested
            releases = await self._fetch()
            self._failures = 0
            await self._converge_all(releases)
            self._completed = covers
            self.passes += 1
            return self.view()

    def view(self) -> dict[str, AppReport]:
        return dict(sorted(self.status.items()))

    async def _fetch(self) -> list[AppRelease]:
        payload = codec.encode(AppSyncRequest(node_id=self._node_id()))
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that comes with
            # the reply (gh-86296), and the pass then runs its steps while close() waits.
            async with asyncio.timeout(self.sync_timeout):
                raw = await self._request(payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise SyncError(str(exc) or type(exc).__name__) from None
        try:
            reply = codec.decode(raw)
        except ProtocolError as exc:
            raise SyncError(f"bad sync reply: {exc.reason}") from None
        if isinstance(reply, ErrorReply):
            raise SyncError(f"controller refused the sync: {reply.message} [{reply.code}]")
        if not isinstance(reply, AppSyncReply):
            raise SyncError(f"unexpected sync reply {type(reply).__name__}")
        return reply.releases

    async def _converge_all(self, releases: list[AppRelease]) -> None:
        desired: dict[str, AppRelease] = {}
        for r in releases:
            if not valid_app_name(r.name) or not valid_app_version(r.version):
                self.log.warning("ignoring release with a bad name/version %r %r",
                                 r.name, r.version)
                continue
            desired[r.name] = r
        installed = await asyncio.to_thread(self._load_state)
        for name in sorted(set(installed) | set(desired)):
            rel = desired.get(name)
            try:
                if rel is None:
                    await self._remove(name, installed[name])
                elif installed.get(name) == rel.version:
                    await self._check(rel)
                else:
                    await self._install(rel, installed.get(name))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("app %s: reconcile failed", name)
                version = rel.version if rel else installed.get(name, "")
                await self._set(name, version, "failed", f"agent error: {exc}")

    # -- transitions -----------------------------------------------------------------

    async def _remove(self, name: str, version: str) -> None:
        old = await asyncio.to_thread(self._load_release, name, version)
        if old is not None:
            try:
                await self._steps(old, old.stop, "stop")
            except StepFailed as exc:
                self.log.warning("app %s %s: stop failed: %s", name, version, exc)
        await asyncio.to_thread(self._forget, name)
        self.log.info("app %s %s removed", name, version)
        await self._set(name, version, "removed")

    async def _check(self, rel: AppRelease) -> None:
        """Installed already: re-check health unless we know it is running."""
        st = self.status.get(rel.name)
        if st and st.version == rel.version and st.state == "running":
            return
        await self._health(rel)

    async def _install(self, rel: AppRelease, current: str | None) -> None:
        name, version = rel.name, rel.version
        await self._set(name, version, "installing")
        rdir = self._release_dir(name, version)
        try:
            await asyncio.to_thread(self._prepare_dir, rdir)
            for art in rel.artifacts:
                await self._fetch_artifact(art, rdir)
        except StepFailed as exc:
            # Nothing of the new release was started: the old version keeps running.
            self.log.warning("app %s %s: %s", name, version, exc)
            await self._set(name, version, "failed", str(exc))
            return
        await asyncio.to_thread(write_private, rdir / "release.json",
                                msgspec.json.encode(rel))
        if current is not None:
            old = await asyncio.to_thread(self._load_release, name, current)
            if old is not None:
                try:
                    await self._steps(old, old.stop, "stop")
                except StepFailed as exc:
                    self.log.warning("app %s %s: stop failed: %s", name, current, exc)
        try:
            await self._steps(rel, rel.install, "install")
            await self._steps(rel, rel.start, "start")
        except StepFailed as exc:
            with contextlib.suppress(StepFailed):
                await self._steps(rel, rel.stop, "stop")
            await asyncio.to_thread(self._record_state, name, None)
            self.log.warning("app %s %s: %s", name, version, exc)
            await self._set(name, version, "failed", str(exc))
            return
        await asyncio.to_thread(self._record_state, name, version)
        await self._health(rel)

    async def _health(self, rel: AppRelease) -> None:
        hc = rel.health
        if hc is None or not (hc.cmd or hc.http):
            await self._set(rel.name, rel.version, "running")
            return
        last = ""
        for attempt in range(max(1, hc.retries)):
            if attempt:
                await asyncio.sleep(max(0.0, hc.interval))
            try:
                if hc.cmd:
                    await self._run(rel, hc.cmd, limit=hc.timeout)
                if hc.http:
                    await asyncio.to_thread(_http_ok, hc.http, hc.timeout)
            except StepFailed as exc:
                last = str(exc)
                continue
            await self._set(rel.name, rel.version, "running")
            return
        await self._set(rel.name, rel.version, "unhealthy",
                        f"health check failed {max(1, hc.retries)} time(s): {last}")

    async def _set(self, name: str, version: str, state: AppState, error: str = "") -> None:
        old = self.status.get(name)
        self.status[name] = AppReport(version=version, state=state, error=error, at=time.time())
        if old and (old.version, old.state, old.error) == (version, state, error):
            return
        bad = state in ("failed", "unhealthy")
        await self._emit(
            AppStatus(app=name, version=version, state=state, error=error),
            f"app {name} {version}: {state}" + (f": {error}" if error else ""),
            "error" if bad else "info",
        )

    # -- steps -----------------------------------------------------------------------

    async def _steps(self, rel: AppRelease, steps: list[str], what: str) -> None:
        for i, step in enumerate(steps):
            try:
                await self._run(rel, step, limit=rel.step_timeout)
            except StepFailed as exc:
                raise StepFailed(f"{what} step {i + 1} failed: {exc}") from None

    async def _run(self, rel: AppRelease, cmd: str, *, limit: float) -> None:
        """One shell command in the release dir, in its own process group.

        Output goes to a file, not a pipe: a start step that leaves a daemon behind would
        otherwise hold the pipe open forever.
        """
        rdir = self._release_dir(rel.name, rel.version)
        env = {"PATH": SAFE_PATH, "HOME": str(rdir), "LANG": "C.UTF-8", **rel.env,
               "BARISTA_APP": rel.name, "BARISTA_APP_VERSION": rel.version,
               "BARISTA_RELEASE_DIR": str(rdir)}
        log_path = rdir / ".step.log"
        out = await asyncio.to_thread(open, log_path, "wb")
        with out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    SHELL, "-c", cmd, cwd=rdir, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                raise StepFailed(f"cannot start {cmd!r}: {exc}") from None
            try:
                async with asyncio.timeout(limit):  # (not wait_for: see _fetch)
                    rc = await proc.wait()
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise StepFailed(f"{cmd!r} timed out after {limit:g}s") from None
            except asyncio.CancelledError:
                _kill_group(proc.pid)
                raise
        if rc != 0:
            tail = await asyncio.to_thread(_tail, log_path)
            raise StepFailed(f"{cmd!r} exited with {rc}" + (f": {tail}" if tail else ""))

    async def _fetch_artifact(self, art: AppArtifact, rdir: Path) -> None:
        dest = _dest_name(art)
        target = rdir / dest
        expected = art.sha256.lower()
        if await asyncio.to_thread(_sha256_of, target) == expected:
            return  # kept from an earlier install of this version
        tmp = rdir / f".{dest}.part"
        try:
            got = await asyncio.to_thread(_download, art.url, tmp, self.max_artifact_bytes)
            if got != expected:
                raise StepFailed(f"checksum mismatch for {art.url}: expected {expected}, "
                                 f"got {got}")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- files -----------------------------------------------------------------------

    def _release_dir(self, name: str, version: str) -> Path:
        # Names and versions were checked already; this also refuses "." and ".." so a
        # release directory can never be the app's or the state's own.
        if not valid_app_version(version) or not valid_app_name(name):
            raise StepFailed(f"invalid app name or version {name!r} {version!r}")
        return self.state_dir / name / version

    def _prepare_dir(self, rdir: Path) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        rdir.mkdir(parents=True, exist_ok=True)

    def _load_state(self) -> dict[str, str]:
        try:
            data = json.loads((self.state_dir / "state.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.log.error("app state file unreadable (%s); treating as empty", exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _record_state(self, name: str, version: str | None) -> None:
        state = self._load_state()
        if version is None:
            state.pop(name, None)
        else:
            state[name] = version
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        write_private(self.state_dir / "state.json", json.dumps(state, indent=1).encode())

    def _forget(self, name: str) -> None:
        self._record_state(name, None)
        import shutil  # lazy: it loads bz2 and lzma, RSS the agent rarely needs

        shutil.rmtree(self.state_dir / name, ignore_errors=True)

    def _load_release(self, name: str, version: str) -> AppRelease | None:
        try:
            raw = (self._release_dir(name, version) / "release.json").read_bytes()
            return msgspec.json.decode(raw, type=AppRelease)
        except (OSError, msgspec.DecodeError) as exc:
            self.log.warning("app %s %s: release file unreadable (%s); cannot run its stop "
                             "steps", name, version, exc)
            return None


def _dest_name(art: AppArtifact) -> str:
    name = art.dest or urllib.parse.unquote(urllib.parse.urlsplit(art.url).path).rsplit("/", 1)[-1]
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise StepFailed(f"artifact {art.url}: bad destination file name {name!r}")
    return name


def _download(url: str, dest: Path, cap: int) -> str:
    """Copy ``url`` (file://, http(s)://) to ``dest``; return its sha256 hex digest."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("file", "http", "https"):
        raise StepFailed(f"artifact {url}: unsupported URL scheme {scheme!r}")
    h = hashlib.sha256()
    size = 0
    try:
        # lazy: about 1 MB of RSS that the agent only needs while deploying
        from urllib.request import urlopen

        with urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise StepFailed(f"artifact {url} is larger than {cap} bytes")
                h.update(chunk)
                out.write(chunk)
    except StepFailed:
        raise
    except Exception as exc:
        from urllib.error import HTTPError

        if isinstance(exc, HTTPError):
            exc.close()  # it holds the response's socket
        raise StepFailed(f"cannot download {url}: {exc}") from None
    return h.hexdigest()


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _http_ok(url: str, timeout: float) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise StepFailed(f"health URL {url} is not on loopback")
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=timeout) as resp:
            if resp.status >= 400:
                raise StepFailed(f"GET {url}: HTTP {resp.status}")
    except StepFailed:
        raise
    except HTTPError as exc:
        exc.close()  # it holds the response's socket
        raise StepFailed(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except Exception as exc:
        raise StepFailed(f"GET {url}: {exc}") from None


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-ERROR_TAIL:].decode("utf-8", "replace").strip()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
