"""A fake of the Compute Engine REST API (v1), for the real google-cloud-compute SDK over HTTP.

It follows the documented request and response shapes (resources, Operation with numeric
id, the JSON error body with ``errors[].reason``, aggregated lists keyed by scope, the
``(labels.k = "v")`` filter syntax, ``requestId`` idempotency) for the calls our provider
makes, validates what real GCE validates that matters to us (names, machine types, known
network/subnet, none referred to before its insert operation is DONE: resourceNotReady),
and records every request so tests assert on what the SDK sent.
Failures are injected per zone/region (capacity, quota), per firewall rule (its insert
operation fails) and as throttling.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakes import gcp_catalog
from tests.fakes.http import JsonServer, Latency, Reply, Request

BASE = "https://www.googleapis.com/compute/v1"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
MACHINE_TYPES = {"e2-micro", "e2-small", "e2-medium", "e2-standard-2", "n2-standard-2",
                 "t2a-standard-1"}
WAIT_MAX = 120.0
WAIT_RE = re.compile(r"/operations/([^/]+)/wait$")
FILTER_RE = re.compile(r'\(\s*([a-zA-Z0-9_.-]+)\s*=\s*"([^"]*)"\s*\)')


class HttpError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass
class GceState:
    project: str = "barista-test"
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    subnets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    firewalls: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_request_id: dict[str, str] = field(default_factory=dict)
    # Every request: (method, path, query, parsed JSON body or None).
    requests: list[tuple[str, str, dict[str, list[str]], Any]] = field(default_factory=list)
    # Injected failures.
    capacity_exhausted: set[str] = field(default_factory=set)  # zones
    quota_exceeded: set[str] = field(default_factory=set)  # regions
    throttle_next: int = 0  # the next N requests get 403 rateLimitExceeded
    # firewall name -> the error its insert operation ends with (the rule is not made).
    firewall_errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    catalog: gcp_catalog.CatalogState = field(default_factory=gcp_catalog.CatalogState)
    # (operationType, target kind like "instances") -> seconds until the operation is
    # DONE; None: done when first waited on. ``operations.wait`` blocks until then, or
    # answers RUNNING after WAIT_MAX (GCE: "approaching the 2 minute deadline").
    op_delay: Callable[[str, str], float] | None = None
    # selfLink of a network or subnet -> the name of the operation making it: GCE refuses
    # a resource referring to one whose insert is not DONE yet (400 resourceNotReady).
    making: dict[str, str] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(5_000_000_001))
    ips: Iterator[int] = field(default_factory=lambda: itertools.count(10))

    def sent(self, method: str, contains: str) -> list[Any]:
        """Bodies of the requests with this method whose path contains ``contains``."""
        return [b for m, p, _q, b in self.requests if m == method and contains in p]


def _matches(obj: dict[str, Any], filt: str) -> bool:
    for key, value in FILTER_RE.findall(filt or ""):
        if key.startswith("labels."):
            if obj.get("labels", {}).get(key[7:]) != value:
                return False
        elif str(obj.get(key, "")) != value:
            return False
    return True


class GceApi:
    """The routing and the resource logic (no HTTP in here)."""

    def __init__(self, state: GceState) -> None:
        self.s = state
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        m = WAIT_RE.search(path)
        if m is not None:  # a wait blocks (outside the lock) until its operation is done
            with self.lock:
                op = self.s.operations.get(m.group(1))
                due = op.get("_done_at", 0.0) if op is not None else 0.0
            time.sleep(max(0.0, min(due - time.monotonic(), WAIT_MAX)))
        with self.lock:
            self.s.requests.append((method, path, query, body))
            if self.s.throttle_next > 0:
                self.s.throttle_next -= 1
                raise HttpError(403, "rateLimitExceeded", "Rate Limit Exceeded")
            prefix = f"/compute/v1/projects/{self.s.project}/"
            if not path.startswith(prefix):
                raise HttpError(404, "notFound", f"The resource '{path}' was not found")
            parts = path[len(prefix):].strip("/").split("/")
            return self._route(method, parts, query, body)

    def _route(self, method: str, parts: list[str], q: dict[str, list[str]], body: Any) -> Any:
        filt = (q.get("filter") or [""])[0]
        rid = (q.get("requestId") or [""])[0]
        match parts:
            case ["global", "operations", op, "wait"]:
                return self._wait(op)
            case ["regions", _r, "operations", op, "wait"] | ["zones", _r, "operations", op,
                                                              "wait"]:
                return self._wait(op)
            case ["global", "networks"] if method == "POST":
                return self._insert_network(body, rid)
            case ["global", "networks", name] if method == "GET":
                return self._get(self.s.networks, name, f"global/networks/{name}")
            case ["global", "networks", name] if method == "DELETE":
                return self._delete_network(name)
            case ["regions", region, "subnetworks"] if method == "POST":
                return self._insert_subnet(region, body, rid)
            case ["regions", region, "subnetworks", name] if method == "GET":
                return self._get(self.s.subnets, (region, name),
                                 f"regions/{region}/subnetworks/{name}")
            case ["regions", region, "subnetworks", name] if method == "DELETE":
                return self._delete_subnet(region, name)
            case ["aggregated", "subnetworks"]:
                return self._aggregated("subnetworks", self.s.subnets, filt, "regions")
            case ["global", "firewalls"] if method == "POST":
                return self._insert_firewall(body, rid)
            case ["global", "firewalls", name] if method == "GET":
                return self._get(self.s.firewalls, name, f"global/firewalls/{name}")
            case ["global", "firewalls", name] if method == "DELETE":
                if self.s.firewalls.pop(name, None) is None:
                    raise HttpError(404, "notFound", f"firewall '{name}' was not found")
                return self._op("delete", f"global/firewalls/{name}")
            case ["zones", zone, "instances"] if method == "POST":
                return self._insert_instance(zone, body, rid)
            case ["zones", zone, "instances"] if method == "GET":
                return {"kind": "compute#instanceList", "items": [
                    i for (z, _n), i in sorted(self.s.instances.items())
                    if z == zone and _matches(i, filt)]}
            case ["zones", zone, "instances", name] if method == "GET":
                return self._get(self.s.instances, (zone, name),
                                 f"zones/{zone}/instances/{name}")
            case ["zones", zone, "instances", name] if method == "DELETE":
                if self.s.instances.pop((zone, name), None) is None:
                    raise HttpError(404, "notFound", f"instance '{name}' was not found")
                return self._op("delete", f"zones/{zone}/instances/{name}", zone=zone)
            case ["zones", zone, "instances", name, verb] if method == "POST":
                return self._instance_verb(zone, name, verb)
            case ["aggregated", "instances"]:
                return self._aggregated("instances", self.s.instances, filt, "zones")
        try:
            found = gcp_catalog.route(self.s.catalog, self.s.project, method, parts)
        except gcp_catalog.CatalogError as exc:
            raise HttpError(exc.code, exc.reason, exc.message) from None
        if found is not None:
            return found
        raise HttpError(404, "notFound", f"no such API: {method} {'/'.join(parts)}")

    # -- helpers -----------------------------------------------------------------------

    def _url(self, rel: str) -> str:
        return f"{BASE}/projects/{self.s.project}/{rel}"

    def _get(self, table: dict[Any, dict[str, Any]], key: Any, rel: str) -> Any:
        obj = table.get(key)
        if obj is None:
            raise HttpError(404, "notFound", f"The resource '{self._url(rel)}' was not found")
        return obj

    def _op(self, kind: str, target: str, *, zone: str = "", region: str = "",
            error: tuple[str, str] | None = None) -> dict[str, Any]:
        oid = str(next(self.s.ids))
        op: dict[str, Any] = {"kind": "compute#operation", "id": oid,
                              "name": f"operation-{oid}", "operationType": kind,
                              "targetLink": self._url(target), "status": "RUNNING",
                              "progress": 0, "insertTime": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "selfLink": self._url(f"global/operations/operation-{oid}")}
        if zone:
            op["zone"] = self._url(f"zones/{zone}")
        if region:
            op["region"] = self._url(f"regions/{region}")
        if error:
            op["_error"] = {"errors": [{"code": error[0], "message": error[1]}]}
        op["_accepted_at"] = time.monotonic()
        if self.s.op_delay is not None:
            op["_done_at"] = op["_accepted_at"] + self.s.op_delay(kind, target.split("/")[-2])
        self.s.operations[op["name"]] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _wait(self, name: str) -> Any:
        op = self.s.operations.get(name)
        if op is None:
            raise HttpError(404, "notFound", f"operation '{name}' was not found")
        if op.get("_done_at", 0.0) > time.monotonic():
            return {k: v for k, v in op.items() if not k.startswith("_")}  # still RUNNING
        op["status"], op["progress"] = "DONE", 100
        if "_error" in op:
            op["error"] = op["_error"]
            op["httpErrorStatusCode"] = 503
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _dedupe(self, rid: str) -> Any:
        if rid and rid in self.s.by_request_id:
            op = self.s.operations[self.s.by_request_id[rid]]
            return {k: v for k, v in op.items() if not k.startswith("_")}
        return None

    def _remember(self, rid: str, op: dict[str, Any]) -> dict[str, Any]:
        if rid:
            self.s.by_request_id[rid] = op["name"]
        return op

    def _name(self, body: Any) -> str:
        name = (body or {}).get("name", "")
        if not NAME_RE.match(name):
            raise HttpError(400, "invalid", f"Invalid value for field 'resource.name': "
                            f"'{name}'. Must be a match of regex '{NAME_RE.pattern}'")
        return str(name)

    def _aggregated(self, kind: str, table: dict[tuple[str, str], dict[str, Any]], filt: str,
                    scope: str) -> Any:
        items: dict[str, Any] = {}
        for (where, _n), obj in sorted(table.items()):
            if _matches(obj, filt):
                items.setdefault(f"{scope}/{where}", {kind: []})[kind].append(obj)
        return {"kind": f"compute#{kind[:-1]}AggregatedList", "items": items,
                "id": f"projects/{self.s.project}/aggregated/{kind}"}

    # -- resources ---------------------------------------------------------------------

    def _insert_network(self, body: Any, rid: str) -> Any:
        if (d := self._dedupe(rid)) is not None:
            return d
        name = self._name(body)
        if name in self.s.networks:
            raise HttpError(409, "alreadyExists", f"network '{name}' already exists")
        if body.get("autoCreateSubnetworks", True):
            raise HttpError(400, "invalid", "barista fake: expected a custom-mode network")
        self.s.networks[name] = {"kind": "compute#network", "id": str(next(self.s.ids)),
                                 "name": name, "autoCreateSubnetworks": False,
                                 "selfLink": self._url(f"global/networks/{name}"),
                                 "description": body.get("description", "")}
        return self._made(rid, self._op("insert", f"global/networks/{name}"))

    def _made(self, rid: str, op: dict[str, Any]) -> dict[str, Any]:
        """A network or subnet being made: not ready to refer to until ``op`` is done."""
        self.s.making[op["targetLink"]] = op["name"]
        return self._remember(rid, op)

    def _ready(self, link: str) -> None:
        op = self.s.operations.get(self.s.making.get(link, ""))
        if op is not None and op.get("_done_at", 0.0) > time.monotonic():
            rel = link.split("/compute/v1/", 1)[-1]
            raise HttpError(400, "resourceNotReady", f"The resource '{rel}' is not ready")

    def _delete_network(self, name: str) -> Any:
        if name not in self.s.networks:
            raise HttpError(404, "notFound", f"network '{name}' was not found")
        link = self._url(f"global/networks/{name}")
        if any(s["network"] == link for s in self.s.subnets.values()) or any(
                f["network"] == link for f in self.s.firewalls.values()):
            raise HttpError(400, "resourceInUseByAnotherResource",
                            f"The network resource '{link}' is already being used")
        del self.s.networks[name]
        return self._op("delete", f"global/networks/{name}")

    def _network_link(self, ref: str) -> str:
        name = ref.rstrip("/").rsplit("/", 1)[-1]
        if name not in self.s.networks:
            raise HttpError(400, "invalid", f"network '{ref}' does not exist")
        link = self._url(f"global/networks/{name}")
        self._ready(link)
        return link

    def _insert_subnet(self, region: str, body: Any, rid: str) -> Any:
        if (d := self._dedupe(rid)) is not None:
            return d
        name = self._name(body)
        if (region, name) in self.s.subnets:
            raise HttpError(409, "alreadyExists", f"subnetwork '{name}' already exists")
        self.s.subnets[(region, name)] = {
            "kind": "compute#subnetwork", "id": str(next(self.s.ids)), "name": name,
            "network": self._network_link(body.get("network", "")),
            "ipCidrRange": body["ipCidrRange"], "region": self._url(f"regions/{region}"),
            "selfLink": self._url(f"regions/{region}/subnetworks/{name}")}
        return self._made(rid, self._op("insert", f"regions/{region}/subnetworks/{name}",
                                        region=region))

    def _delete_subnet(self, region: str, name: str) -> Any:
        sub = self.s.subnets.get((region, name))
        if sub is None:
            raise HttpError(404, "notFound", f"subnetwork '{name}' was not found")
        if any(nic.get("subnetwork", "").endswith(f"/subnetworks/{name}")
               for i in self.s.instances.values() for nic in i["networkInterfaces"]):
            raise HttpError(400, "resourceInUseByAnotherResource",
                            f"subnetwork '{name}' is in use")
        del self.s.subnets[(region, name)]
        return self._op("delete", f"regions/{region}/subnetworks/{name}", region=region)

    def _insert_firewall(self, body: Any, rid: str) -> Any:
        if (d := self._dedupe(rid)) is not None:
            return d
        name = self._name(body)
        if name in self.s.firewalls:
            raise HttpError(409, "alreadyExists", f"firewall '{name}' already exists")
        if name in self.s.firewall_errors:
            self._network_link(body.get("network", ""))
            return self._remember(rid, self._op("insert", f"global/firewalls/{name}",
                                                error=self.s.firewall_errors[name]))
        self.s.firewalls[name] = {**body, "kind": "compute#firewall",
                                  "id": str(next(self.s.ids)),
                                  "network": self._network_link(body.get("network", "")),
                                  "selfLink": self._url(f"global/firewalls/{name}")}
        return self._remember(rid, self._op("insert", f"global/firewalls/{name}"))

    def _insert_instance(self, zone: str, body: Any, rid: str) -> Any:
        if (d := self._dedupe(rid)) is not None:
            return d
        name = self._name(body)
        region = zone.rsplit("-", 1)[0]
        if (zone, name) in self.s.instances:
            raise HttpError(409, "alreadyExists",
                            f"The resource '{self._url(f'zones/{zone}/instances/{name}')}' "
                            "already exists")
        mtype = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        if mtype not in MACHINE_TYPES:
            raise HttpError(400, "invalid", f"Invalid value for field "
                            f"'resource.machineType': '{body.get('machineType')}'. Machine "
                            f"type with name '{mtype}' does not exist in zone '{zone}'.")
        for k, v in body.get("labels", {}).items():
            if not (LABEL_RE.match(k) and LABEL_RE.match(v)):
                raise HttpError(400, "invalid", f"Invalid value for field "
                                f"'resource.labels': '{k}={v}'")
        nics = body.get("networkInterfaces", [])
        for nic in nics:
            self._network_link(nic.get("network", ""))
            sub = str(nic.get("subnetwork", "")).rsplit("/", 1)[-1]
            if (region, sub) not in self.s.subnets:
                raise HttpError(400, "invalid", f"subnetwork '{sub}' does not exist in "
                                f"{region}")
            self._ready(self.s.subnets[(region, sub)]["selfLink"])
        if zone in self.s.capacity_exhausted:
            op = self._op("insert", f"zones/{zone}/instances/{name}", zone=zone, error=(
                "ZONE_RESOURCE_POOL_EXHAUSTED",
                f"The zone '{self._url(f'zones/{zone}')}' does not have enough resources "
                "available to fulfill the request."))
            return self._remember(rid, op)
        if region in self.s.quota_exceeded:
            raise HttpError(403, "quotaExceeded",
                            f"Quota 'CPUS' exceeded. Limit: 0.0 in region {region}.")
        n = next(self.s.ips)
        out_nics = []
        for nic in nics:
            out = {**nic, "networkIP": f"10.128.{n // 250}.{n % 250 + 2}",
                   "network": self._network_link(nic["network"]), "name": "nic0"}
            if nic.get("accessConfigs"):
                out["accessConfigs"] = [{**ac, "natIP": f"203.0.113.{n % 250 + 1}"}
                                        for ac in nic["accessConfigs"]]
            out_nics.append(out)
        self.s.instances[(zone, name)] = {
            **body, "kind": "compute#instance", "id": str(next(self.s.ids)),
            "status": "RUNNING", "zone": self._url(f"zones/{zone}"),
            "machineType": self._url(f"zones/{zone}/machineTypes/{mtype}"),
            "networkInterfaces": out_nics,
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S-00:00"),
            "selfLink": self._url(f"zones/{zone}/instances/{name}")}
        return self._remember(rid, self._op("insert", f"zones/{zone}/instances/{name}",
                                            zone=zone))

    def _instance_verb(self, zone: str, name: str, verb: str) -> Any:
        inst = self.s.instances.get((zone, name))
        if inst is None:
            raise HttpError(404, "notFound", f"instance '{name}' was not found")
        if verb == "stop":
            inst["status"] = "TERMINATED"
        elif verb in ("start", "reset"):
            inst["status"] = "RUNNING"
        else:
            raise HttpError(400, "invalid", f"unknown method {verb}")
        return self._op(verb, f"zones/{zone}/instances/{name}", zone=zone)


class FakeGce:
    """The fake on a loopback port, in its own thread (the SDK's calls block)."""

    def __init__(self, *, latency: Latency | None = None) -> None:
        self.state = GceState()
        self._api = GceApi(self.state)
        self._http = JsonServer(self._handle, latency=latency)

    def _handle(self, req: Request) -> Reply:
        try:
            return Reply(200, self._api.handle(req.method, req.path, req.query, req.body))
        except HttpError as exc:
            return Reply(exc.code, {"error": {
                "code": exc.code, "message": exc.message,
                "errors": [{"message": exc.message, "domain": "global",
                            "reason": exc.reason}]}})

    @property
    def url(self) -> str:
        return self._http.url

    def __enter__(self) -> FakeGce:
        self._http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.__exit__(*exc)
