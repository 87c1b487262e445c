"""The HTTP side every cloud API fake shares: a threaded JSON server on loopback (the SDKs'
calls block, so it runs in its own thread), optionally over TLS. The fake supplies one
function from a request to a reply."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # parsed JSON, or None
    headers: dict[str, str]  # names lower-cased


@dataclass
class Reply:
    status: int
    body: Any  # JSON-able, or None for an empty body
    headers: dict[str, str] = field(default_factory=dict)


# Request -> seconds to wait before it is handled (a cloud API's latency; None: none).
Latency = Callable[[Request], float]


class ServedInThread:
    """A server with ``serve_forever``/``shutdown`` (http.server's, werkzeug's) served on a
    thread of its own for the length of a ``with`` block, on 127.0.0.1."""

    scheme = "http"
    _server: Any
    _thread: threading.Thread

    def _serve_in_thread(self, server: Any) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class JsonServer(ServedInThread):
    """``with JsonServer(handle) as srv``: serves ``handle(Request) -> Reply`` on
    ``srv.url`` until the block ends, each request after ``latency(request)`` seconds
    (requests wait side by side, as a real API's do)."""

    def __init__(self, handle: Callable[[Request], Reply], *,
                 tls: ssl.SSLContext | None = None, latency: Latency | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    reply = Reply(400, {"error": {"code": 400, "message": "body is not JSON"}})
                else:
                    req = Request(self.command, url.path, parse_qs(url.query), body,
                                  {k.lower(): v for k, v in self.headers.items()})
                    if latency is not None:
                        time.sleep(latency(req))
                    reply = handle(req)
                data = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _serve

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
            self.scheme = "https"
        self._serve_in_thread(server)
