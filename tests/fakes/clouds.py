"""The three SDK clouds on loopback, with their real APIs' latency: EC2 = moto behind a
latency shim, Compute Engine = ``FakeGce``, ARM = ``FakeArm`` (HTTPS), and the real
providers (boto3, google-cloud-compute, azure-mgmt-*) pointed at them.

What the figures model (``CloudTimes``): every request waits ``api`` seconds (uniform);
GCE operations are DONE ``gcp_op`` seconds after they were accepted (``operations.wait``
blocks until then); ARM long-running operations finish after ``azure_lro`` seconds and say
``Retry-After``; a VM's create operation at ARM ends when the VM has booted. ``on_create``
hears of every VM create request (provider, node name, user-data) when it arrives, which is
when a bench or test starts that VM's boot. Requests are counted by API at the clouds;
what the fakes drew (each request's latency, each operation's time) is kept, from which
``Clouds.prerequisites`` says how long a cloud's network setup had to take.
"""

from __future__ import annotations

import base64
import contextlib
import random
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.azure import FakeArm
from tests.fakes.gcp import FakeGce
from tests.fakes.http import Request
from tests.fakes.moto import MOTO_OWNER, UBUNTU_NOBLE, MotoServer

REGIONS = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus"}

# provider, node name, user-data (the rendered cloud-init) -> the boot time of that VM
OnCreate = Callable[[str, str, str], float]


@dataclass(frozen=True)
class CloudTimes:
    api: tuple[float, float] = (0.1, 0.3)
    gcp_op: tuple[float, float] = (2.0, 6.0)
    azure_lro: tuple[float, float] = (2.0, 6.0)
    azure_retry_after: int = 2
    create: tuple[float, float] | None = None  # a VM create request's own (None: api)


FAST = CloudTimes(api=(0.0, 0.01), gcp_op=(0.0, 0.05), azure_lro=(0.0, 0.05),
                  azure_retry_after=0)


