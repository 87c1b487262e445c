"""App deploys end to end: real controller, NATS, in-process agents, real files and processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner

from agent.runtime import Agent
from controller.apps.deployer import Deployer, parse_spec
from controller.cli.main import main as cli_main
from controller.service import RunningController
from tests.fixtures.controller import AgentFactory
from tests.fixtures.wait import wait_for

APP = "web"


def artifact(tmp_path: Path, version: str) -> tuple[str, str]:
    """(file:// URL, sha256) of a payload file that names its version."""
    path = tmp_path / "artifacts" / f"payload-{version}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{version}\n")
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


def spec(tmp_path: Path, version: str, *, healthy: bool = True, sha: str = "",
         **extra: Any) -> dict[str, Any]:
    url, digest = artifact(tmp_path, version)
    # The start step publishes the payload as ../running (the app dir) and drops a marker
    # the health check looks for; an unhealthy version starts but never writes the marker.
    start = "cp payload.txt ../running" + (" && touch marker" if healthy else "")
    return {
        "name": APP,
        "version": version,
        "artifacts": [{"url": url, "sha256": sha or digest, "dest": "payload.txt"}],
        "install": ["test -s payload.txt"],
        "start": [start],
        "stop": [f"echo stop-{version} >> ../stops.log", "rm -f ../running marker"],
        "health": {"cmd": "test -f marker", "retries": 2, "interval": 0.1, "timeout": 5},
        "health_timeout": 20,
        **extra,
    }


def app_dir(agent: Agent) -> Path:
    return agent.config.state_dir / "apps" / APP


def running_version(agent: Agent) -> str | None:
    try:
        return (app_dir(agent) / "running").read_text().strip()
    except FileNotFoundError:
        return None


def deployer(controller: RunningController) -> Deployer:
    assert controller.deployer is not None
    return controller.deployer


async def deploy_and_wait(controller: RunningController, data: dict[str, Any]) -> dict[str, Any]:
    d = deployer(controller)
    await d.deploy(parse_spec(data))
    await asyncio.wait_for(d.wait(APP), 40)
    return d.status(APP)


async def reported(controller: RunningController, agent: Agent, version: str, state: str) -> None:
    d = deployer(controller)

    def ok() -> bool:
        st = d.node_statuses(APP).get(agent.node_id)
        return st is not None and st.version == version and st.state == state

    await wait_for(ok, 15, f"{agent.node_id} to report {APP} {version} {state}")


