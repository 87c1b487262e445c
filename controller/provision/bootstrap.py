"""What a fresh VM is given: one ``BootConfig`` per node, rendered into cloud-init user-data.

The user-data is a ``#cloud-config`` document with two parts every provider passes on
unchanged (AWS user-data, GCP ``user-data`` metadata, Azure custom_data, the lab runs it
itself): ``write_files`` puts the boot config at ``BOOT_CONFIG_PATH`` (mode 0600: it holds
the one-time join token) and ``runcmd`` runs the installer the controller serves, which reads
that file. The token is never on a command line; the rendered text is a secret and is
never logged.
"""

from __future__ import annotations

import json
import shlex

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
    ca_sha256: str = ""  # "" only on a plain (no TLS) controller, which the installer says
    labels: dict[str, str] = {}
    hostname: str = ""
    # Lab VMs may reuse the host's venv instead of installing the wheel (--reuse-venv).
    reuse_venv: str = ""


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(BootConfig)


def render_user_data(config: BootConfig) -> str:
    """The cloud-init user-data for one node (a secret: it carries the join token)."""
    body = _ENCODER.encode(config).decode()
    # cloud-init YAML: a JSON string is valid YAML; the block scalar keeps it verbatim.
    indented = "\n".join("      " + line for line in body.splitlines())
    installer = shlex.quote(config.installer_url)
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
        f"  - [sh, -c, {json.dumps(_install_command(installer))}]\n"
    )


def _install_command(installer: str) -> str:
    # The installer itself checks the server against the CA hash in the boot config.
    return f"barista-bootstrap --config {BOOT_CONFIG_PATH} --installer {installer}"


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
