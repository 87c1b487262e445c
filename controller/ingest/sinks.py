"""Where ingested line protocol goes: InfluxDB 1.x (/write) or the v2 write API (2.x/3.x).

Every failure is a ``SinkError`` that says whether retrying can help; credentials are
never logged and never part of an error message.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp

from controller.ingest.errors import SinkConfigError, SinkError

if TYPE_CHECKING:
    from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
    from influxdb_client.client.write_api_async import WriteApiAsync

log = logging.getLogger("barista.controller.ingest.sinks")

# Above this size gzip runs in a thread: zlib releases the GIL, and a 5,000-line chunk
# (~1 MB) would otherwise hold the event loop for several milliseconds.
_GZIP_IN_THREAD = 256 * 1024
_GZIP_LEVEL = 1  # line protocol compresses ~10x even at level 1; higher levels cost CPU


class Sink(Protocol):
    """Where written lines go. A sink may also have ``raw_newlines`` (bool): whether its
    parser takes a newline inside a quoted string field (default False: replaced)."""

    async def write(self, lines: bytes, *, points: int) -> None:
        """Write ``\\n``-terminated line protocol (ns precision); raise SinkError on failure."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def classify_status(status: int, body: str, *, what: str) -> SinkError:
    """Map an HTTP error status of the store to a SinkError."""
    body = body.strip()[:300]
    if status in (401, 403):
        return SinkError(
            f"{what}: credentials refused (HTTP {status}): {body}",
            retryable=True,
            status=status,
            auth=True,
        )
    if status == 404:
        # Missing database/bucket: a configuration problem. Keep the data in the stream
        # until someone creates it rather than dropping it.
        return SinkError(
            f"{what}: database or bucket not found (HTTP 404): {body}", retryable=True, status=404
        )
    if status == 429 or status >= 500:
        return SinkError(f"{what}: HTTP {status}: {body}", retryable=True, status=status)
    return SinkError(
        f"{what}: data refused (HTTP {status}): {body}", retryable=False, status=status
    )


async def _gzip(data: bytes) -> bytes:
    if len(data) > _GZIP_IN_THREAD:
        return await asyncio.to_thread(gzip.compress, data, _GZIP_LEVEL)
    return gzip.compress(data, _GZIP_LEVEL)


