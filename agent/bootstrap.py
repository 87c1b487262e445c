"""The node-side installer: turns a machine into a running, enrolling agent.

The controller serves this file inside ``/install.sh`` (a POSIX sh wrapper that writes it to
a temporary file and runs it with the machine's python3), so it uses the standard library
only and imports nothing of ours. Trust comes from the join token's CA hash: the controller's
CA is checked against it before anything is sent, and everything after that (the manifest,
the agent wheel) goes over TLS that trusts only that CA; the wheel is checked against the
sha256 the manifest gave. Until the wheel is verified nothing is written outside a temporary
directory. Each step that fails says its name. Running it again is harmless.

Subcommands: ``install`` (default), ``start``, ``stop``, ``status``, ``uninstall``, and
``supervise`` (what runs the agent where systemd is not PID 1).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

PREFIX = Path("/opt/barista-agent")
ETC = Path("/etc/barista")
STATE_DIR = Path("/var/lib/barista-agent")
RUN_DIR = Path("/run/barista-agent")
LOG_FILE = Path("/var/log/barista-agent.log")
UNIT_PATH = Path("/etc/systemd/system/barista-agent.service")
UNIT_NAME = "barista-agent.service"
# The interpreter the unit in infra/systemd/ starts the agent with; rewritten when the
# venv is elsewhere.
UNIT_EXEC = "/opt/barista-agent/bin/python"
# How the agent is started, by the unit and by our supervisor alike: -P (the working
# directory is not on sys.path: no ./agent there can stand in for ours), -OO (no docstrings
# or asserts, see the unit file); flags, which the commands the agent runs do not inherit.
AGENT_FLAGS = ["-P", "-OO"]
AGENT_ARGS = [*AGENT_FLAGS, "-m", "agent", "--config", str(ETC / "agent.toml")]
BOOT_CONFIG = ETC / "join.json"

# The same token shapes as protocol/trust.py (tests/unit/test_bootstrap.py checks that both
# agree): bt2.<CA sha256>.<id>.<secret>, optionally followed by "~<enroll JWT>".
_PINNED_RE = re.compile(r"^bt2\.([0-9a-f]{64})\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
_PLAIN_RE = re.compile(r"^bt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
JOIN_CREDS_SEP = "~"
MIN_PYTHON = (3, 11)
MAX_WHEEL = 64 << 20


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step {step} failed: {reason}")
        self.step = step
        self.reason = reason


def say(message: str) -> None:
    print(f"barista-install: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    try:
        yield
    except StepFailed:
        raise
    except (OSError, ValueError, ssl.SSLError, subprocess.SubprocessError) as exc:
        raise StepFailed(name, str(exc) or type(exc).__name__) from None


# -- trust -----------------------------------------------------------------------------


def token_pin(token: str) -> str | None:
    """The CA hash a join token pins, "" for a plain (bt1) token, None if malformed."""
    bare = token.strip().split(JOIN_CREDS_SEP, 1)[0]
    m = _PINNED_RE.match(bare)
    if m:
        return m.group(1)
    return "" if _PLAIN_RE.match(bare) else None


def _chain(host: str, port: int, timeout: float) -> list[bytes]:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only the handshake: the chain is checked below
    with socket.create_connection((host, port), timeout=timeout) as sock, \
            probe.wrap_socket(sock, server_hostname=host) as tls:
        public = getattr(tls, "get_unverified_chain", None)
        if public is not None:
            return list(public() or [])
        raw: Any = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw or []]  # type: ignore[attr-defined]


def pinned_context(url: str, pin: str, ca_file: str, timeout: float) -> tuple[ssl.SSLContext, str]:
    """A context trusting only the CA whose sha256 is ``pin`` (and checking host names),
    and that CA as PEM. The CA comes from ``ca_file`` (checked) or from the server's own
    handshake, where nothing but the handshake is sent."""
    where = urllib.parse.urlsplit(url)
    if where.scheme != "https":
        raise StepFailed("trust", f"the join token pins CA sha256 {pin}, but {url} is not "
                         "https: refusing to fetch anything without TLS")
    if ca_file:
        der = ssl.PEM_cert_to_DER_cert(Path(ca_file).read_text())
        found = [hashlib.sha256(der).hexdigest()]
        pem = ssl.DER_cert_to_PEM_cert(der)
    else:
        chain = _chain(where.hostname or "", where.port or 443, timeout)
        found = [hashlib.sha256(d).hexdigest() for d in chain]
        pem = next((ssl.DER_cert_to_PEM_cert(d)
                    for d, h in zip(chain, found, strict=True) if h == pin), "")
    if pin not in found:
        raise StepFailed(
            "trust",
            f"the controller at {where.netloc} presented a CA that is not the one the join "
            f"token pins: expected sha256 {pin}, got {', '.join(found) or 'none'}. Refusing "
            "to send anything: this is not the controller the token was made for (or "
            "someone is in the way); nothing was installed")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pem)
    return ctx, pem


def fetch(url: str, ctx: ssl.SSLContext | None, timeout: float, limit: int) -> bytes:
    import urllib.request

    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if ctx is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(url, timeout=timeout) as resp:
        data: bytes = resp.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{url} sent more than {limit} bytes")
    return data


# -- files -----------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` (by rename, with ``mode``); False when the file already holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            os.chmod(path, mode)
            return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings: a JSON string is a TOML basic string


def agent_toml(settings: dict[str, Any]) -> bytes:
    lines = ["# written by the barista installer; re-running it rewrites this file", "[agent]"]
    lines += [f"{k} = {_toml(v)}" for k, v in settings.items() if v not in ("", [], {})]
    return ("\n".join(lines) + "\n").encode()


# -- service ---------------------------------------------------------------------------


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1."""
    return Path("/run/systemd/system").is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"supervise" in cmdline and b"bootstrap" in cmdline


