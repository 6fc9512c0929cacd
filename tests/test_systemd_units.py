"""The systemd units in ``systemd/`` and ``make install``, checked with systemd's own tools.

``systemd-analyze verify`` must accept every unit without a warning, the server's hardening must
keep ``systemd-analyze security --offline=true`` at or below the 2.0 promised in DESIGN.md, the
sysusers.d file must apply to an empty root, and ``make install DESTDIR=...`` must lay out a
working installation. CI installs systemd-analyze through ``.ci/system-deps``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = [
    "villaged.service",
    "villaged-backup.service",
    "villaged-backup.timer",
    "villaged-alert@.service",
]
INSTALLED_BINARY = "/usr/local/bin/villaged"
MAX_EXPOSURE = 2.0


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: run `bash .ci/system-deps` (Debian: systemd)"
    return path


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=240)


@pytest.fixture
def staged_units(tmp_path: Path) -> Path:
    """The units, with the not-yet-installed villaged binary replaced by one that exists."""
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert INSTALLED_BINARY in text or name.endswith(".timer") or "@" in name
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, sys.executable))
    return tmp_path


def exposure(unit: Path) -> float:
    result = run(
        [systemd_tool("systemd-analyze"), "security", "--offline=true", "--no-pager", unit.name],
        cwd=unit.parent,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout
    )
    assert match is not None, result.stdout + result.stderr
    return float(match.group(1))


def test_every_unit_file_is_checked() -> None:
    shipped = {p.name for p in UNIT_DIR.iterdir() if p.suffix in {".service", ".timer"}}
    assert shipped == set(UNITS)


def test_units_verify_without_warnings(staged_units: Path) -> None:
    # The template is verified both as itself and as the instance OnFailure= starts.
    names = [*UNITS, "villaged-alert@villaged-backup.service.service"]
    result = run(
        [systemd_tool("systemd-analyze"), "verify", "--man=no", *(f"./{n}" for n in names)],
        cwd=staged_units,
    )
    # Unknown or malformed settings are only warnings (exit code 0), so stderr must be empty too.
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr


def test_verify_rejects_an_unknown_setting(staged_units: Path) -> None:
    unit = staged_units / "villaged.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nProtectEverything=yes\n"))
    result = run(
        [systemd_tool("systemd-analyze"), "verify", "--man=no", "./villaged.service"],
        cwd=staged_units,
    )
    assert "ProtectEverything" in result.stderr


@pytest.mark.parametrize("name", ["villaged.service", "villaged-backup.service"])
def test_hardening_exposure_is_at_most_2(staged_units: Path, name: str) -> None:
    assert exposure(staged_units / name) <= MAX_EXPOSURE


def test_the_server_unit_keeps_its_contract() -> None:
    text = (UNIT_DIR / "villaged.service").read_text()
    for line in [
        "Type=notify",
        f"ExecStart={INSTALLED_BINARY} run -c /etc/villaged/villaged.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=villaged",
        "SupplementaryGroups=villaged-operators",
        "RuntimeDirectory=villaged",
        "StateDirectory=villaged",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
    ]:
        assert f"\n{line}\n" in text, line
    backup = (UNIT_DIR / "villaged-backup.service").read_text()
    create = backup.index(f"ExecStart={INSTALLED_BINARY} backup create -c ")
    verify = backup.index(f"ExecStart={INSTALLED_BINARY} backup verify ")
    assert create < verify
    assert "\nOnFailure=villaged-alert@%n.service\n" in backup


def test_sysusers_creates_the_user_and_the_operators_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run(
        [
            systemd_tool("systemd-sysusers"),
            f"--root={tmp_path}",
            str(UNIT_DIR / "villaged.sysusers"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    users = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
    groups = [line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()]
    assert [u[0] for u in users] == ["villaged"]
    assert {g[0]: g[3] for g in groups} == {"villaged": "", "villaged-operators": "villaged"}


def test_make_install_lays_out_a_working_installation(tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    kept = dest / "etc/villaged/villaged.toml"
    kept.parent.mkdir(parents=True)
    kept.write_text("# the admin's own config\n")
    result = run(
        [
            "make",
            "--no-print-directory",
            "install",
            f"DESTDIR={dest}",
            "PREFIX=/opt/villaged",
            f"PYTHON={sys.executable}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    unit_dir = dest / "lib/systemd/system"
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(UNITS)
    server = (unit_dir / "villaged.service").read_text()
    assert "ExecStart=/opt/villaged/bin/villaged run -c /etc/villaged/villaged.toml\n" in server
    assert INSTALLED_BINARY not in "".join(p.read_text() for p in unit_dir.iterdir())
    assert (dest / "usr/lib/sysusers.d/villaged.conf").read_bytes() == (
        UNIT_DIR / "villaged.sysusers"
    ).read_bytes()
    assert (dest / "usr/lib/tmpfiles.d/villaged.conf").read_bytes() == (
        UNIT_DIR / "villaged.tmpfiles"
    ).read_bytes()
    assert kept.read_text() == "# the admin's own config\n"  # never overwritten

    link = dest / "opt/villaged/bin/villaged"
    assert link.is_symlink()
    assert str(link.readlink()) == "/opt/villaged/lib/villaged/bin/villaged"
    venv = dest / "opt/villaged/lib/villaged"
    script = (venv / "bin/villaged").read_text()
    assert script.startswith("#!/opt/villaged/lib/villaged/bin/python\n")
    assert str(dest) not in (venv / "pyvenv.cfg").read_text()
    version = run([str(venv / "bin/python"), "-m", "villaged", "version"], cwd=tmp_path)
    assert (version.returncode, version.stdout.startswith("villaged ")) == (0, True), version
