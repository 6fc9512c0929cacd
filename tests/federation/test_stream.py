"""The s2s stream core, driven with bytes: an OUTBOUND core talks to an INBOUND core through
`Pair` (what one sends, the other receives), and single cores are fed hand-written XML by
`Peer`, which parses their answers as the other server would. Certificates are fakes: the core
only sees what the driver learned from the handshake."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import pytest

from villaged.federation.stream import (
    MAX_AUTH_ATTEMPTS,
    MAX_KEY_CHARS,
    MAX_PENDING_DIALBACK,
    MAX_STREAM_DOMAINS,
    NEED_DATA,
    NS_DIALBACK,
    NS_DIALBACK_FEATURE,
    NS_SERVER,
    Authenticated,
    AuthenticationFailed,
    ConnectionLost,
    DialbackKeyReceived,
    DialbackVerifyAnswered,
    Event,
    PeerCertificate,
    Phase,
    Role,
    S2SSettings,
    S2SStream,
    StanzaReceived,
    StanzaRejected,
    StreamEnded,
    TlsRequested,
    dialback_key,
)
from villaged.xmpp import xml
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import Callable

A, B = "a.example", "b.example"  # A initiates (OUTBOUND), B receives (INBOUND)
SECRET_A, SECRET_B = b"secret of a", b"secret of b"
STREAMS = "http://etherx.jabber.org/streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
CLIENT = "jabber:client"
DB = f"xmlns:db='{NS_DIALBACK}'"

CERT_A = PeerCertificate(True, frozenset({A}))
CERT_B = PeerCertificate(True, frozenset({"*.example"}))
UNTRUSTED_A = PeerCertificate(False, frozenset({A}))


def entropy() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: bytes([next(counter) % 256]) * n


def settings(domain: str, secret: bytes, **kwargs: Any) -> S2SSettings:
    return S2SSettings(domain, secret, **kwargs)


def header(
    frm: str | None = A, to: str | None = B, *, ns: str = NS_SERVER, extra: str = DB, id_: str = ""
) -> bytes:
    attributes = "".join(
        f" {name}='{value}'" for name, value in (("from", frm), ("to", to), ("id", id_)) if value
    )
    return (
        f"<stream:stream xmlns='{ns}' xmlns:stream='{STREAMS}' {extra}{attributes} version='1.0'>"
    ).encode()


def last(events: list[Event]) -> Event:
    return events[-1]


def drain(stream: S2SStream) -> list[Event]:
    events: list[Event] = []
    while (event := stream.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
    return events


class Peer:
    """Plays the other server by hand: feeds ``stream`` bytes, parses what it answers."""

    def __init__(self, stream: S2SStream) -> None:
        self.stream = stream
        self.parser = xml.StreamParser()
        self.opened: list[xml.StreamOpened] = []
        self.received: list[ET.Element] = []
        self.closed = False

    def send(self, data: bytes) -> list[Event]:
        self.stream.receive_data(data)
        events = drain(self.stream)
        self.read()
        return events

    def read(self) -> None:
        out = self.stream.data_to_send()
        if not out:
            return
        self.parser.receive_data(out)
        while (event := self.parser.next_event()) is not xml.NEED_DATA:
            if isinstance(event, xml.StreamOpened):
                self.opened.append(event)
            elif isinstance(event, xml.StanzaReceived):
                self.received.append(event.element)
            elif isinstance(event, xml.StreamClosed):
                self.closed = True

    def restart(self) -> None:
        self.parser = xml.StreamParser()

    def take(self) -> list[ET.Element]:
        got, self.received = self.received, []
        return got

    def stream_error(self) -> str:
        errors = [e for e in self.received if e.tag == f"{{{STREAMS}}}error"]
        assert errors, f"no stream error in {self.received}"
        assert self.closed
        return errors[-1][0].tag.split("}")[1]


def inbound(
    *, cert: PeerCertificate | None = CERT_A, frm: str | None = A, **kwargs: object
) -> Peer:
    """An INBOUND core (serving B) past STARTTLS, its features read."""
    peer = Peer(S2SStream(settings(B, SECRET_B, **kwargs), Role.INBOUND, entropy=entropy()))
    peer.send(header(frm))
    features = peer.take()[-1]
    starttls = features.find(f"{{{TLS}}}starttls")
    assert starttls is not None
    assert starttls.find(f"{{{TLS}}}required") is not None
    assert peer.send(f"<starttls xmlns='{TLS}'/>".encode()) == [TlsRequested()]
    assert peer.take()[-1].tag == f"{{{TLS}}}proceed"
    peer.stream.tls_established(cert)
    peer.restart()
    assert peer.send(header(frm)) == []
    return peer


def outbound(**kwargs: object) -> Peer:
    """An OUTBOUND core (A to B) past STARTTLS, its new header sent."""
    peer = Peer(
        S2SStream(
            settings(A, SECRET_A, **kwargs), Role.OUTBOUND, remote_domain=B, entropy=entropy()
        )
    )
    peer.stream.start()
    peer.stream.start()  # idempotent
    peer.read()
    assert peer.opened[-1].to == B
    assert peer.send(header(B, A, id_="s1")) == []
    peer.send(
        f"<stream:features><starttls xmlns='{TLS}'><required/></starttls>"
        "</stream:features>".encode()
    )
    assert peer.take()[-1].tag == f"{{{TLS}}}starttls"
    assert peer.send(f"<proceed xmlns='{TLS}'/>".encode()) == [TlsRequested()]
    peer.stream.tls_established(CERT_B)
    peer.restart()
    peer.read()
    assert len(peer.opened) == 2
    return peer


FEATURES_DIALBACK = (
    f"<stream:features><dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>"
    "</stream:features>"
).encode()
FEATURES_EXTERNAL = (
    f"<stream:features><mechanisms xmlns='{SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
    f"<dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback></stream:features>"
).encode()


class Pair:
    """An OUTBOUND core and an INBOUND core wired together; TLS "handshakes" when both ask."""

    def __init__(
        self,
        *,
        out_cert: PeerCertificate | None = CERT_A,
        in_cert: PeerCertificate | None = CERT_B,
        out_secret: bytes = SECRET_A,
        frm: str = A,
        to: str = B,
        direct_tls: bool = False,
        verify_only: bool = False,
        out_settings: dict[str, object] | None = None,
        in_settings: dict[str, object] | None = None,
    ) -> None:
        self.outbound = S2SStream(
            settings(frm, out_secret, **(out_settings or {})),
            Role.OUTBOUND,
            remote_domain=to,
            direct_tls=direct_tls,
            verify_only=verify_only,
            entropy=entropy(),
        )
        self.inbound = S2SStream(
            settings(to, b"secret of " + to[0].encode(), **(in_settings or {})),
            Role.INBOUND,
            direct_tls=direct_tls,
            entropy=entropy(),
        )
        self.out_cert, self.in_cert = out_cert, in_cert
        self.out_events: list[Event] = []
        self.in_events: list[Event] = []
        self.wire_out = b""  # everything OUTBOUND sent
        self.wire_in = b""
        if direct_tls:
            self.outbound.tls_established(in_cert)
            self.inbound.tls_established(out_cert)
        self.outbound.start()

    def pump(self) -> None:
        while True:
            to_in, to_out = self.outbound.data_to_send(), self.inbound.data_to_send()
            if not to_in and not to_out:
                return
            self.wire_out += to_in
            self.wire_in += to_out
            if to_in:
                self.inbound.receive_data(to_in)
            self.in_events += drain(self.inbound)
            if to_out:
                self.outbound.receive_data(to_out)
            self.out_events += drain(self.outbound)
            if self.outbound.phase is Phase.AWAIT_TLS and self.inbound.phase is Phase.AWAIT_TLS:
                self.inbound.tls_established(self.out_cert)
                self.outbound.tls_established(self.in_cert)


def message(frm: str = f"alice@{A}/phone", to: str = f"bob@{B}") -> ET.Element:
    stanza = ET.Element(f"{{{CLIENT}}}message", {"from": frm, "to": to, "type": "chat"})
    ET.SubElement(stanza, f"{{{CLIENT}}}body").text = "hi"
    ET.SubElement(stanza, "{urn:example:x}x")
    return stanza


# ----- dialback keys ------------------------------------------------------------------------


def test_dialback_key_matches_the_xep_examples() -> None:
    # XEP-0185 §2 (receiving xmpp.example.com, originating example.org) and XEP-0220 §2.1.1.
    secret = b"s3cr3tf0rd14lb4ck"
    assert dialback_key(secret, "xmpp.example.com", "example.org", "D60000229F") == (
        "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"
    )
    assert dialback_key(secret, "montague.example", "capulet.example", "D60000229F") == (
        "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"
    )


def test_certificate_coverage() -> None:
    assert CERT_A.covers("A.Example")
    assert not CERT_A.covers("b.example")
    assert CERT_B.covers("b.example")
    assert not CERT_B.covers("example")  # a wildcard needs a label to stand for
    assert not CERT_B.covers("x.b.example")  # ... exactly one
    assert not CERT_B.covers(".example")
    assert not UNTRUSTED_A.covers(A)


# ----- happy paths --------------------------------------------------------------------------


def test_starttls_then_external_both_ways_and_stanzas_flow_renamespaced() -> None:
    pair = Pair()
    pair.pump()
    assert pair.out_events == [TlsRequested(), Authenticated(B, "sasl-external")]
    assert pair.in_events == [TlsRequested(), Authenticated(A, "sasl-external")]
    assert pair.outbound.is_ready
    assert pair.inbound.is_ready
    assert pair.outbound.authenticated == frozenset({B})
    assert pair.inbound.authenticated == frozenset({A})
    assert pair.outbound.stream_id == pair.outbound.peer_stream_id == pair.inbound.stream_id
    assert pair.inbound.peer_stream_id is None
    assert pair.inbound.peer_domain == A
    assert b"mechanism='EXTERNAL'>YS5leGFtcGxl</auth>" in pair.wire_out  # base64("a.example")
    assert b"<db:" not in pair.wire_out
    assert b"xmlns:db='jabber:server:dialback'" in pair.wire_in  # both headers declare it

    original = message()
    pair.outbound.send_stanza(original)
    pair.pump()
    assert original.tag == f"{{{CLIENT}}}message"  # the caller's element is left alone
    wire = pair.wire_out.rsplit(b"<message", 1)[1]
    assert b"jabber:client" not in wire
    [event] = pair.in_events[2:]
    assert isinstance(event, StanzaReceived)
    assert event.from_ == JID.parse(f"alice@{A}/phone")
    assert event.to == JID.parse(f"bob@{B}")
    assert event.element.tag == f"{{{CLIENT}}}message"
    assert event.element.findtext(f"{{{CLIENT}}}body") == "hi"
    assert event.element.find("{urn:example:x}x") is not None

    pair.outbound.close()
    pair.pump()
    assert last(pair.in_events) == StreamEnded(None, True, None)
    pair.inbound.close()
    pair.inbound.receive_data(b"")
    assert drain(pair.inbound) == [ConnectionLost()]
    pair.inbound.receive_data(b"")
    assert drain(pair.inbound) == []  # reported once
    pair.outbound.send_stanza(message())  # dropped once the stream is over
    assert pair.outbound.data_to_send() == b""


def test_direct_tls_has_no_starttls_phase() -> None:
    pair = Pair(direct_tls=True)
    pair.pump()
    assert pair.out_events == [Authenticated(B, "sasl-external")]
    assert pair.in_events == [Authenticated(A, "sasl-external")]
    assert b"starttls" not in pair.wire_out + pair.wire_in


def test_dialback_when_the_certificate_does_not_cover_then_verified_by_the_authority() -> None:
    pair = Pair(out_cert=UNTRUSTED_A)
    pair.pump()
    assert b"EXTERNAL" not in pair.wire_in
    assert pair.out_events == [TlsRequested()]
    [_, request] = pair.in_events
    assert isinstance(request, DialbackKeyReceived)
    assert request.originating == A
    assert request.receiving == B
    assert request.stream_id == pair.inbound.stream_id
    assert request.key == dialback_key(SECRET_A, B, A, pair.inbound.stream_id)

    # B asks A's authoritative server over a second pair (B → A), which authenticates itself
    # by dialback too; the verify goes out as soon as that stream has its features.
    reverse = Pair(frm=B, to=A, out_cert=UNTRUSTED_A, in_cert=UNTRUSTED_A)
    reverse.outbound.request_verify(request.stream_id, A, request.key)
    reverse.pump()
    assert DialbackVerifyAnswered(request.stream_id, A, True) in reverse.out_events

    pair.inbound.dialback_result(A, True)
    pair.pump()
    assert last(pair.in_events) == Authenticated(A, "dialback")
    assert last(pair.out_events) == Authenticated(B, "dialback")
    pair.outbound.send_stanza(message())
    pair.pump()
    assert isinstance(last(pair.in_events), StanzaReceived)

    # A second request for an authenticated domain is simply confirmed.
    peer = Peer(pair.inbound)
    peer.parser.receive_data(header(B, A, id_="x"))
    assert peer.send(f"<db:result {DB} from='{A}' to='{B}'>k</db:result>".encode()) == []
    assert peer.take()[-1].get("type") == "valid"


def test_dialback_with_a_wrong_secret_fails() -> None:
    pair = Pair(out_cert=None, out_secret=b"not the secret")
    pair.pump()
    request = last(pair.in_events)
    assert isinstance(request, DialbackKeyReceived)
    # B → A with EXTERNAL: the verify goes out with the features, just before the <auth/>.
    reverse = Pair(frm=B, to=A, out_cert=CERT_B, in_cert=CERT_A)
    reverse.outbound.request_verify(request.stream_id, A, request.key)
    reverse.pump()
    assert reverse.wire_out.index(b"<db:verify") < reverse.wire_out.index(b"<auth")
    assert Authenticated(A, "sasl-external") in reverse.out_events
    assert DialbackVerifyAnswered(request.stream_id, A, False) in reverse.out_events
    pair.inbound.dialback_result(A, False)
    pair.pump()
    failed = last(pair.out_events)
    assert isinstance(failed, AuthenticationFailed)
    assert "dialback refused" in failed.reason
    assert pair.outbound.phase is Phase.PRE_AUTH  # left open: the driver closes it
    assert pair.inbound.authenticated == frozenset()
    with pytest.raises(RuntimeError):
        pair.outbound.send_stanza(message())
    pair.inbound.fail("policy-violation")
    pair.pump()
    assert last(pair.out_events) == StreamEnded("policy-violation", True, None)  # reported once


def test_dialback_error_result_and_a_verify_before_the_answer() -> None:
    pair = Pair(out_cert=None)
    pair.pump()
    # While its own dialback is pending, the OUTBOUND stream may carry verify requests.
    pair.outbound.request_verify("id1", B, "k")
    pair.pump()
    assert last(pair.out_events) == DialbackVerifyAnswered("id1", B, False)
    pair.inbound.dialback_result(A, False, error="remote-server-timeout")
    pair.pump()
    assert b"remote-server-timeout" in pair.wire_in
    assert isinstance(last(pair.out_events), AuthenticationFailed)
    with pytest.raises(RuntimeError):
        pair.inbound.dialback_result(A, True)  # nothing pending any more


def test_sasl_failure_falls_back_to_dialback() -> None:
    peer = outbound()
    peer.send(header(B, A, id_="s2"))
    peer.send(FEATURES_EXTERNAL)
    assert peer.take()[-1].tag == f"{{{SASL}}}auth"
    peer.send(f"<challenge xmlns='{SASL}'/>".encode())
    assert peer.take()[-1].text == "="
    peer.send(f"<failure xmlns='{SASL}'><not-authorized/></failure>".encode())
    result = peer.take()[-1]
    assert result.tag == f"{{{NS_DIALBACK}}}result"
    assert result.text == dialback_key(SECRET_A, B, A, "s2")
    assert peer.send(f"<db:result {DB} from='{B}' to='{A}' type='valid'/>".encode()) == [
        Authenticated(B, "dialback")
    ]


def test_outbound_gives_up_when_dialback_is_disabled() -> None:
    peer = outbound(dialback_allowed=False)
    peer.send(header(B, A, id_="s2"))
    assert peer.send(FEATURES_DIALBACK) == [
        AuthenticationFailed("the peer offers no SASL EXTERNAL, and dialback is disabled")
    ]
    assert peer.send(b"</stream:stream>") == [StreamEnded(None, True, None)]


def test_outbound_sasl_failure_without_dialback_reports_once() -> None:
    peer = outbound()
    peer.send(header(B, A, id_="s2", extra=""))
    peer.send(
        f"<stream:features><mechanisms xmlns='{SASL}'><mechanism>EXTERNAL</mechanism>"
        "</mechanisms></stream:features>".encode()
    )
    events = peer.send(f"<failure xmlns='{SASL}'/>".encode())
    assert events == [AuthenticationFailed("SASL EXTERNAL failed (failure), nor dialback")]
    assert peer.send(b"</stream:stream>") == [StreamEnded(None, True, None)]


def test_optional_tls_dialback_without_tls() -> None:
    pair = Pair(
        out_cert=None,
        out_settings={"tls_required": False},
        in_settings={"tls_required": False},
    )
    # B offers optional STARTTLS; A takes it whenever offered.
    pair.pump()
    assert TlsRequested() in pair.out_events
    # A peer that offers no TLS at all: dialback on the plain stream.
    peer = Peer(
        S2SStream(
            settings(A, SECRET_A, tls_required=False),
            Role.OUTBOUND,
            remote_domain=B,
            entropy=entropy(),
        )
    )
    peer.stream.start()
    peer.send(header(B, A, id_="p1"))
    peer.send(FEATURES_DIALBACK)
    assert peer.take()[-1].tag == f"{{{NS_DIALBACK}}}result"
    # The INBOUND side accepts dialback without TLS when not required.
    plain = Peer(
        S2SStream(settings(B, SECRET_B, tls_required=False), Role.INBOUND, entropy=entropy())
    )
    plain.send(header())
    features = plain.take()[-1]
    assert features.find(f"{{{TLS}}}starttls/{{{TLS}}}required") is None
    assert features.find(f"{{{NS_DIALBACK_FEATURE}}}dialback") is not None
    stanza = f"<message from='u@{A}' to='v@{B}'/>".encode()
    early = Peer(
        S2SStream(settings(B, SECRET_B, tls_required=False), Role.INBOUND, entropy=entropy())
    )
    early.send(header() + stanza)
    assert early.stream_error() == "not-authorized"  # not policy-violation: TLS is optional
    events = plain.send(f"<db:result {DB} from='{A}' to='{B}'>key</db:result>".encode())
    assert isinstance(events[0], DialbackKeyReceived)
    plain.stream.dialback_result(A, True)
    assert drain(plain.stream) == [Authenticated(A, "dialback")]
    assert plain.stream.is_ready
    # ... and refuses SASL there (EXTERNAL needs TLS).
    plain.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth>".encode())
    assert plain.stream_error() == "unsupported-stanza-type"


# ----- INBOUND: SASL EXTERNAL by hand -------------------------------------------------------


def test_external_without_initial_response_and_explicit_authzid() -> None:
    peer = inbound()
    mechanisms = [m.text for m in peer.take()[-1].iter(f"{{{SASL}}}mechanism")]
    assert mechanisms == ["EXTERNAL"]
    assert peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'/>".encode()) == []
    assert peer.take()[-1].tag == f"{{{SASL}}}challenge"
    assert peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'/>".encode()) == [
        StreamEnded(
            "undefined-condition", False, "'{urn:ietf:params:xml:ns:xmpp-sasl}auth' out of sequence"
        )
    ]

    peer = inbound()
    peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'/>".encode())
    events = peer.send(f"<response xmlns='{SASL}'>YS5leGFtcGxl</response>".encode())
    assert events == [Authenticated(A, "sasl-external")]
    peer.restart()
    peer.send(header())
    assert list(peer.take()[-1]) == []  # empty features after SASL


@pytest.mark.parametrize(
    ("auth", "condition"),
    [
        (f"<auth xmlns='{SASL}' mechanism='PLAIN'>=</auth>", "invalid-mechanism"),
        (f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>Yi5leGFtcGxl</auth>", "invalid-authzid"),
        (f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>!!</auth>", "incorrect-encoding"),
        (f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>/w==</auth>", "incorrect-encoding"),
    ],
)
def test_external_failures_then_dialback_remains(auth: str, condition: str) -> None:
    peer = inbound()
    peer.take()
    assert peer.send(auth.encode()) == []
    failure = peer.take()[-1]
    assert failure.tag == f"{{{SASL}}}failure"
    assert failure[0].tag == f"{{{SASL}}}{condition}"
    events = peer.send(f"<db:result {DB} from='{A}' to='{B}'>key</db:result>".encode())
    assert isinstance(events[0], DialbackKeyReceived)


def test_sasl_abort_response_out_of_sequence_and_too_many_attempts() -> None:
    peer = inbound()
    peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'/>".encode())
    peer.send(f"<abort xmlns='{SASL}'/>".encode())
    assert peer.take()[-1][0].tag == f"{{{SASL}}}aborted"
    for _ in range(MAX_AUTH_ATTEMPTS - 1):
        peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth>".encode())
    assert peer.stream_error() == "policy-violation"

    peer = inbound()
    peer.send(f"<response xmlns='{SASL}'>=</response>".encode())
    assert peer.stream_error() == "undefined-condition"


def test_no_external_without_a_covering_certificate_or_from() -> None:
    for cert, frm in ((None, A), (UNTRUSTED_A, A), (CERT_A, None)):
        peer = inbound(cert=cert, frm=frm)
        features = peer.take()[-1]
        assert features.find(f"{{{SASL}}}mechanisms") is None
        assert features.find(f"{{{NS_DIALBACK_FEATURE}}}dialback/") is not None
    peer = inbound(dialback_allowed=False)
    features = peer.take()[-1]
    assert features.find(f"{{{NS_DIALBACK_FEATURE}}}dialback") is None
    peer.send(f"<db:result {DB} from='{A}' to='{B}'>key</db:result>".encode())
    assert peer.stream_error() == "policy-violation"


# ----- INBOUND: dialback requests and verify answers by hand ------------------------------


def test_inbound_answers_verify_requests_itself() -> None:
    peer = inbound()
    key = dialback_key(SECRET_B, "c.example", B, "sid")
    assert (
        peer.send(f"<db:verify {DB} from='c.example' to='{B}' id='sid'>{key}</db:verify>".encode())
        == []
    )
    answer = peer.take()[-1]
    assert answer.tag == f"{{{NS_DIALBACK}}}verify"
    assert (answer.get("from"), answer.get("to"), answer.get("id")) == (B, "c.example", "sid")
    assert answer.get("type") == "valid"
    peer.send(f"<db:verify {DB} from='c.example' to='{B}' id='other'>{key}</db:verify>".encode())
    assert peer.take()[-1].get("type") == "invalid"
    peer.send(f"<db:verify {DB} from='c.example' to='x.example' id='i'>k</db:verify>".encode())
    error = peer.take()[-1]
    assert error.get("type") == "error"
    assert (error.get("from"), error.get("to")) == ("x.example", "c.example")
    assert (
        error.find(f"{{{NS_SERVER}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}item-not-found")
        is not None
    )
    peer.send(f"<db:verify {DB} from='c.example' to='{B}'>k</db:verify>".encode())
    assert peer.take()[-1].find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None


@pytest.mark.parametrize(
    ("element", "condition"),
    [
        (f"<db:verify {DB} to='{B}' id='i'>k</db:verify>", "invalid-from"),
        (f"<db:verify {DB} from='{A}' to='{B}' id='i' type='valid'/>", "undefined-condition"),
        (f"<db:result {DB} to='{B}'>k</db:result>", "invalid-from"),
        (f"<db:result {DB} from='u@{A}' to='{B}'>k</db:result>", "invalid-from"),
        (f"<db:result {DB} from='{A}' to='{B}' type='valid'/>", "undefined-condition"),
        (f"<message xmlns='{NS_SERVER}' from='{A}' to='{B}'/>", "not-authorized"),
        (f"<stream:features xmlns:stream='{STREAMS}'/>", "unsupported-stanza-type"),
    ],
)
def test_inbound_refusals_before_authentication(element: str, condition: str) -> None:
    peer = inbound()
    events = peer.send(element.encode())
    assert events == [StreamEnded(condition, False, events[0].text)]  # type: ignore[attr-defined]
    assert peer.stream_error() == condition


@pytest.mark.parametrize(
    ("to", "key", "condition"),
    [
        ("x.example", "k", "item-not-found"),
        (B, "", "bad-request"),
        (B, "k" * (MAX_KEY_CHARS + 1), "bad-request"),
    ],
)
def test_inbound_dialback_errors(to: str, key: str, condition: str) -> None:
    peer = inbound()
    assert peer.send(f"<db:result {DB} from='{A}' to='{to}'>{key}</db:result>".encode()) == []
    answer = peer.take()[-1]
    assert answer.get("type") == "error"
    assert answer.find(f".//{{urn:ietf:params:xml:ns:xmpp-stanzas}}{condition}") is not None


def test_pending_dialback_requests_and_domains_are_bounded() -> None:
    peer = inbound()
    for n in range(MAX_PENDING_DIALBACK):
        peer.send(f"<db:result {DB} from='d{n}.example' to='{B}'>k</db:result>".encode())
    peer.send(f"<db:result {DB} from='{A}' to='{B}'>k</db:result>".encode())
    assert peer.stream_error() == "policy-violation"
    peer.stream.dialback_result("d0.example", True)  # ignored: the stream is over
    assert drain(peer.stream) == []

    peer = inbound()
    for n in range(MAX_STREAM_DOMAINS):
        peer.send(f"<db:result {DB} from='d{n}.example' to='{B}'>k</db:result>".encode())
        peer.stream.dialback_result(f"d{n}.example", True)
    peer.send(f"<db:result {DB} from='{A}' to='{B}'>k</db:result>".encode())
    assert peer.stream_error() == "policy-violation"
    assert len(peer.stream.authenticated) == MAX_STREAM_DOMAINS


# ----- INBOUND: headers and stanzas ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (header(to="c.example"), "host-unknown"),
        (header(to=None), "host-unknown"),
        (header(ns=CLIENT), "invalid-namespace"),
        (header(frm="not a domain@"), "invalid-from"),
        (header().replace(b"version='1.0'", b"version='0.9'"), "unsupported-version"),
        (header() + f"<message xmlns='{NS_SERVER}'/>".encode(), "policy-violation"),
        (header() + b"<iq", "not-well-formed"),
    ],
)
def test_inbound_header_and_pre_tls_refusals(data: bytes, condition: str) -> None:
    peer = Peer(S2SStream(settings(B, SECRET_B), Role.INBOUND, entropy=entropy()))
    if condition == "not-well-formed":
        peer.send(data)
        events = peer.send(b"<<")
    else:
        events = peer.send(data)
    assert events[-1] == StreamEnded(condition, False, events[-1].text)  # type: ignore[attr-defined]
    assert peer.stream_error() == condition
    assert peer.opened[0].from_ == B
    assert peer.opened[0].id
    assert peer.send(b"more") == []  # nothing after a stream error but the end
    assert peer.send(b"") == [ConnectionLost()]


def test_inbound_data_after_starttls_is_refused() -> None:
    peer = Peer(S2SStream(settings(B, SECRET_B), Role.INBOUND, entropy=entropy()))
    peer.send(header())
    peer.send(f"<starttls xmlns='{TLS}'/><message xmlns='{NS_SERVER}'/>".encode())
    assert peer.stream_error() == "policy-violation"


def ready_inbound() -> Peer:
    peer = inbound()
    peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth>".encode())
    peer.restart()
    peer.send(header())
    peer.take()
    return peer


@pytest.mark.parametrize(
    ("stanza", "condition"),
    [
        (f"<message from='eve@c.example' to='bob@{B}'/>", "invalid-from"),
        (f"<message from='@{A}' to='bob@{B}'/>", "invalid-from"),
        (f"<message to='bob@{B}'/>", "improper-addressing"),
        (f"<message from='alice@{A}'/>", "improper-addressing"),
        (f"<message from='alice@{A}' to='bob@c.example'/>", "host-unknown"),
        (f"<foo from='alice@{A}' to='bob@{B}'/>", "unsupported-stanza-type"),
        (f"<message xmlns='{CLIENT}' from='alice@{A}' to='bob@{B}'/>", "unsupported-stanza-type"),
        (f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth>", "unsupported-stanza-type"),
    ],
)
def test_inbound_stanza_refusals(stanza: str, condition: str) -> None:
    peer = ready_inbound()
    peer.send(stanza.encode())
    assert peer.stream_error() == condition


def test_malformed_to_is_bounced_for_the_driver_to_route() -> None:
    peer = ready_inbound()
    events = peer.send(f"<iq id='q1' type='get' from='alice@{A}/r' to='@{B}'/>".encode())
    [rejected] = events
    assert isinstance(rejected, StanzaRejected)
    reply = rejected.reply
    assert reply.tag == f"{{{CLIENT}}}iq"
    assert (reply.get("from"), reply.get("to"), reply.get("type")) == (B, f"alice@{A}/r", "error")
    assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}jid-malformed") is not None
    assert peer.take() == []  # nothing goes back on the inbound stream
    # An error is never answered with an error.
    assert peer.send(f"<iq type='error' from='alice@{A}' to='@{B}'/>".encode()) == []
    # The stream goes on.
    events = peer.send(f"<presence from='alice@{A}/r' to='bob@{B}'/>".encode())
    assert isinstance(events[0], StanzaReceived)


def test_peer_stream_error_is_reported_as_theirs() -> None:
    peer = ready_inbound()
    events = peer.send(
        b"<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>bye</text><x xmlns='y'/>"
        b"</stream:error>"
    )
    assert events == [StreamEnded("system-shutdown", True, "bye")]
    assert peer.send(b"</stream:stream>") == []  # nothing after the end
    peer.stream.close()
    peer.read()
    assert peer.closed
    peer = ready_inbound()
    assert peer.send(b"<stream:error/>") == [StreamEnded("undefined-condition", True, None)]


def test_oversized_stanzas_break_the_limit() -> None:
    peer = ready_inbound()
    limit = peer.stream.settings.limits.max_stanza_bytes
    assert limit == 512 * 1024
    peer.send(f"<message from='alice@{A}' to='bob@{B}'><body>".encode() + b"x" * limit)
    assert peer.stream_error() == "policy-violation"


# ----- OUTBOUND by hand ---------------------------------------------------------------------


def test_outbound_without_offered_tls_fails_when_tls_is_required() -> None:
    peer = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    peer.stream.start()
    peer.send(header(B, A, id_="s1"))
    events = peer.send(FEATURES_DIALBACK)
    assert isinstance(events[0], AuthenticationFailed)
    assert events[1] == StreamEnded("policy-violation", False, "TLS is required")
    assert peer.stream_error() == "policy-violation"
    assert peer.send(b"") == [ConnectionLost()]


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (header(B, A, ns=CLIENT, id_="s"), "invalid-namespace"),
        (header("c.example", A, id_="s"), "invalid-from"),
        (header(B, A), "invalid-xml"),
        (header(B, A, id_="s").replace(b"'1.0'", b"'0.9'"), "unsupported-version"),
        (header(B, A, id_="s") + f"<proceed xmlns='{TLS}'/>".encode(), "undefined-condition"),
        (header(B, A, id_="s") + b"<message/>", "not-authorized"),
        (header(B, A, id_="s") + b"<foo/>", "unsupported-stanza-type"),
    ],
)
def test_outbound_refusals(data: bytes, condition: str) -> None:
    peer = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    peer.stream.start()
    events = peer.send(data)
    assert isinstance(events[0], AuthenticationFailed)
    assert peer.stream_error() == condition


def test_outbound_sequence_errors_after_tls() -> None:
    peer = outbound()
    peer.send(header(B, A, id_="s2"))
    peer.send(FEATURES_DIALBACK)
    peer.send(FEATURES_DIALBACK)  # twice on one stream
    assert peer.stream_error() == "undefined-condition"

    peer = outbound()
    peer.send(header(B, A, id_="s2"))
    peer.send(FEATURES_DIALBACK)
    peer.send(f"<success xmlns='{SASL}'/>".encode())  # we did not ask for SASL
    assert peer.stream_error() == "undefined-condition"

    peer = outbound()
    peer.send(header(B, A, id_="s2"))
    peer.send(FEATURES_EXTERNAL)
    peer.send(f"<db:result {DB} from='{B}' to='{A}' type='valid'/>".encode())
    assert peer.stream_error() == "undefined-condition"


def test_outbound_tls_refused_and_data_after_proceed() -> None:
    peer = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    peer.stream.start()
    peer.send(header(B, A, id_="s1"))
    peer.send(f"<stream:features><starttls xmlns='{TLS}'/></stream:features>".encode())
    events = peer.send(f"<failure xmlns='{TLS}'/>".encode())
    assert events == [AuthenticationFailed("the peer refused STARTTLS")]
    peer.read()
    assert peer.closed

    peer = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    peer.stream.start()
    peer.send(header(B, A, id_="s1"))
    peer.send(f"<stream:features><starttls xmlns='{TLS}'/></stream:features>".encode())
    peer.send(f"<proceed xmlns='{TLS}'/><stream:features/>".encode())
    assert peer.stream_error() == "policy-violation"


def test_outbound_verify_answers_are_matched() -> None:
    peer = outbound()
    peer.send(header(B, A, id_="s2"))
    peer.send(FEATURES_EXTERNAL)
    peer.stream.receive_data(f"<success xmlns='{SASL}'/>".encode())
    assert drain(peer.stream) == []
    peer.restart()
    peer.read()
    assert peer.opened[-1].to == B
    peer.stream.request_verify("v1", B, "key1")
    assert peer.stream.data_to_send() == b""  # waits for the restarted stream's features
    peer.send(header(B, A, id_="s3"))
    assert peer.send(b"<stream:features/>") == [Authenticated(B, "sasl-external")]
    verify = peer.take()[-1]
    assert (verify.get("to"), verify.get("id"), verify.text) == (B, "v1", "key1")
    # Unknown answers are ignored; the one asked for is reported once.
    assert peer.send(f"<db:verify {DB} from='{B}' to='{A}' id='zz' type='valid'/>".encode()) == []
    assert peer.send(f"<db:verify {DB} from='{B}' to='{A}' id='v1' type='valid'/>".encode()) == [
        DialbackVerifyAnswered("v1", B, True)
    ]
    assert peer.send(f"<db:verify {DB} from='{B}' to='{A}' id='v1' type='valid'/>".encode()) == []
    # The remote may answer on this stream once ready; it is checked as on INBOUND.
    events = peer.send(f"<message from='x@{B}' to='y@{A}'/>".encode())
    assert isinstance(events[0], StanzaReceived)
    assert events[0].element.tag == f"{{{CLIENT}}}message"

    for _ in range(MAX_PENDING_DIALBACK):
        peer.stream.request_verify("v", B, "k")
    with pytest.raises(RuntimeError):
        peer.stream.request_verify("v", B, "k")


def test_role_and_phase_misuse_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="remote_domain"):
        S2SStream(settings(A, SECRET_A), Role.OUTBOUND, entropy=entropy())
    in_stream = S2SStream(settings(B, SECRET_B), Role.INBOUND, entropy=entropy())
    in_stream.start()
    assert in_stream.data_to_send() == b""
    with pytest.raises(RuntimeError):
        in_stream.tls_established(None)
    with pytest.raises(RuntimeError):
        in_stream.request_verify("i", A, "k")
    with pytest.raises(RuntimeError):
        in_stream.send_stanza(message())
    out_stream = S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy())
    with pytest.raises(RuntimeError):
        out_stream.dialback_result(A, True)
    peer = Peer(out_stream)
    ready = Pair()
    ready.pump()
    stanza = message()
    del stanza.attrib["to"]
    with pytest.raises(ValueError, match="'from' and 'to'"):
        ready.outbound.send_stanza(stanza)
    assert peer.stream.phase is Phase.PRE_TLS


def test_closing_and_failing_in_every_state() -> None:
    # close() before anything was said still opens the stream to close it.
    stream = S2SStream(settings(B, SECRET_B), Role.INBOUND, entropy=entropy())
    stream.close()
    stream.close()
    assert stream.data_to_send().endswith(xml.STREAM_CLOSE)
    # During a TLS handshake nothing can be said.
    stream = S2SStream(settings(B, SECRET_B), Role.INBOUND, direct_tls=True, entropy=entropy())
    stream.close()
    assert stream.data_to_send() == b""
    stream = S2SStream(settings(B, SECRET_B), Role.INBOUND, direct_tls=True, entropy=entropy())
    stream.fail("system-shutdown")
    assert stream.data_to_send() == b""
    assert stream.phase is Phase.CLOSED
    # The driver's own fail() is not reported back to it.
    peer = ready_inbound()
    peer.stream.fail("connection-timeout", "idle")
    assert drain(peer.stream) == []
    peer.read()
    assert peer.stream_error() == "connection-timeout"
    # EOF while negotiating an OUTBOUND stream.
    out = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    out.stream.start()
    assert out.send(b"") == [AuthenticationFailed("the connection was lost"), ConnectionLost()]


def test_edge_paths() -> None:
    # Input that breaks the XML after a complete <auth/> is discarded by the SASL restart.
    peer = inbound()
    events = peer.send(f"<auth xmlns='{SASL}' mechanism='EXTERNAL'>=</auth><<".encode())
    assert events == [Authenticated(A, "sasl-external")]
    peer.restart()
    assert peer.send(header()) == []
    # Two chunks before next_event: the second meets the parser's stored error.
    peer = ready_inbound()
    peer.stream.receive_data(b"<<")
    peer.stream.receive_data(b"more")
    assert drain(peer.stream)[-1].condition == "not-well-formed"  # type: ignore[attr-defined]
    # A stream error before the peer's header still opens our stream first.
    peer = Peer(S2SStream(settings(B, SECRET_B), Role.INBOUND, entropy=entropy()))
    peer.send(b"<<")
    assert peer.stream_error() == "not-well-formed"
    assert peer.opened[0].to is None
    peer.stream.fail("system-shutdown")  # already over: nothing more
    assert peer.stream.data_to_send() == b""
    # Verdicts may come in any order; verify requests on a closed stream are dropped.
    peer = inbound()
    peer.send(f"<db:result {DB} from='c.example' to='{B}'>k</db:result>".encode())
    peer.send(f"<db:result {DB} from='{A}' to='{B}'>k</db:result>".encode())
    peer.stream.dialback_result(A.upper(), True)
    assert drain(peer.stream) == [Authenticated(A, "dialback")]
    assert peer.stream.authenticated == frozenset({A})
    out = Peer(S2SStream(settings(A, SECRET_A), Role.OUTBOUND, remote_domain=B, entropy=entropy()))
    out.stream.close()
    out.stream.request_verify("i", B, "k")
    assert out.stream.data_to_send().endswith(xml.STREAM_CLOSE)
    # A verify request without 'to' is answered with an error that has no 'from'.
    peer = inbound()
    peer.send(f"<db:verify {DB} from='c.example' id='i'>k</db:verify>".encode())
    answer = peer.take()[-1]
    assert answer.get("type") == "error"
    assert (answer.get("from"), answer.get("to")) == (None, "c.example")
    # Only the first defined condition of a peer's stream error counts.
    peer = ready_inbound()
    events = peer.send(
        b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"<reset xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
    )
    assert events == [StreamEnded("conflict", True, None)]


@pytest.mark.parametrize("direct_tls", [False, True])
def test_a_verify_only_stream_asks_and_never_authenticates_itself(direct_tls: bool) -> None:
    # The receiving server's check must not make the authoritative server check it in turn.
    pair = Pair(
        frm=B,
        to=A,
        out_cert=UNTRUSTED_A,
        in_cert=UNTRUSTED_A,
        direct_tls=direct_tls,
        verify_only=True,
    )
    key = dialback_key(SECRET_A, B, A, "sid-1")
    pair.outbound.request_verify("sid-1", A, key)
    pair.pump()
    assert DialbackVerifyAnswered("sid-1", A, True) in pair.out_events
    assert b"<db:result" not in pair.wire_out  # no <db:result/>: no dialback of its own
    assert b"<auth" not in pair.wire_out
    assert not any(isinstance(e, Authenticated | DialbackKeyReceived) for e in pair.in_events)


def test_dialback_elements_carry_the_db_prefix_the_header_declares() -> None:
    # ejabberd matches db:result / db:verify literally and ignores them unprefixed.
    pair = Pair(out_cert=UNTRUSTED_A)
    pair.pump()
    assert b"xmlns:db='jabber:server:dialback'" in pair.wire_out
    assert f"<db:result from='{A}' to='{B}'>".encode() in pair.wire_out
    assert b"<result" not in pair.wire_out
