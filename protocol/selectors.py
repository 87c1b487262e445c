"""Label selectors, parsed and matched by the same code on controller and agent.

Syntax (comma = AND): ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``,
``k`` (label present), ``!k`` (label absent). An empty selector matches every node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from protocol.errors import SelectorError

Op = Literal["=", "!=", "in", "notin", "exists", "!exists"]

MAX_SELECTOR_LEN = 4096
_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,252}[A-Za-z0-9])?")
_VALUE = re.compile(r"[A-Za-z0-9._:/-]{0,253}")
_WORD_END = re.compile(r"[\s(]")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op == "=" or self.op == "in":
            return value is not None and value in self.values
        # "!=" and "notin" match nodes that lack the label, as in Kubernetes
        return value is None or value not in self.values

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!exists":
            return f"!{self.key}"
        if self.op in ("=", "!="):
            (value,) = self.values
            return f"{self.key}{self.op}{value}"
        return f"{self.key} {self.op} ({','.join(sorted(self.values))})"


@dataclass(frozen=True, slots=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        if text is None:
            return cls()
        if not isinstance(text, str):
            raise SelectorError(repr(text), 0, "selector must be a string")
        return cls(tuple(_Parser(text).parse()))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str, pos: int | None = None) -> SelectorError:
        return SelectorError(self.text, self.pos if pos is None else pos, reason)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    def parse(self) -> list[Requirement]:
        if len(self.text) > MAX_SELECTOR_LEN:
            raise self.fail(f"selector longer than {MAX_SELECTOR_LEN} characters", 0)
        reqs: list[Requirement] = []
        if self.at_end():
            return reqs
        while True:
            reqs.append(self.requirement())
            if self.at_end():
                return reqs
            if self.text[self.pos] != ",":
                raise self.fail(f"expected ',' or end of selector, found {self.text[self.pos]!r}")
            self.pos += 1
            if self.at_end():
                raise self.fail("expected a requirement after ','")

    def key(self) -> str:
        self.skip_ws()
        m = _KEY.match(self.text, self.pos)
        if not m:
            found = self.text[self.pos] if self.pos < len(self.text) else "end of selector"
            raise self.fail(f"expected a label key, found {found!r}")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_ws()
        m = _VALUE.match(self.text, self.pos)
        assert m is not None  # the pattern accepts the empty string
        self.pos = m.end()
        return m.group()

    def requirement(self) -> Requirement:
        self.skip_ws()
        if self.text.startswith("!", self.pos) and not self.text.startswith("!=", self.pos):
            self.pos += 1
            return Requirement(self.key(), "!exists")
        key = self.key()
        self.skip_ws()
        rest = self.text[self.pos :]
        for token, op in (("==", "="), ("!=", "!="), ("=", "=")):
            if rest.startswith(token):
                self.pos += len(token)
                value = self.value()
                self.skip_ws()
                if self.pos < len(self.text) and self.text[self.pos] not in ",":
                    raise self.fail(f"invalid character {self.text[self.pos]!r} in value")
                return Requirement(key, op, frozenset({value}))  # type: ignore[arg-type]
        for word, setop in (("notin", "notin"), ("in", "in")):
            if rest.startswith(word) and (
                len(rest) == len(word) or _WORD_END.match(rest, len(word))
            ):
                self.pos += len(word)
                return Requirement(key, setop, self.value_set())  # type: ignore[arg-type]
        if not rest or rest.startswith(","):
            return Requirement(key, "exists")
        raise self.fail(f"expected '=', '!=', 'in', 'notin', ',' or end after key {key!r}")

    def value_set(self) -> frozenset[str]:
        self.skip_ws()
        if not self.text.startswith("(", self.pos):
            raise self.fail("expected '(' to open the value set")
        self.pos += 1
        values: list[str] = []
        while True:
            start = self.pos
            value = self.value()
            if not value:
                raise self.fail("expected a value in the set", start)
            values.append(value)
            self.skip_ws()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            if self.text.startswith(")", self.pos):
                self.pos += 1
                return frozenset(values)
            found = self.text[self.pos] if self.pos < len(self.text) else "end of selector"
            raise self.fail(f"expected ',' or ')' in the value set, found {found!r}")


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse ``k=v`` items (CLI ``--label``) into a dict, with the selector's key rules."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise SelectorError(item, 0, "a label must look like key=value")
        labels[key] = value
    return labels
