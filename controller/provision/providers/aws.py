"""AWS EC2 behind the provider contract (boto3).

boto3 is synchronous: every call runs in a worker thread of the provider's
``RequestMeter`` (which also keeps it within ``API_LIMITS``) on a client made once per
region (boto3 clients are thread-safe). botocore's own retries are
off (one attempt): the engine owns retry, backoff and rate limits, so a throttled call is
never retried twice over. Everything we create carries our tags, which is how a restarted
controller finds it again and how ``cleanup`` knows what is ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    CapacityError,
    Catalog,
    CredentialsError,
    Image,
    Instance,
    InstanceState,
    InvalidRequestError,
    LaunchRequest,
    Network,
    NetworkRequest,
    NotFoundError,
    Placement,
    ProvisionError,
    QuotaError,
    Region,
    Size,
    TransientError,
)
from controller.provision.limits import ApiLimits, RequestMeter, gather_all, gather_launches
from controller.provision.refresh import Fetched, Progress

log = logging.getLogger("barista.controller.provision.aws")

NAME = "aws"

# EC2 throttles per account and per region with token buckets ("Request throttling for the
# Amazon EC2 API", docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html):
# non-mutating (Describe*) requests: bucket 100, refill 20/s; RunInstances also draws on a
# resource bucket of 1000 instances refilled at 2/s. We launch, terminate, create networks
# (mutating actions, whose request bucket in the same page's table is 50 refilled at 5/s)
# and describe through one bucket per region, so it is set to the smallest of them: 5/s,
# bursts of 50. 100 launches fit in the RunInstances resource bucket.
API_LIMITS = ApiLimits(rate=0.0, burst=0, region_rate=5.0, region_burst=50, concurrency=8,
                       batch=50)
CANONICAL = "099720109477"  # Ubuntu's AWS account

# EC2 instance state name -> ours (the provider's state map, Libcloud style).
STATE_MAP: Mapping[str, InstanceState] = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "stopped": InstanceState.STOPPED,
    "shutting-down": InstanceState.TERMINATING,
    "terminated": InstanceState.TERMINATED,
}

# EC2 error code -> contract error. Codes from the EC2 API reference ("Error codes for the
# Amazon EC2 API"); a code not listed is an InvalidRequestError carrying the code.
ERROR_MAP: Mapping[str, type[ProvisionError]] = {
    "RequestLimitExceeded": TransientError,
    "Throttling": TransientError,
    "ThrottlingException": TransientError,
    "InternalError": TransientError,
    "InternalFailure": TransientError,
    "ServiceUnavailable": TransientError,
    "Unavailable": TransientError,
    "InsufficientInstanceCapacity": CapacityError,
    "InsufficientHostCapacity": CapacityError,
    "InsufficientReservedInstanceCapacity": CapacityError,
    "InsufficientCapacity": CapacityError,
    "InstanceLimitExceeded": QuotaError,
    "VcpuLimitExceeded": QuotaError,
    "VpcLimitExceeded": QuotaError,
    "AddressLimitExceeded": QuotaError,
    "SecurityGroupLimitExceeded": QuotaError,
    "MaxSpotInstanceCountExceeded": QuotaError,
    "AuthFailure": CredentialsError,
    "UnauthorizedOperation": CredentialsError,
    "InvalidClientTokenId": CredentialsError,
    "SignatureDoesNotMatch": CredentialsError,
    "ExpiredToken": CredentialsError,
    "OptInRequired": CredentialsError,
    "InvalidInstanceID.NotFound": NotFoundError,
    "InvalidInstanceID.Malformed": NotFoundError,
    "InvalidVpcID.NotFound": NotFoundError,
    "InvalidGroup.NotFound": NotFoundError,
    "InvalidSubnetID.NotFound": NotFoundError,
    "InvalidInternetGatewayID.NotFound": NotFoundError,
    "InvalidKeyPair.NotFound": NotFoundError,
    "InvalidKeyPair.Duplicate": InvalidRequestError,
}


def map_error(exc: Exception, *, region: str = "", zone: str = "") -> ProvisionError:
    """A botocore exception as the contract's typed error (the cloud's code kept)."""
    import botocore.exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "")) or code
        kind = ERROR_MAP.get(code, InvalidRequestError)
        return kind(f"aws: {message}", provider=NAME, region=region, zone=zone, code=code)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return CredentialsError(
            "aws: no credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run `aws configure`)", provider=NAME, region=region,
            code=type(exc).__name__)
    if isinstance(exc, bx.ProfileNotFound):
        return CredentialsError(f"aws: {exc}", provider=NAME, region=region,
                                code="ProfileNotFound")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError |
                  bx.ReadTimeoutError | bx.ConnectionClosedError):
        return TransientError(f"aws: {exc}", provider=NAME, region=region, zone=zone,
                              code=type(exc).__name__)
    return TransientError(f"aws: unexpected {type(exc).__name__}: {exc}", provider=NAME,
                          region=region, zone=zone, code=type(exc).__name__)


@dataclass(frozen=True)
class AwsSettings:
    """How to reach EC2. Credentials come the way AWS users keep them (profile, env,
    instance role); none is ever stored or logged by us."""

    profile: str | None = None
    endpoint_url: str | None = None  # tests: a moto server on loopback
    # Image name -> (owner accounts, AMI name pattern); the newest match wins.
    images: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=lambda: {
        "ubuntu-24.04": ((CANONICAL,),
                         "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"),
        "ubuntu-22.04": ((CANONICAL,),
                         "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"),
    })
    key_name: str = ""  # an existing EC2 key pair to put on the VMs ("" = none)
    root_volume_gb: int = 20
    # `barista catalog refresh aws`: ask the Price List API (us-east-1) for prices.
    pricing: bool = True
    pricing_endpoint_url: str | None = None  # tests; default: endpoint_url, else AWS's


def _tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _filters(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]


def client_token(name: str, tags: Mapping[str, str], zone: str) -> str:
    """EC2's idempotency token for one node: the same launch asked twice (a controller
    killed between the call and its journal entry) returns the same instance. The zone is
    part of it, so a failover to another zone is a new launch, not the failed one again."""
    seed = f"{tags.get(TAG_MANAGED, '')}/{tags.get(TAG_INFRA, '')}/{name}/{zone}"
    return hashlib.sha256(seed.encode()).hexdigest()[:64]


class AwsProvider:
    """EC2: VPC + subnet per zone + internet gateway + security group per infra and region."""

    def __init__(self, *, settings: AwsSettings, catalog: Catalog,
                 session_factory: Callable[[], Any] | None = None,
                 limits: ApiLimits = API_LIMITS) -> None:
        self.api_limits = limits
        self._meter = RequestMeter(limits, name=NAME)
        self._settings = settings
        self._catalog = self._shipped = catalog
        self._session_factory = session_factory
        self._clients: dict[tuple[str, str], Any] = {}
        self._amis: dict[tuple[str, str], str] = {}
        self._subnet_locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    @property
    def name(self) -> str:
        return NAME

    def catalog(self) -> Catalog:
        return self._catalog

    def shipped_catalog(self) -> Catalog:
        return self._shipped

    def use_catalog(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def fetch_catalog(self, progress: Progress) -> Fetched:
        from controller.provision.providers import aws_catalog

        async def pricing(region: str, op: str, **kwargs: Any) -> Any:
            return await self._call(region, op, service="pricing", **kwargs)

        return await aws_catalog.fetch(self._call, pricing if self._settings.pricing else None,
                                       sorted(self._shipped.regions), progress)

    # -- plumbing ----------------------------------------------------------------------

    def _client(self, region: str, service: str = "ec2") -> Any:
        c = self._clients.get((service, region))
        if c is None:
            import boto3
            from botocore.config import Config

            session = (self._session_factory() if self._session_factory is not None
                       else boto3.session.Session(profile_name=self._settings.profile))
            endpoint = self._settings.endpoint_url
            if service == "pricing":
                endpoint = self._settings.pricing_endpoint_url or endpoint
            c = session.client(
                service, region_name=region, endpoint_url=endpoint,
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                              connect_timeout=10, read_timeout=30))
            self._clients[(service, region)] = c
        return c

    async def _call(self, region: str, op: str, zone: str = "", service: str = "ec2",
                    **kwargs: Any) -> Any:
        def run() -> Any:
            return getattr(self._client(region, service), op)(**kwargs)

        try:
            return await self._meter.run(region, run)
        except ProvisionError:
            raise
        except Exception as exc:
            raise map_error(exc, region=region, zone=zone) from None

    # -- network -----------------------------------------------------------------------

    async def ensure_network(self, request: NetworkRequest) -> Network:
        """VPC, internet gateway (attached, with the default route) and security group,
        found by tag or made. What does not depend on the VPC runs beside its creation
        (the lookups, the gateway's creation); the rest runs side by side once the VPC
        exists: the critical path is lookups, VPC, attach, route (or group, rules)."""
        region = request.region
        tags = {**request.tags, TAG_INFRA: request.infra}
        sg_name = f"barista-{request.infra}"
        vpcs, igws, sgs = await gather_all(
            self._call(region, "describe_vpcs", Filters=_filters(tags)),
            # Ours, attached or not: a controller killed between the create and the
            # attach left one unattached; it is attached now rather than made again.
            self._call(region, "describe_internet_gateways", Filters=_filters(tags)),
            # By name (EC2 keeps it unique per VPC): the one in our VPC is taken below.
            self._call(region, "describe_security_groups", Filters=[
                {"Name": "group-name", "Values": [sg_name]}]))
        found_vpc = str(vpcs["Vpcs"][0]["VpcId"]) if vpcs["Vpcs"] else ""
        gateways: list[dict[str, Any]] = igws["InternetGateways"]

        async def vpc() -> str:
            if found_vpc:
                return found_vpc
            made = await self._call(region, "create_vpc", CidrBlock=request.cidr,
                                    TagSpecifications=[{"ResourceType": "vpc",
                                                        "Tags": _tags(tags)}])
            vpc_id = str(made["Vpc"]["VpcId"])
            log.info("aws %s: created VPC %s for infra %s", region, vpc_id, request.infra)
            return vpc_id

        vpc_task = asyncio.ensure_future(vpc())
        try:
            sg_id, _ = await gather_all(
                self._ensure_security_group(region, vpc_task, request, tags, sgs),
                self._ensure_gateway(region, vpc_task, found_vpc, gateways, tags))
            vpc_id = await vpc_task
        finally:
            if not vpc_task.done():
                vpc_task.cancel()
        extra = {"infra": request.infra}
        if request.ssh_public_key:
            extra["key_name"] = await self._ensure_key_pair(region, request, tags)
        return Network(id=vpc_id, region=region, cidr=request.cidr, firewall_id=sg_id,
                       extra=extra)

    async def _ensure_key_pair(self, region: str, request: NetworkRequest,
                               tags: Mapping[str, str]) -> str:
        """The infra's key pair (``barista-<infra>``), imported once with our tags; one
        of that name without our tags is someone else's and is not touched."""
        name = f"barista-{request.infra}"
        found = (await self._call(region, "describe_key_pairs", Filters=[
            {"Name": "key-name", "Values": [name]}]))["KeyPairs"]
        if found:
            have = {t["Key"]: t["Value"] for t in found[0].get("Tags", [])}
            if have.get(TAG_MANAGED) != tags.get(TAG_MANAGED):
                raise InvalidRequestError(
                    f"aws: a key pair named {name} exists in {region} and is not ours "
                    "(no barista tags); delete or rename it", provider=NAME, region=region,
                    code="InvalidKeyPair.Duplicate")
            return name
        await self._call(region, "import_key_pair", KeyName=name,
                         PublicKeyMaterial=request.ssh_public_key.strip().encode(),
                         TagSpecifications=[{"ResourceType": "key-pair",
                                             "Tags": _tags(tags)}])
        log.info("aws %s: imported key pair %s for infra %s", region, name, request.infra)
        return name

    async def _ensure_gateway(self, region: str, vpc_task: Awaitable[str], found_vpc: str,
                              gateways: list[dict[str, Any]], tags: Mapping[str, str]
                              ) -> None:
        """The VPC's internet gateway, attached, and the default route to it in the VPC's
        route tables (a route missing after a kill between the attach and the route is
        made now). A gateway is created beside the VPC's creation: it needs no VPC."""
        def attached_to(vpc_id: str) -> list[dict[str, Any]]:
            return [g for g in gateways if any(a.get("VpcId") == vpc_id
                                               for a in g.get("Attachments", []))]

        have = attached_to(found_vpc) if found_vpc else []
        free = [g for g in gateways if not g.get("Attachments")]
        if have:
            igw_id, attach = str(have[0]["InternetGatewayId"]), False
        elif free:
            igw_id, attach = str(free[0]["InternetGatewayId"]), True
        else:
            made = await self._call(region, "create_internet_gateway", TagSpecifications=[
                {"ResourceType": "internet-gateway", "Tags": _tags(tags)}])
            igw_id, attach = str(made["InternetGateway"]["InternetGatewayId"]), True
        vpc_id = await vpc_task

        async def attach_it() -> None:
            if attach:
                await self._call(region, "attach_internet_gateway", InternetGatewayId=igw_id,
                                 VpcId=vpc_id)

        _, tables = await gather_all(attach_it(), self._call(
            region, "describe_route_tables", Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]))
        todo = [t for t in tables["RouteTables"] if not any(
            r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("GatewayId") == igw_id
            for r in t.get("Routes", []))]
        await gather_all(*(self._call(region, "create_route",
                                          RouteTableId=t["RouteTableId"],
                                          DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id)
                               for t in todo))

    async def _ensure_security_group(self, region: str, vpc_task: Awaitable[str],
                                     request: NetworkRequest, tags: Mapping[str, str],
                                     found: Mapping[str, Any]) -> str:
        """The infra's security group in the VPC with its rules; a rule missing (a kill
        between the group's creation and its rules) is added now."""
        vpc_id = await vpc_task
        perms: list[dict[str, Any]] = [{
            "IpProtocol": "udp", "FromPort": request.wireguard_port,
            "ToPort": request.wireguard_port,
            "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "WireGuard overlay"}]}]
        if request.ssh_from:
            perms.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                          "IpRanges": [{"CidrIp": c, "Description": "ssh (asked for)"}
                                       for c in request.ssh_from]})
        groups = [g for g in found["SecurityGroups"] if g.get("VpcId") == vpc_id]
        if groups:
            sg_id = str(groups[0]["GroupId"])
            have = {(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"), r.get("CidrIp"))
                    for p in groups[0].get("IpPermissions", []) for r in p.get("IpRanges", [])}
            perms = [m for m in ({**p, "IpRanges": [
                r for r in p["IpRanges"] if (p["IpProtocol"], p["FromPort"], p["ToPort"],
                                             r["CidrIp"]) not in have]} for p in perms)
                if m["IpRanges"]]
        else:
            sg = await self._call(
                region, "create_security_group", GroupName=f"barista-{request.infra}",
                VpcId=vpc_id,
                Description=f"barista infra {request.infra}: WireGuard UDP "
                            f"{request.wireguard_port}",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": _tags(tags)}])
            sg_id = str(sg["GroupId"])
        if perms:
            await self._call(region, "authorize_security_group_ingress", GroupId=sg_id,
                             IpPermissions=perms)
        return sg_id

    async def _subnet(self, region: str, zone: str, network: Network) -> tuple[str, bool]:
        """The infra's subnet in ``zone`` (made on first use: a /20 per zone), and whether
        it was made now. One lookup of the VPC's subnets; one create at a time per VPC
        and zone (two batches in a zone must not make two subnets)."""
        lock = self._subnet_locks.setdefault((region, network.id, zone), asyncio.Lock())
        async with lock:
            taken = (await self._call(region, "describe_subnets", zone, Filters=[
                {"Name": "vpc-id", "Values": [network.id]}]))["Subnets"]
            here = [s for s in taken if s.get("AvailabilityZone") == zone]
            if here:
                return str(here[0]["SubnetId"]), False
            import ipaddress

            used = {ipaddress.ip_network(s["CidrBlock"]) for s in taken}
            vpc_net = ipaddress.ip_network(network.cidr)
            prefix = max(vpc_net.prefixlen, min(20, vpc_net.prefixlen + 4))
            free = next((n for n in vpc_net.subnets(new_prefix=prefix)
                         if not any(n.overlaps(u) for u in used)), None)
            if free is None:
                raise QuotaError(f"aws: VPC {network.id} ({network.cidr}) has no room for a "
                                 f"subnet in {zone}", provider=NAME, region=region, zone=zone)
            sub = await self._call(region, "create_subnet", zone, VpcId=network.id,
                                   CidrBlock=str(free), AvailabilityZone=zone,
                                   TagSpecifications=[{"ResourceType": "subnet", "Tags": _tags(
                                       {TAG_INFRA: network.extra.get("infra", "")})}])
            return str(sub["Subnet"]["SubnetId"]), True

    async def _public_ips_on_launch(self, region: str, zone: str, subnet_id: str) -> None:
        """A new subnet maps public addresses on launch (for VMs launched by hand: ours ask
        for one in the launch itself, so this runs beside the launches)."""
        await self._call(region, "modify_subnet_attribute", zone, SubnetId=subnet_id,
                         MapPublicIpOnLaunch={"Value": True})

    async def _ami(self, region: str, image: str) -> str:
        if image.startswith("ami-"):
            return image
        key = (region, image)
        if key in self._amis:
            return self._amis[key]
        known = self._settings.images.get(image)
        if known is None:
            raise InvalidRequestError(
                f"aws: unknown image {image!r} (known: {', '.join(sorted(self._settings.images))}"
                ", or give an AMI id)", provider=NAME, region=region)
        owners, pattern = known
        found = (await self._call(region, "describe_images", Owners=list(owners), Filters=[
            {"Name": "name", "Values": [pattern]}, {"Name": "state", "Values": ["available"]}]
        ))["Images"]
        if not found:
            raise InvalidRequestError(f"aws: no AMI named {pattern!r} from {list(owners)} in "
                                      f"{region}", provider=NAME, region=region)
        newest = max(found, key=lambda i: str(i.get("CreationDate", "")))
        self._amis[key] = str(newest["ImageId"])
        return self._amis[key]

    # -- instances ---------------------------------------------------------------------

    async def run_instances(self, placement: Placement, network: Network,
                            requests: Sequence[LaunchRequest]) -> list[Instance]:
        region, zone = placement.region, placement.zone or f"{placement.region}a"
        if not requests:
            return []
        async def resolve() -> dict[str, str]:
            images = sorted({r.image for r in requests})
            ids = await gather_all(*(self._ami(region, i) for i in images))
            return dict(zip(images, ids, strict=True))

        # What exists, the zone's subnet and the AMIs: asked side by side (the subnet and
        # the AMI are needed by any launch; when every name exists they are only looked up).
        found, (subnet, fresh), amis = await gather_all(
            self._by_names(region, [r.name for r in requests]),
            self._subnet(region, zone, network), resolve())
        existing = {i.name: i for i in found if not i.state.gone}
        out = [existing[r.name] for r in requests if r.name in existing]
        todo = [r for r in requests if r.name not in existing]
        if fresh and not todo:
            await self._public_ips_on_launch(region, zone, subnet)
        if not todo:
            return out

        async def launch(req: LaunchRequest) -> list[Instance]:
            # One call per VM: the user-data (its join token) and the client token are
            # per node. The calls run side by side, within the region's limits.
            kwargs: dict[str, Any] = {
                "ImageId": amis[req.image], "InstanceType": req.size, "MinCount": 1,
                "MaxCount": 1, "UserData": req.user_data,
                "ClientToken": client_token(req.name, req.tags, zone),
                "Placement": {"AvailabilityZone": zone},
                "NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": subnet,
                                       "Groups": [network.firewall_id],
                                       "AssociatePublicIpAddress": True}],
                "TagSpecifications": [
                    {"ResourceType": "instance",
                     "Tags": _tags({**req.tags, TAG_NODE: req.name, "Name": req.name})},
                    {"ResourceType": "volume", "Tags": _tags({**req.tags, TAG_NODE: req.name})},
                ],
                "MetadataOptions": {"HttpTokens": "required"},  # IMDSv2 only
            }
            key_name = network.extra.get("key_name") or self._settings.key_name
            if key_name:
                kwargs["KeyName"] = key_name
            resp = await self._call(region, "run_instances", zone, **kwargs)
            return [self._instance(raw, region) for raw in resp["Instances"]]

        async def attribute() -> list[Instance]:
            if fresh:
                await self._public_ips_on_launch(region, zone, subnet)
            return []

        return out + gather_launches(await asyncio.gather(
            *(launch(r) for r in todo), attribute(), return_exceptions=True))

    async def _by_names(self, region: str, names: Sequence[str]) -> list[Instance]:
        return await self._describe(region, [{"Name": f"tag:{TAG_NODE}", "Values": list(names)}])

    async def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[Instance]:
        out: list[Instance] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters, "MaxResults": 1000}
            if token:
                kwargs["NextToken"] = token
            resp = await self._call(region, "describe_instances", **kwargs)
            for res in resp.get("Reservations", []):
                out.extend(self._instance(raw, region) for raw in res.get("Instances", []))
            token = resp.get("NextToken")
            if not token:
                return out

    def _instance(self, raw: Mapping[str, Any], region: str) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        zone = str(raw.get("Placement", {}).get("AvailabilityZone", ""))
        launched: Any = raw.get("LaunchTime")
        return Instance(
            id=str(raw["InstanceId"]),
            name=tags.get(TAG_NODE, ""),
            placement=Placement(NAME, region, zone),
            state=STATE_MAP.get(str(raw.get("State", {}).get("Name", "")),
                                InstanceState.UNKNOWN),
            size=str(raw.get("InstanceType", "")),
            image=str(raw.get("ImageId", "")),
            private_ip=str(raw.get("PrivateIpAddress", "") or ""),
            public_ip=str(raw.get("PublicIpAddress", "") or ""),
            tags=tags,
            launched_at=float(launched.timestamp()) if launched is not None else 0.0,
            extra={"vpc_id": str(raw.get("VpcId", "")),
                   "subnet_id": str(raw.get("SubnetId", "")),
                   "key_name": str(raw.get("KeyName", "") or "")},
        )

    async def query_instances(self, tags: Mapping[str, str], *,
                              region: str | None = None) -> list[Instance]:
        regions = [region] if region else sorted(self._catalog.regions)
        out: list[Instance] = []
        for r in regions:
            out.extend(await self._describe(r, _filters(tags)))
        return out

    async def stop_instances(self, region: str, ids: Sequence[str]) -> None:
        if ids:
            await self._call(region, "stop_instances", InstanceIds=list(ids))

    async def start_instances(self, region: str, ids: Sequence[str]) -> None:
        if ids:
            await self._call(region, "start_instances", InstanceIds=list(ids))

    async def reboot_instances(self, region: str, ids: Sequence[str]) -> None:
        if ids:
            await self._call(region, "reboot_instances", InstanceIds=list(ids))

    async def terminate_instances(self, region: str, ids: Sequence[str]) -> None:
        if ids:
            await self._call(region, "terminate_instances", InstanceIds=list(ids))

    async def cleanup(self, tags: Mapping[str, str], *, region: str) -> None:
        """Remove the VPCs carrying ``tags`` (with their security groups, subnets and
        gateways) once no live VM is left in them; a VPC still in use is kept."""
        vpcs = (await self._call(region, "describe_vpcs", Filters=_filters(tags)))["Vpcs"]
        for vpc in vpcs:
            vpc_id = vpc["VpcId"]
            live = [i for i in await self._describe(
                region, [{"Name": "vpc-id", "Values": [vpc_id]}]) if not i.state.gone]
            if live:
                log.warning("aws %s: VPC %s still has %d VM(s); kept", region, vpc_id,
                            len(live))
                continue
            vf = [{"Name": "vpc-id", "Values": [vpc_id]}]
            for sg in (await self._call(region, "describe_security_groups",
                                        Filters=vf))["SecurityGroups"]:
                if sg.get("GroupName") != "default":
                    await self._gone_ok(region, "delete_security_group", GroupId=sg["GroupId"])
            for sub in (await self._call(region, "describe_subnets", Filters=vf))["Subnets"]:
                await self._gone_ok(region, "delete_subnet", SubnetId=sub["SubnetId"])
            for igw in (await self._call(region, "describe_internet_gateways", Filters=[
                    {"Name": "attachment.vpc-id", "Values": [vpc_id]}]))["InternetGateways"]:
                gid = igw["InternetGatewayId"]
                await self._gone_ok(region, "detach_internet_gateway", InternetGatewayId=gid,
                                    VpcId=vpc_id)
                await self._gone_ok(region, "delete_internet_gateway", InternetGatewayId=gid)
            await self._gone_ok(region, "delete_vpc", VpcId=vpc_id)
            log.info("aws %s: removed VPC %s", region, vpc_id)
        # A gateway made but never attached (a controller killed in between).
        for igw in (await self._call(region, "describe_internet_gateways",
                                     Filters=_filters(tags)))["InternetGateways"]:
            if not igw.get("Attachments"):
                await self._gone_ok(region, "delete_internet_gateway",
                                    InternetGatewayId=igw["InternetGatewayId"])
        await self._cleanup_key_pairs(tags, region=region)

    async def _cleanup_key_pairs(self, tags: Mapping[str, str], *, region: str) -> None:
        """Key pairs carrying ``tags``, once no live VM of ours still names them."""
        pairs = (await self._call(region, "describe_key_pairs",
                                  Filters=_filters(tags)))["KeyPairs"]
        if not pairs:
            return
        in_use = {i.extra.get("key_name", "") for i in await self._describe(
            region, _filters({TAG_MANAGED: tags[TAG_MANAGED]} if TAG_MANAGED in tags else tags))
            if not i.state.gone}
        for kp in pairs:
            if kp["KeyName"] in in_use:
                log.warning("aws %s: key pair %s still used by a VM; kept", region,
                            kp["KeyName"])
                continue
            await self._gone_ok(region, "delete_key_pair", KeyName=kp["KeyName"])
            log.info("aws %s: removed key pair %s", region, kp["KeyName"])

    async def _gone_ok(self, region: str, op: str, **kwargs: Any) -> None:
        try:
            await self._call(region, op, **kwargs)
        except NotFoundError:
            pass


