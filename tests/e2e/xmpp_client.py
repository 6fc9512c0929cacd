"""Real XMPP clients for end-to-end tests: slixmpp (asyncio), driven from trio tests.

This module owns the bridge between pytest-trio tests and slixmpp.

Threading model
---------------
Each `XmppTestClient` runs an asyncio event loop in a thread of its own and, once connected, one
slixmpp ``ClientXMPP`` on that loop. Nothing on that thread touches trio and nothing outside it
touches slixmpp: every action is a coroutine scheduled on the client's loop with
``asyncio.run_coroutine_threadsafe``, and what comes back is immutable plain data (the frozen
dataclasses below) or an exception. `_Session` is the only code that sees slixmpp objects, so
slixmpp's loosely typed API (``Any``) stays inside it.

There are two ways to call a client:

* `XmppTestClient`: blocking, thread-safe methods, each bounded by its ``timeout`` (a blocked
  thread cannot be cancelled from outside, so the bound travels with the call; on expiry the
  action is cancelled on the client's loop and TimeoutError is raised). From trio:
  ``await trio.to_thread.run_sync(client.ping, "localhost")``.
* `TrioXmppClient` (made by `open_xmpp_client`): the same actions as ``async`` methods without
  timeouts: the caller bounds them with ``trio.fail_after``, and a trio cancellation also cancels
  the action's asyncio task, so a cancelled wait leaves nothing behind.

A connection goes only where it is told: the host must be a loopback IP literal, DNS (SRV or
A) is never consulted, see-other-host redirects are refused, and the server certificate must
verify against the given CA file alone and name the JID's domain.

Everything the server sends is seen raw, before slixmpp's own handlers (which would, say, fill
in a missing ``to``). Messages, presences and roster pushes are recorded in arrival order in
bounded inboxes; a ``wait_*`` call takes the oldest record its predicate accepts and leaves the
rest for later calls. Predicates run on the client's thread and must only look at the record.
A wait fails instead of blocking when nothing can arrive any more: after the connection closed,
or after its inbox overflowed or a stanza could not be read (so data is never lost silently).
slixmpp's automatic subscription handling is off: tests answer subscription requests
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

import slixmpp
import trio
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import tostring

if TYPE_CHECKING:
    import concurrent.futures
    import datetime as dt
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
    from pathlib import Path
    from types import TracebackType

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ArchivedMessage",
    "AuthFailedError",
    "ClientClosedError",
    "ConnectFailedError",
    "DiscoIdentity",
    "DiscoInfo",
    "Disconnection",
    "InboxError",
    "MamPage",
    "NoReplyError",
    "NotConnectedError",
    "ReceivedMessage",
    "ReceivedPresence",
    "RosterItem",
    "RosterPush",
    "StanzaError",
    "StanzaId",
    "TlsVerificationError",
    "TrioXmppClient",
    "XmppHarnessError",
    "XmppTestClient",
    "open_xmpp_client",
]

T = TypeVar("T")
RecordT = TypeVar("RecordT")

#: Default bound of each blocking `XmppTestClient` call.
DEFAULT_TIMEOUT_S: Final = 10.0
_THREAD_START_TIMEOUT_S: Final = 5.0
_THREAD_STOP_TIMEOUT_S: Final = 5.0
# close() first tries a clean stream close for this long, then aborts the connection.
_CLOSE_DISCONNECT_WAIT_S: Final = 1.0
# disconnect(): how long slixmpp waits for the server's </stream:stream> before aborting.
_STREAM_CLOSE_WAIT_S: Final = 5.0
# Unclaimed records per inbox; a test that lets more pile up is told so by its next wait.
_INBOX_LIMIT: Final = 1000
_PLUGINS: Final = (
    "xep_0030",  # disco
    "xep_0059",  # result set management (MAM paging)
    "xep_0199",  # ping
    "xep_0092",  # software version (answers the server's queries)
    "xep_0280",  # carbons
    "xep_0313",  # message archive management
    "xep_0054",  # vcard-temp
    "xep_0049",  # private XML storage
    "xep_0359",  # unique and stable stanza ids
    "xep_0191",  # blocking command
)
# slixmpp's disconnect reason when the server closed its stream (no event says so otherwise).
_SLIXMPP_END_OF_STREAM: Final = "End of stream"

_CLIENT_NS: Final = "jabber:client"
_ROSTER_NS: Final = "jabber:iq:roster"
_STANZAS_NS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
_SID_NS: Final = "urn:xmpp:sid:0"
_CARBONS_NS: Final = "urn:xmpp:carbons:2"
_FORWARD_NS: Final = "urn:xmpp:forward:0"
_DELAY_NS: Final = "urn:xmpp:delay"
_MAM_NS: Final = "urn:xmpp:mam:2"
_RSM_NS: Final = "http://jabber.org/protocol/rsm"
_DISCO_INFO_NS: Final = "http://jabber.org/protocol/disco#info"
_VCARD_NS: Final = "vcard-temp"
_PRIVATE_NS: Final = "jabber:iq:private"
_BLOCKING_NS: Final = "urn:xmpp:blocking"
_ACCESS_NS: Final = "urn:villaged:access:0"


# --- errors -------------------------------------------------------------------------------------


class XmppHarnessError(Exception):
    """Base of everything this module raises about the XMPP conversation."""


class ConnectFailedError(XmppHarnessError):
    """No session: connection refused, TLS failure, or the stream ended before session start."""


class TlsVerificationError(ConnectFailedError):
    """The server's certificate did not verify against the CA file, or did not name the domain."""


class AuthFailedError(XmppHarnessError):
    """The server refused our credentials (SASL ``<failure/>``); ``condition`` says how."""

    def __init__(self, condition: str) -> None:
        super().__init__(f"authentication failed: {condition}")
        self.condition = condition


