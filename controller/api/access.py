"""Who may call which route: every handler declares the role it needs with ``@requires``
(or ``@public``), and the auth middleware is the one place that enforces it.

A route whose handler declares nothing is refused (fail closed), and
``tests/integration/test_rbac.py`` enumerates every registered route to check each
declares one. Handlers read the caller with ``principal(request)`` and add what an audit
record should name (an app, a token name, a selector) with ``note(request, ...)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from aiohttp import web

from controller.auth import ROLES, Principal, Role

Access = Role | Literal["public"]
H = TypeVar("H", bound=Callable[[web.Request], Awaitable[web.StreamResponse]])
ROLE_ATTR = "barista_role"
PRINCIPAL = web.RequestKey("principal", Principal)
NOTES: web.RequestKey[dict[str, str]] = web.RequestKey("audit_notes")


def requires(role: Access) -> Callable[[H], H]:
    """Declare the role a handler needs (``"public"``: no token at all)."""
    if role != "public" and role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def mark(handler: H) -> H:
        setattr(handler, ROLE_ATTR, role)
        return handler

    return mark


def required_role(handler: object) -> Access | None:
    role = getattr(handler, ROLE_ATTR, None)
    return role if role == "public" or role in ROLES else None


def principal(request: web.Request) -> Principal:
    """The authenticated caller (the middleware set it before the handler runs)."""
    return request[PRINCIPAL]


def note(request: web.Request, **fields: str) -> None:
    """What the audit record of this call names besides method and path: ``target`` (an
    app, token or job), ``selector``. Never a secret."""
    request.setdefault(NOTES, {}).update(fields)
