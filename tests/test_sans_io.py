"""The protocol cores are sans-I/O (STYLE.md, habit 1): they never import trio, sockets, the
clock or randomness — time and randomness are passed in — so they run identically in tests, in
the simulator and in the node. This reads each core's imports (static: nothing is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "villaged"

#: The cores: every module of these packages, and these single modules.
CORE_PACKAGES = ("xmpp",)
CORE_MODULES = (
    "admin/protocol.py",
    "cluster/raft.py",
    "cluster/wire.py",
    "cluster/placement.py",
    "federation/stream.py",
)

FORBIDDEN = frozenset(
    {
        "trio",
        "anyio",
        "asyncio",
        "socket",
        "ssl",
        "selectors",
        "select",
        "time",
        "datetime",
        "random",
        "secrets",
        "uuid",
        "os",
        "threading",
        "subprocess",
    }
)


def core_files() -> list[Path]:
    files = [p for package in CORE_PACKAGES for p in sorted((PACKAGE / package).rglob("*.py"))]
    files += [PACKAGE / m for m in CORE_MODULES]
    return files


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (dotted names; ".relative" for a relative import)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.add(".relative")  # cores import the project absolutely: checkable
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from villaged.xmpp import xml` imports the module villaged.xmpp.xml
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imports(path)}


def module_file(name: str) -> Path | None:
    """The file of a ``villaged.*`` module (None for a name that is not a module)."""
    parts = name.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None


def forbidden_reach(path: Path) -> dict[str, set[str]]:
    """Forbidden imports of ``path`` and of every project module it reaches, by file."""
    found: dict[str, set[str]] = {}
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        names = imports(current)
        bad = {n.split(".")[0] for n in names} & (FORBIDDEN | {".relative"})
        if bad:
            found[str(current.relative_to(PACKAGE))] = bad
        for name in names:
            if name.startswith("villaged."):
                target = module_file(name)
                if target is not None:
                    todo.append(target)
    return found


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_cores_import_no_io_clock_or_randomness(path: Path) -> None:
    assert path.is_file(), f"{path} is listed as a core but does not exist"
    # Directly, or through a project module they import (which would bring the I/O along).
    assert forbidden_reach(path) == {}


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom trio import sleep\nif True:\n    import time as t\n")
    assert imported_roots(bad) >= {"trio", "time"}
    assert len(core_files()) >= 8
    # A project module that does I/O is found behind the core that imports it.
    assert "net/c2s.py" in forbidden_reach(PACKAGE / "net" / "websocket.py")
