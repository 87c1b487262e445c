"""Infra specs from YAML or JSON into ``InfraSpec``, validated against the providers'
catalogs; every error names the field it is about (``groups[1].regions[0]: ...``).

Sizes given as ``{vcpus, memory_gb}`` stay queries in the spec (the catalog may change);
``resolve_size`` picks the cheapest catalog size per region when the engine or a review
needs one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml

from controller.enroll import clean_labels
from controller.errors import BadRequest
from controller.provision.catalog import cheapest
from controller.provision.contract import Catalog, Size
from controller.provision.model import GroupSpec, InfraSpec, SizeQuery

# Infra and group names end up in tags, node names and hostnames ("<infra>-<group>-<i>"),
# which every cloud limits to 63 characters of [a-z0-9-].
NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
SSH_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) "
                        r"[A-Za-z0-9+/]+={0,3}( [^\r\n]{0,200})?$")
INFRA_NAME_MAX = 30
GROUP_NAME_MAX = 24
COUNT_MAX = 10_000
RESERVED_LABEL_PREFIX = "barista-"
MAX_SPEC_BYTES = 1 << 20


class SpecError(BadRequest):
    """A spec that cannot be used; ``errors`` is every (field path, reason) found."""

    code = "invalid_spec"

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        text = "; ".join(f"{path}: {reason}" if path else reason for path, reason in errors)
        super().__init__(f"invalid infra spec: {text}",
                         details=[{"field": p, "error": r} for p, r in errors])


def parse_spec(raw: bytes | str, *, catalogs: Mapping[str, Catalog],
               yaml_text: bool | None = None) -> InfraSpec:
    """Parse and validate a spec. ``yaml_text`` None: JSON if it parses as JSON, else YAML
    (JSON is YAML too, but YAML's errors are worse for JSON input)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([("", f"spec is larger than {MAX_SPEC_BYTES} bytes")])
    data: Any
    if yaml_text is None:
        try:
            data = json.loads(text)
        except ValueError:
            data = _load_yaml(text)
    elif yaml_text:
        data = _load_yaml(text)
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError([("", f"spec is not valid JSON: {exc}")]) from None
    return spec_from_obj(data, catalogs=catalogs)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([("", f"spec is not valid YAML{where}: {problem}")]) from None


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`")


def spec_from_obj(data: Any, *, catalogs: Mapping[str, Catalog]) -> InfraSpec:
    """A decoded JSON/YAML document into a validated spec."""
    if not isinstance(data, dict):
        raise SpecError([("", "spec must be a mapping with name and groups")])
    try:
        spec = msgspec.convert(data, InfraSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise SpecError([_translate(str(exc))]) from None
    return validate_spec(spec, catalogs=catalogs)


def _translate(message: str) -> tuple[str, str]:
    """msgspec's "Object contains unknown field `x` - at `$.groups[0]`" as
    ("groups[0].x", "unknown key (known: ...)")."""
    m = _MSGSPEC_PATH.search(message)
    path = m.group("path").lstrip(".") if m else ""
    body = message[: m.start()] if m else message
    if (u := _UNKNOWN.match(body)) is not None:
        owner = GroupSpec if re.fullmatch(r"groups\[\d+\]", path) else (
            SizeQuery if path.endswith(".size") else InfraSpec)
        known = ", ".join(owner.__struct_fields__)
        return _join(path, u.group("field")), f"unknown key (known: {known})"
    if (r := _MISSING.match(body)) is not None:
        return _join(path, r.group("field")), "is required"
    return path, body[0].lower() + body[1:] if body else "invalid"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate_spec(spec: InfraSpec, *, catalogs: Mapping[str, Catalog]) -> InfraSpec:
    """Check a spec against the catalogs; returns it with labels as stored (trimmed)."""
    errors: list[tuple[str, str]] = []
    if not _name_ok(spec.name, INFRA_NAME_MAX):
        errors.append(("name", _name_reason(spec.name, INFRA_NAME_MAX)))
    labels = _labels(spec.labels, "labels", errors)
    if not spec.groups:
        errors.append(("groups", "an infra needs at least one group"))
    seen: dict[str, int] = {}
    groups: list[GroupSpec] = []
    for i, g in enumerate(spec.groups):
        at = f"groups[{i}]"
        if not _name_ok(g.name, GROUP_NAME_MAX):
            errors.append((f"{at}.name", _name_reason(g.name, GROUP_NAME_MAX)))
        elif g.name in seen:
            errors.append((f"{at}.name",
                           f"duplicate group {g.name!r} (also groups[{seen[g.name]}])"))
        else:
            seen[g.name] = i
        if g.count < 0:
            errors.append((f"{at}.count", f"must be 0 or more, not {g.count}"))
        elif g.count > COUNT_MAX:
            errors.append((f"{at}.count", f"at most {COUNT_MAX} nodes per group"))
        if g.ssh_public_key and not SSH_KEY_RE.match(g.ssh_public_key.strip()):
            errors.append((f"{at}.ssh_public_key", "not an OpenSSH public key (one line: "
                           "'ssh-ed25519 AAAA... comment', ssh-rsa or ecdsa-sha2-*)"))
        g_labels = _labels(g.labels, f"{at}.labels", errors)
        groups.append(msgspec.structs.replace(g, labels=g_labels))
        catalog = catalogs.get(g.provider)
        if catalog is None:
            known = ", ".join(sorted(catalogs)) or "none configured"
            errors.append((f"{at}.provider", f"unknown provider {g.provider!r} (known: {known})"))
            continue
        if not g.regions:
            errors.append((f"{at}.regions", "give at least one region (in order of preference)"))
        for j, where in enumerate(g.regions):
            reason = _placement_reason(catalog, where)
            if reason:
                errors.append((f"{at}.regions[{j}]", reason))
                continue
            region = where.partition("/")[0]
            try:
                resolve_size(catalog, g.size, region)
            except LookupError as exc:
                errors.append((f"{at}.size", str(exc)))
        if g.image not in catalog.images:
            known = ", ".join(sorted(catalog.images))
            errors.append((f"{at}.image", f"unknown image {g.image!r} for provider "
                                          f"{g.provider} (known: {known})"))
        if isinstance(g.size, SizeQuery) and (g.size.vcpus < 1 or g.size.memory_gb <= 0):
            errors.append((f"{at}.size", "vcpus must be at least 1 and memory_gb above 0"))
    if errors:
        raise SpecError(_dedupe(errors))
    return msgspec.structs.replace(spec, labels=labels, groups=groups)


def _dedupe(errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(errors))


def _name_ok(name: str, limit: int) -> bool:
    return bool(NAME.fullmatch(name)) and len(name) <= limit


def _name_reason(name: str, limit: int) -> str:
    return (f"{name!r} is not a valid name: use 1-{limit} characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit")


def _labels(labels: dict[str, str], at: str, errors: list[tuple[str, str]]) -> dict[str, str]:
    for key in labels:
        if isinstance(key, str) and key.strip().startswith(RESERVED_LABEL_PREFIX):
            errors.append((f"{at}.{key}",
                           f"label keys starting with {RESERVED_LABEL_PREFIX!r} are reserved"))
            return labels
    try:
        return clean_labels(labels)
    except BadRequest as exc:
        errors.append((at, exc.message))
        return labels


def _placement_reason(catalog: Catalog, where: str) -> str:
    region_name, _, zone = where.partition("/")
    region = catalog.regions.get(region_name)
    if region is None:
        known = ", ".join(sorted(catalog.regions))
        return f"unknown region {region_name!r} for provider {catalog.provider} (known: {known})"
    if zone and zone not in region.zones:
        known = ", ".join(region.zones) or "this region has no zones"
        return f"unknown zone {zone!r} in region {region_name} (known: {known})"
    return ""


@dataclass(frozen=True, slots=True)
class ResolvedSize:
    size: Size
    price_hour: float | None


def resolve_size(catalog: Catalog, size: str | SizeQuery, region: str) -> ResolvedSize:
    """The catalog size a group gets in ``region``: the one named, or the cheapest with at
    least the vCPUs and memory asked (``catalog.cheapest``). Raises
    ``LookupError`` saying why none fits."""
    if isinstance(size, str):
        found = catalog.sizes.get(size)
        if found is None:
            known = ", ".join(sorted(catalog.sizes))
            raise LookupError(f"unknown size {size!r} for provider {catalog.provider} "
                              f"(known: {known})")
        if not found.offered_in(region):
            raise LookupError(f"size {size!r} is not offered in region {region}")
        return ResolvedSize(found, found.price_hour.get(region))
    best = cheapest(catalog, region, vcpus=size.vcpus, memory_gb=size.memory_gb)
    if best is None:
        raise LookupError(f"no size of provider {catalog.provider} in region {region} has "
                          f"{size.vcpus} vCPUs and {size.memory_gb:g} GB")
    return ResolvedSize(best, best.price_hour.get(region))
