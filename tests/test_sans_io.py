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


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            roots.add(".relative")  # cores import the project absolutely: checkable
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_cores_import_no_io_clock_or_randomness(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN, (
        f"{path} imports {imported_roots(path) & FORBIDDEN}"
    )


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom trio import sleep\nif True:\n    import time as t\n")
    assert imported_roots(bad) >= {"trio", "time"}
    assert len(core_files()) >= 8
