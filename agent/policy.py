"""Node-side command policy: an allow-list in the agent's config, checked on the node.

A policy holds even against a stolen controller key: the node refuses, after the
signature checks and before anything runs, every command the policy does not allow.

Matching (decided here, once, for argv and shell commands alike):

- A rule is an **exact** command (``uptime``), a **glob** (``systemctl restart app-*``) or,
  with the prefix ``re:``, a **regular expression**.
- Exact and glob rules are split on whitespace into words. An ``argv`` command must have
  exactly as many elements as the rule has words, each matched whole (extra arguments are
  refused). A ``shell`` command is matched as one string against the rule's words joined
  by single spaces, whole.
- In a glob, ``*`` matches any run, and ``?`` one, of the characters
  ``A-Za-z0-9_.,:/@%+=-`` only: never whitespace, never a shell metacharacter
  (``; & | < > $ ` ( ) { } \\ ' " ! * ? [ ] ~ #``), never a control character. So
  ``uptime; rm -rf /``, ``uptime && x`` or a newline can only be allowed by a rule that
  spells them out literally. Every other character of a rule is literal.
- A regex is matched with ``re.fullmatch`` against the shell string, or against
  ``shlex.join(argv)`` (quoted, so argument boundaries cannot be forged).
- A command containing a control character (newline, NUL, ...) never matches any rule.

``actions`` limits the command actions (ping, facts, exec, reconcile); ``apps = false``
refuses app deploys and reconciles; ``env`` names the environment variables a command may
set (any other is refused: ``PATH`` or ``LD_PRELOAD`` would turn an allowed command into
any command). Under a policy, ``exec`` runs only commands matching a rule: a policy
without ``commands`` allows no exec at all (fail closed).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.messages import Command

ACTIONS = ("ping", "facts", "exec", "reconcile")
# What a glob wildcard may stand for: no whitespace, no shell metacharacter.
_SAFE = r"[A-Za-z0-9_.,:/@%+=\-]"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REGEX_PREFIX = "re:"
# How much of a refused command the reason quotes.
QUOTE_MAX = 120


class PolicyError(ValueError):
    """A policy rule in the agent's config is unusable; the message names it."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowed command, compiled."""

    text: str
    # Exact and glob rules: one pattern per word. Regex rules: one pattern, whole string.
    words: tuple[re.Pattern[str], ...]
    regex: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        if not isinstance(text, str) or not text.strip():
            raise PolicyError("policy command rule must be a non-empty string")
        if _CONTROL.search(text):
            raise PolicyError(f"policy command rule {text!r} contains a control character")
        if text.startswith(REGEX_PREFIX):
            try:
                return cls(text=text, words=(), regex=re.compile(text[len(REGEX_PREFIX):]))
            except re.error as exc:
                raise PolicyError(f"policy command rule {text!r} is not a valid regex: "
                                  f"{exc}") from None
        return cls(text=text, words=tuple(_glob(w) for w in text.split()))

    def matches_argv(self, argv: list[str]) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(shlex.join(argv)) is not None
        return len(argv) == len(self.words) and all(
            p.fullmatch(a) is not None for p, a in zip(self.words, argv, strict=True)
        )

    def matches_shell(self, shell: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(shell) is not None
        whole = r"\ ".join(p.pattern for p in self.words)
        return re.fullmatch(whole, shell) is not None


def _glob(word: str) -> re.Pattern[str]:
    out = []
    for ch in word:
        if ch == "*":
            out.append(_SAFE + "*")
        elif ch == "?":
            out.append(_SAFE)
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """What this node accepts. ``check`` returns None (allowed) or the reason it is not."""

    rules: tuple[Rule, ...] = ()
    actions: frozenset[str] = frozenset(ACTIONS)
    apps: bool = True
    env: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        *,
        commands: Iterable[str] | None = None,
        actions: Iterable[str] | None = None,
        apps: bool = True,
        env: Iterable[str] = (),
    ) -> CommandPolicy:
        """Compile the config's policy; ``PolicyError`` names a bad rule or action."""
        acts = frozenset(ACTIONS if actions is None else actions)
        unknown = acts - set(ACTIONS)
        if unknown:
            raise PolicyError(f"policy actions: unknown {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(ACTIONS)})")
        if not apps:
            acts = acts - {"reconcile"}
        return cls(rules=tuple(Rule.parse(r) for r in (commands or ())), actions=acts,
                   apps=apps, env=frozenset(env))

    def check(self, cmd: Command) -> str | None:
        if cmd.action not in self.actions:
            if cmd.action == "reconcile" and not self.apps:
                return "app deploys are disabled on this node (policy_apps = false)"
            return f"action {cmd.action!r} is not allowed on this node"
        extra = sorted(set(cmd.env) - self.env)
        if extra:
            return f"environment variable(s) {', '.join(extra)} not allowed on this node"
        if cmd.action != "exec":
            return None
        if cmd.shell:
            if not _CONTROL.search(cmd.shell) and any(r.matches_shell(cmd.shell)
                                                      for r in self.rules):
                return None
            return f"shell command {_quote(cmd.shell)} matches no allowed command"
        if cmd.argv and not any(_CONTROL.search(a) for a in cmd.argv) and any(
            r.matches_argv(cmd.argv) for r in self.rules
        ):
            return None
        return f"command {_quote(shlex.join(cmd.argv))} matches no allowed command"


def _quote(text: str) -> str:
    """The refused command for the reason: repr (control characters visible), cut."""
    shown = repr(text)
    return shown if len(shown) <= QUOTE_MAX else shown[: QUOTE_MAX - 3] + "..."
