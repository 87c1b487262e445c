"""A job's spec and results are converted to and from the wire in one place each; these
check that the controller's copies of the wire fields cannot drift from protocol/."""

from __future__ import annotations

import msgspec

from controller.jobs.engine import JobSpec, NodeResult
from protocol.messages import Command, CommandResult


def _defaults(cls: type[msgspec.Struct]) -> dict[str, object]:
    return {f.name: (f.default, f.default_factory) for f in msgspec.structs.fields(cls)}


def test_every_command_field_a_job_sets_is_in_the_spec_with_the_same_default() -> None:
    per_command = {"v", "id", "job_id", "issued_at", "ttl", "action"}
    spec, cmd = _defaults(JobSpec), _defaults(Command)
    for name in set(cmd) - per_command:
        assert name in spec, name
        assert spec[name] == cmd[name], name


def test_every_result_field_is_kept_in_the_node_result() -> None:
    per_message = {"v", "job_id", "command_id"}
    converted = {"status", "data"}  # NodeResult.of maps these; the others go over as they are
    node, res = _defaults(NodeResult), _defaults(CommandResult)
    for name in set(res) - per_message:
        assert name in node, name
        assert name in converted or node[name] == res[name], name


def test_spec_to_command_and_result_to_node_result() -> None:
    spec = JobSpec(shell="true", env={"A": "1"}, cwd="/", timeout=5.0, output_cap=10)
    cmd = spec.command(id="c", job_id="j", issued_at=1.0, ttl=37.0, selector="a=b",
                       targets=["n1"])
    assert (cmd.shell, cmd.env, cmd.cwd, cmd.timeout, cmd.output_cap, cmd.action) == (
        "true", {"A": "1"}, "/", 5.0, 10, "exec")
    assert (cmd.selector, cmd.targets, cmd.ttl) == ("a=b", ["n1"], 37.0)
    res = CommandResult(job_id="j", command_id="c", node_id="n1", status="failed",
                        exit_code=2, stdout="o", duration=0.5)
    node = NodeResult.of(res, expected=True, batch=1)
    assert (node.node_id, node.status, node.exit_code, node.stdout, node.duration) == (
        "n1", "failed", 2, "o", 0.5)
