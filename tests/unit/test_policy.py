"""The node-side command policy: how rules match argv and shell commands, and the tricks
(metacharacters, newlines, extra arguments, env) that must never pass."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError
from agent.policy import CommandPolicy, PolicyError
from protocol.messages import Command

RULES = ["uptime", "systemctl restart app-*", "df -h", "re:journalctl -u [a-z]+ -n [0-9]{1,3}"]


def cmd(**kw: object) -> Command:
    base: dict[str, object] = {"id": "c1", "job_id": "j1", "issued_at": time.time(),
                               "ttl": 60.0, "action": "exec"}
    return Command(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture
def policy() -> CommandPolicy:
    return CommandPolicy.build(commands=RULES)


@pytest.mark.parametrize("argv", [
    ["uptime"],
    ["df", "-h"],
    ["systemctl", "restart", "app-web"],
    ["systemctl", "restart", "app-web.service"],
    ["journalctl", "-u", "nginx", "-n", "50"],
])
def test_allowed_argv(policy: CommandPolicy, argv: list[str]) -> None:
    assert policy.check(cmd(argv=argv)) is None


@pytest.mark.parametrize("shell", [
    "uptime", "df -h", "systemctl restart app-web", "journalctl -u nginx -n 50",
])
def test_allowed_shell(policy: CommandPolicy, shell: str) -> None:
    assert policy.check(cmd(shell=shell)) is None


@pytest.mark.parametrize("shell", [
    "uptime; rm -rf /",
    "uptime && x",
    "uptime || x",
    "uptime | sh",
    "uptime\nrm -rf /",
    "uptime\n",
    "uptime &",
    "uptime $(rm -rf /)",
    "uptime `id`",
    "uptime > /etc/passwd",
    " uptime",
    "uptime  ",
    "df  -h",
    "df -h /",
    "systemctl restart app-x; rm -rf /",
    "systemctl restart app-x&&id",
    "systemctl restart app-$(id)",
    "systemctl restart app-x y",
    "systemctl restart app-*",
    "systemctl restart app-x\nid",
    "systemctl restart app-x #",
    "journalctl -u nginx -n 50; id",
    "journalctl -u nginx -n 50\nid",
    "rm -rf /",
    "",
])
def test_refused_shell_tricks(policy: CommandPolicy, shell: str) -> None:
    reason = policy.check(cmd(shell=shell) if shell else cmd(argv=[]))
    assert reason is not None and "matches no allowed command" in reason


@pytest.mark.parametrize("argv", [
    ["uptime", "-p"],                          # extra argument
    ["uptime;", "rm", "-rf", "/"],
    ["uptime; rm -rf /"],                      # one odd argv element is not "uptime"
    ["uptime\n"],
    ["df", "-h", "/"],
    ["df -h"],                                 # one word "df -h" is not argv df, -h
    ["systemctl", "restart", "app-x", "--force"],
    ["systemctl", "restart", "app-x y"],
    ["systemctl", "restart", "app-x;id"],
    ["systemctl", "restart"],
    ["sh", "-c", "uptime"],
    ["journalctl", "-u", "nginx", "-n", "50", "-f"],
    ["journalctl", "-u", "nginx -n 50"],       # regex sees the quoted join
    [],
])
def test_refused_argv(policy: CommandPolicy, argv: list[str]) -> None:
    reason = policy.check(cmd(argv=argv))
    assert reason is not None and "matches no allowed command" in reason


def test_literal_metacharacters_only_when_spelled_out() -> None:
    p = CommandPolicy.build(commands=["uptime | head -1"])
    assert p.check(cmd(shell="uptime | head -1")) is None
    assert p.check(cmd(shell="uptime | head -1; id")) is not None


def test_actions_apps_and_env() -> None:
    p = CommandPolicy.build(commands=["uptime"], actions=["ping", "exec"], apps=False,
                            env=["LANG"])
    assert p.check(cmd(action="ping")) is None
    assert "not allowed" in (p.check(cmd(action="facts")) or "")
    assert "policy_apps = false" in (p.check(cmd(action="reconcile")) or "")
    assert p.check(cmd(argv=["uptime"], env={"LANG": "C"})) is None
    reason = p.check(cmd(argv=["uptime"], env={"PATH": "/tmp/evil", "LANG": "C"}))
    assert reason is not None and "PATH" in reason
    assert "LD_PRELOAD" in (p.check(cmd(shell="uptime", env={"LD_PRELOAD": "x"})) or "")


def test_policy_without_commands_allows_no_exec() -> None:
    p = CommandPolicy.build(apps=False)
    assert p.check(cmd(action="ping")) is None
    assert p.check(cmd(argv=["uptime"])) is not None
    assert p.check(cmd(action="reconcile")) is not None


def test_reason_quotes_control_characters_visibly(policy: CommandPolicy) -> None:
    reason = policy.check(cmd(shell="uptime\nrm -rf /" + "x" * 500)) or ""
    assert "\\n" in reason and "\n" not in reason and len(reason) < 200


@pytest.mark.parametrize(("kw", "msg"), [
    ({"commands": ["re:("]}, "not a valid regex"),
    ({"commands": [""]}, "non-empty"),
    ({"commands": ["a\nb"]}, "control character"),
    ({"actions": ["exec", "reboot"]}, "unknown reboot"),
])
def test_bad_rules_are_config_errors(kw: dict[str, list[str]], msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        CommandPolicy.build(**kw)  # type: ignore[arg-type]


def test_config_table_and_flat_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("POLICY_COMMANDS", "POLICY_ACTIONS", "POLICY_APPS", "POLICY_ENV"):
        monkeypatch.delenv(f"BARISTA_AGENT_{k}", raising=False)
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nlog_level = "info"\n[policy]\ncommands = ["uptime"]\napps = false\n')
    cfg = AgentConfig.load(f)
    p = cfg.command_policy()
    assert p is not None and not p.apps and p.check(cmd(argv=["uptime"])) is None
    f.write_text('policy_actions = ["ping"]\n')
    p = AgentConfig.load(f).command_policy()
    assert p is not None and p.actions == {"ping"}
    f.write_text('log_level = "info"\n')
    assert AgentConfig.load(f).command_policy() is None
    f.write_text('[policy]\ncommands = ["re:("]\n')
    with pytest.raises(ConfigError, match="not a valid regex"):
        AgentConfig.load(f)
    f.write_text('[policy]\ncomands = ["uptime"]\n')
    with pytest.raises(ConfigError, match="comands"):
        AgentConfig.load(f)
    monkeypatch.setenv("BARISTA_AGENT_POLICY_COMMANDS", "uptime,df -h")
    f.write_text('log_level = "info"\n')
    p = AgentConfig.load(f).command_policy()
    assert p is not None and p.check(cmd(argv=["df", "-h"])) is None
