"""The server-to-server stream (RFC 6120, XEP-0178, XEP-0220): a sans-I/O state machine.

Theory of operation
-------------------
An ``S2SStream`` is one XML stream between two servers, in one of two roles: INBOUND (a peer
connected to us: it sends stanzas, we receive them) or OUTBOUND (we connected to a peer to send
it stanzas). s2s streams are one-way: stanzas travel from the initiating server to the receiving
one, and replies come back over the reverse connection. Like the c2s core, it is fed bytes with
``receive_data`` (``b""`` when the peer's input ended), asked for ``next_event()`` until it says
``NEED_DATA``, and whatever it has to say accumulates for ``data_to_send()``; the driver writes
that out after every call. Nothing here does I/O, reads a clock or draws random numbers: stream
ids come from the ``entropy`` callable the driver passes in.

Negotiation runs through these phases. Each restart (after TLS, after SASL success) begins a new
XML stream with a fresh parser; the initiating side sends a new header, the receiving side
answers with a new header (and a new stream id) and features::

    phase           INBOUND (we receive)                        OUTBOUND (we initiate)
    PRE_TLS         features <starttls><required/>;             header sent; features with
                    <starttls/> → <proceed/>   → AWAIT_TLS      <starttls> → <starttls/>;
                                                                <proceed/> → AWAIT_TLS
    AWAIT_TLS       the driver runs the TLS handshake and calls tls_established() → PRE_AUTH
    PRE_AUTH        features: <mechanisms>EXTERNAL (if the      features: EXTERNAL offered →
                    certificate covers the header's 'from')     <auth/>; else dialback →
                    and the dialback feature;                   <db:result/> → AUTHENTICATING
                    SASL success → restart → READY;
                    <db:result/> valid → READY
    AUTHENTICATING  (not used)                                  awaiting <success/>, <failure/>
                                                                or the <db:result type=…/>;
                                                                SASL success → restart, READY
                                                                once the new features arrive
    READY           stanzas from authenticated domains;         send_stanza()
                    more <db:result/> for other domains
    CLOSED          only StreamEnded / ConnectionLost are reported; nothing more is sent

Direct TLS (XEP-0368) starts in AWAIT_TLS: the driver calls ``tls_established`` right after the
handshake. With ``tls_required=False`` (closed test networks only) an INBOUND stream offers an
optional ``<starttls/>`` next to the dialback feature and accepts dialback without TLS; an
OUTBOUND stream still uses TLS whenever the peer offers it.

Which elements a phase accepts is data: `_INBOUND_ROUTES` and `_OUTBOUND_ROUTES` map each phase
to the elements it handles. Anything else is refused with the stream error RFC 6120 prescribes
for the phase: before TLS (when required) ``policy-violation`` (as the c2s core; RFC 6120
§5.3.1 leaves the condition to policy), a stanza before authentication ``not-authorized``
(§4.9.3.12), and an element nobody handles ``unsupported-stanza-type``. Stream errors say whose
fault it was: the peer's become ``StreamEnded(condition, by_peer=False)`` (we sent the error),
a ``<stream:error/>`` the peer sent becomes ``StreamEnded(its condition, by_peer=True)``; the
driver's own ``fail()`` reports nothing (it knows).

What the core answers by itself, without asking the driver:

- INBOUND ``<db:verify>`` requests (XEP-0220 §2.3: the peer asks us, the authoritative server,
  whether a key is ours): recomputed with `dialback_key` (receiving = its 'from', originating =
  our domain) and answered valid/invalid at once, in any phase after TLS (or where TLS is not
  required), before or after the peer authenticated. No event.
- INBOUND SASL EXTERNAL (XEP-0178): offered only when the peer certificate `covers` the
  header's 'from'; the authzid must be absent, ``=``, or that same domain. Success emits
  ``Authenticated(domain, "sasl-external")``; failure sends ``<failure><not-authorized/>`` and
  the peer may go on with dialback.
- OUTBOUND authentication: on features after TLS the core uses EXTERNAL when offered (authzid
  = our domain, as Prosody expects), and dialback when EXTERNAL is not offered or failed and
  the peer offers the dialback feature or declares the ``db`` namespace. ``Authenticated`` or
  ``AuthenticationFailed`` tells the driver how it ended. ``AuthenticationFailed`` leaves the
  stream open (verify requests may still be answered on it); the driver closes it. An OUTBOUND
  stream that ends before it authenticated reports ``AuthenticationFailed`` first.

Dialback requests on an INBOUND stream become ``DialbackKeyReceived``; the driver decides and
calls ``dialback_result``. Verify requests on an OUTBOUND stream (``request_verify``) wait until
the stream may carry them (features received after TLS, and no SASL exchange in flight) and are
answered with ``DialbackVerifyAnswered``.

Stanzas on a READY stream are checked before they reach the IM layer (RFC 6120 §8.1.1.2,
§8.1.2.2, §4.9.3): only message, presence and iq in ``jabber:server`` (else
``unsupported-stanza-type``); 'to' and 'from' are required (else ``improper-addressing``); a
'from' that is no JID or whose domain has not authenticated on this stream is ``invalid-from``;
a 'to' that is no JID is answered with a ``jid-malformed`` stanza error, which — the stream
being one-way — is handed to the driver as ``StanzaRejected(reply)`` to route back; a 'to' for
another domain is ``host-unknown`` (XEP-0220 §2.1.2; we relay for nobody). Accepted stanzas are
re-namespaced into ``jabber:client``, the namespace the IM layer works in; ``send_stanza`` does
the reverse. An OUTBOUND stream accepts stanzas from its remote domain the same way once ready
(some servers answer on the stream they received).

Everything the peer can make us hold is bounded: the parser by ``settings.limits``, pending
dialback requests per stream and outstanding verify requests by `MAX_PENDING_DIALBACK`, domains
authenticated on one stream by `MAX_STREAM_DOMAINS`, SASL attempts by `MAX_AUTH_ATTEMPTS`, and
dialback keys by `MAX_KEY_CHARS`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.sasl import SaslError, decode_sasl_payload
from villaged.xmpp.stanza import (
    NS_CLIENT,
    NS_SASL,
    NS_SERVER,
    NS_STANZA_ERRORS,
    NS_STREAM_ERRORS,
    NS_STREAMS,
    NS_TLS,
    error_reply,
)
from villaged.xmpp.xml import NEED_DATA, NeedData

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "MAX_AUTH_ATTEMPTS",
    "MAX_KEY_CHARS",
    "MAX_PENDING_DIALBACK",
    "MAX_STREAM_DOMAINS",
    "NEED_DATA",
    "NS_DIALBACK",
    "NS_DIALBACK_FEATURE",
    "NS_SERVER",
    "S2S_MAX_STANZA_BYTES",
    "STREAM_ID_BYTES",
    "Authenticated",
    "AuthenticationFailed",
    "ConnectionLost",
    "DialbackKeyReceived",
    "DialbackVerifyAnswered",
    "Event",
    "NeedData",
    "PeerCertificate",
    "Phase",
    "Role",
    "S2SSettings",
    "S2SStream",
    "StanzaReceived",
    "StanzaRejected",
    "StreamEnded",
    "TlsRequested",
    "dialback_key",
]

NS_DIALBACK: Final = "jabber:server:dialback"
NS_DIALBACK_FEATURE: Final = "urn:xmpp:features:dialback"

#: Dialback requests awaiting the driver's verdict (INBOUND), or verify requests awaiting an
#: answer (OUTBOUND), per stream.
MAX_PENDING_DIALBACK: Final = 8
#: Domains that may authenticate on one INBOUND stream (dialback multiplexing).
MAX_STREAM_DOMAINS: Final = 32
#: Failed SASL exchanges per stream before it is closed.
MAX_AUTH_ATTEMPTS: Final = 3
#: A dialback key is 64 hex digits when made as XEP-0185 says; others may be longer.
MAX_KEY_CHARS: Final = 1024
STREAM_ID_BYTES: Final = 12
#: s2s stanzas may be larger than c2s ones (RFC 6120 §13.12 asks for at least 10000 bytes).
S2S_MAX_STANZA_BYTES: Final = 524_288

_PREFIXES: Final = {NS_DIALBACK: "db"}
_DB_RESULT: Final = f"{{{NS_DIALBACK}}}result"
_DB_VERIFY: Final = f"{{{NS_DIALBACK}}}verify"
_STARTTLS: Final = f"{{{NS_TLS}}}starttls"
_PROCEED: Final = f"{{{NS_TLS}}}proceed"
_TLS_FAILURE: Final = f"{{{NS_TLS}}}failure"
_AUTH: Final = f"{{{NS_SASL}}}auth"
_RESPONSE: Final = f"{{{NS_SASL}}}response"
_ABORT: Final = f"{{{NS_SASL}}}abort"
_CHALLENGE: Final = f"{{{NS_SASL}}}challenge"
_SUCCESS: Final = f"{{{NS_SASL}}}success"
_SASL_FAILURE: Final = f"{{{NS_SASL}}}failure"
_FEATURES: Final = f"{{{NS_STREAMS}}}features"
_STREAM_ERROR: Final = f"{{{NS_STREAMS}}}error"
_SERVER_STANZAS: Final = frozenset(
    f"{{{NS_SERVER}}}{kind}" for kind in ("message", "presence", "iq")
)
_HEADER_NAMESPACES: Final = {"db": NS_DIALBACK}


def dialback_key(secret: bytes, receiving: str, originating: str, stream_id: str) -> str:
    """The dialback key XEP-0185 recommends, as hex.

    HMAC-SHA256 keyed with the *hex string* of SHA-256(secret), over "receiving originating
    stream_id" (single spaces). Both readings the XEP warns against (raw digest as key, domains
    swapped) fail its worked example, which the tests check."""
    key = hashlib.sha256(secret).hexdigest().encode("ascii")
    message = f"{receiving} {originating} {stream_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Role(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Phase(enum.Enum):
    PRE_TLS = "pre-tls"
    AWAIT_TLS = "await-tls"
    PRE_AUTH = "pre-auth"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What the driver learned about the peer's certificate in the TLS handshake.

    ``chain_valid``: the chain verified against the trust store and is not expired.
    ``domains``: the domains the leaf names (dNSName, wildcards such as ``*.example.org``
    included, and id-on-xmppAddr), lowercased.
    """

    chain_valid: bool
    domains: frozenset[str]

    def covers(self, domain: str) -> bool:
        """True if the chain verified and the certificate names ``domain`` (RFC 6125 §6.4).

        Exact names match case-insensitively, ignoring a trailing dot. A wildcard matches
        only as the whole leftmost label of a dNSName (``*.example.org`` covers
        ``a.example.org``, not ``example.org`` or ``a.b.example.org``); partial-label
        wildcards (``a*.example.org``) and a lone ``*`` match nothing.
        """
        if not self.chain_valid:
            return False
        name = domain.lower().removesuffix(".")
        if not name or "*" in name:
            return False
        if name in self.domains:
            return True
        label, dot, parent = name.partition(".")
        return bool(label and dot and parent) and f"*.{parent}" in self.domains


