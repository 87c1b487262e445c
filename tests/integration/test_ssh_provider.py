"""The ssh provider adopts a machine running a real sshd (inside a namespace machine) by
running the controller's installer over SSH: the node enrolls under its bound name, is found
again by its tags, stops/starts with its agent and is freed by terminate. Host keys are
checked (known_hosts or a pinned fingerprint) before anything is sent."""

from __future__ import annotations

import pytest

from controller.provision.bootstrap import BootConfig, render_user_data
from controller.provision.contract import (
    TAG_GROUP,
    TAG_INFRA,
    TAG_NODE,
    CapacityError,
    CredentialsError,
    InstanceState,
    LaunchRequest,
    NetworkRequest,
    NotFoundError,
    Placement,
    Provider,
)
from controller.provision.providers.ssh import SshProvider, SshSettings, parse_host
from tests.fixtures.joinlab import VENV, Lab, online
from tests.fixtures.sshd import Sshd
from tests.fixtures.wait import wait_for


@pytest.fixture
def lab(join_lab: Lab) -> Lab:
    """The namespace machine and its controller (``tests.fixtures.joinlab``); the name
    ``lab`` elsewhere is the netns lab cloud's fixture."""
    return join_lab


async def _request(lab: Lab, name: str) -> LaunchRequest:
    tags = {TAG_INFRA: "hyb", TAG_GROUP: "onprem", TAG_NODE: name}
    issued = await lab.controller.tokens.create(
        labels={"infra": "hyb", "group": "onprem"}, node_name=name)
    boot = BootConfig(
        join_token=lab.controller.tokens.join_text(issued.token), node_name=name,
        nats_urls=[lab.controller.agent_nats_url],
        controller_keys=[lab.controller.secrets.signer.public_key_b64],
        installer_url=f"{lab.url}/install.sh", ca_sha256=lab.pin,
        labels={"infra": "hyb", "group": "onprem"}, reuse_venv=VENV)
    return LaunchRequest(name=name, size="existing", image="existing",
                         user_data=render_user_data(boot), tags=tags)


@pytest.mark.slow
async def test_ssh_provider_adopts_a_real_sshd_host(lab: Lab, sshd: Sshd,
                                                    caplog: pytest.LogCaptureFixture):
    provider = SshProvider(settings=SshSettings(
        hosts=(sshd.host_id,), known_hosts=str(sshd.known_hosts),
        client_keys=(str(sshd.client_key),)))
    assert isinstance(provider, Provider)
    place = Placement(provider="ssh", region="default")
    net = await provider.ensure_network(NetworkRequest(infra="hyb", region="default"))
    req = await _request(lab, "hyb-onprem-0")
    (inst,) = await provider.run_instances(place, net, [req])
    assert inst.id == sshd.host_id and inst.name == "hyb-onprem-0"
    assert inst.state is InstanceState.RUNNING
    assert await online(lab, "hyb-onprem-0") == ["hyb-onprem-0"]
    node = lab.controller.fleet.get("hyb-onprem-0")
    assert node.labels == {"infra": "hyb", "group": "onprem"}
    m = lab.machine
    assert oct(m.path("/etc/barista/join.json").stat().st_mode & 0o777) == "0o600"
    # Idempotent: asked again for the same name, the same machine, nothing reinstalled.
    (again,) = await provider.run_instances(place, net, [req])
    assert again.id == inst.id and again.state is InstanceState.RUNNING
    # The pool is one machine: another node has nowhere to go.
    with pytest.raises(CapacityError, match="no free machine"):
        await provider.run_instances(place, net, [await _request(lab, "hyb-onprem-1")])
    # Found again by its tags (what a restarted controller does).
    found = await provider.query_instances({TAG_INFRA: "hyb"})
    assert [(i.id, i.name, i.tags[TAG_NODE]) for i in found] == [
        (sshd.host_id, "hyb-onprem-0", "hyb-onprem-0")]
    assert await provider.query_instances({TAG_INFRA: "other"}) == []
    # stop/start = the agent service.
    await provider.stop_instances("default", [inst.id])
    (stopped,) = await provider.query_instances({TAG_INFRA: "hyb"})
    assert stopped.state is InstanceState.STOPPED
    await wait_for(lambda: not [p for p in m.pids() if p != sshd.proc.pid
                                and b"barista-agent" in _cmd(p)], 15, "the agent to stop")
    await provider.start_instances("default", [inst.id])
    (started,) = await provider.query_instances({TAG_INFRA: "hyb"})
    assert started.state is InstanceState.RUNNING
    await online(lab, "hyb-onprem-0")
    # terminate = uninstall: the machine is free again and carries nothing of ours.
    await provider.terminate_instances("default", [inst.id])
    assert await provider.query_instances({TAG_INFRA: "hyb"}) == []
    assert not m.path("/etc/barista/join.json").exists()
    assert not m.path("/etc/barista/instance.json").exists()
    assert not [p for p in m.pids() if b"barista-agent" in _cmd(p)]
    nothing_installed_but_sshd(m, sshd)
    with pytest.raises(NotFoundError):
        await provider.terminate_instances("default", ["root@198.18.254.250:22"])
    # The join token went over the channel, never into a log.
    assert req.user_data.split('"join_token":"', 1)[1].split(".")[3][:20] not in caplog.text


def _cmd(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def nothing_installed_but_sshd(m, sshd: Sshd) -> None:
    assert not any(m.path("/opt").iterdir())
    assert not m.path("/etc/barista/agent.toml").exists()
    assert not m.path("/var/lib/barista-agent").exists()


async def test_ssh_provider_refuses_a_host_key_that_is_not_pinned(lab: Lab, sshd: Sshd):
    wrong = SshProvider(settings=SshSettings(
        hosts=(sshd.host_id,), fingerprints={sshd.host_id: "SHA256:" + "A" * 43},
        client_keys=(str(sshd.client_key),)))
    with pytest.raises(CredentialsError, match="host key"):
        await wrong.run_instances(Placement(provider="ssh", region="default"),
                                  await wrong.ensure_network(NetworkRequest(infra="x",
                                                                            region="default")),
                                  [await _request(lab, "x-0")])
    nothing_installed_but_sshd(lab.machine, sshd)
    assert not lab.machine.path("/etc/barista/instance.json").exists()
    # The right pin connects.
    right = SshProvider(settings=SshSettings(
        hosts=(sshd.host_id,), fingerprints={sshd.host_id: sshd.fingerprint},
        client_keys=(str(sshd.client_key),)))
    assert await right.query_instances({}) == []
    # And an empty known_hosts file trusts nothing.
    empty = lab.machine.root / "empty_known_hosts"
    empty.write_text("")
    unknown = SshProvider(settings=SshSettings(
        hosts=(sshd.host_id,), known_hosts=str(empty), client_keys=(str(sshd.client_key),)))
    with pytest.raises(CredentialsError, match="host key"):
        await unknown.query_instances({})


@pytest.mark.parametrize(("spec", "want"), [
    ("root@10.0.0.1", ("root", "10.0.0.1", 22)),
    ("ops@host.example:2222", ("ops", "host.example", 2222)),
    ("a@[fd00::1]:22022", ("a", "fd00::1", 22022)),
])
def test_parse_host(spec: str, want: tuple[str, str, int]):
    h = parse_host(spec)
    assert (h.user, h.host, h.port) == want


@pytest.mark.parametrize("spec", ["host", "@h", "u@", "u@h:0", "u@h:x", "u@[::1]x"])
def test_parse_host_refuses(spec: str):
    with pytest.raises(ValueError):
        parse_host(spec)
