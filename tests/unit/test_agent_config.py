"""Agent configuration: file, environment and flags, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import main
from agent.config import AgentConfig, ConfigError


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "agent.toml"
    f.write_text(
        '[agent]\nnats_urls = ["nats://127.0.0.2:4222"]\nbuffer_batches = 50\n'
        'labels = { role = "web" }\nmetrics_interval = 30\n'
    )
    monkeypatch.setenv("BARISTA_AGENT_BUFFER_BATCHES", "70")
    monkeypatch.setenv("BARISTA_AGENT_LABELS", "role=db,tier=1")
    cfg = AgentConfig.load(f, {"metrics_interval": 5.0})
    assert cfg.nats_urls == ["nats://127.0.0.2:4222"]
    assert cfg.buffer_batches == 70  # env beats file
    assert cfg.labels == {"role": "db", "tier": "1"}
    assert cfg.metrics_interval == 5.0  # flag beats file


@pytest.mark.parametrize(
    "content, message",
    [
        ("[agent]\nbogus = 1\n", "unknown agent setting"),
        ("[agent]\nbuffer_batches = 'many'\n", "buffer_batches"),
        ("[agent]\nnats_urls = ['http://x']\n", "must start with nats://"),
        ("[agent]\nbuffer_batches = 0\n", "at least 1"),
        ("[agent]\nfacts_interval = -1\n", "facts_interval must be positive"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, content: str, message: str):
    f = tmp_path / "agent.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        AgentConfig.load(f)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        AgentConfig.load(tmp_path / "nope.toml")


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--label", "novalue", "--state-dir", str(tmp_path)]) == 2
    assert "key=value" in capsys.readouterr().err


def test_unenrolled_agent_without_token_exits_with_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code = main(["--state-dir", str(tmp_path / "s"), "--nats-url", "nats://127.0.0.1:9"])
    assert code == 3
    assert "barista token create" in capsys.readouterr().err


def test_collector_globs_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from agent.collectors.base import DEFAULT_IGNORE_DEVICES, DEFAULT_IGNORE_FS

    f = tmp_path / "agent.toml"
    f.write_text(
        '[agent]\nnet_interfaces = ["lo", "eth*"]\ndisk_ignore_fs = []\n'
        'disk_mount_points = ["/", "/srv/*"]\n'
    )
    monkeypatch.setenv("BARISTA_AGENT_DISKIO_DEVICES", "sd*,nvme*")
    opts = AgentConfig.load(f).collector_options()
    assert opts.net_interfaces == ("lo", "eth*")
    assert opts.disk_ignore_fs == ()  # given empty: nothing ignored
    assert opts.disk_mount_points == ("/", "/srv/*")
    assert opts.diskio_devices == ("sd*", "nvme*")
    assert opts.diskio_ignore_devices == DEFAULT_IGNORE_DEVICES  # not given: the default
    assert AgentConfig.load(None).collector_options().disk_ignore_fs == DEFAULT_IGNORE_FS


def test_a_bad_collector_glob_is_a_clear_error(tmp_path: Path):
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nnet_interfaces = ["eth*", ""]\n')
    with pytest.raises(ConfigError, match="net_interfaces: a name glob must be a non-empty"):
        AgentConfig.load(f)
