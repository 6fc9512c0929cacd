"""The operator store: enrolment, the sealed secret, single-use steps, lockout, the file."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import stat
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyotp
import pytest

from villaged.admin.operators import (
    FILE_NAME,
    FORMAT,
    LOCK_NAME,
    MAX_FILE_BYTES,
    LoginResult,
    NoSuchOperatorError,
    OperatorExistsError,
    OperatorFileError,
    OperatorInfo,
    OperatorStore,
)
from villaged.storage.crypto import Keyset
from villaged.storage.errors import DecryptError, KeyManagementError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

T = 1_234_567_890.0  # the start of a 30-second step
STEP = 41_152_263
LIMITS = {"max_failures": 3, "lockout_seconds": 600}


@pytest.fixture
def keyset() -> Keyset:
    return Keyset.generate(datetime(2026, 11, 29, tzinfo=UTC))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "admin"


@pytest.fixture
def store(directory: Path, keyset: Keyset) -> OperatorStore:
    return OperatorStore.open(directory, keyset)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def code(secret: str, now: float) -> str:
    return pyotp.TOTP(secret).at(now)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wrong(secret: str, now: float) -> str:
    """A code that matches no step of the window around ``now``."""
    window = {code(secret, now + 30 * offset) for offset in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in window)


def login(store: OperatorStore, name: str, code: str, now: float) -> LoginResult:
    return store.login(name, code, now, **LIMITS)


# --- enrolment -----------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_enrolment_writes_a_private_file_without_the_secret(
    store: OperatorStore, directory: Path
) -> None:
    secret, uri = store.enroll("ann", 1001, T, issuer="villaged example.org")
    assert len(base64.b32decode(secret)) == 20
    assert uri.startswith("otpauth://totp/villaged%20example.org:ann?")
    assert f"secret={secret}" in uri

    path = directory / FILE_NAME
    assert store.path == path
    assert mode(directory) == 0o700
    assert mode(path) == 0o600
    raw = path.read_bytes()
    assert secret.encode() not in raw
    assert secret.lower().encode() not in raw
    assert base64.b32decode(secret) not in raw
    assert base64.b64encode(base64.b32decode(secret)) not in raw

    doc = json.loads(raw)
    assert doc["format"] == FORMAT
    (entry,) = doc["operators"]
    assert entry == {
        "name": "ann",
        "uid": 1001,
        "enabled": True,
        "created": "2009-02-13T23:31:30Z",
        "totp": entry["totp"],
        "last_step": None,
        "failures": 0,
        "locked_until": None,
    }
    assert store.list() == [OperatorInfo("ann", 1001, True, T, None, 0, None)]
    assert secret not in repr(store.list())


def test_the_secret_is_sealed_with_the_keyset_and_bound_to_the_name(
    store: OperatorStore, directory: Path, keyset: Keyset
) -> None:
    ann_secret, _ = store.enroll("ann", 1001, T)
    store.enroll("bob", 1002, T)
    path = directory / FILE_NAME
    entry = json.loads(path.read_text())["operators"][0]
    blob = base64.b64decode(entry["totp"])
    assert keyset.unwrap(blob, b"villaged operator totp ann") == base64.b32decode(ann_secret)

    # Another keyset opens nothing.
    other = OperatorStore.open(directory, Keyset.generate(datetime(2026, 1, 1, tzinfo=UTC)))
    with pytest.raises(DecryptError):
        login(other, "ann", code(ann_secret, T), T)

    # Ann's sealed secret copied into Bob's entry does not open as Bob's.
    doc = json.loads(path.read_text())
    doc["operators"][1]["totp"] = doc["operators"][0]["totp"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DecryptError):
        login(store, "bob", code(ann_secret, T), T)


def test_names_and_uids_are_unique(store: OperatorStore) -> None:
    store.enroll("ann", 1001, T)
    with pytest.raises(OperatorExistsError, match=r"^operator ann is already enrolled$"):
        store.enroll("ann", 1002, T)
    with pytest.raises(
        OperatorExistsError, match=r"^uid 1001 is already enrolled, as operator ann$"
    ):
        store.enroll("bob", 1001, T)
    store.enroll("bob", 0, T)
    assert [info.name for info in store.list()] == ["ann", "bob"]


@pytest.mark.parametrize(
    "name", ["", "Ann", "1ann", "-ann", "_ann", "an n", "ann:x", "a" * 33, "ånn", "ann\n"]
)
def test_bad_names_are_refused(store: OperatorStore, name: str) -> None:
    with pytest.raises(ValueError, match="is not 1 to 32 characters"):
        store.enroll(name, 1001, T)
    assert store.list() == []


@pytest.mark.parametrize("name", ["a", "ann", "ann-b_2", "a" * 32])
def test_good_names_are_taken(store: OperatorStore, name: str) -> None:
    store.enroll(name, 1001, T)
    assert store.list()[0].name == name


@pytest.mark.parametrize("uid", [-1, 2**32 - 1, 2**40, True])
def test_bad_uids_are_refused(store: OperatorStore, uid: int) -> None:
    with pytest.raises(ValueError, match="is not a Unix user id"):
        store.enroll("ann", uid, T)


def test_by_uid(store: OperatorStore) -> None:
    store.enroll("ann", 1001, T)
    store.enroll("bob", 1002, T)
    store.disable("bob")
    found = store.by_uid(1002)
    assert found is not None
    assert (found.name, found.enabled) == ("bob", False)
    assert store.by_uid(1003) is None


# --- logging in ----------------------------------------------------------------------------


def test_a_code_logs_in_once(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK
    assert LoginResult.OK.ok
    info = store.get("ann")
    assert info is not None
    assert info.last_step == STEP
    # The same code again, in its own step or in the next: replayed.
    assert login(store, "ann", code(secret, T), T + 10) is LoginResult.REPLAYED
    assert login(store, "ann", code(secret, T), T + 30) is LoginResult.REPLAYED
    assert not LoginResult.REPLAYED.ok
    # The next step's code works.
    assert login(store, "ann", code(secret, T + 30), T + 30) is LoginResult.OK


def test_an_older_code_is_refused_after_a_newer_one(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    assert login(store, "ann", code(secret, T + 30), T) is LoginResult.OK  # step + 1
    assert login(store, "ann", code(secret, T), T) is LoginResult.REPLAYED
    assert login(store, "ann", code(secret, T - 30), T) is LoginResult.REPLAYED


@pytest.mark.parametrize(
    ("offset", "result"), [(-2, "wrong_code"), (-1, "ok"), (1, "ok"), (2, "wrong_code")]
)
def test_the_window_is_one_step_either_side(store: OperatorStore, offset: int, result: str) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    assert login(store, "ann", code(secret, T + 30 * offset), T) == result


@pytest.mark.parametrize("text", ["", "12345", "1234567", "abcdef", " 12345"])
def test_malformed_codes_are_wrong_codes(store: OperatorStore, text: str) -> None:
    store.enroll("ann", 1001, T)
    assert login(store, "ann", text, T) is LoginResult.WRONG_CODE


def test_the_last_step_survives_reopening(
    store: OperatorStore, directory: Path, keyset: Keyset
) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK
    reopened = OperatorStore.open(directory, keyset)
    assert login(reopened, "ann", code(secret, T), T + 1) is LoginResult.REPLAYED
    entry = json.loads((directory / FILE_NAME).read_text())["operators"][0]
    assert entry["last_step"] == STEP


def test_consecutive_failures_lock_out_until_the_time_is_up(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    bad = wrong(secret, T)
    assert login(store, "ann", bad, T) is LoginResult.WRONG_CODE
    assert login(store, "ann", bad, T + 1) is LoginResult.WRONG_CODE
    info = store.get("ann")
    assert info is not None
    assert (info.failures, info.locked_until) == (2, None)
    assert login(store, "ann", bad, T + 2) is LoginResult.WRONG_CODE  # the third: locked
    info = store.get("ann")
    assert info is not None
    assert info.locked_until == T + 2 + 600
    assert info.locked(T + 601)
    assert not info.locked(T + 602)

    # While locked even the right code is refused, and not counted.
    assert login(store, "ann", code(secret, T + 300), T + 300) is LoginResult.LOCKED
    assert store.get("ann") == info
    # Once the time is up, the right code works and the record is clean again.
    assert login(store, "ann", code(secret, T + 602), T + 602) is LoginResult.OK
    info = store.get("ann")
    assert info is not None
    assert (info.failures, info.locked_until) == (0, None)


def test_after_a_lockout_runs_out_failures_count_from_zero(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    for attempt in range(3):
        login(store, "ann", wrong(secret, T), T + attempt)
    later = T + 2 + 600
    assert login(store, "ann", wrong(secret, later), later) is LoginResult.WRONG_CODE
    info = store.get("ann")
    assert info is not None
    assert (info.failures, info.locked_until) == (1, None)


def test_a_success_resets_the_failure_count(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    login(store, "ann", wrong(secret, T), T)
    login(store, "ann", wrong(secret, T), T)
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK
    login(store, "ann", wrong(secret, T), T)
    login(store, "ann", wrong(secret, T), T)
    info = store.get("ann")
    assert info is not None
    assert (info.failures, info.locked_until) == (2, None)


def test_replays_count_as_failures(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    used = code(secret, T)
    assert login(store, "ann", used, T) is LoginResult.OK
    for _ in range(3):
        assert login(store, "ann", used, T + 1) is LoginResult.REPLAYED
    assert login(store, "ann", code(secret, T + 30), T + 30) is LoginResult.LOCKED


def test_disable_enable_and_remove(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    store.disable("ann")
    assert login(store, "ann", code(secret, T), T) is LoginResult.DISABLED
    info = store.get("ann")
    assert info is not None
    assert (info.enabled, info.failures, info.last_step) == (False, 0, None)
    store.enable("ann")
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK
    store.remove("ann")
    assert login(store, "ann", code(secret, T + 30), T + 30) is LoginResult.UNKNOWN
    assert store.list() == []
    assert store.by_uid(1001) is None
    # The uid is free again; the new enrolment has a new secret.
    new_secret, _ = store.enroll("ann", 1001, T)
    assert new_secret != secret


def test_enable_ends_a_lockout(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    for _ in range(3):
        login(store, "ann", wrong(secret, T), T)
    assert login(store, "ann", code(secret, T), T) is LoginResult.LOCKED
    store.enable("ann")
    info = store.get("ann")
    assert info is not None
    assert (info.enabled, info.failures, info.locked_until) == (True, 0, None)
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK


@pytest.mark.parametrize("action", ["disable", "enable", "remove"])
def test_changing_an_unknown_operator(store: OperatorStore, action: str) -> None:
    with pytest.raises(NoSuchOperatorError, match=r"^no operator zed is enrolled$"):
        getattr(store, action)("zed")


@pytest.mark.parametrize("name", ["zed", "Not A Name", ""])
def test_unknown_operators_are_unknown(store: OperatorStore, name: str) -> None:
    assert login(store, name, "123456", T) is LoginResult.UNKNOWN
    assert not (store.path).exists()  # nothing was written


def test_fresh_confirmations_share_the_replay_protection(store: OperatorStore) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    assert login(store, "ann", code(secret, T), T) is LoginResult.OK
    # The login's code cannot confirm a grant; the authenticator's next code can, once.
    assert store.verify_code("ann", code(secret, T), T + 5, **LIMITS) is LoginResult.REPLAYED
    assert store.verify_code("ann", code(secret, T + 30), T + 30, **LIMITS) is LoginResult.OK
    assert store.verify_code("ann", code(secret, T + 30), T + 31, **LIMITS) is LoginResult.REPLAYED
    # Failed confirmations count towards the lockout: that replay was one, two more lock.
    for _ in range(2):
        result = store.verify_code("ann", wrong(secret, T + 31), T + 31, **LIMITS)
        assert result is LoginResult.WRONG_CODE
    assert login(store, "ann", code(secret, T + 60), T + 60) is LoginResult.LOCKED


def test_limits_must_be_positive(store: OperatorStore) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        store.login("ann", "123456", T, max_failures=0, lockout_seconds=1)
    with pytest.raises(ValueError, match="at least 1"):
        store.verify_code("ann", "123456", T, max_failures=1, lockout_seconds=0)


def test_concurrent_logins_with_one_code_let_in_exactly_one(
    store: OperatorStore, directory: Path, keyset: Keyset
) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    other = OperatorStore.open(directory, keyset)  # a second store: the file lock's case
    results: list[LoginResult] = []
    barrier = threading.Barrier(8)

    def attempt(s: OperatorStore) -> None:
        barrier.wait(timeout=10)
        results.append(s.login("ann", code(secret, T), T, max_failures=100, lockout_seconds=1))

    threads = [threading.Thread(target=attempt, args=(s,)) for s in [store, other] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [LoginResult.OK] + [LoginResult.REPLAYED] * 7


# --- keys ------------------------------------------------------------------------------------


def test_rewrap_moves_secrets_to_the_new_primary_key(
    store: OperatorStore, directory: Path, keyset: Keyset
) -> None:
    secret, _ = store.enroll("ann", 1001, T)
    rotated = keyset.rotated(datetime(2026, 12, 1, tzinfo=UTC))
    assert OperatorStore.open(directory, rotated).rewrap_all() == 1
    retired = rotated.without(keyset.primary_id)
    assert (
        login(OperatorStore.open(directory, retired), "ann", code(secret, T), T) is LoginResult.OK
    )
    with pytest.raises(KeyManagementError, match="keyset does not hold"):
        login(store, "ann", code(secret, T + 30), T + 30)  # the old keyset lacks the new key


# --- the file and its directory --------------------------------------------------------------


def test_a_file_open_to_others_is_refused(store: OperatorStore) -> None:
    store.enroll("ann", 1001, T)
    store.path.chmod(0o640)
    with pytest.raises(OperatorFileError, match=r"has mode 0640; it must be 600 \(chmod 600 "):
        store.list()
    with pytest.raises(OperatorFileError):
        login(store, "ann", "123456", T)


def test_a_directory_open_to_others_is_refused(directory: Path, keyset: Keyset) -> None:
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(
        OperatorFileError, match=r"operators directory .* has mode 0755; it must be 700"
    ):
        OperatorStore.open(directory, keyset)


def test_a_missing_parent_is_not_created(tmp_path: Path, keyset: Keyset) -> None:
    with pytest.raises(OperatorFileError, match="cannot create operators directory"):
        OperatorStore.open(tmp_path / "nowhere" / "admin", keyset)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON (line 1 column 2"),
        ("[]", "not an object with the format tag"),
        ('{"format": "villaged-operators/2", "operators": []}', "format tag"),
        ('{"format": "villaged-operators/1", "operators": {}}', "'operators' is not a list"),
        ('{"format": "villaged-operators/1", "operators": [1]}', "entry #1 is not an object"),
    ],
)
def test_a_malformed_file_is_refused(store: OperatorStore, text: str, message: str) -> None:
    store.path.write_text(text)
    store.path.chmod(0o600)
    with pytest.raises(OperatorFileError, match="operators file") as caught:
        store.list()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Ann", "'name' is not an operator name"),
        ("uid", -1, "'uid' is not a Unix user id"),
        ("uid", "1001", "'uid' is not a Unix user id"),
        ("enabled", 1, "'enabled' is not true or false"),
        ("created", "yesterday", "'created' is not a UTC time"),
        ("totp", "not base64!", "'totp' is not base64"),
        ("last_step", -5, "'last_step' is neither null nor a time step"),
        ("failures", None, "'failures' is not a count"),
        ("locked_until", 5, "'locked_until' is neither null nor a UTC time"),
    ],
)
def test_a_bad_entry_is_refused_without_echoing_it(
    store: OperatorStore, field: str, value: object, message: str
) -> None:
    store.enroll("ann", 1001, T)
    doc = json.loads(store.path.read_text())
    doc["operators"][0][field] = value
    store.path.write_text(json.dumps(doc))
    with pytest.raises(OperatorFileError) as caught:
        store.list()
    assert f"operators entry #1: {message}" in str(caught.value)
    assert doc["operators"][0]["totp"] not in str(caught.value)


def test_duplicate_entries_are_refused(store: OperatorStore) -> None:
    store.enroll("ann", 1001, T)
    store.enroll("bob", 1002, T)
    doc = json.loads(store.path.read_text())
    doc["operators"][1]["uid"] = 1001
    store.path.write_text(json.dumps(doc))
    with pytest.raises(OperatorFileError, match="uid 1001 belongs to more than one operator"):
        store.list()
    doc["operators"][1]["name"] = "ann"
    store.path.write_text(json.dumps(doc))
    with pytest.raises(OperatorFileError, match="operator ann appears more than once"):
        store.list()


def test_stale_temporaries_are_removed_on_open(
    store: OperatorStore, directory: Path, keyset: Keyset
) -> None:
    store.enroll("ann", 1001, T)
    stale = directory / f".{FILE_NAME}.0123456789abcdef.tmp"
    stale.write_bytes(b"half a file")
    unrelated = directory / "audit.log"
    unrelated.write_bytes(b"")
    OperatorStore.open(directory, keyset)
    assert not stale.exists()
    assert unrelated.exists()
    assert [info.name for info in store.list()] == ["ann"]


def test_rewrap_without_operators_writes_nothing(store: OperatorStore) -> None:
    assert store.rewrap_all() == 0
    assert not store.path.exists()


def test_a_secret_of_the_wrong_size_is_refused(store: OperatorStore, keyset: Keyset) -> None:
    store.enroll("ann", 1001, T)
    doc = json.loads(store.path.read_text())
    short = keyset.wrap(b"0123456789", b"villaged operator totp ann")
    doc["operators"][0]["totp"] = base64.b64encode(short).decode()
    store.path.write_text(json.dumps(doc))
    with pytest.raises(KeyManagementError, match=r"TOTP secret .* is not 20 bytes"):
        login(store, "ann", "123456", T)


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_the_file_must_be_a_regular_file(store: OperatorStore, tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        store.path.mkdir(mode=0o700)
        expected = "is not a regular file"
    else:
        target = tmp_path / "elsewhere.json"
        target.write_text("{}")
        target.chmod(0o600)
        store.path.symlink_to(target)
        expected = "cannot open operators file"
    with pytest.raises(OperatorFileError, match=expected):
        store.list()


def test_a_file_beyond_the_size_bound_is_refused(store: OperatorStore) -> None:
    store.path.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    store.path.chmod(0o600)
    with pytest.raises(OperatorFileError, match="is larger than"):
        store.list()


def test_the_directory_must_be_a_directory(directory: Path, keyset: Keyset) -> None:
    directory.write_text("")
    with pytest.raises(OperatorFileError, match="is not a directory"):
        OperatorStore.open(directory, keyset)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_file_of_another_user_is_refused(store: OperatorStore) -> None:
    store.enroll("ann", 1001, T)
    os.chown(store.path, 12345, -1)
    with pytest.raises(OperatorFileError, match="belongs to uid 12345; run this as that user"):
        store.list()


def test_a_held_file_lock_is_waited_for_then_reported(
    store: OperatorStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("villaged.admin.operators._LOCK_ATTEMPTS", 3)
    monkeypatch.setattr("villaged.admin.operators._LOCK_PAUSE_S", 0.001)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's command, in the middle of a change
        with pytest.raises(OperatorFileError, match="stayed locked by another process"):
            store.enroll("ann", 1001, T)
    finally:
        os.close(fd)
    store.enroll("ann", 1001, T)
    assert [info.name for info in store.list()] == ["ann"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_data_directory_of_another_user_is_not_written_to(
    directory: Path, keyset: Keyset
) -> None:
    os.chown(directory.parent, 12345, -1)
    with pytest.raises(OperatorFileError, match=r"directory .* belongs to uid 12345; run this as"):
        OperatorStore.open(directory, keyset)
    assert not directory.exists()
