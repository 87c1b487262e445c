"""What a fresh VM is given: one ``BootConfig`` per node, rendered into cloud-init user-data;
and what the controller serves to any joining machine: the installer, the agent wheel and the
one-line join that bootstraps trust from the join token's CA hash.

The user-data is a ``#cloud-config`` document with two parts every provider passes on
unchanged (AWS user-data, GCP ``user-data`` metadata, Azure custom_data, the lab runs it
itself): ``write_files`` puts the boot config at ``BOOT_CONFIG_PATH`` (mode 0600: it holds
the one-time join token) and ``runcmd`` runs the installer the controller serves, which reads
that file. The token is never on a command line; the rendered text is a secret and is
never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import ssl
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

BOOT_CONFIG_PATH = "/etc/barista/join.json"
BOOT_MARKER = "# barista bootstrap v1"


class BootConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything an installer and a first agent start need, for one node."""

    join_token: str  # TokenService.join_text(): bound to ``node_name``, one-time, expiring
    node_name: str  # "<infra>-<group>-<index>": the node may enroll only as this
    nats_urls: list[str]
    controller_keys: list[str]  # base64 Ed25519 command-signing keys
    installer_url: str  # https://<controller>/install.sh (pinned by ca_sha256)
    # The API's CA pin (the same as the token's with the embedded NATS); "" only on a plain
    # (no TLS) controller, which the installer says.
    ca_sha256: str = ""
    labels: dict[str, str] = {}
    hostname: str = ""
    # Lab VMs may reuse the host's venv instead of installing the wheel (--reuse-venv).
    reuse_venv: str = ""
    # What the cloud said about the node's network when it was launched (the installer
    # writes it into the agent's mesh_* settings; the agent reports it in its facts):
    # ``vpc_cidr`` (the subnet the VM is put in), ``public_address`` ("none": no public
    # address, "private": its private address is public; absent: the agent's config).
    underlay: dict[str, str] = {}


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(BootConfig)


def render_user_data(config: BootConfig) -> str:
    """The cloud-init user-data for one node (a secret: it carries the join token)."""
    body = _ENCODER.encode(config).decode()
    # cloud-init YAML: a JSON string is valid YAML; the block scalar keeps it verbatim.
    indented = "\n".join("      " + line for line in body.splitlines())
    return (
        "#cloud-config\n"
        f"{BOOT_MARKER}\n"
        "write_files:\n"
        f"  - path: {BOOT_CONFIG_PATH}\n"
        "    permissions: '0600'\n"
        "    owner: root:root\n"
        "    content: |\n"
        f"{indented}\n"
        "runcmd:\n"
        f"  - [sh, -c, {json.dumps(install_command(config))}]\n"
    )


def install_command(config: BootConfig) -> str:
    """What runcmd runs (and the ssh provider over SSH): the join with the boot config."""
    extra = ["--config", BOOT_CONFIG_PATH]
    if config.reuse_venv:
        extra += ["--reuse-venv", config.reuse_venv]
    return join_command(base_url_of(config.installer_url), config.ca_sha256, extra)


def read_user_data(text: str) -> BootConfig:
    """The boot config inside rendered user-data (the lab and the sim provider boot with
    it); raises ``ValueError`` with the reason for anything else."""
    if BOOT_MARKER not in text:
        raise ValueError("user-data was not rendered by barista (no bootstrap marker)")
    lines = text.splitlines()
    try:
        start = lines.index("    content: |") + 1
    except ValueError:
        raise ValueError("user-data has no boot config content block") from None
    body = []
    for line in lines[start:]:
        if not line.startswith("      "):
            break
        body.append(line[6:])
    try:
        return _DECODER.decode("\n".join(body).encode())
    except msgspec.DecodeError as exc:
        raise ValueError(f"boot config in user-data is invalid: {exc}") from None


# -- the one-line join -------------------------------------------------------------------

_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,300}$")


def base_url_of(installer_url: str) -> str:
    return installer_url.removesuffix("/install.sh").rstrip("/")


def check_base_url(url: str) -> str:
    """``url`` if it is a plain http(s)://host[:port] (it goes into shell text)."""
    parts = urllib.parse.urlsplit(url)
    if (parts.scheme not in ("http", "https") or not _HOSTPORT_RE.match(parts.netloc)
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"controller URL {url!r} must be http(s)://host[:port]")
    return f"{parts.scheme}://{parts.netloc}"


