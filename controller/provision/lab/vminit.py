"""A lab VM's init: the first process of the VM, in its own network, UTS and mount
namespaces. It gives the VM its hostname and a private copy-on-write view of /etc, /opt,
/var/lib and /var/log (overlays whose upper layers are the VM's "disk" in the lab's data
dir) and an empty /run; runs the user-data like cloud-init on first boot (``write_files``,
then ``runcmd`` in order); and on every boot starts the systemd units enabled under
``/etc/systemd/system/multi-user.target.wants`` (PID 1 here is not systemd: an installer
in a lab VM, seen by ``BARISTA_LAB_VM`` in its environment, enables its unit and leaves
the start to this init). It reaps every orphan of the VM (a child subreaper) and stops
everything on SIGTERM.

Process mode (no root): no namespaces; paths of the user-data and units are taken under
the VM's own root directory (``BARISTA_ROOT`` tells the installer where), and the VM's
commands run there with the caller's own rights: nothing stops a command that writes an
absolute path (process mode is for machines without root; as root use the netns mode).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import grp
import gzip
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PR_SET_CHILD_SUBREAPER = 36
OVERLAYS = (("etc", "/etc"), ("opt", "/opt"), ("var-lib", "/var/lib"), ("var-log", "/var/log"))
BOOT_FINISHED = "boot-finished"  # in the VM dir: the instance, not the image (survives stop)
UNITS_WANTED = "etc/systemd/system/multi-user.target.wants"
STOP_GRACE = 5.0
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unit:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: str,
                 restart: str, restart_sec: float) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.restart = restart
        self.restart_sec = restart_sec
        self.pid = 0
        self.due = 0.0  # when to (re)start; 0 = not scheduled
        self.starts = 0


def parse_unit(path: Path, root: Path) -> Unit | None:
    """The [Service] lines this init understands: ExecStart, Environment, EnvironmentFile,
    WorkingDirectory, Restart, RestartSec."""
    section = ""
    exec_start = ""
    env: dict[str, str] = {}
    cwd = "/"
    restart = "no"
    restart_sec = 1.0
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if key == "ExecStart" and not exec_start:
            exec_start = value.lstrip("-@+!:")
        elif key == "Environment":
            for item in shlex.split(value):
                k, _, v = item.partition("=")
                env[k] = v
        elif key == "EnvironmentFile":
            optional = value.startswith("-")
            f = _rooted(root, value.lstrip("-"))
            try:
                for item in f.read_text().splitlines():
                    item = item.strip()
                    if item and not item.startswith("#") and "=" in item:
                        k, _, v = item.partition("=")
                        env[k.strip()] = v.strip().strip('"')
            except OSError:
                if not optional:
                    raise
        elif key == "WorkingDirectory":
            cwd = value.lstrip("-")
        elif key == "Restart":
            restart = value
        elif key == "RestartSec":
            with contextlib.suppress(ValueError):
                restart_sec = float(value.rstrip("s"))
    if not exec_start:
        return None
    return Unit(path.name, shlex.split(exec_start), env, cwd, restart, restart_sec)


def _rooted(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


class Init:
    def __init__(self, *, vm_dir: Path, hostname: str, process_mode: bool,
                 extra_path: Sequence[str]) -> None:
        self.vm_dir = vm_dir
        self.hostname = hostname
        self.process_mode = process_mode
        self.root = vm_dir / "root" if process_mode else Path("/")
        self.console = vm_dir / "console.log"
        self.status: dict[str, Any] = {"pid": os.getpid(), "phase": "booting",
                                       "boot_started": time.time()}
        self.env = {
            "PATH": ":".join([*extra_path, BASE_PATH]),
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "BARISTA_LAB_PREFIX": os.environ.get("BARISTA_LAB_PREFIX", ""),
            "BARISTA_LAB_VM": os.environ.get("BARISTA_LAB_VM", ""),
        }
        # The lab's code (topology.child_env): a VM that reuses the host's venv (an
        # editable install of some checkout) runs the same agent as the controller that
        # made the lab, not that checkout's.
        if os.environ.get("PYTHONPATH"):
            self.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if process_mode:
            self.env["BARISTA_ROOT"] = str(self.root)
            self.env["HOME"] = str(self.root / "root")
        self.steps: list[list[str]] = []
        self.step_pid = 0
        self.step_index = -1
        self.failed_steps: list[int] = []
        self.units: list[Unit] = []
        self.children: dict[int, str] = {}
        self.stopping = False

    # -- setup --------------------------------------------------------------------------

    def setup(self) -> None:
        if self.process_mode:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "root").mkdir(exist_ok=True)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        socket.sethostname(self.hostname)
        disk = self.vm_dir / "disk"
        for name, target in OVERLAYS:
            upper, work = disk / name / "upper", disk / name / "work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            _mount(["-t", "overlay", "overlay", "-o",
                    f"lowerdir={target},upperdir={upper},workdir={work}", target])
        _mount(["-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", "/run"])
        Path("/etc/hostname").write_text(self.hostname + "\n")

    # -- cloud-init ---------------------------------------------------------------------

    def first_boot(self) -> bool:
        return not (self.vm_dir / BOOT_FINISHED).exists()

    def load_user_data(self) -> None:
        path = self.vm_dir / "user-data"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        doc = yaml.safe_load(text) if text.lstrip().startswith("#cloud-config") else None
        if doc is None:
            # A plain script (#!...) is run as is, like cloud-init does.
            if text.startswith("#!"):
                script = self.vm_dir / "user-script"
                script.write_text(text)
                script.chmod(0o700)
                self.steps = [[str(script)]]
            return
        if not isinstance(doc, dict):
            self.log("user-data: not a mapping; ignored")
            return
        for i, item in enumerate(doc.get("write_files") or []):
            try:
                self.write_file(item)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log(f"write_files[{i}]: {exc}")
        for item in doc.get("runcmd") or []:
            if isinstance(item, list):
                self.steps.append([str(a) for a in item])
            elif isinstance(item, str):
                self.steps.append(["sh", "-c", item])

    def write_file(self, item: dict[str, Any]) -> None:
        path = _rooted(self.root, str(item["path"]))
        content = item.get("content", "")
        data = content.encode() if isinstance(content, str) else bytes(content)
        encoding = str(item.get("encoding", "")).lower()
        if encoding in ("b64", "base64"):
            data = base64.b64decode(data)
        elif encoding in ("gz+b64", "gzip+base64", "gz+base64"):
            data = gzip.decompress(base64.b64decode(data))
        mode = int(str(item.get("permissions", "0644")), 8)
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if item.get("append") else os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, mode)
            if not self.process_mode:
                user, _, group = str(item.get("owner", "root:root")).partition(":")
                os.fchown(fd, pwd.getpwnam(user).pw_uid, grp.getgrnam(group or user).gr_gid)
            os.write(fd, data)
        finally:
            os.close(fd)

    def log(self, line: str) -> None:
        with self.console.open("a") as f:
            f.write(f"[lab-init {time.strftime('%H:%M:%S')}] {line}\n")

    def save_status(self, **changes: Any) -> None:
        self.status.update(changes)
        tmp = self.vm_dir / "status.json.tmp"
        tmp.write_text(json.dumps(self.status))
        os.replace(tmp, self.vm_dir / "status.json")

    # -- processes ----------------------------------------------------------------------

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, what: str) -> int:
        out = os.open(self.console, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                os.chdir(cwd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"[lab-init] cannot run {argv[0]}: {exc}\n".encode())
            os._exit(127)
        os.close(out)
        self.children[pid] = what
        return pid

    def next_step(self) -> None:
        self.step_index += 1
        if self.step_index < len(self.steps):
            argv = self.steps[self.step_index]
            self.log(f"runcmd[{self.step_index}]: {argv[0]}")
            self.step_pid = self.spawn(argv, dict(self.env), str(self.root), "runcmd")
            return
        self.step_pid = 0
        marker = self.vm_dir / BOOT_FINISHED
        marker.write_text(f"{time.time()}\n")
        self.save_status(phase="services", user_data_done=time.time(),
                         user_data_failed=self.failed_steps)
        self.start_units()

    def enabled_here(self) -> list[Path]:
        """The units enabled in this VM: in its own layer of /etc, never the image's (the
        host's own services, enabled in the lower layer, must not start in a VM)."""
        if self.process_mode:
            own = self.root / UNITS_WANTED
        else:
            own = self.vm_dir / "disk" / "etc" / "upper" / UNITS_WANTED.removeprefix("etc/")
        names = sorted(p.name for p in own.glob("*.service")) if own.is_dir() else []
        return [_rooted(self.root, UNITS_WANTED) / n for n in names]

    def start_units(self) -> None:
        for path in self.enabled_here():
            try:
                unit = parse_unit(path, self.root)
            except OSError as exc:
                self.log(f"unit {path.name}: {exc}")
                continue
            if unit is not None:
                unit.due = time.monotonic()
                self.units.append(unit)
        self.run_due_units()
        self.save_status(phase="running", units=[u.name for u in self.units])

    def run_due_units(self) -> None:
        now = time.monotonic()
        for unit in self.units:
            if unit.pid or not unit.due or unit.due > now or self.stopping:
                continue
            unit.due = 0.0
            unit.starts += 1
            env = {**self.env, **unit.env}
            cwd = str(_rooted(self.root, unit.cwd))
            self.log(f"starting {unit.name} (start {unit.starts})")
            unit.pid = self.spawn(unit.argv, env, cwd, unit.name)

    def reaped(self, pid: int, status: int) -> None:
        what = self.children.pop(pid, "")
        code = os.waitstatus_to_exitcode(status)
        if pid == self.step_pid:
            self.log(f"runcmd[{self.step_index}] exited {code}")
            if code != 0:
                self.failed_steps.append(self.step_index)
            self.next_step()
            return
        for unit in self.units:
            if unit.pid == pid:
                unit.pid = 0
                self.log(f"{unit.name} exited {code}")
                again = unit.restart == "always" or (unit.restart == "on-failure" and code != 0)
                if again and not self.stopping:
                    unit.due = time.monotonic() + max(0.1, unit.restart_sec)
                return
        del what

    def next_timeout(self) -> float:
        dues = [u.due for u in self.units if u.due and not u.pid]
        if not dues:
            return 60.0
        return max(0.01, min(dues) - time.monotonic())

    def reap_all(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped(pid, status)

    def shutdown(self) -> None:
        self.stopping = True
        self.save_status(phase="stopping")
        groups = list(self.children)
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            signal.sigtimedwait([signal.SIGCHLD], 0.1)
            self.reap_all()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.reap_all()

    def run(self) -> int:
        watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        self.setup()
        self.save_status(phase="booting", hostname=self.hostname)
        if self.first_boot():
            self.save_status(phase="user-data")
            self.load_user_data()
            self.next_step()
        else:
            self.start_units()
        while True:
            info = signal.sigtimedwait(list(watched), self.next_timeout())
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.shutdown()
                return 0
            self.reap_all()
            self.run_due_units()


def _mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="barista-lab-init", description=__doc__)
    parser.add_argument("--vm-dir", type=Path, required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--process-mode", action="store_true")
    parser.add_argument("--extra-path", action="append", default=[])
    args = parser.parse_args(argv)
    init = Init(vm_dir=args.vm_dir.resolve(), hostname=args.hostname,
                process_mode=args.process_mode, extra_path=args.extra_path)
    # An init's working directory is the root; never the directory it was started from.
    os.chdir("/")
    try:
        return init.run()
    except (OSError, subprocess.CalledProcessError) as exc:
        init.log(f"init failed: {exc}")
        init.save_status(phase="failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
