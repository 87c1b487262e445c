"""REST API v1 on a real aiohttp server: auth, nodes, tokens, errors, and the CLI over it."""

from __future__ import annotations

import io
import json

import aiohttp

from controller.service import RunningController
from tests.fixtures.controller import AgentFactory, run_cli


async def test_requests_without_or_with_wrong_token_get_401(api, http: aiohttp.ClientSession):
    url, token = api
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": token},
        {"Authorization": f"Basic {token}"},
    ):
        for path in ("/v1/nodes", "/v1/nodes/x", "/v1/status", "/v1/tokens"):
            async with http.get(url + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                body = await r.json()
                assert body["error"] == "unauthorized" and "Bearer" in body["message"]
    async with http.post(url + "/v1/tokens", json={}) as r:
        assert r.status == 401
    async with http.get(url + "/v1/nodes", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200


async def test_health_endpoints_are_open(api, http: aiohttp.ClientSession):
    url, _ = api
    async with http.get(url + "/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True


async def test_nodes_list_filter_and_show(
    api, http, controller: RunningController, agents: AgentFactory
):
    url, token = api
    h = {"Authorization": f"Bearer {token}"}
    aws = await agents.start(labels={"provider": "aws", "region": "us-east-1"})
    gcp = await agents.start(labels={"provider": "gcp", "region": "europe-west1", "spot": "1"})
    async with http.get(url + "/v1/nodes", headers=h) as r:
        ids = [n["id"] for n in (await r.json())["nodes"]]
        assert sorted(ids) == sorted([aws.node_id, gcp.node_id])
    async with http.get(
        url + "/v1/nodes", headers=h, params={"selector": "provider in (aws,azure),!spot"}
    ) as r:
        nodes = (await r.json())["nodes"]
        assert [n["id"] for n in nodes] == [aws.node_id]
        assert nodes[0]["labels"] == {"provider": "aws", "region": "us-east-1"}
        assert nodes[0]["status"] == "online"
    async with http.get(url + f"/v1/nodes/{gcp.node_id}", headers=h) as r:
        node = await r.json()
        assert node["id"] == gcp.node_id and node["facts"]["os"] == "Linux"
    async with http.get(url + "/v1/nodes/nope", headers=h) as r:
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    async with http.get(url + "/v1/nodes", headers=h, params={"selector": "a in (b"}) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "bad_selector" and "position" in body["details"]


async def test_create_token_and_bad_bodies(api, http, controller: RunningController):
    url, token = api
    h = {"Authorization": f"Bearer {token}"}
    async with http.post(
        url + "/v1/tokens", headers=h, json={"labels": {"provider": "aws"}, "ttl": 60}
    ) as r:
        assert r.status == 201
        body = await r.json()
        assert body["token"].startswith("bt1.") and body["labels"] == {"provider": "aws"}
        assert body["controller_key"] and body["nats_url"].startswith("nats://")
    async with http.get(url + "/v1/tokens", headers=h) as r:
        listed = (await r.json())["tokens"]
        assert listed[0]["state"] == "valid" and "token" not in listed[0]
    for bad in (
        b"{not json",
        b"[1,2]",
        json.dumps({"ttl": "soon"}).encode(),
        json.dumps({"ttl": -5}).encode(),
        json.dumps({"labels": {"bad key": "v"}}).encode(),
        json.dumps({"labels": 7}).encode(),
    ):
        async with http.post(
            url + "/v1/tokens", headers={**h, "Content-Type": "application/json"}, data=bad
        ) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"] in ("bad_request", "bad_selector")
    async with http.post(
        url + "/v1/tokens", headers=h, data=io.BytesIO(b"x" * (2 * 1024 * 1024))
    ) as r:
        assert r.status == 413
    assert len(controller.tokens_table) == 1  # nothing was created by the bad requests


async def test_api_token_file_is_private(controller: RunningController):
    path = controller.config.data_dir / "api-token"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct((controller.config.data_dir / "signing-key.pem").stat().st_mode & 0o777) == "0o600"


async def _cli(*args: str, url: str, token: str) -> tuple[int, str, str]:
    return await run_cli(*args, url=url, token=token)


async def test_cli_nodes_ls_json_and_token_create(
    api, controller: RunningController, agents: AgentFactory
):
    url, token = api
    agent = await agents.start(labels={"provider": "azure", "region": "koreacentral"})
    code, out, err = await _cli("nodes", "ls", "-o", "json", url=url, token=token)
    assert code == 0, err
    nodes = json.loads(out)
    assert [(n["id"], n["labels"]["provider"], n["status"]) for n in nodes] == [
        (agent.node_id, "azure", "online")
    ]
    code, out, err = await _cli(
        "nodes", "ls", "-l", "provider=aws", "-o", "json", url=url, token=token
    )
    assert code == 0 and json.loads(out) == []
    code, out, err = await _cli(
        "token",
        "create",
        "--label",
        "provider=onprem",
        "--ttl",
        "2h",
        "-o",
        "json",
        url=url,
        token=token,
    )
    assert code == 0, err
    assert json.loads(out)["labels"] == {"provider": "onprem"}
    code, out, err = await _cli("nodes", "show", "missing", url=url, token=token)
    assert code == 1 and "not found" in err
    code, out, err = await _cli("nodes", "ls", "-l", "a in (", url=url, token=token)
    assert code == 1 and "invalid selector" in err
    code, out, err = await _cli("nodes", "ls", url=url, token="wrong")
    assert code == 1 and "API token" in err


async def test_cli_explains_unreachable_controller():
    code, _, err = await _cli("nodes", "ls", url="http://127.0.0.1:9", token="x")
    assert code == 1 and "cannot reach the controller" in err and "barista server" in err
