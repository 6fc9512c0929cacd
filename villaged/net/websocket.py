"""XMPP over WebSocket (RFC 7395): the TLS listener, its HTTP side, and the message transport.

One task per accepted socket, in the listener's handler nursery, as for c2s:

1. Connections per IP are capped before any TLS work, with the count and the limit c2s uses
   (``C2SContext.connections_per_ip``, ``c2s.max_connections_per_ip``), and the TLS handshake
   waits for a turn of the same per-address limiter (``HANDSHAKES_PER_IP``), all under
   ``c2s.handshake_timeout``.
2. HTTP/1.1 requests are read with h11, each bounded in size (`MAX_REQUEST_BYTES`) and in time
   (``c2s.handshake_timeout`` again). ``GET /.well-known/host-meta`` and ``host-meta.json``
   (XEP-0156) advertise the WebSocket URL; a few such requests may share a connection. An
   upgrade on ``websocket.path`` must come from an allowed origin (else 403) and offer the
   ``xmpp`` subprotocol (else 400: there is no WebSocket yet to carry an XMPP error); wsproto
   checks the rest of the handshake (400, or 426 for another version) and writes the 101.
   Other paths get 404, other methods 405, malformed or oversized requests 400/413/431, a
   request that does not arrive in time 408; after a refusal the connection closes. Every
   refusal is a log event. `answer_request` makes these decisions without I/O.
3. The socket then belongs to a `C2SConnection` over a `WebSocketTransport` (the
   ``MessageTransport`` of net/c2s.py): SASL, limits, rates, pipelining and sessions are all
   c2s's. The per-IP slot is handed over to it rather than counted twice (see `_serve_xmpp`).

`MessageFraming` is the sans-I/O part: wsproto's frame protocol plus what XMPP over WebSocket
allows. Text messages only (a binary one: close 1003); at most ``c2s.max_stanza_bytes`` per
message however it is fragmented (1009); no malformed frames (1002, or 1007 for text that is
not UTF-8); and the bytes that carry no XMPP (frame headers, control frames, empty messages)
are rate-limited like the bytes that do (1008), so a ping flood costs its sender, not us.
Pings from the client are answered (only the latest one, as RFC 6455 allows); the transport
pings the client every ``websocket.ping_interval`` and gives up on it (``connection-timeout``)
when the pong is ``websocket.ping_timeout`` late.

Only the reader reads, and it never writes: what the framing must send on its own account
(pongs, close frames) goes out with the keep-alive task, the next write of messages or
``aclose``, whichever comes first. Writes share one lock, so frames never interleave.
"""

from __future__ import annotations

import base64
import contextlib
import html
import ipaddress
import itertools
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Final

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from villaged.config.model import parse_origin
from villaged.net.c2s import (
    WRITE_TIMEOUT_S,
    C2SConnection,
    TokenBucket,
    TransportRefusedError,
    peer_address,
)
from villaged.ops import monitor

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from wsproto.connection import Connection

    from villaged.config import Config
    from villaged.net.c2s import C2SContext
    from villaged.net.tls import TlsContextSource

log = logging.getLogger("villaged.net.websocket")

SUBPROTOCOL: Final = "xmpp"  # RFC 7395 §3.1
ALPN_HTTP_1_1: Final = "http/1.1"
ALT_CONNECTIONS_REL: Final = "urn:xmpp:alt-connections:websocket"  # XEP-0156
HOST_META_XRD: Final = "/.well-known/host-meta"
HOST_META_JSON: Final = "/.well-known/host-meta.json"
#: Request line and headers (h11's incomplete-event limit), and separately any request body.
MAX_REQUEST_BYTES: Final = 16 * 1024
#: Requests one connection may make before the upgrade (host-meta, then the WebSocket).
MAX_REQUESTS_PER_CONNECTION: Final = 8
READ_CHUNK: Final = 16 * 1024
#: Fragments one message may arrive in: enough for any client, few enough that empty
#: continuation frames cannot keep a connection busy for nothing.
MAX_FRAGMENTS: Final = 1024
#: After our close frame, how long the peer has to answer with its own before TCP closes.
CLOSE_HANDSHAKE_S: Final = 1.0
CLOSE_TIMEOUT_S: Final = 2.0
HOST_META_MAX_AGE_S: Final = 300
_CLIP: Final = 200  # characters of a client's path or origin that go into a log line
_ping_payloads = (f"villaged-{n}".encode() for n in itertools.count(1))


