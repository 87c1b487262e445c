"""What only one cloud does, beyond the shared contract suite: Azure's base64 custom_data,
the NSG on the NIC (made beside the VNet) and the throwaway admin key; GCP's labels, network tag and
application-default credentials; each cloud's missing-credentials message."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    CredentialsError,
    LaunchRequest,
    NetworkRequest,
    Placement,
)

TAGS = {TAG_MANAGED: "ctl-clouds", TAG_INFRA: "lab"}


def _launch(size: str) -> list[LaunchRequest]:
    return [LaunchRequest(name="lab-db-0", size=size, image="ubuntu-24.04",
                          user_data="#cloud-config\n# secret token here\n", tags=TAGS)]


def _azure(fake: Any, *, credential: Any = None, poll: float = 0.0) -> Any:
    """An AzureProvider against ``fake`` (tests/fakes/azure.py FakeArm)."""
    from controller.provision.providers.azure import AzureProvider, AzureSettings, default_catalog
    from tests.fakes.clouds import StaticToken

    return AzureProvider(settings=AzureSettings(
        subscription_id=fake.state.subscription, base_url=fake.url,
        connection_verify=str(fake.ca), polling_interval=poll),
        catalog=default_catalog(), credential_factory=credential or StaticToken)


async def test_azure_vm_shape(tmp_path: Path) -> None:
    pytest.importorskip("azure.mgmt.compute")
    from tests.fakes.azure import FakeArm

    with FakeArm(tmp_path) as fake:
        p = _azure(fake)
        net = await p.ensure_network(NetworkRequest(infra="lab", region="eastus", tags=TAGS))
        [inst] = await p.run_instances(Placement("azure", "eastus", "eastus-3"), net,
                                       _launch("Standard_B2s"))
        vm = fake.state.sent("PUT", "/virtualMachines/lab-db-0")[-1]
        props = vm["properties"]
        assert base64.b64decode(props["osProfile"]["customData"]).decode().startswith(
            "#cloud-config")
        assert props["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"]
        key = props["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"]
        assert key.startswith("ssh-ed25519 ") and key.endswith(" barista-unused")
        assert vm["zones"] == ["3"] and inst.placement.zone == "eastus-3"
        assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
        assert vm["tags"]["barista-node"] == "lab-db-0"
        # The NSG is on the VM's NIC (so the VNet need not wait for it), not on the subnet.
        nic_cfg = props["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
        assert nic_cfg["networkSecurityGroup"]["id"] == net.firewall_id
        [nic] = fake.state.of_type("networkinterfaces")
        assert nic["properties"]["networkSecurityGroup"]["id"] == net.firewall_id
        vnet = fake.state.sent("PUT", "/virtualNetworks/")[-1]
        assert "networkSecurityGroup" not in vnet["properties"]["subnets"][0]["properties"]
        # Every resource we made carries our tags.
        assert all(r["tags"].get(TAG_INFRA) == "lab" for r in fake.state.resources.values())


async def test_azure_refused_credentials(tmp_path: Path) -> None:
    pytest.importorskip("azure.mgmt.compute")
    from azure.core.exceptions import ClientAuthenticationError

    from tests.fakes.azure import FakeArm

    class Refused:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.")

    with FakeArm(tmp_path) as fake:
        p = _azure(fake, credential=Refused)
        with pytest.raises(CredentialsError, match="az login") as err:
            await p.query_instances(TAGS)
        assert err.value.scope == "provider"
        assert fake.state.requests == []  # nothing was sent without a token


async def test_gcp_instance_shape() -> None:
    pytest.importorskip("google.cloud.compute_v1")
    from controller.provision.providers.gcp import GcpProvider, GcpSettings, default_catalog
    from tests.fakes.gcp import FakeGce

    with FakeGce() as fake:
        p = GcpProvider(settings=GcpSettings(project=fake.state.project,
                                             api_endpoint=fake.url, anonymous=True),
                        catalog=default_catalog())
        net = await p.ensure_network(NetworkRequest(infra="lab", region="europe-west1",
                                                    tags=TAGS))
        await p.run_instances(Placement("gcp", "europe-west1", "europe-west1-c"), net,
                              _launch("e2-medium"))
        [body] = [b for b in fake.state.sent("POST", "/zones/europe-west1-c/instances") if b]
        assert body["labels"] == {**TAGS, "barista-node": "lab-db-0"}
        assert body["tags"]["items"] == ["barista-lab"]
        fw = fake.state.firewalls["barista-lab-wg"]
        assert fw["targetTags"] == ["barista-lab"] and fw["direction"] == "INGRESS"
        assert body["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
        # Idempotent inserts: a request id, zone-specific.
        [(_m, _p, query, _b)] = [r for r in fake.state.requests
                                 if r[0] == "POST" and r[1].endswith("/instances")]
        assert query["requestId"]


async def test_gcp_without_application_default_credentials(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("google.cloud.compute_v1")
    from controller.provision.providers.gcp import GcpProvider, GcpSettings, default_catalog

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # never the real metadata server
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    p = GcpProvider(settings=GcpSettings(project="x", api_endpoint="http://127.0.0.1:9"),
                    catalog=default_catalog())
    with pytest.raises(CredentialsError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        await p.query_instances(TAGS)


def _gcp_provider(fake: Any) -> Any:
    from controller.provision.providers.gcp import GcpProvider, GcpSettings, default_catalog

    return GcpProvider(settings=GcpSettings(project=fake.state.project, api_endpoint=fake.url,
                                            anonymous=True), catalog=default_catalog())


async def test_gcp_instances_are_inserted_while_the_firewall_is_made() -> None:
    """The firewall rule's operation is not on the launches' path (instances match rules
    by network tag); the launch still answers only once the rule is done."""
    pytest.importorskip("google.cloud.compute_v1")
    import time

    from tests.fakes.gcp import FakeGce
    from tests.fakes.http import Request

    inserts: list[float] = []

    def latency(req: Request) -> float:
        if req.method == "POST" and req.path.endswith("/instances"):
            inserts.append(time.monotonic())
        return 0.0

    with FakeGce(latency=latency) as fake:
        fake.state.op_delay = lambda kind, target: 1.5 if target == "firewalls" else 0.05
        p = _gcp_provider(fake)
        t0 = time.monotonic()
        net = await p.ensure_network(NetworkRequest(infra="lab", region="us-central1",
                                                    tags=TAGS))
        [fw_op] = [op for op in fake.state.operations.values()
                   if op["targetLink"].endswith("/firewalls/barista-lab-wg")]
        assert time.monotonic() < fw_op["_done_at"]  # returned before the rule is done
        [inst] = await p.run_instances(Placement("gcp", "us-central1", "us-central1-a"), net,
                                       _launch("e2-small"))
        assert inserts and inserts[0] < fw_op["_done_at"]
        assert time.monotonic() >= fw_op["_done_at"] and time.monotonic() - t0 >= 1.5
        assert inst.name == "lab-db-0" and "barista-lab-wg" in fake.state.firewalls


async def test_gcp_a_failed_firewall_fails_the_launch_and_is_made_again() -> None:
    pytest.importorskip("google.cloud.compute_v1")
    from controller.provision.contract import QuotaError
    from tests.fakes.gcp import FakeGce

    with FakeGce() as fake:
        fake.state.firewall_errors["barista-lab-wg"] = (
            "QUOTA_EXCEEDED", "Quota 'FIREWALLS' exceeded. Limit: 100.0 globally.")
        p = _gcp_provider(fake)
        net = await p.ensure_network(NetworkRequest(infra="lab", region="us-central1",
                                                    tags=TAGS))
        where = Placement("gcp", "us-central1", "us-central1-a")
        with pytest.raises(QuotaError, match="firewall rules of network barista-lab") as err:
            await p.run_instances(where, net, _launch("e2-small"))
        assert err.value.scope == "provider"  # global rules: no region to fail over to
        # Inserted again once before the launch failed; the VM itself was made.
        assert len([b for b in fake.state.sent("POST", "/global/firewalls") if b]) == 2
        assert [n for _z, n in fake.state.instances] == ["lab-db-0"]
        del fake.state.firewall_errors["barista-lab-wg"]
        [inst] = await p.run_instances(where, net, _launch("e2-small"))  # the retry
        assert inst.name == "lab-db-0" and len(fake.state.instances) == 1
        assert "barista-lab-wg" in fake.state.firewalls


async def test_azure_nsg_and_vnet_are_made_side_by_side(tmp_path: Path) -> None:
    """Neither refers to the other: both operations run at once (each takes 1 s here), and
    a VNet made before with the NSG on its subnet keeps it."""
    pytest.importorskip("azure.mgmt.compute")
    import time

    from tests.fakes.azure import FakeArm

    with FakeArm(tmp_path) as fake:
        fake.state.lro_delay = lambda action, name: 1.0
        p = _azure(fake, poll=0.05)
        req = NetworkRequest(infra="lab", region="eastus", tags=TAGS)
        t0 = time.monotonic()
        net = await p.ensure_network(req)
        assert 1.0 <= time.monotonic() - t0 < 1.9  # not 2 s: in series they would be
        ops = sorted((op["done_at"], op["target"][1]) for op in fake.state.operations.values())
        assert [k for _t, k in ops] == ["networksecuritygroups", "virtualnetworks"] or \
            [k for _t, k in ops] == ["virtualnetworks", "networksecuritygroups"]
        assert abs(ops[0][0] - ops[1][0]) < 0.5
        # A VNet of an older release, its subnet carrying the NSG: kept on the next call.
        vnet = fake.state.resources[("barista-lab-eastus", "virtualnetworks", "barista-lab")]
        vnet["properties"]["subnets"][0]["properties"]["networkSecurityGroup"] = {
            "id": net.firewall_id}
        await p.ensure_network(req)
        sent = fake.state.sent("PUT", "/virtualNetworks/")[-1]
        assert sent["properties"]["subnets"][0]["properties"]["networkSecurityGroup"][
            "id"] == net.firewall_id


async def test_azure_queries_list_addresses_only_while_one_is_unknown(tmp_path: Path) -> None:
    pytest.importorskip("azure.mgmt.compute")
    from tests.fakes.azure import FakeArm

    with FakeArm(tmp_path) as fake:
        p = _azure(fake)
        net = await p.ensure_network(NetworkRequest(infra="lab", region="eastus", tags=TAGS))
        [made] = await p.run_instances(Placement("azure", "eastus", "eastus-1"), net,
                                       _launch("Standard_B1s"))

        def nic_lists() -> int:
            return len([1 for m, path, _q, _b in fake.state.requests
                        if m == "GET" and path.lower().endswith("/networkinterfaces")])

        before = nic_lists()
        [seen] = await p.query_instances(TAGS, region="eastus")
        assert (seen.private_ip, seen.public_ip) == (made.private_ip, made.public_ip)
        assert seen.public_ip and nic_lists() == before  # known: not listed again
        await p.stop_instances("eastus", [made.id])  # forgotten: listed again
        [seen] = await p.query_instances(TAGS, region="eastus")
        assert seen.public_ip == made.public_ip and nic_lists() == before + 1
