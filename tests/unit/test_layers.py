"""The import layers of ARCHITECTURE.md, read from every module's source with ``ast``:
protocol imports nothing of ours, the agent only protocol and itself, and no controller
module outside controller.cli imports the CLI or the API (the API never imports the CLI)."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("protocol", "agent", "controller", "tests", "bench")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (a function's
    lazy import and a TYPE_CHECKING import count like any other)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from controller import api` imports controller.api
                yield node.lineno, f"{target}.{alias.name}" if target else alias.name


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def ours(name: str) -> bool:
    return any(within(name, top) for top in OURS)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, allowed: Callable[[str, str], bool]) -> list[str]:
    out = []
    for path in modules(package):
        me = module_name(path)
        for line, target in imports(path):
            if ours(target) and not allowed(me, target):
                out.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target}")
    return out


def test_every_package_has_modules() -> None:
    for package in ("protocol", "agent", "controller"):
        assert modules(package), f"no modules found under {package}/"


def test_protocol_imports_nothing_of_ours() -> None:
    assert violations("protocol", lambda me, t: within(t, "protocol")) == []


def test_agent_imports_only_protocol_and_agent() -> None:
    def allowed(me: str, target: str) -> bool:
        return within(target, "protocol") or within(target, "agent")

    assert violations("agent", allowed) == []


# Agent modules the controller reuses (the agent is the base distribution, so the controller
# always has it): the one atomic private-file writer and the settings coercion. Nothing
# else of the agent: the dependency never goes the other way.
SHARED_AGENT_MODULES = ("agent.files", "agent.settings")


def test_controller_depends_on_neither_cli_nor_api_below_them() -> None:
    def allowed(me: str, target: str) -> bool:
        if any(within(target, shared) for shared in SHARED_AGENT_MODULES):
            return True
        if not within(target, "controller"):
            return within(target, "protocol")  # never the rest of the agent, tests or bench
        if within(me, "controller.cli") or me == "controller.__main__":
            return True  # the CLI (and `python -m controller`) sits on top of everything
        if within(target, "controller.cli"):
            return False
        if within(target, "controller.api"):
            return within(me, "controller.api")
        return True

    assert violations("controller", allowed) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import controller.api.app", "controller.api.app"),
        ("from controller import cli", "controller.cli"),
        ("from . import keys", "controller.api.keys"),
        ("from ..service import Controller", "controller.service"),
        ("def f():\n    from controller.cli.main import main", "controller.cli.main"),
        ("from ... import agent", "agent"),
    ],
)
def test_imports_are_resolved(tmp_path: Path, source: str, expected: str) -> None:
    """The checker itself: relative, lazy and `from package import module` imports."""
    path = tmp_path / "controller" / "api" / "routes.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert expected in {t for _, t in imports(path, tmp_path)}


def narrows_only(test: ast.expr) -> bool:
    """``x is not None`` or ``isinstance(...)`` (and ``and`` of those): what an assert may
    say in code that runs under ``python -OO``."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return all(narrows_only(v) for v in test.values)
    if isinstance(test, ast.Compare):
        return (len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot)
                and isinstance(test.comparators[0], ast.Constant)
                and test.comparators[0].value is None)
    return (isinstance(test, ast.Call) and isinstance(test.func, ast.Name)
            and test.func.id == "isinstance")


def test_agent_asserts_only_narrow_types() -> None:
    """The agent runs under -OO (infra/systemd/barista-agent.service, the installer's
    supervisor), which drops asserts: none in agent/ or protocol/ may check anything real."""
    found = []
    for package in ("agent", "protocol"):
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assert) and not narrows_only(node.test):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                 f"assert {ast.unparse(node.test)}")
    assert not found, "use an if and an exception instead:\n" + "\n".join(found)
