"""TLS with pinned trust, end to end: the controller's own CA, the embedded nats-server and
the API serving TLS, join tokens that pin the CA, real agents that check the pin before
they send anything, and the CLI pinning the CA from its config. Plain mode still works and
says so."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import stat
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.renew import jwt_times
from agent.runtime import Agent, EnrollmentError
from controller.api.app import ApiServer
from controller.cli.serve import running_controller
from controller.service import Controller, RunningController
from protocol.trust import JoinToken, ca_fingerprint, parse_join_token
from tests.fixtures.controller import AgentFactory, controller_config, run_cli
from tests.fixtures.enroll import expire_saved_jwt
from tests.fixtures.nats import confirm
from tests.fixtures.wait import wait_for


@pytest.fixture
async def tls_controller(tmp_path: Path) -> AsyncIterator[RunningController]:
    async with Controller(controller_config(tmp_path / "controller", tls=True)) as c:
        yield c


@pytest.fixture
async def other_controller(tmp_path: Path) -> AsyncIterator[RunningController]:
    """A second TLS controller: its own data dir, so its own CA."""
    async with Controller(controller_config(tmp_path / "other", tls=True)) as c:
        yield c


@pytest.fixture
async def tls_agents(
    tls_controller: RunningController, tmp_path: Path
) -> AsyncIterator[AgentFactory]:
    factory = AgentFactory(tls_controller, tmp_path / "agents")
    async with factory.stack:
        yield factory


def _ca_sha256(c: RunningController) -> str:
    assert c.tls is not None
    return ca_fingerprint(ssl.PEM_cert_to_DER_cert(c.tls.ca_file.read_text()))


async def _enroll_watch(c: RunningController) -> tuple[NATS, list[Msg]]:
    """A connection (the controller's peer user, over TLS) that sees every enroll request."""
    assert c.natsd is not None and c.tls is not None
    seen: list[Msg] = []

    async def cb(msg: Msg) -> None:
        seen.append(msg)

    nc = await nats.connect(c.nats_url, tls=c.tls.client_context(),
                            **c.natsd.peer_credentials())
    await nc.subscribe(c.subjects.enroll, cb=cb)
    await confirm(nc)  # listening before the agent tries, or seeing nothing proves nothing
    return nc, seen


async def _nothing_enrolled(c: RunningController, watch: NATS, seen: list[Msg]) -> None:
    await watch.flush()
    assert seen == [], "an enroll request reached the controller's NATS"
    assert c.stats.enrollments == 0 and c.stats.enrollments_refused == 0
    assert len(c.fleet.nodes) == 0
    assert all(not t.used_by for t in c.tokens_table)


async def test_agent_with_pinned_token_enrolls_over_tls(
    tls_controller: RunningController, tls_agents: AgentFactory
):
    c = tls_controller
    assert c.tls is not None and c.natsd is not None
    # The CA and the keys are made once, private where they must be.
    for name in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((c.tls.dir / name).stat().st_mode) == 0o600
    conf = json.loads(c.natsd.conf_path.read_text())
    assert conf["tls"]["cert_file"] == str(c.tls.cert_file)
    assert conf["tls"]["key_file"] == str(c.tls.key_file)
    pin = _ca_sha256(c)
    assert c.tls.ca_sha256 == pin == c.agent_ca_sha256
    assert c.status()["tls"] == {"api": True, "nats": True, "ca_sha256": pin,
                                 "ca_file": str(c.tls.ca_file), "nats_ca_sha256": pin}
    issued = await c.tokens.create(labels={"provider": "aws"})
    parsed = parse_join_token(issued.token)
    assert issued.token.startswith(f"bt2.{pin}.") and parsed is not None
    assert parsed.ca_sha256 == pin

    agent = await tls_agents.start(token=issued.token)
    assert c.fleet.get(agent.node_id).labels == {"provider": "aws"}
    saved = agent.config.state_dir / "ca.pem"
    assert ca_fingerprint(ssl.PEM_cert_to_DER_cert(saved.read_text())) == pin
    # Its own connection (nkey) is TLS too and carries heartbeats.
    assert agent.nc is not None and agent.nc.connected_url is not None
    await wait_for(lambda: c.fleet.last_beat(agent.node_id) is not None, what="a heartbeat")
    # A restarted agent trusts the CA it pinned, with no token at all.
    await tls_agents.stack.aclose()
    tls_agents.stack = type(tls_agents.stack)()
    again = await tls_agents.stack.enter_async_context(Agent(config=agent.config))
    assert again.node_id == agent.node_id and again.nc is not None and again.nc.is_connected

    # The server speaks nothing but TLS: a plain client is refused.
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises several kinds here
        await nats.connect(c.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2, **c.natsd.peer_credentials())


async def test_agent_back_with_an_expired_jwt_renews_over_tls(
    tls_controller: RunningController, tls_agents: AgentFactory
):
    """A suspended VM comes back after its NATS JWT expired: it renews as the enroll
    identity over TLS, trusting the CA it pinned at enrollment (before, the renewal
    connection had no TLS context and retried forever)."""
    c = tls_controller
    agent = await tls_agents.start()
    node_id, config = agent.node_id, agent.config
    await tls_agents.stack.aclose()
    tls_agents.stack = type(tls_agents.stack)()
    expire_saved_jwt(c, agent)
    beat = c.fleet.last_beat(node_id)
    # bounded: without the pinned CA the renewal is retried forever
    back = await asyncio.wait_for(
        tls_agents.stack.enter_async_context(Agent(config=config)), 20)
    assert back.state is not None and jwt_times(back.state.nats_jwt)[1] > time.time()
    await wait_for(lambda: c.fleet.last_beat(node_id) != beat, 10, "a beat")


async def test_wrong_ca_hash_is_refused_and_nothing_is_sent(
    tls_controller: RunningController, tls_agents: AgentFactory, caplog: pytest.LogCaptureFixture
):
    c = tls_controller
    watch, seen = await _enroll_watch(c)
    try:
        issued = await c.tokens.create()
        parsed = parse_join_token(issued.token)
        assert parsed is not None
        forged_pin = "ab" * 32
        forged = str(JoinToken(token_id=parsed.token_id, secret=parsed.secret,
                               ca_sha256=forged_pin))
        with caplog.at_level(logging.ERROR), pytest.raises(EnrollmentError) as err:
            async with Agent(config=tls_agents.config(forged)):
                pass
        assert err.value.code == "ca_mismatch"
        # Both hashes named: the one pinned and the one the server presented.
        assert forged_pin in err.value.message and c.agent_ca_sha256 in err.value.message
        assert "Refusing to send anything" in err.value.message
        assert not (tls_agents.base / "agent1" / "ca.pem").exists()
        await _nothing_enrolled(c, watch, seen)
        # A token that pins nothing cannot talk to a TLS server either (its system CAs do
        # not vouch for the controller's CA): refused in the handshake, before CONNECT.
        plain = str(JoinToken(token_id=parsed.token_id, secret=parsed.secret))
        with pytest.raises(EnrollmentError) as err:
            async with Agent(config=tls_agents.config(plain)):
                pass
        assert err.value.code == "tls_untrusted" and "nothing was sent" in err.value.message
        await _nothing_enrolled(c, watch, seen)
        # The same token with the right pin still works: nothing was consumed.
        agent = await tls_agents.start(token=issued.token)
        assert c.fleet.get(agent.node_id) is not None
    finally:
        await watch.close()


async def test_server_with_another_ca_is_refused(
    tls_controller: RunningController, other_controller: RunningController, tmp_path: Path
):
    """A token for one controller, used against another (a forged server with its own
    CA): the agent refuses it before it sends anything; neither side enrolls."""
    ours, theirs = tls_controller, other_controller
    assert ours.agent_ca_sha256 != theirs.agent_ca_sha256
    watch, seen = await _enroll_watch(theirs)
    factory = AgentFactory(theirs, tmp_path / "lured")
    try:
        token = (await ours.tokens.create()).token
        async with factory.stack:
            with pytest.raises(EnrollmentError) as err:
                async with Agent(config=factory.config(token)):
                    pass
        assert err.value.code == "ca_mismatch"
        assert ours.agent_ca_sha256 in err.value.message
        assert theirs.agent_ca_sha256 in err.value.message
        await _nothing_enrolled(theirs, watch, seen)
        assert all(not t.used_by for t in ours.tokens_table)
    finally:
        await watch.close()


async def test_cli_pins_the_ca_from_its_config(tmp_path: Path, other_controller: RunningController):
    client_toml = tmp_path / "client.toml"
    cfg = controller_config(tmp_path / "controller", tls=True, client_config=client_toml)
    async with running_controller(cfg) as run:
        c, api = run.controller, run.api
        assert c.tls is not None and api.url.startswith("https://127.0.0.1:")
        written = client_toml.read_text()
        assert f'ca_file = "{c.tls.ca_file}"' in written
        assert f'ca_sha256 = "{c.tls.ca_sha256}"' in written
        assert stat.S_IMODE(client_toml.stat().st_mode) == 0o600
        token = c.secrets.api_token
        env = {"BARISTA_CONFIG": str(client_toml)}
        # The written config: the URL, the token and the CA it pins.
        code, out, err = await run_cli("status", url=api.url, token=token, env=env)
        assert code == 0, err
        assert "tls: nats on, api on" in out and c.tls.ca_sha256 in out
        code, out, err = await run_cli("token", "create", url=api.url, token=token, env=env)
        assert code == 0, err
        assert f"bt2.{c.tls.ca_sha256}." in out and "pins the NATS CA sha256" in out
        # Only the hash (given to a remote operator): the CA is taken from the handshake.
        code, out, err = await run_cli(
            "status", "-o", "json", url=api.url, token=token,
            env={"BARISTA_CA_SHA256": c.tls.ca_sha256})
        assert code == 0, err
        assert json.loads(out)["tls"]["api"] is True
        # Another CA (the other controller's file, a wrong hash, no pin at all): refused,
        # and the token never leaves (the handshake fails before the request is sent).
        assert other_controller.tls is not None
        for extra, says in (
            ({"BARISTA_CA_FILE": str(other_controller.tls.ca_file)}, "does not vouch for"),
            ({"BARISTA_CA_SHA256": other_controller.tls.ca_sha256}, "not the pinned CA"),
            ({"BARISTA_CA_FILE": str(c.tls.ca_file), "BARISTA_CA_SHA256": "cd" * 32},
             "is not the pinned CA"),
            ({}, "does not vouch for"),
        ):
            code, out, err = await run_cli("status", url=api.url, token=token, env=extra)
            assert code != 0, (extra, out)
            assert says in err + out, (extra, err, out)
        # And the pinned CA refuses the other controller's API.
        async with ApiServer(other_controller, host="127.0.0.1", port=0) as other_api:
            code, out, err = await run_cli(
                "status", url=other_api.url, token=token,
                env={"BARISTA_CA_FILE": str(c.tls.ca_file)})
            assert code != 0 and "does not vouch for" in err + out


async def test_plain_mode_still_works_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    cfg = controller_config(tmp_path / "controller", tls=False,
                            client_config=tmp_path / "client.toml")
    with caplog.at_level(logging.WARNING):
        async with running_controller(cfg) as run:
            c, api = run.controller, run.api
            assert api.url.startswith("http://")
            assert c.status()["tls"] == {"api": False, "nats": False, "ca_sha256": "",
                                         "ca_file": "", "nats_ca_sha256": ""}
            written = tomllib.loads((tmp_path / "client.toml").read_text())
            assert not {k for k in written if k.startswith("ca_")}, written.keys()
            issued = await c.tokens.create()
            assert issued.token.startswith("bt1.")
            factory = AgentFactory(c, tmp_path / "agents")
            async with factory.stack:
                agent = await factory.start(token=issued.token)
                assert not (agent.config.state_dir / "ca.pem").exists()
                await wait_for(lambda: c.fleet.last_beat(agent.node_id) is not None,
                               what="a heartbeat")
            code, out, err = await run_cli("status", url=api.url, token=c.secrets.api_token)
            assert code == 0, err
            assert "tls: off" in out
    text = caplog.text
    assert "TLS is off" in text and "without TLS" in text


async def test_server_certificate_names_the_addresses_agents_are_given(tmp_path: Path):
    cfg = controller_config(tmp_path / "controller", tls=True, tls_names=["10.9.8.7"],
                            agent_nats_url="tls://nats.example.net:4222")
    async with Controller(cfg) as c:
        assert c.tls is not None
        assert {"127.0.0.1", "::1", "localhost", "10.9.8.7", "nats.example.net"} <= set(
            c.tls.names)
