"""Helpers every `barista` command module shares: the API client and error handling."""

from __future__ import annotations

import json
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
