"""Every NATS identity barista defines and its permissions, built only from ``Subjects``.

In NATS operator mode these permissions go into the identities' user JWTs
(controller/nats/identities.py for the controller's, admission.py for each node's).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.subjects import Subjects

# The enroll identity (ENROLL_NKEY, protocol.subjects) can only ask to enroll; a join token
# is what authorises a node, so its seed is no secret.
# The controller's two users (least privilege for the controller too): CONTROLLER_USER has
# JetStream rights and holds state and streams, and answers no peer; PEERS_USER subscribes
# to and answers peers (enrollment, app sync, heartbeats, events, results, commands) and
# cannot reach the JetStream, KV, object store or system APIs at all, so no reply subject
# a peer slips past the controller can touch state.
CONTROLLER_USER = "controller"
PEERS_USER = "controller-peers"
# CONTROLLER_INBOX (protocol.subjects), the inbox space of the JetStream connection:
# PEERS_USER may not publish into it (a forged JetStream API answer), nor read it.
# The system account answers $SYS.REQ.SERVER.<id>.HEALTHZ / .VARZ and takes account JWT
# updates; only the controller connects as its user (a .creds file it alone reads).
SYS_USER = "barista-sys"

Permissions = dict[str, dict[str, list[str]]]


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """A node's NATS identity (its nkey public key) and the node id it is bound to."""

    node_id: str
    nkey: str


def node_permissions(subjects: Subjects, node_id: str) -> Permissions:
    """Least privilege: a node publishes only under its own subjects and reads only its own
    commands, broadcasts, mesh deltas and its own mesh snapshots and rotate requests. It
    answers nothing directly: command results go to its own results subject, which is what
    authenticates them."""
    return {
        "publish": {
            "allow": [
                subjects.node_all(node_id),  # also its app-sync requests
                subjects.enroll,
            ]
        },
        "subscribe": {
            "allow": [
                subjects.cmd_all,
                subjects.cmd_node(node_id),
                subjects.mesh_all,
                subjects.mesh_snapshot(node_id),
                subjects.mesh_rotate(node_id),
                subjects.inbox_any(node_id),
            ]
        },
    }


def enroll_permissions(subjects: Subjects) -> Permissions:
    """The shared enroll user: ask to enroll, read the enrolling machines' inbox space."""
    return {
        "publish": {"allow": [subjects.enroll]},
        "subscribe": {"allow": [subjects.enroll_inbox_any]},
    }


def peers_permissions(subjects: Subjects) -> Permissions:
    """The controller's peer-facing user: everything but the JetStream, KV, object store
    and system APIs and the state connection's inbox space (see PEERS_USER)."""
    denied = ["$JS.>", "$KV.>", "$O.>", "$SYS.>", subjects.controller_inbox_any]
    return {"publish": {"deny": denied}, "subscribe": {"deny": list(denied)}}