class InfluxV1Sink:
    """InfluxDB 1.x ``POST /write?db=&rp=&precision=ns`` over aiohttp, gzip-encoded."""

    def __init__(
        self,
        url: str,
        db: str,
        *,
        rp: str | None = None,
        user: str | None = None,
        password: str | None = None,
        gzip: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.db = db
        self.rp = rp
        self.gzip = gzip
        self.name = f"influx1 {self.url} db={db}"
        # InfluxDB 1.x reads a newline inside a quoted string field as part of the string
        # (lineproto.py writes it raw for sinks that say so; see infra/influxdb/README.md).
        self.raw_newlines = True
        # Basic auth, not u=/p= query parameters: query strings end up in access logs.
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        self._has_auth = bool(user)
        if user:
            self._headers["Authorization"] = aiohttp.encode_basic_auth(user, password or "")
        self._params = {"db": db, "precision": "ns"}
        if rp:
            self._params["rp"] = rp
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def write(self, lines: bytes, *, points: int) -> None:
        if not lines:
            return
        headers = self._headers
        body = lines
        if self.gzip:
            body = await _gzip(lines)
            headers = {**headers, "Content-Encoding": "gzip"}
        try:
            async with self._client().post(
                f"{self.url}/write", params=self._params, data=body, headers=headers
            ) as resp:
                if resp.status == 204:
                    return
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SinkError(
                f"{self.name}: cannot write {points} points: {type(exc).__name__}: {exc}",
                retryable=True,
            ) from None
        raise classify_status(resp.status, text, what=self.name)

    async def create_database(self) -> str | None:
        """``CREATE DATABASE`` (a no-op if it exists); None on success, else the reason."""
        q = 'CREATE DATABASE "' + self.db.replace("\\", "\\\\").replace('"', '\\"') + '"'
        headers = {"Authorization": self._headers["Authorization"]} if self._has_auth else {}
        try:
            async with self._client().post(
                f"{self.url}/query", data={"q": q}, headers=headers
            ) as resp:
                if resp.status == 200:
                    return None
                return f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def ping(self) -> bool:
        try:
            async with self._client().get(f"{self.url}/ping", headers=self._headers) as resp:
                return resp.status == 204
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class InfluxV2Sink:
    """The v2 write API (InfluxDB 2.x, 3.x, VictoriaMetrics) through influxdb-client's
    async client; it gzips the body itself when ``gzip`` is on."""

    def __init__(
        self,
        url: str,
        token: str,
        org: str,
        bucket: str,
        *,
        gzip: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self.gzip = gzip
        self.name = f"influx2 {self.url} org={org} bucket={bucket}"
        # VictoriaMetrics splits lines at every newline, quoted or not: replace them.
        self.raw_newlines = False
        self._token = token
        self._timeout_ms = int(timeout * 1000)
        # Created in the running loop; imported late so that only a v2 user pays for it.
        self._client: InfluxDBClientAsync | None = None
        self._write_api: WriteApiAsync | None = None

    def _api(self) -> WriteApiAsync:
        if self._client is None or self._write_api is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

            self._client = InfluxDBClientAsync(
                url=self.url,
                token=self._token,
                org=self.org,
                enable_gzip=self.gzip,
                timeout=self._timeout_ms,
            )
            self._write_api = self._client.write_api()
        return self._write_api

    async def write(self, lines: bytes, *, points: int) -> None:
        if not lines:
            return
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            await self._api().write(
                bucket=self.bucket,
                org=self.org,
                record=lines.rstrip(b"\n"),
                # WritePrecision.NS is typed str although write() wants the enum type
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]
            )
        except ApiException as exc:
            body = exc.body if isinstance(exc.body, str) else str(exc.reason or "")
            raise classify_status(int(exc.status or 0), body, what=self.name) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SinkError(
                f"{self.name}: cannot write {points} points: {type(exc).__name__}: {exc}",
                retryable=True,
            ) from None

    async def ping(self) -> bool:
        self._api()
        assert self._client is not None
        try:
            return bool(await self._client.ping())
        except Exception:  # the client's ping maps every failure to an exception or False
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]
            self._client = None
            self._write_api = None


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Where metrics go. influx1 needs ``db``; influx2 needs ``token``, ``org``, ``bucket``."""

    kind: Literal["influx1", "influx2"]
    url: str
    db: str = ""
    rp: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    org: str = ""
    bucket: str = ""
    gzip: bool = True
    timeout: float = 30.0

    def __repr__(self) -> str:  # keeps password and token out of logs and tracebacks
        return (
            f"SinkConfig(kind={self.kind!r}, url={self.url!r}, db={self.db!r}, "
            f"bucket={self.bucket!r}, org={self.org!r})"
        )


def make_sink(config: SinkConfig) -> InfluxV1Sink | InfluxV2Sink:
    """Build the sink for ``config``; raises SinkConfigError (a ValueError) if incomplete."""
    parts = urlsplit(config.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SinkConfigError(f"sink url {config.url!r} must be http(s)://host:port")
    if config.timeout <= 0:
        raise SinkConfigError(f"sink timeout must be positive, not {config.timeout!r}")
    if config.kind == "influx1":
        if not config.db:
            raise SinkConfigError("influx1 sink needs a database name (db)")
        if config.password and not config.user:
            raise SinkConfigError("influx1 sink: a password was given without a user")
        return InfluxV1Sink(
            config.url,
            config.db,
            rp=config.rp or None,
            user=config.user or None,
            password=config.password or None,
            gzip=config.gzip,
            timeout=config.timeout,
        )
    if config.kind == "influx2":
        missing = [k for k in ("token", "org", "bucket") if not getattr(config, k)]
        if missing:
            raise SinkConfigError(f"influx2 sink needs {', '.join(missing)}")
        return InfluxV2Sink(
            config.url,
            config.token,
            config.org,
            config.bucket,
            gzip=config.gzip,
            timeout=config.timeout,
        )
    raise SinkConfigError(f"unknown sink kind {config.kind!r} (expected influx1 or influx2)")
