"""Controller configuration (TOML file, environment, flags) and the secrets in its data dir."""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.files import write_private
from agent.settings import convert, from_env
from controller.errors import ConfigError
from protocol.codec import METRIC_BATCH_MAX
from protocol.signing import CommandSigner

ENV_PREFIX = "BARISTA_"


@dataclass
class ControllerConfig:
    data_dir: Path = field(default_factory=lambda: Path(".barista"))
    # Empty: start the embedded nats-server in data_dir/nats.
    nats_url: str = ""
    nats_user: str = ""
    nats_password: str = ""
    # A .creds file (user JWT and seed) for NATS in operator mode: `barista ingest` with
    # --data-dir uses the embedded server's state user's.
    nats_creds: str = ""
    # The dir `barista nats init --out` wrote for an external NATS (nats_url): its trust
    # (operator, accounts, signing key) and the controller's .creds. With it, nodes are
    # isolated there as on the embedded server; without it node isolation is off.
    nats_trust: str = ""
    # Replicas of the streams and KV buckets (1; 3 on a 3+ server cluster for redundancy).
    # Streams are brought to it at every start (ensure_stream); KV buckets get it when made.
    stream_replicas: int = 1
    # URL agents use to reach NATS (defaults to the controller's own).
    agent_nats_url: str = ""
    nats_port: int = 0
    # The embedded nats-server's listen address (agents elsewhere need a reachable one).
    nats_host: str = "127.0.0.1"
    subject_prefix: str = "barista"
    api_host: str = "127.0.0.1"
    # TLS for the embedded NATS and the API with the controller's own CA (controller/tls.py);
    # false (--no-tls): plain, for the demo and loopback only. tls_names: extra DNS names
    # or IPs of the server certificate (loopback and the hostname are always in it).
    tls: bool = True
    tls_names: list[str] = field(default_factory=list)
    # The CA (PEM file) of an external NATS (nats_url) that serves TLS; join tokens then
    # pin it and the controller and `barista ingest` trust only it.
    nats_ca_file: str = ""
    api_port: int = 8640
    # Providers the engine provisions on: [controller.providers.NAME] tables with a
    # ``kind`` (sim, local, ssh, aws, gcp, azure; default: NAME) and its settings.
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Lab VMs may reuse this venv instead of installing the agent wheel (demo, tests).
    provision_reuse_venv: str = ""
    heartbeat_interval: float = 5.0
    metrics_interval: float = 10.0
    stale_after: float = 15.0
    offline_after: float = 60.0
    token_ttl: float = 24 * 3600.0
    # Lifetime of a node's NATS user JWT (operator mode); agents renew at 2/3 of it.
    node_jwt_ttl: float = 24 * 3600.0
    max_payload: int = 1024 * 1024
    # Where `barista server` writes the CLI's URL and token (env BARISTA_CONFIG overrides).
    client_config: Path | None = None
    job_retention: float = 30 * 24 * 3600.0
    jobs_max_bytes: int = 1 << 30
    metrics_max_age: float = 24 * 3600.0
    metrics_max_bytes: int = 1 << 30
    # The largest metric batch the METRICS stream stores (bytes, encoded); see
    # controller/streams.py for how it bounds what one node can hold.
    metrics_max_batch: int = METRIC_BATCH_MAX
    # Metrics sink for the built-in ingest workers; influx_kind "" = no ingest here
    # (batches stay in the METRICS stream, or a separate `barista ingest` writes them).
    influx_kind: str = ""  # "influx1" (/write) or "influx2" (v2 write API: 2.x, 3.x)
    influx_url: str = ""
    influx_db: str = "barista"
    influx_rp: str = ""
    influx_user: str = ""
    influx_password: str = field(default="", repr=False)  # kept out of logs
    influx_token: str = field(default="", repr=False)  # kept out of logs
    influx_org: str = ""
    influx_bucket: str = "barista"
    ingest_workers: int = 1

    @classmethod
    def load(
        cls, path: Path | None = None, overrides: dict[str, Any] | None = None
    ) -> ControllerConfig:
        """File, then BARISTA_* environment, then explicit overrides (flags), later wins."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as f:
                    values.update(tomllib.load(f).get("controller", {}))
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        try:
            values.update(from_env(cls, ENV_PREFIX))
            values.update({k: v for k, v in (overrides or {}).items() if v is not None})
            # An empty path is no path: the default data dir, no client config.
            if values.get("data_dir") == "":
                del values["data_dir"]
            if values.get("client_config") == "":
                values["client_config"] = None
            cfg = convert(cls, values, what="controller")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not (cfg.heartbeat_interval > 0 and cfg.metrics_interval > 0):
            raise ConfigError("heartbeat_interval and metrics_interval must be > 0")
        if not (0 < cfg.stale_after < cfg.offline_after):
            raise ConfigError("stale_after must be > 0 and < offline_after")
        if cfg.influx_kind not in ("", "influx1", "influx2"):
            raise ConfigError(
                f"influx_kind {cfg.influx_kind!r} must be influx1, influx2 or empty (no ingest)"
            )
        if cfg.influx_kind and not cfg.influx_url:
            raise ConfigError(f"influx_kind {cfg.influx_kind} needs influx_url")
        if not (1024 <= cfg.metrics_max_batch <= cfg.max_payload):
            raise ConfigError(
                f"metrics_max_batch must be between 1024 and max_payload ({cfg.max_payload})"
            )
        if cfg.ingest_workers < 1:
            raise ConfigError("ingest_workers must be at least 1")
        if not 1 <= cfg.stream_replicas <= 5:
            raise ConfigError("stream_replicas must be between 1 and 5 (NATS allows at most 5)")
        if cfg.nats_trust and not cfg.nats_url:
            raise ConfigError("nats_trust is for an external NATS: give nats_url too (the "
                              "embedded server keeps its own trust in the data dir)")
        return cfg


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, data)


def _read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    try:
        data = path.read_bytes()
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return data
    except FileNotFoundError:
        data = make()
        _write_secret(path, data)
        return data


@dataclass(frozen=True)
class Secrets:
    """The controller's secrets, each kept in its own 0600 file in the data dir."""

    api_token: str
    signer: CommandSigner

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Secrets:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        api = _read_or_create(data_dir / "api-token", lambda: secrets.token_urlsafe(32).encode())
        key = _read_or_create(
            data_dir / "signing-key.pem", lambda: CommandSigner.generate().to_pem()
        )
        return cls(
            api_token=api.decode().strip(),
            signer=CommandSigner.from_pem(key),
        )


