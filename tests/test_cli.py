"""The command line, in process: every command's success path and its one-line failures."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest

from villaged import __version__
from villaged.cli import main

if TYPE_CHECKING:
    from pathlib import Path


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str = ""
) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(stdin))
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(
        ["init", "--dev", "--dir", str(tmp_path / "n"), "--domain", "example.org"], capsys
    )
    assert code == 0, err
    return tmp_path / "n" / "villaged.toml"


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["version"], capsys)[:2] == (0, f"villaged {__version__}\n")
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("init", "check", "run", "user", "keys", "storage"):
        assert command in out
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2
    assert "invalid choice" in err


def test_init_reports_created_then_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["init", "--dev", "--dir", str(tmp_path / "n")], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["created"] * 4
    code, out, _ = run(["init", "--dev", "--dir", str(tmp_path / "n")], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["kept"] * 4
    code, _, err = run(["init", "--dir", str(tmp_path / "m")], capsys)
    assert code == 1
    assert err == "villaged: error: only development nodes can be initialised yet: pass --dev\n"


def test_account_lifecycle(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["-c", str(node)]
    assert run(["check", *c], capsys)[0] == 0
    code, out, err = run(["user", "add", "Carol@example.org", *c], capsys, "a long password\n")
    assert (code, out) == (0, "added carol@example.org\n"), err
    code, _, err = run(["user", "add", "carol@example.org", *c], capsys, "another password\n")
    assert (code, err) == (1, "villaged: error: user carol@example.org already exists\n")
    assert run(["user", "add", "dave@example.org", *c], capsys, "dave password\n")[0] == 0
    assert run(["user", "list", *c], capsys)[1] == "carol@example.org\ndave@example.org\n"
    code, out, _ = run(["user", "passwd", "carol@example.org", *c], capsys, "changed pw\n")
    assert (code, out) == (0, "changed the password of carol@example.org\n")
    code, out, _ = run(["user", "delete", "dave@example.org", *c], capsys)
    assert (code, out) == (0, "deleted dave@example.org and destroyed its key\n")
    assert run(["user", "list", *c], capsys)[1] == "carol@example.org\n"
    code, out, _ = run(["keys", "rotate", *c], capsys)
    assert code == 0
    assert out.startswith("new primary key 2 (2 keys in the keyset); re-wrapped 1 user data keys")
    code, out, _ = run(["keys", "retire", *c], capsys)
    assert (code, out) == (0, "retired keys: 1; primary key 2 remains\n")
    code, out, _ = run(["keys", "retire", *c], capsys)
    assert (code, out) == (0, "retired keys: none; primary key 2 remains\n")
    code, out, _ = run(["user", "passwd", "carol@example.org", *c], capsys, "after retire\n")
    assert code == 0  # carol's data key was re-wrapped under the remaining key
    code, out, _ = run(["storage", "verify", *c], capsys)
    assert code == 0, out
    assert "ok" in out


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["user", "add", "x y@example.org"], "pw pw pw\n", "is not a valid JID"),
        (["user", "add", "x@elsewhere.org"], "pw pw pw\n", "not in this server's domain"),
        (["user", "add", "x@example.org"], "", "no password on standard input"),
        (["user", "add", "x@example.org"], "\n", "the password is empty"),
        (["user", "delete", "nobody@example.org"], "", "no such user nobody@example.org"),
        (["user", "passwd", "nobody@example.org"], "pw pw pw\n", "no such user"),
    ],
)
def test_user_errors_are_one_line(
    node: Path, capsys: pytest.CaptureFixture[str], argv: list[str], stdin: str, message: str
) -> None:
    code, _, err = run([*argv, "-c", str(node)], capsys, stdin)
    assert code == 1
    assert err.startswith("villaged: error: ")
    assert err.count("\n") == 1
    assert message in err


def test_check_names_file_and_key(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = node.read_text()
    node.write_text(text.replace("[storage]", '[storage]\nsegment_bytes = "big"', 1))
    code, _, err = run(["check", "-c", str(node)], capsys)
    assert code == 1
    assert err.count("\n") == 1
    assert str(node) in err
    assert "storage.segment_bytes" in err
    assert "expected an integer" in err


def test_check_missing_certificate(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (node.parent / "tls" / "cert.pem").unlink()
    code, _, err = run(["check", "-c", str(node)], capsys)
    assert code == 1
    assert "tls.cert" in err
    assert "does not exist" in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["user", "list", "-c", str(tmp_path / "nope.toml")], capsys)
    assert code == 1
    assert "nope.toml" in err


def test_data_directory_of_the_wrong_version(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["user", "list", "-c", str(node)], capsys)[0] == 0  # creates the data directory
    (node.parent / "data" / "FORMAT").write_text("villaged-storage 2\n")
    code, _, err = run(["user", "list", "-c", str(node)], capsys)
    assert code == 1
    assert "has format 'villaged-storage 2'; this villaged reads 'villaged-storage 1'" in err


def test_storage_verify_reports_damage(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        assert (
            run(["user", "add", f"u{i}@example.org", "-c", str(node)], capsys, "password\n")[0] == 0
        )
    segment = sorted((node.parent / "data" / "log").glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[20] ^= 0x01
    segment.write_bytes(bytes(data))
    code, _, err = run(["storage", "verify", "-c", str(node)], capsys)
    assert code == 1
    assert "storage is damaged" in err
    assert segment.name in err
