"""`barista catalog refresh` for GCP: regions.list, zones.list and
machineTypes.aggregatedList of Compute Engine (the provider's project and credentials).

Prices are not refreshed: Compute Engine's are published as per-vCPU and per-GB SKUs of the
Cloud Billing Catalog API (services.skus.list), priced per machine family and region, not
per machine type; turning them into machine-type prices is not done here, so a refresh keeps
the shipped prices and says so in its notes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from controller.provision.refresh import Fetched, OverlaySize, Progress

ListCall = Callable[..., Awaitable[list[Any]]]
NOTE = ("prices not refreshed: Compute Engine prices come from the Cloud Billing Catalog "
        "API as per-vCPU/per-GB SKUs, which this refresh does not read; shipped prices kept")


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def size_of(mt: Any) -> OverlaySize:
    accel = list(mt.accelerators or [])
    return OverlaySize(
        name=str(mt.name), vcpus=int(mt.guest_cpus), memory_gb=round(int(mt.memory_mb) / 1024, 3),
        arch="arm64" if str(mt.architecture or "").upper() == "ARM64" else "x86_64",
        gpus=sum(int(a.guest_accelerator_count) for a in accel),
        gpu_model=str(accel[0].guest_accelerator_type) if accel else "")


async def fetch(list_call: ListCall, project: str, regions: Sequence[str],
                progress: Progress) -> Fetched:
    """``list_call(client kind, op, **kwargs)``: the whole listing (pages followed)."""
    progress("gcp: regions.list")
    cloud = {str(r.name): str(r.status) for r in
             await list_call("RegionsClient", "list", project=project)}
    progress("gcp: zones.list")
    zones: dict[str, list[str]] = {}
    for z in await list_call("ZonesClient", "list", project=project):
        if str(z.status) == "UP":
            zones.setdefault(_last(str(z.region)), []).append(str(z.name))
    notes = [f"{r}: not a region of project {project} (skipped)"
             for r in regions if r not in cloud]
    wanted = {r for r in regions if r in cloud}
    progress("gcp: machineTypes.aggregatedList")
    sizes: dict[str, OverlaySize] = {}
    offered: dict[str, set[str]] = {}
    for scope, scoped in await list_call("MachineTypesClient", "aggregated_list",
                                         project=project):
        zone = _last(str(scope))
        region = zone.rsplit("-", 1)[0]
        if region not in wanted or zone not in zones.get(region, []):
            continue
        for mt in scoped.machine_types:
            s = size_of(mt)
            sizes.setdefault(s.name, s)
            offered.setdefault(s.name, set()).add(region)
    out = tuple(OverlaySize(name=s.name, vcpus=s.vcpus, memory_gb=s.memory_gb, arch=s.arch,
                            gpus=s.gpus, gpu_model=s.gpu_model,
                            regions=tuple(sorted(offered[s.name])))
                for s in sorted(sizes.values(), key=lambda s: s.name))
    return Fetched(provider="gcp", source=f"gcp compute regions.list, zones.list, "
                   f"machineTypes.aggregatedList (project {project})",
                   zones={r: tuple(sorted(zones.get(r, []))) for r in wanted},
                   cloud_regions=tuple(sorted(cloud)), sizes=out, prices_refreshed=False,
                   notes=(*notes, NOTE))
