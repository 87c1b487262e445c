"""The node's underlay facts (agent/facts.py): what the agent reports as private_ip,
public_ip and vpc_cidr, from its config, its boot config's underlay and its interfaces."""

from __future__ import annotations

import msgspec
import pytest

from agent.config import AgentConfig, ConfigError
from agent.facts import interface_network, underlay_facts
from controller.provision.contract import Network
from controller.provision.model import GroupSpec
from controller.provision.service import underlay_of


def test_the_interface_holding_an_address_gives_its_prefix() -> None:
    assert interface_network("127.0.0.1") == "127.0.0.0/8"  # lo, on every Linux
    assert interface_network("192.0.2.77") == ""  # TEST-NET-1: no interface here has it
    assert interface_network("not an address") == ""


def test_configured_values_win_and_public_words_resolve() -> None:
    facts = underlay_facts(nats_urls=[], private="10.1.2.3", public="private",
                           vpc_cidr="10.1.0.0/16")
    assert facts == {"private_ip": "10.1.2.3", "public_ip": "10.1.2.3",
                     "vpc_cidr": "10.1.0.0/16"}
    facts = underlay_facts(nats_urls=[], private="10.1.2.3", public="none")
    # behind NAT: public_ip is present and empty; no interface has 10.1.2.3: no VPC range
    assert facts == {"private_ip": "10.1.2.3", "public_ip": ""}
    assert underlay_facts(nats_urls=[], private="127.0.0.1", public="203.0.113.9") == {
        "private_ip": "127.0.0.1", "public_ip": "203.0.113.9", "vpc_cidr": "127.0.0.0/8"}


def test_a_loopback_controller_gives_no_private_address() -> None:
    # The address towards nats://127.0.0.1 is loopback: not a private address of the node.
    assert underlay_facts(nats_urls=["nats://127.0.0.1:4222"]) == {"public_ip": ""}


@pytest.mark.parametrize("setting,value", [
    ("mesh_public_address", "somewhere"), ("mesh_private_address", "10.0.0.300"),
    ("mesh_vpc_cidr", "10.0.0.0/33"), ("mesh_vpc_cidr", "10.0.0.0/8,nope"),
])
def test_bad_underlay_settings_are_refused_by_name(setting: str, value: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        AgentConfig.load(path=None, overrides={setting: value})


def test_underlay_settings_accept_addresses_words_and_lists() -> None:
    cfg = AgentConfig.load(path=None, overrides={
        "mesh_public_address": "none", "mesh_private_address": "10.0.0.5",
        "mesh_vpc_cidr": "10.0.0.0/24, 10.9.0.0/16"})
    assert cfg.mesh_public_address == "none"


def _group(public_ip: bool = True) -> GroupSpec:
    return msgspec.convert({"name": "web", "provider": "lab", "regions": ["lab-us"],
                            "size": "lab.small", "public_ip": public_ip}, GroupSpec)


def test_the_boot_config_underlay_comes_from_the_network_and_the_group() -> None:
    lab_public = Network(id="n", region="lab-us", cidr="198.18.1.0/24",
                         extra={"public_address": "private"})
    assert underlay_of(_group(), lab_public) == {"vpc_cidr": "198.18.1.0/24",
                                                 "public_address": "private"}
    # A group asking for no public address has none, whatever the region.
    assert underlay_of(_group(public_ip=False), lab_public)["public_address"] == "none"
    # A provider that does not say: the agent's own config decides.
    assert underlay_of(_group(), Network(id="v", region="r", cidr="10.0.0.0/16")) == {
        "vpc_cidr": "10.0.0.0/16"}
