"""The control socket: the service user's own commands on a running node.

Theory of operation
-------------------
A cluster node's data cannot be opened offline by ``villaged user …`` (it lives in Raft shards
spread over the nodes), so the running node offers the commands the service user could run on a
stopped single node through a Unix socket inside its data directory
(``<[storage] dir>/control.sock``, mode 0600, in a 0700 directory): only the service user
reaches it, so it needs no login. It is *not* the operators' admin socket, and it offers nothing
the admin socket guards (no inspection of anyone's data).

Protocol: one JSON object per line (UTF-8, ``\\n``-terminated). A request is
``{"cmd": "user.add", "args": {...}}``; every request gets exactly one answer,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``, in order. Request
lines are bounded (`MAX_REQUEST_BYTES`); a longer one is answered with an error and the
connection closed (there is no way to find the next line). Bad JSON or an unknown command is an
error answer, and the connection goes on. At most `MAX_CONNECTIONS` connections are served at
once; a connection idle for `IDLE_TIMEOUT_S` is closed; a command that runs longer than
`REQUEST_TIMEOUT_S` is cancelled and answered with an error.

The node registers its handlers (``user.add``, ``user.passwd``, ``user.delete``,
``user.list``, ``cluster.status``) with :func:`serve_control`; ``villaged user`` and
``villaged cluster status`` call them with :func:`call_control`. This module also renders the
``cluster.status`` document for people (:func:`status_report`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from villaged.admin.server import remove_stale_socket

if TYPE_CHECKING:
    from pathlib import Path

    from villaged.config import Config

__all__ = [
    "CONTROL_SOCKET_NAME",
    "ControlError",
    "Handler",
    "call_control",
    "control_socket_path",
    "serve_control",
    "status_report",
]

log = logging.getLogger("villaged.ops.control")

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]

CONTROL_SOCKET_NAME: Final = "control.sock"
MAX_REQUEST_BYTES: Final = 64 * 1024
#: Answers can be long (``user.list`` of a big domain); still bounded.
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
MAX_CONNECTIONS: Final = 16
REQUEST_TIMEOUT_S: Final = 60.0
IDLE_TIMEOUT_S: Final = 300.0
WRITE_TIMEOUT_S: Final = 10.0
READ_CHUNK: Final = 16 * 1024
#: sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH_BYTES: Final = 107


class ControlError(Exception):
    """A command failed cleanly; the message is one line, shown to the user as it is.

    Handlers raise it for a refusal ("no such user x@y"); :func:`call_control` raises it for
    every failure, including a node that cannot be reached."""


def control_socket_path(config: Config) -> Path:
    """Where the node listens: inside its data directory, reachable by the service user only."""
    return config.storage.dir / CONTROL_SOCKET_NAME


class LineTooLongError(Exception):
    pass


class LineBuffer:
    """Bytes in, complete lines out (without the ``\\n``); a partial line longer than
    ``max_bytes`` is an error rather than a growing buffer."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", 0, self._max + 1)
        if end < 0:
            if len(self._buffer) > self._max:
                raise LineTooLongError(f"line longer than {self._max} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": _one_line(message) or "error"}


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        raise OSError(
            f"the control socket path {path} is too long for a Unix socket "
            f"(at most {_MAX_SOCKET_PATH_BYTES} bytes): use a shorter [storage] dir"
        )


# --- server --------------------------------------------------------------------------------


@dataclass
class _ServerState:
    handlers: Mapping[str, Handler]
    connections: int = 0


