"""Agent configuration: TOML file, then BARISTA_AGENT_* environment, then flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import settings
from agent.policy import CommandPolicy, PolicyError
from protocol.subjects import ENROLL_PASSWORD, ENROLL_USER

if TYPE_CHECKING:
    from agent.collectors.base import CollectorOptions

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
    # A CA (PEM) to trust for NATS instead of the one the join token pins and the agent
    # learns at enrollment (kept as state_dir/ca.pem); checked against the pin if any.
    ca_file: str = ""
    enroll_user: str = ENROLL_USER
    enroll_password: str = ENROLL_PASSWORD
    # NATS operator mode: the enroll identity's JWT (no secret; usually carried by the join
    # token after "~", which `barista token create` prints).
    enroll_jwt: str = ""
    # 0 = use what the controller says at enrollment.
    heartbeat_interval: float = 0.0
    metrics_interval: float = 0.0
    collectors: list[str] = field(default_factory=list)
    # Which interfaces, mounts and block devices the collectors report: globs (fnmatch),
    # include lists empty = all; the ignore lists apply after them. None = the built-in
    # default (agent/collectors/base.py). Telegraf's `interfaces`, `mount_points`,
    # `ignore_fs`, `devices`; see infra/influxdb/README.md.
    net_interfaces: list[str] = field(default_factory=list)
    net_ignore_interfaces: list[str] = field(default_factory=list)
    disk_mount_points: list[str] = field(default_factory=list)
    disk_ignore_mount_points: list[str] | None = None
    disk_fs: list[str] = field(default_factory=list)
    disk_ignore_fs: list[str] | None = None
    diskio_devices: list[str] = field(default_factory=list)
    diskio_ignore_devices: list[str] | None = None
    # Metric batches kept while NATS is unreachable (drop-oldest); 360 = 1 h at 10 s.
    buffer_batches: int = 360
    max_concurrency: int = 8
    allow_run_as_user: bool = False
    enroll_timeout: float = 5.0
    log_level: str = "info"
    # Node-side command policy (agent/policy.py says how rules match). Present when any
    # of commands/actions is given or apps is off; then everything else is refused here.
    # In TOML also as a [policy] table: commands, actions, apps, env.
    policy_commands: list[str] | None = None
    policy_actions: list[str] | None = None
    policy_apps: bool = True
    policy_env: list[str] = field(default_factory=list)
    # Overlay network (agent/netmesh). The interfaces appear only when the controller puts
    # the node into a network. backend: auto (kernel WireGuard where the module exists,
    # else wireguard-go), kernel or wireguard-go. Endpoints: where peers reach this node's
    # WireGuard port; mesh_network_id names its VPC / region network (peers in the same
    # one use the private address; default: the VPC range); no public address = behind
    # NAT. The same addresses are the node's underlay facts (agent/facts.py): the private
    # address defaults to the one routing to the controller, the VPC range to its
    # interface's prefix; mesh_public_address may also be "none" or "private" (the
    # private address is public), which is what the boot config's underlay says.
    mesh_enabled: bool = True
    mesh_backend: str = "auto"
    mesh_ifname_prefix: str = "bm-"
    mesh_private_address: str = ""
    mesh_public_address: str = ""
    mesh_vpc_cidr: str = ""
    mesh_network_id: str = ""
    mesh_region: str = ""
    mesh_port: int = 51820
    mesh_health_interval: float = 10.0
    # How often (seconds) the agent looks at its underlay (addresses, VPC range) while it
    # runs; a change is sent to the controller (FactsUpdate). 0: only at start.
    facts_interval: float = 60.0
    mesh_netns: str = ""  # lab/tests: drive the interfaces of a named network namespace

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
            values.update(_policy_table(values.pop("policy", None) or data.get("policy")))
        try:
            values.update(settings.from_env(cls, ENV_PREFIX))
            for k, v in (overrides or {}).items():
                if v is not None and v != [] and v != {}:
                    values[k] = v
            cfg = settings.convert(cls, values, what="agent")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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
        if self.mesh_backend not in ("auto", "kernel", "wireguard-go"):
            raise ConfigError(f"mesh_backend {self.mesh_backend!r} must be auto, kernel or "
                              "wireguard-go")
        for name in ("mesh_private_address", "mesh_public_address", "mesh_vpc_cidr"):
            _check_underlay(name, getattr(self, name))
        if not 1 <= self.mesh_port <= 65535:
            raise ConfigError(f"mesh_port {self.mesh_port} out of range")
        if self.mesh_health_interval <= 0:
            raise ConfigError("mesh_health_interval must be positive")
        if self.facts_interval < 0:
            raise ConfigError("facts_interval must be positive (or 0: facts sent at start only)")
        try:
            self.command_policy()
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        self.collector_options()

    def collector_options(self) -> CollectorOptions:
        """The collectors' include/exclude globs; ConfigError names a bad one."""
        from agent.collectors.base import CollectorOptions, NameFilter

        defaults = CollectorOptions()
        values: dict[str, tuple[str, ...]] = {}
        for name in (
            "net_interfaces", "net_ignore_interfaces", "disk_mount_points",
            "disk_ignore_mount_points", "disk_fs", "disk_ignore_fs", "diskio_devices",
            "diskio_ignore_devices",
        ):  # fmt: skip
            value = getattr(self, name)
            globs = getattr(defaults, name) if value is None else tuple(value)
            try:
                NameFilter(globs)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{name}: {exc}") from None
            values[name] = globs
        return CollectorOptions(**values)  # type: ignore[arg-type]  # all tuple fields

    @property
    def has_policy(self) -> bool:
        return (self.policy_commands is not None or self.policy_actions is not None
                or not self.policy_apps)

    def command_policy(self) -> CommandPolicy | None:
        """The compiled policy, or None when the config sets none (everything allowed)."""
        if not self.has_policy:
            return None
        return CommandPolicy.build(commands=self.policy_commands, actions=self.policy_actions,
                                   apps=self.policy_apps, env=self.policy_env)


def _check_underlay(name: str, value: str) -> None:
    """An address (or for the public one "none" / "private"), a CIDR list for the VPC."""
    import ipaddress

    from agent.facts import PUBLIC_IS_PRIVATE, PUBLIC_NONE

    if not value or (name == "mesh_public_address" and value in (PUBLIC_NONE,
                                                                  PUBLIC_IS_PRIVATE)):
        return
    try:
        if name == "mesh_vpc_cidr":
            for part in value.split(","):
                ipaddress.ip_network(part.strip(), strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError as exc:
        extra = ' (or "none", "private")' if name == "mesh_public_address" else ""
        raise ConfigError(f"{name} {value!r}: {exc}{extra}") from None


def _policy_table(table: Any) -> dict[str, Any]:
    """A TOML ``[policy]`` table as the flat ``policy_*`` settings."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ConfigError("[policy] must be a table (commands, actions, apps, env)")
    unknown = set(table) - {"commands", "actions", "apps", "env"}
    if unknown:
        raise ConfigError(f"unknown [policy] setting(s): {', '.join(sorted(unknown))}")
    return {f"policy_{k}": v for k, v in table.items()}

