"""The installer the controller serves, run inside a namespace "machine" against a real
controller with TLS: the one-line join and the cloud-init path enroll an agent; a wrong CA
hash, a server with another CA and a tampered wheel are refused with nothing installed; a
re-run is harmless; the token is never on a command line nor in a log."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import sys
from pathlib import Path

import pytest
from aiohttp import web

from controller.provision.bootstrap import (
    BOOT_CONFIG_PATH,
    BootConfig,
    join_command,
    join_line,
    read_user_data,
    render_user_data,
)
from controller.tls import ControllerTLS
from tests.fixtures.controller import run_cli
from tests.fixtures.joinlab import (
    VENV,
    Lab,
    cmdline,
    nothing_installed,
    online,
    run_watching,
    secret_of,
)
from tests.fixtures.wait import wait_for


@pytest.fixture
def lab(join_lab: Lab) -> Lab:
    """The namespace machine and its controller (``tests.fixtures.joinlab``); the name
    ``lab`` elsewhere is the netns lab cloud's fixture."""
    return join_lab


@pytest.mark.slow
async def test_one_line_join_adopts_the_machine(lab: Lab, caplog: pytest.LogCaptureFixture):
    # What the operator gets from `barista token create` (the real CLI and API, pinned).
    code, printed, err = await run_cli(
        "token", "create", "--label", "site=onprem", url=lab.url,
        token=lab.controller.secrets.api_token, env={"BARISTA_CA_SHA256": lab.pin})
    assert code == 0, err
    lines = printed.splitlines()
    (line,) = [x.strip() for x in lines if x.strip().startswith("sh -c ")]
    join = lines[lines.index("join token:") + 1].strip()
    secret = secret_of(join)
    assert line == join_line(lab.url, lab.pin)
    assert secret not in line and line.endswith(" barista-join < join-token")
    # Run as printed (the token file on stdin), with one more installer flag appended.
    m = lab.machine
    m.path("/run/join-token").write_text(join + "\n")
    m.path("/run/join-token").chmod(0o600)
    script = line.replace(" < join-token", f" --reuse-venv {VENV} < /run/join-token")
    code, out, seen = await run_watching(lab, ["sh", "-c", script], stdin=b"", secret=secret)
    assert code == 0, out
    assert "matches the token" in out and "supervisor" in out
    (node_id,) = await online(lab)
    assert lab.controller.fleet.get(node_id).labels == {"site": "onprem"}
    for path in ("/etc/barista/agent.toml", "/etc/barista/join-token"):
        assert stat.S_IMODE(m.path(path).stat().st_mode) == 0o600, path
    supervisor = int(m.path("/run/barista-agent/supervisor.pid").read_text())
    # While it runs: no process anywhere carries the token on its command line.
    for pid in m.pids():
        assert secret.encode() not in cmdline(pid)
    assert seen == 0

    # Re-running is harmless: the same node, restarted under a new supervisor, still online.
    code, out, seen = await run_watching(lab, ["sh", "-c", script], stdin=b"", secret=secret)
    assert code == 0, out
    assert "restarted" in out and seen == 0
    assert int(m.path("/run/barista-agent/supervisor.pid").read_text()) != supervisor
    assert await online(lab) == [node_id]
    assert [n.id for n in lab.controller.fleet.select()] == [node_id]

    # The ssh provider's verbs, run by the installed copy of the installer.
    code, out, _ = await run_watching(
        lab, [sys.executable, "/opt/barista-agent/bootstrap.py", "status"], stdin=None,
        secret=secret)
    status = json.loads(out.splitlines()[-1])
    assert (status["installed"], status["running"], status["node_id"]) == (True, True, node_id)
    code, out, _ = await run_watching(
        lab, [sys.executable, "/opt/barista-agent/bootstrap.py", "uninstall"], stdin=None,
        secret=secret)
    assert code == 0, out
    await wait_for(lambda: not m.pids(), 15, "the agent to stop")
    nothing_installed(m)

    # Nothing logged the token: installer output, the agent's log, the controller's log.
    assert secret not in out
    assert secret not in caplog.text


