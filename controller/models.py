"""The controller's own records (what it keeps in KV), separate from the wire messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

NodeStatus = Literal["pending", "online", "stale", "offline"]
# A node's facts as kept (at enrollment and in every FactsUpdate): at most 64 keys, keys
# cut to 64 characters, values to 256.
MAX_FACTS = 64
MAX_FACT_KEY = 64
MAX_FACT_VALUE = 256


def bounded_facts(facts: Mapping[str, object]) -> dict[str, str]:
    """``facts`` within the limits a node record keeps (the first MAX_FACTS keys)."""
    return {k[:MAX_FACT_KEY]: str(v)[:MAX_FACT_VALUE]
            for k, v in list(facts.items())[:MAX_FACTS]}


class NodeRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    hostname: str
    identity: str  # the node's NATS nkey public key
    labels: dict[str, str] = {}
    facts: dict[str, str] = {}
    status: NodeStatus = "online"
    enrolled_at: float = 0.0
    last_seen: float = 0.0
    status_changed_at: float = 0.0
    agent_version: str = ""
    wg_public_key: str = ""
    token_id: str = ""
    # Revoked (`barista nodes revoke`): its NATS user is revoked, renewal is refused.
    revoked: bool = False
    # Provisioned by the engine (controller.provision): its infra, group, node name inside
    # the infra ("<infra>-<group>-<index>") and VM id; "" for a machine that joined by hand.
    infra: str = ""
    group: str = ""
    infra_node: str = ""
    vm_id: str = ""

    def public(self) -> dict[str, object]:
        """The API's view of a node."""
        view: dict[str, object] = {
            "id": self.id,
            "hostname": self.hostname,
            "status": self.status,
            "labels": self.labels,
            "facts": self.facts,
            "enrolled_at": self.enrolled_at,
            "last_seen": self.last_seen,
            "status_changed_at": self.status_changed_at,
            "agent_version": self.agent_version,
        }
        if self.revoked:
            view["revoked"] = True
        if self.infra:
            view["infra"] = {"name": self.infra, "group": self.group, "node": self.infra_node,
                             "vm_id": self.vm_id}
        return view


class TokenRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    secret_sha256: str  # the secret itself is shown once, at creation, and never stored
    labels: dict[str, str] = {}
    created_at: float
    expires_at: float
    description: str = ""
    used_at: float = 0.0
    used_by: str = ""  # node id
    used_by_identity: str = ""
    # Bound to one node (a provisioned VM): the token enrolls only an agent whose hostname
    # is this name, and the node's id is this name. "" = any machine (hybrid join).
    node_name: str = ""

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "node_name": self.node_name or None,
            "labels": self.labels,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "description": self.description,
            "used_at": self.used_at or None,
            "used_by": self.used_by or None,
        }
