"""API roles, scopes and the audit trail, through the real API of a real controller with
real agents (labels env=dev / env=prod).

Scope choice (documented in the README): a scoped token's job selector is ANDed with the
scope, so a job whose selector (or target list) names only out-of-scope nodes is accepted
(202) with an empty expected set and signs nothing for them; reading an out-of-scope node,
job or app is 403.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest

from controller.api.access import required_role
from controller.api.app import make_app
from controller.auth import RANK
from controller.service import RunningController
from controller.state.streams import AUDIT
from tests.fixtures.controller import AgentFactory, run_cli, wait_for

ROLES = ("viewer", "operator", "admin")
# The role each route of the v1 API needs. A route missing here still has to declare
# one (test_every_route_declares_a_role) and is covered by the matrix generically.
KNOWN = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/install.sh"): "public",
    ("GET", "/v1/bootstrap/manifest"): "public",
    ("GET", "/v1/bootstrap/agent"): "public",
    ("GET", "/v1/bootstrap/ca.der"): "public",
    ("GET", "/v1/status"): "viewer",
    ("GET", "/v1/nodes"): "viewer",
    ("GET", "/v1/nodes/{id}"): "viewer",
    ("GET", "/v1/nodes/{id}/metrics/latest"): "viewer",
    ("GET", "/v1/metrics/stream"): "viewer",
    ("POST", "/v1/tokens"): "operator",
    ("GET", "/v1/tokens"): "viewer",
    ("POST", "/v1/jobs"): "operator",
    ("GET", "/v1/jobs"): "viewer",
    ("GET", "/v1/jobs/{id}"): "viewer",
    ("GET", "/v1/jobs/{id}/events"): "viewer",
    ("POST", "/v1/apps"): "operator",
    ("GET", "/v1/apps"): "viewer",
    ("GET", "/v1/apps/{name}"): "viewer",
    ("POST", "/v1/apps/{name}/rollback"): "operator",
    ("DELETE", "/v1/apps/{name}"): "operator",
    ("POST", "/v1/auth/tokens"): "admin",
    ("GET", "/v1/auth/tokens"): "admin",
    ("DELETE", "/v1/auth/tokens/{name}"): "admin",
    ("GET", "/v1/audit"): "admin",
    ("POST", "/v1/infras/review"): "operator",
    ("POST", "/v1/infras"): "operator",
    ("GET", "/v1/infras"): "viewer",
    ("GET", "/v1/infras/{name}"): "viewer",
    ("DELETE", "/v1/infras/{name}"): "operator",
    ("POST", "/v1/infras/{name}/actions"): "operator",
    ("POST", "/v1/infras/gc"): "operator",
    ("GET", "/v1/infras/{name}/events"): "viewer",
    ("GET", "/v1/providers"): "viewer",
    ("POST", "/v1/providers/{name}/check"): "operator",
    ("GET", "/v1/catalog/sizes"): "viewer",
    ("GET", "/v1/catalog/regions"): "viewer",
    ("POST", "/v1/catalog/{name}/refresh"): "operator",
}


def registered_routes(controller: RunningController) -> list[tuple[str, str, object]]:
    app = make_app(controller, api_token=controller.secrets.api_token)
    out: list[tuple[str, str, object]] = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp's automatic HEAD of a GET route: the same handler
        info = route.resource.canonical if route.resource is not None else ""
        out.append((route.method, info, route.handler))
    return out


async def test_every_route_declares_a_role(controller: RunningController):
    routes = registered_routes(controller)
    assert len(routes) >= len(KNOWN)
    undeclared = [(m, p) for m, p, h in routes if required_role(h) is None]
    assert not undeclared, f"routes without a declared role: {undeclared}"
    declared = {(m, p): required_role(h) for m, p, h in routes}
    for key, role in KNOWN.items():
        assert declared.get(key) == role, key


@dataclass
class Api:
    url: str
    admin: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, token: str | None, body: Any = None,
                   **params: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.http.request(method, self.url + path, headers=headers,
                                     json=body, params=params) as r:
            if r.content_type == "text/event-stream":
                return r.status, None  # the headers are the answer; leave the stream
            return r.status, await r.json()

    async def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        status, data = await self.call(method, path, self.admin, body, **params)
        assert status in (200, 201, 202), (method, path, status, data)
        return data

    async def token(self, name: str, role: str, scope: str = "", ttl: float | None = None
                    ) -> str:
        body: dict[str, Any] = {"name": name, "role": role, "scope": scope}
        if ttl is not None:
            body["ttl"] = ttl
        data = await self.ok("POST", "/v1/auth/tokens", body)
        assert data["role"] == role and data["token"].startswith("brt_")
        return str(data["token"])


@pytest.fixture
async def rest(api, http) -> Api:
    url, token = api
    return Api(url=url, admin=token, http=http)


APP = {"name": "matrix", "version": "1", "selector": "none=none"}


async def test_route_role_matrix(rest: Api, controller: RunningController,
                                 agents: AgentFactory):
    """Every route x every role: allowed -> its 2xx, denied -> 403 naming the role needed;
    no, unknown, expired and revoked tokens -> 401 with a message that says which."""
    node = await agents.start(labels={"env": "dev"})
    await wait_for(lambda: controller.hub.latest(node.node_id), 10, "a metric batch")
    job = (await rest.ok("POST", "/v1/jobs", {"action": "ping"}, wait="1"))["id"]
    tokens = {role: await rest.token(f"t-{role}", role) for role in ROLES}
    expiring = await rest.token("t-expiring", "admin", ttl=0.5)
    revoked = await rest.token("t-revoked", "admin")
    await rest.ok("DELETE", "/v1/auth/tokens/t-revoked")
    seq = iter(range(1_000_000))

    async def fresh_app() -> str:
        name = f"app-{next(seq)}"
        await rest.ok("POST", "/v1/apps", {**APP, "name": name}, wait="1")
        await rest.ok("POST", "/v1/apps", {**APP, "name": name, "version": "2"}, wait="1")
        return name

    async def fresh_token() -> str:
        name = f"victim-{next(seq)}"
        await rest.token(name, "viewer")
        return name

    Setup = Callable[[], Awaitable[str]]

    async def nothing() -> str:
        return ""

    async def unique() -> str:
        return str(next(seq))

    # (method, path template, body, setup giving {x}, expected status when allowed)
    cases: list[tuple[str, str, Any, Setup, int]] = [
        ("GET", "/healthz", None, nothing, 200),
        ("GET", "/readyz", None, nothing, 200),
        ("GET", "/v1/status", None, nothing, 200),
        ("GET", "/v1/nodes", None, nothing, 200),
        ("GET", f"/v1/nodes/{node.node_id}", None, nothing, 200),
        ("GET", f"/v1/nodes/{node.node_id}/metrics/latest", None, nothing, 200),
        ("GET", "/v1/metrics/stream", None, nothing, 200),
        ("POST", "/v1/tokens", {"labels": {"env": "dev"}}, nothing, 201),
        ("GET", "/v1/tokens", None, nothing, 200),
        ("POST", "/v1/jobs", {"action": "ping", "selector": "none=none"}, nothing, 202),
        ("GET", "/v1/jobs", None, nothing, 200),
        ("GET", f"/v1/jobs/{job}", None, nothing, 200),
        ("GET", f"/v1/jobs/{job}/events", None, nothing, 200),
        ("POST", "/v1/apps", {**APP, "name": "fresh-{x}"}, unique, 202),
        ("GET", "/v1/apps", None, nothing, 200),
        ("GET", "/v1/apps/{x}", None, fresh_app, 200),
        ("POST", "/v1/apps/{x}/rollback", None, fresh_app, 202),
        ("DELETE", "/v1/apps/{x}", None, fresh_app, 200),
        ("POST", "/v1/auth/tokens", {"name": "new-{x}", "role": "viewer"}, unique, 201),
        ("GET", "/v1/auth/tokens", None, nothing, 200),
        ("DELETE", "/v1/auth/tokens/{x}", None, fresh_token, 200),
        ("GET", "/v1/audit", None, nothing, 200),
    ]

    declared = {(m, p): required_role(h) for m, p, h in registered_routes(controller)}
    covered = set()
    await wait_for(lambda: _is_401(rest, expiring), 10, "the short token to expire")
    for method, template, body, setup, allowed in cases:
        covered.add(_route_of(declared, method, template))
        need = declared[_route_of(declared, method, template)]
        assert need is not None, (method, template)  # every route declares one (above)
        for who in ("none", "bad", "expired", "revoked", *ROLES):
            x = await setup()
            path = template.replace("{x}", x)
            data = json.loads(json.dumps(body).replace("{x}", x)) if body else body
            token = {"none": None, "bad": "brt_nonsense", "expired": expiring,
                     "revoked": revoked, **tokens}[who]
            status, out = await rest.call(method, path, token, data)
            if need == "public":
                assert status == allowed, (method, path, who, status, out)
            elif who in ("none", "bad", "expired", "revoked"):
                assert status == 401, (method, path, who, status, out)
                word = {"none": "missing", "bad": "unknown", "expired": "expired",
                        "revoked": "revoked"}[who]
                assert word in out["message"] and "Bearer" in out["message"], out
            elif RANK[who] >= RANK[need]:
                assert status == allowed, (method, path, who, status, out)
            else:
                assert status == 403, (method, path, who, status, out)
                assert out["error"] == "forbidden" and f"needs role {need}" in out["message"]
    # Routes other branches add are still checked: authorised or 403, never unguarded.
    for (method, path), need in declared.items():
        if (method, path) in covered or need == "public":
            continue
        concrete = path.replace("{", "").replace("}", "")
        for who in ROLES:
            status, _ = await rest.call(method, concrete, tokens[who], {})
            assert (status == 403) == (RANK[who] < RANK[str(need)]), (method, path, who)
        status, _ = await rest.call(method, concrete, None, {})
        assert status == 401, (method, path)


async def _is_401(rest: Api, token: str) -> bool:
    status, _ = await rest.call("GET", "/v1/status", token)
    return status == 401


def _route_of(declared: dict[tuple[str, str], Any], method: str, path: str) -> tuple[str, str]:
    """The route template a concrete path belongs to."""
    parts = path.split("/")
    for m, template in declared:
        t = template.split("/")
        if m == method and len(t) == len(parts) and all(
            a == b or (a.startswith("{") and a.endswith("}")) for a, b in zip(t, parts,
                                                                             strict=True)
        ):
            return m, template
    raise AssertionError(f"no route for {method} {path}")


async def test_scoped_operator_reaches_only_in_scope_nodes(
    rest: Api, controller: RunningController, agents: AgentFactory
):
    dev1 = await agents.start(labels={"env": "dev", "role": "web"})
    dev2 = await agents.start(labels={"env": "dev"})
    prod = await agents.start(labels={"env": "prod", "role": "web"})
    dev_ids = sorted([dev1.node_id, dev2.node_id])
    op = await rest.token("dev-op", "operator", scope="env=dev")
    viewer = await rest.token("dev-viewer", "viewer", scope="env=dev")

    for mode in ("direct", "broadcast"):
        status, job = await rest.call("POST", "/v1/jobs", op,
                                      {"action": "ping", "mode": mode}, wait="1")
        assert status == 200, job
        assert sorted(job["expected_nodes"]) == dev_ids
        assert sorted(r["node_id"] for r in job["results"]) == dev_ids
        # Broadcast: the wire selector carries the scope, so the prod node ran nothing.
        assert job["counts"] == {"ok": 2} and job["unexpected"] == 0, job
        assert job["scope"] == "env=dev" and job["created_by"] == "dev-op"
    status, job = await rest.call("POST", "/v1/jobs", op, {"action": "ping",
                                                           "selector": "role=web"}, wait="1")
    assert job["expected_nodes"] == [dev1.node_id]
    # Only out-of-scope nodes named: accepted with an empty expected set, nothing signed.
    for spec in ({"action": "ping", "selector": "env=prod"},
                 {"action": "ping", "targets": [prod.node_id]}):
        status, job = await rest.call("POST", "/v1/jobs", op, spec, wait="1")
        assert status == 200 and job["expected_nodes"] == [] and job["results"] == [], job

    # Reads are confined too.
    status, data = await rest.call("GET", "/v1/nodes", viewer)
    assert sorted(n["id"] for n in data["nodes"]) == dev_ids
    status, data = await rest.call("GET", "/v1/nodes", viewer, selector="env=prod")
    assert data["nodes"] == []
    status, data = await rest.call("GET", f"/v1/nodes/{prod.node_id}", viewer)
    assert status == 403 and "outside the scope env=dev" in data["message"]
    status, _ = await rest.call("GET", f"/v1/nodes/{prod.node_id}/metrics/latest", viewer)
    assert status == 403
    admin_job = await rest.ok("POST", "/v1/jobs", {"action": "ping"}, wait="1")
    assert sorted(admin_job["expected_nodes"]) == sorted([*dev_ids, prod.node_id])
    status, data = await rest.call("GET", "/v1/jobs", viewer)
    assert admin_job["id"] not in {j["id"] for j in data["jobs"]} and len(data["jobs"]) == 5
    status, _ = await rest.call("GET", f"/v1/jobs/{admin_job['id']}", viewer)
    assert status == 403
    dev_job = await rest.ok("POST", "/v1/jobs", {"action": "ping", "selector": "env=dev"},
                            wait="1")
    status, _ = await rest.call("GET", f"/v1/jobs/{dev_job['id']}", viewer)
    assert status == 200  # an unscoped job whose own selector stays inside the scope
    # A join token from a scoped token enrolls only in-scope nodes.
    status, _ = await rest.call("POST", "/v1/tokens", op, {"labels": {"env": "prod"}})
    assert status == 403
    status, _ = await rest.call("POST", "/v1/tokens", op, {"labels": {"env": "dev"}})
    assert status == 201
    # The viewer role never runs anything, whatever its scope.
    status, data = await rest.call("POST", "/v1/jobs", viewer, {"action": "ping"})
    assert status == 403 and "needs role operator" in data["message"]


async def test_scoped_app_deploy_is_confined(rest: Api, controller: RunningController,
                                             agents: AgentFactory):
    dev = await agents.start(labels={"env": "dev"})
    await agents.start(labels={"env": "prod"})
    op = await rest.token("dev-op", "operator", scope="env=dev")
    app = {"name": "web", "version": "1", "start": ["true"], "step_timeout": 20}
    status, out = await rest.call("POST", "/v1/apps", op, app, wait="1")
    assert status == 200, out
    assert out["current"]["selector"] == "env=dev"
    assert sorted(out["assignments"]) == [dev.node_id]
    # An app the scope does not cover is neither visible nor touchable.
    await rest.ok("POST", "/v1/apps", {"name": "fleetwide", "version": "1",
                                       "selector": "none=none"}, wait="1")
    status, data = await rest.call("GET", "/v1/apps", op)
    assert [a["name"] for a in data["apps"]] == ["web"]
    for method, path, body in (("GET", "/v1/apps/fleetwide", None),
                               ("DELETE", "/v1/apps/fleetwide", None),
                               ("POST", "/v1/apps/fleetwide/rollback", None),
                               ("POST", "/v1/apps", {"name": "fleetwide", "version": "2"})):
        status, data = await rest.call(method, path, op, body)
        assert status == 403 and "scope" in data["message"], (method, path, data)
    assert controller.deployer.get("fleetwide").current.version == "1"


def _stream_bytes(records: list[bytes]) -> bytes:
    return b"\n".join(records)


async def _raw_audit(controller: RunningController) -> list[bytes]:
    """Every message in the AUDIT stream, read straight from JetStream."""
    info = await controller.js.stream_info(AUDIT)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await controller.js.get_msg(AUDIT, seq)
        assert msg.data is not None
        out.append(msg.data)
    return out


async def test_audit_records_every_mutating_call_and_job_and_no_secret(
    rest: Api, controller: RunningController, agents: AgentFactory
):
    node = await agents.start(labels={"env": "dev"})
    t0 = time.time()
    created = await rest.ok("POST", "/v1/auth/tokens", {"name": "ci", "role": "operator",
                                                        "scope": "env=dev"})
    api_secret = created["token"]
    join = await rest.ok("POST", "/v1/tokens", {"labels": {"env": "dev"}})
    env_secret = "s3cr3t-env-value-" + "x" * 8
    status, job = await rest.call("POST", "/v1/jobs", api_secret, {
        "shell": "test -n \"$DB_PASSWORD\" && echo ok", "env": {"DB_PASSWORD": env_secret}},
        wait="1")
    assert status == 200 and job["counts"] == {"ok": 1}, job
    app_secret = "app-env-secret-" + "y" * 8
    await rest.ok("POST", "/v1/apps", {"name": "db", "version": "1", "selector": "none=none",
                                       "env": {"TOKEN": app_secret}}, wait="1")
    status, _ = await rest.call("POST", "/v1/auth/tokens", api_secret,
                                {"name": "escalate", "role": "admin"})
    assert status == 403
    await rest.ok("DELETE", "/v1/auth/tokens/ci")

    raw = await _raw_audit(controller)
    blob = _stream_bytes(raw)
    for secret in (api_secret, join["token"], env_secret, app_secret, rest.admin):
        assert secret.encode() not in blob
    records = [json.loads(r) for r in raw]
    api = [(r["method"], r["path"], r["who"], r["role"], r["status"]) for r in records
           if r["kind"] == "api"]
    assert api == [
        ("POST", "/v1/auth/tokens", "bootstrap", "admin", 201),
        ("POST", "/v1/tokens", "bootstrap", "admin", 201),
        ("POST", "/v1/jobs", "ci", "operator", 200),
        ("POST", "/v1/apps", "bootstrap", "admin", 200),
        ("POST", "/v1/auth/tokens", "ci", "operator", 403),
        ("DELETE", "/v1/auth/tokens/ci", "bootstrap", "admin", 200),
    ]
    by_kind = {r["kind"]: r for r in records if r.get("job_id") == job["id"]
               and r["kind"] != "api"}
    sub, fin = by_kind["job.submitted"], by_kind["job.finished"]
    assert sub["who"] == "ci" and sub["role"] == "operator" and sub["scope"] == "env=dev"
    assert sub["expected"] == [node.node_id] and sub["expected_count"] == 1
    assert sub["env_keys"] == ["DB_PASSWORD"]
    assert "DB_PASSWORD" in sub["command"]
    assert fin["counts"] == {"ok": 1} and fin["outcome"] == "done"
    token_call = next(r for r in records if r["kind"] == "api")
    assert token_call["target"] == "ci" and token_call["selector"] == "env=dev"
    assert token_call["action"] == "create_api_token"

    # The API and the CLI read the same trail.
    data = await rest.ok("GET", "/v1/audit", since=str(t0), limit="1000")
    assert [r["kind"] for r in data["records"]] == [r["kind"] for r in records]
    status, data = await rest.call("GET", "/v1/audit", api_secret)
    assert status == 401  # revoked above
    code, out, err = await run_cli("audit", "ls", "--since", "1h", "-o", "json",
                                   url=rest.url, token=rest.admin)
    assert code == 0, err
    assert [r["kind"] for r in json.loads(out)] == [r["kind"] for r in records]
    status, data = await rest.call("GET", "/v1/audit", rest.admin, limit="2")
    assert [r["kind"] for r in data["records"]] == [r["kind"] for r in records[-2:]]


async def test_cli_auth_token_create_ls_revoke(rest: Api, controller: RunningController):
    code, out, err = await run_cli("auth", "token", "create", "deployer", "--role",
                                   "operator", "--scope", "env=dev", "--ttl", "30d", "-o",
                                   "json", url=rest.url, token=rest.admin)
    assert code == 0, err
    made = json.loads(out)
    secret = made["token"]
    assert made["role"] == "operator" and made["scope"] == "env=dev"
    assert 29 * 86400 < made["expires_at"] - time.time() <= 30 * 86400
    # At rest: the sha256 only.
    stored = controller.api_tokens.all()
    assert [t.name for t in stored] == ["deployer"]
    assert secret not in msgspec.json.encode(stored).decode()
    status, _ = await rest.call("GET", "/v1/nodes", secret)
    assert status == 200
    code, out, err = await run_cli("auth", "token", "ls", "-o", "json", url=rest.url,
                                   token=rest.admin)
    assert code == 0 and json.loads(out)[0]["state"] == "valid" and secret not in out
    code, out, err = await run_cli("auth", "token", "ls", url=rest.url, token=secret)
    assert code != 0 and "needs role admin" in err
    code, out, err = await run_cli("auth", "token", "revoke", "deployer", url=rest.url,
                                   token=rest.admin)
    assert code == 0, err
    status, data = await rest.call("GET", "/v1/nodes", secret)
    assert status == 401 and "revoked" in data["message"]
    code, out, err = await run_cli("auth", "token", "create", "x", "--role", "viewer",
                                   "--scope", "env in (", url=rest.url, token=rest.admin)
    assert code != 0 and "scope" in err