@pytest.mark.slow
async def test_cloud_init_user_data_enrolls_the_bound_node(lab: Lab):
    tokens = lab.controller.tokens
    issued = await tokens.create(labels={"infra": "web", "group": "eu"}, node_name="web-eu-0")
    boot = BootConfig(
        join_token=tokens.join_text(issued.token), node_name="web-eu-0",
        nats_urls=[lab.controller.agent_nats_url],
        controller_keys=[lab.controller.secrets.signer.public_key_b64],
        installer_url=f"{lab.url}/install.sh", ca_sha256=lab.pin,
        labels={"infra": "web", "group": "eu"}, reuse_venv=VENV,
        underlay={"vpc_cidr": "10.77.0.0/24", "public_address": "none"})
    user_data = render_user_data(boot)
    assert read_user_data(user_data) == boot
    # What cloud-init does: write_files (0600), then the runcmd.
    m = lab.machine
    join = m.path(BOOT_CONFIG_PATH)
    join.parent.mkdir(mode=0o700)
    join.write_bytes(json.dumps(json.loads(
        user_data.split("content: |\n", 1)[1].split("\nruncmd:", 1)[0])).encode())
    join.chmod(0o600)
    runcmd = json.loads(user_data.split("  - [sh, -c, ", 1)[1].rsplit("]", 1)[0])
    code, out, seen = await run_watching(lab, ["sh", "-c", runcmd], stdin=b"",
                                          secret=secret_of(issued.token))
    assert code == 0, out
    assert seen == 0
    assert await online(lab, "web-eu-0") == ["web-eu-0"]
    node = lab.controller.fleet.get("web-eu-0")
    assert node.labels == {"infra": "web", "group": "eu"}
    # The boot config's underlay reached the agent: it reports it in its facts.
    assert node.facts["vpc_cidr"] == "10.77.0.0/24" and node.facts["public_ip"] == ""


async def test_wrong_ca_hash_is_refused_andnothing_installed(lab: Lab):
    issued = await lab.controller.tokens.create()
    join = lab.controller.tokens.join_text(issued.token)
    forged = "f" * 64
    # The one-liner's own check, before the installer is even fetched.
    script = join_command(lab.url, forged, ["--reuse-venv", VENV], token_from_stdin=True)
    code, out, _ = await run_watching(lab, ["sh", "-c", script], stdin=join.encode(),
                                       secret=secret_of(join))
    assert code != 0
    assert "not the one the join token pins" in out and forged in out
    nothing_installed(lab.machine)
    # The installer's own check (run without the one-liner): a token pinning another CA.
    fake = join.replace(lab.pin, forged, 1)
    lab.machine.path("/run/token").write_text(fake)
    code, out, _ = await run_watching(
        lab, ["sh", "-c", f"curl -fsSk {lab.url}/install.sh | sh -s -- --token-file /run/token "
              f"--reuse-venv {VENV}"], stdin=b"", secret=secret_of(join))
    assert code != 0
    assert "step trust failed" in out and forged in out and lab.pin in out
    nothing_installed(lab.machine)


async def test_server_with_another_ca_is_refused(lab: Lab, tmp_path: Path):
    """A server in the controller's place, with its own CA, serving the real installer."""
    other = ControllerTLS.load_or_create(tmp_path / "impostor", names=[lab.machine.host_ip])
    assert other.ca_sha256 != lab.pin
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{lab.url}/install.sh",
                            ssl=lab.controller.tls.client_context()) as resp:  # type: ignore[union-attr]
            installer = await resp.read()
    ca_der = ssl.PEM_cert_to_DER_cert(other.ca_file.read_text())

    async def install_sh(request: web.Request) -> web.Response:
        return web.Response(body=installer)

    async def ca(request: web.Request) -> web.Response:
        return web.Response(body=ca_der)

    app = web.Application()
    app.router.add_get("/install.sh", install_sh)
    app.router.add_get("/v1/bootstrap/ca.der", ca)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, lab.machine.host_ip, 0, ssl_context=other.server_context())
    await site.start()
    try:
        port = runner.addresses[0][1]
        impostor = f"https://{lab.machine.host_ip}:{port}"
        issued = await lab.controller.tokens.create()
        join = lab.controller.tokens.join_text(issued.token)
        script = join_command(impostor, lab.pin, ["--reuse-venv", VENV], token_from_stdin=True)
        code, out, _ = await run_watching(lab, ["sh", "-c", script], stdin=join.encode(),
                                           secret=secret_of(join))
        assert code != 0 and "not the one the join token pins" in out, out
        nothing_installed(lab.machine)
        # And the installer itself, learning the CA from the handshake.
        lab.machine.path("/run/token").write_text(join)
        code, out, _ = await run_watching(
            lab, ["sh", "-c", f"curl -fsSk {impostor}/install.sh | sh -s -- --url {impostor} "
                  f"--token-file /run/token --reuse-venv {VENV}"], stdin=b"",
            secret=secret_of(join))
        assert code != 0 and "step trust failed" in out and other.ca_sha256 in out, out
        nothing_installed(lab.machine)
    finally:
        await runner.cleanup()


