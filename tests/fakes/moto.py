"""moto's EC2 (the real moto server app, in a thread) behind a latency shim: a WSGI
middleware that waits ``latency(action)`` seconds before each request (the real EC2 API's
latency) and counts the requests by EC2 action. What answers is moto, unchanged, except
for one thing moto lacks: EC2's idempotency ("Ensuring idempotency in Amazon EC2 API
requests": a RunInstances repeated with the same ClientToken returns the first request's
result instead of launching again). The shim answers a repeated token with the first
answer (a repeat arriving while the first is in progress waits for it)."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.http import ServedInThread

UBUNTU_NOBLE = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20260101"
MOTO_OWNER = "123456789012"  # moto registers every image under its own account

# EC2 action ("RunInstances") and the request's fields -> seconds to wait before it is
# handled.
ActionLatency = Callable[[str, Mapping[str, list[str]]], float]


class MotoServer(ServedInThread):
    """``with MotoServer(latency=...) as m``: moto on ``m.url``; ``m.calls`` counts the
    EC2 actions it was sent (moto's own /moto-api requests are not counted)."""

    def __init__(self, *, latency: ActionLatency | None = None) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.calls: Counter[str] = Counter()
        self.log: list[str] = []  # the actions in the order they came
        self._tokens: dict[str, threading.Lock] = {}
        self._answers: dict[str, tuple[str, list[tuple[str, str]], bytes]] = {}
        self._lock = threading.Lock()
        self._latency = latency
        app = DomainDispatcherApplication(create_backend_app)
        self._serve_in_thread(make_server("127.0.0.1", 0, self._wrap(app), threaded=True,
                                          request_handler=Quiet))

    def _wrap(self, app: Any) -> Callable[..., Iterable[bytes]]:
        def middleware(environ: dict[str, Any], start: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "").startswith("/moto-api"):
                result: Iterable[bytes] = app(environ, start)
                return result
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(size) if size else b""
            environ["wsgi.input"] = io.BytesIO(body)
            fields = parse_qs(body.decode(errors="replace"))
            fields.update(parse_qs(environ.get("QUERY_STRING", "")))
            action = (fields.get("Action") or ["?"])[0]
            with self._lock:
                self.calls[action] += 1
                self.log.append(action)
            if self._latency is not None:
                time.sleep(self._latency(action, fields))
            token = (fields.get("ClientToken") or [""])[0] if action == "RunInstances" else ""
            if not token:
                answer: Iterable[bytes] = app(environ, start)
                return answer
            with self._lock:
                lock = self._tokens.setdefault(token, threading.Lock())
            with lock:  # one request per token at a time; a repeat gets the first answer
                if token not in self._answers:
                    got: dict[str, Any] = {}

                    def keep(status: str, headers: list[tuple[str, str]],
                             exc_info: Any = None) -> Any:
                        got["status"], got["headers"] = status, headers
                        return lambda data: None

                    data = b"".join(app(environ, keep))
                    if not got["status"].startswith("200"):
                        start(got["status"], got["headers"])
                        return [data]  # a failed launch is not remembered
                    self._answers[token] = (got["status"], got["headers"], data)
                status, headers, data = self._answers[token]
            start(status, headers)
            return [data]

        return middleware
