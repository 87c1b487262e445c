"""Settings from a file, the environment and flags, converted into a config dataclass by
msgspec with one clear error per bad setting. Used by the agent's and the controller's config.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")


def field_types(cls: type[Any]) -> dict[str, Any]:
    """The settings of a config dataclass and their types."""
    return typing.get_type_hints(cls)


def from_env(cls: type[Any], prefix: str) -> dict[str, Any]:
    """``<prefix><NAME>`` variables of the settings of ``cls``, parsed for their type where a
    string needs a syntax: ``a,b`` for a list, ``k=v,k2=v2`` for a dict, 1/true/yes/on for a
    bool. Scalars stay strings for msgspec to convert."""
    out: dict[str, Any] = {}
    for name, tp in field_types(cls).items():
        raw = os.environ.get(prefix + name.upper())
        if raw is not None:
            out[name] = parse_text(name, raw, tp)
    return out


def parse_text(name: str, raw: str, tp: Any) -> Any:
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # ``X | None``: parsed as X
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    if tp is bool:
        return raw.lower() in _TRUE
    if origin is list:
        return [p.strip() for p in raw.split(",") if p.strip()]
    if origin is dict:
        out: dict[str, str] = {}
        for item in raw.split(","):
            if not item.strip():
                continue
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"setting {name}: label {item!r} must be key=value")
            out[k.strip()] = v.strip()
        return out
    return raw


def _dec_hook(tp: type[Any], obj: Any) -> Any:
    if tp is Path and isinstance(obj, str | os.PathLike):
        return Path(obj)
    raise NotImplementedError(f"cannot convert to {tp}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot convert {type(obj).__name__}")


def convert(cls: type[T], values: Mapping[str, Any], *, what: str) -> T:
    """``cls`` with ``values`` over its defaults. Raises ValueError naming the setting:
    ``unknown <what> setting(s): ...`` or ``setting <name>: expected ..., got ...``."""
    unknown = set(values) - set(field_types(cls))
    if unknown:
        raise ValueError(f"unknown {what} setting(s): {', '.join(sorted(unknown))}")
    try:
        # Paths given as Path objects (flags) go through as strings, like those from a file.
        plain = msgspec.to_builtins(dict(values), enc_hook=_enc_hook)
        return msgspec.convert(plain, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ValueError(_describe(exc, values)) from None


def _describe(exc: msgspec.ValidationError, values: Mapping[str, Any]) -> str:
    """``Expected `int`, got `str` - at `$.buffer_batches``` -> ``setting buffer_batches=
    'many': expected `int`, got `str```."""
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `$.")
    if not sep:
        return f"invalid {text}"
    path = where.rstrip("`")
    name = path.split(".", 1)[0].split("[", 1)[0]
    raw = values.get(name, "?")
    at = f" (at {path})" if path != name else ""
    return f"setting {name}={raw!r} is invalid: {reason[:1].lower()}{reason[1:]}{at}"
