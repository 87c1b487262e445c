"""Providers and the catalog through the real API and CLI of a controller configured with
a sim cloud and AWS (moto): list, credentials check (working and missing), size search."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.api.app import ApiServer
from controller.service import Controller
from tests.fixtures.controller import controller_config, run_cli

pytest.importorskip("boto3")


@pytest.fixture
async def api_url(tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[str, str]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = controller_config(tmp_path / "ctl", providers={
        "sim-a": {"kind": "sim"},
        "aws": {"endpoint_url": moto_url},
        "aws-nocreds": {"kind": "aws", "endpoint_url": moto_url, "profile": "no-such"},
    })
    async with Controller(cfg) as c, ApiServer(c, host="127.0.0.1", port=0) as api:
        c.provisioning.set_api_url(api.url)
        yield api.url, c.secrets.api_token


async def test_providers_and_catalog(api_url: tuple[str, str]) -> None:
    url, token = api_url
    code, out, err = await run_cli("provider", "ls", "-o", "json", url=url, token=token)
    assert code == 0, err
    names = {p["name"]: p for p in json.loads(out)["providers"]}
    assert set(names) == {"sim-a", "aws", "aws-nocreds"}
    assert "us-east-1" in names["aws"]["regions"]
    code, out, err = await run_cli("provider", "check", "aws", "-o", "json", url=url,
                                   token=token)
    assert code == 0 and json.loads(out)["ok"], (out, err)
    code, out, err = await run_cli("provider", "check", "aws-nocreds", url=url, token=token)
    assert code == 1 and "credentials" in out and "no-such" in out, (out, err)
    code, out, err = await run_cli("provider", "check", "gcp", url=url, token=token)
    assert code == 1 and "no provider 'gcp'" in err, (out, err)
    code, out, err = await run_cli("catalog", "sizes", "--vcpus", "2", "--memory-gb", "4",
                                   "--provider", "aws", "-o", "json", url=url, token=token)
    sizes = json.loads(out)["sizes"]
    assert sizes and all(s["vcpus"] >= 2 and s["memory_gb"] >= 4 for s in sizes)
    priced = [s["price_hour"] for s in sizes if s["price_hour"] is not None]
    assert priced == sorted(priced) and sizes[0]["price_hour"] is not None
    code, out, err = await run_cli("catalog", "sizes", "--near", "37.5,127", "-o", "json",
                                   url=url, token=token)
    near = json.loads(out)["sizes"]
    assert near[0]["region"] == "ap-northeast-2", near[0]  # Seoul first
    code, out, err = await run_cli("catalog", "sizes", "--near", "91,0", url=url, token=token)
    assert code == 1 and "latitude" in err
    code, out, err = await run_cli("catalog", "regions", url=url, token=token)
    assert code == 0 and "us-east-1" in out
