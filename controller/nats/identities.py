"""The controller's own NATS identities in operator mode, as 0600 .creds files in one dir:
its state user (JetStream, KV), its peer-facing user (no JetStream/KV/system API), the
system user (account JWT pushes, server state), and the enroll identity's JWT.

The embedded server makes new ones at every start; an external deployment keeps the ones
``barista nats init`` wrote (reused while they still belong to its trust and carry the
permissions the controller's subject prefix needs, made again otherwise).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.files import write_private
from controller.nats import jwt
from controller.nats.operator import OperatorTrust, Permissions, UserCreds
from controller.nats.permissions import (
    CONTROLLER_USER,
    PEERS_USER,
    SYS_USER,
    enroll_permissions,
    peers_permissions,
)
from protocol.subjects import ENROLL_NKEY, Subjects

log = logging.getLogger("barista.controller.nats.identities")

Role = Literal["state", "peers", "sys"]
ROLES: tuple[Role, ...] = ("state", "peers", "sys")


@dataclass(frozen=True)
class ControllerIdentities:
    """Where the controller's .creds files are, and the enroll identity's JWT (no secret:
    its seed is public, ENROLL_SEED, and join tokens carry the JWT)."""

    creds_dir: Path
    enroll_jwt: str = field(repr=False)

    def creds_path(self, role: Role) -> Path:
        return self.creds_dir / f"{role}.creds"

    def credentials(self, role: Role) -> tuple[str, str]:
        """(JWT, seed) of one role, read from its file (the seed is a secret)."""
        return jwt.parse_creds(self.creds_path(role).read_text())

    def state_credentials(self) -> dict[str, str]:
        # "user" only names it (nats-py sends the JWT, not a user, when it has one).
        return {"user": CONTROLLER_USER, "user_credentials": str(self.creds_path("state"))}

    def peer_credentials(self) -> dict[str, str]:
        return {"user": PEERS_USER, "user_credentials": str(self.creds_path("peers"))}

    def system_credentials(self) -> dict[str, str]:
        return {"user_credentials": str(self.creds_path("sys"))}

    @classmethod
    def make(
        cls, trust: OperatorTrust, subjects: Subjects, creds_dir: Path, *, reuse: bool
    ) -> ControllerIdentities:
        """Write the controller's users to ``creds_dir`` (0700, files 0600). ``reuse``: keep
        a file that still fits ``trust`` and ``subjects``; otherwise every user is new. The
        users never expire: they live as long as their file."""
        creds_dir = Path(creds_dir)
        creds_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(creds_dir, 0o700)
        wanted = _wanted(subjects)
        for role in ROLES:
            path = creds_dir / f"{role}.creds"
            if reuse:
                why = _unfit(path, trust, role, wanted[role])
                if why is None:
                    continue
                if path.exists():
                    log.warning("making the NATS %s user again: %s %s", role, path, why)
            made: UserCreds
            if role == "sys":
                made = trust.system_user(name=SYS_USER)
            else:
                name = CONTROLLER_USER if role == "state" else PEERS_USER
                made = trust.new_user(name=name, permissions=wanted[role])
            write_private(path, made.creds.encode())
        # A bearer JWT: its seed is public, so a nonce signature with it proves nothing,
        # and the server skips one Ed25519 verification per enrolling machine.
        enroll_jwt = trust.user_jwt(
            ENROLL_NKEY, name="enroll",
            permissions=Permissions.from_config(enroll_permissions(subjects)), ttl=None,
            bearer=True,
        )
        return cls(creds_dir=creds_dir, enroll_jwt=enroll_jwt)


def _wanted(subjects: Subjects) -> dict[Role, Permissions]:
    return {
        "state": Permissions(),
        "peers": Permissions.from_config(peers_permissions(subjects)),
        "sys": Permissions(),
    }


def _unfit(path: Path, trust: OperatorTrust, role: Role, perms: Permissions) -> str | None:
    """Why the .creds file at ``path`` cannot be used for ``role`` (None: it can)."""
    try:
        if path.stat().st_mode & 0o077:
            return "is readable by others"
        token, seed = jwt.parse_creds(path.read_text())
        claims = jwt.decode(token, jwt.UserClaims)
        if jwt.public_key(seed) != claims.sub:
            return "holds a seed of another key than its JWT"
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as exc:  # JwtError is a ValueError
        return f"is unreadable ({exc})"
    if role == "sys":
        if claims.iss != trust.system_account:
            return "is not signed by this trust's system account"
    elif claims.iss != trust.fleet_signing_key or claims.nats.issuer_account != trust.fleet_account:
        return "is not signed by this trust's fleet account"
    elif trust.is_revoked(claims.sub):
        return "is revoked"
    u = claims.nats
    have = (tuple(u.pub.allow), tuple(u.pub.deny), tuple(u.sub.allow), tuple(u.sub.deny))
    if have != (perms.pub_allow, perms.pub_deny, perms.sub_allow, perms.sub_deny):
        return "has other permissions than this subject prefix needs"
    return None
