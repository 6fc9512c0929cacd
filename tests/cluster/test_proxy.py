"""LinkProxy over real loopback sockets: passthrough, cut/heal, one-way drop, delay, bounds,
and a clean shutdown. Delays are small real ones, asserted as lower bounds only."""

from __future__ import annotations

import gc
import os
import warnings
from typing import TYPE_CHECKING

import pytest
import trio

from tests.cluster.proxy import Direction, LinkProxy
from tests.ports import free_port_base

if TYPE_CHECKING:
    from collections.abc import Callable


class Upstream:
    """The proxy's target: echoes, or hands each accepted stream to the test."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.port = 0
        self._accepted_send, self.accepted = trio.open_memory_channel[trio.SocketStream](4)

    async def run(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not self.echo:
                await self._accepted_send.send(stream)
                await trio.sleep_forever()  # the test drives it; closed when the test ends
            try:
                while data := await stream.receive_some():
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass


async def start(
    nursery: trio.Nursery, *, echo: bool, listen_port: int = 0, max_connections: int = 16
) -> tuple[LinkProxy, Upstream]:
    upstream = Upstream(echo=echo)
    await nursery.start(upstream.run)
    proxy = LinkProxy(
        ("127.0.0.1", upstream.port), listen_port=listen_port, max_connections=max_connections
    )
    await nursery.start(proxy.run)
    return proxy, upstream


async def connect(proxy: LinkProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def assert_refused(proxy: LinkProxy) -> None:
    with trio.socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        await sock.connect(("127.0.0.1", proxy.port))


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(5):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll a proxy counter (bounded): the proxy's reads have no event of their own."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_passthrough_both_ways_including_a_mebibyte(nursery: trio.Nursery) -> None:
    proxy, _ = await start(nursery, echo=True)
    payload = os.urandom(1024 * 1024)
    async with await connect(proxy) as client:
        await client.send_all(b"ping")
        assert await receive_exactly(client, 4) == b"ping"
        async with trio.open_nursery() as both_ways:
            both_ways.start_soon(client.send_all, payload)
            assert await receive_exactly(client, len(payload)) == payload
    assert proxy.stats.connections_accepted == 1
    assert proxy.stats.bytes_forwarded == {
        "forward": 4 + len(payload),
        "backward": 4 + len(payload),
    }
    assert proxy.stats.bytes_dropped == {"forward": 0, "backward": 0}


async def test_half_close_passes_through_and_the_other_way_keeps_flowing(
    nursery: trio.Nursery,
) -> None:
    proxy, upstream = await start(nursery, echo=False)
    async with await connect(proxy) as client:
        server = await upstream.accepted.receive()
        await client.send_all(b"last words")
        await client.send_eof()
        assert await receive_exactly(server, 10) == b"last words"
        with trio.fail_after(5):
            assert await server.receive_some() == b""
        await server.send_all(b"reply")
        assert await receive_exactly(client, 5) == b"reply"
        await server.aclose()
        with trio.fail_after(5):
            assert await client.receive_some() == b""


async def test_cut_closes_connections_and_refuses_new_ones_until_heal(
    nursery: trio.Nursery,
) -> None:
    # A fixed port below the ephemeral range, so nothing can take it while the proxy is cut.
    proxy, upstream = await start(nursery, echo=False, listen_port=free_port_base(1))
    client = await connect(proxy)
    server = await upstream.accepted.receive()
    async with client, server:
        proxy.cut()
        with trio.fail_after(5):
            assert await client.receive_some() == b""
            assert await server.receive_some() == b""
        await assert_refused(proxy)

    proxy.heal()
    async with await connect(proxy) as client, await upstream.accepted.receive() as server:
        await client.send_all(b"back")
        assert await receive_exactly(server, 4) == b"back"
        await server.send_all(b"again")
        assert await receive_exactly(client, 5) == b"again"
    assert proxy.stats.connections_accepted == 2


async def test_cut_with_reset_resets_both_sides(nursery: trio.Nursery) -> None:
    proxy, upstream = await start(nursery, echo=False, listen_port=free_port_base(1))
    async with await connect(proxy) as client, await upstream.accepted.receive() as server:
        proxy.cut(reset=True)
        with trio.fail_after(5):
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


@pytest.mark.parametrize("direction", ["forward", "backward"])
async def test_drop_loses_one_direction_while_the_other_flows(
    nursery: trio.Nursery, direction: Direction
) -> None:
    proxy, upstream = await start(nursery, echo=False)
    async with await connect(proxy) as client, await upstream.accepted.receive() as server:
        # "forward" is client -> server; the test's sender is whichever end that direction leaves.
        sender, receiver = (client, server) if direction == "forward" else (server, client)
        proxy.drop(direction)

        await sender.send_all(b"lost")
        await wait_for(lambda: proxy.stats.bytes_dropped[direction] == 4)
        await receiver.send_all(b"other way")
        assert await receive_exactly(sender, 9) == b"other way"

        # A connection opened while dropping is dropped too.
        async with await connect(proxy) as client2, await upstream.accepted.receive() as server2:
            sender2 = client2 if direction == "forward" else server2
            await sender2.send_all(b"also lost")
            await wait_for(lambda: proxy.stats.bytes_dropped[direction] == 4 + 9)

        proxy.heal()
        await sender.send_all(b"found")
        # Had "lost" been held rather than discarded, these five bytes would be "lostf".
        assert await receive_exactly(receiver, 5) == b"found"
    assert proxy.stats.bytes_forwarded[direction] == 5


async def test_delay_holds_each_chunk_and_keeps_order(nursery: trio.Nursery) -> None:
    proxy, _ = await start(nursery, echo=True)
    async with await connect(proxy) as client:
        proxy.delay(0.2, "forward")
        started = trio.current_time()
        for piece in (b"one ", b"two ", b"three"):
            await client.send_all(piece)
            await trio.sleep(0.02)  # separate chunks, so order is kept across several
        assert await receive_exactly(client, 13) == b"one two three"
        assert trio.current_time() - started >= 0.2

        proxy.delay(0.1)  # both directions: a round trip takes two delays
        started = trio.current_time()
        await client.send_all(b"round trip")
        assert await receive_exactly(client, 10) == b"round trip"
        assert trio.current_time() - started >= 0.2


async def test_heal_releases_chunks_held_by_a_delay(nursery: trio.Nursery) -> None:
    proxy, _ = await start(nursery, echo=True)
    async with await connect(proxy) as client:
        proxy.delay(30)
        await client.send_all(b"held")
        await wait_for(lambda: proxy.stats.bytes_forwarded["forward"] == 0)
        await trio.sleep(0.05)  # let the proxy read it into the delay buffer
        proxy.heal()
        with trio.fail_after(5):  # far below the 30 s delay it was held for
            assert await receive_exactly(client, 4) == b"held"


async def test_a_full_delay_buffer_pushes_back_on_the_sender(nursery: trio.Nursery) -> None:
    upstream = Upstream(echo=True)
    await nursery.start(upstream.run)
    proxy = LinkProxy(("127.0.0.1", upstream.port), chunk_size=1024, buffered_chunks=2)
    await nursery.start(proxy.run)
    async with await connect(proxy) as client:
        proxy.delay(30, "forward")
        # Far more than the socket buffers on both sides of the proxy plus its 2 KiB can take:
        # if the proxy kept reading into an unbounded buffer, this would finish at once.
        with trio.move_on_after(0.3) as sending:
            await client.send_all(bytes(64 * 1024 * 1024))
        assert sending.cancelled_caught
    assert proxy.stats.bytes_forwarded["forward"] == 0


async def test_connections_beyond_the_cap_wait_for_a_free_slot(nursery: trio.Nursery) -> None:
    proxy, _ = await start(nursery, echo=True, max_connections=1)
    first = await connect(proxy)
    await first.send_all(b"first")
    assert await receive_exactly(first, 5) == b"first"
    async with await connect(proxy) as second:  # completes in the kernel's backlog
        await second.send_all(b"second")
        with trio.move_on_after(0.2):
            await second.receive_some()
            pytest.fail("a connection beyond max_connections was served")
        assert proxy.stats.connections_accepted == 1
        await first.aclose()
        assert await receive_exactly(second, 6) == b"second"
    assert proxy.stats.connections_accepted == 2


async def test_unreachable_target_closes_the_client(nursery: trio.Nursery) -> None:
    proxy = LinkProxy(("127.0.0.1", free_port_base(1)))  # nothing listens there
    await nursery.start(proxy.run)
    async with await connect(proxy) as client:
        with trio.fail_after(5):
            assert await client.receive_some() == b""
    assert proxy.stats.connect_failures == 1


# Wildcards too: "0.0.0.0" and "::" are never a proxy target, nothing binds them here.
WILDCARDS = ["0.0.0.0", "::"]  # noqa: S104


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.10", "2001:db8::1", "localhost", "example.org", *WILDCARDS]
)
def test_non_loopback_target_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LinkProxy((host, 5222))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1"])
def test_loopback_targets_are_accepted(host: str) -> None:
    LinkProxy((host, 5222))


async def test_cancelling_run_closes_every_socket(nursery: trio.Nursery) -> None:
    upstream = Upstream(echo=False)
    await nursery.start(upstream.run)
    proxy = LinkProxy(("127.0.0.1", upstream.port))
    stopped = trio.Event()
    scope = trio.CancelScope()  # the proxy's own, so it can stop while the test goes on

    async def run_proxy(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await proxy.run(task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run_proxy)
    async with await connect(proxy) as client, await upstream.accepted.receive() as server:
        proxy.delay(30, "backward")
        await server.send_all(b"held when the proxy stops")
        scope.cancel()
        with trio.fail_after(5):
            await stopped.wait()
            assert await client.receive_some() == b""
            assert await server.receive_some() == b""
        await assert_refused(proxy)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
