"""The command line, in process: every command's success path and its one-line failures."""

from __future__ import annotations

import io
import json
import threading
from typing import TYPE_CHECKING, Any

import pytest
import trio

from villaged import __version__
from villaged.cli import main
from villaged.ops.control import ControlError, serve_control

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from villaged.ops.control import Handler


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


# --- clusters: init --cluster, and commands through the control socket -------------------------

STATUS = {
    "node": "n1",
    "cluster": "dev-1",
    "zone": "a",
    "members": [
        {"id": "n1", "zone": "a", "address": "127.0.0.1:5228", "linked": True},
        {"id": "n2", "zone": "b", "address": "127.0.0.1:5238", "linked": False},
    ],
    "groups": [
        {"group": "meta", "role": "leader", "term": 3, "leader": "n1", "commit": 10,
         "applied": 10, "last_index": 10, "snapshot_index": 0, "voters": ["n1", "n2"],
         "lag": {"n2": 4}},
        {"group": "s00", "role": "follower", "term": 2, "leader": "n2", "commit": 7,
         "applied": 6, "last_index": 7, "snapshot_index": 0, "voters": ["n1", "n2"], "lag": {}},
        {"group": "s01", "role": "candidate", "term": 5, "leader": None, "commit": 1,
         "applied": 1, "last_index": 2, "snapshot_index": 0, "voters": ["n1", "n2"], "lag": {}},
    ],
}  # fmt: skip


@pytest.fixture
def cluster_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(
        ["init", "--dev", "--cluster", "--nodes", "1", "--dir", str(tmp_path / "c")], capsys
    )
    assert code == 0, err
    (tmp_path / "c/n1/data").mkdir(mode=0o700)
    return tmp_path / "c/n1/villaged.toml"


@pytest.fixture
def control_server(cluster_node: Path) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """A stand-in node serving canned answers on n1's control socket, from another thread;
    yields the requests it received."""
    calls: list[tuple[str, dict[str, Any]]] = []
    users = ["alice@localhost"]

    def handler(name: str) -> Handler:
        async def handle(args: Mapping[str, Any]) -> Any:
            calls.append((name, dict(args)))
            if args.get("jid") == "nobody@localhost":
                raise ControlError("no such user nobody@localhost")
            return {"cluster.status": STATUS, "user.list": users}.get(name, args.get("jid"))

        return handle

    handlers = {n: handler(n) for n in ("user.add", "user.passwd", "user.delete", "user.list")}
    handlers["cluster.status"] = handler("cluster.status")
    ready, token = threading.Event(), []
    stop = trio.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, cluster_node.parent / "data/control.sock", handlers)
            token.append(trio.lowlevel.current_trio_token())
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    try:
        assert ready.wait(10)
        yield calls
    finally:
        if token:
            trio.from_thread.run_sync(stop.set, trio_token=token[0])
        thread.join(10)


def test_init_cluster_reports_and_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["init", "--dev", "--cluster", "--dir", str(tmp_path / "c"), "--demo-users"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    created = [line for line in out.splitlines() if line.startswith("created ")]
    assert len(created) == 3 + 3 * 7  # the CA, its key, the passwords; 7 files per node
    assert "start it with: villaged cluster run-local --dir" in out
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert not [line for line in out.splitlines() if line.startswith("created ")]
    for k in (1, 2, 3):
        assert run(["check", "-c", str(tmp_path / f"c/n{k}/villaged.toml")], capsys)[0] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nodes", "3"], "--nodes and --zones make a cluster: pass --cluster too"),
        (["--cluster", "--nodes", "0"], "a dev cluster has 1 to 7 nodes, not 0"),
        (["--cluster", "--zones", "a,,b"], "zone '' is not a zone name"),
    ],
)
def test_init_cluster_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, _, err = run(["init", "--dev", "--dir", str(tmp_path / "c"), *extra], capsys)
    assert code == 1
    assert err.startswith("villaged: error: ")
    assert err.count("\n") == 1
    assert message in err


def test_cluster_status_report(
    cluster_node: Path,
    control_server: list[tuple[str, dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(["cluster", "status", "-c", str(cluster_node)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "node n1 (zone a) of cluster dev-1"
    assert lines[2].split() == ["member", "zone", "address", "linked"]
    assert lines[3].split() == ["n1", "(this", "node)", "a", "127.0.0.1:5228", "-"]
    assert lines[4].split() == ["n2", "b", "127.0.0.1:5238", "NO"]
    assert lines[6].split() == [
        "group", "leader", "term", "commit", "applied", "role", "follower", "lag"
    ]  # fmt: skip
    assert lines[7].split() == ["meta", "n1", "3", "10", "10", "leader", "n2:4"]
    assert lines[8].split() == ["s00", "n2", "2", "7", "6", "follower", "-"]
    assert lines[9].split() == ["s01", "NO", "LEADER", "5", "1", "1", "candidate", "-"]
    assert lines[-1] == "3 groups, 2 with a leader, this node leads 1; 1 WITHOUT A LEADER"
    code, out, _ = run(["cluster", "status", "--json", "-c", str(cluster_node)], capsys)
    assert code == 0
    assert json.loads(out) == STATUS
    assert control_server == [("cluster.status", {})] * 2


def test_user_commands_use_the_control_socket_of_a_cluster_node(
    cluster_node: Path,
    control_server: list[tuple[str, dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    c = ["-c", str(cluster_node)]
    assert run(["user", "add", "carol@localhost", *c], capsys, "a password\n")[:2] == (
        0,
        "added carol@localhost\n",
    )
    code, out, _ = run(["user", "passwd", "carol@localhost", *c], capsys, "new one\n")
    assert (code, out) == (0, "changed the password of carol@localhost\n")
    code, out, _ = run(["user", "delete", "carol@localhost", *c], capsys)
    assert (code, out) == (0, "deleted carol@localhost and destroyed its key\n")
    assert run(["user", "list", *c], capsys)[:2] == (0, "alice@localhost\n")
    code, _, err = run(["user", "delete", "nobody@localhost", *c], capsys)
    assert (code, err) == (1, "villaged: error: user.delete: no such user nobody@localhost\n")
    code, _, err = run(["user", "add", "x@localhost", *c], capsys, "")
    assert (code, err) == (1, "villaged: error: no password on standard input\n")
    assert control_server == [
        ("user.add", {"jid": "carol@localhost", "password": "a password"}),
        ("user.passwd", {"jid": "carol@localhost", "password": "new one"}),
        ("user.delete", {"jid": "carol@localhost"}),
        ("user.list", {}),
        ("user.delete", {"jid": "nobody@localhost"}),
    ]
    assert not (cluster_node.parent / "data/log").exists()  # the store was never opened offline


def test_cluster_commands_without_a_running_node(
    cluster_node: Path, node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket_path = cluster_node.parent / "data/control.sock"
    for argv in (["user", "list"], ["cluster", "status"]):
        code, _, err = run([*argv, "-c", str(cluster_node)], capsys)
        assert code == 1
        assert err == f"villaged: error: is the node running? no control socket at {socket_path}\n"
    code, _, err = run(["cluster", "status", "-c", str(node)], capsys)
    assert code == 1
    assert "this node is not in a cluster" in err
    code, _, err = run(["cluster", "run-local", "--dir", str(node.parent / "nothing")], capsys)
    assert code == 1
    assert "no node directories (n1, n2, …)" in err