class StaticToken:
    """A TokenCredential for the ARM fake (real clouds: DefaultAzureCredential)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken("fake-arm-token", int(time.time()) + 3600)


def _aws_session() -> Any:
    import boto3

    return boto3.session.Session(aws_access_key_id="testing",
                                 aws_secret_access_key="testing")


@dataclass
class Clouds:
    moto: MotoServer
    gce: FakeGce
    arm: FakeArm
    times: CloudTimes
    boots: dict[str, float] = field(default_factory=dict)  # node name -> boot time
    # Every request's latency as drawn, in the order drawn: (cloud, API, seconds).
    drawn: list[tuple[str, str, float]] = field(default_factory=list)

    def providers(self, *, azure_poll: float = 2.0) -> dict[str, Any]:
        """Fresh provider instances (a restarted controller makes new ones)."""
        from controller.provision.providers import aws, azure, gcp

        return {
            "aws": aws.AwsProvider(
                settings=aws.AwsSettings(endpoint_url=self.moto.url, images={
                    "ubuntu-24.04": ((MOTO_OWNER,),
                                     "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-*")}),
                catalog=aws.default_catalog(), session_factory=_aws_session),
            "gcp": gcp.GcpProvider(
                settings=gcp.GcpSettings(project=self.gce.state.project,
                                         api_endpoint=self.gce.url, anonymous=True),
                catalog=gcp.default_catalog()),
            "azure": azure.AzureProvider(
                settings=azure.AzureSettings(
                    subscription_id=self.arm.state.subscription, base_url=self.arm.url,
                    connection_verify=str(self.arm.ca),
                    polling_interval=0 if not self.times.azure_retry_after else None,
                    status_poll=azure_poll),
                catalog=azure.default_catalog(), credential_factory=StaticToken),
        }

    def calls(self) -> dict[str, Counter[str]]:
        """Requests received so far, by cloud and API."""
        with self.gce._api.lock:
            gce = Counter(gcp_api(m, p) for m, p, _q, _b in self.gce.state.requests)
        with self.arm.api.lock:
            arm = Counter(arm_api(m, p) for m, p, _q, _b in self.arm.state.requests)
        return {"aws": Counter(self.moto.calls), "gcp": gce, "azure": arm}

    def before_last_create(self) -> dict[str, int]:
        """Per cloud, the requests it received up to and including its last VM create."""
        def upto(seq: list[str], create: str) -> int:
            idx = [i for i, api in enumerate(seq) if api == create]
            return idx[-1] + 1 if idx else 0

        with self.gce._api.lock:
            gce = [gcp_api(m, p) for m, p, _q, _b in self.gce.state.requests]
        with self.arm.api.lock:
            arm = [arm_api(m, p) for m, p, _q, _b in self.arm.state.requests]
        return {"aws": upto(list(self.moto.log), "RunInstances"),
                "gcp": upto(gce, "instances.insert"), "azure": upto(arm, "virtualmachines PUT")}

    def prerequisites(self, infra: str) -> dict[str, dict[str, float]]:
        """Per cloud, what a perfect engine must wait for before the first VM create of
        ``infra`` can be sent: the minimal serial chain of the requests and operations the
        cloud requires first, each as long as the fakes drew it in this run (the request's
        latency, then its operation until done). Not in it: polling (an operation counts
        as seen the moment it is done), lookups, the engine's own time. ``chain_s`` is
        the chain; the other keys are its links.

        - gcp: network insert + its operation, then the subnet's (GCE refuses a subnet
          of a network not done, and an instance in a subnet not done: resourceNotReady);
          the firewall rules are not required (instances match them by tag).
        - azure: the resource group, then the NSG and the VNet side by side, each PUT +
          its operation (a VM's NIC refers to both; ARM refuses a reference to a
          resource not yet provisioned).
        - aws: CreateVpc, then CreateSubnet and CreateSecurityGroup side by side, beside
          the AMI lookup (DescribeImages); EC2's calls are synchronous.
        """
        def first(cloud: str, api: str) -> float:
            return next((sec for c, a, sec in self.drawn if c == cloud and a == api), 0.0)

        net = f"barista-{infra}"
        with self.gce._api.lock:
            gops = list(self.gce.state.operations.values())
        with self.arm.api.lock:
            aops = list(self.arm.state.operations.values())

        def gce_op(suffix: str) -> float:
            return next((op["_done_at"] - op["_accepted_at"] for op in gops
                         if op["operationType"] == "insert" and "_done_at" in op
                         and op["targetLink"].endswith(suffix)), 0.0)

        def arm_op(kind: str) -> float:
            rg = f"barista-{infra}-{REGIONS['azure']}".lower()
            return next((op["done_at"] - op["accepted_at"] for op in aops
                         if op["action"] == "provision" and op["target"][:2] == (rg, kind)),
                        0.0)

        gcp = {"network_s": first("gcp", "networks.insert") + gce_op(f"/global/networks/{net}"),
               "subnet_s": first("gcp", "subnetworks.insert")
               + gce_op(f"/subnetworks/{net}-{REGIONS['gcp']}")}
        gcp["chain_s"] = gcp["network_s"] + gcp["subnet_s"]
        azure = {"group_s": first("azure", "resourceGroups PUT"),
                 "nsg_s": first("azure", "networksecuritygroups PUT")
                 + arm_op("networksecuritygroups"),
                 "vnet_s": first("azure", "virtualnetworks PUT") + arm_op("virtualnetworks")}
        azure["chain_s"] = azure["group_s"] + max(azure["nsg_s"], azure["vnet_s"])
        aws = {"image_s": first("aws", "DescribeImages"), "vpc_s": first("aws", "CreateVpc"),
               "subnet_s": first("aws", "CreateSubnet"),
               "group_s": first("aws", "CreateSecurityGroup")}
        aws["chain_s"] = max(aws["image_s"],
                             aws["vpc_s"] + max(aws["subnet_s"], aws["group_s"]))
        return {"aws": aws, "gcp": gcp, "azure": azure}

    def live_vms(self, infra: str) -> dict[str, Counter[str]]:
        """Per cloud, how many live VMs of ``infra`` carry each node name."""
        ec2 = _aws_session().client("ec2", region_name=REGIONS["aws"],
                                    endpoint_url=self.moto.url)
        aws: Counter[str] = Counter()
        for res in ec2.describe_instances(Filters=[
                {"Name": "tag:barista-infra", "Values": [infra]}])["Reservations"]:
            for i in res["Instances"]:
                if i["State"]["Name"] not in ("terminated", "shutting-down"):
                    aws.update(t["Value"] for t in i.get("Tags", [])
                               if t["Key"] == "barista-node")
        with self.gce._api.lock:
            gcp = Counter(i["labels"].get("barista-node", "") for i in
                          self.gce.state.instances.values()
                          if i.get("labels", {}).get("barista-infra") == infra)
        with self.arm.api.lock:
            azure = Counter(r["tags"].get("barista-node", "") for r in
                            self.arm.state.of_type("virtualmachines")
                            if r.get("tags", {}).get("barista-infra") == infra)
        return {"aws": aws, "gcp": gcp, "azure": azure}

    def leftovers(self, infra: str) -> dict[str, list[str]]:
        """What is left at each cloud that carries (or is named for) ``infra``."""
        ec2 = _aws_session().client("ec2", region_name=REGIONS["aws"],
                                    endpoint_url=self.moto.url)
        tagged = [{"Name": "tag:barista-infra", "Values": [infra]}]
        aws = [v["VpcId"] for v in ec2.describe_vpcs(Filters=tagged)["Vpcs"]]
        aws += [s["SubnetId"] for s in ec2.describe_subnets(Filters=tagged)["Subnets"]]
        aws += [g["InternetGatewayId"] for g in
                ec2.describe_internet_gateways(Filters=tagged)["InternetGateways"]]
        aws += [g["GroupId"] for g in ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [f"barista-{infra}"]}])["SecurityGroups"]]
        for res in ec2.describe_instances(Filters=tagged)["Reservations"]:
            aws += [i["InstanceId"] for i in res["Instances"]
                    if i["State"]["Name"] != "terminated"]
        g = self.gce.state
        with self.gce._api.lock:
            gcp = ([n for n in g.networks if infra in n] + [n for _r, n in g.subnets
                                                            if infra in n]
                   + [n for n in g.firewalls if infra in n]
                   + [n for (_z, n), i in g.instances.items()
                      if i.get("labels", {}).get("barista-infra") == infra])
        a = self.arm.state
        with self.arm.api.lock:
            azure = ([x["name"] for x in a.groups.values() if infra in x["name"]]
                     + [r["id"] for (rg, _t, _n), r in a.resources.items() if infra in rg])
        return {"aws": aws, "gcp": gcp, "azure": azure}


def gcp_api(method: str, path: str) -> str:
    """``POST /compute/v1/projects/p/zones/z/instances`` -> ``instances.insert``."""
    parts = path.strip("/").split("/")[4:]  # after compute/v1/projects/<p>
    if not parts:
        return f"? {method}"
    if parts[0] == "aggregated" and len(parts) > 1:
        return f"{parts[1]}.aggregatedList"
    if parts[-1] == "wait":
        return "operations.wait"
    if parts and parts[0] in ("zones", "regions", "global"):
        parts = parts[1:] if parts[0] == "global" else parts[2:]
    coll = parts[0] if parts else "?"
    if len(parts) == 1:
        return f"{coll}.{'insert' if method == 'POST' else 'list'}"
    if len(parts) == 3:
        return f"{coll}.{parts[2]}"
    return f"{coll}.{ {'GET': 'get', 'DELETE': 'delete'}.get(method, method.lower()) }"


_ARM_KIND = re.compile(r"/providers/microsoft\.[a-z]+/([a-z]+)(/[^/]+)?(/[a-z]+)?$")


def arm_api(method: str, path: str) -> str:
    """``PUT .../providers/Microsoft.Compute/virtualMachines/vm1`` -> ``virtualMachines PUT``."""
    low = path.lower()
    if "/operations/" in low:
        return "operations GET"
    m = _ARM_KIND.search(low)
    if m is None:
        return f"resourceGroups {method}"
    kind, name, action = m.group(1), m.group(2), m.group(3)
    if action:
        return f"{kind}/{action[1:]} {method}"
    return f"{kind} {'list' if name is None and method == 'GET' else method}"


def _between(rng: random.Random, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return rng.uniform(lo, max(lo, hi))


@contextlib.contextmanager
def sdk_clouds(tmp: Path, *, times: CloudTimes = FAST, on_create: OnCreate | None = None,
               seed: int = 7) -> Iterator[Clouds]:
    """moto, FakeGce and FakeArm with ``times``; ``on_create`` hears each VM create."""
    rng = random.Random(seed)
    lock = threading.Lock()
    boots: dict[str, float] = {}
    drawn: list[tuple[str, str, float]] = []

    def wait(cloud: str, api: str, create: bool = False) -> float:
        with lock:
            sec = _between(rng, times.create if create and times.create else times.api)
            drawn.append((cloud, api, sec))
            return sec

    def created(provider: str, name: str, user_data: str) -> None:
        if on_create is None or not name:
            return
        with lock:
            if name in boots:
                return  # a repeated create (client token, request id): the same VM
            boots[name] = 0.0
        boots[name] = on_create(provider, name, user_data)

    def aws_latency(action: str, fields: Mapping[str, list[str]]) -> float:
        if action == "RunInstances":
            tags = {fields.get(f"TagSpecification.1.Tag.{i}.Key", [""])[0]:
                    fields.get(f"TagSpecification.1.Tag.{i}.Value", [""])[0]
                    for i in range(1, 20)}
            raw = fields.get("UserData", [""])[0]
            created("aws", tags.get("barista-node", ""),
                    base64.b64decode(raw).decode() if raw else "")
            return wait("aws", action, create=True)
        return wait("aws", action)

    def gcp_latency(req: Request) -> float:
        if req.method == "POST" and req.path.endswith("/instances") and req.body:
            items = {i["key"]: i["value"] for i in req.body.get("metadata", {})
                     .get("items", [])}
            created("gcp", req.body.get("labels", {}).get("barista-node", ""),
                    items.get("user-data", ""))
            return wait("gcp", "instances.insert", create=True)
        return wait("gcp", gcp_api(req.method, req.path))

    def arm_latency(req: Request) -> float:
        if req.method == "PUT" and "/virtualmachines/" in req.path.lower() and req.body:
            osp = req.body.get("properties", {}).get("osProfile", {})
            created("azure", req.body.get("tags", {}).get("barista-node", ""),
                    base64.b64decode(osp.get("customData", "")).decode())
            return wait("azure", "virtualmachines PUT", create=True)
        return wait("azure", arm_api(req.method, req.path))

    def gcp_op(kind: str, target: str) -> float:
        with lock:
            return _between(rng, times.gcp_op)

    def arm_lro(action: str, name: str) -> float:
        if action == "create_vm" and name in boots:
            return boots[name]  # the create ends when the VM has booted
        with lock:
            return _between(rng, times.azure_lro)

    with MotoServer(latency=aws_latency) as moto, FakeGce(latency=gcp_latency) as gce, \
            FakeArm(tmp, latency=arm_latency) as arm:
        gce.state.op_delay = gcp_op
        arm.state.lro_delay = arm_lro
        arm.state.retry_after = times.azure_retry_after
        ec2 = _aws_session().client("ec2", region_name=REGIONS["aws"], endpoint_url=moto.url)
        ec2.register_image(Name=UBUNTU_NOBLE, Architecture="x86_64",
                           RootDeviceName="/dev/sda1", VirtualizationType="hvm")
        moto.calls.clear()
        moto.log.clear()
        drawn.clear()  # (the image registered above)
        yield Clouds(moto, gce, arm, times, boots, drawn)
        with contextlib.suppress(Exception):
            urllib.request.urlopen(urllib.request.Request(
                moto.url + "/moto-api/reset", method="POST", data=b""), timeout=10).close()


class AgentBooter:
    """``on_create`` that boots each VM as a real agent runtime in this process: after the
    VM's boot time (``boot`` +- ``jitter``, uniform, as the sim's) an ``Agent`` starts
    with the boot config read back out of the VM's user-data, and enrolls."""

    def __init__(self, loop: Any, state_dir: Path, *, boot: float = 20.0,
                 jitter: float = 5.0, seed: int = 11,
                 fixed: Mapping[str, float] | None = None) -> None:
        self._loop = loop
        self._dir = state_dir
        self._boot, self._jitter = boot, jitter
        self._fixed = dict(fixed or {})  # node name -> its boot time (else drawn)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.agents: list[Any] = []
        self.booted_at: dict[str, float] = {}  # node name -> time.time() it booted
        self.created_at: dict[str, float] = {}  # node name -> time.time() of its create
        self._tasks: set[Any] = set()

    def __call__(self, provider: str, name: str, user_data: str) -> float:
        with self._lock:
            boot_s = max(0.0, self._boot + self._rng.uniform(-self._jitter, self._jitter))
            boot_s = self._fixed.get(name, boot_s)
            self.created_at[name] = time.time()
        self._loop.call_soon_threadsafe(self._spawn, name, user_data, boot_s)
        return boot_s

    def _spawn(self, name: str, user_data: str, boot_s: float) -> None:
        import asyncio

        task = asyncio.ensure_future(self._start(name, user_data, boot_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, name: str, user_data: str, boot_s: float) -> None:
        import asyncio

        from agent.config import AgentConfig
        from agent.runtime import Agent
        from controller.provision.bootstrap import read_user_data

        await asyncio.sleep(boot_s)
        cfg = read_user_data(user_data)
        self.booted_at[name] = time.time()
        agent = Agent(config=AgentConfig(
            nats_urls=cfg.nats_urls, token=cfg.join_token, state_dir=self._dir / name,
            hostname=cfg.hostname or cfg.node_name, collectors=[], metrics_interval=3600.0,
            buffer_batches=4))
        await agent.start()
        self.agents.append(agent)

    async def stop(self) -> None:
        import asyncio

        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        self.agents.clear()
