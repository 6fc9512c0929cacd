"""The client-to-server stream, receiving side (RFC 6120): a sans-I/O state machine.

Theory of operation
-------------------
A ``C2SStream`` is fed bytes with ``receive_data`` (``b""`` when the peer closed) and asked for
``next_event()`` until it answers ``NEED_DATA``. Whatever it has to say to the client
accumulates and is taken with ``data_to_send()``; the driver writes that out after every call.
The driver answers some events by calling back: ``tls_established()`` after a STARTTLS
handshake, ``complete_bind(jid)`` / ``refuse_bind(condition)`` for a bind request.

Negotiation runs through these phases; each restart (after TLS, after SASL) begins a new XML
stream with a fresh parser, and the client must open it with a new stream header::

    phase        features offered                     what the client may send
    PRE_TLS      <starttls><required/>                <starttls/>          → AWAIT_TLS
    AWAIT_TLS    (the driver runs the TLS handshake)  nothing              → PRE_AUTH
    PRE_AUTH     <mechanisms> (SCRAM, PLAIN)          <auth/> <response/> <abort/> → PRE_BIND
    PRE_BIND     <bind/>, <session><optional/>        iq bind (+ session)  → READY
    READY        —                                    message/presence/iq  → StanzaReceived

Direct TLS (XEP-0368) starts in PRE_AUTH. Anything a phase does not allow ends the stream with
the stream error RFC 6120 prescribes; after a stream error or a close the machine only reports
``StreamEnded``/``ConnectionLost`` and sends nothing more.

Stanzas in READY are checked before they reach the IM layer: the ``from`` is stamped with the
session's full JID (a different ``from`` is ``invalid-from``), ``to`` must be a valid JID (else a
``jid-malformed`` error reply is sent here and the stanza dropped), and only message, presence
and iq in ``jabber:client`` are stanzas (anything else is ``unsupported-stanza-type``).
"""

from __future__ import annotations

import base64
import enum
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError, prepare_resourcepart
from villaged.xmpp.sasl import (
    SaslChallenge,
    SaslError,
    SaslFailure,
    SaslServer,
    SaslSuccess,
    decode_sasl_payload,
    offered_mechanisms,
    server_nonce_from_entropy,
)
from villaged.xmpp.scram import ScramCredential
from villaged.xmpp.stanza import (
    NS_BIND,
    NS_CLIENT,
    NS_SASL,
    NS_SESSION,
    NS_STREAMS,
    NS_TLS,
    error_reply,
    iq_result,
    kind,
)

MAX_AUTH_ATTEMPTS: Final = 3  # failed SASL exchanges per stream before it is closed
STREAM_ID_BYTES: Final = 12
NS_SM: Final = "urn:xmpp:sm:3"  # XEP-0198 stream management
NS_CSI: Final = "urn:xmpp:csi:0"  # XEP-0352 client state indication
#: The server asks for an ack (``<r/>``) after this many stanzas sent since the last request.
SM_REQUEST_EVERY: Final = 5
_H_MODULUS: Final = 2**32  # XEP-0198 counters wrap at 2^32


class Phase(enum.Enum):
    PRE_TLS = "pre-tls"
    AWAIT_TLS = "await-tls"
    PRE_AUTH = "pre-auth"
    PRE_BIND = "pre-bind"
    READY = "ready"
    CLOSED = "closed"


# ----- events ------------------------------------------------------------------------------


