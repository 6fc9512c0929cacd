"""The loopback HTTP listener (h11): health, readiness and Prometheus metrics.

Each connection: bounded request size (h11's incomplete-event limit), a read timeout per
request, keep-alive up to a bounded number of requests. Handlers are plain functions from a
path to (status, content type, body) so they stay testable without sockets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Final

import h11
import trio

log = logging.getLogger("villaged.net.http")

MAX_REQUEST_BYTES: Final = 16 * 1024
READ_TIMEOUT_S: Final = 10.0
MAX_REQUESTS_PER_CONNECTION: Final = 100

Response = tuple[int, str, bytes]
Router = Callable[[str, str], Response]  # (method, path) -> response


async def serve_http_connection(stream: trio.abc.Stream, route: Router) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    for _ in range(MAX_REQUESTS_PER_CONNECTION):
        started = [False]  # set once any byte of this request has arrived
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                request = await _next_request(stream, conn, started)
        except trio.TooSlowError:
            if started[0]:  # an idle keep-alive connection just closes; a stalled request hears why
                await _respond(stream, conn, (408, "text/plain", b"request timeout\n"), False)
            return
        except h11.RemoteProtocolError as exc:
            await _respond(
                stream, conn, (exc.error_status_hint, "text/plain", b"bad request\n"), False
            )
            return
        if request is None:
            return
        method, target = request.method.decode("ascii", "replace"), request.target.decode()
        try:
            response = route(method, target.split("?", 1)[0])
        except Exception:
            # A bug behind one page (a metric that cannot be read) is a 500 for that request,
            # never the end of the listener or of the node.
            log.exception("request failed", extra={"event": "http.request_failed", "path": target})
            await _respond(stream, conn, (500, "text/plain", b"internal error\n"), False)
            return
        await _respond(stream, conn, response, keep_alive=True)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _next_request(
    stream: trio.abc.Stream, conn: h11.Connection, started: list[bool]
) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            started[0] = started[0] or bool(data)
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data (a request body) is read and ignored: no endpoint takes one.


async def _respond(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, keep_alive: bool
) -> None:
    status, content_type, body = response
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
    ]
    if not keep_alive:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def serve_http(
    host: str,
    port: int,
    route: Router,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await serve_http_connection(stream, route)

    log.info("listening", extra={"event": "http.listening", "host": host, "port": port})
    await trio.serve_listeners(handler, listeners, task_status=task_status)