async def test_tampered_wheel_is_refused_andnothing_installed(lab: Lab):
    issued = await lab.controller.tokens.create()
    join = lab.controller.tokens.join_text(issued.token)
    files = lab.controller.config.data_dir / "bootstrap"
    script = join_command(lab.url, lab.pin, [], token_from_stdin=True)
    # The manifest's sha256 is fixed when the wheel is built; then the file is changed.
    from controller.api.app import make_app  # noqa: F401  (the API built the wheel lazily)

    code, out, _ = await run_watching(
        lab, ["sh", "-c", f"curl -fsSk {lab.url}/v1/bootstrap/manifest"], stdin=b"",
        secret=secret_of(join))
    sha = json.loads(out)["wheel"]["sha256"]
    (wheel,) = files.glob("*.whl")
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    code, out, _ = await run_watching(lab, ["sh", "-c", script], stdin=join.encode(),
                                       secret=secret_of(join))
    assert code != 0
    assert "step verify failed" in out and sha in out, out
    nothing_installed(lab.machine)


@pytest.mark.slow
async def test_real_wheel_into_a_fresh_venv_offline(lab: Lab, tmp_path: Path):
    """No --reuse-venv: the wheel the controller built, verified and pip-installed into a
    new /opt/barista-agent venv, dependencies from a local wheelhouse (no PyPI)."""
    from controller.provision.bootstrap import _agent_requirements
    from tests.fixtures.wheelhouse import make_wheelhouse

    house = tmp_path / "wheelhouse"
    await asyncio.to_thread(make_wheelhouse, _agent_requirements(), house)
    issued = await lab.controller.tokens.create(node_name="fresh-0")
    join = lab.controller.tokens.join_text(issued.token)
    script = join_command(lab.url, lab.pin, ["--wheelhouse", str(house), "--node-name",
                                             "fresh-0"], token_from_stdin=True)
    # The machine's python3 is a plain interpreter, not this test's venv.
    base = Path(sys.base_prefix) / "bin" / "python3"
    code, out, seen = await run_watching(
        lab, ["env", f"BARISTA_PYTHON={base}", "PYTHONPATH=", "sh", "-c", script],
        stdin=join.encode(), secret=secret_of(join), timeout=240)
    assert code == 0, out
    assert "verified" in out and "agent installed in /opt/barista-agent" in out and seen == 0
    venv = lab.machine.path("/opt/barista-agent")
    assert (venv / "bin" / "barista-agent").exists()
    site = next(venv.glob("lib/python3*/site-packages"))
    assert (site / "agent" / "runtime.py").exists() and (site / "protocol").is_dir()
    assert not (site / "controller").exists()  # the agent wheel carries no controller code
    assert await online(lab, "fresh-0") == ["fresh-0"]
    # The agent runs from the installed venv, with the unit's and supervisor's flags.
    argvs = [cmdline(p).split(b"\0") for p in lab.machine.pids()]
    assert [b"/opt/barista-agent/bin/python", b"-P", b"-OO", b"-m", b"agent"] in (
        a[:5] for a in argvs), argvs
    # Again: the same wheel is not installed twice.
    code, out, _ = await run_watching(
        lab, ["env", f"BARISTA_PYTHON={base}", "PYTHONPATH=", "sh", "-c", script],
        stdin=join.encode(), secret=secret_of(join), timeout=240)
    assert code == 0 and "already this wheel" in out, out
    assert await online(lab, "fresh-0") == ["fresh-0"]


async def test_token_pinning_another_ca_is_refused_even_with_the_right_join_line(lab: Lab):
    """The join line pins the API's CA correctly, but the token pins another one: the
    manifest (over the pinned TLS) says what this controller's tokens pin; refused."""
    issued = await lab.controller.tokens.create()
    join = lab.controller.tokens.join_text(issued.token).replace(lab.pin, "e" * 64, 1)
    script = join_command(lab.url, lab.pin, ["--reuse-venv", VENV], token_from_stdin=True)
    code, out, _ = await run_watching(lab, ["sh", "-c", script], stdin=join.encode(),
                                      secret=secret_of(join))
    assert code != 0
    assert "step trust failed" in out and "e" * 64 in out and "not made by this" in out, out
    nothing_installed(lab.machine)
