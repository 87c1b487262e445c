"""The aws provider against a real moto server, through real boto3 over HTTP: what the SDK
sent (user-data, tags, firewall rule), idempotent launches, lifecycle, and a cleanup that
leaves nothing carrying our tags."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    CredentialsError,
    InstanceState,
    InvalidRequestError,
    LaunchRequest,
    NetworkRequest,
    NotFoundError,
    Placement,
)
from controller.provision.providers.aws import AwsProvider, AwsSettings, default_catalog
from tests.fixtures.moto import MOTO_OWNER, UBUNTU_NOBLE

pytest.importorskip("boto3")

REGION = "us-east-1"
TAGS = {TAG_MANAGED: "ctl-test", TAG_INFRA: "web"}


def session() -> Any:
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name=REGION)


@pytest.fixture
def ec2(moto_reset: str) -> Any:
    c = session().client("ec2", region_name=REGION, endpoint_url=moto_reset)
    c.register_image(Name=UBUNTU_NOBLE, Architecture="x86_64", RootDeviceName="/dev/sda1",
                     VirtualizationType="hvm")
    return c


@pytest.fixture
def aws(moto_reset: str, ec2: Any) -> AwsProvider:
    settings = AwsSettings(endpoint_url=moto_reset, images={
        "ubuntu-24.04": ((MOTO_OWNER,), "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-*")})
    return AwsProvider(settings=settings, catalog=default_catalog(), session_factory=session)


def requests(n: int, start: int = 0) -> list[LaunchRequest]:
    return [LaunchRequest(name=f"web-app-{i}", size="t3.micro", image="ubuntu-24.04",
                          user_data=f"#cloud-config\n# node {i}\n", tags=TAGS)
            for i in range(start, start + n)]


async def test_network_is_idempotent_and_opens_only_wireguard(aws: AwsProvider, ec2: Any) -> None:
    req = NetworkRequest(infra="web", region=REGION, tags=TAGS)
    net = await aws.ensure_network(req)
    again = await aws.ensure_network(req)
    assert (again.id, again.firewall_id) == (net.id, net.firewall_id)
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:barista-infra", "Values": ["web"]}])["Vpcs"]
    assert len(vpcs) == 1
    sg = ec2.describe_security_groups(GroupIds=[net.firewall_id])["SecurityGroups"][0]
    rules = [(p["IpProtocol"], p.get("FromPort"), p.get("ToPort"),
              [r["CidrIp"] for r in p.get("IpRanges", [])]) for p in sg["IpPermissions"]]
    assert rules == [("udp", 51820, 51820, ["0.0.0.0/0"])]


async def test_a_network_made_half_way_is_completed(aws: AwsProvider, ec2: Any) -> None:
    # A controller killed after the gateway's attach (before the route) and after the
    # security group's create (before its rule): the next ensure_network adds the route
    # and the rule, and makes nothing twice.
    tags = [{"Key": k, "Value": v} for k, v in sorted(TAGS.items())]
    vpc = ec2.create_vpc(CidrBlock="10.64.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": tags}])["Vpc"]["VpcId"]
    igw = ec2.create_internet_gateway(TagSpecifications=[
        {"ResourceType": "internet-gateway", "Tags": tags}])["InternetGateway"][
        "InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    sg = ec2.create_security_group(GroupName="barista-web", VpcId=vpc, Description="x",
                                   TagSpecifications=[{"ResourceType": "security-group",
                                                       "Tags": tags}])["GroupId"]
    req = NetworkRequest(infra="web", region=REGION, tags=TAGS)
    net = await aws.ensure_network(req)
    again = await aws.ensure_network(req)
    assert (net.id, net.firewall_id) == (again.id, again.firewall_id) == (vpc, sg)
    perms = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["IpPermissions"]
    assert [(p["IpProtocol"], p.get("FromPort"), [r["CidrIp"] for r in p["IpRanges"]])
            for p in perms] == [("udp", 51820, ["0.0.0.0/0"])]
    routes = [r for t in ec2.describe_route_tables(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}])["RouteTables"] for r in t["Routes"]]
    assert [r.get("GatewayId") for r in routes
            if r.get("DestinationCidrBlock") == "0.0.0.0/0"] == [igw]
    tagged = [{"Name": "tag:barista-infra", "Values": ["web"]}]
    assert len(ec2.describe_internet_gateways(Filters=tagged)["InternetGateways"]) == 1
    assert len(ec2.describe_vpcs(Filters=tagged)["Vpcs"]) == 1


async def test_ssh_only_when_asked(aws: AwsProvider, ec2: Any) -> None:
    net = await aws.ensure_network(NetworkRequest(infra="ops", region=REGION, tags=TAGS,
                                                  ssh_from=("203.0.113.0/24",)))
    sg = ec2.describe_security_groups(GroupIds=[net.firewall_id])["SecurityGroups"][0]
    ssh = [p for p in sg["IpPermissions"] if p["IpProtocol"] == "tcp"]
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in ssh] == [
        (22, ["203.0.113.0/24"])]


async def test_launch_sends_user_data_and_tags_and_is_idempotent(aws: AwsProvider,
                                                                 ec2: Any) -> None:
    net = await aws.ensure_network(NetworkRequest(infra="web", region=REGION, tags=TAGS))
    where = Placement("aws", REGION, "us-east-1b")
    made = await aws.run_instances(where, net, requests(3))
    assert sorted(i.name for i in made) == ["web-app-0", "web-app-1", "web-app-2"]
    assert all(i.placement.zone == "us-east-1b" and i.public_ip for i in made)
    for inst in made:
        attr = ec2.describe_instance_attribute(InstanceId=inst.id, Attribute="userData")
        sent = base64.b64decode(attr["UserData"]["Value"]).decode()
        assert sent == f"#cloud-config\n# node {inst.name.rsplit('-', 1)[1]}\n"
        assert inst.tags[TAG_NODE] == inst.name and inst.tags[TAG_MANAGED] == "ctl-test"
    # A re-run (the same names, one more) creates only the gap.
    again = await aws.run_instances(where, net, requests(4))
    assert sorted(i.id for i in again if i.name != "web-app-3") == sorted(i.id for i in made)
    found = await aws.query_instances(TAGS, region=REGION)
    assert len([i for i in found if not i.state.gone]) == 4


async def test_lifecycle_and_cleanup_leave_nothing(aws: AwsProvider, ec2: Any) -> None:
    net = await aws.ensure_network(NetworkRequest(infra="web", region=REGION, tags=TAGS))
    made = await aws.run_instances(Placement("aws", REGION, "us-east-1a"), net, requests(2))
    ids = [i.id for i in made]

    async def states() -> set[InstanceState]:
        return {i.state for i in await aws.query_instances(TAGS, region=REGION)}

    await aws.stop_instances(REGION, ids)
    assert await states() == {InstanceState.STOPPED}
    await aws.start_instances(REGION, ids)
    assert await states() == {InstanceState.RUNNING}
    await aws.reboot_instances(REGION, ids)
    assert await states() == {InstanceState.RUNNING}
    await aws.terminate_instances(REGION, ids)
    assert await states() == {InstanceState.TERMINATED}
    await aws.cleanup(TAGS, region=REGION)
    tagged = [{"Name": "tag:barista-infra", "Values": ["web"]}]
    assert ec2.describe_vpcs(Filters=tagged)["Vpcs"] == []
    assert ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": ["barista-web"]}])["SecurityGroups"] == []
    assert ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [net.id]}])[
        "Subnets"] == []
    assert ec2.describe_internet_gateways(Filters=tagged)["InternetGateways"] == []


async def test_cleanup_keeps_a_vpc_still_in_use(aws: AwsProvider, ec2: Any) -> None:
    net = await aws.ensure_network(NetworkRequest(infra="web", region=REGION, tags=TAGS))
    await aws.run_instances(Placement("aws", REGION, "us-east-1a"), net, requests(1))
    await aws.cleanup(TAGS, region=REGION)
    assert len(ec2.describe_vpcs(VpcIds=[net.id])["Vpcs"]) == 1


async def test_unknown_ids_and_images_are_typed_errors(aws: AwsProvider) -> None:
    with pytest.raises(NotFoundError) as err:
        await aws.terminate_instances(REGION, ["i-0123456789abcdef0"])
    assert err.value.code.startswith("InvalidInstanceID")
    net = await aws.ensure_network(NetworkRequest(infra="web", region=REGION, tags=TAGS))
    bad = LaunchRequest(name="x-y-0", size="t3.micro", image="windows-95", user_data="",
                        tags=TAGS)
    with pytest.raises(InvalidRequestError, match="unknown image 'windows-95'"):
        await aws.run_instances(Placement("aws", REGION, "us-east-1a"), net, [bad])


async def test_missing_credentials_say_what_to_set(moto_reset: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Any) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws = AwsProvider(settings=AwsSettings(endpoint_url=moto_reset), catalog=default_catalog())
    with pytest.raises(CredentialsError, match="AWS_PROFILE") as err:
        await aws.query_instances(TAGS, region=REGION)
    assert err.value.scope == "provider"


def _public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode() + " ops@laptop"


async def test_ssh_key_is_imported_as_a_tagged_key_pair_and_removed_at_cleanup(
        aws: AwsProvider, ec2: Any) -> None:
    key = _public_key()
    req = NetworkRequest(infra="web", region=REGION, ssh_from=("198.51.100.0/24",),
                         ssh_public_key=key, tags=TAGS)
    net = await aws.ensure_network(req)
    again = await aws.ensure_network(req)  # idempotent: found, not imported twice
    assert net.extra["key_name"] == again.extra["key_name"] == "barista-web"
    pairs = ec2.describe_key_pairs(KeyNames=["barista-web"])["KeyPairs"]
    assert len(pairs) == 1
    assert {t["Key"]: t["Value"] for t in pairs[0]["Tags"]} == {**TAGS}
    made = await aws.run_instances(Placement("aws", REGION, "us-east-1a"), net, requests(1))
    raw = ec2.describe_instances(InstanceIds=[made[0].id])["Reservations"][0]["Instances"][0]
    assert raw["KeyName"] == "barista-web"
    await aws.cleanup(TAGS, region=REGION)  # a VM still uses it: kept
    assert ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["barista-web"]}]
                                  )["KeyPairs"]
    await aws.terminate_instances(REGION, [made[0].id])
    await aws.cleanup(TAGS, region=REGION)
    assert ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["barista-web"]}]
                                  )["KeyPairs"] == []


async def test_a_key_pair_of_that_name_not_ours_is_refused(aws: AwsProvider, ec2: Any) -> None:
    ec2.import_key_pair(KeyName="barista-web", PublicKeyMaterial=_public_key().encode())
    with pytest.raises(InvalidRequestError, match="not ours"):
        await aws.ensure_network(NetworkRequest(infra="web", region=REGION,
                                                ssh_public_key=_public_key(), tags=TAGS))
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1  # untouched
