"""Catalog search: fit, cheapest first, nearest first, cheapest per region."""

from __future__ import annotations

import pytest

from controller.provision.catalog import cheapest, distance_km, offers, parse_point
from controller.provision.contract import Catalog, Region, Size

CAT = Catalog(
    provider="p",
    regions={"north": Region("north", 60.0, 10.0), "south": Region("south", -30.0, 20.0)},
    sizes={
        "small": Size("small", 1, 2.0, {"north": 0.02, "south": 0.01}),
        "medium": Size("medium", 2, 4.0, {"north": 0.04, "south": 0.05}),
        "big": Size("big", 4, 16.0, {"north": 0.2}),
        "arm": Size("arm", 2, 4.0, {"north": 0.03}, arch="arm64", regions=("north",)),
    },
    images={},
)


def test_distance_is_haversine() -> None:
    # Seoul to Frankfurt is about 8,560 km.
    assert distance_km(37.56, 126.98, 50.11, 8.68) == pytest.approx(8560, rel=0.01)
    assert distance_km(1.0, 2.0, 1.0, 2.0) == 0.0


def test_offers_fit_and_order_by_price_with_unknown_prices_last() -> None:
    got = [(o.region, o.size.name, o.price_hour) for o in offers([CAT], vcpus=2,
                                                                  memory_gb=4)]
    assert got == [("north", "arm", 0.03), ("north", "medium", 0.04),
                   ("south", "medium", 0.05), ("north", "big", 0.2), ("south", "big", None)]
    assert [o.size.name for o in offers([CAT], vcpus=2, memory_gb=4, arch="x86_64",
                                        priced_only=True)] == ["medium", "medium", "big"]


def test_offers_nearest_first() -> None:
    got = offers([CAT], vcpus=1, memory_gb=1, near=(-33.9, 18.4), order="distance")
    assert [o.region for o in got][:3] == ["south", "south", "south"]
    assert got[0].size.name == "small" and got[0].distance_km is not None


def test_cheapest_per_region() -> None:
    assert cheapest(CAT, "south", vcpus=2, memory_gb=4).name == "medium"  # type: ignore[union-attr]
    assert cheapest(CAT, "north", vcpus=2, memory_gb=4, arch="x86_64").name == "medium"  # type: ignore[union-attr]
    assert cheapest(CAT, "north", vcpus=64, memory_gb=1) is None
    assert cheapest(CAT, "mars", vcpus=1, memory_gb=1) is None


@pytest.mark.parametrize("text", ["1", "a,b", "91,0", "0,181", "nan,0", "1,2,3"])
def test_bad_points(text: str) -> None:
    with pytest.raises(ValueError):
        parse_point(text)
