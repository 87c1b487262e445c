"""`barista demo` as a user runs it: a real subprocess with embedded NATS and local agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli.demo_lab import lab_unavailable


def demo(tmp_path: Path, *args: str, mode: str = "process", timeout: float = 90
         ) -> tuple[int, dict[str, object], str]:
    # TMPDIR: the demo's temp data dir lands in this test's own directory. 8 s: time for a
    # loaded machine to start the controller and bring both agents online with metrics.
    env = {**os.environ, "TMPDIR": str(tmp_path), "BARISTA_CONFIG": "/nonexistent/x.toml"}
    env.pop("BARISTA_INFLUX_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "demo", "--duration", "8s", "--agents", "2",
         "--mode", mode, "-o", "json", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the demo then stops its own nats-server and agents
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return proc.returncode, json.loads(out or b"{}"), err.decode()


def test_demo_brings_the_fleet_online_and_removes_its_temp_dir(tmp_path: Path) -> None:
    code, result, err = demo(tmp_path)
    assert code == 0, err[-2000:]
    assert result["all_online_after"] is not None
    assert len(result["nodes"]) == 2  # type: ignore[arg-type]
    assert "removed" in err
    assert not list(tmp_path.glob("barista-demo-*"))


@pytest.mark.slow
def test_demo_keep_leaves_logs_and_state(tmp_path: Path) -> None:
    code, _, err = demo(tmp_path, "--keep")
    assert code == 0, err[-2000:]
    [kept] = tmp_path.glob("barista-demo-*")
    assert (kept / "controller" / "nats" / "nats-server.log").exists()
    assert list((kept / "agents").glob("*.log"))


def _lab_objects() -> set[str]:
    """Namespaces and host interfaces carrying a lab prefix (``bl`` + 6 hex)."""
    import re
    import subprocess as sp

    text = (sp.run(["ip", "netns", "list"], capture_output=True, text=True).stdout + "\n"
            + sp.run(["ip", "-o", "link"], capture_output=True, text=True).stdout)
    return set(re.findall(r"\bbl[0-9a-f]{6}[-\w]*", text))


@pytest.mark.slow
@pytest.mark.skipif(lab_unavailable() is not None, reason=f"lab: {lab_unavailable()}")
def test_demo_on_the_lab_cloud_provisions_three_clouds_and_cleans_up(tmp_path: Path) -> None:
    """As root the demo provisions 3 clouds x 1 node through the engine (a private site
    among them), runs its broadcast and app deploy, and deletes everything on exit."""
    before = _lab_objects()
    code, result, err = demo(tmp_path, "--per-cloud", "1", mode="lab", timeout=400)
    assert code == 0, err[-3000:]
    assert result["all_online_after"] is not None
    assert len(result["nodes"]) == 3  # type: ignore[arg-type]
    assert "infra demo: ready" in err and "behind NAT" in err, err[-3000:]
    assert "broadcast" in err
    assert not list(tmp_path.glob("barista-demo-*"))
    assert _lab_objects() <= before, _lab_objects() - before
