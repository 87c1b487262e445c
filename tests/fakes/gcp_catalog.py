"""The read-only catalog calls of the Compute Engine fake (regions.list, zones.list,
machineTypes.aggregatedList), in the documented REST shapes: ``compute#regionList`` /
``compute#zoneList`` with ``items``, and the aggregated list keyed ``zones/<zone>`` with
``machineTypes`` (guestCpus, memoryMb, isSharedCpu, architecture, accelerators)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BASE = "https://www.googleapis.com/compute/v1"

# Zones per region as the fake cloud has them; status DOWN zones are listed but not usable.
ZONES: dict[str, dict[str, str]] = {
    "us-central1": {"us-central1-a": "UP", "us-central1-b": "UP", "us-central1-c": "UP",
                    "us-central1-f": "DOWN"},
    "us-east1": {"us-east1-b": "UP", "us-east1-c": "UP", "us-east1-d": "UP"},
    "europe-west1": {"europe-west1-b": "UP", "europe-west1-c": "UP", "europe-west1-d": "UP"},
    "europe-west4": {"europe-west4-a": "UP", "europe-west4-b": "UP", "europe-west4-c": "UP"},
    "asia-northeast3": {"asia-northeast3-a": "UP", "asia-northeast3-b": "UP",
                        "asia-northeast3-c": "UP"},
    "us-west1": {"us-west1-a": "UP", "us-west1-b": "UP"},
}
# name -> (guestCpus, memoryMb, isSharedCpu, architecture, accelerators)
MACHINE_TYPES: dict[str, tuple[int, int, bool, str, list[dict[str, Any]]]] = {
    "e2-micro": (2, 1024, True, "X86_64", []),
    "e2-small": (2, 2048, True, "X86_64", []),
    "e2-medium": (2, 4096, True, "X86_64", []),
    "e2-standard-2": (2, 8192, False, "X86_64", []),
    "n2-standard-2": (2, 8192, False, "X86_64", []),
    "t2a-standard-1": (1, 4096, False, "ARM64", []),
    "g2-standard-4": (4, 16384, False, "X86_64",
                      [{"guestAcceleratorType": "nvidia-l4", "guestAcceleratorCount": 1}]),
}
# Machine types missing from a region (t2a is only in a few regions of the real cloud).
NOT_IN = {"t2a-standard-1": {"asia-northeast3", "europe-west1"},
          "g2-standard-4": {"us-east1", "europe-west1", "asia-northeast3", "us-west1"}}


@dataclass
class CatalogState:
    zones: dict[str, dict[str, str]] = field(default_factory=lambda: {
        r: dict(z) for r, z in ZONES.items()})
    fail_machine_types: int = 0  # the next N aggregatedList calls answer 503


class CatalogError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def route(state: CatalogState, project: str, method: str, parts: list[str]) -> Any:
    """The answer for a catalog call, or None when ``parts`` is not one."""
    url = f"{BASE}/projects/{project}"
    if method != "GET":
        return None
    match parts:
        case ["regions"]:
            return {"kind": "compute#regionList", "id": f"projects/{project}/regions",
                    "items": [{"kind": "compute#region", "name": r, "status": "UP",
                               "selfLink": f"{url}/regions/{r}",
                               "zones": [f"{url}/zones/{z}" for z in sorted(zs)]}
                              for r, zs in sorted(state.zones.items())]}
        case ["zones"]:
            return {"kind": "compute#zoneList", "id": f"projects/{project}/zones",
                    "items": [{"kind": "compute#zone", "name": z, "status": st,
                               "region": f"{url}/regions/{r}",
                               "selfLink": f"{url}/zones/{z}"}
                              for r, zs in sorted(state.zones.items())
                              for z, st in sorted(zs.items())]}
        case ["aggregated", "machineTypes"]:
            if state.fail_machine_types > 0:
                state.fail_machine_types -= 1
                raise CatalogError(503, "backendError", "Backend Error")
            items: dict[str, Any] = {}
            for r, zs in sorted(state.zones.items()):
                for z in sorted(zs):
                    items[f"zones/{z}"] = {"machineTypes": [
                        {"kind": "compute#machineType", "name": name, "guestCpus": cpus,
                         "memoryMb": mem, "isSharedCpu": shared, "architecture": arch,
                         "accelerators": acc, "zone": z,
                         "selfLink": f"{url}/zones/{z}/machineTypes/{name}"}
                        for name, (cpus, mem, shared, arch, acc) in MACHINE_TYPES.items()
                        if r not in NOT_IN.get(name, set())]}
            return {"kind": "compute#machineTypeAggregatedList",
                    "id": f"projects/{project}/aggregated/machineTypes", "items": items}
    return None
