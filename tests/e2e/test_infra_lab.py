"""End to end on the lab cloud (root, real namespaces): an infra of 3 simulated clouds x 2
nodes, one of them a private site behind NAT, created through the real API and CLI. Each
VM boots its rendered user-data, runs the installer the controller serves (reusing this
venv), and its agent enrolls with the node-bound token it was given; a broadcast reaches
every node; the delete leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.api.app import ApiServer
from controller.provision.lab import net as labnet
from controller.service import Controller, RunningController
from tests.fixtures.controller import controller_config, run_cli, wait_for
from tests.fixtures.lab import lab_skip_reason

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or "")]

SPEC = {
    "name": "shop",
    "labels": {"env": "e2e"},
    "groups": [
        {"name": "web", "provider": "lab", "regions": ["lab-us"], "size": "lab.small",
         "count": 2},
        {"name": "api", "provider": "lab", "regions": ["lab-eu"],
         "size": {"vcpus": 1, "memory_gb": 0.5}, "count": 2},
        {"name": "db", "provider": "lab", "regions": ["lab-onprem"], "size": "lab.small",
         "count": 2},
    ],
}


async def _call(http: aiohttp.ClientSession, url: str, token: str, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url + path, json=body,
                            headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def test_three_clouds_two_nodes_each_through_the_served_installer(
        tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    cfg = controller_config(tmp_path / "ctl", providers={
        "lab": {"kind": "local", "data_dir": str(lab_dir)}},
        provision_reuse_venv=sys.prefix)
    prefix = ""
    try:
        async with Controller(cfg) as c, ApiServer(c, host="127.0.0.1", port=0) as api:
            c.provisioning.set_api_url(api.url)
            token = c.secrets.api_token
            async with aiohttp.ClientSession() as http:
                status, plan = await _call(http, api.url, token, "POST", "/v1/infras/review",
                                           SPEC)
                assert status == 200, plan
                assert sum(i["count"] for i in plan["items"]) == 6
                api_item = next(i for i in plan["items"] if i["group"] == "api")
                assert api_item["vcpus"] >= 1 and api_item["memory_gb"] >= 0.5
                spec_file = tmp_path / "shop.json"
                spec_file.write_text(json.dumps(SPEC))
                code, out, err = await run_cli("infra", "create", "-f", str(spec_file), "-y",
                                               "-o", "json", url=api.url, token=token,
                                               timeout=240)
                view = json.loads(out)
                errors = [n.get("error") for g in view["groups"] for n in g["nodes"]]
                assert code == 0, (errors, err)
                assert view["status"] == "ready", view
                prefix = _lab_prefix(c)
                nodes = [n for g in view["groups"] for n in g["nodes"]]
                assert len(nodes) == 6 and all(n["phase"] == "ready" for n in nodes), nodes
                db = [n for n in nodes if n["group"] == "db"]
                assert all(not n.get("public_ip") for n in db), db
                assert all(n.get("public_ip") for n in nodes if n["group"] != "db"), nodes
                # The nodes are the infra's: linked, labelled, and their hostnames are
                # the names their tokens were bound to.
                ids = sorted(n["node_id"] for n in nodes)
                for n in nodes:
                    rec = c.fleet.get(n["node_id"])
                    assert rec.hostname == n["name"] and rec.labels["infra"] == "shop"
                    assert rec.labels["group"] == n["group"]
                _assert_underlay_facts(c, nodes)
                # A network over a node's VPC range is refused, naming the node.
                db_rec = c.fleet.get(db[0]["node_id"])
                code, out, err = await run_cli("net", "create", "clash", "--cidr",
                                               db_rec.facts["vpc_cidr"], url=api.url,
                                               token=token)
                assert code != 0, out
                assert "overlaps the VPC range of node" in err and \
                    any(f"node {n['node_id']} ({n['name']})" in err for n in db), err
                assert c.mesh.networks.table.get("clash") is None
                # A broadcast over the infra reaches every node (the private site too).
                code, out, err = await run_cli("run", "--infra", "shop", "-o", "json", "--",
                                               "hostname", url=api.url, token=token)
                job = json.loads(out)
                assert code == 0, (job, err)
                assert sorted(r["node_id"] for r in job["results"]) == ids
                assert job["counts"] == {"ok": 6}, job
                status, gone = await _call(http, api.url, token, "DELETE", "/v1/infras/shop")
                assert status == 202, gone
                await wait_for(lambda: _deleted(c), 120, "the infra to be deleted")
                assert all(c.nodes.get(i) is None for i in ids)
                status, orphans = await _call(http, api.url, token, "POST", "/v1/infras/gc",
                                              {"confirm": False})
                assert orphans["orphans"] == []
    finally:
        if prefix:
            left = {k: v for k, v in labnet.leftovers(prefix, lab_dir).items() if v}
            assert not left, f"the infra's delete left lab objects behind: {left}"


def _assert_underlay_facts(c: RunningController, nodes: list[dict[str, Any]]) -> None:
    """Each VM's agent reports the lab VM's addresses and its region's network: private_ip
    the VM's address, public_ip the same on a public region and "" behind the site's NAT,
    vpc_cidr the region's subnet (the site's LAN)."""
    provider: Any = c.provisioning.providers["lab"]
    state = provider.lab.read()
    for n in nodes:
        facts = c.fleet.get(n["node_id"]).facts
        region = state.region(n["region"])
        assert facts["private_ip"] == n["private_ip"], (n, facts)
        assert facts["public_ip"] == n.get("public_ip", ""), (n, facts)
        assert facts["vpc_cidr"] == (region.lan or region.subnet), (n, facts)
        assert ipaddress.ip_address(facts["private_ip"]) in \
            ipaddress.ip_network(facts["vpc_cidr"])


def _lab_prefix(c: RunningController) -> str:
    provider: Any = c.provisioning.providers["lab"]
    return str(provider.lab.prefix)


def _deleted(c: RunningController) -> bool:
    view = c.infras.get("shop")
    return view is None or view.status == "deleted"
