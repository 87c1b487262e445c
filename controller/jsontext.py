"""Strict JSON parsing for every body and spec the controller takes in (API, app specs).

Anything malformed is ``BadRequest`` (HTTP 400), never another exception: deep nesting
(RecursionError in the decoder) and NaN/Infinity (not JSON) included.
"""

from __future__ import annotations

import json
from typing import Any

from controller.errors import BadRequest


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and no valid setting.
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes | str, what: str = "request body") -> Any:
    """JSON text -> value; raises ``BadRequest`` naming ``what`` when it is not valid JSON."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        # The C decoder recurses per nesting level: `[[[[...` 100,000 deep is a client
        # error like any other malformed body.
        raise BadRequest(f"{what} is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
