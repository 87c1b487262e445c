"""Shipped on-demand Linux list prices, USD per hour, by provider, size and region: data,
with where each table came from. A (size, region) not listed here has no known price (the
CLI shows "-"; a review says "price unknown"); none is derived or guessed.

`barista catalog refresh PROVIDER` replaces these with what the cloud's own price API
answers (AWS Price List, Azure Retail Prices); GCP's are not refreshed (see gcp_catalog).
"""

from __future__ import annotations

from collections.abc import Mapping

# provider -> where the prices came from and when they were taken.
SOURCES: Mapping[str, tuple[str, ...]] = {
    "aws": (
        "us-east-1, us-west-2: AWS EC2 on-demand Linux price list (shipped before issue 13)",
        "eu-west-1, eu-central-1, ap-northeast-2, ap-southeast-1 (and us-east-1/us-west-2, "
        "the same values): SkyPilot catalog skypilot-org/skypilot-catalog "
        "catalogs/v7/aws/vms.csv, column Price (on-demand), commit "
        "001367d22a0033fac286a8c71aeac7109e431bcb, read 2026-12-01",
    ),
    "gcp": (
        "us-central1: GCE on-demand price list (shipped before issue 13)",
        "e2-standard-2 and n2-standard-2 in us-east1, europe-west1, europe-west4, "
        "asia-northeast3: SkyPilot catalog catalogs/v7/gcp/vms.csv, column Price, commit "
        "017e2502fb63c7a28757acd94002b2d6099d3e3d, read 2026-12-01",
        "not taken from it: e2-micro/e2-small/e2-medium (its values are the full 2-vCPU e2 "
        "price, 0.04655/0.04947 in us-central1, not the shared-core list prices "
        "0.008376/0.016751) and t2a-standard-1 (not read): priced in us-central1 only",
    ),
    "azure": (
        "eastus: Azure Retail Prices API, pay-as-you-go Linux (shipped before issue 13)",
        "Standard_B1s and Standard_B2s in westus2: SkyPilot catalog "
        "catalogs/v6/azure/vms.csv, column Price, commit "
        "098741e70562f65d7af1cceb81e33b284f742604, read 2026-12-01 (that file has US "
        "regions only: westeurope, koreacentral, southeastasia stay unpriced)",
    ),
}

_AWS_REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-2",
                "ap-southeast-1")
_AWS = {
    "t3.micro": (0.0104, 0.0104, 0.0114, 0.012, 0.013, 0.0132),
    "t3.small": (0.0208, 0.0208, 0.0228, 0.024, 0.026, 0.0264),
    "t3.medium": (0.0416, 0.0416, 0.0456, 0.048, 0.052, 0.0528),
    "t3.large": (0.0832, 0.0832, 0.0912, 0.096, 0.104, 0.1056),
    "m6i.large": (0.096, 0.096, 0.107, 0.115, 0.118, 0.12),
    "c6i.large": (0.085, 0.085, 0.0912, 0.097, 0.096, 0.098),
    "t4g.small": (0.0168, 0.0168, 0.0184, 0.0192, 0.0208, 0.0212),
}

PRICES: Mapping[str, Mapping[str, Mapping[str, float]]] = {
    "aws": {size: dict(zip(_AWS_REGIONS, row, strict=True)) for size, row in _AWS.items()},
    "gcp": {
        "e2-micro": {"us-central1": 0.008376},
        "e2-small": {"us-central1": 0.016751},
        "e2-medium": {"us-central1": 0.033503},
        "e2-standard-2": {"us-central1": 0.067006, "us-east1": 0.06701,
                          "europe-west1": 0.07372, "europe-west4": 0.07377,
                          "asia-northeast3": 0.08597},
        "n2-standard-2": {"us-central1": 0.097118, "us-east1": 0.09712,
                          "europe-west1": 0.10683, "europe-west4": 0.10692,
                          "asia-northeast3": 0.12472},
        "t2a-standard-1": {"us-central1": 0.0385},
    },
    "azure": {
        "Standard_B1s": {"eastus": 0.0104, "westus2": 0.0104},
        "Standard_B2s": {"eastus": 0.0416, "westus2": 0.0416},
        "Standard_D2s_v5": {"eastus": 0.096},
        "Standard_F2s_v2": {"eastus": 0.0846},
    },
}


def prices(provider: str, size: str) -> dict[str, float]:
    return dict(PRICES.get(provider, {}).get(size, {}))