class NotConnectedError(XmppHarnessError):
    """The action needs a live session and there is none (any more)."""


class ClientClosedError(XmppHarnessError):
    """The client's thread has been stopped by `XmppTestClient.close`."""


class NoReplyError(XmppHarnessError):
    """slixmpp gave up waiting for the answer to an iq."""


class InboxError(XmppHarnessError):
    """Received stanzas were lost (inbox overflow) or could not be read."""


class StanzaError(XmppHarnessError):
    """The server answered with a stanza error (RFC 6120 §8.3)."""

    def __init__(self, condition: str, error_type: str, text: str | None, xml: str) -> None:
        super().__init__(f"{error_type}/{condition}" + (f": {text}" if text else ""))
        self.condition = condition
        self.error_type = error_type
        self.text = text
        self.xml = xml


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StanzaId:
    """A XEP-0359 ``<stanza-id/>``: ``id`` assigned by the entity ``by``."""

    id: str
    by: str


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A ``<message/>`` as received. ``type`` is ``normal`` when absent; for a XEP-0280 carbon,
    ``carbon`` is ``received``/``sent`` and ``forwarded`` the copied message."""

    from_: str
    to: str
    type: str
    body: str | None
    id: str | None
    stanza_ids: tuple[StanzaId, ...]
    carbon: Literal["received", "sent"] | None
    forwarded: ReceivedMessage | None
    xml: str

    def stanza_id(self, by: str) -> str | None:
        """The stanza id that ``by`` (a bare JID, or the domain) assigned, if any."""
        return next((sid.id for sid in self.stanza_ids if sid.by == by), None)


@dataclass(frozen=True, slots=True)
class ReceivedPresence:
    """A ``<presence/>`` as received; ``type`` is ``available`` when absent, ``priority`` 0."""

    from_: str
    to: str
    type: str
    show: str | None
    status: str | None
    priority: int
    xml: str


@dataclass(frozen=True, slots=True)
class RosterItem:
    jid: str
    name: str | None
    subscription: str
    ask: str | None
    groups: frozenset[str]


@dataclass(frozen=True, slots=True)
class RosterPush:
    """A roster push (an ``<iq type='set'>`` from the server with ``jabber:iq:roster``)."""

    items: tuple[RosterItem, ...]
    version: str | None
    xml: str


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    """One XEP-0313 result: its archive id, the XEP-0203 delay stamp and the message."""

    archive_id: str
    stamp: str | None
    message: ReceivedMessage


@dataclass(frozen=True, slots=True)
class MamPage:
    """One page of a MAM query, oldest first, with the ``<fin/>``'s RSM data."""

    messages: tuple[ArchivedMessage, ...]
    first: str | None
    last: str | None
    complete: bool
    count: int | None


@dataclass(frozen=True, slots=True)
class DiscoIdentity:
    category: str
    type: str
    name: str | None


@dataclass(frozen=True, slots=True)
class DiscoInfo:
    identities: frozenset[DiscoIdentity]
    features: frozenset[str]


@dataclass(frozen=True, slots=True)
class Disconnection:
    """How a session ended. ``server_closed_stream``: the server sent ``</stream:stream>``
    (in answer to ours, when ``by_us``); ``stream_error``: the condition of a
    ``<stream:error/>`` it sent first, if any; ``reason``: slixmpp's account, for messages."""

    by_us: bool
    server_closed_stream: bool
    stream_error: str | None
    reason: str | None


# --- reading stanzas (plain ElementTree, no slixmpp) --------------------------------------------


def _xml(element: ET.Element) -> str:
    return tostring(element)


def _child_text(element: ET.Element, tag: str) -> str | None:
    child = element.find(tag)
    return None if child is None else child.text or ""


def _read_message(element: ET.Element) -> ReceivedMessage:
    carbon: Literal["received", "sent"] | None = None
    forwarded: ReceivedMessage | None = None
    for kind in ("received", "sent"):
        inner = element.find(
            f"{{{_CARBONS_NS}}}{kind}/{{{_FORWARD_NS}}}forwarded/{{{_CLIENT_NS}}}message"
        )
        if inner is not None:
            carbon = "received" if kind == "received" else "sent"
            forwarded = _read_message(inner)
    return ReceivedMessage(
        from_=element.get("from", ""),
        to=element.get("to", ""),
        type=element.get("type", "normal"),
        body=_child_text(element, f"{{{_CLIENT_NS}}}body"),
        id=element.get("id"),
        stanza_ids=tuple(
            StanzaId(id=sid.get("id", ""), by=sid.get("by", ""))
            for sid in element.findall(f"{{{_SID_NS}}}stanza-id")
        ),
        carbon=carbon,
        forwarded=forwarded,
        xml=_xml(element),
    )


def _read_presence(element: ET.Element) -> ReceivedPresence:
    priority = _child_text(element, f"{{{_CLIENT_NS}}}priority")
    return ReceivedPresence(
        from_=element.get("from", ""),
        to=element.get("to", ""),
        type=element.get("type", "available"),
        show=_child_text(element, f"{{{_CLIENT_NS}}}show"),
        status=_child_text(element, f"{{{_CLIENT_NS}}}status"),
        priority=0 if priority is None else int(priority),  # ValueError: the inbox reports it
        xml=_xml(element),
    )


def _read_roster_items(query: ET.Element) -> tuple[RosterItem, ...]:
    return tuple(
        RosterItem(
            jid=item.get("jid", ""),
            name=item.get("name"),
            subscription=item.get("subscription", "none"),
            ask=item.get("ask"),
            groups=frozenset(group.text or "" for group in item.findall(f"{{{_ROSTER_NS}}}group")),
        )
        for item in query.findall(f"{{{_ROSTER_NS}}}item")
    )


