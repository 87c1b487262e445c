"""`barista catalog refresh PROVIDER`: a provider's regions, zones, sizes and (where the cloud
has an API for them) prices fetched from the cloud's own API, kept as an overlay on the
shipped catalog in the controller's data dir (``catalog/<provider name>.json``).

- A provider that can refresh implements ``Refreshable``: ``fetch_catalog`` reads the cloud
  (with the provider's own credentials) and returns a ``Fetched``; ``use_catalog`` swaps the
  catalog the provider serves.
- The overlay is written whole by rename (``agent.files.write_private``), with its source and
  time: a failed fetch writes nothing, so the catalog in use stays as it was. A fetch whose
  prices failed (the regions and sizes came) keeps the prices of the previous overlay and
  says so in its notes.
- ``merge`` lays an overlay on the shipped catalog: the shipped regions (with their
  coordinates) get the zones the cloud reports; sizes are the shipped ones plus the fetched
  ones, with the fetched facts; a price is the fetched one, else the shipped one, else
  unknown. Regions the cloud has but the catalog does not are listed, not added (the
  provider operates in its catalog's regions; coordinates are ours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import msgspec

from agent.files import write_private
from controller.provision.contract import Catalog, Provider, Region, Size

log = logging.getLogger("barista.controller.provision.refresh")

Progress = Callable[[str], None]
FORMAT = 1


class OverlaySize(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    name: str
    vcpus: int
    memory_gb: float
    arch: Literal["x86_64", "arm64"] = "x86_64"
    gpus: int = 0
    gpu_model: str = ""
    regions: tuple[str, ...] = ()  # where it is offered (of the catalog's regions)
    price_hour: dict[str, float] = {}


class Overlay(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """What one refresh fetched: the file's content."""

    provider: str  # the kind: aws, gcp, azure
    source: str  # the API calls it came from
    fetched_at: float  # unix time
    zones: dict[str, tuple[str, ...]] = {}  # catalog region -> zones the cloud reports
    coordinates: dict[str, tuple[float, float]] = {}  # region -> (lat, lon) if the cloud says
    cloud_regions: tuple[str, ...] = ()  # every region the cloud reported
    sizes: tuple[OverlaySize, ...] = ()
    prices_refreshed: bool = False
    notes: tuple[str, ...] = ()
    format: int = FORMAT


@dataclass(frozen=True)
class Fetched:
    """A fetch's result before it is written (``prices_error``: why prices did not come)."""

    provider: str
    source: str
    zones: Mapping[str, tuple[str, ...]]
    cloud_regions: tuple[str, ...]
    sizes: tuple[OverlaySize, ...]
    prices_refreshed: bool
    notes: tuple[str, ...] = ()
    coordinates: Mapping[str, tuple[float, float]] = field(default_factory=dict)


@runtime_checkable
class Refreshable(Protocol):
    async def fetch_catalog(self, progress: Progress) -> Fetched: ...

    def use_catalog(self, catalog: Catalog) -> None: ...

    def shipped_catalog(self) -> Catalog: ...


def merge(shipped: Catalog, overlay: Overlay) -> Catalog:
    """The shipped catalog with the overlay laid on it (see the module's docstring)."""
    regions: dict[str, Region] = {}
    for name, r in shipped.regions.items():
        zones = overlay.zones.get(name) or r.zones
        lat, lon = overlay.coordinates.get(name, (r.latitude, r.longitude))
        regions[name] = replace(r, zones=tuple(zones), latitude=lat, longitude=lon)
    sizes: dict[str, Size] = dict(shipped.sizes)
    for o in overlay.sizes:
        offered = tuple(r for r in o.regions if r in regions)
        if not offered:
            continue
        old = shipped.sizes.get(o.name)
        prices = {**(old.price_hour if old else {}),
                  **{r: p for r, p in o.price_hour.items() if r in regions}}
        sizes[o.name] = Size(o.name, o.vcpus, o.memory_gb, prices, o.arch, o.gpus,
                             o.gpu_model, offered)
    return Catalog(shipped.provider, regions, sizes, shipped.images)


class CatalogStore:
    """The overlays in ``directory`` (the data dir's ``catalog/``), one file per provider."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self, name: str) -> Overlay | None:
        """The provider's overlay, or None (none yet, or unreadable: logged, never fatal)."""
        p = self.path(name)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("catalog overlay %s unreadable (%s); using the shipped catalog", p, exc)
            return None
        try:
            return msgspec.json.decode(raw, type=Overlay)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("catalog overlay %s is not valid (%s); using the shipped catalog "
                        "(run `barista catalog refresh %s` to rewrite it)", p, exc, name)
            return None

    def save(self, name: str, fetched: Fetched, *, now: float | None = None) -> Overlay:
        """Write the overlay whole; prices not refreshed are carried over from the previous
        overlay (with a note) so that a partial failure loses nothing."""
        sizes, notes = fetched.sizes, list(fetched.notes)
        previous = self.load(name)
        if not fetched.prices_refreshed and previous is not None:
            old = {s.name: s.price_hour for s in previous.sizes}
            if any(old.values()):
                sizes = tuple(msgspec.structs.replace(s, price_hour=old.get(s.name, {}))
                              for s in sizes)
                notes.append("prices kept from the refresh of "
                             + time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                             time.gmtime(previous.fetched_at)))
        overlay = Overlay(provider=fetched.provider, source=fetched.source,
                          fetched_at=time.time() if now is None else now,
                          zones=dict(fetched.zones), coordinates=dict(fetched.coordinates),
                          cloud_regions=fetched.cloud_regions, sizes=sizes,
                          prices_refreshed=fetched.prices_refreshed, notes=tuple(notes))
        self.directory.mkdir(parents=True, exist_ok=True)
        write_private(self.path(name), msgspec.json.encode(overlay))
        return overlay

    def apply_all(self, providers: Mapping[str, Provider]) -> None:
        """At start: each refreshable provider serves its overlay, if it has one."""
        for name, p in providers.items():
            if isinstance(p, Refreshable):
                overlay = self.load(name)
                if overlay is not None and overlay.provider == p.shipped_catalog().provider:
                    p.use_catalog(merge(p.shipped_catalog(), overlay))


async def refresh(name: str, provider: Refreshable, store: CatalogStore,
                  progress: Progress) -> Overlay:
    """Fetch, write, and serve the new catalog. A ``ProvisionError`` from the fetch leaves
    the file and the catalog in use untouched."""
    fetched = await provider.fetch_catalog(progress)
    overlay = store.save(name, fetched)
    provider.use_catalog(merge(provider.shipped_catalog(), overlay))
    progress(f"wrote {store.path(name)}")
    return overlay


def summary(overlay: Overlay, catalog: Catalog) -> dict[str, object]:
    priced = sum(1 for s in catalog.sizes.values() for r in catalog.regions
                 if s.offered_in(r) and r in s.price_hour)
    offers = sum(1 for s in catalog.sizes.values() for r in catalog.regions if s.offered_in(r))
    return {"provider": overlay.provider, "source": overlay.source,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(overlay.fetched_at)),
            "regions": sorted(catalog.regions), "cloud_regions": list(overlay.cloud_regions),
            "sizes": len(catalog.sizes), "offers": offers, "priced_offers": priced,
            "prices_refreshed": overlay.prices_refreshed, "notes": list(overlay.notes)}