async def test_deploy_then_failed_health_rolls_back(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    a1, a2 = await agents.start(), await agents.start()
    st = await deploy_and_wait(controller, spec(tmp_path, "1.0"))
    assert st["rollout"]["status"] == "done", st["rollout"]
    for a in (a1, a2):
        assert running_version(a) == "1.0"
        assert st["nodes"][a.node_id]["assigned"] == "1.0"
        await reported(controller, a, "1.0", "running")
        assert json.loads((app_dir(a).parent / "state.json").read_text()) == {APP: "1.0"}

    st = await deploy_and_wait(controller, spec(tmp_path, "2.0", healthy=False))
    r = st["rollout"]
    assert r["status"] == "rolled-back", r
    assert "rolled back to 1.0" in r["message"]
    assert set(r["failed"]) == {a1.node_id, a2.node_id}
    assert "health check failed" in r["message"]
    assert st["current"]["version"] == "2.0" and st["previous"]["version"] == "1.0"
    for a in (a1, a2):
        assert st["nodes"][a.node_id]["assigned"] == "1.0"
        await reported(controller, a, "1.0", "running")
        assert running_version(a) == "1.0"
        # v1 was stopped for v2, then v2 stopped for the rollback
        assert (app_dir(a) / "stops.log").read_text().split() == ["stop-1.0", "stop-2.0"]


async def test_bad_checksum_keeps_old_version_running(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    a1 = await agents.start()
    await deploy_and_wait(controller, spec(tmp_path, "1.0"))
    assert running_version(a1) == "1.0"

    st = await deploy_and_wait(controller, spec(tmp_path, "2.0", sha="ab" * 32))
    r = st["rollout"]
    assert r["status"] == "rolled-back", r
    err = r["failed"][a1.node_id]
    assert "checksum mismatch for file://" in err and "payload-2.0.txt" in err
    assert f"expected {'ab' * 32}, got " in err
    # Nothing of 2.0 ran, and 1.0 was never stopped.
    assert running_version(a1) == "1.0"
    assert not (app_dir(a1) / "stops.log").exists()
    assert not (app_dir(a1) / "2.0" / "payload.txt").exists()
    await reported(controller, a1, "1.0", "running")


async def test_offline_node_converges_when_it_returns(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    a1, a2 = await agents.start(), await agents.start()
    state_dir, node2 = a2.config.state_dir, a2.node_id
    await a2.stop()
    assert controller.fleet is not None
    fleet = controller.fleet

    def offline() -> bool:
        rec = fleet.nodes.get(node2)
        return rec is not None and rec.status == "offline"

    await wait_for(offline, 10, "node 2 offline")

    st = await deploy_and_wait(controller, spec(tmp_path, "1.0"))
    r = st["rollout"]
    assert r["status"] == "done", r
    assert r["pending"] == [node2] and not r.get("failed")
    assert st["nodes"][node2]["assigned"] == "1.0"
    assert running_version(a1) == "1.0"
    assert not (state_dir / "apps" / APP).exists()

    back = await agents.start(token="", state_dir=state_dir)
    assert back.node_id == node2
    await reported(controller, back, "1.0", "running")
    assert running_version(back) == "1.0"


async def test_batch_rollout_stops_at_first_failing_node(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    started = [await agents.start(), await agents.start()]
    first, second = sorted(started, key=lambda a: a.node_id)
    st = await deploy_and_wait(
        controller, spec(tmp_path, "1.0", healthy=False, batch="1", max_failures="0"))
    r = st["rollout"]
    assert r["status"] == "rolled-back", r
    assert r["batch"] == 1 and r["batches"] == 2
    assert list(r["failed"]) == [first.node_id]
    assert "(removed)" in r["message"]
    assert st["assignments"] == {}  # no previous version: the app is taken off again
    await reported(controller, first, "1.0", "removed")
    assert not app_dir(first).exists()
    # The second node was never asked to run the bad version.
    assert second.node_id not in deployer(controller).node_statuses(APP)
    assert not app_dir(second).exists()


async def test_api_yaml_deploy_and_cli(
    controller: RunningController, agents: AgentFactory, api: tuple[str, str],
    http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: Any,
) -> None:
    import yaml

    a1 = await agents.start()
    url, token = api
    headers = {"Authorization": f"Bearer {token}"}
    body = yaml.safe_dump(spec(tmp_path, "1.0"))
    async with http.post(f"{url}/v1/apps?wait=true", data=body,
                         headers={**headers, "Content-Type": "application/yaml"}) as resp:
        out = await resp.json()
        assert resp.status == 200, out
    assert out["rollout"]["status"] == "done"
    assert out["nodes"][a1.node_id]["assigned"] == "1.0"

    bad = {**spec(tmp_path, "2.0"), "colour": "blue"}
    async with http.post(f"{url}/v1/apps", json=bad, headers=headers) as resp:
        err = await resp.json()
        assert resp.status == 400 and err["error"] == "bad_request"
        assert "colour" in err["message"]

    monkeypatch.setenv("BARISTA_URL", url)
    monkeypatch.setenv("BARISTA_TOKEN", token)
    runner = CliRunner()

    def cli(*args: str) -> Any:
        res = runner.invoke(cli_main, list(args), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res

    res = await asyncio.to_thread(cli, "app", "status", APP, "-o", "json")
    assert json.loads(res.output)["nodes"][a1.node_id]["state"] == "running"
    res = await asyncio.to_thread(cli, "app", "ls", "-o", "json")
    assert [a["name"] for a in json.loads(res.output)] == [APP]

    v2 = tmp_path / "v2.yaml"
    v2.write_text(yaml.safe_dump(spec(tmp_path, "2.0")))
    res = await asyncio.to_thread(cli, "app", "deploy", "-f", str(v2), "-o", "json")
    assert json.loads(res.output)["rollout"]["status"] == "done"
    assert running_version(a1) == "2.0"

    res = await asyncio.to_thread(cli, "app", "rollback", APP, "-o", "json")
    assert json.loads(res.output)["current"]["version"] == "1.0"
    assert running_version(a1) == "1.0"

    res = await asyncio.to_thread(cli, "app", "rm", APP, "-o", "json")
    assert json.loads(res.output)["removed_from"] == [a1.node_id]
    await reported(controller, a1, "1.0", "removed")
    assert not app_dir(a1).exists()
    async with http.get(f"{url}/v1/apps/{APP}", headers=headers) as resp:
        assert resp.status == 404


async def test_new_node_with_no_apps_asks_for_none_and_one_with_apps_gets_them(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    """Enrolled with nothing assigned, an agent makes no app-sync request (5,000 agents
    enrolling make none); one enrolling after a rollout to its labels gets the app."""
    d = deployer(controller)
    first = await agents.start()
    await wait_for(lambda: controller.fleet.last_beat(first.node_id) is not None, 10, "a beat")
    assert d.stats["syncs"] == 0
    # it says "not synced" in its first heartbeats only (not forever)
    await wait_for(first._apps_synced, 10, "heartbeats that no longer say 'not synced'")
    assert d.stats["syncs"] == 0
    st = await deploy_and_wait(controller, spec(tmp_path, "1.0"))
    assert st["rollout"]["status"] == "done"
    assert running_version(first) == "1.0"
    later = await agents.start()
    await reported(controller, later, "1.0", "running")
    assert running_version(later) == "1.0"


async def test_app_assigned_before_the_agent_subscribed_reaches_it_after_its_heartbeat(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    """The window between the enrollment reply ("no apps") and the agent's subscriptions:
    an app rolled out to its labels then is told to it after its first heartbeat (it says
    it has not synced), not lost until its next restart."""
    st = await deploy_and_wait(controller, spec(tmp_path, "1.0"))
    assert st["rollout"]["status"] == "done"
    # The reply as it was made before the rollout: nothing assigned.
    controller.enrollment._has_apps = lambda _node: False
    agent = await agents.start()
    await reported(controller, agent, "1.0", "running")
    assert running_version(agent) == "1.0"
    assert agent.apps is not None and agent.apps.passes >= 1
