"""A fake of Azure Resource Manager (ARM) for the real azure-mgmt SDKs, served over HTTPS
(the SDK's bearer-token policy refuses plain http).

It follows the documented shapes for what our provider calls: resource groups, virtual
networks with inline subnets, network security groups, public IPs, NICs and virtual
machines (``properties`` envelope, ``$expand=instanceView``, ``statusOnly`` listing),
long-running operations (201/202 with ``Azure-AsyncOperation``, an operation resource with
``status`` InProgress/Succeeded/Failed and its ``error``), the ARM error body
``{"error": {"code", "message"}}``, case-insensitive paths, dependency checks (a NIC in use,
a zone change on an existing VM, a reference to a network resource not yet provisioned:
429 RetryableError / ReferencedResourceNotProvisioned) and cascades (resource group
delete, a NIC with ``deleteOption: Delete``). Every request is recorded; failures are
injected per zone.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes import azure_catalog
from tests.fakes.http import JsonServer, Latency, Reply, Request
from tests.fakes.tls import self_signed, server_context

VM_SIZES = {"Standard_B1s", "Standard_B2s", "Standard_D2s_v5", "Standard_F2s_v2"}
TYPES = {"virtualnetworks": "Microsoft.Network/virtualNetworks",
         "networksecuritygroups": "Microsoft.Network/networkSecurityGroups",
         "publicipaddresses": "Microsoft.Network/publicIPAddresses",
         "networkinterfaces": "Microsoft.Network/networkInterfaces",
         "virtualmachines": "Microsoft.Compute/virtualMachines"}


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class ArmState:
    subscription: str = "00000000-0000-0000-0000-0000000000aa"
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # lower name -> rg
    # (lower rg, lower type, lower name) -> resource
    resources: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, list[str]], Any]] = field(default_factory=list)
    capacity_exhausted: set[str] = field(default_factory=set)  # "eastus-1" style zones
    throttle_next: int = 0
    # Long-running operations: seconds from acceptance until done, by action ("create_vm",
    # "delete_vm", "start"...); None: done by the next request. The state moves on with
    # time whether the operation is polled or not (as ARM's does).
    lro_delay: Callable[[str, str], float] | None = None  # (action, target name)
    retry_after: int = 0  # the Retry-After header on accepted/in-progress LROs (0: none)
    ips: Iterator[int] = field(default_factory=lambda: itertools.count(4))

    def sent(self, method: str, contains: str) -> list[Any]:
        return [b for m, p, _q, b in self.requests if m == method and contains.lower()
                in p.lower()]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for (_g, t, _n), r in self.resources.items() if t == kind]


class ArmApi:
    def __init__(self, state: ArmState, base: str) -> None:
        self.s = state
        self.base = base
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               auth: str) -> Reply:
        with self.lock:
            self.s.requests.append((method, path, query, body))
            self._settle()
            if not auth.startswith("Bearer ") or len(auth) < 10:
                raise ArmError(401, "AuthenticationFailed", "Authentication failed. The "
                               "'Authorization' header is missing.")
            if self.s.throttle_next > 0:
                self.s.throttle_next -= 1
                raise ArmError(429, "TooManyRequests", "The request is being throttled.")
            parts = path.strip("/").split("/")
            low = [p.lower() for p in parts]
            if low[:2] != ["subscriptions", self.s.subscription.lower()]:
                raise ArmError(404, "SubscriptionNotFound",
                               f"The subscription '{parts[1] if len(parts) > 1 else ''}' "
                               "could not be found.")
            return self._route(method, parts[2:], low[2:], query, body)

    def _route(self, method: str, parts: list[str], low: list[str],
               q: dict[str, list[str]], body: Any) -> Reply:
        match low:
            case ["providers", "microsoft.compute", "virtualmachines"]:
                return Reply(200, {"value": [self._vm_view(r, True) for r in
                                             self.s.of_type("virtualmachines")]})
            case ["providers", _ns, "locations", _loc, "operations", op]:
                return self._operation(op)
            case ["resourcegroups", rg] if method == "PUT":
                return self._put_group(parts[1], body)
            case ["resourcegroups", rg] if method in ("GET", "HEAD"):
                return Reply(200, self._group(rg))
            case ["resourcegroups", rg] if method == "DELETE":
                self._group(rg)
                return self._async(202, None, "microsoft.resources", "delete_group", rg)
            case ["resourcegroups", rg, "providers", _ns, kind] if kind in TYPES \
                    and method == "GET":
                self._group(rg)
                expand = "instanceView" in (q.get("$expand") or [""])[0]
                return Reply(200, {"value": [
                    self._vm_view(r, expand) if kind == "virtualmachines" else r
                    for (g, t, _n), r in self.s.resources.items()
                    if g == rg.lower() and t == kind]})
            case ["resourcegroups", rg, "providers", _ns, kind, _name] if kind in TYPES:
                return self._resource(method, rg, kind, parts[5], body, q)
            case ["resourcegroups", rg, "providers", _ns, "virtualmachines", name, action] \
                    if method == "POST":
                return self._vm_action(rg, name, action)
        found = azure_catalog.catalog_route(self.s.subscription, method, low, q)
        if found is not None:
            return Reply(200, found)
        raise ArmError(404, "NotFound", f"no such API: {method} /{'/'.join(parts)}")

    # -- helpers -----------------------------------------------------------------------

    def _id(self, rg: str, kind: str, name: str) -> str:
        ns_type = TYPES[kind]
        return (f"/subscriptions/{self.s.subscription}/resourceGroups/"
                f"{self.s.groups[rg.lower()]['name']}/providers/{ns_type}/{name}")

    def _group(self, rg: str) -> dict[str, Any]:
        g = self.s.groups.get(rg.lower())
        if g is None:
            raise ArmError(404, "ResourceGroupNotFound",
                           f"Resource group '{rg}' could not be found.")
        return g

    def _get(self, rg: str, kind: str, name: str) -> dict[str, Any]:
        self._group(rg)
        r = self.s.resources.get((rg.lower(), kind, name.lower()))
        if r is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{TYPES[kind]}/{name}' "
                           f"under resource group '{rg}' was not found.")
        return r

    def _by_id(self, rid: str, kind: str) -> dict[str, Any]:
        p = rid.strip("/").split("/")
        if len(p) < 8 or p[6].lower() != kind:
            raise ArmError(400, "InvalidResourceReference", f"Resource {rid} referenced "
                           "by the request is not valid.")
        return self._get(p[3], kind, p[7])

    def _provisioned(self, ref: dict[str, Any], by: str) -> None:
        """The network RP refuses a resource referring to one still being made or
        updated (the code real ARM answers: the caller waits for the referenced one's
        operation first)."""
        state = ref.get("properties", {}).get("provisioningState", "Succeeded")
        if state != "Succeeded":
            raise ArmError(429, "RetryableError",
                           "A retryable error occurred. ReferencedResourceNotProvisioned: "
                           f"Cannot proceed with operation because resource {ref['id']} used "
                           f"by resource {by} is not in Succeeded state. Resource is in "
                           f"{state} state.")

    def _async(self, status: int, body: Any, ns: str, action: str, *target: str,
               error: tuple[str, str] | None = None) -> Reply:
        op_id = str(uuid.uuid4())
        delay = (self.s.lro_delay(action, target[-1]) if self.s.lro_delay is not None
                 else 0.0)
        now = time.monotonic()
        self.s.operations[op_id] = {"action": action, "target": target, "error": error,
                                    "polls": 0, "accepted_at": now, "done_at": now + delay}
        url = (f"{self.base}/subscriptions/{self.s.subscription}/providers/{ns}/locations/"
               f"eastus/operations/{op_id}?api-version=2024-01-01")
        headers = {"Azure-AsyncOperation": url, "Location": url}
        if self.s.retry_after:
            headers["Retry-After"] = str(self.s.retry_after)
        return Reply(status, body, headers)

    def _settle(self) -> None:
        """Finish the operations whose time has come (accepted by an earlier request)."""
        now = time.monotonic()
        for op in self.s.operations.values():
            if "done" not in op and op["done_at"] <= now:
                op["done"] = True
                if op["error"] is None:
                    self._finish(op["action"], *op["target"])

    def _operation(self, op_id: str) -> Reply:
        op = self.s.operations.get(op_id)
        if op is None:
            raise ArmError(404, "NotFound", f"operation {op_id} not found")
        op["polls"] += 1
        if "done" not in op:  # ARM reports work in progress before it is done
            headers = {"Retry-After": str(self.s.retry_after)} if self.s.retry_after else {}
            return Reply(200, {"name": op_id, "status": "InProgress"}, headers)
        if op["error"] is not None:
            code, message = op["error"]
            return Reply(200, {"name": op_id, "status": "Failed",
                               "error": {"code": code, "message": message}})
        return Reply(200, {"name": op_id, "status": "Succeeded"})

    def _finish(self, action: str, *target: str) -> None:
        if action == "provision":
            res = self.s.resources.get((target[0], target[1], target[2]))
            if res is not None:
                res["properties"]["provisioningState"] = "Succeeded"
            return
        if action == "delete_group":
            rg = target[0].lower()
            self.s.groups.pop(rg, None)
            for key in [k for k in self.s.resources if k[0] == rg]:
                del self.s.resources[key]
            return
        rg, name = target
        key = (rg.lower(), "virtualmachines", name.lower())
        vm = self.s.resources.get(key)
        if vm is None:
            return
        if action == "create_vm":
            vm["properties"]["provisioningState"] = "Succeeded"
            vm["_power"] = "running"
        elif action == "delete_vm":
            del self.s.resources[key]
            for nic in vm["properties"]["networkProfile"]["networkInterfaces"]:
                if nic.get("properties", {}).get("deleteOption") == "Delete":
                    p = nic["id"].strip("/").split("/")
                    gone = self.s.resources.pop(
                        (p[3].lower(), "networkinterfaces", p[7].lower()), None)
                    for cfg in (gone or {}).get("properties", {}).get("ipConfigurations", []):
                        pip = cfg["properties"].get("publicIPAddress") or {}
                        if pip.get("properties", {}).get("deleteOption") == "Delete":
                            q = pip["id"].strip("/").split("/")
                            self.s.resources.pop(
                                (q[3].lower(), "publicipaddresses", q[7].lower()), None)
        else:
            vm["_power"] = {"deallocate": "deallocated", "powerOff": "stopped",
                            "start": "running", "restart": "running"}[action]

    # -- resources ---------------------------------------------------------------------

    def _put_group(self, name: str, body: Any) -> Reply:
        existed = name.lower() in self.s.groups
        g = self.s.groups.setdefault(name.lower(), {"name": name})
        g.update({"id": f"/subscriptions/{self.s.subscription}/resourceGroups/{name}",
                  "location": body["location"], "tags": body.get("tags", {}),
                  "type": "Microsoft.Resources/resourceGroups",
                  "properties": {"provisioningState": "Succeeded"}})
        return Reply(200 if existed else 201, g)

    def _resource(self, method: str, rg: str, kind: str, name: str, body: Any,
                  q: dict[str, list[str]]) -> Reply:
        if method == "GET":
            r = self._get(rg, kind, name)
            if kind == "virtualmachines":
                return Reply(200, self._vm_view(r, "instanceView" in (q.get("$expand") or [""])[0]))
            return Reply(200, r)
        if method == "DELETE":
            r = self._get(rg, kind, name)
            if kind == "virtualmachines":
                return self._async(202, None, "Microsoft.Compute", "delete_vm", rg, name)
            self._check_unused(rg, kind, r)
            del self.s.resources[(rg.lower(), kind, name.lower())]
            return Reply(200, None)
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", f"{method} not allowed")
        self._group(rg)
        if not isinstance(body, dict) or "location" not in body:
            raise ArmError(400, "LocationRequired", "The location property is required.")
        if len(body.get("tags") or {}) > 50:
            raise ArmError(400, "InvalidTag", "at most 50 tags")
        key = (rg.lower(), kind, name.lower())
        old = self.s.resources.get(key)
        res: dict[str, Any] = {"id": self._id(rg, kind, name), "name": name,
                               "type": TYPES[kind], "location": body["location"],
                               "tags": body.get("tags", {}),
                               "properties": json.loads(json.dumps(body.get("properties",
                                                                            {})))}
        if body.get("zones"):
            res["zones"] = body["zones"]
        if old is not None and old.get("zones") != res.get("zones"):
            raise ArmError(409, "PropertyChangeNotAllowed", f"Changing property 'zones' is "
                           f"not allowed on {TYPES[kind]} '{name}'.")
        return getattr(self, f"_put_{kind}")(rg, name, key, res, old)

    def _check_unused(self, rg: str, kind: str, r: dict[str, Any]) -> None:
        if kind == "networkinterfaces":
            for vm in self.s.of_type("virtualmachines"):
                if any(n["id"].lower() == r["id"].lower()
                       for n in vm["properties"]["networkProfile"]["networkInterfaces"]):
                    raise ArmError(400, "NicInUse", f"Network Interface {r['id']} is used "
                                   f"by existing resource {vm['id']}.")
        if kind == "publicipaddresses":
            for nic in self.s.of_type("networkinterfaces"):
                for cfg in nic["properties"]["ipConfigurations"]:
                    pip = cfg["properties"].get("publicIPAddress") or {}
                    if pip.get("id", "").lower() == r["id"].lower():
                        raise ArmError(400, "PublicIPAddressInUse", f"Public IP address "
                                       f"{r['id']} is in use by {nic['id']}.")

    def _put_networksecuritygroups(self, rg: str, name: str, key: Any, res: dict[str, Any],
                                   old: Any) -> Reply:
        for rule in res["properties"].get("securityRules", []):
            rule["id"] = f"{res['id']}/securityRules/{rule['name']}"
            rule["properties"]["provisioningState"] = "Succeeded"
        return self._provisioning(key, res, old)

    def _provisioning(self, key: tuple[str, str, str], res: dict[str, Any], old: Any
                      ) -> Reply:
        """Network RP PUTs are long-running: ``Updating`` until the operation is done."""
        res["properties"]["provisioningState"] = "Updating"
        self.s.resources[key] = res
        return self._async(200 if old else 201, res, "Microsoft.Network", "provision", *key)

    def _put_virtualnetworks(self, rg: str, name: str, key: Any, res: dict[str, Any],
                             old: Any) -> Reply:
        for sub in res["properties"].get("subnets", []):
            sub["id"] = f"{res['id']}/subnets/{sub['name']}"
            nsg = sub["properties"].get("networkSecurityGroup")
            if nsg:
                self._provisioned(self._by_id(nsg["id"], "networksecuritygroups"), sub["id"])
        return self._provisioning(key, res, old)

    def _put_publicipaddresses(self, rg: str, name: str, key: Any, res: dict[str, Any],
                               old: Any) -> Reply:
        n = next(self.s.ips)
        res["properties"].update({"ipAddress": f"198.51.100.{n % 250 + 1}",
                                  "provisioningState": "Succeeded"})
        if old is not None:
            res["properties"]["ipAddress"] = old["properties"]["ipAddress"]
        self.s.resources[key] = res
        return Reply(200 if old else 201, res)

    def _put_networkinterfaces(self, rg: str, name: str, key: Any, res: dict[str, Any],
                               old: Any) -> Reply:
        nsg = res["properties"].get("networkSecurityGroup")
        if nsg:
            self._provisioned(self._by_id(nsg["id"], "networksecuritygroups"), res["id"])
        for i, cfg in enumerate(res["properties"].get("ipConfigurations", [])):
            props = cfg["properties"]
            sub_id = props.get("subnet", {}).get("id", "")
            vnet_id = sub_id.rsplit("/subnets/", 1)[0]
            vnet = self._by_id(vnet_id, "virtualnetworks")
            self._provisioned(vnet, res["id"])
            if not any(s["id"].lower() == sub_id.lower()
                       for s in vnet["properties"].get("subnets", [])):
                raise ArmError(400, "InvalidResourceReference", f"subnet {sub_id} not found")
            if props.get("publicIPAddress"):
                self._by_id(props["publicIPAddress"]["id"], "publicipaddresses")
            cfg["id"] = f"{res['id']}/ipConfigurations/{cfg['name']}"
            n = next(self.s.ips)
            props["privateIPAddress"] = f"10.64.0.{n % 250 + 4 + i}"
        res["properties"]["provisioningState"] = "Succeeded"
        self.s.resources[key] = res
        return Reply(200 if old else 201, res)

    def _put_virtualmachines(self, rg: str, name: str, key: Any, res: dict[str, Any],
                             old: Any) -> Reply:
        props = res["properties"]
        size = props.get("hardwareProfile", {}).get("vmSize", "")
        if size not in VM_SIZES:
            raise ArmError(400, "InvalidParameter", f"The value '{size}' of parameter "
                           "'vmSize' is not allowed.")
        osp = props.get("osProfile", {})
        try:
            base64.b64decode(osp.get("customData", ""), validate=True)
        except binascii.Error:
            raise ArmError(400, "InvalidParameter", "customData must be base64") from None
        linux = osp.get("linuxConfiguration", {})
        if linux.get("disablePasswordAuthentication") and not linux.get("ssh", {}).get(
                "publicKeys"):
            raise ArmError(400, "InvalidParameter", "an SSH public key is required when "
                           "password authentication is disabled")
        net = props.setdefault("networkProfile", {})
        if net.get("networkInterfaceConfigurations"):
            net["networkInterfaces"] = (self._vm_nics(rg, res, net) if old is None else
                                        old["properties"]["networkProfile"]["networkInterfaces"])
        for nic in net.get("networkInterfaces", []):
            self._by_id(nic["id"], "networkinterfaces")
        props.update({"vmId": str(uuid.uuid4()), "provisioningState": "Creating"})
        res["_power"] = "starting"
        self.s.resources[key] = res
        zone = f"{res['location']}-{res['zones'][0]}" if res.get("zones") else ""
        error = None
        if zone in self.s.capacity_exhausted:
            error = ("ZonalAllocationFailed", f"Allocation failed. We do not have sufficient "
                     f"capacity for the requested VM size in zone {zone}.")
            props["provisioningState"] = "Failed"
            res["_error"] = error
        return self._async(201, self._vm_view(res, False), "Microsoft.Compute", "create_vm",
                           rg, name, error=error)

    def _vm_nics(self, rg: str, vm: dict[str, Any], net: dict[str, Any]) -> list[Any]:
        """A VM's network interface configurations (networkApiVersion >= 2020-11-01): the
        NICs and public IPs Compute makes for it, in its resource group, with its tags."""
        if net.get("networkApiVersion", "") < "2020-11-01":
            raise ArmError(400, "InvalidParameter", "networkInterfaceConfigurations need "
                           "networkApiVersion 2020-11-01 or later")
        refs = []
        base = {"location": vm["location"], "tags": vm["tags"]}
        for cfg in net["networkInterfaceConfigurations"]:  # references checked first
            nsg = cfg["properties"].get("networkSecurityGroup")
            if nsg:
                self._provisioned(self._by_id(nsg["id"], "networksecuritygroups"), vm["id"])
        for cfg in net["networkInterfaceConfigurations"]:
            nic_props: dict[str, Any] = {}
            if cfg["properties"].get("networkSecurityGroup"):
                nic_props["networkSecurityGroup"] = {
                    "id": cfg["properties"]["networkSecurityGroup"]["id"]}
            ip_cfgs = []
            for ip in cfg["properties"].get("ipConfigurations", []):
                ipp = dict(ip["properties"])
                pub = ipp.pop("publicIPAddressConfiguration", None)
                if pub is not None:
                    pip_body = {**base, "sku": pub.get("sku", {}), "properties": {
                        "publicIPAllocationMethod": pub["properties"].get(
                            "publicIPAllocationMethod", "Static")}}
                    if vm.get("zones"):
                        pip_body["zones"] = vm["zones"]
                    self._resource("PUT", rg, "publicipaddresses", pub["name"], pip_body, {})
                    ipp["publicIPAddress"] = {
                        "id": self._id(rg, "publicipaddresses", pub["name"]),
                        "properties": {"deleteOption": pub["properties"].get(
                            "deleteOption", "Detach")}}
                ip_cfgs.append({"name": ip["name"], "properties": ipp})
            self._resource("PUT", rg, "networkinterfaces", cfg["name"],
                           {**base, "properties": {**nic_props, "ipConfigurations": ip_cfgs}},
                           {})
            nic = self.s.resources[(rg.lower(), "networkinterfaces", cfg["name"].lower())]
            refs.append({"id": nic["id"], "properties": {
                "primary": cfg["properties"].get("primary", True),
                "deleteOption": cfg["properties"].get("deleteOption", "Detach")}})
        return refs

    def _vm_view(self, vm: dict[str, Any], instance_view: bool) -> dict[str, Any]:
        out = {k: v for k, v in vm.items() if not k.startswith("_")}
        out["properties"] = dict(out["properties"])
        out["properties"]["osProfile"] = {k: v for k, v in
                                          out["properties"].get("osProfile", {}).items()
                                          if k != "customData"}  # ARM never returns it
        if instance_view:
            prov = out["properties"]["provisioningState"].lower()
            first: dict[str, Any] = {"code": f"ProvisioningState/{prov}"}
            if prov == "failed" and vm.get("_error"):  # why, as ARM's instance view says
                code, message = vm["_error"]
                first = {"code": f"ProvisioningState/failed/{code}", "level": "Error",
                         "displayStatus": "Provisioning failed", "message": message}
            out["properties"]["instanceView"] = {"statuses": [
                first, {"code": f"PowerState/{vm.get('_power', 'starting')}"}]}
        return out

    def _vm_action(self, rg: str, name: str, action: str) -> Reply:
        vm = self._get(rg, "virtualmachines", name)
        if action not in ("deallocate", "powerOff", "start", "restart"):
            raise ArmError(404, "NotFound", f"no action {action}")
        if vm["properties"]["provisioningState"] != "Succeeded":
            raise ArmError(409, "OperationNotAllowed", f"VM {name} is not ready")
        return self._async(202, None, "Microsoft.Compute", action, rg, name)


class FakeArm:
    """ARM on a loopback HTTPS port, in its own thread; ``ca`` is the cert to trust."""

    def __init__(self, tmp: Path, *, latency: Latency | None = None) -> None:
        self.state = ArmState()
        self.ca, key = self_signed(tmp)
        self._http = JsonServer(self._handle, tls=server_context(self.ca, key),
                                latency=latency)
        self.api = ArmApi(self.state, self.url)

    def _handle(self, req: Request) -> Reply:
        try:
            return self.api.handle(req.method, req.path, req.query, req.body,
                                   req.headers.get("authorization", ""))
        except ArmError as exc:
            reply = Reply(exc.status, {"error": {"code": exc.code, "message": exc.message}})
            if exc.status == 429:
                reply.headers["Retry-After"] = "1"
            return reply

    @property
    def url(self) -> str:
        return self._http.url

    def __enter__(self) -> FakeArm:
        self._http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.__exit__(*exc)
