"""`villaged storage verify`'s checker: a data directory's FORMAT and log, read-only, refusing
to run beside a live node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from villaged.storage import crypto
from villaged.storage.errors import DataDirError
from villaged.storage.log import SegmentLog, open_segment_log
from villaged.storage.records import Record
from villaged.storage.segment import HEADER_SIZE, encode_snapshot, snapshot_file_name
from villaged.storage.store import FORMAT, Store, StoreOptions, open_store
from villaged.storage.verify import verify_store

REPO = Path(__file__).resolve().parents[2]
USERS = ("alice@example.org", "bob@example.org", "carol@example.org")


@pytest.fixture
def options(tmp_path: Path) -> StoreOptions:
    keyset = tmp_path / "keyset.json"
    crypto.Keyset.generate(datetime(2026, 11, 29, tzinfo=UTC)).save(keyset)
    return StoreOptions(directory=tmp_path / "data", keyset=keyset)


@pytest.fixture
def data_dir(options: StoreOptions) -> Path:
    """A data directory a node has run in: three accounts, each in a batch of its own."""

    async def add_users() -> None:
        with trio.fail_after(30):
            async with open_store(options) as store:
                for user in USERS:
                    await store.add_user(user, f"password of {user}")

    trio.run(add_users)
    return options.directory


def contents(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for a directory)."""
    return {
        str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


def test_sound_data_directory(data_dir: Path) -> None:
    report = verify_store(data_dir, max_record_bytes=2**20)
    assert report.ok
    assert report.problems == ()
    assert report.log is not None
    assert (report.log.records_checked, report.log.first_index, report.log.last_index) == (3, 1, 3)
    assert report.summary_lines() == [
        f"data directory {data_dir}",
        "log: 1 segments, 3 records (1..3), 0 snapshots (latest at None)",
        "ok",
    ]


def test_verify_changes_nothing_and_needs_no_lock_file(data_dir: Path) -> None:
    # A copy made without LOCK (no node ever ran on it): there is nothing to lock against.
    (data_dir / "LOCK").unlink()
    before = contents(data_dir)
    assert verify_store(data_dir).ok
    assert contents(data_dir) == before
    assert not (data_dir / "LOCK").exists()


def test_verify_on_a_read_only_mount(data_dir: Path, tmp_path: Path) -> None:
    """In a private mount namespace, bind-mount the data directory read-only over itself and
    verify there (as on a backup mounted read-only)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private read-only mount")
    script = (
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 77\n'
        'if touch "$1/probe" 2>/dev/null; then exit 78; fi\n'
        'exec "$2" -c "$3" "$1"\n'
    )
    check = (
        "import sys; from pathlib import Path; from villaged.storage.verify import verify_store;"
        " report = verify_store(Path(sys.argv[1]), max_record_bytes=2**20);"
        " print(report.ok, report.problems)"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(data_dir), sys.executable, check],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode in (1, 77) and "verify_store" not in done.stderr:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True ()"


def test_wrong_format_is_a_problem(data_dir: Path) -> None:
    (data_dir / "FORMAT").write_text("villaged-storage 99\n", encoding="utf-8")
    report = verify_store(data_dir, max_record_bytes=2**20)
    assert not report.ok
    assert report.log is None
    assert report.problems == (
        f"{data_dir / 'FORMAT'}: format 'villaged-storage 99'; this villaged reads {FORMAT!r}",
    )
    assert report.summary_lines()[-1] == "1 problem(s)"


def test_missing_format_is_not_a_data_directory(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    with pytest.raises(DataDirError, match="not a villaged data directory"):
        verify_store(tmp_path, max_record_bytes=2**20)


def test_running_node_holds_the_lock(data_dir: Path, options: StoreOptions) -> None:
    store = Store.open(options)
    try:
        with pytest.raises(DataDirError, match="in use by a running villaged"):
            verify_store(data_dir, max_record_bytes=2**20)
    finally:
        store.close()
    assert verify_store(data_dir, max_record_bytes=2**20).ok


def test_damage_to_acknowledged_records_is_reported(data_dir: Path) -> None:
    [segment] = sorted((data_dir / "log").glob("*.seg"))
    damaged = bytearray(segment.read_bytes())
    damaged[HEADER_SIZE + 12] ^= 0x01  # inside record 1; records 2 and 3 follow in later batches
    segment.write_bytes(bytes(damaged))
    before = contents(data_dir)
    report = verify_store(data_dir, max_record_bytes=2**20)
    assert not report.ok
    [problem] = report.problems
    assert problem.startswith(f"{segment}: offset 0: frame CRC mismatch;")
    assert "acknowledged records follow the damage" in problem
    assert report.summary_lines()[-2:] == [f"problem: {problem}", "1 problem(s)"]
    assert contents(data_dir) == before  # reported, not repaired


async def test_records_above_the_configured_limit_are_not_damage(tmp_path: Path) -> None:
    (tmp_path / "FORMAT").write_text(FORMAT + "\n", encoding="utf-8")
    async with open_segment_log(tmp_path / "log", max_record_bytes=2**20) as log:
        with trio.fail_after(30):
            await log.append(Record(type="test.big", body={"pad": b"x" * 100_000}))
    assert verify_store(tmp_path, max_record_bytes=4096).ok


def test_interrupted_snapshot_installation_is_a_note(tmp_path: Path) -> None:
    (tmp_path / "FORMAT").write_text(FORMAT + "\n", encoding="utf-8")
    SegmentLog.open(tmp_path / "log").close()
    snapshot = tmp_path / "log" / snapshot_file_name(30)
    snapshot.write_bytes(encode_snapshot(30, 2, b"state", replaces_log=True))
    report = verify_store(tmp_path, max_record_bytes=2**20)
    assert report.ok
    assert report.summary_lines()[2:] == [
        f"note: {tmp_path / 'log'}: the installation of the snapshot at index 30 was"
        " interrupted; opening the log removes the 1 segment files it replaces (not checked)",
        "ok",
    ]
