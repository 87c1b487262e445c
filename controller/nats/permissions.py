"""Every NATS identity barista defines and its permissions, built only from ``Subjects``.

The embedded server's config (controller/nats/server.py) renders these; an admission
without reloads (NATS operator mode) would put the same permissions into user JWTs.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.subjects import ENROLL_PASSWORD, ENROLL_USER, Subjects

# ENROLL_USER / ENROLL_PASSWORD (protocol.subjects): the enroll user can only ask to enroll;
# a join token is what authorises a node, so its password is no secret.
# The controller's two users (least privilege for the controller too): CONTROLLER_USER has
# JetStream rights and holds state and streams, and answers no peer; PEERS_USER subscribes
# to and answers peers (enrollment, app sync, heartbeats, events, results, commands) and
# cannot reach the JetStream, KV, object store or system APIs at all, so no reply subject
# a peer slips past the controller can touch state.
CONTROLLER_USER = "controller"
PEERS_USER = "controller-peers"
# CONTROLLER_INBOX (protocol.subjects), the inbox space of the JetStream connection:
# PEERS_USER may not publish into it (a forged JetStream API answer), nor read it.
# The system account answers $SYS.REQ.SERVER.<id>.HEALTHZ / .VARZ; only NatsServer itself
# connects as its user (a random password per process, written only to the 0600 config).
SYS_ACCOUNT = "SYS"
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


def controller_users(subjects: Subjects, *, password: str) -> list[dict[str, object]]:
    """The users every embedded server has: the controller's two, and the enroll user.
    The state user has no permissions block (all of the global account, JetStream too)."""
    return [
        {"user": CONTROLLER_USER, "password": password},
        {"user": PEERS_USER, "password": password, "permissions": peers_permissions(subjects)},
        {
            "user": ENROLL_USER,
            "password": ENROLL_PASSWORD,
            "permissions": enroll_permissions(subjects),
        },
    ]


def node_user(subjects: Subjects, node: NodeAccess) -> dict[str, object]:
    """A node's user entry: its nkey, with node_permissions."""
    return {"nkey": node.nkey, "permissions": node_permissions(subjects, node.node_id)}


def system_account(*, password: str) -> dict[str, object]:
    """The system account and its one user, apart from the global account where every
    other user lives and JetStream is enabled: server state (connz, varz, ...) is
    reachable only through this account, and no longer over HTTP."""
    return {
        "accounts": {SYS_ACCOUNT: {"users": [{"user": SYS_USER, "password": password}]}},
        "system_account": SYS_ACCOUNT,
    }
