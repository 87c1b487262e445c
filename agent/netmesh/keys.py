"""The node's WireGuard key: made on the node, kept 0600 in the state dir; only the public
key ever leaves. Two-phase rotation keeps the old key until the network committed the new.

Files (base64, as `wg genkey` writes them): ``wireguard.key`` (in use), ``wireguard-next.key``
(announced, not yet in use), ``wireguard-old.key`` (replaced, kept until the controller
committed the new key, so a restart mid-rotation can still fall back).
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random as random_bytes

from agent.files import write_private

KEY_FILE = "wireguard.key"
NEXT_FILE = "wireguard-next.key"
OLD_FILE = "wireguard-old.key"


class PrivateKey:
    """A Curve25519 private key that never shows itself (repr, str, logs)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = bytearray(random_bytes(32))
        raw[0] &= 248  # Curve25519 clamping, as `wg genkey` does
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(base64.b64decode(text.strip(), validate=True))

    def secret(self) -> bytes:
        """The 32 raw bytes: for the WireGuard backend only (hex on the UAPI socket)."""
        return self._raw

    def to_base64(self) -> str:
        return base64.b64encode(self._raw).decode()

    @property
    def public(self) -> bytes:
        return crypto_scalarmult_base(self._raw)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    def __repr__(self) -> str:
        return f"<PrivateKey public={self.public_b64}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self.public)


class KeyStore:
    """The key files of one node (``directory`` is created 0700)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.current = self._load(KEY_FILE) or self._create()
        self.next = self._load(NEXT_FILE)
        self.old = self._load(OLD_FILE)

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _load(self, name: str) -> PrivateKey | None:
        path = self._path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: tighten, keep the key
        return PrivateKey.from_base64(text)

    def _save(self, name: str, key: PrivateKey) -> None:
        write_private(self._path(name), key.to_base64().encode() + b"\n")

    def _create(self) -> PrivateKey:
        key = PrivateKey.generate()
        self._save(KEY_FILE, key)
        return key

    @property
    def public(self) -> str:
        return self.current.public_b64

    @property
    def next_public(self) -> str:
        return self.next.public_b64 if self.next is not None else ""

    def begin_rotation(self) -> str:
        """Make the next key (or keep the one already made) and return its public key."""
        if self.next is None:
            self.next = PrivateKey.generate()
            self._save(NEXT_FILE, self.next)
        return self.next.public_b64

    def switch(self) -> None:
        """Use the next key from now on; the current one is kept as the old key."""
        if self.next is None:
            return
        self._save(OLD_FILE, self.current)
        self._save(KEY_FILE, self.next)
        self.old, self.current, self.next = self.current, self.next, None
        with contextlib.suppress(FileNotFoundError):
            self._path(NEXT_FILE).unlink()

    def finish(self) -> None:
        """The network committed the current key: forget the old one."""
        self.old = None
        with contextlib.suppress(FileNotFoundError):
            self._path(OLD_FILE).unlink()
