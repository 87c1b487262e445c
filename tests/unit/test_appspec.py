"""App spec parsing and validation: every bad input is a BadRequest naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from controller.apps.deployer import parse_spec
from controller.errors import BadRequest

SHA = "0f" * 32


def good(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web",
        "version": "1.2.0",
        "artifacts": [{"url": "https://example.invalid/web.tgz", "sha256": SHA}],
        "install": ["tar xzf web.tgz"],
        "start": ["./web &"],
        "stop": ["pkill -f ./web || true"],
        "health": {"http": "http://127.0.0.1:8080/healthz"},
        "selector": "provider=aws,!spot",
        "batch": "25%",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_good_spec_and_its_release() -> None:
    spec = parse_spec(good())
    rel = spec.release()
    assert (rel.name, rel.version) == ("web", "1.2.0")
    assert rel.artifacts[0].sha256 == SHA and rel.health is not None
    assert rel.health.http == "http://127.0.0.1:8080/healthz" and rel.health.retries == 10
    assert spec.max_failures == "0"


YAML = """
name: api
version: 2.0
artifacts:
  - url: file:///srv/api.bin
    sha256: "%s"
    dest: api
start: ./api --port 9000 &
health:
  cmd: test -x api
  retries: 3
""" % ("AB" * 32)


def test_yaml_spec() -> None:
    spec = parse_spec(YAML, yaml_text=True)
    assert spec.version == "2.0"  # a YAML float becomes text
    assert spec.start == ["./api --port 9000 &"]
    assert spec.release().artifacts[0].sha256 == "ab" * 32


def test_unit_becomes_steps() -> None:
    spec = parse_spec(good(unit="[Service]\nExecStart=/opt/web 'x'\n"))
    rel = spec.release()
    assert any("/etc/systemd/system/barista-web.service" in s for s in rel.install)
    assert rel.start[-1] == "systemctl restart barista-web.service"
    assert rel.stop[0].startswith("systemctl stop barista-web.service")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (good(name=None), "'name' is required"),
        (good(version=None), "'version' is required"),
        (good(version=""), "'version' is required"),
        (good(name="Web_App"), "'name'"),
        (good(name="x" * 41), "'name'"),
        (good(version="1 0"), "'version'"),
        (good(artifacts=[{"url": "https://h/a", "sha256": "abc"}]), "'artifacts[0].sha256'"),
        (good(artifacts=[{"url": "https://h/a", "sha256": "g" * 64}]), "'artifacts[0].sha256'"),
        (good(artifacts=[{"url": "ftp://h/a", "sha256": SHA}]), "'artifacts[0].url'"),
        (good(artifacts=[{"url": "https://h/a", "sha256": SHA, "dest": "../x"}]),
         "'artifacts[0].dest'"),
        (good(artifacts=[{"url": "https://h/a", "sha256": SHA, "mode": "0755"}]),
         "mode"),
        (good(colour="blue"), "colour"),
        (good(selector="region in ("), "'selector'"),
        (good(batch="half"), "'batch'"),
        (good(batch="0"), "'batch'"),
        (good(max_failures="lots"), "'max_failures'"),
        (good(health={"http": "http://10.0.0.1/healthz"}), "'health.http'"),
        (good(health={"http": "http://example.com/"}), "'health.http'"),
        (good(health={}), "'health'"),
        (good(health={"cmd": "true", "retries": 0}), "'health.retries'"),
        (good(health={"cmd": "true", "probe": 1}), "probe"),
        (good(health_timeout=0), "'health_timeout'"),
        (good(install="  "), "'install[0]'"),
        (good(start=[1]), "start"),
        (good(env={"A=B": "1"}), "'env'"),
    ],
)
def test_bad_specs_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_spec(data)
    assert field in info.value.message


@pytest.mark.parametrize(
    ("text", "yaml_text", "expect"),
    [
        ("{not json", False, "not valid JSON"),
        ("name: [unclosed", True, "not valid YAML"),
        ("- a\n- b\n", True, "must be a mapping"),
    ],
)
def test_bad_documents(text: str, yaml_text: bool, expect: str) -> None:
    with pytest.raises(BadRequest, match=expect):
        parse_spec(text, yaml_text=yaml_text)
