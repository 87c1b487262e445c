"""The local lab cloud: VMs as network namespaces in simulated regions joined by a WAN
router with per-pair delays, private sites behind NAT (DESIGN.md sections 8 and 11)."""

from controller.provision.lab.lab import Lab, LabStatus, VmStatus
from controller.provision.lab.state import LabConfig, LinkConfig, RegionConfig

__all__ = ["Lab", "LabConfig", "LabStatus", "LinkConfig", "RegionConfig", "VmStatus"]
