"""Peer links: Raft messages and application frames between the nodes of one cluster, over
mutual TLS.

This module owns the cluster's connections: one *outbound* connection per peer, which only
carries messages to that peer, and the *inbound* listener, whose connections only carry
messages from peers. (Two one-way connections per pair of nodes: neither side ever has to decide
which of two simultaneous connections wins.) What travels is :mod:`villaged.cluster.wire`;
who may connect is :mod:`villaged.cluster.pki`.

Sending (:meth:`PeerLinks.send`, the driver's :class:`~villaged.cluster.driver.Transport`) never
blocks: the message joins the peer's queue of at most ``send_queue_messages``, and when that is
full the *oldest* message is dropped and counted -- Raft retransmits, and a fresh heartbeat or
append is worth more than a stale one. The peer's sender task connects (TCP, then TLS with the
cluster CA as the only trust anchor, a certificate required both ways, the handshake and the
hello exchange under ``handshake_timeout``), checks that the certificate names the node it
meant to reach and that the hello agrees, then writes queued messages in batches, each write
bounded by ``write_timeout`` (a peer gone without a word is noticed then, not when TCP gives
up). Any failure closes the connection; the task waits with exponential backoff (full jitter,
from ``reconnect_initial`` to ``reconnect_max``; it starts over only after a link that stayed
up ``stable_after``) and connects again. Messages taken from the queue when a connection broke
are lost, like any message Raft sends.

Receiving: the listener's TLS handshake requires a certificate from the CA that names one of the
configured peers (a stranger, even one with a valid certificate, is refused); the hello must
name the same node and cluster. Every envelope's ``sender`` must be that node -- a peer cannot
speak for another -- and each message goes to ``deliver`` (the driver's, non-blocking). A
connection silent for ``idle_timeout`` (heartbeats flow every tick) or sending a bad frame is
closed, and at most ``max_inbound`` connections are served at once.

Application frames (:meth:`PeerLinks.send_app`: forwarded proposals, session locations,
stanzas for a session elsewhere) share the peer's queue and its order with the Raft messages
and go to ``deliver_app`` on the other side. ``on_outbound_up`` is told when a link to a peer
is established (whatever was announced to it before may have been lost: announce again), and
``on_inbound_lost`` when a peer's link to us ends (soft state learnt from it is stale).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from villaged.cluster.identity import node_of
from villaged.cluster.pki import peer_node_id
from villaged.cluster.wire import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    NEED_DATA,
    AppFrame,
    Envelope,
    FrameDecoder,
    Hello,
    WireError,
    encode_app_frame,
    encode_envelope,
    encode_hello,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Mapping, Sequence

    from villaged.cluster.raft import Message

__all__ = ["LinkConfig", "LinkRefusedError", "Peer", "PeerLinks"]

logger = logging.getLogger("villaged.cluster")
_RECEIVE_BYTES = 65536
_SEND_BATCH_MESSAGES = 256


class LinkRefusedError(Exception):
    """The other end is not the node we meant, or not of our cluster."""


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class LinkConfig:
    send_queue_messages: int = 4096
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0
    #: A write that makes no progress for this long ends the link (a peer that vanished
    #: without a FIN would otherwise hold it "connected" until TCP gives up, ~15 min).
    write_timeout: float = 10.0
    reconnect_initial: float = 0.1
    reconnect_max: float = 5.0
    #: A link must stay up this long before the backoff starts over (a peer that accepts and
    #: then drops every link is retried ever more slowly, not every reconnect_initial).
    stable_after: float = 10.0
    #: Inbound connections at once, handshaking or linked; more are closed at once.
    max_inbound: int = 64
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES


class _HelloAgain:
    """Queued by :meth:`PeerLinks.announce`: the pump sends a fresh hello in its place."""


_HELLO_AGAIN: Final = _HelloAgain()


class _Outbound:
    __slots__ = ("connected", "connects", "dropped", "peer", "queue", "wake")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.queue: deque[Message | tuple[str, Any] | _HelloAgain] = deque()
        self.wake = trio.Event()
        self.dropped = 0
        self.connected = False
        self.connects = 0


class PeerLinks:
    """This node's links to its peers; run :meth:`run` in a nursery."""

    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        peers: Mapping[str, Peer],
        *,
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        deliver: Callable[[Message], None],
        deliver_app: Callable[[str, AppFrame], None] | None = None,
        on_outbound_up: Callable[[str], None] | None = None,
        on_inbound_lost: Callable[[str], None] | None = None,
        hello: Callable[[], tuple[str, Any]] | None = None,
        on_hello: Callable[[Hello], None] | None = None,
        config: LinkConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.config = config or LinkConfig()
        self._server_context = server_context
        self._client_context = client_context
        self._deliver = deliver
        self._deliver_app = deliver_app
        self._on_outbound_up = on_outbound_up
        self._on_inbound_lost = on_inbound_lost
        #: What this node says in its hellos: (incarnation, boot membership or None).
        self._hello = hello or (lambda: ("", None))
        self._on_hello = on_hello
        self._rng = rng or random.Random()  # backoff jitter, not a secret
        self._outbound = {
            peer_id: _Outbound(peer) for peer_id, peer in peers.items() if peer_id != node_id
        }
        #: Counters for metrics and tests.
        self.refused_inbound = 0
        self.accepted_inbound = 0
        self._inbound = 0  # inbound connections now (handshaking or linked)
        self._inbound_from: dict[str, int] = {}  # linked inbound connections by peer
        self.received = 0
        self.unroutable = 0

    # --- sending ---

    def send(self, message: Message) -> None:
        """Queue ``message`` for its peer (never blocks; drops the oldest when full)."""
        self._queue(node_of(message.to), message)

    def send_app(self, peer_id: str, kind: str, body: Any) -> bool:
        """Queue an application frame for ``peer_id`` (never blocks; drops the oldest queued
        item when full). False if ``peer_id`` is not a peer."""
        return self._queue(peer_id, (kind, body))

    def announce(self) -> None:
        """Tell every peer what this node's hello says now (it changed: the node decided how
        it joins the cluster), on the links already up; new links say it anyway."""
        for peer_id in self._outbound:
            self._queue(peer_id, _HELLO_AGAIN)

    def peers(self) -> list[str]:
        return sorted(self._outbound)

    def _queue(self, peer_id: str, item: Message | tuple[str, Any] | _HelloAgain) -> bool:
        outbound = self._outbound.get(peer_id)
        if outbound is None:
            self.unroutable += 1
            return False
        queue = outbound.queue
        if len(queue) >= self.config.send_queue_messages:
            queue.popleft()
            outbound.dropped += 1
        queue.append(item)
        outbound.wake.set()
        return True

    def dropped(self, peer_id: str) -> int:
        return self._outbound[peer_id].dropped

    def connected(self, peer_id: str) -> bool:
        return self._outbound[peer_id].connected

    def _encode_hello(self) -> bytes:
        incarnation, boot = self._hello()
        return encode_hello(self.node_id, self.cluster_id, incarnation, boot=boot)

    def inbound_linked(self, peer_id: str) -> bool:
        """Whether ``peer_id`` has a link to us now."""
        return self._inbound_from.get(peer_id, 0) > 0

    def connects(self, peer_id: str) -> int:
        """How many times the outbound link to ``peer_id`` was established."""
        return self._outbound[peer_id].connects

    # --- running ---

    async def run(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept peers on ``listeners`` and keep a link to every peer, until cancelled."""
        async with trio.open_nursery() as nursery:
            for outbound in self._outbound.values():
                nursery.start_soon(self._keep_linked, outbound)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(
        self, listener: trio.SocketListener, handler_nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                if self._inbound >= self.config.max_inbound:
                    self.refused_inbound += 1
                    await trio.aclose_forcefully(stream)
                    continue
                handler_nursery.start_soon(self._serve_inbound, stream)

    async def _keep_linked(self, outbound: _Outbound) -> None:
        delay = self.config.reconnect_initial
        peer = outbound.peer
        while True:
            try:
                stream = await self._connect(peer)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, LinkRefusedError) as exc:
                logger.info(
                    "cluster link to %s failed: %s",
                    peer.node_id,
                    exc,
                    extra={"event": "cluster.link_failed", "peer": peer.node_id},
                )
            else:
                linked_at = trio.current_time()
                outbound.connected = True
                outbound.connects += 1
                if self._on_outbound_up is not None:
                    self._on_outbound_up(peer.node_id)
                try:
                    async with stream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, outbound, stream)
                        await _wait_closed(stream, peer.node_id)
                        nursery.cancel_scope.cancel()
                except* (
                    OSError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                    LinkRefusedError,
                ) as broken:
                    logger.info(
                        "cluster link to %s broke: %s",
                        peer.node_id,
                        broken.exceptions[0],
                        extra={"event": "cluster.link_broken", "peer": peer.node_id},
                    )
                finally:
                    outbound.connected = False
                if trio.current_time() - linked_at >= self.config.stable_after:
                    delay = self.config.reconnect_initial  # it was a good link: start over
            await trio.sleep(self._rng.uniform(0, delay))
            delay = min(delay * 2, self.config.reconnect_max)

    async def _connect(self, peer: Peer) -> trio.SSLStream[trio.SocketStream]:
        with trio.fail_after(self.config.handshake_timeout):
            tcp = await trio.open_tcp_stream(peer.host, peer.port)
            stream = trio.SSLStream(tcp, self._client_context, server_hostname=None)
            try:
                await stream.do_handshake()
                certified = peer_node_id(stream.getpeercert())
                if certified != peer.node_id:
                    raise LinkRefusedError(
                        f"{peer.host}:{peer.port} presented a certificate for {certified!r},"
                        f" not {peer.node_id!r}"
                    )
                await stream.send_all(self._encode_hello())
                hello = await _read_hello(stream, FrameDecoder(max_frame_bytes=4096))
                if not hello.same_node(peer.node_id, self.cluster_id):
                    raise LinkRefusedError(f"{peer.node_id} answered with {hello}")
                if self._on_hello is not None:
                    self._on_hello(hello)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def _pump(self, outbound: _Outbound, stream: trio.SSLStream[trio.SocketStream]) -> None:
        queue = outbound.queue
        while True:
            if not queue:
                outbound.wake = trio.Event()
                await outbound.wake.wait()
                continue
            chunks: list[bytes] = []
            limit = self.config.max_frame_bytes
            while queue and len(chunks) < _SEND_BATCH_MESSAGES:
                item = queue.popleft()
                try:
                    if isinstance(item, _HelloAgain):
                        chunks.append(self._encode_hello())
                    elif isinstance(item, tuple):
                        chunks.append(encode_app_frame(*item, max_frame_bytes=limit))
                    else:
                        chunks.append(encode_envelope(item, max_frame_bytes=limit))
                except (ValueError, TypeError):
                    outbound.dropped += 1  # larger than a frame may be: a bug upstream
                    logger.error(
                        "dropped a message that cannot be framed",
                        extra={"event": "cluster.message_too_large", "peer": outbound.peer.node_id},
                    )
            if chunks:
                with trio.fail_after(self.config.write_timeout):
                    await stream.send_all(b"".join(chunks))

    async def _serve_inbound(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self._server_context, server_side=True)
        self._inbound += 1
        try:
            await self._serve_tls(stream)
        finally:
            self._inbound -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_tls(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        decoder = FrameDecoder(max_frame_bytes=self.config.max_frame_bytes)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await stream.do_handshake()
                peer_id = peer_node_id(stream.getpeercert())
                if peer_id is None or peer_id not in self._outbound:
                    raise LinkRefusedError(f"certificate names no peer of ours ({peer_id!r})")
                hello = await _read_hello(stream, decoder)
                if not hello.same_node(peer_id, self.cluster_id):
                    raise LinkRefusedError(f"{peer_id} sent {hello}")
                await stream.send_all(self._encode_hello())
                if self._on_hello is not None:
                    self._on_hello(hello)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.TooSlowError,
            LinkRefusedError,
            WireError,
        ) as exc:
            self.refused_inbound += 1
            logger.warning(
                "refused a cluster connection: %s",
                exc,
                extra={"event": "cluster.link_refused", "security": True},
            )
            return
        self.accepted_inbound += 1
        self._inbound_from[peer_id] = self._inbound_from.get(peer_id, 0) + 1
        try:
            await self._receive_logging(stream, decoder, peer_id)
        finally:
            self._inbound_from[peer_id] -= 1
            if self._on_inbound_lost is not None:
                self._on_inbound_lost(peer_id)

    async def _receive_logging(
        self, stream: trio.SSLStream[trio.SocketStream], decoder: FrameDecoder, peer_id: str
    ) -> None:
        try:
            await self._receive(stream, decoder, peer_id)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.TooSlowError,
            WireError,
            LinkRefusedError,
        ) as exc:
            logger.info(
                "cluster link from %s closed: %s",
                peer_id,
                exc,
                extra={"event": "cluster.link_closed", "peer": peer_id},
            )

    async def _receive(
        self, stream: trio.SSLStream[trio.SocketStream], decoder: FrameDecoder, peer_id: str
    ) -> None:
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                with trio.fail_after(self.config.idle_timeout):
                    data = await stream.receive_some(_RECEIVE_BYTES)
                decoder.receive_data(data)
            elif frame is CLOSED:
                return
            elif isinstance(frame, Envelope) and node_of(frame.message.sender) == peer_id:
                self.received += 1
                self._deliver(frame.message)
            elif isinstance(frame, AppFrame) and self._deliver_app is not None:
                self.received += 1
                self._deliver_app(peer_id, frame)
            elif isinstance(frame, Hello) and frame.same_node(peer_id, self.cluster_id):
                if self._on_hello is not None:
                    self._on_hello(frame)  # what the peer says of itself changed
            else:
                raise LinkRefusedError(f"{peer_id} sent {frame!r} on an established link")


async def _wait_closed(stream: trio.SSLStream[trio.SocketStream], peer_id: str) -> None:
    """Return when the peer closes our outbound link (it never sends on it after the hello)."""
    data = await stream.receive_some(_RECEIVE_BYTES)
    if data:
        raise LinkRefusedError(f"{peer_id} sent data on our outbound link")


async def _read_hello(stream: trio.SSLStream[trio.SocketStream], decoder: FrameDecoder) -> Hello:
    while True:
        frame = decoder.next_frame()
        if isinstance(frame, Hello):
            return frame
        if frame is NEED_DATA:
            decoder.receive_data(await stream.receive_some(_RECEIVE_BYTES))
            continue
        raise LinkRefusedError(f"expected a hello, got {frame!r}")