# ----- settings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """What the listener needs from ``[websocket]``, with the defaults that depend on the
    domain and the listener filled in."""

    path: str
    public_url: str
    #: Normalized origins (`parse_origin`), ``scheme://host:*`` patterns, or ``*``.
    allowed_origins: tuple[str, ...]
    ping_interval: float
    ping_timeout: float
    #: Reverse proxies whose ``X-Forwarded-For`` names the client (`forwarded_client`).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    host_meta_xrd: bytes = field(init=False, repr=False)
    host_meta_json: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        href = html.escape(self.public_url, quote=True)
        xrd = (
            "<?xml version='1.0' encoding='utf-8'?>\n"
            "<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
            f"  <Link rel='{ALT_CONNECTIONS_REL}' href='{href}'/>\n"
            "</XRD>\n"
        )
        links = {"links": [{"rel": ALT_CONNECTIONS_REL, "href": self.public_url}]}
        object.__setattr__(self, "host_meta_xrd", xrd.encode())
        object.__setattr__(self, "host_meta_json", (json.dumps(links) + "\n").encode())

    @classmethod
    def from_config(cls, config: Config) -> WebSocketSettings:
        section = config.websocket
        domain = config.server.domain
        bind = config.listeners.websocket.bind
        public_url = section.public_url or default_public_url(
            domain, bind[0].port if bind else 443, section.path
        )
        if section.allowed_origins is None:
            own = (parse_origin(f"https://{domain}"), origin_of(public_url))
            origins = tuple(dict.fromkeys(own))
        else:
            origins = section.allowed_origins
        return cls(
            path=section.path,
            public_url=public_url,
            allowed_origins=origins,
            ping_interval=section.ping_interval,
            ping_timeout=section.ping_timeout,
            trusted_proxies=tuple(ipaddress.ip_network(n) for n in section.trusted_proxies),
        )

    def is_trusted_proxy(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.trusted_proxies)

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header may go ahead. None (no header) is
        not a browser, and a page of another site is what the check is about."""
        if origin is None or "*" in self.allowed_origins:
            return True
        try:
            normalized = parse_origin(origin, patterns=False)
        except ValueError:
            return False  # "null", another scheme, garbage
        any_port = normalized.rpartition(":")[0] + ":*"
        return normalized in self.allowed_origins or any_port in self.allowed_origins


def default_public_url(domain: str, port: int, path: str) -> str:
    """``wss://<domain>:<port><path>``, without the port when it is 443."""
    return f"wss://{domain}{'' if port == 443 else f':{port}'}{path}"


def origin_of(url: str) -> str:
    """The origin a page served from ``url``'s host and port would have (for ``wss://``, the
    ``https://`` one)."""
    authority = url.removeprefix("wss://").split("/", 1)[0]
    return parse_origin(f"https://{authority}", patterns=False)


# ----- the HTTP side (decisions only) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A response that ends the HTTP side (a refusal) or keeps it going (host-meta)."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    keep_alive: bool = False
    #: The log event of a refusal: (event, message).
    refusal: tuple[str, str] | None = None
    security: bool = False


@dataclass(frozen=True, slots=True)
class UpgradeAccepted:
    """The 101 to send; ``connection`` carries the WebSocket from there on."""

    response: bytes
    connection: Connection


