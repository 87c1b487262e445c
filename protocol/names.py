"""Name patterns both sides check the same way (deployed apps and their versions)."""

from __future__ import annotations

import re

# An app name: a subject-safe, path-safe token.
APP_NAME = re.compile(r"^[a-z0-9-]{1,40}$")
# A release version; one starting with "." is refused too (see valid_app_version).
APP_VERSION = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


def valid_app_name(name: str) -> bool:
    return bool(APP_NAME.fullmatch(name))


def valid_app_version(version: str) -> bool:
    """A version that can name a directory: the pattern, and never "." or ".."."""
    return bool(APP_VERSION.fullmatch(version)) and not version.startswith(".")