class Event:
    """Base class of what ``next_event`` reports."""


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """Send what ``data_to_send()`` holds (the <proceed/>), then run the TLS handshake and call
    ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class AuthSucceeded(Event):
    username: str  # the prepared localpart
    mechanism: str


@dataclass(frozen=True, slots=True)
class AuthFailed(Event):
    username: str | None  # what the client claimed, if it got that far
    mechanism: str
    condition: str


@dataclass(frozen=True, slots=True)
class BindRequested(Event):
    """Choose the full JID (``resource`` is None when the client let the server pick, or when
    the requested one must be replaced) and call ``complete_bind`` or ``refuse_bind``."""

    resource: str | None


@dataclass(frozen=True, slots=True)
class StanzaReceived(Event):
    stanza: ET.Element  # 'from' already stamped with the session's full JID
    kind: str  # "message" | "presence" | "iq"
    to: JID | None = None  # 'to' parsed (and written back in canonical form), if present


@dataclass(frozen=True, slots=True)
class SmEnableRequested(Event):
    """The client asked for stream management; answer with ``enable_sm`` or ``refuse_sm``."""

    resume: bool
    max: int | None  # the resumption time the client prefers, in seconds


@dataclass(frozen=True, slots=True)
class SmResumeRequested(Event):
    """Instead of binding, the client asks to resume stream ``previd`` having received ``h``
    of its stanzas; answer with ``resume_sm`` or ``refuse_sm``."""

    previd: str
    h: int


@dataclass(frozen=True, slots=True)
class StanzaRejected(Event):
    """A stanza the stream answered or dropped itself (a malformed 'to'): handled, so once
    what came before it is handled too, call ``stanza_handled``."""


@dataclass(frozen=True, slots=True)
class AckRequested(Event):
    """The client sent ``<r/>``: once what it sent before is handled, call ``send_ack``."""


@dataclass(frozen=True, slots=True)
class ClientStateChanged(Event):
    """XEP-0352: the client says it is (in)active."""

    active: bool


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The stream is over (the peer closed it, or we sent a stream error); close the socket."""

    condition: str | None = None  # the stream error we sent, if any
    text: str | None = None
    by_peer: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """EOF without a stream close."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class StreamSettings:
    domain: str
    limits: xml.XmlLimits = field(default_factory=xml.XmlLimits)
    lang: str = "en"
    # Extra stream features offered once bound-able (e.g. stream management, CSI, roster
    # versioning) — elements owned by the IM layer.
    post_auth_features: tuple[ET.Element, ...] = ()


CredentialLookup = Callable[[str], Mapping[str, ScramCredential] | None]


@dataclass(eq=False)
class SmState:
    """One stream-management session (XEP-0198): counters and the stanzas the client has not
    acknowledged. It outlives a connection when the stream is resumable: the driver hands
    it to the stream that resumes it.

    ``handled`` is what we report as ``h``: the driver counts an inbound stanza only once it
    is durable (see ``C2SStream.stanza_handled``). ``sent`` counts stanzas sent (or held for
    a detached session), and ``unacked`` keeps ``(its count, stanza)`` until the client's
    ``h`` covers it. All counters wrap at 2^32 as the XEP says.
    """

    id: str
    resume: bool
    max: int  # seconds a detached session waits for resumption
    handled: int = 0
    sent: int = 0
    unacked: list[tuple[int, ET.Element]] = field(default_factory=list)
    since_request: int = 0
    request_pending: bool = False  # an <r/> is out and no <a/> has come back yet

    def hold(self, stanza: ET.Element) -> None:
        """Count ``stanza`` as sent and keep it until it is acknowledged."""
        self.sent = (self.sent + 1) % _H_MODULUS
        self.unacked.append((self.sent, stanza))
        self.since_request += 1

    def can_acknowledge(self, h: int) -> bool:
        """False if ``h`` acknowledges stanzas never sent (an ``h`` older than one already
        received is stale, not wrong: it acknowledges nothing new)."""
        acked = (self.sent - len(self.unacked)) % _H_MODULUS
        newly = (h - acked) % _H_MODULUS
        return newly <= len(self.unacked) or 0 < (acked - h) % _H_MODULUS <= _H_MODULUS // 2

    def acknowledge(self, h: int) -> bool:
        """Drop what ``h`` acknowledges; False (nothing changed) if ``can_acknowledge`` is."""
        if not self.can_acknowledge(h):
            return False
        self.request_pending = False
        acked = (self.sent - len(self.unacked)) % _H_MODULUS
        newly = (h - acked) % _H_MODULUS
        if newly <= len(self.unacked):
            del self.unacked[:newly]
        return True

    def take_unacked(self) -> list[ET.Element]:
        """Every stanza not acknowledged (the session is over for good); forgets them."""
        stanzas = [stanza for _, stanza in self.unacked]
        self.unacked.clear()
        return stanzas


class C2SStream:
    def __init__(
        self,
        settings: StreamSettings,
        *,
        lookup: CredentialLookup,
        entropy: Callable[[int], bytes],
        unknown_user_secret: bytes,
        direct_tls: bool = False,
        framed: bool = False,
    ) -> None:
        if framed and not direct_tls:
            raise ValueError("XMPP over WebSocket runs inside TLS: pass direct_tls=True")
        self.settings = settings
        self.framed = framed
        self._lookup = lookup
        self._entropy = entropy
        self._unknown_user_secret = unknown_user_secret
        self.phase = Phase.PRE_AUTH if direct_tls else Phase.PRE_TLS
        self.tls_active = direct_tls
        self.username: str | None = None
        self.jid: JID | None = None
        self.stream_id = ""
        self.peer_closed = False  # the client sent </stream:stream>; we have not closed yet
        self._parser: xml.StreamParser | xml.FramedStreamParser = (
            xml.FramedStreamParser(settings.limits) if framed else xml.StreamParser(settings.limits)
        )
        self._header_seen = False
        self._out: list[bytes] = []
        self._events: list[Event] = []  # short; a deque would cost ~600 bytes when idle
        self._sasl: SaslServer | None = None
        self._auth_failures = 0
        self._bind_iq: ET.Element | None = None
        self.sm: SmState | None = None

    # ----- driver API --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (``b""``: its input ended). Framed (WebSocket): one whole
        message per call."""
        if self.phase is Phase.CLOSED or self.peer_closed:
            return
        try:
            if isinstance(self._parser, xml.StreamParser):
                self._parser.receive_data(data)
            elif data:
                self._parser.receive_message(data)
            else:
                self._parser.receive_closed()
        except xml.XmlStreamError as exc:
            self._stream_error(exc.condition, exc.text)

    def next_event(self) -> Event | _NeedData:
        while (
            not self._events
            and self.phase not in (Phase.CLOSED, Phase.AWAIT_TLS)
            and not self.peer_closed
        ):
            try:
                parsed = self._parser.next_event()
            except xml.XmlStreamError as exc:
                self._stream_error(exc.condition, exc.text)
                break
            if parsed is xml.NEED_DATA:
                break
            self._handle(parsed)
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def compact(self) -> bool:
        """Release what an idle stream does not need (the XML parser); True if anything was.
        For the driver to call when the client has been quiet a while; no effect otherwise."""
        parser = self._parser
        return not self._events and isinstance(parser, xml.StreamParser) and parser.compact()

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def messages_to_send(self) -> list[bytes]:
        """What ``data_to_send`` would give, one complete element per item: framed (WebSocket)
        mode sends each as a message of its own."""
        out, self._out = self._out, []
        return out

    def tls_established(self) -> None:
        if self.phase is not Phase.AWAIT_TLS:
            raise RuntimeError(f"tls_established() in phase {self.phase.value}")
        self.tls_active = True
        self._restart(Phase.PRE_AUTH)

    def complete_bind(self, jid: JID) -> None:
        request = self._take_bind_request()
        self.jid = jid
        self.phase = Phase.READY
        bind = ET.Element(f"{{{NS_BIND}}}bind")
        ET.SubElement(bind, f"{{{NS_BIND}}}jid").text = str(jid)
        self._send(iq_result(_without_from(request), bind))

    def refuse_bind(self, condition: str, text: str | None = None) -> None:
        request = self._take_bind_request()
        self._send(error_reply(_without_from(request), condition, text=text))

    def send_stanza(self, stanza: ET.Element) -> None:
        """Queue a stanza for the client (only once bound; dropped after the stream ended)."""
        if self.phase is Phase.READY:
            self._send(stanza)

    def close(self) -> None:
        """End the stream cleanly from our side."""
        if self.phase is not Phase.CLOSED:
            self._out.append(self._closing())
            self.phase = Phase.CLOSED

    def fail(self, condition: str, text: str | None = None) -> None:
        """End the stream with a stream error (e.g. system-shutdown, connection-timeout)."""
        self._stream_error(condition, text, report=False)

    # stream management and client state (XEP-0198, XEP-0352) ----------------------------

    def enable_sm(self, sm_id: str, *, resume: bool, max_s: int) -> SmState:
        """Answer ``SmEnableRequested``: from now on stanzas are counted."""
        self.sm = SmState(sm_id, resume, max_s)
        enabled = ET.Element(f"{{{NS_SM}}}enabled")
        if resume:
            enabled.attrib.update({"id": sm_id, "resume": "true", "max": str(max_s)})
        self._out.append(xml.serialize(enabled))
        return self.sm

    def refuse_sm(self, condition: str, *, h: int | None = None) -> None:
        """Answer ``SmEnableRequested`` or ``SmResumeRequested`` with ``<failed/>``."""
        failed = ET.Element(f"{{{NS_SM}}}failed")
        if h is not None:
            failed.set("h", str(h))
        ET.SubElement(failed, f"{{urn:ietf:params:xml:ns:xmpp-stanzas}}{condition}")
        self._out.append(xml.serialize(failed))

    def resume_sm(self, state: SmState, jid: JID) -> None:
        """Answer ``SmResumeRequested``: this stream continues ``state`` (the driver has
        applied the client's ``h`` with ``state.acknowledge``) as ``jid``; every stanza still
        unacknowledged is sent again, in order, under its old count."""
        self.jid = jid
        self.username = jid.local
        self.phase = Phase.READY
        self.sm = state
        resumed = ET.Element(f"{{{NS_SM}}}resumed", {"previd": state.id, "h": str(state.handled)})
        self._out.append(xml.serialize(resumed))
        ns = None if self.framed else NS_CLIENT
        for _, stanza in state.unacked:
            self._out.append(xml.serialize(stanza, default_ns=ns))
        if state.unacked:
            self._request_ack()

    def stanza_handled(self) -> None:
        """One more inbound stanza is handled (durable); the next ``<a/>`` counts it."""
        if self.sm is not None:
            self.sm.handled = (self.sm.handled + 1) % _H_MODULUS

    def send_ack(self) -> None:
        """``<a h=…/>`` with the number of inbound stanzas handled so far."""
        if self.sm is not None and self.phase is Phase.READY:
            ack = ET.Element(_SM_ACK_TAG, {"h": str(self.sm.handled)})
            self._out.append(xml.serialize(ack))

    def request_ack(self) -> None:
        """Ask the client for an ``<a/>`` if anything is unacknowledged."""
        if self.sm is not None and self.sm.unacked and self.phase is Phase.READY:
            self._request_ack()

    def _request_ack(self) -> None:
        assert self.sm is not None
        self.sm.since_request = 0
        self.sm.request_pending = True
        self._out.append(_SM_REQUEST)

    # ----- internals ---------------------------------------------------------------------

    def _send(self, element: ET.Element) -> None:
        # Framed, every message is a document of its own and declares its namespace.
        self._out.append(xml.serialize(element, default_ns=None if self.framed else NS_CLIENT))
        sm = self.sm
        if sm is not None:  # every stanza after <enable/> counts (bind replies come before)
            sm.hold(element)
            if sm.since_request >= SM_REQUEST_EVERY and not sm.request_pending:
                self._request_ack()

    def _closing(self) -> bytes:
        return xml.framed_close() if self.framed else xml.STREAM_CLOSE

    def _restart(self, phase: Phase) -> None:
        self.phase = phase
        self._header_seen = False
        if isinstance(self._parser, xml.FramedStreamParser):
            return  # the client simply sends a new <open/>
        # Reused rather than replaced: a discarded parser is a reference cycle (its expat
        # handlers are its own methods), ~20 KiB per login left for the cyclic collector.
        try:
            self._parser.reset()
        except (xml.XmlStreamError, RuntimeError):
            # Input after the restart point already broke the old document (or ended);
            # RFC 6120 has it discarded, so start afresh.
            self._parser = xml.StreamParser(self.settings.limits)

    def _stream_error(self, condition: str, text: str | None, *, report: bool = True) -> None:
        if self.phase is Phase.CLOSED:
            return
        if not self._header_seen:
            self._send_header(to=None)
        self._out.append(xml.stream_error(condition, text, framed=self.framed))
        self._out.append(self._closing())
        self.phase = Phase.CLOSED
        if report:
            self._events.append(StreamEnded(condition=condition, text=text))

    def _send_header(self, to: str | None) -> None:
        self._header_seen = True
        self.stream_id = base64.urlsafe_b64encode(self._entropy(STREAM_ID_BYTES)).decode()
        if self.framed:
            self._out.append(
                xml.framed_open(
                    from_=self.settings.domain, to=to, id_=self.stream_id, lang=self.settings.lang
                )
            )
            return
        self._out.append(
            xml.stream_header(
                from_=self.settings.domain,
                to=to,
                id_=self.stream_id,
                lang=self.settings.lang,
                content_ns=NS_CLIENT,
            )
        )

    def _handle(self, parsed: object) -> None:
        if isinstance(parsed, xml.StreamOpened):
            self._on_stream_opened(parsed)
        elif isinstance(parsed, xml.StanzaReceived):
            self._on_element(parsed.element)
        elif isinstance(parsed, xml.StreamClosed):
            # Our own closing tag waits for the driver's close(): replies to what the client
            # sent before it closed may still be on their way, and they must go out first.
            self.peer_closed = True
            self._events.append(StreamEnded(by_peer=True))
        elif isinstance(parsed, xml.ConnectionClosed):
            self.phase = Phase.CLOSED
            self._events.append(ConnectionLost())

    def _on_stream_opened(self, opened: xml.StreamOpened) -> None:
        if self._header_seen:
            self._stream_error("not-well-formed", "a second stream header")
            return
        self._send_header(to=None)
        if not self.framed and opened.content_ns != NS_CLIENT:
            self._stream_error("invalid-namespace", "the content namespace must be jabber:client")
            return
        if not _version_ok(opened.version):
            self._stream_error("unsupported-version", "XMPP 1.0 is required")
            return
        try:
            to = JID.parse(opened.to or "")
        except JIDError:
            self._stream_error("host-unknown", "the stream header names no valid domain")
            return
        if to.local or to.resource or to.domain != self.settings.domain:
            self._stream_error("host-unknown", f"this server serves {self.settings.domain}")
            return
        self._out.append(
            xml.serialize(self._features(), default_ns=None if self.framed else NS_STREAMS)
        )

    def _features(self) -> ET.Element:
        features = ET.Element(f"{{{NS_STREAMS}}}features")
        if self.phase is Phase.PRE_TLS:
            starttls = ET.SubElement(features, f"{{{NS_TLS}}}starttls")
            ET.SubElement(starttls, f"{{{NS_TLS}}}required")
        elif self.phase is Phase.PRE_AUTH:
            mechanisms = ET.SubElement(features, f"{{{NS_SASL}}}mechanisms")
            for name in offered_mechanisms(tls_active=self.tls_active):
                ET.SubElement(mechanisms, f"{{{NS_SASL}}}mechanism").text = name
        elif self.phase is Phase.PRE_BIND:
            ET.SubElement(features, f"{{{NS_BIND}}}bind")
            session = ET.SubElement(features, f"{{{NS_SESSION}}}session")
            ET.SubElement(session, f"{{{NS_SESSION}}}optional")
            features.extend(self.settings.post_auth_features)
        return features

    def _on_element(self, element: ET.Element) -> None:
        if self.phase is Phase.PRE_TLS:
            if element.tag == f"{{{NS_TLS}}}starttls":
                if isinstance(self._parser, xml.StreamParser) and self._parser.has_pending_input:
                    # Bytes sent after <starttls/> must not be taken as arriving under TLS
                    # (the STARTTLS command-injection attack): refuse rather than proceed.
                    self._stream_error("policy-violation", "data after <starttls/>")
                    return
                self._out.append(xml.serialize(ET.Element(f"{{{NS_TLS}}}proceed")))
                self.phase = Phase.AWAIT_TLS
                self._events.append(StartTls())
            else:
                self._stream_error("policy-violation", "STARTTLS is required first")
        elif self.phase is Phase.PRE_AUTH:
            self._on_sasl_element(element)
        elif self.phase is Phase.PRE_BIND:
            self._on_pre_bind(element)
        elif self.phase is Phase.READY:
            self._on_stanza(element)

    # SASL ------------------------------------------------------------------------------

    def _on_sasl_element(self, element: ET.Element) -> None:
        tag = element.tag
        if tag == f"{{{NS_SASL}}}auth":
            mechanism = element.get("mechanism", "")
            self._sasl = SaslServer(
                mechanism,
                lookup=self._lookup,
                domain=self.settings.domain,
                tls_active=self.tls_active,
                server_nonce=server_nonce_from_entropy(self._entropy(18)),
                unknown_user_secret=self._unknown_user_secret,
            )
            self._sasl_step(element)
        elif tag == f"{{{NS_SASL}}}response" and self._sasl is not None:
            self._sasl_step(element)
        elif tag == f"{{{NS_SASL}}}abort" and self._sasl is not None:
            self._sasl_result(self._sasl.abort())
        elif tag.startswith(f"{{{NS_SASL}}}"):
            self._sasl_result(SaslFailure("malformed-request", "no authentication in progress"))
        else:
            self._stream_error("not-authorized", "authenticate first")

    def _sasl_step(self, element: ET.Element) -> None:
        assert self._sasl is not None
        try:
            payload = decode_sasl_payload(element.text or "")
        except SaslError as exc:
            self._sasl_result(exc.failure)
            return
        self._sasl_result(self._sasl.step(payload))

    def _sasl_result(self, result: SaslChallenge | SaslSuccess | SaslFailure) -> None:
        sasl = self._sasl
        mechanism = sasl.mechanism if sasl is not None else ""
        if isinstance(result, SaslChallenge):
            self._out.append(_sasl_element("challenge", result.data))
        elif isinstance(result, SaslSuccess):
            self._out.append(_sasl_element("success", result.additional_data))
            self._sasl = None
            self.username = result.username
            self._events.append(AuthSucceeded(result.username, mechanism))
            self._restart(Phase.PRE_BIND)
        else:
            failure = ET.Element(f"{{{NS_SASL}}}failure")
            ET.SubElement(failure, f"{{{NS_SASL}}}{result.condition}")
            self._out.append(xml.serialize(failure))
            username = sasl.username if sasl is not None else None
            self._sasl = None
            self._events.append(AuthFailed(username, mechanism, result.condition))
            if result.condition != "temporary-auth-failure":  # the server's fault, not a guess
                self._auth_failures += 1
            if self._auth_failures >= MAX_AUTH_ATTEMPTS:
                self._stream_error("policy-violation", "too many failed authentication attempts")

    # binding ---------------------------------------------------------------------------

    def _on_pre_bind(self, element: ET.Element) -> None:
        if element.tag == f"{{{NS_SM}}}resume":
            self._on_resume(element)
            return
        if element.tag == f"{{{NS_SM}}}enable":
            self.refuse_sm("unexpected-request")  # XEP-0198 §3: enable only once bound
            return
        if kind(element) != "iq" or element.tag != f"{{{NS_CLIENT}}}iq":
            self._stream_error("not-authorized", "bind a resource first")
            return
        if self._bind_iq is not None:
            self._send(error_reply(element, "unexpected-request", text="a bind is in progress"))
            return
        payload = list(element)
        if element.get("type") == "set" and len(payload) == 1:
            if payload[0].tag == f"{{{NS_SESSION}}}session":
                self._send(iq_result(_without_from(element)))
                return
            if payload[0].tag == f"{{{NS_BIND}}}bind":
                self._on_bind(element, payload[0])
                return
        self._send(error_reply(element, "not-authorized", text="bind a resource first"))

    def _on_bind(self, request: ET.Element, bind: ET.Element) -> None:
        resource_el = bind.find(f"{{{NS_BIND}}}resource")
        resource: str | None = None
        if resource_el is not None and (resource_el.text or "").strip():
            try:
                resource = prepare_resourcepart(resource_el.text or "")
            except JIDError:
                self._send(error_reply(request, "bad-request", text="invalid resource"))
                return
        self._bind_iq = request
        self._events.append(BindRequested(resource))

    def _take_bind_request(self) -> ET.Element:
        if self._bind_iq is None:
            raise RuntimeError("no bind request is pending")
        request, self._bind_iq = self._bind_iq, None
        return request

    # stream management and client state -----------------------------------------------

    def _on_resume(self, element: ET.Element) -> None:
        previd, h = element.get("previd"), _counter(element.get("h"))
        if not previd or h is None:
            self.refuse_sm("bad-request")
            return
        self._events.append(SmResumeRequested(previd, h))

    def _on_nonza(self, element: ET.Element) -> bool:
        """Handle a stream-management or client-state element; False if it is not one."""
        tag = element.tag
        if tag == _SM_ACK_TAG:
            h = _counter(element.get("h"))
            if self.sm is None:
                self._stream_error("unsupported-stanza-type", "stream management is not enabled")
            elif h is None or not self.sm.acknowledge(h):
                self._stream_error("undefined-condition", "<a/> acknowledges stanzas never sent")
            return True
        if tag == _SM_REQUEST_TAG:
            if self.sm is None:
                self._stream_error("unsupported-stanza-type", "stream management is not enabled")
            else:
                self._events.append(AckRequested())
            return True
        if tag == f"{{{NS_SM}}}enable":
            if self.sm is not None:
                self.refuse_sm("unexpected-request")
            else:
                self._events.append(
                    SmEnableRequested(
                        resume=element.get("resume") in ("true", "1"),
                        max=_counter(element.get("max")),
                    )
                )
            return True
        if tag == f"{{{NS_SM}}}resume":
            self.refuse_sm("unexpected-request")  # this stream is bound already
            return True
        if tag in (_CSI_ACTIVE, _CSI_INACTIVE):
            self._events.append(ClientStateChanged(active=tag == _CSI_ACTIVE))
            return True
        return False

    # stanzas ---------------------------------------------------------------------------

    def _on_stanza(self, stanza: ET.Element) -> None:
        assert self.jid is not None
        if not stanza.tag.startswith(_CLIENT_PREFIX) and self._on_nonza(stanza):
            return
        stanza_kind = kind(stanza)
        if not stanza_kind or not stanza.tag.startswith(f"{{{NS_CLIENT}}}"):
            self._stream_error("unsupported-stanza-type", f"{stanza.tag} is not a stanza")
            return
        sender = stanza.get("from")
        if sender is not None and sender not in (str(self.jid), str(self.jid.bare)):
            self._stream_error("invalid-from", "'from' must be your own JID")
            return
        stanza.set("from", str(self.jid))
        to_jid = None
        if (to := stanza.get("to")) is not None:
            try:
                to_jid = JID.parse(to)
            except JIDError as exc:
                if stanza.get("type") != "error":
                    self._send(_addressed_back(error_reply(stanza, "jid-malformed", text=str(exc))))
                self._events.append(StanzaRejected())
                return
            stanza.set("to", str(to_jid))
        self._events.append(StanzaReceived(stanza, stanza_kind, to_jid))