@dataclass(frozen=True, slots=True)
class S2SSettings:
    local_domain: str
    dialback_secret: bytes
    limits: xml.XmlLimits = field(
        default_factory=lambda: xml.XmlLimits(max_stanza_bytes=S2S_MAX_STANZA_BYTES)
    )
    tls_required: bool = True  # False only for closed test networks (the driver decides)
    dialback_allowed: bool = True


# ----- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of what ``next_event`` reports."""


@dataclass(frozen=True, slots=True)
class TlsRequested(Event):
    """Send what ``data_to_send()`` holds, run the TLS handshake (server side for INBOUND,
    client side for OUTBOUND), then call ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """INBOUND: stanzas from ``domain`` are now accepted. OUTBOUND: we may now send stanzas to
    the remote domain."""

    domain: str
    method: Literal["sasl-external", "dialback"]


@dataclass(frozen=True, slots=True)
class AuthenticationFailed(Event):
    """OUTBOUND: the peer accepted neither SASL EXTERNAL nor dialback (or the stream ended
    before it did). The stream is not closed for this; the driver closes it."""

    reason: str


@dataclass(frozen=True, slots=True)
class DialbackKeyReceived(Event):
    """INBOUND: the peer asks to be accepted as ``originating`` with ``key``. Verify it (by the
    peer's certificate, XEP-0344, or with a ``<db:verify/>`` to the authoritative server) and
    call ``dialback_result``."""

    originating: str
    receiving: str
    key: str
    stream_id: str


@dataclass(frozen=True, slots=True)
class DialbackVerifyAnswered(Event):
    """OUTBOUND: the authoritative server's answer to ``request_verify``."""

    stream_id: str
    originating: str
    valid: bool


@dataclass(frozen=True, slots=True)
class StanzaReceived(Event):
    """A message, presence or iq, re-namespaced into ``jabber:client``, with 'from' and 'to'
    rewritten in canonical form; ``from_``'s domain authenticated on this stream and ``to``'s
    domain is ours."""

    element: ET.Element
    from_: JID
    to: JID


@dataclass(frozen=True, slots=True)
class StanzaRejected(Event):
    """A stanza was refused with a stanza error (a malformed 'to'). s2s streams are one-way:
    route ``reply`` (in ``jabber:client``, like any stanza the IM layer builds) back to its
    sender over an outbound stream."""

    reply: ET.Element


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The stream is over: we sent a stream error (``by_peer=False``), or the peer closed its
    stream or sent one (``by_peer=True``). Call ``close()`` if the peer closed, then close the
    socket."""

    condition: str | None = None
    by_peer: bool = False
    text: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """The peer's input ended without a stream close (or after we closed ours)."""


# ----- the state machine ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VerifyRequest:
    stream_id: str
    originating: str
    key: str


class S2SStream:
    """One s2s stream, INBOUND or OUTBOUND (see the module docstring)."""

    def __init__(
        self,
        settings: S2SSettings,
        role: Role,
        *,
        remote_domain: str | None = None,
        direct_tls: bool = False,
        verify_only: bool = False,
        entropy: Callable[[int], bytes],
    ) -> None:
        if role is Role.OUTBOUND and not remote_domain:
            raise ValueError("an OUTBOUND stream needs remote_domain")
        self.settings = settings
        #: OUTBOUND: the stream only carries ``request_verify`` questions (XEP-0220 §2.3) and
        #: never authenticates itself: a check must not set off the peer's own checks of us.
        self.verify_only = verify_only
        self.role = role
        self.remote_domain = remote_domain.lower() if remote_domain else None
        self._entropy = entropy
        self.phase = Phase.AWAIT_TLS if direct_tls else Phase.PRE_TLS
        self.tls_active = False
        self.peer_certificate: PeerCertificate | None = None
        #: The id dialback keys are made for: ours (INBOUND) or the peer's (OUTBOUND).
        self.stream_id = ""
        #: The id of the peer's last stream header (OUTBOUND); None on INBOUND.
        self.peer_stream_id: str | None = None
        #: The 'from' of the peer's last stream header (INBOUND), or the remote domain.
        self.peer_domain: str | None = self.remote_domain
        self.peer_closed = False  # the peer ended its stream; we have not closed ours yet
        self._parser = xml.StreamParser(settings.limits)
        self._header_sent = False  # on the current stream (reset by every restart)
        self._features_seen = False
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._authenticated: set[str] = set()
        self._lost_reported = False
        # INBOUND
        self._pending_dialback: list[DialbackKeyReceived] = []
        self._external_offered = False
        self._sasl_pending = False  # <auth/> without initial response: a <response/> is due
        self._auth_failures = 0
        # OUTBOUND
        self._starttls_sent = False
        self._method: Literal["sasl-external", "dialback"] | None = None
        self._sasl_succeeded = False
        self._dialback_possible = False  # the peer offers dialback (feature or xmlns:db)
        self._auth_failed = False
        self._verifies_queued: list[_VerifyRequest] = []
        self._verifies_sent: list[_VerifyRequest] = []

    # ----- driver API ------------------------------------------------------------------------

    def start(self) -> None:
        """OUTBOUND: queue our stream header (after TLS for direct TLS, where
        ``tls_established`` sends it). INBOUND: nothing to do. Idempotent."""
        if self.role is Role.OUTBOUND and self.phase is Phase.PRE_TLS and not self._header_sent:
            self._send_header()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""``: its input ended."""
        if self.phase is Phase.CLOSED or self.peer_closed:
            if not data and not self._lost_reported:
                self._lost_reported = True
                self._events.append(ConnectionLost())
            return
        try:
            self._parser.receive_data(data)
        except xml.XmlStreamError as exc:
            self._stream_error(exc.condition, exc.text)

    def next_event(self) -> Event | NeedData:
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
            if parsed is NEED_DATA:
                break
            self._handle(parsed)
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def tls_established(self, peer: PeerCertificate | None) -> None:
        """The TLS handshake is done; ``peer`` is what the peer's certificate proved (None if
        it sent none). Restarts the stream; OUTBOUND sends its new header."""
        if self.phase is not Phase.AWAIT_TLS:
            raise RuntimeError(f"tls_established() in phase {self.phase.value}")
        self.tls_active = True
        self.peer_certificate = peer
        self._restart(Phase.PRE_AUTH)

    def dialback_result(self, domain: str, valid: bool, *, error: str | None = None) -> None:
        """INBOUND: the verdict on a `DialbackKeyReceived` for ``domain``: ``<db:result
        type='valid'|'invalid'/>``, or ``type='error'`` with the stanza error ``error`` (e.g.
        ``remote-server-not-found`` when the authoritative server could not be asked).
        ``valid`` authenticates ``domain``. Ignored once the stream is over."""
        if self.role is not Role.INBOUND:
            raise RuntimeError("dialback_result() is for INBOUND streams")
        if self.phase is Phase.CLOSED or self.peer_closed:
            return
        domain = domain.lower()
        for index, request in enumerate(self._pending_dialback):
            if request.originating == domain:
                del self._pending_dialback[index]
                break
        else:
            raise RuntimeError(f"no dialback request from {domain!r} is pending")
        answer = ET.Element(_DB_RESULT, {"from": self.settings.local_domain, "to": domain})
        if error is not None:
            answer.set("type", "error")
            answer.append(_stanza_error(error))
        else:
            answer.set("type", "valid" if valid else "invalid")
        self._send_element(answer)
        if valid and error is None:
            self._authenticate_peer(domain, "dialback")

    def request_verify(self, stream_id: str, originating: str, key: str) -> None:
        """OUTBOUND: ask the peer, authoritative for ``originating``, whether ``key`` is its key
        for our inbound stream ``stream_id`` (XEP-0220 §2.3). Sent once the stream may carry
        it; answered with `DialbackVerifyAnswered`. Dropped once the stream is over."""
        if self.role is not Role.OUTBOUND:
            raise RuntimeError("request_verify() is for OUTBOUND streams")
        if self.phase is Phase.CLOSED or self.peer_closed:
            return
        if len(self._verifies_queued) + len(self._verifies_sent) >= MAX_PENDING_DIALBACK:
            raise RuntimeError(f"more than {MAX_PENDING_DIALBACK} verify requests outstanding")
        self._verifies_queued.append(_VerifyRequest(stream_id, originating.lower(), key))
        self._flush_verifies()

    def send_stanza(self, element: ET.Element) -> None:
        """OUTBOUND, READY: send a stanza built in ``jabber:client`` (it is written in
        ``jabber:server``; the element is not modified). It needs 'from' and 'to'. Dropped
        once the stream is over."""
        if self.phase is Phase.CLOSED or self.peer_closed:
            return
        if self.role is not Role.OUTBOUND or self.phase is not Phase.READY:
            raise RuntimeError(
                f"send_stanza() on a {self.role.value} stream in phase {self.phase.value}"
            )
        if not element.get("from") or not element.get("to"):
            raise ValueError("a stanza between servers needs 'from' and 'to'")
        self._send_element(_renamespaced(element, NS_CLIENT, NS_SERVER))

    def close(self) -> None:
        """End the stream cleanly from our side (``</stream:stream>``). During a TLS handshake
        nothing can be said: the stream just ends."""
        if self.phase is Phase.AWAIT_TLS:
            self.phase = Phase.CLOSED
        elif self.phase is not Phase.CLOSED:
            if not self._header_sent:
                self._send_header()
            self._out.append(xml.STREAM_CLOSE)
            self.phase = Phase.CLOSED

    def fail(self, condition: str, text: str | None = None) -> None:
        """End the stream with a stream error (e.g. policy-violation, connection-timeout)."""
        self._stream_error(condition, text, report=False)

    @property
    def authenticated(self) -> frozenset[str]:
        """Domains allowed as 'from' (INBOUND); the remote domain once READY (OUTBOUND)."""
        return frozenset(self._authenticated)

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY

    # ----- internals: output, restarts, errors ----------------------------------------------

    def _send_element(self, element: ET.Element) -> None:
        # Dialback elements as db:result / db:verify: the prefix the header declares, which
        # ejabberd matches literally (an unprefixed element in that namespace it ignores).
        self._out.append(xml.serialize(element, default_ns=NS_SERVER, prefixes=_PREFIXES))

    def _send_header(self) -> None:
        self._header_sent = True
        if self.role is Role.OUTBOUND:
            to, id_ = self.remote_domain, None
        else:
            self.stream_id = base64.urlsafe_b64encode(self._entropy(STREAM_ID_BYTES)).decode()
            to, id_ = self.peer_domain, self.stream_id
        self._out.append(
            xml.stream_header(
                from_=self.settings.local_domain,
                to=to,
                id_=id_,
                content_ns=NS_SERVER,
                namespaces=_HEADER_NAMESPACES,
            )
        )

    def _restart(self, phase: Phase) -> None:
        self.phase = phase
        self._header_sent = False
        self._features_seen = False
        # Reused rather than replaced (see the c2s core); input after the restart point that
        # already broke the old document is discarded with it.
        try:
            self._parser.reset()
        except (xml.XmlStreamError, RuntimeError):
            self._parser = xml.StreamParser(self.settings.limits)
        if self.role is Role.OUTBOUND:
            self._send_header()

    def _stream_error(self, condition: str, text: str | None, *, report: bool = True) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.AWAIT_TLS:  # (fail() during a handshake) nothing can be said
            self.phase = Phase.CLOSED
            return
        if not self._header_sent:
            self._send_header()
        self._out.append(xml.stream_error(condition, text))
        self._out.append(xml.STREAM_CLOSE)
        self.phase = Phase.CLOSED
        if report:
            self._report_unauthenticated(f"we sent stream error {condition}: {text}")
            self._events.append(StreamEnded(condition, False, text))

    def _report_unauthenticated(self, reason: str) -> None:
        """An OUTBOUND stream ending before it authenticated says so first."""
        if self.role is Role.OUTBOUND and not self._authenticated and not self._auth_failed:
            self._auth_failed = True
            self._events.append(AuthenticationFailed(reason))

    # ----- parser events -----------------------------------------------------------------------

    def _handle(self, parsed: xml.Event) -> None:
        if isinstance(parsed, xml.StreamOpened):
            if self.role is Role.INBOUND:
                self._on_inbound_header(parsed)
            else:
                self._on_outbound_header(parsed)
        elif isinstance(parsed, xml.StanzaReceived):
            self._on_element(parsed.element)
        elif isinstance(parsed, xml.StreamClosed):
            # Our closing tag waits for the driver's close(), as in the c2s core.
            self.peer_closed = True
            self._report_unauthenticated("the peer closed the stream")
            self._events.append(StreamEnded(None, True, None))
        else:  # xml.ConnectionClosed, the only other event the parser has
            self.phase = Phase.CLOSED
            self._lost_reported = True
            self._report_unauthenticated("the connection was lost")
            self._events.append(ConnectionLost())

    def _on_inbound_header(self, opened: xml.StreamOpened) -> None:
        peer = _domain_or_none(opened.from_)
        self.peer_domain = peer
        self._send_header()
        if opened.content_ns != NS_SERVER:
            self._stream_error("invalid-namespace", "the content namespace must be jabber:server")
        elif _domain_or_none(opened.to) != self.settings.local_domain:
            self._stream_error("host-unknown", f"this server serves {self.settings.local_domain}")
        elif opened.from_ is not None and peer is None:
            self._stream_error("invalid-from", "the stream header's 'from' is not a domain")
        elif not _version_ok(opened.version):
            self._stream_error("unsupported-version", "XMPP 1.0 is required")
        else:
            self._send_element(self._inbound_features())

    def _inbound_features(self) -> ET.Element:
        features = ET.Element(_FEATURES)
        self._external_offered = False
        if self.phase is Phase.PRE_TLS:
            starttls = ET.SubElement(features, _STARTTLS)
            if self.settings.tls_required:
                ET.SubElement(starttls, f"{{{NS_TLS}}}required")
                return features
        elif self.phase is Phase.READY:
            return features  # after SASL success: nothing left to negotiate
        cert = self.peer_certificate
        if (
            self.tls_active
            and self.peer_domain is not None
            and cert is not None
            and cert.covers(self.peer_domain)
            and self._auth_failures == 0
        ):
            self._external_offered = True
            mechanisms = ET.SubElement(features, f"{{{NS_SASL}}}mechanisms")
            ET.SubElement(mechanisms, f"{{{NS_SASL}}}mechanism").text = "EXTERNAL"
        if self.settings.dialback_allowed:
            dialback = ET.SubElement(features, f"{{{NS_DIALBACK_FEATURE}}}dialback")
            ET.SubElement(dialback, f"{{{NS_DIALBACK_FEATURE}}}errors")
        return features

    def _on_outbound_header(self, opened: xml.StreamOpened) -> None:
        if opened.content_ns != NS_SERVER:
            self._stream_error("invalid-namespace", "the content namespace must be jabber:server")
        elif opened.from_ is not None and _domain_or_none(opened.from_) != self.remote_domain:
            self._stream_error("invalid-from", f"we asked for {self.remote_domain}")
        elif not _version_ok(opened.version):
            self._stream_error("unsupported-version", "XMPP 1.0 is required")
        elif not opened.id:
            self._stream_error("invalid-xml", "the stream header has no id")
        else:
            self.peer_stream_id = self.stream_id = opened.id
            self._dialback_possible = NS_DIALBACK in opened.namespaces.values()

    def _on_element(self, element: ET.Element) -> None:
        tag = element.tag
        if tag == _STREAM_ERROR:
            self._on_peer_stream_error(element)
            return
        if self.role is Role.INBOUND:
            routes = _INBOUND_ROUTES[self.phase]
            if self.phase is Phase.PRE_TLS and not self.settings.tls_required:
                routes = _INBOUND_PLAINTEXT_ROUTES
        else:
            routes = _OUTBOUND_ROUTES[self.phase]
        handler = routes.get(tag)
        if handler is not None:
            handler(self, element)
        elif routes is _INBOUND_ROUTES[Phase.PRE_TLS]:  # TLS is required
            self._stream_error("policy-violation", "STARTTLS is required first")
        elif tag in _SERVER_STANZAS and self.phase is not Phase.READY:
            self._stream_error("not-authorized", "authenticate first")
        else:
            self._stream_error("unsupported-stanza-type", f"{_clip(tag)} is not expected here")

    def _on_peer_stream_error(self, element: ET.Element) -> None:
        condition: str | None = None
        text: str | None = None
        for child in element:
            namespace, _, local = child.tag[1:].partition("}")
            if namespace != NS_STREAM_ERRORS:
                continue
            if local == "text":
                text = (child.text or "")[:256]
            elif condition is None:
                condition = local
        self.peer_closed = True
        self._report_unauthenticated(f"the peer sent stream error {condition}")
        self._events.append(StreamEnded(condition or "undefined-condition", True, text))

    def _out_of_sequence(self, element: ET.Element) -> None:
        self._stream_error("undefined-condition", f"{_clip(element.tag)} out of sequence")

    # ----- INBOUND: STARTTLS, SASL EXTERNAL ----------------------------------------------------

    def _on_starttls(self, element: ET.Element) -> None:
        if self._parser.has_pending_input:
            # Bytes sent after <starttls/> must not be taken as arriving under TLS.
            self._stream_error("policy-violation", "data after <starttls/>")
            return
        self._out.append(xml.serialize(ET.Element(_PROCEED), default_ns=NS_SERVER))
        self.phase = Phase.AWAIT_TLS
        self._events.append(TlsRequested())

    def _on_auth(self, element: ET.Element) -> None:
        if self._sasl_pending:
            self._out_of_sequence(element)
        elif element.get("mechanism") != "EXTERNAL" or not self._external_offered:
            self._sasl_failure("invalid-mechanism")
        else:
            self._sasl_step(element)

    def _on_sasl_response(self, element: ET.Element) -> None:
        if not self._sasl_pending:
            self._out_of_sequence(element)
            return
        self._sasl_pending = False
        if element.tag == _ABORT:
            self._sasl_failure("aborted")
        else:
            self._sasl_step(element, response=True)

    def _sasl_step(self, element: ET.Element, *, response: bool = False) -> None:
        try:
            payload = decode_sasl_payload(element.text or "")
        except SaslError as exc:
            self._sasl_failure(exc.failure.condition)
            return
        if payload is None and not response:
            # No initial response: RFC 6120 §6.4.2 has us send an empty challenge.
            self._sasl_pending = True
            self._out.append(xml.serialize(ET.Element(_CHALLENGE), default_ns=NS_SERVER))
            return
        domain = self.peer_domain
        assert domain is not None  # EXTERNAL is offered only for a known 'from'
        try:
            authzid = payload.decode() if payload else ""
        except UnicodeDecodeError:
            self._sasl_failure("incorrect-encoding")
            return
        if authzid and _domain_or_none(authzid) != domain:
            self._sasl_failure("invalid-authzid")
            return
        self._out.append(xml.serialize(ET.Element(_SUCCESS), default_ns=NS_SERVER))
        self._external_offered = False
        self._authenticate_peer(domain, "sasl-external")
        self._restart(Phase.READY)

    def _sasl_failure(self, condition: str) -> None:
        failure = ET.Element(_SASL_FAILURE)
        ET.SubElement(failure, f"{{{NS_SASL}}}{condition}")
        self._out.append(xml.serialize(failure, default_ns=NS_SERVER))
        self._external_offered = False  # one try; dialback may follow
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_ATTEMPTS:
            self._stream_error("policy-violation", "too many failed authentication attempts")

    def _authenticate_peer(self, domain: str, method: Literal["sasl-external", "dialback"]) -> None:
        self._authenticated.add(domain)
        self.phase = Phase.READY
        self._events.append(Authenticated(domain, method))

    # ----- INBOUND: dialback -------------------------------------------------------------------

    def _on_dialback_request(self, element: ET.Element) -> None:
        if not self.settings.dialback_allowed:
            self._stream_error("policy-violation", "dialback is not accepted here")
            return
        if element.get("type") is not None:
            self._out_of_sequence(element)  # an answer, on a stream that asked nothing
            return
        originating = _domain_or_none(element.get("from"))
        if originating is None:
            self._stream_error("invalid-from", "<db:result/> needs a 'from' domain")
            return
        key = (element.text or "").strip()
        if _domain_or_none(element.get("to")) != self.settings.local_domain:
            self._dialback_error(element, "item-not-found")
        elif not key or len(key) > MAX_KEY_CHARS:
            self._dialback_error(element, "bad-request")
        elif originating in self._authenticated:
            self._dialback_answer(element, "valid")  # nothing new to prove
        elif len(self._pending_dialback) >= MAX_PENDING_DIALBACK:
            self._stream_error("policy-violation", "too many dialback requests pending")
        elif len(self._authenticated) + len(self._pending_dialback) >= MAX_STREAM_DOMAINS:
            self._stream_error("policy-violation", "too many domains on one stream")
        else:
            request = DialbackKeyReceived(
                originating, self.settings.local_domain, key, self.stream_id
            )
            self._pending_dialback.append(request)
            self._events.append(request)

    def _on_verify_request(self, element: ET.Element) -> None:
        receiving = _domain_or_none(element.get("from"))
        stream_id = element.get("id") or ""
        key = (element.text or "").strip()
        if element.get("type") is not None:
            self._out_of_sequence(element)
        elif receiving is None:
            self._stream_error("invalid-from", "<db:verify/> needs a 'from' domain")
        elif _domain_or_none(element.get("to")) != self.settings.local_domain:
            self._dialback_error(element, "item-not-found")
        elif not stream_id or not key or len(key) > MAX_KEY_CHARS:
            self._dialback_error(element, "bad-request")
        else:
            expected = dialback_key(
                self.settings.dialback_secret, receiving, self.settings.local_domain, stream_id
            )
            valid = hmac.compare_digest(expected.encode(), key.encode())
            self._dialback_answer(element, "valid" if valid else "invalid")

    def _dialback_answer(self, request: ET.Element, result: str) -> None:
        answer = ET.Element(
            request.tag,
            {"from": self.settings.local_domain, "to": request.get("from", ""), "type": result},
        )
        if (stream_id := request.get("id")) is not None:
            answer.set("id", stream_id)
        self._send_element(answer)

    def _dialback_error(self, request: ET.Element, condition: str) -> None:
        """XEP-0220 §2.4 errors (we advertise ``<errors/>``): addresses swapped."""
        answer = ET.Element(request.tag, {"type": "error"})
        for ours, theirs in (("from", "to"), ("to", "from")):
            if (value := request.get(theirs)) is not None:
                answer.set(ours, value)
        if (stream_id := request.get("id")) is not None:
            answer.set("id", stream_id)
        answer.append(_stanza_error(condition))
        self._send_element(answer)

    # ----- INBOUND (and ready OUTBOUND): stanzas ----------------------------------------------

    def _on_stanza(self, stanza: ET.Element) -> None:
        sender, recipient = stanza.get("from"), stanza.get("to")
        if not sender or not recipient:
            self._stream_error("improper-addressing", "stanzas need 'from' and 'to'")
            return
        try:
            from_ = JID.parse(sender)
        except JIDError:
            self._stream_error("invalid-from", "'from' is not a valid JID")
            return
        if from_.domain not in self._authenticated:
            self._stream_error("invalid-from", f"{_clip(from_.domain)} is not authenticated here")
            return
        _renamespace_in_place(stanza, NS_SERVER, NS_CLIENT)
        stanza.set("from", str(from_))
        try:
            to = JID.parse(recipient)
        except JIDError as exc:
            if stanza.get("type") != "error":
                reply = error_reply(stanza, "jid-malformed", text=str(exc))
                reply.set("from", self.settings.local_domain)
                self._events.append(StanzaRejected(reply))
            return
        if to.domain != self.settings.local_domain:
            self._stream_error("host-unknown", f"this server serves {self.settings.local_domain}")
            return
        stanza.set("to", str(to))
        self._events.append(StanzaReceived(stanza, from_, to))

    # ----- OUTBOUND ----------------------------------------------------------------------------

    def _on_features(self, features: ET.Element) -> None:
        if self._features_seen:
            self._out_of_sequence(features)
            return
        self._features_seen = True
        if self.phase is Phase.AUTHENTICATING:  # the stream restarted after SASL success
            self._become_ready()
            return
        if features.find(f"{{{NS_DIALBACK_FEATURE}}}dialback") is not None:
            self._dialback_possible = True
        offers_tls = features.find(_STARTTLS) is not None
        if self.phase is Phase.PRE_TLS and offers_tls:
            self._starttls_sent = True
            self._out.append(xml.serialize(ET.Element(_STARTTLS), default_ns=NS_SERVER))
            return
        if self.phase is Phase.PRE_TLS and self.settings.tls_required:
            self._stream_error("policy-violation", "TLS is required")
            return
        mechanisms = {m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")}
        self.phase = Phase.PRE_AUTH
        self._flush_verifies()
        if self.verify_only:
            return
        if "EXTERNAL" in mechanisms and self.tls_active:
            self._method = "sasl-external"
            self.phase = Phase.AUTHENTICATING
            authzid = base64.b64encode(self.settings.local_domain.encode()).decode()
            auth = ET.Element(_AUTH, {"mechanism": "EXTERNAL"})
            auth.text = authzid
            self._out.append(xml.serialize(auth, default_ns=NS_SERVER))
        else:
            self._try_dialback("the peer offers no SASL EXTERNAL")

    def _try_dialback(self, why_not_sasl: str) -> None:
        if not self.settings.dialback_allowed:
            self._give_up(f"{why_not_sasl}, and dialback is disabled")
            return
        if not self._dialback_possible:
            self._give_up(f"{why_not_sasl}, nor dialback")
            return
        assert self.remote_domain is not None
        key = dialback_key(
            self.settings.dialback_secret,
            self.remote_domain,
            self.settings.local_domain,
            self.stream_id,
        )
        request = ET.Element(
            _DB_RESULT, {"from": self.settings.local_domain, "to": self.remote_domain}
        )
        request.text = key
        self._method = "dialback"
        self.phase = Phase.AUTHENTICATING
        self._send_element(request)
        self._flush_verifies()

    def _give_up(self, reason: str) -> None:
        self.phase = Phase.PRE_AUTH
        self._method = None
        self._report_unauthenticated(reason)

    def _on_proceed(self, element: ET.Element) -> None:
        if not self._starttls_sent:
            self._out_of_sequence(element)
        elif self._parser.has_pending_input:
            self._stream_error("policy-violation", "data after <proceed/>")
        else:
            self._starttls_sent = False
            self.phase = Phase.AWAIT_TLS
            self._events.append(TlsRequested())

    def _on_tls_failure(self, element: ET.Element) -> None:
        # RFC 6120 §5.4.2.2: the peer closes the stream after <failure/>.
        self._report_unauthenticated("the peer refused STARTTLS")
        self._out.append(xml.STREAM_CLOSE)
        self.phase = Phase.CLOSED

    def _on_sasl_outcome(self, element: ET.Element) -> None:
        if self._method != "sasl-external" or self._sasl_succeeded:
            self._out_of_sequence(element)
        elif element.tag == _SUCCESS:
            self._sasl_succeeded = True
            self._restart(Phase.AUTHENTICATING)
        elif element.tag == _CHALLENGE:
            # We sent an initial response; a server asking again gets the empty one.
            response = ET.Element(_RESPONSE)
            response.text = "="
            self._out.append(xml.serialize(response, default_ns=NS_SERVER))
        else:
            condition = next(iter(element), None)
            reason = condition.tag.partition("}")[2] if condition is not None else "failure"
            self._try_dialback(f"SASL EXTERNAL failed ({reason})")

    def _on_dialback_answer(self, element: ET.Element) -> None:
        if self._method != "dialback":
            self._out_of_sequence(element)
        elif element.get("type") == "valid":
            self._become_ready()
        else:
            self._give_up(f"dialback refused (type={_clip(element.get('type') or '')})")

    def _become_ready(self) -> None:
        assert self.remote_domain is not None
        assert self._method is not None
        self.phase = Phase.READY
        self._authenticated.add(self.remote_domain)
        self._events.append(Authenticated(self.remote_domain, self._method))
        self._flush_verifies()

    def _flush_verifies(self) -> None:
        may_send = self._features_seen and (
            self.phase in (Phase.PRE_AUTH, Phase.READY)
            or (self.phase is Phase.AUTHENTICATING and self._method == "dialback")
        )
        if not may_send:
            return
        for request in self._verifies_queued:
            verify = ET.Element(
                _DB_VERIFY,
                {
                    "from": self.settings.local_domain,
                    "to": request.originating,
                    "id": request.stream_id,
                },
            )
            verify.text = request.key
            self._send_element(verify)
        self._verifies_sent.extend(self._verifies_queued)
        self._verifies_queued.clear()

    def _on_verify_answer(self, element: ET.Element) -> None:
        originating = _domain_or_none(element.get("from"))
        stream_id = element.get("id")
        for index, request in enumerate(self._verifies_sent):
            if request.originating == originating and request.stream_id == stream_id:
                del self._verifies_sent[index]
                valid = element.get("type") == "valid"
                self._events.append(DialbackVerifyAnswered(request.stream_id, originating, valid))
                return
        # An answer to nothing we asked: ignored (it proves nothing either way).


_INBOUND_ROUTES: Final[Mapping[Phase, Mapping[str, Callable[[S2SStream, ET.Element], None]]]] = {
    Phase.PRE_TLS: {_STARTTLS: S2SStream._on_starttls},
    Phase.AWAIT_TLS: {},
    Phase.PRE_AUTH: {
        _AUTH: S2SStream._on_auth,
        _RESPONSE: S2SStream._on_sasl_response,
        _ABORT: S2SStream._on_sasl_response,
        _DB_RESULT: S2SStream._on_dialback_request,
        _DB_VERIFY: S2SStream._on_verify_request,
    },
    Phase.AUTHENTICATING: {},
    Phase.READY: {
        **dict.fromkeys(_SERVER_STANZAS, S2SStream._on_stanza),
        _DB_RESULT: S2SStream._on_dialback_request,
        _DB_VERIFY: S2SStream._on_verify_request,
    },
    Phase.CLOSED: {},
}
# PRE_TLS where TLS is optional: STARTTLS, or dialback without it (no SASL: EXTERNAL needs TLS).
_INBOUND_PLAINTEXT_ROUTES: Final[Mapping[str, Callable[[S2SStream, ET.Element], None]]] = {
    _STARTTLS: S2SStream._on_starttls,
    _AUTH: S2SStream._on_auth,
    _DB_RESULT: S2SStream._on_dialback_request,
    _DB_VERIFY: S2SStream._on_verify_request,
}
_OUTBOUND_ROUTES: Final[Mapping[Phase, Mapping[str, Callable[[S2SStream, ET.Element], None]]]] = {
    Phase.PRE_TLS: {
        _FEATURES: S2SStream._on_features,
        _PROCEED: S2SStream._on_proceed,
        _TLS_FAILURE: S2SStream._on_tls_failure,
    },
    Phase.AWAIT_TLS: {},
    Phase.PRE_AUTH: {
        _FEATURES: S2SStream._on_features,
        _DB_VERIFY: S2SStream._on_verify_answer,
    },
    Phase.AUTHENTICATING: {
        _FEATURES: S2SStream._on_features,
        _SUCCESS: S2SStream._on_sasl_outcome,
        _SASL_FAILURE: S2SStream._on_sasl_outcome,
        _CHALLENGE: S2SStream._on_sasl_outcome,
        _DB_RESULT: S2SStream._on_dialback_answer,
        _DB_VERIFY: S2SStream._on_verify_answer,
    },
    Phase.READY: {
        **dict.fromkeys(_SERVER_STANZAS, S2SStream._on_stanza),
        _DB_VERIFY: S2SStream._on_verify_answer,
    },
    Phase.CLOSED: {},
}


# ----- helpers ---------------------------------------------------------------------------------


def _domain_or_none(text: str | None) -> str | None:
    """``text`` as a canonical bare domain, or None if it is absent or not one."""
    if not text:
        return None
    try:
        jid = JID.parse(text)
    except JIDError:
        return None
    return jid.domain if not jid.local and not jid.resource else None


def _version_ok(version: str | None) -> bool:
    major, _, minor = (version or "").partition(".")
    return major.isdigit() and minor.isdigit() and int(major) >= 1


def _clip(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _stanza_error(condition: str) -> ET.Element:
    error = ET.Element(f"{{{NS_SERVER}}}error", {"type": "cancel"})
    ET.SubElement(error, f"{{{NS_STANZA_ERRORS}}}{condition}")
    return error


def _renamespace_in_place(element: ET.Element, old: str, new: str) -> None:
    prefix, replacement = f"{{{old}}}", f"{{{new}}}"
    for node in element.iter():
        if node.tag.startswith(prefix):
            node.tag = replacement + node.tag[len(prefix) :]


def _renamespaced(element: ET.Element, old: str, new: str) -> ET.Element:
    """A copy of ``element`` with tags in ``old`` moved to ``new`` (the original is shared)."""
    prefix, replacement = f"{{{old}}}", f"{{{new}}}"
    tag = element.tag
    copy = ET.Element(
        replacement + tag[len(prefix) :] if tag.startswith(prefix) else tag, element.attrib
    )
    copy.text = element.text
    copy.tail = element.tail
    copy.extend(_renamespaced(child, old, new) for child in element)
    return copy
