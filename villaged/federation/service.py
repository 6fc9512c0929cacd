"""Federation, the trio side: s2s listeners, one outbound link per remote domain, the queues.

Theory of operation
-------------------
`Federation` is owned by the node (app.py) and runs in its serving nursery. It has three jobs.

**Inbound streams.** ``[listeners.s2s]`` (STARTTLS) and ``[listeners.s2s_tls]`` (XEP-0368
direct TLS) accept remote servers. Each connection runs an INBOUND `S2SStream` (the sans-I/O
core in ``stream.py``) through `_S2SConnection`: TLS through pyOpenSSL (``net/s2s_tls.py``),
which asks for the peer's certificate but does not abort when it does not verify, so the core
can offer SASL EXTERNAL (XEP-0178) to a peer whose certificate covers its domain and dialback
(XEP-0220) otherwise. A dialback key is checked without a round trip when the peer's certificate
covers the domain it claims (XEP-0344), else by asking that domain's authoritative server over
a short outbound stream (`_verify_dialback`). Authenticated stanzas go to the IM layer through
``inbound`` (app.py wires `villaged.federation.glue.InboundRouter`), one at a time per stream,
so a remote server's stanzas take effect in the order it sent them.

**Outbound links.** Stanzas for another domain go to that domain's `_DomainLink`: durable ones
(chat messages, subscription requests) are first sealed into the log (``queue.py``) and
acknowledged to the sender only then; ephemeral ones (presence broadcasts, probes, iq) wait in a
small in-memory queue. A link task connects (``resolve.py``: static peers, then DNS SRV, then
the domain's address), negotiates TLS and authentication, then sends: every ephemeral stanza,
then the durable ones oldest first in batches, each batch followed by an XEP-0199 ping to the
remote domain — its answer proves the remote server has processed everything sent before it on
the stream (a stream is handled in order), and only then are the batch's records marked
``s2s.done``. A connection lost before the answer means the batch is sent again: delivery is
at least once, in order, never lost. Failures back off exponentially (``retry_initial`` up to
``retry_max``); a durable stanza older than ``queue_deadline`` is bounced to its sender with
``remote-server-not-found`` (the domain could not be resolved or reached) or
``remote-server-timeout`` (it was reached but did not answer in time, or refused us). Ephemeral
stanzas are dropped (iq requests bounced) when a connection attempt fails. A link with nothing
to send closes its stream after ``idle_timeout`` and its task ends; queues left over from a
previous run start their links when the node starts.

**Policy.** ``[federation] allow`` / ``deny`` decide which domains may federate (both ways);
TLS is required unless a ``[[federation.peers]]`` entry says otherwise (closed test networks);
dialback is allowed unless ``dialback = false``. Every refusal is logged as a security event.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypedDict

import trio

from villaged.federation import stream as core
from villaged.federation.queue import DONE_RECORD, QUEUED_RECORD, OutboundQueueView, QueuedStanza
from villaged.federation.resolve import Candidate, ResolutionError, resolve
from villaged.im.mam import pack_payload, unpack_stanza
from villaged.im.messages import PendingDelivery, RemoteQueueFullError
from villaged.net.c2s import TokenBucket, peer_address
from villaged.net.s2s_tls import OpenSSLStream, make_s2s_context
from villaged.ops import monitor as security
from villaged.storage.errors import ShreddedError, StorageError
from villaged.storage.records import Record
from villaged.xmpp import xml
from villaged.xmpp.jid import JID
from villaged.xmpp.stanza import NS_CLIENT, error_reply

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from OpenSSL import SSL

    from villaged.config import Config, FederationConfig, PeerConfig
    from villaged.storage.store import Pending, Store

log = logging.getLogger("villaged.federation")

#: Durable stanzas sent per batch before the ping that confirms them.
BATCH: Final = 100
#: Ephemeral stanzas waiting for one domain; more are dropped (iq requests bounced).
MAX_EPHEMERAL: Final = 1000
#: How long the remote server has to answer the ping that confirms a batch.
CONFIRM_TIMEOUT_S: Final = 30.0
#: A dialback verification (connect, negotiate, ask) may take this long.
VERIFY_TIMEOUT_S: Final = 30.0
CLOSE_TIMEOUT_S: Final = 2.0
#: Inbound streams from one address at once (a server needs one or two; dialback checks add
#: a few); the rest wait for their turn by being refused.
MAX_INBOUND_PER_IP: Final = 16
#: Messages of one inbound stream accepted and waiting for their records at once (their
#: records share fsyncs); the reader waits beyond that.
INBOUND_PIPELINE: Final = 64
#: After an inbound stream ends, how long its accepted messages have to be completed.
SETTLE_TIMEOUT_S: Final = 10.0
RECEIVE_BYTES: Final = 65536
NS_PING: Final = "urn:xmpp:ping"
#: Stream errors we end an inbound stream with because the peer broke a rule or failed to
#: prove who it is: logged as security events.
REFUSALS: Final = frozenset(
    {
        "policy-violation",
        "not-authorized",
        "invalid-from",
        "host-unknown",
        "invalid-namespace",
        "improper-addressing",
        "unsupported-stanza-type",
        "restricted-xml",
        "not-well-formed",
    }
)


class QueueFullError(RemoteQueueFullError):
    """A domain's durable queue is at ``max_queued_per_domain``."""