_CLIENT_PREFIX: Final = f"{{{NS_CLIENT}}}"
_SM_ACK_TAG: Final = f"{{{NS_SM}}}a"
_SM_REQUEST_TAG: Final = f"{{{NS_SM}}}r"
_SM_REQUEST: Final = xml.serialize(ET.Element(_SM_REQUEST_TAG))
_CSI_ACTIVE: Final = f"{{{NS_CSI}}}active"
_CSI_INACTIVE: Final = f"{{{NS_CSI}}}inactive"


def _counter(text: str | None) -> int | None:
    """An XEP-0198 counter or ``max``: a decimal in [0, 2^32); None if absent or invalid."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if value < _H_MODULUS else None


def _sasl_element(name: str, data: bytes | None) -> bytes:
    element = ET.Element(f"{{{NS_SASL}}}{name}")
    if data is not None:
        element.text = base64.b64encode(data).decode() if data else "="
    return xml.serialize(element)


def _version_ok(version: str | None) -> bool:
    if not version:
        return False
    major, _, minor = version.partition(".")
    return major.isdigit() and minor.isdigit() and int(major) >= 1


def _without_from(stanza: ET.Element) -> ET.Element:
    # Replies to negotiation iqs go to the client itself; it has no address yet to echo.
    copy = ET.Element(stanza.tag, dict(stanza.attrib))
    copy.attrib.pop("from", None)
    copy.attrib.pop("to", None)
    copy.extend(list(stanza))
    return copy


def _addressed_back(reply: ET.Element) -> ET.Element:
    # An error for a malformed 'to' must not carry that 'to' back as our 'from'.
    reply.attrib.pop("from", None)
    return reply
