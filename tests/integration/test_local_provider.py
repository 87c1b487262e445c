"""The ``local`` provider against the real lab (root) and in process mode: the contract's
operations with their documented meaning (idempotent by name, query by tags, power
operations, typed errors, cleanup that leaves nothing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.provision.contract import (
    TAG_INFRA,
    TAG_MANAGED,
    TAG_NODE,
    InstanceState,
    InvalidRequestError,
    LaunchRequest,
    NetworkRequest,
    NotFoundError,
    Placement,
    Provider,
)
from controller.provision.lab import LabConfig
from controller.provision.lab import net as labnet
from controller.provision.providers.local import LocalProvider
from tests.fixtures.lab import lab_skip_reason, vm_run, wait_booted
from tests.fixtures.wait import wait_for

TAGS = {TAG_MANAGED: "test-install", TAG_INFRA: "demo"}
# $BARISTA_ROOT: "" in a namespace VM, the VM's own root dir in process mode.
UD = ("#cloud-config\nruncmd:\n  - [sh, -c, 'mkdir -p \"$BARISTA_ROOT/etc\" && "
      "echo booted > \"$BARISTA_ROOT/etc/barista-booted\"']\n")


def _req(name: str, **kw: str) -> LaunchRequest:
    return LaunchRequest(name=name, size=kw.get("size", "lab.small"),
                         image=kw.get("image", "ubuntu-24.04"), user_data=UD, tags=TAGS)


@pytest.fixture(params=["netns", "process"])
async def provider(request: pytest.FixtureRequest, tmp_path: Path):
    mode = request.param
    if mode == "netns" and lab_skip_reason() is not None:
        pytest.skip(lab_skip_reason() or "")
    p = LocalProvider(data_dir=tmp_path / "lab", mode=mode,
                      config=LabConfig(links=(), default_rtt_ms=10))
    prefix = p.lab.prefix
    try:
        yield p
    finally:
        await p.lab.down()
        left = {k: v for k, v in labnet.leftovers(prefix, p.lab.data_dir).items() if v}
        assert not left, left


async def test_catalog_is_the_lab(tmp_path: Path) -> None:
    p = LocalProvider(data_dir=tmp_path / "lab", mode="process")
    assert isinstance(p, Provider)
    cat = p.catalog()
    assert list(cat.regions) == ["lab-us", "lab-eu", "lab-ap", "lab-onprem"]
    assert cat.regions["lab-eu"].latitude == pytest.approx(50.1)
    assert cat.price("lab.small", "lab-onprem") == 0.0
    assert "ubuntu-24.04" in cat.images


async def test_lifecycle(provider: LocalProvider) -> None:
    net = await provider.ensure_network(NetworkRequest(infra="demo", region="lab-us"))
    assert net.region == "lab-us"
    place = Placement("local", "lab-us")
    first = await provider.run_instances(place, net, [_req("demo-g-0"), _req("demo-g-1")])
    assert [i.name for i in first] == ["demo-g-0", "demo-g-1"]
    assert first[0].tags[TAG_NODE] == "demo-g-0" and first[0].state is InstanceState.RUNNING
    # Idempotent by name: a re-run returns the same VMs and creates only the gap.
    again = await provider.run_instances(place, net, [_req("demo-g-0"), _req("demo-g-2")])
    assert again[0].id == first[0].id
    assert again[1].id not in {i.id for i in first}
    found = await provider.query_instances(TAGS)
    assert sorted(i.name for i in found) == ["demo-g-0", "demo-g-1", "demo-g-2"]
    assert await provider.query_instances({**TAGS, TAG_INFRA: "other"}) == []
    assert await provider.query_instances(TAGS, region="lab-eu") == []
    vm = first[0]
    await wait_booted(provider.lab, vm.id)
    if provider.mode == "netns":
        assert vm.public_ip == vm.private_ip and vm.private_ip.startswith("198.18.1.")
        res = await vm_run(provider.lab, vm.id, ["cat", "/etc/barista-booted"], check=True)
        assert res.stdout.strip() == "booted"
    else:
        booted = provider.lab.data_dir / "vms" / vm.id / "root" / "etc" / "barista-booted"
        assert booted.read_text().strip() == "booted"
        assert vm.private_ip == "127.0.0.1"
    await provider.stop_instances("lab-us", [vm.id])
    (stopped,) = [i for i in await provider.query_instances(TAGS) if i.id == vm.id]
    assert stopped.state is InstanceState.STOPPED
    await provider.stop_instances("lab-us", [vm.id])  # already stopped: fine
    # run_instances of a stopped VM's name resumes it.
    (resumed,) = await provider.run_instances(place, net, [_req("demo-g-0")])
    assert resumed.id == vm.id and resumed.state is InstanceState.RUNNING
    await provider.reboot_instances("lab-us", [vm.id])
    (rebooted,) = [i for i in await provider.query_instances(TAGS) if i.id == vm.id]
    assert rebooted.state is InstanceState.RUNNING
    ids = [i.id for i in await provider.query_instances(TAGS)]
    await provider.terminate_instances("lab-us", ids)
    await provider.terminate_instances("lab-us", ids)  # again: already done
    assert all(i.state is InstanceState.TERMINATED for i in await provider.query_instances(TAGS))
    with pytest.raises(NotFoundError):
        await provider.terminate_instances("lab-us", ["nope"])
    with pytest.raises(NotFoundError):
        await provider.stop_instances("lab-eu", [vm.id])  # wrong region
    await provider.cleanup(TAGS, region="lab-us")
    assert not provider.lab.data_dir.exists()
    assert labnet.leftovers(provider.lab.prefix)["netns"] == []


async def test_bad_requests_are_typed(provider: LocalProvider) -> None:
    with pytest.raises(InvalidRequestError, match="unknown region"):
        await provider.ensure_network(NetworkRequest(infra="demo", region="mars"))
    net = await provider.ensure_network(NetworkRequest(infra="demo", region="lab-eu"))
    place = Placement("local", "lab-eu")
    with pytest.raises(InvalidRequestError, match="unknown size") as exc:
        await provider.run_instances(place, net, [_req("x", size="huge")])
    assert exc.value.provider == "local" and exc.value.region == "lab-eu"
    with pytest.raises(InvalidRequestError, match="unknown image"):
        await provider.run_instances(place, net, [_req("x", image="windows")])


async def test_private_region_vm_has_no_public_ip(provider: LocalProvider) -> None:
    net = await provider.ensure_network(NetworkRequest(infra="demo", region="lab-onprem"))
    assert net.extra["kind"] == "private"
    (vm,) = await provider.run_instances(Placement("local", "lab-onprem"), net, [_req("p-0")])
    assert vm.public_ip == ""
    assert vm.private_ip


async def test_parallel_launches_get_distinct_addresses(provider: LocalProvider) -> None:
    if provider.mode != "netns":
        pytest.skip("process-mode VMs all live on loopback")
    net = await provider.ensure_network(NetworkRequest(infra="demo", region="lab-ap"))
    place = Placement("local", "lab-ap")
    batches = await asyncio.gather(*(
        provider.run_instances(place, net, [_req(f"par-{i}-{j}") for j in range(2)])
        for i in range(3)
    ))
    vms = [vm for batch in batches for vm in batch]
    assert len({vm.private_ip for vm in vms}) == 6 and len({vm.id for vm in vms}) == 6
    await wait_for(lambda: all(provider.lab.boot_seconds(v.id) is not None for v in vms), 20,
                   "six VMs to boot")
