"""A real agent process in a lab VM behind the private site's NAT enrolls with a
loopback-only controller through the lab gateway (``GatewayForwarder``) and heartbeats:
the path the installer will set up (config 0600 from write_files, an enabled unit the
lab's init starts), minus the venv install."""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path

import pytest

from controller.provision.lab.gateway import GatewayForwarder
from controller.service import RunningController
from tests.fixtures.lab import MakeLab, needs_lab, vm_run, wait_booted
from tests.fixtures.wait import wait_for

pytestmark = needs_lab

REPO = str(Path(__file__).resolve().parents[2])


def _isdir(path: str) -> bool:
    return os.path.isdir(path)


def _user_data(agent_toml: str, token: str) -> str:
    unit = (
        "[Unit]\nDescription=barista agent\n[Service]\n"
        f"ExecStart={sys.executable} -m agent --config /etc/barista/agent.toml\n"
        f"Environment=PYTHONPATH={REPO}\nRestart=on-failure\nRestartSec=1\n"
    )

    def block(text: str) -> str:
        return "\n".join("      " + line for line in text.splitlines())

    return (
        "#cloud-config\nwrite_files:\n"
        "  - path: /etc/barista/agent.toml\n    permissions: '0600'\n    content: |\n"
        f"{block(agent_toml)}\n"
        "  - path: /etc/barista/token\n    permissions: '0600'\n    content: |\n"
        f"{block(token)}\n"
        "  - path: /etc/systemd/system/barista-agent.service\n    content: |\n"
        f"{block(unit)}\n"
        "runcmd:\n"
        "  - [mkdir, -p, /etc/systemd/system/multi-user.target.wants]\n"
        "  - [ln, -sf, /etc/systemd/system/barista-agent.service,"
        " /etc/systemd/system/multi-user.target.wants/barista-agent.service]\n"
    )


@pytest.mark.slow
async def test_agent_in_a_private_site_vm_enrolls_through_the_gateway(
    make_lab: MakeLab, controller: RunningController
) -> None:
    lab = await make_lab()
    host_had_state = _isdir("/var/lib/barista-agent")
    assert controller.tokens is not None
    port = urllib.parse.urlsplit(controller.agent_nats_url).port
    assert port is not None
    token = (await controller.tokens.create(labels={"site": "onprem"})).token
    async with GatewayForwarder(host=lab.gateway_ip, routes={0: ("127.0.0.1", port)}) as fw:
        toml = (
            "[agent]\n"
            f'nats_urls = ["nats://{lab.gateway_ip}:{fw.ports[0]}"]\n'
            'token_file = "/etc/barista/token"\n'
            'state_dir = "/var/lib/barista-agent"\n'
            f'enroll_jwt = "{controller.tokens.enroll_jwt}"\n'
            "heartbeat_interval = 0.2\nmetrics_interval = 0.5\n"
            'collectors = ["cpu", "mem"]\n'
        )
        vm = await lab.create_vm(name="site-db-0", region="lab-onprem", size="lab.small",
                                 image="ubuntu-24.04", user_data=_user_data(toml, token),
                                 tags={})
        assert vm.public_ip == ""
        await wait_booted(lab, vm.id)

        def enrolled() -> list[str]:
            return [n.id for n in controller.fleet.select() if n.hostname == "site-db-0"]

        (node_id,) = await wait_for(enrolled, 30, "the VM's agent to enroll")
        node = controller.fleet.get(node_id)
        assert node is not None and node.labels.get("site") == "onprem"
        await wait_for(lambda: controller.fleet.last_beat(node_id) is not None, 15,
                       "a heartbeat from the VM")
        assert fw.connections >= 1
        # The agent's state is the VM's own, not the host's.
        ls = await vm_run(lab, vm.id, ["ls", "/var/lib/barista-agent"], check=True)
        assert ls.stdout.strip()
        if not host_had_state:
            assert not _isdir("/var/lib/barista-agent")
        await lab.terminate_vm(vm.id)
