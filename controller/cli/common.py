"""Helpers every `barista` command module shares: the API client and error handling."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from controller.cli.client import ApiClient, ApiError
from controller.errors import ConfigError


def client() -> ApiClient:
    try:
        return ApiClient()
    except (ApiError, ConfigError) as exc:
        raise click.ClickException(exc.message) from None


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the API; its errors become the CLI's clear one-line errors."""
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from None


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 90, 30s, 15m, 2h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def with_infra(selector: str, infra: str) -> str:
    """``selector`` narrowed to one infra's nodes (``--infra NAME``)."""
    if not infra:
        return selector
    from controller.provision.model import LABEL_INFRA

    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", infra):
        raise click.BadParameter(f"{infra!r} is not an infra name", param_hint="--infra")
    part = f"{LABEL_INFRA}={infra}"
    return f"{selector},{part}" if selector.strip() else part


def load_mapping(path: Path, what: str) -> dict[str, Any]:
    """A spec file (``.json``, else YAML) as a mapping; a clear one-line error otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise click.ClickException(f"{path}: not valid JSON/YAML: {exc}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: {what} must be a mapping")
    return data
