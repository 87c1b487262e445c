"""The node-side command policy with a real controller and real agents: a locked-down node
refuses what its policy does not allow (answering 'rejected' with the reason, running
nothing) and runs what it allows, even though both are signed by the controller's key."""

from __future__ import annotations

from pathlib import Path

from controller.jobs.engine import JobSpec
from controller.service import RunningController
from tests.fixtures.controller import AgentFactory


async def test_policy_refuses_one_job_and_allows_another(
    controller: RunningController, agents: AgentFactory, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    locked = await agents.start(
        labels={"tier": "locked"},
        policy_commands=["uptime", f"touch {marks}/allowed-*"],
        policy_apps=False,
    )
    free = await agents.start(labels={"tier": "free"})

    # A trick on an allowed prefix: refused on the locked node, before anything ran.
    job = await controller.jobs.run(
        JobSpec(shell=f"touch {marks}/allowed-1; touch {marks}/pwned", selector="tier=locked",
                timeout=10)
    )
    (r,) = await controller.jobs.results(job.id)
    assert r.status == "rejected" and "refused by node policy" in r.reason
    assert "matches no allowed command" in r.reason
    assert job.counts == {"rejected": 1}
    assert sorted(p.name for p in marks.iterdir()) == []
    assert locked.policy_rejected == 1 and locked.rejected_commands == 1

    # The allowed command runs (argv and shell alike).
    job = await controller.jobs.run(
        JobSpec(argv=["touch", f"{marks}/allowed-a"], selector="tier=locked", timeout=10)
    )
    assert job.counts == {"ok": 1}
    job = await controller.jobs.run(JobSpec(shell="uptime", selector="tier=locked", timeout=10))
    assert job.counts == {"ok": 1}
    assert sorted(p.name for p in marks.iterdir()) == ["allowed-a"]

    # App reconciles are off on the locked node; the node without a policy takes anything.
    job = await controller.jobs.run(JobSpec(action="reconcile", selector="tier=locked",
                                            timeout=10))
    (r,) = await controller.jobs.results(job.id)
    assert r.status == "rejected" and "policy_apps = false" in r.reason
    job = await controller.jobs.run(
        JobSpec(shell=f"touch {marks}/free; true", selector="tier=free", timeout=10)
    )
    assert job.counts == {"ok": 1}
    assert free.policy_rejected == 0 and locked.policy_rejected == 2
