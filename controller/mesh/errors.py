"""Errors of the mesh control side; each carries the facts an operator needs."""

from __future__ import annotations

from controller.errors import BadRequest, Conflict


class CidrOverlap(Conflict):
    """A network's CIDR overlaps another network's or a node's VPC range."""

    code = "cidr_overlap"

    def __init__(self, cidr: str, other: str, other_cidr: str) -> None:
        super().__init__(
            f"CIDR {cidr} overlaps {other} ({other_cidr}); pick a range that neither the "
            "other networks nor the nodes' VPCs use",
            details={"cidr": cidr, "other": other, "other_cidr": other_cidr})
        self.cidr = cidr
        self.other = other
        self.other_cidr = other_cidr


class AddressesExhausted(Conflict):
    """Every address of a network is assigned or still quarantined after its release."""

    code = "addresses_exhausted"

    def __init__(self, network: str, cidr: str, assigned: int, quarantined: int) -> None:
        super().__init__(
            f"network {network} ({cidr}) has no free address: {assigned} assigned, "
            f"{quarantined} released and still quarantined",
            details={"network": network, "cidr": cidr, "assigned": assigned,
                     "quarantined": quarantined})
        self.network = network


class BadNetwork(BadRequest):
    """A network spec that cannot be used (``field`` names what is wrong)."""

    code = "bad_network"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", details={"field": field})
        self.field = field