def _read_archived(result: ET.Element) -> ArchivedMessage:
    forwarded = result.find(f"{{{_FORWARD_NS}}}forwarded")
    message = None if forwarded is None else forwarded.find(f"{{{_CLIENT_NS}}}message")
    if forwarded is None or message is None:
        raise InboxError(f"MAM result without a forwarded message: {_xml(result)}")
    delay = forwarded.find(f"{{{_DELAY_NS}}}delay")
    return ArchivedMessage(
        archive_id=result.get("id", ""),
        stamp=None if delay is None else delay.get("stamp"),
        message=_read_message(message),
    )


def _read_stanza_error(stanza: ET.Element) -> StanzaError:
    error = stanza.find(f"{{{_CLIENT_NS}}}error")
    if error is None:
        return StanzaError("undefined-condition", "cancel", "no <error/> child", _xml(stanza))
    condition = next(
        (
            child.tag.partition("}")[2]
            for child in error
            if child.tag.startswith(f"{{{_STANZAS_NS}}}") and not child.tag.endswith("}text")
        ),
        "undefined-condition",
    )
    return StanzaError(
        condition,
        error.get("type", ""),
        _child_text(error, f"{{{_STANZAS_NS}}}text"),
        _xml(stanza),
    )


def _query(result: ET.Element, tag: str) -> ET.Element:
    query = result.find(tag)
    if query is None:
        raise XmppHarnessError(f"expected {tag} in the result: {_xml(result)}")
    return query


# --- inboxes ------------------------------------------------------------------------------------


class _Inbox(Generic[RecordT]):
    """Records of one kind, oldest first. Lives on the client's loop."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._records: list[RecordT] = []
        self._failure: tuple[type[XmppHarnessError], str] | None = None
        self._arrival = asyncio.Event()

    def put(self, record: RecordT) -> None:
        if len(self._records) >= _INBOX_LIMIT:
            self.fail(InboxError, f"over {_INBOX_LIMIT} unclaimed {self._kind}s, later ones lost")
        else:
            self._records.append(record)
            self._wake()

    def fail(self, error_type: type[XmppHarnessError], text: str) -> None:
        """From now on a wait that finds nothing raises ``error_type(text)``; the first wins."""
        if self._failure is None:
            self._failure = (error_type, text)
        self._wake()

    def _wake(self) -> None:
        self._arrival.set()
        self._arrival = asyncio.Event()

    async def take(self, predicate: Callable[[RecordT], bool] | None) -> RecordT:
        while True:
            for index, record in enumerate(self._records):
                if predicate is None or predicate(record):
                    del self._records[index]
                    return record
            if self._failure is not None:
                error_type, text = self._failure
                raise error_type(f"waiting for a {self._kind}: {text}")
            await self._arrival.wait()


# --- the slixmpp side (runs on the client's loop) -----------------------------------------------


def _require_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback IP address, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"host must be a loopback IP address, not {host!r}")


def _client_tls_context(ca_file: Path) -> ssl.SSLContext:
    """Trusts exactly ``ca_file``; certificate and host name checks on (the defaults)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
        raise RuntimeError("the default TLS client context no longer verifies certificates")
    return context


def _connect_error(error: object) -> ConnectFailedError:
    if isinstance(error, ssl.SSLCertVerificationError):
        return TlsVerificationError(f"server certificate not accepted: {error}")
    if isinstance(error, ssl.SSLError):
        return ConnectFailedError(f"TLS handshake failed: {error}")
    return ConnectFailedError(f"connection failed: {error!r}")