# What the CLI's config holds (BARISTA_URL, BARISTA_TOKEN, BARISTA_CA_FILE, BARISTA_CA_SHA256
# override each).
CLIENT_KEYS = ("url", "token", "ca_file", "ca_sha256")


def default_client_config_path() -> Path:
    env = os.environ.get("BARISTA_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "barista" / "client.toml"


def write_client_config(
    path: Path, *, url: str, token: str, ca_file: str = "", ca_sha256: str = ""
) -> None:
    """The CLI's config: API URL and token (0600), like a kubeconfig, and the CA it pins
    (its file and its sha256) when the API serves TLS."""
    # json.dumps gives a valid TOML basic string for these ASCII values.
    text = f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n"
    if ca_file:
        text += f"ca_file = {json.dumps(ca_file)}\n"
    if ca_sha256:
        text += f"ca_sha256 = {json.dumps(ca_sha256)}\n"
    _write_secret(path, text.encode())


def read_client_config(path: Path | None = None) -> dict[str, str]:
    path = path or default_client_config_path()
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        out = {k: str(v) for k, v in data.items() if k in CLIENT_KEYS}
    except FileNotFoundError:
        pass
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"client config {path} is not valid TOML: {exc}") from None
    if os.environ.get("BARISTA_URL"):
        out["url"] = os.environ["BARISTA_URL"]
    if os.environ.get("BARISTA_TOKEN"):
        out["token"] = os.environ["BARISTA_TOKEN"]
    for key in ("ca_file", "ca_sha256"):
        if os.environ.get(f"BARISTA_{key.upper()}"):
            out[key] = os.environ[f"BARISTA_{key.upper()}"]
    return out
