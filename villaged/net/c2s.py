"""The c2s driver: moves bytes between client sockets and the sans-I/O stream machine.

One ``C2SConnection`` per accepted socket, in the listener's handler nursery (hypercorn's
shape): TLS handshake under ``fail_after``; reads under the negotiation deadline until a
resource is bound, then under the idle timeout (a silent client is pinged once, then
dropped); writes behind one lock from both the reader and the writer task. Outbound stanzas
from other sessions arrive through a small bounded channel; a client too slow to drain it is
disconnected instead of holding memory for everyone else.

Pipelining: a message is durable before it is delivered, but the reader does not wait for
the disk. It accepts each message (routing decided, record handed to the log) and queues it;
a third task completes the queue strictly oldest first (waits for the record, then
delivers). Messages read while a commit is in flight thus join the next group commit rather
than waiting their turn, and the client's stanzas still take effect in the order sent. At
most ``PIPELINE_DEPTH`` messages are in flight per connection; any other stanza waits until
the queue is empty, and so does a clean end of the stream.

Inbound bytes pass a token bucket (``c2s.bytes_per_second`` refilling ``c2s.burst_bytes``);
a client that sends faster than that for longer than the burst covers is disconnected with
``policy-violation``. Connections per IP are capped before any TLS work is done.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import trio

from villaged.im.mam import has_im_content
from villaged.im.sessions import Session
from villaged.ops import monitor
from villaged.storage.errors import StorageError
from villaged.xmpp import c2s as core
from villaged.xmpp.jid import JID
from villaged.xmpp.sasl import SaslError
from villaged.xmpp.stanza import error_reply
from villaged.xmpp.xml import XmlLimits

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Mapping

    from villaged.config import C2SConfig
    from villaged.im.handlers import HandlerRegistry
    from villaged.im.messages import PendingDelivery
    from villaged.im.router import Router
    from villaged.im.sessions import SessionRegistry
    from villaged.net.tls import TlsContextSource
    from villaged.ops.metrics import Metrics
    from villaged.ops.monitor import MonitorService
    from villaged.storage.store import Store
    from villaged.xmpp.scram import ScramCredential

log = logging.getLogger("villaged.net.c2s")

READ_CHUNK: Final = 16 * 1024
#: Messages of one connection accepted but not yet delivered (their records being written);
#: the reader waits for the oldest once this many are in flight.
PIPELINE_DEPTH: Final = 32
#: TLS handshakes in progress at once from one address. OpenSSL holds ~40 KiB for a handshake
#: in progress and ~10 KiB once it is done; after a burst of logins (every client reconnecting
#: after a restart) glibc keeps what the burst peaked at, so unbounded handshakes left the node
#: ~30 KiB per connection heavier for good. Per address, so that clients stalling their
#: handshakes from one address cannot hold back everyone else's.
HANDSHAKES_PER_IP: Final = 16
WRITE_TIMEOUT_S: Final = 30.0
#: A client that has sent nothing for this long releases its XML parser until it speaks again
#: (~12 KiB each: most of what an idle connection costs beyond its TLS state).
COMPACT_AFTER_S: Final = 5.0
#: Detached (resumable, socketless) sessions one account may have at once; past this a
#: dropped stream ends at once, its unacknowledged messages going offline.
MAX_DETACHED_PER_USER: Final = 5
#: Finishing the messages a client sent before its stream ended may take this long.
SETTLE_TIMEOUT_S: Final = 5.0
#: Ending a session (unacknowledged messages to offline storage, presence) may take this long.
SESSION_END_TIMEOUT_S: Final = 10.0
#: Stanzas held back for an inactive client (XEP-0352) before they all go out anyway.
CSI_MAX_HELD: Final = 256
CLOSE_TIMEOUT_S: Final = 2.0
_ping_ids = itertools.count(1)


class TokenBucket:
    """Bytes allowance: ``rate`` per second up to ``burst``; time is passed in."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = now

    def take(self, amount: int, now: float) -> bool:
        """Spend ``amount``; False when that overdraws the bucket (the sender is too fast)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= amount
        return self.tokens >= 0


class SessionObserver(Protocol):
    def announce(self, session: Session) -> None: ...
    def withdraw(self, session: Session) -> None: ...


@dataclass
class C2SContext:
    """What every client connection needs; built once per node by app.py."""

    domain: str
    limits: C2SConfig
    store: Store
    sessions: SessionRegistry
    handlers: HandlerRegistry
    router: Router
    unknown_user_secret: bytes
    connections_per_ip: dict[str, int] = field(default_factory=dict)
    handshakes_per_ip: dict[str, trio.CapacityLimiter] = field(default_factory=dict)
    # XEP-0198: where a session's unacknowledged stanzas go when it ends for good (app.py
    # wires im.stream_management.store_unacked), and the resumable streams by their id.
    store_unacked: Callable[[JID, list[ET.Element]], Awaitable[int]] | None = None
    resumable: dict[str, C2SConnection] = field(default_factory=dict)
    # Set when the node shuts down: new connections are closed at once, and a stream that
    # binds (or resumes) meanwhile ends with system-shutdown like the others.
    shutting_down: bool = False
    # Whether an operator disabled the account (app.py wires the account_status view).
    disabled: Callable[[str], bool] | None = None
    # The node's Prometheus metrics (app.py); None counts nothing.
    metrics: Metrics | None = None
    # The node's security monitor (app.py): counts failures, blocks addresses; None watches
    # nothing.
    monitor: MonitorService | None = None
    # Every running connection (c2s and WebSocket), so that a block can end the blocked
    # address's streams that are still trying to log in.
    live: set[C2SConnection] = field(default_factory=set)
    # On a cluster node (app.py): tells the other nodes where this node's sessions are and
    # what they announced (villaged.cluster.sessions.SessionMirror).
    session_observer: SessionObserver | None = None

    # ----- per-address limits, shared by the c2s and WebSocket listeners -------------------

    def is_blocked(self, peer: str) -> bool:
        """Whether the security monitor blocks ``peer`` (after repeated failed logins)."""
        return self.monitor is not None and self.monitor.is_blocked(peer)

    def record_security(self, kind: str, key: str) -> None:
        if self.monitor is not None:
            self.monitor.record(kind, key)

    def end_unauthenticated_streams(self, group: str) -> None:
        """The security monitor has just blocked the address group ``group``: its streams that
        have not logged in end with ``policy-violation``. Streams that proved a password stay
        (users behind the same NAT as an attacker keep their sessions)."""
        for connection in [c for c in self.live if c.stream.username is None]:
            if self.address_group(connection.peer) == group:
                connection.terminate("policy-violation", "address blocked by the security monitor")

    def address_group(self, peer: str) -> str:
        """What per-address limits count ``peer`` by: its IPv6 network (the monitor's
        ``ipv6_prefix``), else the address itself."""
        return peer if self.monitor is None else self.monitor.address_key(peer)

    def take_connection_slot(self, peer: str) -> bool:
        """Count a connection from ``peer``; False (and nothing counted) at the cap."""
        peer = self.address_group(peer)
        count = self.connections_per_ip.get(peer, 0)
        if count >= self.limits.max_connections_per_ip:
            return False
        self.connections_per_ip[peer] = count + 1
        return True

    def release_connection_slot(self, peer: str) -> None:
        peer = self.address_group(peer)
        remaining = self.connections_per_ip[peer] - 1
        if remaining:
            self.connections_per_ip[peer] = remaining
        else:
            del self.connections_per_ip[peer]

    async def tls_handshake(
        self, tcp: trio.SocketStream, context: ssl.SSLContext, peer: str
    ) -> trio.SSLStream[trio.SocketStream]:
        """A server-side TLS handshake on ``tcp`` once ``peer`` has a turn (at most
        `HANDSHAKES_PER_IP` at once per address); waiting and handshaking together are bounded
        by ``handshake_timeout``. Raises TooSlowError or BrokenResourceError."""
        turns = self.handshakes_per_ip
        peer = self.address_group(peer)
        limiter = turns.get(peer)
        if limiter is None:
            limiter = turns[peer] = trio.CapacityLimiter(HANDSHAKES_PER_IP)
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                async with limiter:
                    ssl_stream = trio.SSLStream(tcp, context, server_side=True)
                    await ssl_stream.do_handshake()
        finally:
            statistics = limiter.statistics()
            idle = not statistics.borrowed_tokens and not statistics.tasks_waiting
            if idle and turns.get(peer) is limiter:
                del turns[peer]
        return ssl_stream

    def stream_settings(self) -> core.StreamSettings:
        return core.StreamSettings(
            domain=self.domain,
            limits=XmlLimits(
                max_stanza_bytes=self.limits.max_stanza_bytes,
                max_depth=self.limits.max_depth,
                max_attributes=self.limits.max_attributes,
            ),
            post_auth_features=tuple(self.handlers.stream_features),
        )


async def serve_c2s(
    ctx: C2SContext,
    host: str,
    port: int,
    tls: TlsContextSource,
    *,
    direct_tls: bool,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    kind = "c2s_tls" if direct_tls else "c2s"
    log.info("listening", extra={"event": "c2s.listening", "listener": kind, "port": port})

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await C2SConnection(ctx, stream, tls, direct_tls=direct_tls).run()
        except Exception:
            # A bug in one connection must not take the listener (and every client) down.
            log.exception("connection failed", extra={"event": "c2s.connection_failed"})

    await trio.serve_listeners(handler, listeners, task_status=task_status)


class TransportRefusedError(trio.BrokenResourceError):
    """A `MessageTransport` refused what the peer sent (a bad frame, an oversized message)
    and has closed: the stream ends as a policy violation, and is not resumable."""


class MessageTransport(Protocol):
    """A transport that carries whole elements as messages: XMPP over WebSocket (RFC 7395),
    already inside TLS. Failures raise ``trio.BrokenResourceError`` like a trio stream."""

    async def receive_message(self) -> bytes:
        """The next complete message (UTF-8); ``b""`` once the peer has closed."""
        ...

    async def send_messages(self, messages: list[bytes]) -> None:
        """Send each item as one message, in order."""
        ...

    async def aclose(self, condition: str | None = None) -> None:
        """Close; ``condition`` is the stream error the stream ended with, if any."""
        ...


class C2SConnection:
    """One client connection: over TCP (``framed=None``; STARTTLS or direct TLS), or over a
    `MessageTransport` (WebSocket) whose listener did the TLS and HTTP work already."""

    def __init__(
        self,
        ctx: C2SContext,
        tcp: trio.SocketStream,
        tls: TlsContextSource,
        *,
        direct_tls: bool,
        framed: MessageTransport | None = None,
        bucket: TokenBucket | None = None,
        peer: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.tcp = tcp
        self.transport: trio.abc.Stream = tcp
        self.framed = framed
        self.tls = tls
        self.direct_tls = direct_tls or framed is not None
        # The client's address: the socket's peer, or what a trusted proxy forwarded.
        self.peer = peer or peer_address(tcp)
        self.stream = core.C2SStream(
            ctx.stream_settings(),
            lookup=self._credentials,
            entropy=os.urandom,
            unknown_user_secret=ctx.unknown_user_secret,
            direct_tls=self.direct_tls,
            framed=framed is not None,
        )
        self.session: Session | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._outbox = _Outbox(ctx.limits.send_queue)
        self._scope = trio.CancelScope()
        self._terminate: tuple[str, str] | None = None
        # The client's byte allowance; a framed transport passes the bucket it charges its
        # framing to, so that both together stay within the configured rate.
        self._bucket = bucket or TokenBucket(
            ctx.limits.bytes_per_second, ctx.limits.burst_bytes, trio.current_time()
        )
        # Accepted messages in the order the client sent them; `_complete_in_order` delivers
        # them oldest first (see "Pipelining" in the module docstring). That task runs only
        # while there is something to complete, so an idle connection has two tasks, not three.
        self._pipeline: list[PendingDelivery] = []
        self._pipeline_shrank = _Wakeup()
        self._completing = False
        self._nursery: trio.Nursery | None = None
        # Stream management: set when another connection resumed this one's session; while
        # detached (the socket gone, the session resumable), `_resumed` wakes the wait.
        self._taken_over = False
        self._detached: trio.Event | None = None
        self._peer_closed = False
        # The stream error the stream itself ended with (bad XML, a refused frame): such a
        # stream is over for good, never resumable.
        self._failed: str | None = None
        self._settled = trio.Event()  # set once teardown has finished the pipeline
        # Client state indication: while inactive, stanzas that can wait are held here.
        self._inactive = False
        self._held: list[ET.Element] = []

    def _credentials(self, username: str) -> Mapping[str, ScramCredential] | None:
        jid = f"{username}@{self.ctx.domain}"
        if self.ctx.disabled is not None and self.ctx.disabled(jid):
            log.warning(
                "login to a disabled account",
                extra={"event": "c2s.auth_disabled", "user": jid, "security": True},
            )
            return None  # refused exactly like a wrong password
        if not self.ctx.store.in_touch(jid):
            # A cluster node cut off from the account's shard may hold an old password or a
            # deleted account: no login here until it hears the shard's leader again.
            log.warning(
                "login refused: this node does not hear the account's shard",
                extra={"event": "c2s.auth_shard_unreachable", "user": jid},
            )
            raise SaslError(
                "temporary-auth-failure", "this server cannot reach the account's data now"
            )
        return self.ctx.store.credentials(jid)

    # ----- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        if self.ctx.shutting_down:
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self._close_transport("system-shutdown")
            return
        if self.ctx.is_blocked(self.peer):
            _security("address blocked by the security monitor", "c2s.blocked", self)
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self._close_transport("policy-violation")
            return
        if not self.ctx.take_connection_slot(self.peer):
            _security("too many connections from one address", "c2s.too_many_connections", self)
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self.tcp.aclose()
            return
        metrics = self.ctx.metrics
        connections = None if metrics is None else metrics.connections[self._transport_name()]
        if connections is not None:
            connections.inc()
        self.ctx.live.add(self)
        try:
            with self._scope:
                if self.direct_tls and self.framed is None and not await self._start_tls():
                    return
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._write_outbox)
                        await self._read_until_closed()
                        await self._drain_pipeline()  # what the client sent before it left
                        nursery.cancel_scope.cancel()
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away (or stopped reading) while we wrote to it
                except* StorageError as group:
                    # A write failed (disk full, I/O error) or the store stopped: this stream
                    # ends with an error the client can see, and the node keeps serving.
                    log.error(
                        "storage failure while handling a client",
                        extra={
                            "event": "c2s.storage_failed",
                            "error": str(group.exceptions[0]),
                            "peer": self.peer,
                        },
                    )
                    self._terminate = self._terminate or (
                        "internal-server-error",
                        "the server could not store your data",
                    )
        finally:
            if _crashed(sys.exc_info()[1]):  # a bug: the stream is over, not resumable
                self._failed = self._failed or "internal-server-error"
            with trio.move_on_after(SETTLE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self._settle_pipeline()
            for pending in self._pipeline:  # (only if settling took too long)
                pending.abandon()
            self._pipeline.clear()
            self._settled.set()
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await self._finish()
            self.ctx.release_connection_slot(self.peer)
            self.ctx.live.discard(self)
            if connections is not None:
                connections.dec()
            try:
                if self._resumable_now():
                    await self._wait_for_resumption()  # no socket held meanwhile
            finally:  # (also when cancelled: the unacknowledged must still be put away)
                if not self._taken_over:
                    with trio.move_on_after(SESSION_END_TIMEOUT_S) as cleanup:
                        cleanup.shield = True
                        await self._end_session()

    def _transport_name(self) -> str:
        if self.framed is not None:
            return "websocket"
        return "c2s_tls" if self.direct_tls else "c2s"

    async def _settle_pipeline(self) -> None:
        """Finish the messages the client sent before the stream ended: their records are
        written anyway, so they are delivered and counted (a resumed stream reports them)."""
        try:
            while self._pipeline:
                await self._pipeline[0].complete()
                self._pipeline.pop(0)
                self.stream.stanza_handled()
        except StorageError:
            pass  # what is left is abandoned; the client was not told it is handled

    def terminate(self, condition: str, text: str) -> None:
        """End this stream with a stream error (from another task: a newer login, shutdown,
        a full send queue). Idempotent, except that a reason which ends the session for good
        overrides a timeout (after which it could have been resumed). A detached session
        ends for good."""
        previous = self._terminate
        if previous is None or (
            previous[0] == "connection-timeout" and condition != "connection-timeout"
        ):
            self._terminate = (condition, text)
            self._scope.cancel()
        if condition != "connection-timeout":
            self._forget_resumable()
        if self._detached is not None:
            self._detached.set()

    def _forget_resumable(self) -> None:
        sm = self.stream.sm
        if sm is not None and self.ctx.resumable.get(sm.id) is self:
            del self.ctx.resumable[sm.id]

    async def _finish(self) -> None:
        """Write what is left and close the transport; the session itself ends in
        `_end_session` (unless it waits for resumption first)."""
        if self._taken_over:
            await self._close_transport(None)
            return
        # Replies already queued for this client (e.g. errors for its last messages) go out
        # before the stream ends.
        self._outbox.closed = True
        for stanza in self._held + self._outbox.take():
            self.stream.send_stanza(stanza)
        self._held.clear()
        if self._terminate is not None:
            condition, text = self._terminate
            self.stream.fail(condition, text)
            log.info(
                "stream ended by server",
                extra={"event": "c2s.stream_error", "condition": condition, "peer": self.peer},
            )
        else:
            self.stream.close()
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._flush()
        finally:  # even when the flush is cut short: no socket outlives the stream
            await self._close_transport(self._terminate[0] if self._terminate else self._failed)
        log.debug("closed", extra={"event": "c2s.closed", "peer": self.peer})

    async def _close_transport(self, condition: str | None) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if self.framed is not None:
                await self.framed.aclose(condition)
            else:
                await self.transport.aclose()

    # ----- stream management (XEP-0198) ---------------------------------------------------

    def _detached_of_user(self) -> int:
        assert self.session is not None
        bare = self.session.jid.bare
        return sum(
            1
            for c in self.ctx.resumable.values()
            if c._detached is not None and c.session is not None and c.session.jid.bare == bare
        )

    def _resumable_now(self) -> bool:
        """Whether the stream broke in a way a client resumes from: it did not close it
        itself, and we did not end it for a reason of our own (a timeout is the network's)."""
        sm = self.stream.sm
        return (
            sm is not None
            and sm.resume
            and self.session is not None
            and not self._taken_over
            and not self._peer_closed
            and self._failed is None
            and (self._terminate is None or self._terminate[0] == "connection-timeout")
            # One account cannot pile up sessions that wait without a socket.
            and self._detached_of_user() < MAX_DETACHED_PER_USER
        )

    async def _wait_for_resumption(self) -> None:
        sm = self.stream.sm
        assert sm is not None
        assert self.session is not None
        self._detached = trio.Event()
        # Until resumed, stanzas for this session are kept as sent-but-unacknowledged: a
        # resuming client gets them, in order, with the rest.
        self.session.enqueue = self._hold_detached
        log.info(
            "stream detached; waiting for resumption",
            extra={"event": "sm.detached", "jid": str(self.session.jid), "max": sm.max},
        )
        with trio.move_on_after(sm.max) as window:
            await self._detached.wait()
        self._detached = None
        if window.cancelled_caught:
            log.info(
                "stream not resumed",
                extra={"event": "sm.expired", "jid": str(self.session.jid)},
            )

    def _hold_detached(self, stanza: ET.Element) -> bool:
        sm = self.stream.sm
        assert sm is not None
        sm.hold(stanza)  # kept even past the limit: it goes offline with the rest
        return len(sm.unacked) <= self.ctx.limits.sm_max_unacked  # else the session ends

    async def _end_session(self) -> None:
        session = self.session
        if session is None:
            return
        # Unregistered first: nothing may be routed (or flushed from offline storage) to a
        # session whose unacknowledged stanzas are being put away.
        self.ctx.sessions.remove(session)
        if self.ctx.session_observer is not None:
            self.ctx.session_observer.withdraw(session)
        sm = self.stream.sm
        if sm is not None:
            self._forget_resumable()
            unacked = sm.take_unacked()
            for stanza in unacked:
                self._bounce_request(stanza)
            if unacked and self.ctx.store_unacked is not None:
                try:
                    await self.ctx.store_unacked(session.jid, unacked)
                except StorageError as exc:
                    log.error(
                        "unacknowledged messages not queued offline (the archive has them)",
                        extra={"event": "sm.unacked_failed", "error": str(exc)},
                    )
        if self.ctx.sessions.get(session.jid) is not None:
            # A newer login with the same resource holds the full JID: its own presence
            # stands, so only those this session sent directed presence to hear it leave.
            session.available = False
        await self.ctx.router.session_ended(session)

    def _bounce_request(self, stanza: ET.Element) -> None:
        """An iq request to a session that ended unacknowledged gets the error a request to
        an unavailable resource would (XEP-0198 §5, RFC 6121 §8.5.3.2)."""
        if stanza.tag != "{jabber:client}iq" or stanza.get("type") not in ("get", "set"):
            return
        try:
            requester = JID.parse(stanza.get("from", ""))
        except ValueError:
            return
        target = self.ctx.sessions.get(requester)
        if target is not None:
            target.send(error_reply(stanza, "service-unavailable"))

    def _enable_sm(self, event: core.SmEnableRequested) -> None:
        limit = self.ctx.limits.sm_resume_timeout
        if not event.resume:
            self.stream.enable_sm(os.urandom(12).hex(), resume=False, max_s=0)
            return
        wanted = event.max if event.max else limit
        sm = self.stream.enable_sm(os.urandom(18).hex(), resume=True, max_s=min(wanted, limit))
        self.ctx.resumable[sm.id] = self
        log.info("stream management enabled", extra={"event": "sm.enabled", "peer": self.peer})

    async def _resume(self, event: core.SmResumeRequested) -> None:
        old = self.ctx.resumable.get(event.previd)
        username = self.stream.username
        old_sm = old.stream.sm if old is not None else None
        if (
            old is None
            or old_sm is None
            or old.session is None
            or old.session.jid.local != username
            or self.ctx.sessions.get(old.session.jid) is not old.session
        ):
            # Unknown, expired, ended, or another user's: XEP-0198 §5 item-not-found.
            self.stream.refuse_sm("item-not-found")
            _security("resumption refused", "sm.resume_failed", self)
            return
        if self.ctx.disabled is not None and self.ctx.disabled(str(old.session.jid.bare)):
            self.stream.refuse_sm("not-authorized")
            self.terminate("not-authorized", "the account is disabled")
            return
        if not old_sm.can_acknowledge(event.h):
            self.stream.refuse_sm("unexpected-request", h=old_sm.handled)
            return
        session = old.session
        # The old connection stops (its teardown leaves the session alone) and first
        # finishes what its client sent, so that the h we report counts all of it.
        old._taken_over = True
        old._scope.cancel()
        if old._detached is not None:
            old._detached.set()
        with trio.move_on_after(SETTLE_TIMEOUT_S) as settling:
            settling.shield = True  # nothing may leave the session half taken over
            await old._settled.wait()
        old.stream.sm = None  # from here on only this stream counts
        old_sm.acknowledge(event.h)
        pending = old._held + old._outbox.take()
        old._held.clear()
        old._outbox.closed = True
        for stanza in pending:
            old_sm.hold(stanza)  # never written: sent now with the rest of the unacked
        session.enqueue = self._enqueue
        session.terminate = self.terminate
        self.session = session
        self.ctx.resumable[old_sm.id] = self
        self.stream.resume_sm(old_sm, session.jid)
        log.info(
            "stream resumed",
            extra={"event": "sm.resumed", "jid": str(session.jid), "peer": self.peer},
        )
        if self.ctx.shutting_down:
            self.terminate("system-shutdown", "the server is shutting down")

    # ----- reading -----------------------------------------------------------------------

    async def _read_until_closed(self) -> None:
        negotiation_deadline = trio.current_time() + self.ctx.limits.negotiation_timeout
        pinged = False
        compacted = False
        heard_at = trio.current_time()  # when we last handled the client's bytes (or pinged)
        while True:
            bound = self.session is not None
            deadline = heard_at + self.ctx.limits.idle_timeout if bound else negotiation_deadline
            # A client quiet for COMPACT_AFTER_S gives its parser memory back (see compact);
            # that wake-up is the same timer, moved earlier, not a second one.
            wake = deadline if compacted else min(deadline, heard_at + COMPACT_AFTER_S)
            data: bytes | None = None
            # Only the wait for bytes is under the deadline: once a stanza has been read,
            # handling it (which may wait for a commit) must never be cut short.
            with trio.move_on_at(wake):
                try:
                    data = await self._receive()
                except TransportRefusedError:
                    self._failed = "policy-violation"
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if data is None and trio.current_time() < deadline:
                self.stream.compact()
                compacted = True
                if self.stream.sm is not None and self.stream.sm.unacked:
                    self.stream.request_ack()  # the quiet client may have missed the last <r/>
                    await self._flush()
                continue
            if data is not None:
                pinged = compacted = False
                if not self._bucket.take(len(data), trio.current_time()):
                    _security("client sends faster than allowed", "c2s.rate_limited", self)
                    self.terminate("policy-violation", "sending faster than allowed")
                    return
                if not await self._process(data):
                    return
                heard_at = trio.current_time()  # idle time counts from when we are done
                continue
            if not bound:
                self.terminate("connection-timeout", "negotiation took too long")
                return
            if pinged:
                self.terminate("connection-timeout", "no answer to ping")
                return
            pinged = True
            heard_at = trio.current_time()  # the answer to the ping gets a full idle period
            await self._ping()

    async def _receive(self) -> bytes:
        if self.framed is not None:
            return await self.framed.receive_message()
        return bytes(await self.transport.receive_some(READ_CHUNK))

    async def _process(self, data: bytes) -> bool:
        """Feed bytes to the stream and act on its events; False once the stream is over."""
        self.stream.receive_data(data)
        while True:
            event = self.stream.next_event()
            if event is core.NEED_DATA:
                break
            if isinstance(event, core.StanzaReceived):
                assert self.session is not None
                if self.ctx.metrics is not None:
                    self.ctx.metrics.stanza_received(event.kind)
                if event.kind == "message":
                    await self._accept_message(self.session, event.stanza, event.to)
                else:
                    # Presence and iqs may depend on what earlier messages did (and must not
                    # overtake their errors): let those finish first.
                    await self._drain_pipeline()
                    await self.ctx.router.from_client(
                        self.session, event.stanza, event.kind, event.to
                    )
                    self.stream.stanza_handled()
                    if self.ctx.session_observer is not None:
                        self.ctx.session_observer.announce(self.session)
            elif isinstance(event, core.AckRequested):
                # Answered in order: the <a/> covers everything the client sent before <r/>
                # (as soon as it is durable), so a client need not ask again and again.
                await self._drain_pipeline()
                self.stream.send_ack()
            elif isinstance(event, core.SmEnableRequested):
                await self._drain_pipeline()  # what came before <enable/> is not counted
                self._enable_sm(event)
            elif isinstance(event, core.StanzaRejected):
                await self._drain_pipeline()  # counted in order, like any handled stanza
                self.stream.stanza_handled()
            elif isinstance(event, core.SmResumeRequested):
                await self._resume(event)
            elif isinstance(event, core.ClientStateChanged):
                self._inactive = not event.active
                if event.active and self._held:
                    held, self._held = self._held, []
                    for stanza in held:
                        self.stream.send_stanza(stanza)
            elif isinstance(event, core.StartTls):
                await self._flush()
                if not await self._start_tls():
                    return False
                self.stream.tls_established()
            elif isinstance(event, core.AuthSucceeded):
                if self.ctx.metrics is not None:
                    self.ctx.metrics.auth_result(succeeded=True)
                log.info(
                    "authenticated",
                    extra={
                        "event": "c2s.auth_succeeded",
                        "user": f"{event.username}@{self.ctx.domain}",
                        "mechanism": event.mechanism,
                        "peer": self.peer,
                    },
                )
            elif isinstance(event, core.AuthFailed):
                if self.ctx.metrics is not None:
                    self.ctx.metrics.auth_result(succeeded=False)
                if event.condition == "temporary-auth-failure":
                    continue  # the server could not check (logged in _credentials): no guess
                log.warning(
                    "authentication failed",
                    extra={
                        "event": "c2s.auth_failed",
                        "security": True,
                        "user": f"{event.username}@{self.ctx.domain}" if event.username else None,
                        "mechanism": event.mechanism,
                        "condition": event.condition,
                        "peer": self.peer,
                    },
                )
                self._auth_failed(event.username)
            elif isinstance(event, core.BindRequested):
                self._bind(event.resource)
            elif isinstance(event, core.StreamEnded):
                self._peer_closed = event.by_peer
                self._failed = event.condition
                if event.by_peer:
                    self._forget_resumable()  # a cleanly closed stream is over (XEP-0198)
                if event.condition is not None:
                    log.info(
                        "stream error",
                        extra={
                            "event": "c2s.stream_error",
                            "condition": event.condition,
                            "text": event.text,
                            "peer": self.peer,
                            "security": event.condition in _SECURITY_CONDITIONS,
                        },
                    )
                await self._flush()
                return False
            elif isinstance(event, core.ConnectionLost):
                return False
        await self._flush()
        return True

    # ----- pipelining messages ------------------------------------------------------------

    async def _accept_message(self, session: Session, message: ET.Element, to: JID | None) -> None:
        pending = await self.ctx.router.accept_message(session, message, to)
        if not self._pipeline and pending.ready:
            await pending.complete()  # nothing to wait for, nothing to overtake
            self.stream.stanza_handled()
            return
        self._pipeline.append(pending)
        if not self._completing:
            assert self._nursery is not None
            self._completing = True
            self._nursery.start_soon(self._complete_in_order)
        while len(self._pipeline) >= PIPELINE_DEPTH:
            await self._pipeline_shrank.wait()

    async def _complete_in_order(self) -> None:
        try:
            while self._pipeline:
                # Left in the list until complete: if this is cancelled, teardown abandons it.
                await self._pipeline[0].complete()
                self._pipeline.pop(0)
                self.stream.stanza_handled()  # durable and delivered: <a/> may count it
                self._pipeline_shrank.set()
        finally:
            self._completing = False

    async def _drain_pipeline(self) -> None:
        while self._pipeline:
            await self._pipeline_shrank.wait()

    def _bind(self, resource: str | None) -> None:
        username = self.stream.username
        assert username is not None
        bare = JID(username, self.ctx.domain)
        if resource is None:
            resource = f"villaged-{os.urandom(6).hex()}"
        full = JID(bare.local, bare.domain, resource)
        if self.ctx.disabled is not None and self.ctx.disabled(str(bare)):
            # Disabled after this stream authenticated: it may not become a session.
            self.stream.refuse_bind("not-authorized", "the account is disabled")
            self.terminate("not-authorized", "the account is disabled")
            return
        session = Session(jid=full, enqueue=self._enqueue, terminate=self.terminate)
        replaced = self.ctx.sessions.add(session)
        if replaced is not None:
            replaced.terminate("conflict", "replaced by a new login with the same resource")
        self.session = session
        if self.ctx.session_observer is not None:
            self.ctx.session_observer.announce(session)
        self.stream.complete_bind(full)
        if self.ctx.shutting_down:
            self.terminate("system-shutdown", "the server is shutting down")
        log.info("bound", extra={"event": "c2s.bound", "jid": str(full), "peer": self.peer})

    def _auth_failed(self, username: str | None) -> None:
        """Count a failed login for the security monitor; a client whose address it blocks
        now is sent away at once rather than left to keep guessing on this stream."""
        if self.peer != "unknown":  # (a shared key would let one client block many)
            self.ctx.record_security(monitor.AUTH_FAILURES_PER_IP, self.peer)
        account = f"{username}@{self.ctx.domain}" if username else None
        # Only accounts that exist are tracked: guesses at made-up names must not be able to
        # crowd the real ones out of the monitor's bounded memory.
        if account is not None and account in self.ctx.store.state.accounts:
            self.ctx.record_security(monitor.AUTH_FAILURES_PER_ACCOUNT, account)
        if self.ctx.is_blocked(self.peer):
            _security("address blocked by the security monitor", "c2s.blocked", self)
            self.terminate("policy-violation", "too many failed logins from your address")

    async def _start_tls(self) -> bool:
        try:
            self.transport = await self.ctx.tls_handshake(self.tcp, self.tls.context, self.peer)
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = "handshake timed out" if isinstance(exc, trio.TooSlowError) else "failed"
            _security(f"TLS handshake {reason}", "c2s.tls_failed", self)
            self.ctx.record_security(monitor.TLS_FAILURES, monitor.NODE_WIDE)
            self.stream.phase = core.Phase.CLOSED  # nothing more may be sent in the clear
            return False
        return True

    async def _ping(self) -> None:
        assert self.session is not None
        ping = ET.Element(
            "{jabber:client}iq",
            {
                "type": "get",
                "id": f"ping-{next(_ping_ids)}",
                "from": self.ctx.domain,
                "to": str(self.session.jid),
            },
        )
        ET.SubElement(ping, "{urn:xmpp:ping}ping")
        self.stream.send_stanza(ping)
        await self._flush()

    # ----- writing -----------------------------------------------------------------------

    def _enqueue(self, stanza: ET.Element) -> bool:
        sm = self.stream.sm
        if self._outbox.closed and sm is not None:
            return self._hold_detached(stanza)  # closing: unacknowledged, so kept
        if self._outbox.put(stanza):
            return True
        if sm is not None:
            sm.hold(stanza)  # not lost with the session: it goes offline with the unacked
        return False

    async def _write_outbox(self) -> None:
        outbox = self._outbox
        metrics = self.ctx.metrics
        while True:
            while not outbox.items:
                await outbox.filled.wait()
            # Everything queued goes out in the same TLS write: one record and one send() per
            # wakeup instead of per stanza (the queue is bounded, so is this).
            for stanza in outbox.take():
                if self._inactive and _can_wait(stanza):
                    self._hold(stanza)
                else:
                    self.stream.send_stanza(stanza)
                    if metrics is not None:
                        metrics.stanza_sent(stanza.tag)
            sm = self.stream.sm
            if sm is not None and len(sm.unacked) > self.ctx.limits.sm_max_unacked:
                self.terminate("resource-constraint", "too many unacknowledged stanzas")
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _hold(self, stanza: ET.Element) -> None:
        """CSI: keep ``stanza`` until the client is active; a newer presence from the same
        sender replaces the older, and past `CSI_MAX_HELD` everything held goes out."""
        if _is_status(stanza):
            sender = stanza.get("from")
            self._held = [s for s in self._held if not (_is_status(s) and s.get("from") == sender)]
        self._held.append(stanza)
        if len(self._held) > CSI_MAX_HELD:
            held, self._held = self._held, []
            for waiting in held:
                self.stream.send_stanza(waiting)

    async def _flush(self) -> None:
        if not self.stream.has_data_to_send:
            return  # the common case after reading a message: no lock, no timer
        async with self._send_lock:
            with trio.CancelScope(deadline=trio.current_time() + WRITE_TIMEOUT_S) as scope:
                if self.framed is not None:
                    messages = self.stream.messages_to_send()
                    if messages:
                        await self.framed.send_messages(messages)
                else:
                    data = self.stream.data_to_send()
                    if data:
                        await self.transport.send_all(data)
            if scope.cancelled_caught:
                log.info(
                    "client does not read",
                    extra={"event": "c2s.write_timeout", "peer": self.peer},
                )
                self.terminate("connection-timeout", "not reading what the server sends")
                raise trio.BrokenResourceError("write timed out")


def _can_wait(stanza: ET.Element) -> bool:
    """XEP-0352: what an inactive client need not get at once: presence, and messages with
    no content for the user (chat states, receipts). Messages with content — a body,
    encrypted payloads, call proposals, carbons of such — and everything else go at once."""
    tag = stanza.tag
    if tag == "{jabber:client}presence":
        return True
    if tag == "{jabber:client}message" and stanza.get("type") != "error":
        return not has_im_content(_carried(stanza))
    return False


def _carried(message: ET.Element) -> ET.Element:
    """The message a carbon copy (XEP-0280) carries, or ``message`` itself."""
    for direction in ("received", "sent"):
        inner = message.find(
            f"{{urn:xmpp:carbons:2}}{direction}/{{urn:xmpp:forward:0}}forwarded/"
            "{jabber:client}message"
        )
        if inner is not None:
            return inner
    return message


def _is_status(stanza: ET.Element) -> bool:
    """Available or unavailable presence (a newer one from the same sender supersedes it),
    as opposed to subscription requests and answers, which are all kept."""
    return stanza.tag == "{jabber:client}presence" and stanza.get("type") in (None, "unavailable")


def _crashed(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a failure (a bug) rather than a cancellation."""
    if exc is None:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is not None
    return not isinstance(exc, trio.Cancelled)


class _Wakeup:
    """One task sleeps in `wait` until another calls `set`: a one-waiter ``trio.Event`` that
    costs nothing while nobody waits and need not be replaced after use. It remembers
    nothing, so a waiter checks its condition first and waits in a loop; with no checkpoint
    between the check and the wait, no `set` can fall in between."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self._task is not None:
            raise RuntimeError("another task is already waiting")
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Outbox:
    """Stanzas other sessions handed to this client, waiting for the writer task; bounded."""

    __slots__ = ("closed", "filled", "items", "limit")

    def __init__(self, limit: int) -> None:
        self.items: list[ET.Element] = []
        self.limit = limit
        self.filled = _Wakeup()
        self.closed = False

    def put(self, stanza: ET.Element) -> bool:
        """Queue ``stanza``; False if the queue is full (the client is not reading)."""
        if self.closed:
            return True  # the connection is closing; the stanza is as good as dropped
        if len(self.items) >= self.limit:
            return False
        self.items.append(stanza)
        self.filled.set()
        return True

    def take(self) -> list[ET.Element]:
        items, self.items = self.items, []
        return items


_SECURITY_CONDITIONS: Final = frozenset(
    {"restricted-xml", "policy-violation", "not-authorized", "invalid-from", "not-well-formed"}
)


def _security(message: str, event: str, conn: C2SConnection) -> None:
    log.warning(message, extra={"event": event, "security": True, "peer": conn.peer})


def peer_address(stream: trio.SocketStream) -> str:
    """The IP address a connection comes from (\"unknown\" if the socket cannot say)."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return str(address[0]) if isinstance(address, tuple) else str(address)
