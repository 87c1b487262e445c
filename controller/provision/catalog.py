"""Searching the providers' catalogs: sizes that fit ``{vcpus, memory_gb}``, cheapest first
or nearest a point (CB-Tumblebug's spec recommendation: filter, then order by cost or by
location), and the cheapest fitting size per region for a spec's ``size: {...}``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from controller.provision.contract import Catalog, Size

EARTH_KM = 6371.0


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


def parse_point(text: str) -> tuple[float, float]:
    """"LAT,LON" -> (lat, lon); ``ValueError`` naming what is wrong."""
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not LAT,LON (e.g. 37.56,126.98)")
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"{text!r} is not LAT,LON (e.g. 37.56,126.98)") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or not all(map(math.isfinite, (lat, lon))):
        raise ValueError(f"{text!r}: latitude must be in [-90, 90], longitude in [-180, 180]")
    return lat, lon


@dataclass(frozen=True, slots=True)
class SizeOffer:
    """One size in one region: what `barista catalog sizes` lists."""

    provider: str
    region: str
    size: Size
    price_hour: float | None
    distance_km: float | None = None


def fits(size: Size, *, vcpus: int = 0, memory_gb: float = 0.0, arch: str = "",
         gpus: int = 0) -> bool:
    return (size.vcpus >= vcpus and size.memory_gb >= memory_gb
            and (not arch or size.arch == arch) and size.gpus >= gpus)


def offers(catalogs: Iterable[Catalog], *, vcpus: int = 0, memory_gb: float = 0.0,
           arch: str = "", gpus: int = 0, near: tuple[float, float] | None = None,
           order: Literal["price", "distance"] = "price", priced_only: bool = False,
           ) -> list[SizeOffer]:
    """Every (provider, region, size) that fits, cheapest first (unknown prices last), or
    nearest ``near`` first; ties broken by price, then by smaller size."""
    out: list[SizeOffer] = []
    for cat in catalogs:
        for region in cat.regions.values():
            dist = (distance_km(near[0], near[1], region.latitude, region.longitude)
                    if near is not None else None)
            for size in cat.sizes.values():
                if not size.offered_in(region.name) or not fits(
                        size, vcpus=vcpus, memory_gb=memory_gb, arch=arch, gpus=gpus):
                    continue
                price = size.price_hour.get(region.name)
                if priced_only and price is None:
                    continue
                out.append(SizeOffer(cat.provider, region.name, size, price, dist))

    def by_price(o: SizeOffer) -> tuple[bool, float, int, float, str, str]:
        return (o.price_hour is None, o.price_hour or 0.0, o.size.vcpus, o.size.memory_gb,
                o.provider, o.region)

    if order == "distance" and near is not None:
        out.sort(key=lambda o: (round(o.distance_km or 0.0), *by_price(o)))
    else:
        out.sort(key=by_price)
    return out


def cheapest(catalog: Catalog, region: str, *, vcpus: int, memory_gb: float,
             arch: str = "") -> Size | None:
    """The cheapest size offered in ``region`` with at least ``vcpus`` and ``memory_gb``;
    among unpriced ones (no price known there) the smallest; None when nothing fits."""
    found = [o for o in offers([Catalog(catalog.provider,
                                        {region: catalog.regions[region]}
                                        if region in catalog.regions else {},
                                        catalog.sizes, catalog.images)],
                               vcpus=vcpus, memory_gb=memory_gb, arch=arch)]
    return found[0].size if found else None
