"""The one explicit registry of provider kinds: name -> factory.

A factory takes the instance's name (several instances of one kind may run side by side,
e.g. ``sim-a`` and ``sim-b``) and its raw settings (a TOML table, a test's dict); it
converts them to the kind's own typed settings and raises ``ProviderConfigError`` naming
the bad setting. Add a kind by adding one line to ``PROVIDERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from controller.errors import ConfigError
from controller.provision.contract import Provider
from controller.provision.providers import sim

ProviderFactory = Callable[[str, Mapping[str, Any]], Provider]


class ProviderConfigError(ConfigError):
    code = "provider_config"


def typed_settings(kind: str, name: str, raw: Mapping[str, Any], type_: type[Any]) -> Any:
    """``raw`` as the kind's settings struct, or a ``ProviderConfigError`` naming the key."""
    try:
        return msgspec.convert(dict(raw), type_, strict=False)
    except msgspec.ValidationError as exc:
        raise ProviderConfigError(f"provider {name} ({kind}): bad settings: {exc}") from None


def _sim(name: str, raw: Mapping[str, Any]) -> Provider:
    return sim.SimProvider(typed_settings("sim", name, raw, sim.SimSettings), name=name)


def _aws(name: str, raw: Mapping[str, Any]) -> Provider:
    from controller.provision.providers import aws

    return aws.AwsProvider(settings=typed_settings("aws", name, raw, aws.AwsSettings),
                           catalog=aws.default_catalog())


def _gcp(name: str, raw: Mapping[str, Any]) -> Provider:
    from controller.provision.providers import gcp

    return gcp.GcpProvider(settings=typed_settings("gcp", name, raw, gcp.GcpSettings),
                           catalog=gcp.default_catalog())


def _azure(name: str, raw: Mapping[str, Any]) -> Provider:
    from controller.provision.providers import azure

    return azure.AzureProvider(
        settings=typed_settings("azure", name, raw, azure.AzureSettings),
        catalog=azure.default_catalog())


def _local(name: str, raw: Mapping[str, Any]) -> Provider:
    from pathlib import Path

    from controller.provision.lab.state import LabConfig
    from controller.provision.providers import local

    settings = dict(raw)
    data_dir = settings.pop("data_dir", "")
    mode = settings.pop("mode", None)
    if not data_dir:
        raise ProviderConfigError(f"provider {name} (local): data_dir is required")
    if mode not in (None, "netns", "process"):
        raise ProviderConfigError(f"provider {name} (local): mode must be netns or process")
    return local.LocalProvider(data_dir=Path(str(data_dir)), mode=mode,
                               config=typed_settings("local", name, settings, LabConfig))


def _ssh(name: str, raw: Mapping[str, Any]) -> Provider:
    from controller.provision.providers import ssh

    return ssh.SshProvider(settings=typed_settings("ssh", name, raw, ssh.SshSettings))


PROVIDERS: Mapping[str, ProviderFactory] = {
    "sim": _sim,
    "local": _local,
    "ssh": _ssh,
    "aws": _aws,
    "gcp": _gcp,
    "azure": _azure,
}


def create_provider(kind: str, *, name: str = "", settings: Mapping[str, Any] | None = None
                    ) -> Provider:
    factory = PROVIDERS.get(kind)
    if factory is None:
        raise ProviderConfigError(
            f"unknown provider kind {kind!r} (known: {', '.join(sorted(PROVIDERS))})")
    return factory(name or kind, settings or {})


def providers_from_config(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Provider]:
    """``{"sim-a": {"kind": "sim", "rate": 10}, ...}`` (a TOML ``[providers.*]`` table) as
    provider instances by name; ``kind`` defaults to the entry's name."""
    out: dict[str, Provider] = {}
    for name, raw in entries.items():
        settings = dict(raw)
        kind = str(settings.pop("kind", name))
        out[name] = create_provider(kind, name=name, settings=settings)
    return out