async def serve_control(
    path: Path,
    handlers: Mapping[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` on the Unix socket ``path`` (mode 0600) until cancelled.

    A socket file left by a node that died is replaced; any other file there is an error. The
    socket file is removed when serving stops. Reports readiness through ``task_status``.
    """
    _check_path_length(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        remove_stale_socket(path)
        # No umask games (the umask is the whole process's, and trio binds in a worker
        # thread): the data directory is 0700, so nobody else reaches the socket meanwhile.
        await sock.bind(str(path))
        bound = True
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        listener = trio.SocketListener(sock)
        state = _ServerState(handlers)
        log.info(
            "control socket listening", extra={"event": "control.listening", "path": str(path)}
        )
        task_status.started()

        async def serve(stream: trio.SocketStream) -> None:
            try:
                await _serve_connection(stream, state)
            except Exception:
                log.exception("control connection failed", extra={"event": "control.failed"})

        await trio.serve_listeners(serve, [listener])
    finally:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # noqa: ASYNC240 - one unlink while stopping


async def _serve_connection(stream: trio.SocketStream, state: _ServerState) -> None:
    async with stream:
        if state.connections >= MAX_CONNECTIONS:
            await _send(stream, _error(f"too many control connections (at most {MAX_CONNECTIONS})"))
            return
        state.connections += 1
        try:
            await _serve_requests(stream, state.handlers)
        finally:
            state.connections -= 1


async def _serve_requests(stream: trio.SocketStream, handlers: Mapping[str, Handler]) -> None:
    lines = LineBuffer(MAX_REQUEST_BYTES)
    while True:
        line: bytes | None = None
        with trio.move_on_after(IDLE_TIMEOUT_S):
            try:
                line = await _receive_line(stream, lines)
            except LineTooLongError:
                await _send(stream, _error(f"request line longer than {MAX_REQUEST_BYTES} bytes"))
                return
            if line is None:
                return  # the client closed the connection
        if line is None:
            await _send(stream, _error(f"no request for {IDLE_TIMEOUT_S:g} s; closing"))
            return
        if not await _send(stream, await _answer(line, handlers)):
            return


async def _receive_line(stream: trio.SocketStream, lines: LineBuffer) -> bytes | None:
    while (line := lines.next_line()) is None:
        try:
            data = await stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        lines.receive_data(data)
    return line


async def _answer(line: bytes, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return _error("the request is not a JSON object on one line")
    if not isinstance(request, dict):
        return _error("the request is not a JSON object on one line")
    cmd, args = request.get("cmd"), request.get("args", {})
    if not isinstance(cmd, str):
        return _error('the request has no "cmd" string')
    if not isinstance(args, dict):
        return _error('"args" must be a JSON object')
    handler = handlers.get(cmd)
    if handler is None:
        return _error(f"unknown command {cmd[:80]!r}; known: {', '.join(sorted(handlers))}")
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        try:
            result = await handler(args)
        except ControlError as exc:
            return _error(f"{cmd}: {exc}")
        except Exception as exc:
            log.exception(
                "control command failed", extra={"event": "control.command_failed", "cmd": cmd}
            )
            return _error(f"{cmd}: internal error ({type(exc).__name__}); see the node's log")
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            log.error(
                "control command answered what JSON cannot carry",
                extra={"event": "control.bad_result", "cmd": cmd},
            )
            return _error(f"{cmd}: internal error (the answer is not JSON); see the node's log")
        return {"ok": True, "result": result}
    return _error(f"{cmd}: no result within {REQUEST_TIMEOUT_S:g} s")


async def _send(stream: trio.SocketStream, message: Mapping[str, Any]) -> bool:
    """False if the answer could not be written whole (the connection is then closed)."""
    with trio.move_on_after(WRITE_TIMEOUT_S):
        try:
            await stream.send_all(_encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
    return False


# --- client --------------------------------------------------------------------------------


async def call_control(
    path: Path,
    cmd: str,
    args: Mapping[str, Any],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - its expiry must become a one-line ControlError
) -> Any:
    """Run ``cmd`` on the node listening at ``path`` and return its result.

    Raises :class:`ControlError` with a one-line reason for everything that goes wrong: no node
    there, a refused command, no answer within ``timeout`` seconds.
    """
    with trio.move_on_after(timeout):
        return await _call(path, cmd, args)
    raise ControlError(f"{cmd}: no answer from the node within {timeout:g} s")


async def _call(path: Path, cmd: str, args: Mapping[str, Any]) -> Any:
    try:
        _check_path_length(path)
    except OSError as exc:
        raise ControlError(str(exc)) from None
    request = _encode({"cmd": cmd, "args": dict(args)})
    if len(request) > MAX_REQUEST_BYTES:
        raise ControlError(f"{cmd}: the request is longer than {MAX_REQUEST_BYTES} bytes")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(f"is the node running? no control socket at {path}") from None
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ControlError(
            f"cannot connect to the control socket {path}: {reason}"
            " (run this as the node's service user)"
        ) from None
    async with trio.SocketStream(sock) as stream:
        lines = LineBuffer(MAX_RESPONSE_BYTES)
        try:
            await stream.send_all(request)
            line = await _receive_line(stream, lines)
        except LineTooLongError:
            raise ControlError(
                f"{cmd}: the answer is longer than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"{cmd}: the control connection failed: {exc.strerror or exc}"
            ) from None
    if line is None:
        raise ControlError(f"{cmd}: the node closed the control connection without answering")
    try:
        answer = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"{cmd}: the node's answer is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"{cmd}: the node's answer is malformed")
    if not answer["ok"]:
        raise ControlError(_one_line(str(answer.get("error") or "refused")))
    return answer.get("result")


# --- cluster.status, for people ------------------------------------------------------------


def status_report(document: Any) -> list[str]:
    """The lines ``villaged cluster status`` prints for a ``cluster.status`` document: the
    members, one line per Raft group, and a summary. A group without a leader says so loudly."""
    try:
        return _status_lines(document)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ControlError(f"cluster.status: the node's answer is malformed ({exc})") from None


def _status_lines(document: Mapping[str, Any]) -> list[str]:
    me = str(document["node"])
    lines = [f"node {me} (zone {document.get('zone') or '-'}) of cluster {document['cluster']}"]
    members = list(document["members"])
    lines.append("")
    lines += _table(
        ["member", "zone", "address", "linked"],
        [
            [
                str(m["id"]) + (" (this node)" if m["id"] == me else ""),
                str(m.get("zone") or "-"),
                str(m.get("address") or "-"),
                "-" if m["id"] == me else ("yes" if m.get("linked") else "NO"),
            ]
            for m in members
        ],
    )
    groups = list(document["groups"])
    rows = []
    with_leader = led = 0
    for g in groups:
        leader = g.get("leader")
        with_leader += leader is not None
        led += g.get("role") == "leader"
        lag = g.get("lag") or {}
        rows.append(
            [
                str(g["group"]),
                str(leader) if leader is not None else "NO LEADER",
                str(g.get("term", "-")),
                str(g.get("commit", "-")),
                str(g.get("applied", "-")),
                str(g.get("role", "-")),
                " ".join(f"{peer}:{lag[peer]}" for peer in sorted(lag))
                if g.get("role") == "leader" and lag
                else "-",
            ]
        )
    lines.append("")
    lines += _table(["group", "leader", "term", "commit", "applied", "role", "follower lag"], rows)
    lines.append("")
    summary = f"{len(groups)} groups, {with_leader} with a leader, this node leads {led}"
    if with_leader < len(groups):
        summary += f"; {len(groups) - with_leader} WITHOUT A LEADER"
    lines.append(summary)
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
