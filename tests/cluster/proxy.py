"""A userspace TCP proxy for one cluster link, made by a test to inject faults.

Theory of operation
-------------------
`LinkProxy` listens on 127.0.0.1 and forwards each accepted connection to a loopback target.
Each connection runs four tasks inside its own cancel scope: for each direction a reader that
stamps every chunk with the time it arrived and puts it on a small bounded channel, and a writer
that holds the chunk until `arrived + delay(direction)` and then passes it on. "forward" is
client -> target, "backward" is target -> client. Keeping the directions apart is what lets
one of them be delayed or dropped alone.

The fault switches are synchronous, so a test can flip them between two awaits and know that
the next byte sees them:

* `cut()` closes the listening socket (new connects are refused by the kernel) and closes every
  connection's sockets at once (FIN both ways, or RST with `reset=True`).
* `drop(direction)` discards bytes in that direction, in readers (as they arrive) and in
  writers (chunks already held for a delay). Connections stay open, and EOF and resets still
  pass through: a one-way partition of data, not of the connection's lifecycle.
* `delay(seconds, direction)` holds each chunk that long after its arrival; order within a
  direction is kept because each writer works through its channel in order. Changing the delay
  (or `heal()`) wakes the writers, so held chunks follow the new setting at once.
* `heal()` undoes all three; after a cut it binds the same port again before returning.

Bounds: at most `max_connections` connections are served at once; beyond that the proxy stops
accepting and further connects wait in the kernel's listen backlog (backpressure, nothing is
refused). Per connection and direction at most `buffered_chunks` chunks of at most `chunk_size`
bytes are held; when a delay fills that buffer the reader stops reading, so TCP flow control
pushes back on the sender. Nothing is ever dropped for being over a bound.

Limitations: the listener is IPv4 127.0.0.1 only; targets must be loopback IP literals (no
names, no DNS). A healed proxy re-binds its port; with `listen_port=0` the kernel picked an
ephemeral port that an outgoing connection could take while the proxy was cut, so tests that
cut should pass a fixed port below the ephemeral range (see `tests/ports.py`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

import trio

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[Direction, Direction] = ("forward", "backward")

# Loopback connects complete or fail at once; this only keeps a wedged target from pinning a slot.
CONNECT_TIMEOUT = 5.0
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _per_direction() -> dict[Direction, int]:
    return dict.fromkeys(DIRECTIONS, 0)


@dataclass
class ProxyStats:
    """Counters since the proxy was made; bytes are counted as they leave (or are discarded)."""

    connections_accepted: int = 0
    connect_failures: int = 0
    bytes_forwarded: dict[Direction, int] = field(default_factory=_per_direction)
    bytes_dropped: dict[Direction, int] = field(default_factory=_per_direction)


@dataclass(frozen=True)
class _Chunk:
    data: bytes  # b"" is the end of the stream (EOF), delayed like any other chunk
    arrived: float


@dataclass(eq=False)  # identity: kept in a set while open
class _Connection:
    client: trio.SocketStream
    # Known from before the connect starts, so cut() can close (or reset) it at any moment.
    server_socket: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def abort(self, *, reset: bool) -> None:
        """Close both sockets now (waking any task blocked on them) and end the connection."""
        for sock in (self.client.socket, self.server_socket):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.scope.cancel()


def _loopback_target(target: tuple[str, int]) -> tuple[socket.AddressFamily, str, int]:
    host, port = target
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"proxy target must be a loopback IP literal, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"proxy target {host} is not a loopback address")
    if not 0 < port < 65536:
        raise ValueError(f"proxy target port {port} is out of range")
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return family, str(address), port


def _listen(port: int, backlog: int) -> trio.SocketListener:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class LinkProxy:
    """Listens on 127.0.0.1:<listen_port> and forwards each accepted connection to target
    (host, port); both directions are pumped by separate tasks so each can be faulted alone."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen_port: int = 0,
        max_connections: int = 16,
        chunk_size: int = 64 * 1024,
        buffered_chunks: int = 16,
    ) -> None:
        self._target = _loopback_target(target)
        if not 0 <= listen_port < 65536:
            raise ValueError(f"listen port {listen_port} is out of range")
        if max_connections < 1 or chunk_size < 1 or buffered_chunks < 1:
            raise ValueError("max_connections, chunk_size and buffered_chunks must be positive")
        self.port = listen_port
        self.stats = ProxyStats()
        self._max_connections = max_connections
        self._chunk_size = chunk_size
        self._buffered_chunks = buffered_chunks
        self._slots = trio.Semaphore(max_connections)
        self._connections: set[_Connection] = set()
        self._listener: trio.SocketListener | None = None
        self._running = False
        self._cut = False
        self._reopened = trio.Event()
        self._dropping: set[Direction] = set()
        self._delays: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self._settings_changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; every socket is closed when this returns."""
        if self._running:
            raise RuntimeError("LinkProxy.run() is already running")
        self._running = True
        try:
            self._listener = _listen(self.port, self._max_connections)
            self.port = self._listener.socket.getsockname()[1]
            if self._cut:  # cut() before start: the port is known now, but stays refused
                self._listener.socket.close()
                self._listener = None
            async with trio.open_nursery() as connections:
                task_status.started(self.port)
                await self._accept_forever(connections)
        finally:
            self._running = False
            if self._listener is not None:
                self._listener.socket.close()
                self._listener = None

    # -- fault switches (synchronous: they take effect before the caller's next await) --

    def cut(self, *, reset: bool = False) -> None:
        """Close every current connection (FIN both ways, RST with reset=True) and refuse new
        connects until heal()."""
        if not self._cut:
            self._cut = True
            self._reopened = trio.Event()
        if self._listener is not None:
            self._listener.socket.close()  # wakes the accept loop with ClosedResourceError
            self._listener = None
        for conn in list(self._connections):
            conn.abort(reset=reset)

    def heal(self) -> None:
        """Undo cut, drop and delay. After a cut the same port is bound again (OSError if it
        was taken meanwhile)."""
        self._dropping.clear()
        self._delays = dict.fromkeys(DIRECTIONS, 0.0)
        self._wake_writers()
        if self._cut:
            if self._running:
                self._listener = _listen(self.port, self._max_connections)
            self._cut = False
            self._reopened.set()

    def drop(self, direction: Direction) -> None:
        """Silently discard bytes in one direction, on current and new connections."""
        self._dropping.add(direction)
        self._wake_writers()

    def delay(
        self, seconds: float, direction: Literal["forward", "backward", "both"] = "both"
    ) -> None:
        """Hold each chunk `seconds` after it arrived before passing it on (order is kept)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {seconds!r}")
        for each in DIRECTIONS if direction == "both" else (direction,):
            self._delays[each] = seconds
        self._wake_writers()

    def _wake_writers(self) -> None:
        changed, self._settings_changed = self._settings_changed, trio.Event()
        changed.set()

    # -- accepting --

    async def _accept_forever(self, connections: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                client = await self._accept_one()
            except BaseException:
                self._slots.release()
                raise
            try:
                conn = _Connection(client, trio.socket.socket(self._target[0]))
            except BaseException:
                client.socket.close()
                self._slots.release()
                raise
            self._connections.add(conn)  # before any checkpoint, so cut() always sees it
            self.stats.connections_accepted += 1
            connections.start_soon(self._serve, conn)

    async def _accept_one(self) -> trio.SocketStream:
        while True:
            listener = self._listener
            if listener is None:
                await self._reopened.wait()
                continue
            try:
                return await listener.accept()
            except trio.ClosedResourceError:
                continue  # cut() closed the listener under us; wait for heal()

    # -- one connection --

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.scope:
                _, host, port = self._target
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await conn.server_socket.connect((host, port))
                except (OSError, trio.TooSlowError):
                    self.stats.connect_failures += 1
                    return
                server = trio.SocketStream(conn.server_socket)
                forward_send, forward_receive = trio.open_memory_channel[_Chunk](
                    self._buffered_chunks
                )
                backward_send, backward_receive = trio.open_memory_channel[_Chunk](
                    self._buffered_chunks
                )
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._read, conn, "forward", conn.client, forward_send)
                    pumps.start_soon(self._write, conn, "forward", server, forward_receive)
                    pumps.start_soon(self._read, conn, "backward", server, backward_send)
                    pumps.start_soon(self._write, conn, "backward", conn.client, backward_receive)
        finally:
            conn.abort(reset=False)
            self._connections.discard(conn)
            self._slots.release()

    async def _read(
        self,
        conn: _Connection,
        direction: Direction,
        source: trio.SocketStream,
        chunks: trio.MemorySendChannel[_Chunk],
    ) -> None:
        async with chunks:
            while True:
                try:
                    data = await source.receive_some(self._chunk_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # A reset from one side is passed on as a reset to the other.
                    conn.abort(reset=isinstance(exc, trio.BrokenResourceError))
                    return
                if data and direction in self._dropping:
                    self.stats.bytes_dropped[direction] += len(data)
                    continue
                await chunks.send(_Chunk(data, trio.current_time()))
                if not data:
                    return

    async def _write(
        self,
        conn: _Connection,
        direction: Direction,
        sink: trio.SocketStream,
        chunks: trio.MemoryReceiveChannel[_Chunk],
    ) -> None:
        async with chunks:
            async for chunk in chunks:
                await self._hold(direction, chunk.arrived)
                try:
                    if not chunk.data:
                        await sink.send_eof()
                        return
                    if direction in self._dropping:
                        self.stats.bytes_dropped[direction] += len(chunk.data)
                        continue
                    await sink.send_all(chunk.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    conn.abort(reset=isinstance(exc, trio.BrokenResourceError))
                    return
                self.stats.bytes_forwarded[direction] += len(chunk.data)

    async def _hold(self, direction: Direction, arrived: float) -> None:
        """Sleep until `arrived + delay`, re-reading the delay whenever a switch changes it."""
        while direction not in self._dropping:
            release_at = arrived + self._delays[direction]
            if trio.current_time() >= release_at:
                return
            changed = self._settings_changed
            with trio.move_on_at(release_at):
                await changed.wait()
