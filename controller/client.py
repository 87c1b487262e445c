"""A small synchronous client of the REST API, for the CLI (like kubectl's)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from controller.config import read_client_config


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        conf = read_client_config()
        self.url = (url or conf.get("url") or "").rstrip("/")
        self.token = token or conf.get("token") or ""
        if not self.url:
            raise ApiError(
                0,
                "no_config",
                "no controller configured: start one with `barista server` (it writes the CLI "
                "config), or set BARISTA_URL and BARISTA_TOKEN",
            )

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
                raise ApiError(
                    exc.code, err.get("error", "error"), err.get("message", "")
                ) from None
            except (ValueError, AttributeError):
                raise ApiError(exc.code, "http_error", f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise ApiError(
                0,
                "unreachable",
                f"cannot reach the controller at {self.url} ({exc.reason}); is `barista server` "
                "running? (BARISTA_URL overrides the address)",
            ) from None

    def get(self, path: str, **params: Any) -> Any:
        q = {k: v for k, v in params.items() if v not in (None, "")}
        return self._request(
            "GET", path + ("?" + urllib.parse.urlencode(q, doseq=True) if q else "")
        )

    def post(self, path: str, body: Any = None, timeout: float = 30) -> Any:
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def stream(self, path: str, **params: Any) -> Iterator[tuple[str, Any]]:
        """Server-sent events as (event, parsed data) pairs."""
        q = {k: v for k, v in params.items() if v not in (None, "")}
        url = self.url + path + ("?" + urllib.parse.urlencode(q, doseq=True) if q else "")
        req = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        )
        try:
            resp = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
                raise ApiError(
                    exc.code, err.get("error", "error"), err.get("message", "")
                ) from None
            except (ValueError, AttributeError):
                raise ApiError(exc.code, "http_error", f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise ApiError(
                0, "unreachable", f"cannot reach the controller at {self.url} ({exc.reason})"
            ) from None
        with resp:
            event, data = "message", []
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
