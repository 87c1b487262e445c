"""A node is Ready when it is, not when its batch is answered: over the ARM fake (whose VM
create operation ends when the VM booted, and whose batch the provider follows until none
is still being created) a VM that booted fast is Ready while another of its batch is still
being created."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.provision.spec import spec_from_obj
from tests.fixtures.provision import SimLab, settled_in

pytest.importorskip("azure.mgmt.compute")


async def test_a_booted_vm_is_ready_before_its_batch_is_answered(simlab: SimLab,
                                                                tmp_path: Path) -> None:
    from tests.fakes.clouds import FAST, AgentBooter, sdk_clouds

    fast, slow = "rdy-az-0", "rdy-az-1"
    booter = AgentBooter(asyncio.get_running_loop(), tmp_path / "vms",
                         fixed={fast: 0.2, slow: 6.0})
    seen: dict[str, str] = {}
    try:
        with sdk_clouds(tmp_path, times=FAST, on_create=booter) as clouds:
            def slow_state() -> str:
                with clouds.arm.api.lock:
                    vm = [r for r in clouds.arm.state.of_type("virtualmachines")
                          if r["name"] == slow]
                    return str(vm[0]["properties"]["provisioningState"]) if vm else "absent"

            def on_progress(ev: object) -> None:
                node, phase = getattr(ev, "node", ""), getattr(ev, "phase", "")
                if node and phase == "ready" and node not in seen:
                    seen[node] = slow_state()  # the other VM's, when this one was Ready

            async with simlab.engine(clouds.providers(azure_poll=2.0)) as engine:
                unsubscribe = engine.subscribe(on_progress)
                await engine.create(spec_from_obj({"name": "rdy", "groups": [
                    {"name": "az", "provider": "azure", "regions": ["eastus"],
                     "size": "Standard_B1s", "count": 2}]}, catalogs=engine.catalogs()))
                await settled_in(engine, "rdy", ("ready",), 60)
                unsubscribe()
                assert seen[fast] == "Creating", seen  # Ready while the batch was not done
                assert set(seen) == {fast, slow}
                await engine.delete("rdy")
                await settled_in(engine, "rdy", ("deleted",), 60)
            assert clouds.leftovers("rdy")["azure"] == []
    finally:
        await booter.stop()
