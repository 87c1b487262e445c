"""The agent's identity key (a NATS user nkey, kept 0600) and its enrollment state."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nkeys

from agent.files import write_private
from protocol.messages import EnrollRequest
from protocol.signing import sign_enroll


class Identity:
    """Ed25519 nkey seed generated on first start; the private part never leaves the machine."""

    def __init__(self, seed_path: Path) -> None:
        self.seed_path = seed_path
        seed = self._load_or_create()
        kp = nkeys.from_seed(seed)
        self.public_key: str = kp.public_key.decode()
        kp.wipe()

    def sign_enroll(self, req: EnrollRequest) -> EnrollRequest:
        """``req`` signed with this identity (the proof of possession the controller
        checks). The seed is read for this and not kept in memory."""
        seed = bytearray(self.seed_path.read_bytes().strip())
        try:
            return sign_enroll(req, seed)
        finally:
            seed[:] = bytes(len(seed))

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data`` (the server's nonce, in operator mode)."""
        seed = bytearray(self.seed_path.read_bytes().strip())
        kp = nkeys.from_seed(seed)
        try:
            return bytes(kp.sign(data))
        finally:
            kp.wipe()
            seed[:] = bytes(len(seed))

    def _load_or_create(self) -> bytearray:
        try:
            data = self.seed_path.read_bytes().strip()
            if self.seed_path.stat().st_mode & 0o077:
                os.chmod(self.seed_path, 0o600)
            return bytearray(data)
        except FileNotFoundError:
            pass
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        self.seed_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.seed_path, bytes(seed))
        return bytearray(seed)


@dataclass
class EnrollState:
    node_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    auth: str = "none"
    inbox_prefix: str = ""
    command_keys: list[str] = field(default_factory=list)
    heartbeat_interval: float = 5.0
    metrics_interval: float = 10.0
    # NATS operator mode: the node's user JWT (the file is 0600), renewed before expiry.
    nats_jwt: str = ""
    # The enroll identity's JWT (public): to renew an expired nats_jwt after a long absence.
    enroll_jwt: str = ""
    # The rotation step command_keys result from (EnrollReply.key_seq).
    key_seq: int = 0
    # A member of an overlay network (told at enrollment or by a MeshInvite since).
    mesh: bool = False
    # Taken out of its last network since (the key stays): no overlay at start.
    mesh_left: bool = False
    # The controller sends MeshInvites (EnrollReply.mesh_invites); False: it predates them,
    # and the overlay starts at every start, as it did then.
    mesh_invites: bool = False
    # App releases were assigned at enrollment (EnrollReply.apps): asked for at the first
    # start only if so (every later start asks).
    apps_at_enrollment: bool = True

    @classmethod
    def load(cls, path: Path) -> EnrollState | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        state = cls(**known)
        return state if state.node_id else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(asdict(self), indent=2).encode())