def join_command(base_url: str, ca_sha256: str, args: list[str], *,
                 token_from_stdin: bool = False) -> str:
    """The sh script that joins a machine (cloud-init runs it, and `barista token create`
    prints it inside ``sh -c``): with a pinned CA it fetches the CA with verification off,
    checks its sha256 against ``ca_sha256`` (the token's pin) *before anything else*, and
    then fetches the installer over TLS trusting only that CA; the installer checks the
    same pin again and the wheel against its sha256. ``token_from_stdin``: the join token
    is read from standard input into a 0600 file, never from a command line."""
    base = check_base_url(base_url)
    q = shlex.quote
    lines = ["set -e", "umask 077", 'd=$(mktemp -d /tmp/barista-join.XXXXXX)',
             "trap 'rm -rf \"$d\"' EXIT"]
    installer_args = ["--url", base, *args]
    if token_from_stdin:
        lines.append('cat > "$d/token"; [ -s "$d/token" ] || { echo "barista-join: no join '
                     'token on standard input" >&2; exit 1; }')
        installer_args += ["--token-file", "$d/token"]
    if ca_sha256:
        if not base.startswith("https://"):
            raise ValueError("a pinned CA needs an https controller URL")
        host = urllib.parse.urlsplit(base).netloc
        lines += [
            f'curl -fsSk --proto =https {q(base + "/v1/bootstrap/ca.der")} -o "$d/ca.der"',
            f'echo "{ca_sha256}  $d/ca.der" | sha256sum -c --status || {{ echo "barista-join: '
            f"the controller at {host} presented a CA that is not the one the join token pins "
            f'(sha256 {ca_sha256}): refusing to go on" >&2; exit 1; }}',
            '{ echo "-----BEGIN CERTIFICATE-----"; base64 "$d/ca.der"; '
            'echo "-----END CERTIFICATE-----"; } > "$d/ca.pem"',
            # --capath: the default system CAs are not trusted either, only this one.
            f'curl -fsS --proto =https --cacert "$d/ca.pem" --capath "$d" '
            f'{q(base + "/install.sh")} -o "$d/install.sh"',
        ]
        installer_args += ["--ca-file", "$d/ca.pem", "--api-ca-sha256", ca_sha256]
    else:
        lines.append(f'curl -fsS {q(base + "/install.sh")} -o "$d/install.sh"')
    quoted = " ".join(a if a.startswith("$d/") else q(a) for a in installer_args)
    quoted = quoted.replace("$d/token", '"$d/token"').replace("$d/ca.pem", '"$d/ca.pem"')
    # "$@": more installer flags after the script's name (--label k=v, --node-name ...).
    lines.append(f'sh "$d/install.sh" {quoted} "$@"')
    return "; ".join(lines)


def join_line(base_url: str, ca_sha256: str, args: list[str] | None = None) -> str:
    """The one line an operator runs as root on a machine to adopt, with the join token on
    standard input: ``sh -c '...' barista-join [installer flags] < join-token``."""
    script = join_command(base_url, ca_sha256, list(args or []), token_from_stdin=True)
    return f"sh -c {shlex.quote(script)} barista-join < join-token"


# -- what the controller serves ----------------------------------------------------------

INSTALLER_DELIMITER = "BARISTA_BOOTSTRAP_PY"


def package_dir(name: str) -> Path:
    """Where a top-level package of ours lives, found without importing it (the controller
    imports nothing of the agent but its two shared utilities; it only ships its files)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name!r} package is not installed next to the controller")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def bootstrap_source() -> str:
    """agent/bootstrap.py, the installer's program."""
    return (package_dir("agent") / "bootstrap.py").read_text()
SYSTEMD_UNIT = Path(__file__).resolve().parents[2] / "infra" / "systemd" / "barista-agent.service"


def installer_script(base_url: str) -> str:
    """``/install.sh``: POSIX sh that runs agent/bootstrap.py with the machine's python3."""
    source = bootstrap_source()
    if INSTALLER_DELIMITER in source:
        raise RuntimeError("agent/bootstrap.py contains the installer's heredoc delimiter")
    url = shlex.quote(check_base_url(base_url))
    return (
        "#!/bin/sh\n"
        "# barista agent installer, served by the controller at /install.sh. Fetch it over\n"
        "# TLS pinned to the controller's CA (the one-line join from `barista token create`\n"
        "# does); it checks that CA against the join token and the agent wheel against the\n"
        "# manifest's sha256 before it installs anything. Re-running it is harmless.\n"
        "set -eu\n"
        f"url=${{BARISTA_URL:-{url}}}\n"
        'py=${BARISTA_PYTHON:-python3}\n'
        'command -v "$py" >/dev/null 2>&1 || { echo "barista-install: step python failed: '
        '$py not found (install python3 >= 3.11 and python3-venv)" >&2; exit 1; }\n'
        'd=$(mktemp -d /tmp/barista-install.XXXXXX)\n'
        "trap 'rm -rf \"$d\"' EXIT\n"
        f"cat > \"$d/bootstrap.py\" <<'{INSTALLER_DELIMITER}'\n"
        f"{source}"
        f"{INSTALLER_DELIMITER}\n"
        'rc=0\n"$py" "$d/bootstrap.py" --url "$url" "$@" || rc=$?\nexit $rc\n'
    )


