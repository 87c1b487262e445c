"""Node-bound join tokens: a token made for one node enrolls only that node, as that id."""

from __future__ import annotations

import pytest

from agent.runtime import Agent, EnrollmentError
from controller.errors import BadRequest
from controller.service import RunningController
from tests.fixtures.controller import AgentFactory


async def test_bound_token_enrolls_only_its_node(
    controller: RunningController, agents: AgentFactory
):
    tok = await controller.tokens.create(
        labels={"infra": "web", "group": "eu"}, node_name="web-eu-0")
    assert tok.record.node_name == "web-eu-0"
    intruder = Agent(config=agents.config(tok.token, hostname="someone-else"))
    with pytest.raises(EnrollmentError) as err:
        async with intruder:
            pass
    assert err.value.code == "token_node_mismatch"
    assert "web-eu-0" in str(err.value)
    # The refusal did not use the token up: the right machine still enrolls with it.
    (record,) = list(controller.tokens_table)
    assert not record.used_by
    agent = await agents.start(token=tok.token, hostname="web-eu-0",
                               labels={"infra": "spoofed"})
    assert agent.node_id == "web-eu-0"
    node = controller.fleet.get("web-eu-0")
    assert node.labels == {"infra": "web", "group": "eu"}
    used = controller.tokens_table.get(tok.record.id)
    assert used is not None and used.used_by == "web-eu-0"


async def test_bound_token_is_one_time(controller: RunningController, agents: AgentFactory):
    tok = await controller.tokens.create(node_name="db-0")
    await agents.start(token=tok.token, hostname="db-0")
    again = Agent(config=agents.config(tok.token, hostname="db-0"))
    with pytest.raises(EnrollmentError) as err:
        async with again:
            pass
    assert err.value.code == "token_used"


@pytest.mark.parametrize("name", ["Web-0", "-a", "a_b", "x" * 64, "a.b"])
async def test_bad_node_names_are_refused(controller: RunningController, name: str):
    with pytest.raises(BadRequest, match="node name"):
        await controller.tokens.create(node_name=name)
