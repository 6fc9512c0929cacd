"""The control socket: requests and answers, refusals, bounds, and the socket file itself."""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from villaged.ops import control
from villaged.ops.control import ControlError, call_control, serve_control

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path


async def echo(args: Mapping[str, Any]) -> Any:
    return {"echo": dict(args)}


async def refuse(args: Mapping[str, Any]) -> Any:
    raise ControlError("no such user x@example.org")


async def crash(args: Mapping[str, Any]) -> Any:
    raise RuntimeError("secret detail\non two lines")


async def hang(args: Mapping[str, Any]) -> Any:
    await trio.sleep_forever()


async def not_json(args: Mapping[str, Any]) -> Any:
    return {"a set": {1, 2}}


HANDLERS = {"echo": echo, "refuse": refuse, "crash": crash, "hang": hang, "odd": not_json}


@pytest.fixture
async def sock(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, HANDLERS)
        yield path
        nursery.cancel_scope.cancel()
    assert not path.exists()  # removed when serving stops


async def connect(path: Path) -> trio.SocketStream:
    raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await raw.connect(str(path))
    return trio.SocketStream(raw)


async def answer(stream: trio.SocketStream) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


async def test_round_trip_and_mode(sock: Path) -> None:
    status = os.stat(sock)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert stat.S_ISSOCK(status.st_mode)
    result = await call_control(sock, "echo", {"jid": "a@example.org", "n": [1, "ü"]})
    assert result == {"echo": {"jid": "a@example.org", "n": [1, "ü"]}}


async def test_handler_refusal_is_one_line(sock: Path) -> None:
    with pytest.raises(ControlError, match=r"^refuse: no such user x@example.org$"):
        await call_control(sock, "refuse", {})


async def test_unknown_command(sock: Path) -> None:
    with pytest.raises(ControlError, match=r"^unknown command 'nope'; known: crash, echo"):
        await call_control(sock, "nope", {})


async def test_handler_crash_hides_the_detail(sock: Path) -> None:
    with pytest.raises(ControlError) as caught:
        await call_control(sock, "crash", {})
    assert str(caught.value) == "crash: internal error (RuntimeError); see the node's log"
    assert await call_control(sock, "echo", {}) == {"echo": {}}  # the server goes on


async def test_result_that_is_not_json(sock: Path) -> None:
    with pytest.raises(ControlError, match="the answer is not JSON"):
        await call_control(sock, "odd", {})


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "the request is not a JSON object on one line"),
        (b"\xff\xfe\n", "the request is not a JSON object on one line"),
        (b"[1, 2]\n", "the request is not a JSON object on one line"),
        (b'{"args": {}}\n', 'the request has no "cmd" string'),
        (b'{"cmd": "echo", "args": [1]}\n', '"args" must be a JSON object'),
    ],
)
async def test_bad_requests_are_answered_and_the_connection_goes_on(
    sock: Path, line: bytes, error: str
) -> None:
    async with await connect(sock) as stream:
        await stream.send_all(line)
        assert await answer(stream) == {"ok": False, "error": error}
        await stream.send_all(b'{"cmd": "echo"}\n')  # args may be left out
        assert await answer(stream) == {"ok": True, "result": {"echo": {}}}


async def test_oversized_line_is_refused_and_closed(sock: Path) -> None:
    async with await connect(sock) as stream:
        await stream.send_all(b"x" * (control.MAX_REQUEST_BYTES + 1))
        reply = await answer(stream)
        assert reply == {"ok": False, "error": "request line longer than 65536 bytes"}
        assert await stream.receive_some(10) == b""


async def test_a_line_of_exactly_the_limit_is_read(sock: Path) -> None:
    request = b'{"cmd": "echo", "args": {"pad": "' + b"p" * 10 + b'"}}'
    request = request[:-2] + b" " * (control.MAX_REQUEST_BYTES - len(request)) + b"}}"
    assert len(request) == control.MAX_REQUEST_BYTES
    async with await connect(sock) as stream:
        await stream.send_all(request + b"\n")
        reply = await answer(stream)
        assert reply is not None
        assert reply["ok"], reply