def answer_request(
    request: h11.Request, settings: WebSocketSettings
) -> HttpAnswer | UpgradeAccepted:
    """What to do with one request on the WebSocket listener."""
    method = request.method.decode("ascii", "replace")
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if path in (HOST_META_XRD, HOST_META_JSON):
        if method not in ("GET", "HEAD"):
            refusal = _refuse(405, "websocket.method_not_allowed", f"{method} {path[:_CLIP]}")
            return replace(refusal, headers=(*refusal.headers, ("allow", "GET, HEAD")))
        json_wanted = path == HOST_META_JSON
        return HttpAnswer(
            200,
            settings.host_meta_json if json_wanted else settings.host_meta_xrd,
            "application/json" if json_wanted else "application/xrd+xml; charset=utf-8",
            (
                ("access-control-allow-origin", "*"),
                ("cache-control", f"max-age={HOST_META_MAX_AGE_S}"),
            ),
            keep_alive=True,
        )
    if path != settings.path:
        return _refuse(404, "websocket.not_found", f"{method} {path[:_CLIP]}")
    if method != "GET":
        refusal = _refuse(405, "websocket.method_not_allowed", f"{method} {path[:_CLIP]}")
        return replace(refusal, headers=(*refusal.headers, ("allow", "GET")))
    keys = [value for name, value in request.headers if name == b"sec-websocket-key"]
    if len(keys) == 1 and not _valid_websocket_key(keys[0]):
        # RFC 6455 §4.2.1: a base64-encoded 16-byte value (wsproto only checks it is there).
        return _refuse(
            400, "websocket.bad_handshake", "Sec-WebSocket-Key is not 16 bytes of base64"
        )
    origins = [value for name, value in request.headers if name == b"origin"]
    if len(origins) > 1:
        return _refuse(400, "websocket.bad_handshake", "more than one Origin header", True)
    handshake = WSConnection(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(request.headers), request.target)
        offer = next(event for event in handshake.events() if isinstance(event, Request))
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        refusal = _refuse(400, "websocket.bad_handshake", str(exc)[:_CLIP])
        if isinstance(hint, RejectConnection):  # e.g. 426 naming the version we speak
            hint_headers = tuple((n.decode("ascii"), v.decode("ascii")) for n, v in hint.headers)
            if hint.status_code == 426:  # RFC 9110 §15.5.22: say what to upgrade to
                hint_headers = (*hint_headers, ("Upgrade", "websocket"))
            refusal = replace(refusal, status=hint.status_code, headers=hint_headers)
        return refusal
    except (LocalProtocolError, h11.ProtocolError, UnicodeError, StopIteration) as exc:
        return _refuse(400, "websocket.bad_handshake", str(exc)[:_CLIP] or "bad handshake")
    origin = origins[0].decode("ascii", "replace") if origins else None
    if not settings.origin_allowed(origin):
        return _refuse(403, "websocket.origin_refused", f"origin {origin!r:.{_CLIP}}", True)
    if SUBPROTOCOL not in offer.subprotocols:
        offered = ", ".join(offer.subprotocols)[:_CLIP] or "none"
        return _refuse(
            400, "websocket.subprotocol_refused", f"subprotocol xmpp not offered ({offered})"
        )
    response = handshake.send(AcceptConnection(subprotocol=SUBPROTOCOL))
    assert handshake.connection is not None
    return UpgradeAccepted(response, handshake.connection)


def _valid_websocket_key(value: bytes) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except ValueError:
        return False


def _refuse(status: int, event: str, reason: str, security: bool = False) -> HttpAnswer:
    return replace(_plain(status, reason), refusal=(event, reason), security=security)


#: How many X-Forwarded-For entries are looked at (right to left) for the client's address.
MAX_FORWARDED_HOPS: Final = 16


def forwarded_client(
    headers: Sequence[tuple[bytes, bytes]], settings: WebSocketSettings
) -> str | None:
    """The client's address by the ``X-Forwarded-For`` headers of a request that came through
    a trusted proxy: the rightmost entry that is not itself a trusted proxy (entries further
    left were written by the client and prove nothing). None when there is no header, or an
    entry on the way is not an IP address: the request is then refused, never counted against
    the proxy's own address (one attacker would otherwise get the proxy blocked)."""
    entries: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            entries.extend(value.decode("latin-1").split(","))
    if not entries:
        return None
    hops = [entry.strip() for entry in entries[-MAX_FORWARDED_HOPS:]]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            return None
        if not any(ip in network for network in settings.trusted_proxies):
            return str(ip)
    return str(_ip(hops[0]))  # every hop is a trusted proxy: the first one is the client


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it: ``192.0.2.1``, ``192.0.2.1:5678``, ``2001:db8::1`` or
    ``[2001:db8::1]:5678`` (the port, which some proxies add, is dropped)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _plain(status: int, reason: str) -> HttpAnswer:
    return HttpAnswer(status, f"{_reason_phrase(status)}: {reason}\n".encode("utf-8", "replace"))


