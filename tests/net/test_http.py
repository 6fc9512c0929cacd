"""The loopback HTTP listener: routing, keep-alive, bad and oversized requests, timeouts."""

from __future__ import annotations

import trio
import trio.testing

from villaged.net.http import MAX_REQUEST_BYTES, Response, serve_http, serve_http_connection


def route(method: str, path: str) -> Response:
    if path == "/healthz":
        return 200, "text/plain", b"ok\n"
    return 404, "text/plain", f"{method} {path}\n".encode()


async def _serve_then_close(server: trio.abc.Stream) -> None:
    async with server:
        await serve_http_connection(server, route)


async def _read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(60):  # beyond the server's read timeout, so the server acts first
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_keep_alive_then_close() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server)
        await client.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /other?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await _read_until_closed(client)
    assert data.count(b"HTTP/1.1 200") == 1
    assert b"ok\n" in data
    assert b"HTTP/1.1 404" in data
    assert b"GET /other\n" in data  # the query string is not part of the path


async def test_garbage_gets_400() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server)
        await client.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        data = await _read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 400")


async def test_oversized_request_is_refused() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server)
        await client.send_all(b"GET /" + b"a" * (MAX_REQUEST_BYTES + 10) + b" HTTP/1.1\r\n")
        data = await _read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 4")


async def test_slow_client_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server)
        await client.send_all(b"GET /healthz HTTP/1.1\r\n")  # never finishes the headers
        data = await _read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 408")


async def test_idle_connection_closes_quietly(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server)
        data = await _read_until_closed(client)
    assert data == b""


async def test_real_socket_on_loopback() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, "127.0.0.1", 0, route)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await _read_until_closed(stream)
        nursery.cancel_scope.cancel()
    assert data.startswith(b"HTTP/1.1 200")


async def test_a_failing_page_is_a_500_not_a_crash() -> None:
    def broken(method: str, path: str) -> Response:
        raise ValueError("a metric that cannot be read")

    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        async with server:
            await serve_http_connection(server, broken)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await _read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 500 ")
