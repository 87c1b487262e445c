"""The engine killed in the middle of a create over the SDK providers (aws on moto, gcp and
azure on their fakes, through boto3 / google-cloud-compute / azure-mgmt-*): a fresh engine
on the same KV with fresh providers resumes, and every VM exists once (EC2 client tokens,
GCE request ids, ARM names), gc finds nothing, and a delete leaves nothing at the clouds.

A kill cancels the engine while SDK requests are in flight: they still reach the cloud
and are answered to nobody (the worst case for duplicates). The 100-node variant is
``bench/provision.py --clouds sdk``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from controller.provision.engine import Engine
from controller.provision.spec import spec_from_obj
from tests.fixtures.provision import SimLab, settled_in
from tests.fixtures.wait import wait_for

pytest.importorskip("moto")
pytest.importorskip("google.cloud.compute_v1")
pytest.importorskip("azure.mgmt.compute")

PER_CLOUD = 3
GROUPS = {"aws": ("us-east-1", "t3.micro"), "gcp": ("us-central1", "e2-small"),
          "azure": ("eastus", "Standard_B1s")}


def spec(engine: Engine, name: str) -> Any:
    return spec_from_obj({"name": name, "groups": [
        {"name": p, "provider": p, "regions": [region], "size": size, "count": PER_CLOUD}
        for p, (region, size) in GROUPS.items()]}, catalogs=engine.catalogs())


class CreateCounter:
    """Wraps the booter: counts VM create requests as the clouds receive them, and says
    when the ``kill_at``-th one of ``cloud`` arrived."""

    def __init__(self, boot: Any, cloud: str) -> None:
        self.boot = boot
        self.cloud = cloud
        self.seen = 0
        self.kill_at = 0
        self.hit = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, provider: str, name: str, user_data: str) -> float:
        with self._lock:
            if provider == self.cloud:
                self.seen += 1
                if self.kill_at and self.seen >= self.kill_at:
                    self.hit.set()
        boot_s: float = self.boot(provider, name, user_data)
        return boot_s


async def settled(engine: Engine, name: str, statuses: tuple[str, ...]) -> None:
    await settled_in(engine, name, statuses, 60)


@pytest.mark.slow
@pytest.mark.parametrize(("cloud", "kill_at"), [("aws", 2), ("gcp", 1), ("azure", 2)])
async def test_killed_mid_create_over_sdk_clouds_leaves_no_orphan(
        simlab: SimLab, tmp_path: Path, cloud: str, kill_at: int) -> None:
    import dataclasses

    from tests.fakes.clouds import FAST, AgentBooter, sdk_clouds

    # Creates that take long to land: the ones in flight at the kill arrive after the next
    # engine looked for its VMs, so only the clouds' idempotency keys prevent duplicates.
    times = dataclasses.replace(FAST, create=(3.0, 4.0))

    booter = AgentBooter(asyncio.get_running_loop(), tmp_path / "vms", boot=0.3,
                         jitter=0.2)
    counter = CreateCounter(booter, cloud)
    name = f"k{cloud}"
    try:
        with sdk_clouds(tmp_path, times=times, on_create=counter) as clouds:
            counter.kill_at = kill_at

            status_at_kill: list[str] = []

            async def first() -> None:
                async with simlab.engine(clouds.providers(azure_poll=0.05)) as engine:
                    await engine.create(spec(engine, name))
                    try:
                        await asyncio.Event().wait()  # until killed
                    finally:
                        view = engine.get(name)
                        status_at_kill.append(view.status if view else "?")

            task = asyncio.create_task(first())
            await wait_for(counter.hit.is_set, 60, f"{kill_at} VM creates at {cloud}")
            task.cancel()  # the kill: requests in flight still reach the clouds
            with contextlib.suppress(asyncio.CancelledError):
                await task
            killed_at = counter.seen  # creates of that cloud sent before the kill
            assert status_at_kill == ["creating"], status_at_kill  # killed mid-create

            async with simlab.engine(clouds.providers(azure_poll=0.05)) as engine:
                await settled(engine, name, ("ready",))
                view = engine.get(name)
                assert view is not None and view.status == "ready", view
                assert not view.leaks, view.leaks
                live = clouds.live_vms(name)
                for p in GROUPS:
                    want = {f"{name}-{p}-{i}": 1 for i in range(PER_CLOUD)}
                    assert dict(live[p]) == want, (p, killed_at, dict(live[p]))
                assert await engine.gc(confirm=False) == []
                await engine.delete(name)
                await settled(engine, name, ("deleted",))
                assert await engine.gc(confirm=False) == []
            assert clouds.leftovers(name) == {"aws": [], "gcp": [], "azure": []}
    finally:
        await booter.stop()