async def test_client_refuses_to_send_an_oversized_request(sock: Path) -> None:
    with pytest.raises(ControlError, match="longer than 65536 bytes"):
        await call_control(sock, "echo", {"pad": "x" * control.MAX_REQUEST_BYTES})


async def test_at_most_16_connections(sock: Path) -> None:
    streams = [await connect(sock) for _ in range(control.MAX_CONNECTIONS)]
    try:
        for stream in streams:  # each is being served: it answers
            await stream.send_all(b'{"cmd": "echo"}\n')
            assert (await answer(stream) or {}).get("ok") is True
        with pytest.raises(ControlError, match=r"^too many control connections \(at most 16\)$"):
            await call_control(sock, "echo", {})
        await streams.pop().aclose()
        with trio.fail_after(5):
            while True:  # the server notices the close in its own time
                try:
                    assert await call_control(sock, "echo", {}) == {"echo": {}}
                    break
                except ControlError:
                    await trio.sleep(0.01)
    finally:
        for stream in streams:
            await stream.aclose()


async def test_idle_connection_is_closed(
    sock: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with await connect(sock) as stream:
        start = trio.current_time()
        assert await answer(stream) == {"ok": False, "error": "no request for 300 s; closing"}
        assert trio.current_time() - start == pytest.approx(control.IDLE_TIMEOUT_S)


async def test_slow_command_is_cancelled(
    sock: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(ControlError, match=r"^hang: no result within 60 s$"):
        await call_control(sock, "hang", {}, timeout=100)
    assert await call_control(sock, "echo", {}) == {"echo": {}}


async def test_client_timeout(sock: Path, autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(ControlError, match=r"^hang: no answer from the node within 2 s$"):
        await call_control(sock, "hang", {}, timeout=2)


async def test_no_node_running(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with pytest.raises(ControlError) as caught:
        await call_control(path, "user.list", {})
    assert str(caught.value) == f"is the node running? no control socket at {path}"
    # A socket file left behind by a node that died: nobody listens.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()
    with pytest.raises(ControlError, match=r"is the node running\?"):
        await call_control(path, "user.list", {})


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, HANDLERS)
        assert await call_control(path, "echo", {"x": 1}) == {"echo": {"x": 1}}
        nursery.cancel_scope.cancel()


async def test_other_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket; refusing to replace it"):
        await serve_control(path, HANDLERS)
    assert path.read_text() == "precious"


async def test_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(OSError, match="too long for a Unix socket"):
        await serve_control(path, HANDLERS)
    with pytest.raises(ControlError, match="too long for a Unix socket"):
        await call_control(path, "echo", {})


async def test_server_that_closes_without_answering(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def close_at_once() -> None:
        conn, _ = await listener.accept()
        await conn.recv(100)
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_at_once)
        with pytest.raises(ControlError, match="closed the control connection without answering"):
            await call_control(path, "echo", {})
    listener.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"garbage\n", "echo: the node's answer is not JSON"),
        (b'{"result": 1}\n', "echo: the node's answer is malformed"),
        (b'{"ok": false, "error": "one\\ntwo"}\n', "one two"),
    ],
)
async def test_client_checks_the_answer(tmp_path: Path, reply: bytes, error: str) -> None:
    path = tmp_path / "s.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def reply_once() -> None:
        conn, _ = await listener.accept()
        await conn.recv(100)
        await conn.send(reply)
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply_once)
        with pytest.raises(ControlError) as caught:
            await call_control(path, "echo", {})
    assert str(caught.value) == error
    listener.close()


def test_line_buffer() -> None:
    lines = control.LineBuffer(5)
    lines.receive_data(b"ab\ncd")
    assert lines.next_line() == b"ab"
    assert lines.next_line() is None
    lines.receive_data(b"e")
    assert lines.next_line() is None  # "cde": at the limit, not over
    lines.receive_data(b"fgh")
    with pytest.raises(control.LineTooLongError):
        lines.next_line()