def _reason_phrase(status: int) -> str:
    return {
        400: "bad request",
        403: "forbidden",
        404: "not found",
        405: "method not allowed",
        408: "request timeout",
        413: "request too large",
        426: "upgrade required",
        431: "request header fields too large",
        503: "service unavailable",
    }.get(status, "error")


# ----- the framing (sans-I/O) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One complete text message, as UTF-8 (never empty: empty messages are skipped)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer's close frame arrived (or its input ended: code 1006). Any answer to it is
    queued already."""

    code: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    """The peer broke a rule; our close frame with ``code`` is queued. ``event`` names the
    log event."""

    code: int
    reason: str
    event: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
FramingEvent = MessageReceived | PeerClosed | Refused


class FramingClosedError(Exception):
    """Messages cannot be sent: the WebSocket is closing or closed."""


class MessageFraming:
    """A WebSocket (a wsproto connection after the handshake) as XMPP over WebSocket uses it.

    Feed received bytes to `receive_data` (``b""`` when the input ended) and take events from
    `next_event`; send messages with `send_messages`. What the framing sends on its own account
    (pongs, close frames) accumulates until `data_to_send`. Time is passed in.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        max_message_bytes: int,
        overhead: TokenBucket,
    ) -> None:
        self._ws = connection
        self._max_message_bytes = max_message_bytes
        self._overhead = overhead
        # A deque: one read of 16 KiB may hold thousands of tiny messages.
        self._events: deque[FramingEvent] = deque()
        # The text message being assembled: one buffer, so its memory is its payload (a
        # list of fragments cost ~40 bytes per 1-byte fragment), and a fragment count.
        self._parts = bytearray()
        self._fragments = 0
        self._pong = b""  # only the answer to the latest ping is kept
        self._control = bytearray()  # close frames
        self._ping_payload: bytes | None = None
        self._closing = False  # a close frame went one way or the other: messages are over
        self._broken = False  # the peer's bytes could not be parsed: nothing more will be
        self._received = 0  # bytes fed in,
        self._delivered = 0  # of which message payload,
        self._charged = 0  # and the rest, charged to `overhead` so far

    @property
    def is_open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN

    @property
    def awaiting_close(self) -> bool:
        """We sent a close frame, and the peer's answer may still come."""
        return self._ws.state is ConnectionState.LOCAL_CLOSING and not self._broken

    @property
    def awaiting_pong(self) -> bool:
        return self._ping_payload is not None

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._pong or self._control)

    def receive_data(self, data: bytes, now: float) -> None:
        if self._ws.state is ConnectionState.CLOSED or self._broken:
            return
        self._received += len(data)
        self._ws.receive_data(data or None)
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._on_text(event)
            elif isinstance(event, BytesMessage):
                self._refuse(
                    CloseReason.UNSUPPORTED_DATA,
                    "binary messages are not XMPP",
                    "websocket.binary_refused",
                )
            elif isinstance(event, Ping):
                if self.is_open:
                    self._pong = self._ws.send(event.response())
            elif isinstance(event, Pong):
                if bytes(event.payload) == self._ping_payload:
                    self._ping_payload = None
            elif isinstance(event, CloseConnection):
                self._on_close(event)
        unaccounted = self._received - self._delivered - self._charged
        if unaccounted > 0:
            self._charged += unaccounted
            if not self._overhead.take(unaccounted, now):
                self._refuse(
                    CloseReason.POLICY_VIOLATION,
                    "too much traffic that is not XMPP",
                    "websocket.rate_limited",
                )

    def next_event(self) -> FramingEvent | _NeedData:
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def send_messages(self, messages: list[bytes]) -> bytes:
        """The frames for ``messages``, one text message each."""
        if not self.is_open:
            raise FramingClosedError("the WebSocket is closing")
        return b"".join(self._ws.send(TextMessage(data=m.decode("utf-8"))) for m in messages)

    def send_ping(self, payload: bytes) -> None:
        if self.is_open:
            self._control += self._ws.send(Ping(payload=payload))
            self._ping_payload = payload

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (nothing if it has started already)."""
        if self.is_open:
            self._closing = True
            self._control += self._ws.send(CloseConnection(code=code, reason=reason))

    def data_to_send(self) -> bytes:
        data = self._pong + self._control
        self._pong = b""
        self._control.clear()
        return bytes(data)

    def _on_text(self, event: TextMessage) -> None:
        if self._closing:
            return  # what arrives after a close frame is not read
        chunk = event.data.encode("utf-8")
        self._delivered += len(chunk)
        if len(self._parts) + len(chunk) > self._max_message_bytes:
            self._refuse(
                CloseReason.MESSAGE_TOO_BIG,
                f"message too big (limit {self._max_message_bytes} bytes)",
                "websocket.message_too_big",
            )
            return
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS:
            self._refuse(
                CloseReason.POLICY_VIOLATION,
                f"more than {MAX_FRAGMENTS} fragments in one message",
                "websocket.too_many_fragments",
            )
            return
        self._parts += chunk
        if event.message_finished:
            message = bytes(self._parts)
            self._parts.clear()
            self._fragments = 0
            if message:  # an empty message carries nothing (and b"" means "closed" upstream)
                self._events.append(MessageReceived(message))

    def _on_close(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.OPEN:
            # wsproto reports what it could not parse as a close with the code to send back.
            self._broken = True
            code = (
                CloseReason.INVALID_FRAME_PAYLOAD_DATA
                if event.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA
                else CloseReason.PROTOCOL_ERROR
            )
            self._refuse(code, event.reason or "protocol error", "websocket.protocol_error")
            return
        self._closing = True
        self._parts.clear()
        if state is ConnectionState.REMOTE_CLOSING:
            self._control += self._ws.send(event.response())  # RFC 6455 §5.5.1: echo it
        elif state is ConnectionState.LOCAL_CLOSING:
            self._broken = True  # garbage while we were closing: stop waiting for an answer
        self._events.append(PeerClosed(int(event.code), event.reason))

    def _refuse(self, code: int, reason: str, event: str) -> None:
        if self._closing:
            return
        self._parts.clear()
        self.close(code, reason)
        self._closing = True
        self._events.append(Refused(int(code), reason, event))


# ----- the transport (trio) ---------------------------------------------------------------

_CLOSE_CODES: Final = {
    "system-shutdown": CloseReason.GOING_AWAY,
    "policy-violation": CloseReason.POLICY_VIOLATION,
}


class WebSocketTransport:
    """A `MessageTransport` for `C2SConnection`: text messages over a WebSocket inside TLS."""

    def __init__(self, stream: trio.abc.Stream, framing: MessageFraming, peer: str) -> None:
        self._stream = stream
        self._framing = framing
        self._peer = peer
        self._send_lock = trio.StrictFIFOLock()
        self._control_wanted = trio.Event()
        self._ended = False  # the reader has seen the end (a close, a refusal)
        self._closed = False

    async def receive_message(self) -> bytes:
        # Cancel-safe: nothing changes across the one checkpoint (the read) but the framing,
        # fed only once the bytes are in hand.
        framing = self._framing
        while True:
            if self._ended:
                raise trio.BrokenResourceError("the WebSocket has ended")
            event = framing.next_event()
            if framing.has_data_to_send:
                self._control_wanted.set()
            if isinstance(event, MessageReceived):
                return event.data
            if isinstance(event, PeerClosed):
                self._ended = True
                log.debug(
                    "peer closed the WebSocket",
                    extra={
                        "event": "websocket.peer_closed",
                        "code": event.code,
                        "peer": self._peer,
                    },
                )
                return b""
            if isinstance(event, Refused):
                self._ended = True
                log.warning(
                    event.reason,
                    extra={
                        "event": event.event,
                        "security": True,
                        "code": event.code,
                        "peer": self._peer,
                    },
                )
                raise TransportRefusedError(event.reason)
            try:
                data = bytes(await self._stream.receive_some(READ_CHUNK))
            except trio.BrokenResourceError:
                data = b""
            framing.receive_data(data, trio.current_time())

    async def send_messages(self, messages: list[bytes]) -> None:
        async with self._send_lock:
            try:
                frames = self._framing.send_messages(messages)
            except FramingClosedError as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            await self._stream.send_all(self._framing.data_to_send() + frames)

    async def keep_alive(
        self, interval: float, pong_timeout: float, on_silent: Callable[[], None]
    ) -> None:
        """Ping every ``interval``; call ``on_silent`` when a pong is ``pong_timeout`` late (or
        a control frame cannot be written for that long). Also sends what the framing queued
        (pongs, close frames). Returns once the transport closes."""
        framing = self._framing
        next_ping = trio.current_time() + interval
        pong_due = math.inf
        while not self.is_closed():
            with trio.move_on_at(pong_due if framing.awaiting_pong else next_ping):
                await self._control_wanted.wait()
            self._control_wanted = trio.Event()
            if self.is_closed():
                return
            now = trio.current_time()
            if framing.awaiting_pong and now >= pong_due:
                self._give_up("no answer to a WebSocket ping", "websocket.ping_timeout", on_silent)
                return
            if not framing.awaiting_pong and now >= next_ping:
                framing.send_ping(next(_ping_payloads))
                pong_due = now + pong_timeout
                next_ping = now + interval
            # A large flush of stanzas may hold the lock: as long as c2s allows a write.
            with trio.move_on_after(max(pong_timeout, WRITE_TIMEOUT_S)) as scope:
                async with self._send_lock:
                    data = framing.data_to_send()
                    try:
                        if data:
                            await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the connection is ending anyway; the reader will see it
            if scope.cancelled_caught and not self.is_closed():
                self._give_up("the client does not read", "websocket.write_timeout", on_silent)
                return
            if not framing.is_open and not framing.has_data_to_send:
                return  # closing: no more pings, and aclose takes it from here

    def is_closed(self) -> bool:
        """Whether `aclose` was called (a method, so that it is read afresh after a wait)."""
        return self._closed

    def _give_up(self, reason: str, event: str, on_silent: Callable[[], None]) -> None:
        log.info(reason, extra={"event": event, "peer": self._peer})
        on_silent()

    async def aclose(self, condition: str | None = None) -> None:
        """A close frame (unless one already went) whose code says why: 1000, or for the
        stream error ``condition`` 1001 (``system-shutdown``, RFC 6455 "going away") or 1008
        (``policy-violation``); a bounded wait for the peer's; then TCP. Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._control_wanted.set()  # the keep-alive task ends
        framing = self._framing
        try:
            with (
                trio.move_on_after(CLOSE_HANDSHAKE_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                framing.close(_CLOSE_CODES.get(condition or "", CloseReason.NORMAL_CLOSURE))
                async with self._send_lock:
                    data = framing.data_to_send()
                    if data:
                        await self._stream.send_all(data)
                while framing.awaiting_close:  # RFC 6455 §7.1.1: the server closes TCP first,
                    data = bytes(await self._stream.receive_some(READ_CHUNK))  # after this
                    framing.receive_data(data, trio.current_time())
                    if not data:
                        break
        finally:
            await self._stream.aclose()


# ----- the listener -----------------------------------------------------------------------


async def serve_websocket(
    ctx: C2SContext,
    settings: WebSocketSettings,
    host: str,
    port: int,
    tls: TlsContextSource,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info(
        "listening",
        extra={
            "event": "websocket.listening",
            "port": port,
            "url": settings.public_url,
            "origins": list(settings.allowed_origins),
        },
    )

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await WebSocketConnection(ctx, settings, stream, tls).run()
        except Exception:
            # A bug in one connection must not take the listener (and every client) down.
            log.exception("connection failed", extra={"event": "websocket.connection_failed"})

    await trio.serve_listeners(handler, listeners, task_status=task_status)


class _BodyTooLargeError(Exception):
    pass


class WebSocketConnection:
    """One accepted socket: TLS, the HTTP requests, then XMPP through `C2SConnection`."""

    def __init__(
        self,
        ctx: C2SContext,
        settings: WebSocketSettings,
        tcp: trio.SocketStream,
        tls: TlsContextSource,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.tcp = tcp
        self.tls = tls
        self.peer = peer_address(tcp)
        self._holds_slot = False
        # A trusted reverse proxy carries many clients: its connections are not counted or
        # blocked by its own address, but by the client's that it forwards (at the upgrade).
        self._via_proxy = settings.is_trusted_proxy(self.peer)

    async def run(self) -> None:
        if not self._via_proxy:
            refusal = self._admit()
            if refusal is not None:
                self._refused(*refusal)
                with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                    cleanup.shield = True
                    await self.tcp.aclose()
                return
        stream: trio.abc.Stream = self.tcp
        try:
            ssl_stream = await self._tls_handshake()
            if ssl_stream is None:
                return
            stream = ssl_stream
            upgrade = await self._serve_http(ssl_stream)
            if upgrade is not None:
                await self._serve_xmpp(ssl_stream, *upgrade)
        finally:
            self._release_slot()
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    # ----- per-address accounting (shared with c2s) ----------------------------------------

    def _admit(self) -> tuple[str, str] | None:
        """Check the block list and take a connection slot for ``self.peer``; None, or why
        not (message, event)."""
        if self.ctx.is_blocked(self.peer):
            return "address blocked by the security monitor", "websocket.blocked"
        self._holds_slot = self.ctx.take_connection_slot(self.peer)
        if not self._holds_slot:
            return "too many connections from one address", "websocket.too_many_connections"
        return None

    def _adopt_forwarded_client(self, request: h11.Request) -> HttpAnswer | None:
        """Through a trusted proxy: the client's address (X-Forwarded-For) becomes this
        connection's peer and is admitted like a direct one; None, or the refusal to send."""
        proxy = self.peer
        client = forwarded_client(request.headers, self.settings)
        if client is None:
            self._refused(
                "no client address from a trusted proxy", "websocket.forwarded_missing", status=400
            )
            return _plain(400, "no client address in X-Forwarded-For")
        self.peer = client
        log.debug(
            "client address from a trusted proxy",
            extra={"event": "websocket.forwarded", "peer": self.peer, "proxy": proxy},
        )
        refusal = self._admit()
        if refusal is None:
            return None
        status = 403 if refusal[1] == "websocket.blocked" else 503
        self._refused(*refusal, status=status)
        return _plain(status, refusal[0])

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.ctx.release_connection_slot(self.peer)

    async def _tls_handshake(self) -> trio.SSLStream[trio.SocketStream] | None:
        # Not https_compatible: we do send close_notify. A browser that leaves without one
        # (most do) makes reads fail, which counts as its EOF.
        try:
            return await self.ctx.tls_handshake(self.tcp, self.tls.context, self.peer)
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else "failed"
            self._refused(f"TLS handshake {reason}", "websocket.tls_failed")
            self.ctx.record_security(monitor.TLS_FAILURES, monitor.NODE_WIDE)
            return None

    # ----- HTTP ------------------------------------------------------------------------------

    async def _serve_http(self, stream: trio.abc.Stream) -> tuple[bytes, Connection] | None:
        """Answer requests until one upgrades: (bytes already received after it, the
        WebSocket); None once the connection is done with."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        timeout = self.ctx.limits.handshake_timeout
        for served in range(MAX_REQUESTS_PER_CONNECTION):
            started = [False]
            try:
                with trio.fail_after(timeout):
                    request = await _read_request(stream, conn, started)
            except trio.TooSlowError:
                # A stalled request hears why; a quiet keep-alive connection just closes.
                if started[0] or not served:
                    self._refused("no request in time", "websocket.request_timeout", False, 408)
                if started[0]:
                    await self._respond(stream, conn, _plain(408, "request timed out"))
                return None
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._refused(f"bad HTTP request: {exc}", "websocket.bad_request", True, status)
                await self._respond(stream, conn, _plain(status, "bad HTTP request"))
                return None
            except _BodyTooLargeError:
                self._refused("request body too large", "websocket.bad_request", True, 413)
                await self._respond(stream, conn, _plain(413, "request body too large"))
                return None
            except trio.BrokenResourceError:
                return None
            if request is None:
                return None
            answer = answer_request(request, self.settings)
            if isinstance(answer, UpgradeAccepted):
                if self._via_proxy and (refusal := self._adopt_forwarded_client(request)):
                    await self._respond(stream, conn, refusal)
                    return None
                with trio.move_on_after(timeout) as scope:
                    try:
                        await stream.send_all(answer.response)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return None  # the client went away before its 101
                if scope.cancelled_caught:
                    return None
                trailing, _ = conn.trailing_data
                log.debug("WebSocket open", extra={"event": "websocket.opened", "peer": self.peer})
                return bytes(trailing), answer.connection
            if answer.refusal is not None:
                event, reason = answer.refusal
                self._refused(reason, event, answer.security, answer.status)
            upgrade_asked = any(name == b"upgrade" for name, _ in request.headers)
            keep_alive = answer.keep_alive and not upgrade_asked
            head = request.method == b"HEAD"
            if not await self._respond(stream, conn, answer, keep_alive=keep_alive, head=head):
                return None
            if not keep_alive:
                return None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None  # the client had not finished its request (or asked to close)
        return None

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        answer: HttpAnswer,
        *,
        keep_alive: bool = False,
        head: bool = False,
    ) -> bool:
        """Send ``answer``; False if that was not possible."""
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            ("x-content-type-options", "nosniff"),
            *answer.headers,
        ]
        if not answer.headers:
            headers.append(("cache-control", "no-store"))
        if not keep_alive:
            headers.append(("connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
            if not head:  # the answer to HEAD has the headers of GET's, and no body
                data += conn.send(h11.Data(data=answer.body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False  # nothing can be answered in the state the request left h11 in
        with trio.move_on_after(self.ctx.limits.handshake_timeout) as scope:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return not scope.cancelled_caught

    # ----- XMPP ------------------------------------------------------------------------------

    async def _serve_xmpp(
        self, stream: trio.abc.Stream, received: bytes, connection: Connection
    ) -> None:
        limits = self.ctx.limits
        now = trio.current_time()
        # One allowance for the client: its XMPP bytes (charged by c2s) and its framing and
        # control traffic (charged here) together stay within [c2s] bytes_per_second.
        bucket = TokenBucket(limits.bytes_per_second, limits.burst_bytes, now)
        framing = MessageFraming(
            connection, max_message_bytes=limits.max_stanza_bytes, overhead=bucket
        )
        if received:
            framing.receive_data(received, now)
        transport = WebSocketTransport(stream, framing, self.peer)
        c2s = C2SConnection(
            self.ctx,
            self.tcp,
            self.tls,
            direct_tls=True,
            framed=transport,
            bucket=bucket,
            peer=self.peer,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                transport.keep_alive,
                self.settings.ping_interval,
                self.settings.ping_timeout,
                partial(c2s.terminate, "connection-timeout", "no answer to WebSocket pings"),
            )
            # Hand our per-address slot over to C2SConnection.run, which takes one before its
            # first checkpoint: no other connection can slip in between, and this one is
            # never counted twice.
            self._release_slot()
            await c2s.run()
            nursery.cancel_scope.cancel()

    def _refused(
        self, message: str, event: str, security: bool = True, status: int | None = None
    ) -> None:
        extra: dict[str, object] = {"event": event, "peer": self.peer}
        if status is not None:
            extra["status"] = status  # the HTTP status the client was answered with
        if security:
            extra["security"] = True
        (log.warning if security else log.info)(message, extra=extra)


async def _read_request(
    stream: trio.abc.Stream, conn: h11.Connection, started: list[bool]
) -> h11.Request | None:
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            started[0] = started[0] or bool(data)
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)  # read and dropped: nothing here takes a body
            if body > MAX_REQUEST_BYTES:
                raise _BodyTooLargeError
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