def supervisor_pid() -> int | None:
    try:
        pid = int((RUN_DIR / "supervisor.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def stop_supervisor(timeout: float = 15.0) -> bool:
    pid = supervisor_pid()
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def start_supervisor(python: str) -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            [python, str(PREFIX / "bootstrap.py"), "supervise"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, cwd="/",
        )
    finally:
        os.close(log)
    deadline = time.monotonic() + 10
    while supervisor_pid() != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise StepFailed("start", f"the supervisor did not start (see {LOG_FILE})")
        time.sleep(0.05)
    return proc.pid


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True, stdout=subprocess.DEVNULL)


def supervise() -> int:
    """Run the agent and start it again when it exits (backoff up to 30 s), until SIGTERM."""
    installed = json.loads((PREFIX / "installed.json").read_text())
    command = [installed["python"], *AGENT_ARGS]
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    pidfile = RUN_DIR / "supervisor.pid"
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    write_file(pidfile, f"{os.getpid()}\n".encode(), 0o644)
    backoff = 1.0
    try:
        while not stopping:
            started = time.monotonic()
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
            code = child.wait()
            if stopping:
                break
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            print(f"barista-supervise: agent exited with {code}; again in {backoff:.0f}s",
                  file=sys.stderr, flush=True)
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
    return 0


# -- install ---------------------------------------------------------------------------


def _read_boot_config(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("join_token"), str):
        raise ValueError(f"{path} is not a barista boot config (no join_token)")
    return data


def _labels(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--label {item!r} must be key=value")
        out[k.strip()] = v.strip()
    return out


def install(args: argparse.Namespace) -> int:
    with step("python"):
        if sys.version_info < MIN_PYTHON:
            raise StepFailed("python", f"the agent needs Python >= {MIN_PYTHON[0]}."
                             f"{MIN_PYTHON[1]}; this is {sys.version.split()[0]}")
    with step("config"):
        boot: dict[str, Any] = _read_boot_config(args.config) if args.config else {}
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
        else:
            token = str(boot.get("join_token", "")).strip()
        if not token:
            raise StepFailed("config", "no join token: give --token-file FILE (mode 0600) "
                             "or --config join.json")
        pin = token_pin(token)
        if pin is None:
            raise StepFailed("config", "the join token is malformed; check it was copied "
                             "whole")
        url = (args.url or str(boot.get("installer_url", "")).removesuffix("/install.sh"))
        url = url.rstrip("/")
        if not url:
            raise StepFailed("config", "no controller URL (--url)")
    timeout = args.timeout
    with step("trust"):
        # The API's CA is the token's pin, unless the join line names it (a controller
        # whose agents use an external NATS with another CA: the agent checks the token's
        # pin against NATS itself).
        api_pin = args.api_ca_sha256.strip().lower() or pin
        if api_pin and not _SHA256_RE.match(api_pin):
            raise StepFailed("trust", "--api-ca-sha256 must be 64 hex digits")
        if api_pin:
            pin = api_pin
            ctx: ssl.SSLContext | None
            ctx, ca_pem = pinned_context(url, pin, args.ca_file, timeout)
            say(f"the controller's CA matches the token (sha256 {pin[:16]}...)")
        else:
            if url.startswith("https:"):
                raise StepFailed("trust", "the join token pins no CA (bt1) but the controller "
                                 "serves TLS: use a token from this controller")
            ctx, ca_pem = None, ""
            say("WARNING: the join token pins no CA: the controller serves plain HTTP and "
                "NATS, nothing is authenticated (use this only on a trusted network)")
    with step("manifest"):
        manifest = json.loads(fetch(f"{url}/v1/bootstrap/manifest", ctx, timeout, 1 << 20))
        wheel = manifest["wheel"]
        if not _SHA256_RE.match(str(wheel["sha256"])) or "/" in str(wheel["filename"]):
            raise ValueError("the manifest's wheel entry is malformed")
        # What this controller's tokens pin (its NATS CA), told over the pinned TLS: a token
        # pinning anything else could never enroll, so nothing is installed for it.
        nats_pin = str(manifest.get("nats_ca_sha256", ""))
        if token_pin(token) != nats_pin:
            raise StepFailed(
                "trust", f"the join token pins CA sha256 {token_pin(token) or '(none)'}, but "
                f"this controller's NATS CA is {nats_pin or '(none: plain NATS)'}: the token "
                "was not made by this controller; nothing was installed")
    reuse = args.reuse_venv
    with tempfile.TemporaryDirectory(prefix="barista-install-") as tmp:
        wheel_path = Path(tmp) / str(wheel["filename"])
        if not reuse:
            with step("download"):
                data = fetch(f"{url}/v1/bootstrap/agent", ctx, timeout, MAX_WHEEL)
            with step("verify"):
                digest = hashlib.sha256(data).hexdigest()
                if digest != wheel["sha256"]:
                    raise StepFailed(
                        "verify", f"the agent wheel does not match the manifest: expected "
                        f"sha256 {wheel['sha256']}, got {digest} ({len(data)} bytes). "
                        "Refusing to install it; nothing was installed")
                wheel_path.write_bytes(data)
                say(f"agent wheel {wheel['filename']} verified (sha256 {digest[:16]}...)")
        # From here on the machine is changed.
        with step("venv"):
            agent_bin, python = _ensure_venv(reuse, wheel_path, wheel["sha256"], args)
    with step("files"):
        PREFIX.mkdir(parents=True, exist_ok=True)
        os.chmod(PREFIX, 0o755)
        me = Path(__file__).read_bytes()
        write_file(PREFIX / "bootstrap.py", me, 0o755)
        ETC.mkdir(parents=True, exist_ok=True)
        os.chmod(ETC, 0o700)
        token_file = ETC / "join-token"
        changed = write_file(token_file, token.encode() + b"\n", 0o600)
        if ca_pem:
            changed |= write_file(ETC / "ca.pem", ca_pem.encode(), 0o644)
        labels = {**boot.get("labels", {}), **_labels(args.label)}
        hostname = args.node_name or str(boot.get("node_name") or boot.get("hostname") or "")
        settings = {
            "nats_urls": list(boot.get("nats_urls") or manifest.get("nats_urls") or []),
            "controller_keys": list(boot.get("controller_keys")
                                    or manifest.get("controller_keys") or []),
            "token_file": str(token_file),
            "state_dir": str(STATE_DIR),
            "hostname": hostname,
            "labels": labels,
            # The cloud's word on the node's network (controller/provision/bootstrap.py
            # BootConfig.underlay); agent/facts.py reports it.
            "mesh_vpc_cidr": str(boot.get("underlay", {}).get("vpc_cidr", "")),
            "mesh_public_address": str(boot.get("underlay", {}).get("public_address", "")),
        }
        if not settings["nats_urls"]:
            raise StepFailed("files", "neither the boot config nor the controller gave a NATS "
                             "url")
        changed |= write_file(ETC / "agent.toml", agent_toml(settings), 0o600)
        write_file(PREFIX / "installed.json", json.dumps(
            {"agent": agent_bin, "python": python, "venv": reuse or str(PREFIX),
             "wheel_sha256": "" if reuse else wheel["sha256"],
             "version": "(reused venv)" if reuse else wheel.get("version", ""),
             "controller": url}, indent=1).encode(), 0o644)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(STATE_DIR, 0o700)
    with step("service"):
        if systemd_running() and not args.no_systemd:
            unit = str(manifest["systemd_unit"]).replace(UNIT_EXEC, python)
            changed |= write_file(UNIT_PATH, unit.encode(), 0o644)
            systemctl("daemon-reload")
            systemctl("enable", UNIT_NAME)
            systemctl("restart" if changed else "start", UNIT_NAME)
            say(f"systemd unit {UNIT_NAME} enabled and started")
        elif os.environ.get("BARISTA_LAB_VM"):
            # A lab VM's init (controller/provision/lab/vminit.py) starts the units the VM
            # enabled, after the user-data and at every boot, like systemd would.
            unit = str(manifest["systemd_unit"]).replace(UNIT_EXEC, python)
            changed |= write_file(UNIT_PATH, unit.encode(), 0o644)
            wants = UNIT_PATH.parent / "multi-user.target.wants" / UNIT_NAME
            wants.parent.mkdir(parents=True, exist_ok=True)
            if not wants.is_symlink():
                wants.symlink_to(UNIT_PATH)
            say(f"lab VM: unit {UNIT_NAME} enabled; the lab's init starts it at every boot")
        else:
            restarted = stop_supervisor()
            pid = start_supervisor(python)
            say(f"systemd is not PID 1 here: the agent runs under barista's own supervisor "
                f"(pid {pid}, pidfile {RUN_DIR / 'supervisor.pid'}, log {LOG_FILE})"
                f"{'; restarted' if restarted else ''}")
    say(f"done: the agent enrolls with {settings['nats_urls'][0]}"
        f"{' as node ' + hostname if hostname else ''}")
    return 0


def _ensure_venv(reuse: str, wheel: Path, sha256: str, args: argparse.Namespace) -> tuple[str, str]:
    """(the barista-agent executable, the venv's python)."""
    if reuse:
        venv = Path(reuse)
        agent, python = venv / "bin" / "barista-agent", venv / "bin" / "python"
        if not agent.exists() or not python.exists():
            raise StepFailed("venv", f"--reuse-venv {reuse} has no bin/barista-agent")
        say(f"reusing the venv {reuse} (no wheel installed)")
        return str(agent), str(python)
    python = PREFIX / "bin" / "python"
    marker = PREFIX / ".wheel-sha256"
    if python.exists() and marker.exists() and marker.read_text().strip() == sha256:
        say(f"the agent in {PREFIX} is already this wheel")
        return str(PREFIX / "bin" / "barista-agent"), str(python)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PREFIX)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if args.wheelhouse:
        pip += ["--no-index", "--find-links", args.wheelhouse]
    run = subprocess.run([*pip, str(wheel)], capture_output=True, text=True)
    if run.returncode != 0:
        raise StepFailed("venv", f"pip could not install the agent: {run.stderr.strip()[-800:]}")
    write_file(marker, sha256.encode(), 0o644)
    say(f"agent installed in {PREFIX}")
    return str(PREFIX / "bin" / "barista-agent"), str(python)


# -- the other subcommands ---------------------------------------------------------------


def _installed() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((PREFIX / "installed.json").read_text())
    except (OSError, ValueError):
        return {}
    return data


def start() -> int:
    installed = _installed()
    if not installed:
        raise StepFailed("start", f"the agent is not installed ({PREFIX})")
    if systemd_running() and UNIT_PATH.exists():
        systemctl("start", UNIT_NAME)
    elif supervisor_pid() is None:
        start_supervisor(installed["python"])
    return 0


def stop() -> int:
    if systemd_running() and UNIT_PATH.exists():
        systemctl("stop", UNIT_NAME)
    else:
        stop_supervisor()
    return 0


def status() -> int:
    running = (
        subprocess.run(["systemctl", "is-active", "--quiet", UNIT_NAME]).returncode == 0
        if systemd_running() and UNIT_PATH.exists() else supervisor_pid() is not None)
    installed = _installed()
    node = ""
    with contextlib.suppress(OSError, ValueError):
        node = json.loads((STATE_DIR / "state.json").read_text()).get("node_id", "")
    print(json.dumps({"installed": bool(installed), "running": running, "node_id": node,
                      "version": installed.get("version", "")}))
    return 0


def uninstall() -> int:
    """Stop the agent and remove everything the installer made (identity included)."""
    stop()
    if UNIT_PATH.exists():
        if systemd_running():
            subprocess.run(["systemctl", "disable", UNIT_NAME], check=False)
        UNIT_PATH.unlink()
    venv = _installed().get("venv", str(PREFIX))
    for path in (PREFIX, STATE_DIR, RUN_DIR):
        if path == PREFIX or str(path) != venv:  # never a reused venv
            shutil.rmtree(path, ignore_errors=True)
    for name in ("agent.toml", "join-token", "ca.pem", "join.json"):
        with contextlib.suppress(FileNotFoundError):
            (ETC / name).unlink()
    say("agent stopped and removed")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="barista-install", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="install",
                   choices=["install", "start", "stop", "status", "uninstall", "supervise"])
    p.add_argument("--url", default="", help="the controller's API (https://host:port)")
    p.add_argument("--config", default="", help=f"boot config (cloud-init: {BOOT_CONFIG})")
    p.add_argument("--token-file", default="", help="the join token (a 0600 file)")
    p.add_argument("--ca-file", default="", help="the controller's CA (checked against "
                   "the token's hash); default: learned from the server and checked")
    p.add_argument("--api-ca-sha256", default="", help="the API's CA hash when it is not "
                   "the token's pin (default: the token's pin)")
    p.add_argument("--label", action="append", default=[], help="k=v (repeat)")
    p.add_argument("--node-name", default="", help="the agent's hostname (bound tokens)")
    p.add_argument("--reuse-venv", default="", metavar="PATH",
                   help="run the agent from this venv instead of installing the wheel (labs)")
    p.add_argument("--wheelhouse", default="", metavar="DIR",
                   help="install the agent's dependencies from DIR only (offline)")
    p.add_argument("--no-systemd", action="store_true",
                   help="use barista's own supervisor even where systemd runs")
    p.add_argument("--timeout", type=float, default=30.0)
    # Refused: a command line is readable by every local user.
    p.add_argument("--token", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def die(message: str, code: int = 1) -> NoReturn:
    say(message)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.token is not None:
        die("--token is refused: a command line is readable by every local user. Put the "
            "token in a file only root can read and pass --token-file FILE", 2)
    if os.geteuid() != 0 and args.command != "status":
        die("run the installer as root (it writes /etc/barista and /opt/barista-agent)", 2)
    try:
        if args.command == "install":
            return install(args)
        if args.command == "supervise":
            return supervise()
        return {"start": start, "stop": stop, "status": status,
                "uninstall": uninstall}[args.command]()
    except StepFailed as exc:
        die(str(exc))


if __name__ == "__main__":
    sys.exit(main())
