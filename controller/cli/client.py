"""A small synchronous client of the REST API, for the CLI (like kubectl's)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from controller.config import read_client_config
from controller.tls import fetch_chain, trust_only
from protocol.trust import TrustError, ca_fingerprint, normalize_pin, pinned_ca


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ApiClient:
    """``ca_file`` / ``ca_sha256`` (else from the client config): the CA an https API must
    present, the only one trusted; with both, the file must have that hash."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *,
        ca_file: str | None = None, ca_sha256: str | None = None,
    ) -> None:
        conf = read_client_config()
        self.url = (url or conf.get("url") or "").rstrip("/")
        self.token = token or conf.get("token") or ""
        self.ca_file = ca_file or conf.get("ca_file") or ""
        self.ca_sha256 = ca_sha256 or conf.get("ca_sha256") or ""
        if not self.url:
            raise ApiError(
                0,
                "no_config",
                "no controller configured: start one with `barista server` (it writes the CLI "
                "config), or set BARISTA_URL and BARISTA_TOKEN",
            )
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext | None:
        """The TLS context of an https URL, made once: trusts the pinned CA only."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "https" or self._ssl is not None:
            return self._ssl
        pin = ""
        if self.ca_sha256:
            try:
                pin = normalize_pin(self.ca_sha256)
            except ValueError as exc:
                raise ApiError(0, "bad_config", f"ca_sha256: {exc}") from None
        if self.ca_file:
            try:
                pem = open(self.ca_file, "rb").read()
                der = ssl.PEM_cert_to_DER_cert(pem.decode())
            except (OSError, ValueError) as exc:
                raise ApiError(0, "bad_config", f"ca_file {self.ca_file}: {exc}") from None
            if pin and ca_fingerprint(der) != pin:
                raise ApiError(
                    0, "ca_mismatch", f"ca_file {self.ca_file} is not the pinned CA: expected "
                    f"sha256 {pin}, got {ca_fingerprint(der)}")
            self._ssl = trust_only(pem)
        elif pin:
            try:
                chain = fetch_chain(parts.hostname or "127.0.0.1", parts.port or 443)
                self._ssl = trust_only(pinned_ca(chain, pin, where=f"the API at {self.url}"))
            except TrustError as exc:
                raise ApiError(0, "ca_mismatch", str(exc)) from None
            except OSError as exc:
                raise ApiError(0, "unreachable",
                               f"cannot reach the controller at {self.url} ({exc})") from None
        else:
            self._ssl = ssl.create_default_context()  # the system's CAs
        return self._ssl

    def _url(self, path: str, params: dict[str, Any]) -> str:
        q = {k: v for k, v in params.items() if v not in (None, "")}
        return self.url + path + ("?" + urllib.parse.urlencode(q, doseq=True) if q else "")

    def _open(self, req: urllib.request.Request, timeout: float) -> Any:
        """Send ``req``; HTTP and connection failures become one ``ApiError``."""
        # Before the token is attached: a server with another CA never sees it.
        context = self._context()
        req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=timeout, context=context)
        except urllib.error.HTTPError as exc:
            with exc:  # it holds the response's socket
                try:
                    err = json.loads(exc.read())
                    code, message = err.get("error", "error"), err.get("message", "")
                except (ValueError, AttributeError):
                    code, message = "http_error", f"HTTP {exc.code} {exc.reason}"
            raise ApiError(exc.code, code, message) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                pinned = (f"ca_file {self.ca_file}" if self.ca_file else
                          f"ca_sha256 {self.ca_sha256}" if self.ca_sha256 else
                          "the system's CAs (no ca_file or ca_sha256 in the client config)")
                raise ApiError(
                    0, "tls_untrusted",
                    f"the controller at {self.url} presented a certificate that {pinned} does "
                    f"not vouch for ({exc.reason.verify_message}); refusing to talk to it",
                ) from None
            raise ApiError(
                0,
                "unreachable",
                f"cannot reach the controller at {self.url} ({exc.reason}); is `barista server` "
                "running? (BARISTA_URL overrides the address)",
            ) from None

    def _request(self, method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with self._open(req, timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", self._url(path, params))

    def post(self, path: str, body: Any = None, timeout: float = 30) -> Any:
        return self._request("POST", self.url + path, body if body is not None else {},
                             timeout=timeout)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", self.url + path)

    def stream(self, path: str, *, method: str = "GET", body: Any = None,
               timeout: float = 60, **params: Any) -> Iterator[tuple[str, Any]]:
        """Server-sent events as (event, parsed data) pairs (of a GET, or of a POST of
        ``body``)."""
        payload = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._url(path, params), data=payload, method=method,
                                     headers={"Accept": "text/event-stream"})
        if payload is not None:
            req.add_header("Content-Type", "application/json")
        resp = self._open(req, timeout)
        with resp:
            event = "message"
            data: list[str] = []
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
