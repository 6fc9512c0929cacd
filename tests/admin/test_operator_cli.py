"""``villaged operator …``, in process, on a dev node made by ``init_dev``."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyotp
import pytest

from tests.test_cli import run
from villaged.admin.operators import LoginResult, OperatorStore
from villaged.config import load_config
from villaged.ops.provision import init_dev
from villaged.storage.crypto import Keyset

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return init_dev(tmp_path / "n", domain="example.org", now=datetime.now(UTC)).config


def store_of(node: Path) -> OperatorStore:
    config = load_config(node)
    return OperatorStore.open(config.storage.dir / "admin", Keyset.load(config.storage.keyset))


def enroll(node: Path, capsys: pytest.CaptureFixture[str], name: str, uid: int) -> str:
    """Enrol through the CLI; the secret, read back from the printed URI."""
    code, out, err = run(["operator", "enroll", name, "--uid", str(uid), "-c", str(node)], capsys)
    assert (code, err) == (0, "")
    match = re.search(r"^otpauth://totp/\S*[?&]secret=([A-Z2-7]+)", out, re.MULTILINE)
    assert match is not None, out
    return match[1]


def test_enroll_prints_the_uri_and_a_qr_code_once(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["operator", "enroll", "ann", "--uid", "1001", "-c", str(node)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "enrolled operator ann (uid 1001)"
    assert "authenticator app" in out
    (uri,) = [line for line in lines if line.startswith("otpauth://")]
    assert uri.startswith("otpauth://totp/villaged%20example.org:ann?secret=")
    qr = [line for line in lines if line and set(line) <= {" ", "\u2580", "\u2584", "\u2588"}]
    assert len(qr) > 20
    secret = re.search(r"secret=([A-Z2-7]+)", uri)
    assert secret is not None
    assert f"key {secret[1]}," in out
    # The secret is not in the file, and listing never shows it.
    config = load_config(node)
    assert secret[1].encode() not in (config.storage.dir / "admin/operators.json").read_bytes()
    code, out, _ = run(["operator", "list", "-c", str(node)], capsys)
    assert code == 0
    assert secret[1] not in out
    assert "otpauth" not in out


def test_the_enrolled_secret_logs_in(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = enroll(node, capsys, "ann", 1001)
    now = time.time()
    result = store_of(node).login(
        "ann", pyotp.TOTP(secret).at(now), now, max_failures=5, lockout_seconds=900
    )
    assert result is LoginResult.OK


def test_list_disable_enable_remove(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["-c", str(node)]
    assert run(["operator", "list", *c], capsys)[:2] == (0, "no operators are enrolled\n")
    enroll(node, capsys, "ann", 1001)
    enroll(node, capsys, "bob", 20002)
    assert run(["operator", "disable", "bob", *c], capsys)[:2] == (0, "disabled operator bob\n")
    code, out, _ = run(["operator", "list", *c], capsys)
    assert code == 0
    assert out.splitlines() == [
        "NAME  UID    ENABLED  LOCKED",
        "ann   1001   yes      no",
        "bob   20002  no       no",
    ]
    assert run(["operator", "enable", "bob", *c], capsys)[:2] == (0, "enabled operator bob\n")
    assert run(["operator", "remove", "ann", *c], capsys)[:2] == (0, "removed operator ann\n")
    code, out, _ = run(["operator", "list", *c], capsys)
    assert out.splitlines()[1:] == ["bob   20002  yes      no"]


def test_list_shows_a_lockout(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(node, capsys, "ann", 1001)
    now = time.time()
    store = store_of(node)
    for _ in range(2):
        store.login("ann", "abcdef", now, max_failures=2, lockout_seconds=3600)
    code, out, _ = run(["operator", "list", "-c", str(node)], capsys)
    assert code == 0
    assert re.fullmatch(
        r"ann   1001  yes      until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out.splitlines()[1]
    )
    run(["operator", "enable", "ann", "-c", str(node)], capsys)
    assert run(["operator", "list", "-c", str(node)], capsys)[1].splitlines()[1].endswith("no")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["enroll", "ann", "--uid", "1002"], "operator ann is already enrolled"),
        (["enroll", "bob", "--uid", "1001"], "uid 1001 is already enrolled, as operator ann"),
        (["enroll", "Bob", "--uid", "1002"], "operator name 'Bob' is not 1 to 32 characters"),
        (["enroll", "bob", "--uid", "-5"], "--uid '-5' is not a numeric Unix user id"),
        (["enroll", "bob", "--uid", "bob"], "--uid 'bob' is not a numeric Unix user id"),
        (["enroll", "bob", "--uid", "4294967295"], "uid 4294967295 is not a Unix user id"),
        (["disable", "zed"], "no operator zed is enrolled"),
        (["enable", "zed"], "no operator zed is enrolled"),
        (["remove", "zed"], "no operator zed is enrolled"),
    ],
)
def test_errors_are_one_line(
    node: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    enroll(node, capsys, "ann", 1001)
    code, out, err = run(["operator", *argv, "-c", str(node)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"villaged: error: {message}")
    assert err.count("\n") == 1
    assert [info.name for info in store_of(node).list()] == ["ann"]


def test_a_file_open_to_others_is_reported(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(node, capsys, "ann", 1001)
    path = load_config(node).storage.dir / "admin/operators.json"
    path.chmod(0o644)
    code, _, err = run(["operator", "list", "-c", str(node)], capsys)
    assert code == 1
    assert err == (
        f"villaged: error: operators file {path} has mode 0644; it must be 600 (chmod 600 {path})\n"
    )


def test_enrolling_first_leaves_a_data_directory_the_node_opens(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operators file is the first thing in a fresh data directory: the store must still
    take that directory as its own."""
    enroll(node, capsys, "ann", 1001)
    assert (load_config(node).storage.dir / "FORMAT").exists()
    code, out, err = run(
        ["user", "add", "carol@example.org", "-c", str(node)], capsys, "pw pw pw\n"
    )
    assert (code, out) == (0, "added carol@example.org\n"), err
    assert run(["storage", "verify", "-c", str(node)], capsys)[0] == 0


def test_key_rotation_and_retirement_keep_operators_able_to_log_in(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = enroll(node, capsys, "ann", 1001)
    assert run(["keys", "rotate", "-c", str(node)], capsys)[0] == 0
    assert run(["keys", "retire", "-c", str(node)], capsys)[0] == 0
    assert Keyset.load(load_config(node).storage.keyset).key_ids == (2,)
    now = time.time()
    result = store_of(node).login(
        "ann", pyotp.TOTP(secret).at(now), now, max_failures=5, lockout_seconds=900
    )
    assert result is LoginResult.OK


def test_help_lists_the_operator_actions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["operator", "--help"], capsys)
    assert code == 0
    for action in ("enroll", "list", "disable", "enable", "remove"):
        assert action in out
