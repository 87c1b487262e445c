"""An external NATS (issue 10, item 3): `barista nats init` (the real command), a controller
on a 3-server cluster set up with it (tests/fixtures/nats_cluster.py; the isolation tests
run there too, in test_admission.py), and a controller on a NATS without it, which says so
at start and in `barista status`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.client import RawCredentials

from agent.connection import connect
from controller.api.app import ApiServer
from controller.errors import ConfigError
from controller.nats import jwt
from controller.nats.deployment import CLUSTER_TLS_NAME, init_deployment
from controller.nats.operator import OperatorTrust, Permissions
from controller.nats.server import NatsServer
from controller.service import Controller
from controller.tls import ControllerTLS
from tests.fixtures.controller import AgentFactory, controller_config, run_cli
from tests.fixtures.nats_cluster import NatsCluster
from tests.fixtures.wait import wait_for


def _nats_init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "nats", "init", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "BARISTA_CONFIG": "/nonexistent/barista-test.toml"},
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_nats_init_writes_the_deployment_and_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "dep"
    first = _nats_init("--out", str(out), "--operator-name", "acme")
    assert first.returncode == 0, first.stderr
    # what to add to each server's config, and how to start the controller
    assert "include barista.conf" in first.stdout
    assert 'resolver: {"type": "full", "dir": "/var/lib/nats/jwt"' in first.stdout
    assert f"--nats-url nats://HOST:4222 --nats-trust {out.resolve()}" in first.stdout
    trust = OperatorTrust.load(out)
    assert jwt.decode(trust.operator_jwt, jwt.OperatorClaims).name == "acme"
    tdir = out / "trust"
    assert _mode(out) == 0o700 and _mode(tdir) == 0o700 and _mode(out / "creds") == 0o700
    for p in [*tdir.iterdir(), *(out / "creds").iterdir()]:
        assert _mode(p) == 0o600, p
    creds = {p.name: p.read_text() for p in (out / "creds").iterdir()}
    assert sorted(creds) == ["peers.creds", "state.creds", "sys.creds"]
    # no seed in the include file or in the output
    include = (out / "server" / "barista.conf").read_text()
    seeds = [p.read_text().strip() for p in tdir.glob("*.seed")]
    seeds += [jwt.parse_creds(c)[1] for c in creds.values()]
    for seed in seeds:
        assert seed not in include and seed not in first.stdout and seed not in first.stderr
    assert f"operator: {json.dumps(trust.operator_jwt)}" in include
    assert trust.fleet_account in include and trust.fleet_jwt in include
    assert "resolver:" not in include  # each server names its own dir

    # again: the same keys, the same controller users, nothing silently replaced
    seed_files = {p.name: p.read_bytes() for p in tdir.glob("*.seed")}
    again = _nats_init("--out", str(out), "--resolver-dir", "/var/lib/nats/jwt", "-o", "json")
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["operator"] == trust.operator_key
    assert data["fleet_account"] == trust.fleet_account
    assert {p.name: p.read_bytes() for p in tdir.glob("*.seed")} == seed_files
    assert {p.name: p.read_text() for p in (out / "creds").iterdir()} == creds
    # with --resolver-dir the include holds the resolver block (same path on every server)
    include = (out / "server" / "barista.conf").read_text()
    assert 'resolver: {"type": "full", "dir": "/var/lib/nats/jwt"' in include


def test_nats_init_refuses_a_broken_trust_dir(tmp_path: Path) -> None:
    out = tmp_path / "dep"
    assert _nats_init("--out", str(out)).returncode == 0
    (out / "trust" / "fleet.seed").write_text("SUnot-a-seed\n")
    broken = _nats_init("--out", str(out))
    assert broken.returncode != 0
    assert "fleet.seed is not a NATS account seed" in broken.stderr
    assert "Traceback" not in broken.stderr


async def test_controller_on_the_cluster_keeps_state_r3(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """A controller on the cluster with stream_replicas 3: streams and KV on all three
    servers, a node enrolled through another server than the controller's."""
    print(f"3-server cluster formed in {nats_cluster.formed_in:.2f}s")
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_cluster.urls[0],
                            nats_trust=str(nats_cluster.deployment),
                            agent_nats_url=nats_cluster.urls[2], stream_replicas=3)
    async with Controller(cfg) as c:
        status = c.status()["nats"]
        assert isinstance(status, dict)
        assert status["embedded"] is False and status["isolation"] == "operator"
        for name in ("METRICS", "JOBS", "EVENTS", "AUDIT", "KV_nodes"):
            info = await c.js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name
        factory = AgentFactory(c, tmp_path / "agents")
        async with factory.stack:
            agent = await factory.start(labels={"where": "cluster"})
            assert agent.state is not None and agent.state.nats_jwt
            await wait_for(lambda: c.fleet.last_beat(agent.node_id) is not None, 10, "a beat")
            assert c.fleet.get(agent.node_id).labels["where"] == "cluster"


