"""One contract suite, run unchanged against every cloud provider through its real SDK:
AWS against moto, GCP (and Azure) against the REST fakes in tests/fakes/. Each harness
says how to look at the cloud's side (what the SDK sent, what is left)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    CapacityError,
    Instance,
    InstanceState,
    LaunchRequest,
    NetworkRequest,
    NotFoundError,
    Placement,
    Provider,
    TransientError,
)
from tests.fixtures.live_clouds import LIVE, drain

INFRA = "shop"
TAGS = {TAG_MANAGED: "ctl-contract", TAG_INFRA: INFRA}


class Harness(Protocol):
    provider: Provider
    region: str
    zones: tuple[str, str]
    size: str
    unknown_id: str

    def user_data_sent(self, inst: Instance) -> str: ...

    def open_ports(self) -> set[tuple[str, int, str]]: ...

    def leftovers(self) -> list[str]: ...

    def fail_capacity(self, zone: str) -> bool: ...

    def throttle(self, n: int) -> bool: ...


# -- AWS (moto) -----------------------------------------------------------------------


@dataclass
class AwsHarness:
    provider: Provider
    ec2: Any
    region: str = "us-east-1"
    zones: tuple[str, str] = ("us-east-1a", "us-east-1b")
    size: str = "t3.micro"
    unknown_id: str = "i-0123456789abcdef0"

    def user_data_sent(self, inst: Instance) -> str:
        attr = self.ec2.describe_instance_attribute(InstanceId=inst.id, Attribute="userData")
        return base64.b64decode(attr["UserData"]["Value"]).decode()

    def open_ports(self) -> set[tuple[str, int, str]]:
        sgs = self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [f"barista-{INFRA}"]}])["SecurityGroups"]
        return {(p["IpProtocol"], p["FromPort"], r["CidrIp"])
                for sg in sgs for p in sg["IpPermissions"] for r in p.get("IpRanges", [])}

    def leftovers(self) -> list[str]:
        tagged = [{"Name": f"tag:{TAG_INFRA}", "Values": [INFRA]}]
        out = [v["VpcId"] for v in self.ec2.describe_vpcs(Filters=tagged)["Vpcs"]]
        out += [g["GroupId"] for g in self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [f"barista-{INFRA}"]}])["SecurityGroups"]]
        out += [g["InternetGatewayId"] for g in
                self.ec2.describe_internet_gateways(Filters=tagged)["InternetGateways"]]
        out += [s["SubnetId"] for s in self.ec2.describe_subnets(Filters=tagged)["Subnets"]]
        for res in self.ec2.describe_instances(Filters=tagged)["Reservations"]:
            out += [i["InstanceId"] for i in res["Instances"]
                    if i["State"]["Name"] != "terminated"]
        return out

    def fail_capacity(self, zone: str) -> bool:
        return False  # moto cannot inject it; tests/unit/test_provider_errors.py maps it

    def throttle(self, n: int) -> bool:
        return False


def _aws(moto_url: str) -> Iterator[AwsHarness]:
    pytest.importorskip("boto3")
    import urllib.request

    import boto3

    from controller.provision.providers.aws import AwsProvider, AwsSettings, default_catalog
    from tests.fixtures.moto import MOTO_OWNER, UBUNTU_NOBLE

    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/reset",
                                                  method="POST", data=b""), timeout=10).close()

    def session() -> Any:
        return boto3.session.Session(aws_access_key_id="testing",
                                     aws_secret_access_key="testing")

    ec2 = session().client("ec2", region_name="us-east-1", endpoint_url=moto_url)
    ec2.register_image(Name=UBUNTU_NOBLE, Architecture="x86_64", RootDeviceName="/dev/sda1",
                       VirtualizationType="hvm")
    settings = AwsSettings(endpoint_url=moto_url, images={
        "ubuntu-24.04": ((MOTO_OWNER,), "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-*")})
    yield AwsHarness(AwsProvider(settings=settings, catalog=default_catalog(),
                                 session_factory=session), ec2)


# -- GCP (REST fake) ------------------------------------------------------------------


@dataclass
class GcpHarness:
    provider: Provider
    fake: Any
    region: str = "us-central1"
    zones: tuple[str, str] = ("us-central1-a", "us-central1-b")
    size: str = "e2-small"
    unknown_id: str = "no-such-vm"

    def user_data_sent(self, inst: Instance) -> str:
        bodies = [b for b in self.fake.state.sent("POST", "/instances")
                  if b and b.get("name") == inst.extra["gce_name"]]
        items = {i["key"]: i["value"] for i in bodies[0]["metadata"]["items"]}
        return str(items["user-data"])

    def open_ports(self) -> set[tuple[str, int, str]]:
        return {(a["IPProtocol"], int(p), src)
                for fw in self.fake.state.firewalls.values()
                if fw["name"].startswith(f"barista-{INFRA}-")
                for a in fw["allowed"] for p in a["ports"] for src in fw["sourceRanges"]}

    def leftovers(self) -> list[str]:
        s = self.fake.state
        return ([n for n in s.networks if INFRA in n] + [n for _r, n in s.subnets if INFRA in n]
                + [n for n in s.firewalls if INFRA in n]
                + [n for (_z, n), i in s.instances.items()
                   if i.get("labels", {}).get(TAG_INFRA) == INFRA])

    def fail_capacity(self, zone: str) -> bool:
        self.fake.state.capacity_exhausted.add(zone)
        return True

    def throttle(self, n: int) -> bool:
        self.fake.state.throttle_next = n
        return True


def _gcp() -> Iterator[GcpHarness]:
    pytest.importorskip("google.cloud.compute_v1")
    from controller.provision.providers.gcp import GcpProvider, GcpSettings, default_catalog
    from tests.fakes.gcp import FakeGce

    with FakeGce() as fake:
        settings = GcpSettings(project=fake.state.project, api_endpoint=fake.url,
                               anonymous=True)
        yield GcpHarness(GcpProvider(settings=settings, catalog=default_catalog()), fake)


# -- Azure (ARM fake over HTTPS) -------------------------------------------------------


@dataclass
class AzureHarness:
    provider: Provider
    fake: Any
    region: str = "eastus"
    zones: tuple[str, str] = ("eastus-1", "eastus-2")
    size: str = "Standard_B1s"
    unknown_id: str = ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/"
                       f"barista-{INFRA}-eastus/providers/Microsoft.Compute/virtualMachines/nope")

    def user_data_sent(self, inst: Instance) -> str:
        bodies = [b for b in self.fake.state.sent("PUT", "/virtualMachines/" + inst.name)]
        return base64.b64decode(bodies[-1]["properties"]["osProfile"]["customData"]).decode()

    def open_ports(self) -> set[tuple[str, int, str]]:
        out = set()
        for nsg in self.fake.state.of_type("networksecuritygroups"):
            for r in nsg["properties"]["securityRules"]:
                rp = r["properties"]
                if rp["direction"] == "Inbound" and rp["access"] == "Allow":
                    srcs = rp.get("sourceAddressPrefixes") or [rp["sourceAddressPrefix"]]
                    for src in srcs:
                        out.add((rp["protocol"].lower(), int(rp["destinationPortRange"]),
                                 "0.0.0.0/0" if src == "*" else src))
        return out

    def leftovers(self) -> list[str]:
        s = self.fake.state
        return [g["name"] for g in s.groups.values()] + [r["id"] for r in s.resources.values()]

    def fail_capacity(self, zone: str) -> bool:
        self.fake.state.capacity_exhausted.add(zone)
        return True

    def throttle(self, n: int) -> bool:
        self.fake.state.throttle_next = n
        return True


def _azure(tmp: Any) -> Iterator[AzureHarness]:
    pytest.importorskip("azure.mgmt.compute")
    from controller.provision.providers.azure import (
        AzureProvider,
        AzureSettings,
        default_catalog,
    )
    from tests.fakes.azure import FakeArm
    from tests.fakes.clouds import StaticToken

    with FakeArm(tmp) as fake:
        settings = AzureSettings(subscription_id=fake.state.subscription, base_url=fake.url,
                                 connection_verify=str(fake.ca), polling_interval=0)
        yield AzureHarness(AzureProvider(settings=settings, catalog=default_catalog(),
                                         credential_factory=StaticToken), fake)


@pytest.fixture(params=["aws", "gcp", "azure", "aws-live", "gcp-live", "azure-live"])
async def cloud(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Harness]:
    """The fakes always; the real clouds with --aws/--gcp/--azure (tests/fixtures/
    live_clouds.py: skipped without the flag or credentials; everything the suite made is
    terminated and cleaned up afterwards, and must be gone)."""
    if request.param in LIVE:
        for live in LIVE[request.param](request.config):
            try:
                yield live
            finally:
                await drain(live, TAGS)
        return
    fakes: Iterator[Harness]
    if request.param == "aws":
        fakes = _aws(request.getfixturevalue("moto_url"))
    elif request.param == "gcp":
        fakes = _gcp()
    else:
        fakes = _azure(tmp_path)
    for h in fakes:
        yield h


def launches(h: Harness, n: int) -> list[LaunchRequest]:
    return [LaunchRequest(name=f"{INFRA}-web-{i}", size=h.size, image="ubuntu-24.04",
                          user_data=f"#cloud-config\n# barista node {i}\n", tags=TAGS)
            for i in range(n)]


async def test_network_opens_wireguard_and_nothing_else(cloud: Harness) -> None:
    req = NetworkRequest(infra=INFRA, region=cloud.region, tags=TAGS)
    net = await cloud.provider.ensure_network(req)
    again = await cloud.provider.ensure_network(req)
    assert (again.id, again.firewall_id) == (net.id, net.firewall_id)
    assert cloud.open_ports() == {("udp", 51820, "0.0.0.0/0")}


async def test_launch_carries_user_data_and_tags_and_creates_only_the_gap(
        cloud: Harness) -> None:
    p = cloud.provider
    net = await p.ensure_network(NetworkRequest(infra=INFRA, region=cloud.region, tags=TAGS))
    where = Placement(p.name, cloud.region, cloud.zones[1])
    made = await p.run_instances(where, net, launches(cloud, 2))
    assert sorted(i.name for i in made) == [f"{INFRA}-web-0", f"{INFRA}-web-1"]
    for inst in made:
        assert cloud.user_data_sent(inst) == \
            f"#cloud-config\n# barista node {inst.name.rsplit('-', 1)[1]}\n"
        assert inst.tags[TAG_NODE] == inst.name and inst.tags[TAG_MANAGED] == "ctl-contract"
        assert inst.public_ip and inst.private_ip and inst.placement == where
    again = await p.run_instances(where, net, launches(cloud, 3))
    assert {i.id for i in again} >= {i.id for i in made} and len(again) == 3
    live = [i for i in await p.query_instances(TAGS, region=cloud.region) if not i.state.gone]
    assert sorted(i.name for i in live) == [f"{INFRA}-web-{i}" for i in range(3)]


async def test_lifecycle_then_cleanup_leaves_nothing(cloud: Harness) -> None:
    p = cloud.provider
    net = await p.ensure_network(NetworkRequest(infra=INFRA, region=cloud.region, tags=TAGS))
    made = await p.run_instances(Placement(p.name, cloud.region, cloud.zones[0]), net,
                                 launches(cloud, 2))
    ids = [i.id for i in made]

    async def states() -> set[InstanceState]:
        return {i.state for i in await p.query_instances(TAGS, region=cloud.region)}

    await p.stop_instances(cloud.region, ids)
    assert await states() == {InstanceState.STOPPED}
    await p.start_instances(cloud.region, ids)
    assert await states() == {InstanceState.RUNNING}
    await p.reboot_instances(cloud.region, ids)
    assert await states() == {InstanceState.RUNNING}
    await p.cleanup(TAGS, region=cloud.region)  # VMs still there: nothing removed
    assert cloud.leftovers()
    await p.terminate_instances(cloud.region, ids)
    assert await states() <= {InstanceState.TERMINATED}
    await p.cleanup(TAGS, region=cloud.region)
    assert cloud.leftovers() == []


async def test_terminating_an_unknown_vm_is_not_found(cloud: Harness) -> None:
    with pytest.raises(NotFoundError):
        await cloud.provider.terminate_instances(cloud.region, [cloud.unknown_id])


async def test_capacity_error_names_its_zone(cloud: Harness) -> None:
    if not cloud.fail_capacity(cloud.zones[0]):
        pytest.skip(f"{cloud.provider.name}'s test endpoint cannot inject capacity errors")
    p = cloud.provider
    net = await p.ensure_network(NetworkRequest(infra=INFRA, region=cloud.region, tags=TAGS))
    with pytest.raises(CapacityError) as err:
        await p.run_instances(Placement(p.name, cloud.region, cloud.zones[0]), net,
                              launches(cloud, 1))
    assert (err.value.scope, err.value.zone) == ("zone", cloud.zones[0])
    # The next zone has room.
    made = await p.run_instances(Placement(p.name, cloud.region, cloud.zones[1]), net,
                                 launches(cloud, 1))
    assert made[0].placement.zone == cloud.zones[1]


async def test_throttling_is_transient(cloud: Harness) -> None:
    if not cloud.throttle(1):
        pytest.skip(f"{cloud.provider.name}'s test endpoint cannot inject throttling")
    with pytest.raises(TransientError) as err:
        await cloud.provider.query_instances(TAGS, region=cloud.region)
    assert err.value.retryable
    assert await cloud.provider.query_instances(TAGS, region=cloud.region) == []
