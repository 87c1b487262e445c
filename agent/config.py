"""Agent configuration: TOML file, then BARISTA_AGENT_* environment, then flags."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from protocol.subjects import ENROLL_PASSWORD, ENROLL_USER

ENV_PREFIX = "BARISTA_AGENT_"
DEFAULT_CONFIG = Path("/etc/barista/agent.toml")


class ConfigError(ValueError):
    """The agent's configuration is unusable; the message says which setting and why."""


@dataclass
class AgentConfig:
    nats_urls: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    # One-time join token; only needed until the agent has enrolled. Give it as a file
    # (token_file, mode 0600) or in BARISTA_AGENT_TOKEN, never on the command line.
    token: str = ""
    token_file: str = ""
    state_dir: Path = field(default_factory=lambda: Path("/var/lib/barista-agent"))
    labels: dict[str, str] = field(default_factory=dict)
    # Base64 Ed25519 keys of the controller; commands signed by other keys are refused.
    controller_keys: list[str] = field(default_factory=list)
    hostname: str = ""
    subject_prefix: str = "barista"
    # Credentials for a NATS that the controller does not manage (auth "none" at
    # enrollment): a .creds file (JWT) or user/password.
    nats_creds: str = ""
    nats_user: str = ""
    nats_password: str = ""
    enroll_user: str = ENROLL_USER
    enroll_password: str = ENROLL_PASSWORD
    # 0 = use what the controller says at enrollment.
    heartbeat_interval: float = 0.0
    metrics_interval: float = 0.0
    collectors: list[str] = field(default_factory=list)
    # Metric batches kept while NATS is unreachable (drop-oldest); 360 = 1 h at 10 s.
    buffer_batches: int = 360
    max_concurrency: int = 8
    allow_run_as_user: bool = False
    enroll_timeout: float = 5.0
    log_level: str = "info"

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
        values: dict[str, Any] = {}
        file = path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        if file is not None:
            import tomllib  # only with a config file: ~0.5 MB of RSS otherwise saved

            try:
                with open(file, "rb") as f:
                    data = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError(f"config file {file} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
            values.update(data.get("agent", data))
        names = {f.name for f in fields(cls)}
        for name in names:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env is not None:
                values[name] = env
        for k, v in (overrides or {}).items():
            if v is not None and v != [] and v != {}:
                values[k] = v
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"unknown agent setting(s): {', '.join(sorted(unknown))}")
        cfg = cls()
        for name, raw in values.items():
            setattr(cfg, name, _coerce(name, raw, getattr(cfg, name)))
        cfg.validate()
        return cfg

    def join_token(self) -> str:
        """The join token: ``token`` if set, else the content of ``token_file`` (read only
        now, when enrollment needs it, so an enrolled agent runs without the file)."""
        if self.token or not self.token_file:
            return self.token.strip()
        path = Path(self.token_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token_file {path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            logging.getLogger("barista.agent.config").warning(
                "token_file %s is readable by other users (mode %o); make it 0600",
                path, mode & 0o777,
            )
        if not text:
            raise ConfigError(f"token_file {path} is empty")
        return text

    def validate(self) -> None:
        if not self.nats_urls:
            raise ConfigError("nats_urls is empty: give at least one NATS server URL")
        for url in self.nats_urls:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ConfigError(
                    f"nats url {url!r} must start with nats://, tls://, ws:// or wss://"
                )
        if self.buffer_batches < 1:
            raise ConfigError("buffer_batches must be at least 1")
        if self.heartbeat_interval < 0 or self.metrics_interval < 0:
            raise ConfigError("intervals must be positive (or 0 for the controller's default)")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")


def _coerce(name: str, raw: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, list):
            if isinstance(raw, str):
                return [p.strip() for p in raw.split(",") if p.strip()]
            return [str(x) for x in raw]
        if isinstance(default, dict):
            if isinstance(raw, str):
                out: dict[str, str] = {}
                for item in raw.split(","):
                    if not item.strip():
                        continue
                    k, sep, v = item.partition("=")
                    if not sep:
                        raise ValueError(f"label {item!r} must be key=value")
                    out[k.strip()] = v.strip()
                return out
            return {str(k): str(v) for k, v in dict(raw).items()}
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={raw!r} is invalid: {exc}") from None