async def test_controller_without_trust_says_isolation_is_off(
    nats_server_noauth: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="barista.controller")
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_server_noauth.url)
    async with Controller(cfg) as c:
        assert c.status()["nats"]["isolation"] == "off"  # type: ignore[index]
        assert c.trust is None and not c.admission.managed
        warning = next(r.getMessage() for r in caplog.records
                       if "node isolation is OFF" in r.getMessage())
        assert "barista nats init" in warning and "--nats-trust" in warning
        async with ApiServer(c, host="127.0.0.1", port=0) as api:
            code, out, err = await run_cli("status", url=api.url, token=c.secrets.api_token)
            assert code == 0, err
            assert "node isolation: off" in out and "barista nats init" in out
            code, out, err = await run_cli("status", "-o", "json", url=api.url,
                                           token=c.secrets.api_token)
            assert code == 0 and json.loads(out)["nats"]["isolation"] == "off", err


async def test_status_cli_says_isolation_is_on(api: tuple[str, str]) -> None:
    code, out, err = await run_cli("status", url=api[0], token=api[1])
    assert code == 0, err
    assert "node isolation: on" in out


async def test_nats_trust_without_init_is_a_clear_error(
    nats_server_noauth: NatsServer, tmp_path: Path
) -> None:
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_server_noauth.url,
                            nats_trust=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"holds no NATS trust .*barista nats init --out"):
        async with Controller(cfg):
            pass


async def test_trust_on_a_nats_not_set_up_with_it_is_a_clear_error(
    nats_server_noauth: NatsServer, nats_deployment_template: Path, tmp_path: Path
) -> None:
    """A NATS whose servers lack the include file cannot take the fleet account's JWT."""
    dep = tmp_path / "dep"
    shutil.copytree(nats_deployment_template, dep)
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_server_noauth.url,
                            nats_trust=str(dep))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="include file of `barista nats init`"):
        async with Controller(cfg):
            pass
    assert time.monotonic() - t0 < 20


