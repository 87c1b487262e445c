"""The bootstrap's pure parts: the installer agrees with protocol/trust.py on tokens, the
agent wheel (deterministic, no controller code), the join script, the systemd unit."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from agent import bootstrap as installer
from controller.provision.bootstrap import (
    INSTALLER_DELIMITER,
    SYSTEMD_UNIT,
    BootConfig,
    build_agent_wheel,
    check_base_url,
    installer_script,
    join_command,
    join_line,
    render_user_data,
)
from protocol.trust import JoinToken, parse_join_token

PIN = "ab" * 32


@pytest.mark.parametrize("token", [
    str(JoinToken(token_id="0123456789abcdef", secret="s" * 43, ca_sha256=PIN)),
    str(JoinToken(token_id="0123456789abcdef", secret="s" * 43)),
    str(JoinToken(token_id="0123456789abcdef", secret="s" * 43, ca_sha256=PIN)) + "~eyJ.jwt",
    "bt2.nothex.0123456789abcdef.ssssssssssssssssssssssss", "", "bt1.short.x",
])
def test_installer_reads_tokens_like_protocol_trust(token: str):
    parsed = parse_join_token(token.split("~", 1)[0])
    assert installer.token_pin(token) == (None if parsed is None else parsed.ca_sha256)


def test_agent_wheel_is_deterministic_and_carries_no_controller(tmp_path: Path):
    one = build_agent_wheel(tmp_path / "a")
    two = build_agent_wheel(tmp_path / "b")
    assert one.sha256 == two.sha256 and one.filename == two.filename
    assert one.filename.startswith("barista_agent-") and "+g" in one.version
    with zipfile.ZipFile(one.path) as zf:
        names = zf.namelist()
        meta = zf.read(f"barista_agent-{one.version}.dist-info/METADATA").decode()
    assert "agent/runtime.py" in names and "protocol/trust.py" in names
    assert "agent/bootstrap.py" in names
    assert not [n for n in names if n.startswith("controller/") or "__pycache__" in n]
    assert "Requires-Dist: nats-py" in meta and "aiohttp" not in meta


def test_installer_script_embeds_the_bootstrap_verbatim():
    text = installer_script("https://198.18.0.1:8640")
    body = text.split(f"<<'{INSTALLER_DELIMITER}'\n", 1)[1].split(f"{INSTALLER_DELIMITER}\n")[0]
    assert body == Path(installer.__file__).read_text()
    assert "url=${BARISTA_URL:-https://198.18.0.1:8640}" in text
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n", "-c", text]).returncode == 0


@pytest.mark.parametrize("url", ["https://h:1/x", "https://h;rm -rf /", "ftp://h", "https://h?q"])
def test_bad_controller_urls_are_refused(url: str):
    with pytest.raises(ValueError):
        check_base_url(url)


def test_join_line_reads_the_token_from_stdin_and_pins_first():
    line = join_line("https://198.18.0.1:8640", PIN)
    assert line.startswith("sh -c '") and line.endswith("' barista-join < join-token")
    script = join_command("https://198.18.0.1:8640", PIN, [], token_from_stdin=True)
    # The CA check comes before the installer is fetched over the pinned CA.
    assert script.index("sha256sum -c") < script.index("--cacert")
    assert script.index("curl -fsSk") < script.index("sha256sum -c")
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    with pytest.raises(ValueError, match="https"):
        join_command("http://198.18.0.1:8640", PIN, [])
    plain = join_command("http://127.0.0.1:8640", "", [])
    assert "--cacert" not in plain and "sha256sum" not in plain


def test_user_data_runs_the_join_with_the_boot_config():
    boot = BootConfig(join_token="bt2.x", node_name="a-b-0", nats_urls=["nats://n:4222"],
                      controller_keys=["k"], installer_url="https://198.18.0.1:8640/install.sh",
                      ca_sha256=PIN)
    text = render_user_data(boot)
    runcmd = text.split("runcmd:\n", 1)[1]
    assert "--config /etc/barista/join.json" in runcmd and PIN in runcmd
    assert "bt2.x" not in runcmd  # the token only in the 0600 file


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path):
    # As the installer writes it: ExecStart pointing at the agent actually installed.
    agent = shutil.which("barista-agent") or "/bin/true"
    unit = tmp_path / "barista-agent.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace(installer.UNIT_EXEC, agent))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "barista-agent.service" not in run.stderr, run.stderr