@dataclass(frozen=True)
class AgentWheel:
    path: Path
    filename: str
    version: str
    sha256: str
    size: int


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _b64_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _agent_requirements() -> list[str]:
    """The agent's dependencies: the distribution's base requirements (no extras)."""
    reqs = importlib.metadata.requires("barista") or []
    return [r for r in reqs if "extra ==" not in r and "extra==" not in r]


def build_agent_wheel(out_dir: Path) -> AgentWheel:
    """The agent wheel (``barista-agent``: the ``agent`` and ``protocol`` packages only, no
    controller code), built from the running source with a content-derived version, so the
    same source gives the same bytes and a changed one a newer local version. Blocking."""
    files: list[tuple[str, bytes]] = []
    for package in ("agent", "protocol"):
        root = package_dir(package)
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".typed") \
                    and "__pycache__" not in path.parts:
                files.append((f"{root.name}/{path.relative_to(root).as_posix()}",
                              path.read_bytes()))
    content = hashlib.sha256()
    for name, data in files:
        content.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    base_version = importlib.metadata.version("barista")
    version = f"{base_version}+g{content.hexdigest()[:12]}"
    dist = f"barista_agent-{version}"
    metadata = "".join([
        "Metadata-Version: 2.1\nName: barista-agent\n", f"Version: {version}\n",
        "Summary: barista node agent (built by the controller)\nRequires-Python: >=3.11\n",
        *(f"Requires-Dist: {r}\n" for r in _agent_requirements()),
    ])
    files += [
        (f"{dist}.dist-info/METADATA", metadata.encode()),
        (f"{dist}.dist-info/WHEEL", b"Wheel-Version: 1.0\nGenerator: barista\n"
         b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist}.dist-info/entry_points.txt",
         b"[console_scripts]\nbarista-agent = agent.__main__:main\n"),
    ]
    record = "".join(f"{n},sha256={_b64_digest(d)},{len(d)}\n" for n, d in files)
    record += f"{dist}.dist-info/RECORD,,\n"
    files.append((f"{dist}.dist-info/RECORD", record.encode()))
    filename = f"{dist}-py3-none-any.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    tmp = out_dir / f".{filename}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    tmp.replace(path)
    for old in out_dir.glob("barista_agent-*.whl"):
        if old != path:
            old.unlink()
    data = path.read_bytes()
    return AgentWheel(path=path, filename=filename, version=version,
                      sha256=hashlib.sha256(data).hexdigest(), size=len(data))


class BootstrapFiles:
    """What ``GET /install.sh``, ``/v1/bootstrap/{manifest,agent,ca.der}`` serve: none of it
    is secret (the join token is what admits), all of it is trusted by way of the CA pin.
    The wheel is built once, lazily, into ``<data_dir>/bootstrap``; its sha256 is computed
    then and goes into the manifest, so a wheel changed on disk afterwards is refused by
    every installer."""

    def __init__(self, *, data_dir: Path, nats_url: str, controller_keys: list[str],
                 ca_sha256: str = "", ca_der: bytes = b"", nats_ca_sha256: str = "") -> None:
        self._dir = data_dir / "bootstrap"
        self._nats_url = nats_url
        self._controller_keys = controller_keys  # kept current by key rotation
        self.ca_sha256 = ca_sha256  # the API's CA
        self.ca_der = ca_der
        self.nats_ca_sha256 = nats_ca_sha256  # what join tokens pin (the CA NATS serves)
        self._wheel: AgentWheel | None = None
        self._lock = asyncio.Lock()

    async def wheel(self) -> AgentWheel:
        async with self._lock:
            if self._wheel is None:
                self._wheel = await asyncio.to_thread(build_agent_wheel, self._dir)
            return self._wheel

    def systemd_unit(self) -> str:
        try:
            return SYSTEMD_UNIT.read_text()
        except OSError as exc:
            raise RuntimeError(f"the agent's systemd unit {SYSTEMD_UNIT}: {exc}") from None

    async def manifest(self) -> dict[str, object]:
        wheel = await self.wheel()
        return {
            "wheel": {"filename": wheel.filename, "version": wheel.version,
                      "sha256": wheel.sha256, "size": wheel.size},
            "nats_urls": [self._nats_url],
            "controller_keys": list(self._controller_keys),
            "ca_sha256": self.ca_sha256,
            "nats_ca_sha256": self.nats_ca_sha256,
            "systemd_unit": self.systemd_unit(),
        }


def ca_der_of(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())