class FederationRefusedError(Exception):
    """Federation with a domain is not allowed (``[federation] allow`` / ``deny``)."""


class _LinkFailedError(Exception):
    """An outbound connection attempt failed; ``condition`` is what senders are told."""

    def __init__(self, condition: str, reason: str) -> None:
        super().__init__(reason)
        self.condition = condition
        self.reason = reason


def _now_micros() -> int:
    return time.time_ns() // 1000


class LinkStatus(TypedDict):
    """One destination domain, as ``villaged admin federation`` shows it."""

    queued: int
    ephemeral: int
    connected: bool
    failures: int
    last_error: str | None


@dataclass
class _Ephemeral:
    stanza: ET.Element
    on_failure: Callable[[str], None] | None


@dataclass
class _DomainLink:
    domain: str
    ephemeral: deque[_Ephemeral] = field(default_factory=deque)
    wake: trio.Event = field(default_factory=trio.Event)
    running: bool = False
    progress: bool = False  # a batch was confirmed since the last failure
    failures: int = 0
    last_error: str | None = None
    connected: bool = False

    def poke(self) -> None:
        self.wake.set()


class Federation:
    """The node's federation (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        queue: OutboundQueueView,
        *,
        monitor: security.MonitorService | None = None,
    ) -> None:
        self.config = config
        self.settings: FederationConfig = config.federation
        self.domain = config.server.domain
        self.store = store
        self.queue = queue
        self.monitor = monitor
        self.secret = store.node_secret("dialback")
        self.peers: dict[str, PeerConfig] = {p.domain: p for p in self.settings.peers}
        #: Set by app.py: where authenticated inbound stanzas go, and how a bounce reaches a
        #: local sender.
        self.inbound: Callable[[ET.Element, JID, JID], Awaitable[PendingDelivery | None]] | None = (
            None
        )
        self.bounce_to_sender: Callable[[ET.Element, JID], Awaitable[None]] | None = None
        self._links: dict[str, _DomainLink] = {}
        # Confirmation pings in flight: id -> (domain, set when answered).
        self._confirmations: dict[str, tuple[str, trio.Event]] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._inbound_streams = 0
        self._inbound_per_ip: dict[str, int] = {}
        cert, key, ca = config.tls.cert, config.tls.key, self.settings.ca_file
        self._server_context: SSL.Context = make_s2s_context(
            cert, key, ca_file=ca, server_side=True
        )
        self._client_context: SSL.Context = make_s2s_context(
            cert, key, ca_file=ca, server_side=False
        )

    # ----- what the IM layer calls ------------------------------------------------------------

    def permits(self, domain: str) -> bool:
        return self.settings.enabled and domain != self.domain and self.settings.permits(domain)

    async def enqueue(self, sender: JID, stanza: ET.Element, to: JID) -> Pending:
        """Seal ``stanza`` (from the local ``sender``) into ``to``'s domain queue; the commit to
        wait for before the sender may count it as handled. Call `wake` once it is durable."""
        domain = to.domain
        if not self.permits(domain):
            raise FederationRefusedError(domain)
        if self.queue.count(domain) >= self.settings.max_queued_per_domain:
            raise QueueFullError(domain)
        payload = pack_payload(str(to), stanza)
        body = await self.store.sealed_body(QUEUED_RECORD, str(sender.bare), payload)
        body["d"] = domain
        body["t"] = _now_micros()
        return await self.store.submit(Record(QUEUED_RECORD, body))

    def has_room(self, domain: str) -> bool:
        """Whether ``domain``'s durable queue can take another stanza."""
        return self.queue.count(domain) < self.settings.max_queued_per_domain

    def wake(self, domain: str) -> None:
        """Something is queued for ``domain``: make sure its link runs."""
        self._link(domain).poke()
        self._ensure_running(domain)

    def send_ephemeral(
        self, stanza: ET.Element, to: JID, on_failure: Callable[[str], None] | None = None
    ) -> None:
        """Send a stanza that need not survive a restart (presence, iq); ``on_failure`` hears
        the error condition if it cannot be delivered."""
        if not self.permits(to.domain):
            if on_failure is not None:
                on_failure("remote-server-not-found")
            return
        link = self._link(to.domain)
        if len(link.ephemeral) >= MAX_EPHEMERAL:
            if on_failure is not None:
                on_failure("resource-constraint")
            return
        link.ephemeral.append(_Ephemeral(stanza, on_failure))
        self.wake(to.domain)

    def counts(self) -> dict[str, LinkStatus]:
        """Per destination: queued durable stanzas, waiting ephemeral ones, link state (for
        ``villaged admin federation``)."""
        result: dict[str, LinkStatus] = {}
        for domain in sorted(set(self.queue.domains()) | set(self._links)):
            link = self._links.get(domain)
            result[domain] = {
                "queued": self.queue.count(domain),
                "ephemeral": len(link.ephemeral) if link else 0,
                "connected": bool(link and link.connected),
                "failures": link.failures if link else 0,
                "last_error": link.last_error if link else None,
            }
        return result

    # ----- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (if configured), start the links of queues left from before, then serve
        until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for domain in self.queue.domains():
                self._ensure_running(domain)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._closing = True  # the links are being cancelled: start no new ones

    async def serve(
        self,
        host: str,
        port: int,
        *,
        direct_tls: bool,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        kind = "s2s_tls" if direct_tls else "s2s"
        log.info("listening", extra={"event": "s2s.listening", "listener": kind, "port": port})

        async def handler(tcp: trio.SocketStream) -> None:
            try:
                await self._serve_inbound(tcp, direct_tls=direct_tls)
            except* StorageError:
                raise  # the store has failed: the node stops
            except* Exception:
                # A bug in one stream must not take the listener (and federation) down.
                log.exception("s2s connection failed", extra={"event": "s2s.connection_failed"})

        await trio.serve_listeners(handler, listeners, task_status=task_status)

    # ----- inbound ----------------------------------------------------------------------------

    async def _serve_inbound(self, tcp: trio.SocketStream, *, direct_tls: bool) -> None:
        peer = peer_address(tcp)
        from_peer = self._inbound_per_ip.get(peer, 0)
        if (
            self._inbound_streams >= self.settings.max_inbound_streams
            or from_peer >= MAX_INBOUND_PER_IP
        ):
            _security("too many inbound s2s streams", "s2s.too_many_streams", peer=peer)
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await tcp.aclose()
            return
        self._inbound_streams += 1
        self._inbound_per_ip[peer] = from_peer + 1
        stream = core.S2SStream(
            self._stream_settings(), core.Role.INBOUND, direct_tls=direct_tls, entropy=os.urandom
        )
        connection = _S2SConnection(self, tcp, stream, peer)
        try:
            with trio.move_on_after(self.settings.negotiation_timeout) as negotiation:
                if direct_tls and not await connection.start_tls(server_side=True):
                    return
            if negotiation.cancelled_caught:
                return
            async with trio.open_nursery() as nursery:
                pipeline_in, pipeline_out = trio.open_memory_channel[PendingDelivery | trio.Event](
                    INBOUND_PIPELINE
                )
                completed = trio.Event()
                nursery.start_soon(self._complete_in_order, pipeline_out, completed)
                try:
                    async with pipeline_in:
                        await self._inbound_events(connection, nursery, pipeline_in)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    pass  # the peer went away: what it sent before still takes effect
                with trio.move_on_after(SETTLE_TIMEOUT_S):
                    await completed.wait()  # what the peer sent before it left is delivered
                nursery.cancel_scope.cancel()
        finally:
            self._inbound_streams -= 1
            left = self._inbound_per_ip.pop(peer) - 1
            if left:
                self._inbound_per_ip[peer] = left
            await connection.aclose()

    async def _complete_in_order(
        self,
        pipeline: trio.MemoryReceiveChannel[PendingDelivery | trio.Event],
        completed: trio.Event,
    ) -> None:
        """Complete accepted messages in the order the peer sent them (each waits for its
        record, which it shares with the others of a run); an Event is a barrier the reader
        waits on before a stanza that must see everything earlier take effect."""
        try:
            async for item in pipeline:
                if isinstance(item, trio.Event):
                    item.set()
                    continue
                try:
                    await item.complete()  # (which gives back its reservation if cancelled)
                except StorageError:
                    raise
                except Exception:
                    log.exception("inbound message failed", extra={"event": "s2s.stanza_failed"})
        finally:
            # Cancelled (the stream is over and settling took too long): give back what the
            # rest reserved — before closing the channel, which would discard them — their
            # records are durable all the same.
            while True:
                try:
                    item = pipeline.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if not isinstance(item, trio.Event):
                    item.abandon()
            pipeline.close()
            completed.set()

    async def _inbound_events(
        self,
        connection: _S2SConnection,
        nursery: trio.Nursery,
        pipeline: trio.MemorySendChannel[PendingDelivery | trio.Event],
    ) -> None:
        stream = connection.core
        deadline = trio.current_time() + self.settings.negotiation_timeout
        while True:
            event = await connection.next_event(negotiation_deadline=deadline)
            if isinstance(event, core.TlsRequested):
                if not await connection.start_tls(server_side=True):
                    return
                if not await self._provable(connection):
                    return
            elif isinstance(event, core.DialbackKeyReceived):
                if not self.permits(event.originating):
                    _security(
                        "federation refused",
                        "s2s.refused",
                        domain=event.originating,
                        peer=connection.peer,
                    )
                    stream.dialback_result(event.originating, False)
                    await connection.flush()
                    continue
                nursery.start_soon(self._answer_dialback, connection, event)
            elif isinstance(event, core.Authenticated):
                if not self.permits(event.domain):
                    _security(
                        "federation refused",
                        "s2s.refused",
                        domain=event.domain,
                        peer=connection.peer,
                    )
                    stream.fail("policy-violation", "federation with your domain is not allowed")
                    await connection.flush()
                    return
                connection.deadline_passed = True  # negotiated: only the idle timeout applies
                log.info(
                    "inbound s2s authenticated",
                    extra={
                        "event": "s2s.inbound_authenticated",
                        "domain": event.domain,
                        "method": event.method,
                        "peer": connection.peer,
                    },
                )
            elif isinstance(event, core.StanzaReceived):
                if self._confirms(event.element, event.from_):
                    continue  # an answer to our own ping waits for nothing of the peer's
                if event.element.tag != f"{{{NS_CLIENT}}}message":
                    barrier = trio.Event()  # everything earlier takes effect first
                    await pipeline.send(barrier)
                    await barrier.wait()
                delivery = await self._dispatch_inbound(event.element, event.from_, event.to)
                if delivery is not None:
                    try:
                        await pipeline.send(delivery)  # waits while INBOUND_PIPELINE pending
                    except BaseException:
                        delivery.abandon()
                        raise
            elif isinstance(event, core.StanzaRejected):
                # The core's error reply (a malformed 'to', say) goes back the way answers do:
                # over our own stream to the sender's domain.
                to = JID.parse_or_none(event.reply.get("to"))
                if to is not None:
                    self.send_ephemeral(event.reply, to)
            elif isinstance(event, core.StreamEnded | core.ConnectionLost):
                if isinstance(event, core.StreamEnded) and event.condition in REFUSALS:
                    if not event.by_peer:
                        _security(
                            "s2s stream refused",
                            "s2s.stream_refused",
                            condition=event.condition,
                            text=event.text,
                            peer=connection.peer,
                            domain=connection.core.peer_domain,
                        )
                elif isinstance(event, core.StreamEnded) and event.condition is not None:
                    log.info(
                        "inbound s2s stream ended",
                        extra={
                            "event": "s2s.inbound_ended",
                            "condition": event.condition,
                            "peer": connection.peer,
                            "by_peer": event.by_peer,
                        },
                    )
                return

    async def _provable(self, connection: _S2SConnection) -> bool:
        """After STARTTLS on an inbound stream: can the peer still prove the domain its header
        named? Not if its certificate does not cover it and dialback is off; then the stream
        ends with not-authorized (and a security event) instead of leaving the peer to find
        out that no way to authenticate is offered."""
        domain = connection.core.peer_domain
        certificate = connection.peer_certificate
        if domain is None or self.settings.dialback:
            return True
        if certificate is not None and certificate.covers(domain):
            return True
        why = _certificate_problem(certificate, domain, connection.verify_errors)
        _security(
            "peer certificate refused",
            "s2s.certificate_refused",
            domain=domain,
            peer=connection.peer,
            error=why,
        )
        connection.core.fail("not-authorized", f"{why}, and dialback is not allowed")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await connection.flush()
        return False

    async def _answer_dialback(
        self, connection: _S2SConnection, event: core.DialbackKeyReceived
    ) -> None:
        certificate = connection.peer_certificate
        if certificate is not None and certificate.covers(event.originating):
            valid = True  # XEP-0344: the certificate already proves the domain
        else:
            valid = await self._verify_dialback(event.originating, event.stream_id, event.key)
        if not valid:
            _security(
                "dialback key refused",
                "s2s.dialback_refused",
                domain=event.originating,
                peer=connection.peer,
            )
        connection.core.dialback_result(event.originating, valid)
        await connection.flush()

    async def _dispatch_inbound(
        self, stanza: ET.Element, from_: JID, to: JID
    ) -> PendingDelivery | None:
        """Hand an authenticated stanza to the IM layer; a message comes back accepted but
        not completed (see `_complete_in_order`)."""
        if self._confirms(stanza, from_) or self.inbound is None:
            return None
        try:
            return await self.inbound(stanza, from_, to)
        except StorageError:
            raise
        except Exception:
            log.exception("inbound stanza failed", extra={"event": "s2s.stanza_failed"})
            return None

    def _confirms(self, stanza: ET.Element, from_: JID) -> bool:
        """Whether ``stanza`` answers one of our confirmation pings (it usually comes back on
        the remote server's own stream to us, sometimes on ours); it then ends here."""
        if stanza.tag != f"{{{NS_CLIENT}}}iq" or stanza.get("type") not in ("result", "error"):
            return False
        waiting = self._confirmations.get(stanza.get("id", ""))
        if waiting is None or waiting[0] != from_.domain or from_.local or from_.resource:
            return False
        waiting[1].set()
        return True

    # ----- dialback verification (we are the receiving server) --------------------------------

    async def _verify_dialback(self, domain: str, stream_id: str, key: str) -> bool:
        """Ask ``domain``'s authoritative server whether ``key`` is its key for our stream
        ``stream_id`` (XEP-0220 §2.3)."""
        with trio.move_on_after(VERIFY_TIMEOUT_S):
            try:
                connection = await self._connect(domain, verify_only=True)
            except _LinkFailedError as exc:
                log.info(
                    "dialback verification could not connect",
                    extra={
                        "event": "s2s.dialback_unverified",
                        "domain": domain,
                        "error": exc.reason,
                    },
                )
                return False
            try:
                connection.core.request_verify(stream_id, domain, key)
                await connection.flush()
                while True:
                    event = await connection.next_event()
                    if (
                        isinstance(event, core.DialbackVerifyAnswered)
                        and event.stream_id == stream_id
                    ):
                        return event.valid
                    if isinstance(event, core.StreamEnded | core.ConnectionLost):
                        return False
            finally:
                connection.core.close()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await connection.flush()
                await connection.aclose()
        return False

    # ----- outbound ---------------------------------------------------------------------------

    def _link(self, domain: str) -> _DomainLink:
        link = self._links.get(domain)
        if link is None:
            link = self._links[domain] = _DomainLink(domain)
        return link

    def _ensure_running(self, domain: str) -> None:
        link = self._link(domain)
        if link.running or self._nursery is None or self._closing:
            return
        link.running = True
        self._nursery.start_soon(self._run_link, link)

    def _has_work(self, link: _DomainLink) -> bool:
        return bool(link.ephemeral) or self.queue.count(link.domain) > 0

    async def _run_link(self, link: _DomainLink) -> None:
        try:
            await self._run_link_until_idle(link)
        except* StorageError:
            if trio.current_effective_deadline() != -math.inf:
                raise  # the store has failed: the node stops
            # (else the node is stopping and its log writer with it: nothing has failed)
        except* Exception:
            # A bug in one link must not take federation (and the node) down; its queue stays,
            # and the link tries again after the longest backoff (not in a tight loop).
            log.exception(
                "s2s link failed", extra={"event": "s2s.link_failed", "domain": link.domain}
            )
            await trio.sleep(self.settings.retry_max)
        finally:
            link.running = False
            if self._has_work(link):
                self._ensure_running(link.domain)  # work arrived as the task was ending
            elif not link.ephemeral:
                self._links.pop(link.domain, None)

    async def _run_link_until_idle(self, link: _DomainLink) -> None:
        """Connect and send until nothing is left; every failure — to connect, or of a
        connection that was up (lost, or its confirmation never came) — backs off
        exponentially and bounces what has passed its deadline. The backoff starts over only
        when a batch was confirmed."""
        backoff = float(self.settings.retry_initial)
        while self._has_work(link):
            link.wake = trio.Event()
            failure = await self._connect_and_pump(link)
            if failure is None:
                continue  # idle and closed: the loop ends unless work came meanwhile
            if link.progress:
                link.progress = False
                backoff = float(self.settings.retry_initial)
            link.failures += 1
            link.last_error = failure.reason
            log.info(
                "s2s link failed",
                extra={
                    "event": "s2s.connect_failed",
                    "domain": link.domain,
                    "error": failure.reason,
                    "retry_in": backoff,
                },
            )
            self._fail_ephemeral(link, failure.condition)
            await self._bounce_expired(link.domain, failure.condition)
            if not self._has_work(link):
                break
            await trio.sleep(backoff)
            backoff = min(backoff * 2, float(self.settings.retry_max))

    async def _connect_and_pump(self, link: _DomainLink) -> _LinkFailedError | None:
        """One connection's life: None if it ended because it was idle."""
        try:
            connection = await self._connect(link.domain, verify_only=False)
        except _LinkFailedError as exc:
            return exc
        link.connected = True
        failure: _LinkFailedError | None = None
        try:
            await self._pump(link, connection)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as lost:
            first = lost.exceptions[0]
            reason = f"connection lost: {first or type(first).__name__}"
            failure = _LinkFailedError("remote-server-timeout", reason)
        finally:
            link.connected = False
            await connection.aclose()
        return failure

    async def _pump(self, link: _DomainLink, connection: _S2SConnection) -> None:
        """Send everything for the domain over an authenticated connection until it has been
        idle for ``idle_timeout``."""

        certificate = connection.peer_certificate
        proven = certificate is not None and certificate.covers(link.domain)

        async def read() -> None:
            # No idle timeout here: answers usually come back on the remote's own stream, so
            # a busy link may read nothing for long; the sending side decides when it is idle.
            while True:
                event = await connection.next_event(idle=False)
                if isinstance(event, core.StanzaReceived) and proven:
                    # Our outbound stream carries nothing back unless the peer speaks on it
                    # (bidirectional servers). Taken as inbound only if the remote proved its
                    # domain with its certificate: dialback proved ours, not theirs.
                    delivery = await self._dispatch_inbound(event.element, event.from_, event.to)
                    if delivery is not None:  # rare here: one at a time is fine
                        await delivery.complete()
                elif isinstance(event, core.StreamEnded | core.ConnectionLost):
                    raise trio.BrokenResourceError("the remote server closed the stream")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while True:
                while link.ephemeral:
                    item = link.ephemeral.popleft()
                    connection.core.send_stanza(item.stanza)
                    await connection.flush()
                batch = self.queue.pending(link.domain, BATCH)
                if batch:
                    await self._send_batch(link.domain, batch, connection)
                    continue
                link.wake = trio.Event()
                if self._has_work(link):
                    continue
                with trio.move_on_after(self.settings.idle_timeout):
                    await link.wake.wait()
                if not self._has_work(link):
                    connection.core.close()
                    await connection.flush()
                    nursery.cancel_scope.cancel()
                    return

    async def _send_batch(
        self, domain: str, batch: list[QueuedStanza], connection: _S2SConnection
    ) -> None:
        for entry in batch:
            stanza = self._unsealed(entry)
            if stanza is not None:
                connection.core.send_stanza(stanza)
        ping_id = f"q-{secrets.token_urlsafe(9)}"
        ping = ET.Element(
            f"{{{NS_CLIENT}}}iq",
            {"type": "get", "id": ping_id, "from": self.domain, "to": domain},
        )
        ET.SubElement(ping, f"{{{NS_PING}}}ping")
        confirmed = trio.Event()
        self._confirmations[ping_id] = (domain, confirmed)
        try:
            connection.core.send_stanza(ping)
            await connection.flush()
            with trio.fail_after(CONFIRM_TIMEOUT_S):
                await confirmed.wait()
        finally:
            del self._confirmations[ping_id]
        ids = [entry.record_id for entry in batch]
        await self.store.commit(Record(DONE_RECORD, {"d": domain, "ids": ids, "r": "sent"}))
        link = self._links.get(domain)
        if link is not None:
            link.progress, link.failures, link.last_error = True, 0, None
        log.debug(
            "stanzas delivered",
            extra={"event": "s2s.delivered", "domain": domain, "count": len(ids)},
        )

    def _unsealed(self, entry: QueuedStanza) -> ET.Element | None:
        try:
            return unpack_stanza(self.store.unseal_body(QUEUED_RECORD, entry.body()))
        except ShreddedError:
            return None  # its sender was deleted meanwhile: nothing to send
        except StorageError as exc:
            # Damaged or undecryptable: it cannot be sent or bounced. Say so loudly; it is
            # dropped from the queue with its batch rather than block the domain forever.
            log.error(
                "queued stanza unreadable; dropped",
                extra={
                    "event": "s2s.unreadable",
                    "security": True,
                    "domain": entry.domain,
                    "record": entry.record_id,
                    "error": str(exc)[:200],
                },
            )
            return None

    def _fail_ephemeral(self, link: _DomainLink, condition: str) -> None:
        while link.ephemeral:
            item = link.ephemeral.popleft()
            if item.on_failure is not None:
                item.on_failure(condition)

    async def _bounce_expired(self, domain: str, condition: str) -> None:
        """Bounce durable stanzas older than ``queue_deadline`` to their senders."""
        limit = _now_micros() - self.settings.queue_deadline * 1_000_000
        expired = [e for e in self.queue.pending(domain) if e.stamp <= limit][:1000]
        if not expired:
            return
        for entry in expired:
            stanza = self._unsealed(entry)
            if stanza is None or self.bounce_to_sender is None:
                continue
            sender = JID.parse_or_none(stanza.get("from"))
            if sender is not None and stanza.get("type") != "error":
                text = f"{domain} could not be reached in {self.settings.queue_deadline} s"
                await self.bounce_to_sender(error_reply(stanza, condition, text=text), sender)
        ids = [entry.record_id for entry in expired]
        await self.store.commit(Record(DONE_RECORD, {"d": domain, "ids": ids, "r": "bounced"}))
        log.warning(
            "queued stanzas bounced",
            extra={
                "event": "s2s.bounced",
                "domain": domain,
                "count": len(ids),
                "condition": condition,
            },
        )

    def _record_tls_failure(self) -> None:
        if self.monitor is not None:
            self.monitor.record(security.TLS_FAILURES, security.NODE_WIDE)

    # ----- connecting -------------------------------------------------------------------------

    def _stream_settings(self, peer: PeerConfig | None = None) -> core.S2SSettings:
        limits = xml.XmlLimits(max_stanza_bytes=self.settings.max_stanza_bytes)
        return core.S2SSettings(
            local_domain=self.domain,
            dialback_secret=self.secret,
            limits=limits,
            tls_required=peer.require_tls if peer is not None else True,
            dialback_allowed=self.settings.dialback,
        )

    async def _connect(self, domain: str, *, verify_only: bool) -> _S2SConnection:
        """An outbound stream to ``domain``, authenticated (or, for ``verify_only``, with TLS
        up, ready to ask about a dialback key)."""
        if not self.permits(domain):
            raise _LinkFailedError("remote-server-not-found", "federation not allowed")
        peer = self.peers.get(domain)
        static = {domain: Candidate(peer.host, peer.port, peer.direct_tls)} if peer else None
        try:
            with trio.fail_after(self.settings.connect_timeout):
                candidates = await resolve(domain, static=static)
        except (ResolutionError, trio.TooSlowError) as exc:
            raise _LinkFailedError("remote-server-not-found", f"cannot resolve: {exc}") from None
        last = "no address to connect to"
        for candidate in candidates:
            try:
                with trio.fail_after(self.settings.connect_timeout):
                    tcp = await trio.open_tcp_stream(candidate.host, candidate.port)
            except (OSError, trio.TooSlowError) as exc:
                last = f"{candidate.host}:{candidate.port}: {exc or 'timed out'}"
                continue
            stream = core.S2SStream(
                self._stream_settings(peer),
                core.Role.OUTBOUND,
                remote_domain=domain,
                direct_tls=candidate.direct_tls,
                verify_only=verify_only,
                entropy=os.urandom,
            )
            connection = _S2SConnection(self, tcp, stream, peer_address(tcp), remote=domain)
            ready = False
            try:
                with trio.fail_after(self.settings.negotiation_timeout):
                    ready = await self._negotiate(connection, candidate, verify_only)
                last = connection.failure or "negotiation failed"
            except trio.TooSlowError:
                last = "negotiation timed out"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                last = f"connection lost while negotiating: {exc}"
            finally:
                if not ready:  # (also when cancelled: the socket is closed either way)
                    await connection.aclose()
            if ready:
                return connection
        raise _LinkFailedError("remote-server-timeout", last)

    async def _negotiate(
        self, connection: _S2SConnection, candidate: Candidate, verify_only: bool
    ) -> bool:
        stream = connection.core
        if candidate.direct_tls:
            if not await connection.start_tls(server_side=False):
                return False
            if verify_only:
                return True  # the core asks once features arrive; it never logs in
        stream.start()
        await connection.flush()
        while True:
            event = await connection.next_event()
            if isinstance(event, core.TlsRequested):
                if not await connection.start_tls(server_side=False):
                    return False
                if verify_only:
                    return True
            elif isinstance(event, core.Authenticated):
                return True
            elif isinstance(event, core.AuthenticationFailed):
                connection.failure = f"not authenticated: {event.reason}"
                return False
            elif isinstance(event, core.StreamEnded | core.ConnectionLost):
                condition = getattr(event, "condition", None)
                connection.failure = f"stream ended ({condition or 'closed'})"
                return False


class _S2SConnection:
    """One s2s stream on one transport: bytes in and out of the core, TLS, limits."""

    def __init__(
        self,
        federation: Federation,
        transport: trio.abc.Stream,
        stream: core.S2SStream,
        peer: str,
        *,
        remote: str | None = None,
    ) -> None:
        self.federation = federation
        self.transport = transport
        self.core = stream
        self.peer = peer
        self.remote = remote
        self.peer_certificate: core.PeerCertificate | None = None
        self.verify_errors: list[str] = []
        self.failure: str | None = None
        self.deadline_passed = False
        settings = federation.settings
        self._bucket = TokenBucket(
            settings.bytes_per_second, settings.burst_bytes, trio.current_time()
        )
        self._send_lock = trio.StrictFIFOLock()

    async def start_tls(self, *, server_side: bool) -> bool:
        """Run the TLS handshake the core asked for; False (logged) if it failed or the peer's
        certificate is unacceptable by policy."""
        federation = self.federation
        context = federation._server_context if server_side else federation._client_context
        tls = OpenSSLStream(
            self.transport, context, server_side=server_side, server_hostname=self.remote
        )
        try:
            with trio.fail_after(federation.config.c2s.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            _security(
                "TLS handshake failed",
                "s2s.tls_failed",
                peer=self.peer,
                domain=self.remote,
                error=str(exc)[:200],
            )
            federation._record_tls_failure()
            self.failure = f"TLS handshake failed: {exc}"
            return False
        self.transport = tls
        self.verify_errors = list(tls.verify_errors)
        certificate = tls.peer_certificate()
        peer_cert = (
            core.PeerCertificate(certificate.chain_valid, certificate.domains)
            if certificate is not None
            else None
        )
        self.peer_certificate = peer_cert
        if self.remote is not None and not (
            peer_cert is not None and peer_cert.covers(self.remote)
        ):
            # The server we called cannot prove it is ``remote``. Dialback trusts DNS for that;
            # without dialback this is the end.
            why = _certificate_problem(peer_cert, self.remote, tls.verify_errors)
            if not federation.settings.dialback:
                _security(
                    "remote certificate refused",
                    "s2s.certificate_refused",
                    domain=self.remote,
                    peer=self.peer,
                    error=why,
                )
                self.failure = f"certificate refused: {why}"
                return False
            log.info(
                "remote certificate does not verify; dialback decides",
                extra={"event": "s2s.certificate_unverified", "domain": self.remote, "error": why},
            )
        self.core.tls_established(peer_cert)
        await self.flush()
        return True

    async def flush(self) -> None:
        data = self.core.data_to_send()
        if not data:
            return
        async with self._send_lock:
            with trio.fail_after(self.federation.settings.negotiation_timeout):
                await self.transport.send_all(data)

    async def next_event(
        self, *, negotiation_deadline: float | None = None, idle: bool = True
    ) -> core.Event:
        """The core's next event, reading as it needs data (after the stream has ended, its
        end again). Reads are bounded by the idle timeout (and, until negotiated, by
        ``negotiation_deadline``), and a peer over its byte rate is slowed down."""
        settings = self.federation.settings
        while True:
            event = self.core.next_event()
            await self.flush()
            if event is not core.NEED_DATA:
                assert isinstance(event, core.Event)
                return event
            deadline = trio.current_time() + settings.idle_timeout if idle else math.inf
            if negotiation_deadline is not None and not self.deadline_passed:
                deadline = min(deadline, negotiation_deadline)
            try:
                with trio.fail_at(deadline):
                    data = await self.transport.receive_some(RECEIVE_BYTES)
            except trio.TooSlowError:
                self.core.fail("connection-timeout", "nothing received in time")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.flush()
                return core.StreamEnded("connection-timeout", False, None)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data and not self._bucket.take(len(data), trio.current_time()):
                await trio.sleep(-self._bucket.tokens / self._bucket.rate)  # slow it down
            self.core.receive_data(bytes(data))

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.transport.aclose()


def _certificate_problem(
    certificate: core.PeerCertificate | None, domain: str, errors: list[str]
) -> str:
    if certificate is None:
        return "no certificate"
    if not certificate.chain_valid:
        return "untrusted or expired certificate" + (f" ({errors[0]})" if errors else "")
    return f"certificate not valid for {domain}"


def _security(message: str, event: str, **fields: object) -> None:
    log.warning(message, extra={"event": event, "security": True, **fields})