# -- catalog ---------------------------------------------------------------------------

_REGIONS = (
    Region("us-east-1", 38.13, -78.45, ("us-east-1a", "us-east-1b", "us-east-1c"),
           "US East (N. Virginia)"),
    Region("us-west-2", 45.84, -119.70, ("us-west-2a", "us-west-2b", "us-west-2c"),
           "US West (Oregon)"),
    Region("eu-west-1", 53.35, -6.26, ("eu-west-1a", "eu-west-1b", "eu-west-1c"),
           "Europe (Ireland)"),
    Region("eu-central-1", 50.11, 8.68, ("eu-central-1a", "eu-central-1b", "eu-central-1c"),
           "Europe (Frankfurt)"),
    Region("ap-northeast-2", 37.56, 126.98, ("ap-northeast-2a", "ap-northeast-2b",
                                             "ap-northeast-2c"), "Asia Pacific (Seoul)"),
    Region("ap-southeast-1", 1.37, 103.80, ("ap-southeast-1a", "ap-southeast-1b",
                                            "ap-southeast-1c"), "Asia Pacific (Singapore)"),
)

# Prices: controller/provision/providers/prices.py (data, with its sources).
_SIZES = (
    Size("t3.micro", 2, 1.0), Size("t3.small", 2, 2.0), Size("t3.medium", 2, 4.0),
    Size("t3.large", 2, 8.0), Size("m6i.large", 2, 8.0), Size("c6i.large", 2, 4.0),
    Size("t4g.small", 2, 2.0, arch="arm64"),
)


def default_catalog() -> Catalog:
    from controller.provision.providers.prices import prices

    sizes = {s.name: Size(s.name, s.vcpus, s.memory_gb, prices(NAME, s.name), s.arch)
             for s in _SIZES}
    return Catalog(
        provider=NAME,
        regions={r.name: r for r in _REGIONS},
        sizes=sizes,
        # The id is the key of AwsSettings.images (an owner + name pattern resolved to the
        # newest AMI per region); an "ami-..." id is taken as it is.
        images={"ubuntu-24.04": Image("ubuntu-24.04", "ubuntu-24.04"),
                "ubuntu-22.04": Image("ubuntu-22.04", "ubuntu-22.04")},
    )