async def test_node_jwt_of_another_deployment_is_refused_on_the_cluster(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """The cluster trusts only its own operator: a JWT signed by another trust (another
    deployment, an embedded controller's) is refused."""
    other = OperatorTrust.load_or_create(tmp_path / "other")
    user = other.new_user(name="stranger", permissions=Permissions())
    with pytest.raises(Exception, match=r"(?i)authorization"):
        # agent.connection.connect: a refused socket closed now, not left to the GC
        await connect(servers=[nats_cluster.urls[1]], allow_reconnect=False,
                      max_reconnect_attempts=0,
                      user_credentials=RawCredentials(user.creds))


async def test_controller_with_another_deployments_trust_is_a_clear_error(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Servers that trust another operator refuse the controller's users: said at once
    (nats-py would retry an authorization error for ever)."""
    other = init_deployment(tmp_path / "other")
    cfg = controller_config(tmp_path / "ctl", nats_url=nats_cluster.urls[0],
                            nats_trust=str(other.out))
    with pytest.raises(ConfigError, match=r"refused the controller's user .*another operator"):
        async with asyncio.timeout(15), Controller(cfg):
            pass


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_nats_init_writes_route_tls(tmp_path: Path) -> None:
    """TLS for the cluster's routes: a certificate (server and client) of the deployment's
    CA, its key 0600, the block each server includes inside its cluster block; kept on a
    re-run; signed by a controller's CA with --ca-dir."""
    out = tmp_path / "dep"
    first = _nats_init("--out", str(out), "--route-host", "nats-1.internal", "-o", "json")
    assert first.returncode == 0, first.stderr
    routes = json.loads(first.stdout)["routes"]
    rdir = Path(routes["dir"])
    assert rdir == (out / "routes").resolve() and "nats-1.internal" in routes["names"]
    assert _mode(rdir) == 0o700 and _mode(out / "tls") == 0o700
    assert _mode(rdir / "route-key.pem") == 0o600 and _mode(out / "tls" / "ca-key.pem") == 0o600
    cert = _cert(rdir / "route.pem")
    ca = _cert(out / "tls" / "ca.pem")
    assert cert.issuer == ca.subject and (rdir / "ca.pem").read_bytes() == (
        out / "tls" / "ca.pem").read_bytes()
    cert.verify_directly_issued_by(ca)
    assert {"nats-1.internal", "127.0.0.1", "localhost"} <= _names(cert)
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    conf = Path(routes["include_file"]).read_text()
    for name in ("route.pem", "route-key.pem", "ca.pem"):
        assert json.dumps(str(rdir / name)) in conf
    assert "verify: true" in conf
    keys = [(rdir / "route-key.pem").read_text(), (out / "tls" / "ca-key.pem").read_text()]
    for key in keys:
        body = key.splitlines()[1]
        assert body not in conf and body not in first.stdout and body not in first.stderr
    text = _nats_init("--out", str(out))
    assert text.returncode == 0, text.stderr
    assert f"include {CLUSTER_TLS_NAME}" in text.stdout and "TLS both ways" in text.stdout
    # re-runs keep the certificate and its key (a name once given stays); a new name
    # makes a new one, with every name, of the same CA
    key_pem = (rdir / "route-key.pem").read_bytes()
    again = _nats_init("--out", str(out), "--route-host", "nats-1.internal")
    assert again.returncode == 0, again.stderr
    assert _cert(rdir / "route.pem").serial_number == cert.serial_number
    assert (rdir / "route-key.pem").read_bytes() == key_pem
    more = _nats_init("--out", str(out), "--route-host", "10.1.2.3")
    assert more.returncode == 0, more.stderr
    grown = _cert(rdir / "route.pem")
    assert grown.serial_number != cert.serial_number
    assert {"nats-1.internal", "10.1.2.3", "127.0.0.1"} <= _names(grown)
    grown.verify_directly_issued_by(ca)

    # signed by a controller's CA (its data dir's tls/), files named where the servers
    # keep them
    ctl = ControllerTLS.load_or_create(tmp_path / "ctl")
    out2 = tmp_path / "dep2"
    made = _nats_init("--out", str(out2), "--ca-dir", str(ctl.dir),
                      "--route-files-dir", "/etc/nats/routes")
    assert made.returncode == 0, made.stderr
    cert2 = _cert(out2 / "routes" / "route.pem")
    cert2.verify_directly_issued_by(_cert(ctl.ca_file))
    assert not (out2 / "tls").exists()
    conf2 = (out2 / "routes" / CLUSTER_TLS_NAME).read_text()
    assert '"/etc/nats/routes/route-key.pem"' in conf2 and '"/etc/nats/routes/ca.pem"' in conf2
    assert ControllerTLS.load_or_create(tmp_path / "ctl").ca_sha256 == ctl.ca_sha256