class _Session:
    """One slixmpp ``ClientXMPP`` and what it received. Used only on the client's loop."""

    def __init__(
        self, *, jid: str, password: str, ssl_context: ssl.SSLContext, direct_tls: bool
    ) -> None:
        # The ssl_context replaces slixmpp's default (which also trusts the system CAs);
        # slixmpp passes server_hostname=<JID domain> to both direct TLS and STARTTLS.
        xmpp: Any = slixmpp.ClientXMPP(jid, password, ssl_context=ssl_context)
        # With an explicit address slixmpp tries every enabled method on it in turn; enable
        # exactly the one asked for so that a failure is that method's failure.
        xmpp.enable_direct_tls = direct_tls
        xmpp.enable_starttls = not direct_tls
        xmpp.enable_plaintext = False
        xmpp.use_aiodns = False
        xmpp.max_redirects = -1  # slixmpp follows see-other-host while attempts > max is false
        xmpp.whitespace_keepalive = False
        xmpp.auto_authorize = None  # no automatic answers to subscription requests
        xmpp.auto_subscribe = False
        for plugin in _PLUGINS:
            xmpp.register_plugin(plugin)
        xmpp.add_filter("in", self._see_incoming)
        xmpp.add_event_handler("stream_error", self._on_stream_error)
        xmpp.add_event_handler("disconnected", self._on_disconnected)
        self._xmpp = xmpp
        self.messages: _Inbox[ReceivedMessage] = _Inbox("message")
        self.presences: _Inbox[ReceivedPresence] = _Inbox("presence")
        self.roster_pushes: _Inbox[RosterPush] = _Inbox("roster push")
        self.bound_jid: str | None = None
        self.live = False
        self.disconnection: Disconnection | None = None
        self._by_us = False
        self._stream_error: str | None = None
        self._disconnected = asyncio.Event()
        self._mam_results: dict[str, list[ET.Element]] = {}

    # -- incoming

    def _see_incoming(self, stanza: Any) -> Any:
        """slixmpp 'in' filter: every incoming stanza, raw, in order, before any handler."""
        element: ET.Element = stanza.xml
        try:
            self._record(element)
        except Exception as exc:  # a filter must not raise into slixmpp's parser
            inbox: _Inbox[ReceivedMessage] | _Inbox[ReceivedPresence] | _Inbox[RosterPush]
            if element.tag == f"{{{_CLIENT_NS}}}message":
                inbox = self.messages
            elif element.tag == f"{{{_CLIENT_NS}}}presence":
                inbox = self.presences
            else:
                inbox = self.roster_pushes
            inbox.fail(InboxError, f"could not read {_xml(element)}: {exc!r}")
        return stanza

    def _record(self, element: ET.Element) -> None:
        if element.tag == f"{{{_CLIENT_NS}}}message":
            result = element.find(f"{{{_MAM_NS}}}result")
            collected = None if result is None else self._mam_results.get(result.get("queryid", ""))
            if result is not None and collected is not None:
                collected.append(result)
            else:
                self.messages.put(_read_message(element))
        elif element.tag == f"{{{_CLIENT_NS}}}presence":
            self.presences.put(_read_presence(element))
        elif element.tag == f"{{{_CLIENT_NS}}}iq" and element.get("type") == "set":
            query = element.find(f"{{{_ROSTER_NS}}}query")
            if query is not None:  # slixmpp's own handler sends the result (or the error)
                self.roster_pushes.put(
                    RosterPush(_read_roster_items(query), query.get("ver"), _xml(element))
                )

    def _on_stream_error(self, error: Any) -> None:
        self._stream_error = str(error["condition"])

    def _on_disconnected(self, reason: Any) -> None:
        self.live = False
        if self.disconnection is None:
            self.disconnection = Disconnection(
                by_us=self._by_us,
                server_closed_stream=reason == _SLIXMPP_END_OF_STREAM,
                stream_error=self._stream_error,
                reason=None if reason is None else str(reason),
            )
            text = f"connection closed ({self.disconnection})"
            for inbox in (self.messages, self.presences, self.roster_pushes):
                inbox.fail(NotConnectedError, text)
        self._disconnected.set()

    # -- connection

    async def connect(self, host: str, port: int) -> str:
        xmpp = self._xmpp
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(error: XmppHarnessError | None) -> None:
            if outcome.done():
                return
            if error is None:
                outcome.set_result(None)
            else:
                outcome.set_exception(error)

        def on_closed(reason: Any) -> None:
            if isinstance(reason, Exception):  # e.g. a failed STARTTLS handshake
                settle(_connect_error(reason))
                return
            error = f" after stream error {self._stream_error}" if self._stream_error else ""
            settle(ConnectFailedError(f"stream closed before session start{error}: {reason}"))

        handlers: dict[str, Callable[[Any], None]] = {
            "session_start": lambda _: settle(None),
            "failed_auth": lambda failure: settle(AuthFailedError(str(failure["condition"]))),
            "connection_failed": lambda error: settle(_connect_error(error)),
            # STARTTLS handshake failures; slixmpp disconnects by itself only when unhandled.
            "ssl_invalid_chain": lambda error: settle(_connect_error(error)),
            "disconnected": on_closed,
        }
        for name, handler in handlers.items():
            xmpp.add_event_handler(name, handler)
        try:
            xmpp.connect(host, port)  # an explicit address: no DNS lookups at all
            await outcome
            if xmpp.transport.get_extra_info("ssl_object") is None:
                raise ConnectFailedError("the session started without TLS")
        except BaseException:
            self.abort()
            raise
        finally:
            for name, handler in handlers.items():
                xmpp.del_event_handler(name, handler)
        self.live = True
        self.bound_jid = str(xmpp.boundjid)
        return self.bound_jid

    async def disconnect(self) -> Disconnection:
        if self.disconnection is None:
            if not self.live:
                raise NotConnectedError("not connected")
            self._by_us = True
            await self._xmpp.disconnect(wait=_STREAM_CLOSE_WAIT_S)  # sends </stream:stream>
        return await self.wait_disconnected()

    async def wait_disconnected(self) -> Disconnection:
        await self._disconnected.wait()
        if self.disconnection is None:
            raise AssertionError("disconnected without a record of it")
        return self.disconnection

    def abort(self) -> None:
        """Drop the connection (or the attempt) now."""
        self._by_us = True
        self._xmpp.cancel_connection_attempt()
        self._xmpp.abort()

    def _require_live(self) -> None:
        if not self.live:
            raise NotConnectedError(f"not connected ({self.disconnection or 'never was'})")

    # -- sending

    async def _reply(self, request: Awaitable[Any]) -> ET.Element:
        """The result of an iq request (slixmpp's future for it), as XML. Raises `StanzaError`
        for an error reply, and `NotConnectedError` at once if the connection ends first."""
        reply = asyncio.ensure_future(request)
        closed = asyncio.ensure_future(self._disconnected.wait())
        try:
            await asyncio.wait((reply, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not reply.done():
                reply.cancel()
        if reply.cancelled():
            raise NotConnectedError(f"no answer before the end: {self.disconnection}")
        try:
            result = reply.result()
        except IqError as error:
            raise _read_stanza_error(error.iq.xml) from None
        except IqTimeout:
            raise NoReplyError("slixmpp gave up waiting for the answer") from None
        element: ET.Element = result.xml
        return element

    async def _iq(self, iq_type: str, payload: ET.Element, to: str | None = None) -> ET.Element:
        self._require_live()
        iq = self._xmpp.Iq()
        iq["type"] = iq_type
        if to is not None:
            iq["to"] = to
        iq.append(payload)
        return await self._reply(iq.send())

    async def send_message(self, to: str, body: str, mtype: str, id_: str | None) -> str:
        self._require_live()
        message = self._xmpp.make_message(mto=to, mbody=body, mtype=mtype)
        message["id"] = id_ if id_ is not None else self._xmpp.new_id()
        message.send()
        return str(message["id"])

    async def send_presence(
        self,
        show: str | None,
        status: str | None,
        priority: int | None,
        to: str | None,
        type_: str | None,
    ) -> None:
        self._require_live()
        presence = self._xmpp.Presence(sto=to, stype=type_)
        if show is not None:
            presence["show"] = show
        if status is not None:
            presence["status"] = status
        if priority is not None:
            presence["priority"] = priority
        presence.send()

    async def send_raw(self, data: str) -> None:
        self._require_live()
        self._xmpp.send_raw(data)

    # -- requests

    async def get_roster(self) -> dict[str, RosterItem]:
        result = await self._iq("get", ET.Element(f"{{{_ROSTER_NS}}}query"))
        items = _read_roster_items(_query(result, f"{{{_ROSTER_NS}}}query"))
        return {item.jid: item for item in items}

    async def set_roster_item(self, jid: str, name: str | None, groups: tuple[str, ...]) -> None:
        query = ET.Element(f"{{{_ROSTER_NS}}}query")
        item = ET.SubElement(query, f"{{{_ROSTER_NS}}}item", {"jid": jid})
        if name is not None:
            item.set("name", name)
        for group in groups:
            ET.SubElement(item, f"{{{_ROSTER_NS}}}group").text = group
        await self._iq("set", query)

    async def remove_roster_item(self, jid: str) -> None:
        query = ET.Element(f"{{{_ROSTER_NS}}}query")
        ET.SubElement(query, f"{{{_ROSTER_NS}}}item", {"jid": jid, "subscription": "remove"})
        await self._iq("set", query)

    async def enable_carbons(self) -> None:
        self._require_live()
        await self._reply(self._xmpp.plugin["xep_0280"].enable())

    async def mam_query(
        self,
        with_: str | None,
        start: dt.datetime | None,
        end: dt.datetime | None,
        max_: int | None,
        after: str | None,
        before: str | None,
    ) -> MamPage:
        self._require_live()
        # The query is built with the xep_0313/xep_0059 stanza plugins, but results are collected
        # here: slixmpp's retrieve() turns every RSM value into a string, so it cannot send the
        # empty <before/> that asks for the last page.
        iq = self._xmpp.make_iq_set()
        query_id = str(iq["id"])
        iq["mam"]["queryid"] = query_id
        if with_ is not None:
            iq["mam"]["with"] = slixmpp.JID(with_)
        if start is not None:
            iq["mam"]["start"] = start
        if end is not None:
            iq["mam"]["end"] = end
        if max_ is not None:
            iq["mam"]["rsm"]["max"] = str(max_)
        if after is not None:
            iq["mam"]["rsm"]["after"] = after
        if before is not None:
            iq["mam"]["rsm"]["before"] = before or True  # "": the last page
        collected: list[ET.Element] = []
        self._mam_results[query_id] = collected
        try:
            result = await self._reply(iq.send())
        finally:
            del self._mam_results[query_id]
        fin = _query(result, f"{{{_MAM_NS}}}fin")
        count = _child_text(fin, f"{{{_RSM_NS}}}set/{{{_RSM_NS}}}count")
        return MamPage(
            messages=tuple(_read_archived(element) for element in collected),
            first=_child_text(fin, f"{{{_RSM_NS}}}set/{{{_RSM_NS}}}first"),
            last=_child_text(fin, f"{{{_RSM_NS}}}set/{{{_RSM_NS}}}last"),
            complete=fin.get("complete") in ("true", "1"),
            count=None if count is None else int(count),
        )

    async def disco_info(self, jid: str) -> DiscoInfo:
        self._require_live()
        disco = self._xmpp.plugin["xep_0030"]
        result = await self._reply(disco.get_info(jid=jid, local=False, cached=False))
        query = _query(result, f"{{{_DISCO_INFO_NS}}}query")
        return DiscoInfo(
            identities=frozenset(
                DiscoIdentity(
                    identity.get("category", ""), identity.get("type", ""), identity.get("name")
                )
                for identity in query.findall(f"{{{_DISCO_INFO_NS}}}identity")
            ),
            features=frozenset(
                feature.get("var", "") for feature in query.findall(f"{{{_DISCO_INFO_NS}}}feature")
            ),
        )

    async def ping(self, jid: str) -> float:
        self._require_live()
        # send_ping, not ping(): ping() counts an error from our own server as a pong.
        started = time.monotonic()
        await self._reply(self._xmpp.plugin["xep_0199"].send_ping(jid))
        return time.monotonic() - started

    async def get_vcard(self, jid: str | None) -> dict[str, str]:
        # Built by hand: xep_0054's get_vcard() answers from a local cache for our own JID.
        result = await self._iq("get", ET.Element(f"{{{_VCARD_NS}}}vCard"), to=jid)
        vcard = result.find(f"{{{_VCARD_NS}}}vCard")
        if vcard is None:
            return {}
        return {child.tag.partition("}")[2]: child.text or "" for child in vcard if len(child) == 0}

    async def set_vcard(self, fields: Mapping[str, str]) -> None:
        vcard = ET.Element(f"{{{_VCARD_NS}}}vCard")
        for name, value in fields.items():
            ET.SubElement(vcard, f"{{{_VCARD_NS}}}{name}").text = value
        await self._iq("set", vcard)

    async def private_store(self, payload_xml: str) -> None:
        # Built by hand: xep_0049's store() accepts only payloads registered as stanza classes.
        query = ET.Element(f"{{{_PRIVATE_NS}}}query")
        query.append(ET.fromstring(payload_xml))  # noqa: S314 (the test's own XML)
        await self._iq("set", query)

    async def private_get(self, name: str, namespace: str) -> str:
        query = ET.Element(f"{{{_PRIVATE_NS}}}query")
        ET.SubElement(query, f"{{{namespace}}}{name}")
        result = await self._iq("get", query)
        stored = _query(result, f"{{{_PRIVATE_NS}}}query").find(f"{{{namespace}}}{name}")
        if stored is None:
            raise XmppHarnessError(f"no {{{namespace}}}{name} in {_xml(result)}")
        return _xml(stored)

    async def get_blocklist(self) -> tuple[str, ...]:
        self._require_live()
        result = await self._reply(self._xmpp.plugin["xep_0191"].get_blocked())
        blocklist = _query(result, f"{{{_BLOCKING_NS}}}blocklist")
        return tuple(item.get("jid", "") for item in blocklist.findall(f"{{{_BLOCKING_NS}}}item"))

    async def access_list(self) -> tuple[dict[str, str], ...]:
        """villaged's access transparency: operator accesses to our own data."""
        self._require_live()
        result = await self._iq("get", ET.Element(f"{{{_ACCESS_NS}}}accesses"))
        listing = _query(result, f"{{{_ACCESS_NS}}}accesses")
        return tuple(dict(a.attrib) for a in listing.findall(f"{{{_ACCESS_NS}}}access"))

    async def block(self, jids: tuple[str, ...]) -> None:
        self._require_live()
        await self._reply(self._xmpp.plugin["xep_0191"].block([slixmpp.JID(j) for j in jids]))

    async def unblock(self, jids: tuple[str, ...]) -> None:
        if not jids:  # xep_0191's unblock() would send an iq without <unblock/>
            await self._iq("set", ET.Element(f"{{{_BLOCKING_NS}}}unblock"))
            return
        self._require_live()
        await self._reply(self._xmpp.plugin["xep_0191"].unblock([slixmpp.JID(j) for j in jids]))


# --- the blocking, thread-safe client -----------------------------------------------------------


class XmppTestClient:
    """One slixmpp client on its own thread and asyncio loop; blocking, thread-safe methods.

    Each call waits at most ``timeout`` seconds, then cancels the action and raises
    TimeoutError. `connect` may be called again after the previous session ended; every other
    action needs a session. Always `close` (or use ``with``): it stops the thread.
    """

    def __init__(self, name: str = "xmpp-client") -> None:
        logging.getLogger("slixmpp").setLevel(logging.WARNING)
        self.name = name
        self.jid: str | None = None  # the bound JID of the last successful connect
        self._session: _Session | None = None  # read and written on the client's loop only
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(ready),), name=f"slixmpp {name}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_THREAD_START_TIMEOUT_S):
            raise RuntimeError(f"{name}: the client's event loop did not start")

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready.set()
        await self._stop.wait()
        session = self._session
        if session is None:
            return
        if session.live:
            with contextlib.suppress(TimeoutError, XmppHarnessError):
                await asyncio.wait_for(session.disconnect(), _CLOSE_DISCONNECT_WAIT_S)
        session.abort()
        # Let the transports' close callbacks run before asyncio.run closes the loop, so that
        # no transport is left for the garbage collector to warn about (ResourceWarning).
        for _ in range(3):
            await asyncio.sleep(0)

    # -- plumbing shared with TrioXmppClient

    def _schedule(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self._loop
        if self._closed or loop is None:
            coroutine.close()
            raise ClientClosedError(f"{self.name} is closed")
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # the loop has stopped already
            coroutine.close()
            raise ClientClosedError(f"{self.name} is closed") from None

    def _submit(self, action: Callable[[_Session], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``action`` with the current session, on the client's loop."""

        async def with_session() -> T:
            session = self._session
            if session is None:
                raise NotConnectedError(f"{self.name} has not connected")
            return await action(session)

        return self._schedule(with_session())

    def _submit_connect(
        self,
        host: str,
        port: int,
        *,
        direct_tls: bool,
        ca_file: Path,
        password: str,
        jid: str,
        resource: str | None,
    ) -> concurrent.futures.Future[str]:
        _require_loopback(host)
        ssl_context = _client_tls_context(ca_file)
        full_jid = jid if resource is None else f"{jid}/{resource}"

        async def connect() -> str:
            previous = self._session
            if previous is not None and previous.live:
                raise XmppHarnessError(f"{self.name} is connected already")
            session = _Session(
                jid=full_jid, password=password, ssl_context=ssl_context, direct_tls=direct_tls
            )
            self._session = session
            return await session.connect(host, port)

        return self._schedule(connect())

    def _wait(self, future: concurrent.futures.Future[T], timeout: float, what: str) -> T:
        try:
            return future.result(timeout)
        except TimeoutError:
            if not future.cancel() and future.done():
                return future.result()  # finished just now
            raise TimeoutError(f"{self.name}: {what} took longer than {timeout} s") from None

    # -- actions

    def connect(
        self,
        host: str,
        port: int,
        *,
        direct_tls: bool,
        ca_file: Path,
        password: str,
        jid: str,
        resource: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> str:
        """Log in over direct TLS (XEP-0368) or STARTTLS; returns the bound full JID.

        ``host`` must be a loopback IP literal; ``ca_file`` is the only trusted CA (a
        self-signed certificate is its own CA) and the certificate must name ``jid``'s domain.
        Raises `AuthFailedError`, `TlsVerificationError` or `ConnectFailedError`.
        """
        future = self._submit_connect(
            host,
            port,
            direct_tls=direct_tls,
            ca_file=ca_file,
            password=password,
            jid=jid,
            resource=resource,
        )
        self.jid = self._wait(future, timeout, "connect")
        return self.jid

    def disconnect(self, timeout: float = DEFAULT_TIMEOUT_S) -> Disconnection:
        """Close our stream and wait for the connection to end (the server's stream close, or
        slixmpp's own bound); returns how it ended. Once ended, returns that record again."""
        return self._wait(self._submit(lambda s: s.disconnect()), timeout, "disconnect")

    def wait_disconnected(self, timeout: float = DEFAULT_TIMEOUT_S) -> Disconnection:
        """Wait for the server to end the session."""
        return self._wait(self._submit(lambda s: s.wait_disconnected()), timeout, "disconnection")

    def send_message(
        self,
        to: str,
        body: str,
        *,
        mtype: str = "chat",
        id_: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> str:
        """Queue a message for sending; returns its id (``id_``, or a fresh one)."""
        future = self._submit(lambda s: s.send_message(to, body, mtype, id_))
        return self._wait(future, timeout, "send_message")

    def wait_message(
        self,
        predicate: Callable[[ReceivedMessage], bool] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> ReceivedMessage:
        """The oldest unclaimed message that ``predicate`` accepts (any, without one)."""
        return self._wait(self._submit(lambda s: s.messages.take(predicate)), timeout, "message")

    def send_presence(
        self,
        *,
        show: str | None = None,
        status: str | None = None,
        priority: int | None = None,
        to: str | None = None,
        type_: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Broadcast or directed presence; ``type_`` also sends subscribe/subscribed/
        unsubscribe/unsubscribed/unavailable/probe. None leaves an element out."""
        future = self._submit(lambda s: s.send_presence(show, status, priority, to, type_))
        self._wait(future, timeout, "send_presence")

    def wait_presence(
        self,
        predicate: Callable[[ReceivedPresence], bool] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> ReceivedPresence:
        return self._wait(self._submit(lambda s: s.presences.take(predicate)), timeout, "presence")

    def get_roster(self, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, RosterItem]:
        return self._wait(self._submit(lambda s: s.get_roster()), timeout, "get_roster")

    def set_roster_item(
        self,
        jid: str,
        *,
        name: str | None = None,
        groups: tuple[str, ...] = (),
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        future = self._submit(lambda s: s.set_roster_item(jid, name, groups))
        self._wait(future, timeout, "set_roster_item")

    def remove_roster_item(self, jid: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        future = self._submit(lambda s: s.remove_roster_item(jid))
        self._wait(future, timeout, "remove_roster_item")

    def wait_roster_push(
        self,
        predicate: Callable[[RosterPush], bool] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> RosterPush:
        future = self._submit(lambda s: s.roster_pushes.take(predicate))
        return self._wait(future, timeout, "roster push")

    def enable_carbons(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._wait(self._submit(lambda s: s.enable_carbons()), timeout, "enable_carbons")

    def mam_query(
        self,
        *,
        with_: str | None = None,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        max_: int | None = None,
        after: str | None = None,
        before: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> MamPage:
        """Query our archive (``urn:xmpp:mam:2``). ``before=""`` asks for the last page."""
        future = self._submit(lambda s: s.mam_query(with_, start, end, max_, after, before))
        return self._wait(future, timeout, "mam_query")

    def disco_info(self, jid: str, timeout: float = DEFAULT_TIMEOUT_S) -> DiscoInfo:
        return self._wait(self._submit(lambda s: s.disco_info(jid)), timeout, "disco_info")

    def ping(self, jid: str, timeout: float = DEFAULT_TIMEOUT_S) -> float:
        """XEP-0199 ping; returns the round trip in seconds, raises `StanzaError` on an error."""
        return self._wait(self._submit(lambda s: s.ping(jid)), timeout, "ping")

    def get_vcard(
        self, jid: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> dict[str, str]:
        """The text fields (childless elements) of ``jid``'s vCard; our own by default."""
        return self._wait(self._submit(lambda s: s.get_vcard(jid)), timeout, "get_vcard")

    def set_vcard(self, fields: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Publish our vCard with these text fields (``{"FN": ..., "NICKNAME": ...}``)."""
        self._wait(self._submit(lambda s: s.set_vcard(fields)), timeout, "set_vcard")

    def private_store(self, payload_xml: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """XEP-0049: store one namespaced element, given as XML text."""
        self._wait(self._submit(lambda s: s.private_store(payload_xml)), timeout, "private_store")

    def private_get(self, name: str, namespace: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """XEP-0049: the stored ``{namespace}name`` element, as XML text."""
        future = self._submit(lambda s: s.private_get(name, namespace))
        return self._wait(future, timeout, "private_get")

    def get_blocklist(self, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[str, ...]:
        """XEP-0191: the JIDs we block (the server pushes changes to us from then on)."""
        return self._wait(self._submit(lambda s: s.get_blocklist()), timeout, "get_blocklist")

    def access_list(self, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[dict[str, str], ...]:
        """Operator accesses to our data, as the server's audit log records them."""
        return self._wait(self._submit(lambda s: s.access_list()), timeout, "access_list")

    def block(self, *jids: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """XEP-0191: block these JIDs."""
        self._wait(self._submit(lambda s: s.block(jids)), timeout, "block")

    def unblock(self, *jids: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """XEP-0191: unblock these JIDs; with none, unblock everything."""
        self._wait(self._submit(lambda s: s.unblock(jids)), timeout, "unblock")

    def send_raw(self, data: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Write ``data`` to the stream as is (ahead of stanzas still queued in slixmpp)."""
        self._wait(self._submit(lambda s: s.send_raw(data)), timeout, "send_raw")

    def close(self, timeout: float = _THREAD_STOP_TIMEOUT_S) -> None:
        """Stop the client: a short attempt at a clean stream close, then abort the connection,
        stop the loop and join the thread. Idempotent; safe after any failure."""
        with self._close_lock:
            loop, stop = self._loop, self._stop
            if not self._closed and loop is not None and stop is not None:
                self._closed = True
                with contextlib.suppress(RuntimeError):  # the loop has ended already
                    loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.name}: the client thread still runs after {timeout} s")

    def __enter__(self) -> XmppTestClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --- the trio side ------------------------------------------------------------------------------


class TrioXmppClient:
    """An `XmppTestClient` for trio code: the same actions, ``async`` and unbounded.

    Bound each call at the call site (``with trio.fail_after(5): await c.wait_message()``);
    cancelling a call cancels its action on the client's loop. Made by `open_xmpp_client`.
    """

    def __init__(self, client: XmppTestClient) -> None:
        self.client = client

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def jid(self) -> str | None:
        return self.client.jid

    async def _result(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        finally:
            # On cancellation this also ends the abandoned worker thread's wait.
            future.cancel()

    async def _run(self, action: Callable[[_Session], Awaitable[T]]) -> T:
        return await self._result(self.client._submit(action))

    async def connect(
        self,
        host: str,
        port: int,
        *,
        direct_tls: bool,
        ca_file: Path,
        password: str,
        jid: str,
        resource: str | None = None,
    ) -> str:
        """See `XmppTestClient.connect`."""
        future = self.client._submit_connect(
            host,
            port,
            direct_tls=direct_tls,
            ca_file=ca_file,
            password=password,
            jid=jid,
            resource=resource,
        )
        self.client.jid = await self._result(future)
        return self.client.jid

    async def disconnect(self) -> Disconnection:
        return await self._run(lambda s: s.disconnect())

    async def wait_disconnected(self) -> Disconnection:
        return await self._run(lambda s: s.wait_disconnected())

    async def send_message(
        self, to: str, body: str, *, mtype: str = "chat", id_: str | None = None
    ) -> str:
        return await self._run(lambda s: s.send_message(to, body, mtype, id_))

    async def wait_message(
        self, predicate: Callable[[ReceivedMessage], bool] | None = None
    ) -> ReceivedMessage:
        return await self._run(lambda s: s.messages.take(predicate))

    async def send_presence(
        self,
        *,
        show: str | None = None,
        status: str | None = None,
        priority: int | None = None,
        to: str | None = None,
        type_: str | None = None,
    ) -> None:
        await self._run(lambda s: s.send_presence(show, status, priority, to, type_))

    async def wait_presence(
        self, predicate: Callable[[ReceivedPresence], bool] | None = None
    ) -> ReceivedPresence:
        return await self._run(lambda s: s.presences.take(predicate))

    async def get_roster(self) -> dict[str, RosterItem]:
        return await self._run(lambda s: s.get_roster())

    async def set_roster_item(
        self, jid: str, *, name: str | None = None, groups: tuple[str, ...] = ()
    ) -> None:
        await self._run(lambda s: s.set_roster_item(jid, name, groups))

    async def remove_roster_item(self, jid: str) -> None:
        await self._run(lambda s: s.remove_roster_item(jid))

    async def wait_roster_push(
        self, predicate: Callable[[RosterPush], bool] | None = None
    ) -> RosterPush:
        return await self._run(lambda s: s.roster_pushes.take(predicate))

    async def enable_carbons(self) -> None:
        await self._run(lambda s: s.enable_carbons())

    async def mam_query(
        self,
        *,
        with_: str | None = None,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        max_: int | None = None,
        after: str | None = None,
        before: str | None = None,
    ) -> MamPage:
        return await self._run(lambda s: s.mam_query(with_, start, end, max_, after, before))

    async def disco_info(self, jid: str) -> DiscoInfo:
        return await self._run(lambda s: s.disco_info(jid))

    async def ping(self, jid: str) -> float:
        return await self._run(lambda s: s.ping(jid))

    async def get_vcard(self, jid: str | None = None) -> dict[str, str]:
        return await self._run(lambda s: s.get_vcard(jid))

    async def set_vcard(self, fields: Mapping[str, str]) -> None:
        await self._run(lambda s: s.set_vcard(fields))

    async def private_store(self, payload_xml: str) -> None:
        await self._run(lambda s: s.private_store(payload_xml))

    async def private_get(self, name: str, namespace: str) -> str:
        return await self._run(lambda s: s.private_get(name, namespace))

    async def get_blocklist(self) -> tuple[str, ...]:
        return await self._run(lambda s: s.get_blocklist())

    async def access_list(self) -> tuple[dict[str, str], ...]:
        return await self._run(lambda s: s.access_list())

    async def block(self, *jids: str) -> None:
        await self._run(lambda s: s.block(jids))

    async def unblock(self, *jids: str) -> None:
        await self._run(lambda s: s.unblock(jids))

    async def send_raw(self, data: str) -> None:
        await self._run(lambda s: s.send_raw(data))

    async def aclose(self) -> None:
        """`XmppTestClient.close`, shielded: it runs even in a cancelled scope, and is bounded
        by close's own thread-join timeout."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.client.close)


@asynccontextmanager
async def open_xmpp_client(name: str = "xmpp-client") -> AsyncIterator[TrioXmppClient]:
    """A `TrioXmppClient` whose thread is stopped on exit, however the block ends."""
    client = TrioXmppClient(await trio.to_thread.run_sync(XmppTestClient, name))
    try:
        yield client
    finally:
        await client.aclose()
