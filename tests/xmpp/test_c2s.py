"""The c2s stream state machine, driven with bytes; what it sends is parsed back as a client
would parse it."""

from __future__ import annotations

import base64
import itertools
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest

from tests.xmpp.scram_client import ScramClient
from villaged.xmpp import xml
from villaged.xmpp.c2s import (
    MAX_AUTH_ATTEMPTS,
    NEED_DATA,
    SM_REQUEST_EVERY,
    AckRequested,
    AuthFailed,
    AuthSucceeded,
    BindRequested,
    C2SStream,
    ClientStateChanged,
    ConnectionLost,
    Event,
    Phase,
    SmEnableRequested,
    SmResumeRequested,
    SmState,
    StanzaReceived,
    StanzaRejected,
    StartTls,
    StreamEnded,
    StreamSettings,
)
from villaged.xmpp.jid import JID
from villaged.xmpp.sasl import SaslError
from villaged.xmpp.scram import ScramCredential, derive_credential

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DOMAIN = "example.org"
PASSWORD = "correct horse"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>"
)
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"

_CREDS = {
    mech: derive_credential(mech, PASSWORD, b"0123456789abcdef", 4096)
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1")
}


def lookup(username: str) -> Mapping[str, ScramCredential] | None:
    return _CREDS if username == "alice" else None


class Client:
    """Feeds the server bytes and parses everything it answers, restarting like a client."""

    def __init__(
        self,
        *,
        direct_tls: bool = False,
        credentials: Callable[[str], Mapping[str, ScramCredential] | None] = lookup,
    ) -> None:
        counter = itertools.count()
        self.server = C2SStream(
            StreamSettings(domain=DOMAIN),
            lookup=credentials,
            entropy=lambda n: bytes([next(counter) % 256]) * n,
            unknown_user_secret=b"s" * 32,
            direct_tls=direct_tls,
        )
        self.parser = xml.StreamParser()
        self.opened: list[xml.StreamOpened] = []
        self.received: list[ET.Element] = []
        self.closed = False
        self.raw = b""

    def send(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        events: list[Event] = []
        while (event := self.server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            events.append(event)
        self._read()
        return events

    def _read(self) -> None:
        out = self.server.data_to_send()
        if not out:
            return  # (b"" would mean end of input to the parser)
        self.raw += out
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
        assert errors, f"no stream error in {self.raw!r}"
        return errors[-1][0].tag.split("}")[1]

    # negotiation steps ------------------------------------------------------------------

    def starttls(self) -> None:
        self.send(HEADER)
        features = self.take()[-1]
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls/") is not None
        events = self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert events == [StartTls()]
        assert self.take()[-1].tag == "{urn:ietf:params:xml:ns:xmpp-tls}proceed"
        self.server.tls_established()
        self.restart()

    def authenticate(
        self, password: str = PASSWORD, mechanism: str = "SCRAM-SHA-256", *, retry: bool = False
    ) -> Event:
        if not retry:  # after a failure the client tries again on the same stream
            self.send(HEADER)
            features = self.take()[-1]
            offered = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
            assert mechanism in offered
        scram = ScramClient(mechanism, "alice", password)
        first = base64.b64encode(scram.client_first()).decode()
        self.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{first}</auth>".encode())
        challenge = self.take()[-1]
        assert challenge.tag == f"{{{SASL}}}challenge"
        final = scram.client_final(base64.b64decode(challenge.text or ""))
        encoded = base64.b64encode(final).decode()
        events = self.send(f"<response xmlns='{SASL}'>{encoded}</response>".encode())
        result = self.take()[-1]
        if isinstance(events[0], AuthSucceeded):
            assert result.tag == f"{{{SASL}}}success"
            assert scram.server_final_is_genuine(base64.b64decode(result.text or ""))
            self.restart()
        return events[0]

    def bind(self, resource: str = "phone") -> JID:
        self.send(HEADER)
        features = self.take()[-1]
        assert features.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
        events = self.send(
            b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            + f"<resource>{resource}</resource></bind></iq>".encode()
        )
        assert events == [BindRequested(resource)]
        jid = JID.parse(f"alice@{DOMAIN}/{resource}")
        self.server.complete_bind(jid)
        self._read()
        reply = self.take()[-1]
        assert reply.get("type") == "result"
        assert reply.get("id") == "b1"
        assert reply.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid") == str(jid)
        return jid

    def ready(self) -> JID:
        self.starttls()
        assert isinstance(self.authenticate(), AuthSucceeded)
        return self.bind()


def test_full_negotiation_then_chat() -> None:
    client = Client()
    jid = client.ready()
    assert client.server.phase is Phase.READY
    assert client.opened[0].from_ == DOMAIN
    assert len({o.id for o in client.opened}) == 3  # a fresh stream id per restart

    events = client.send(
        b"<message to='Bob@Example.org' type='chat' id='m1'><body>h\xc3\xa9 &lt;&amp;&gt;</body>"
        b"</message>"
    )
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, StanzaReceived)
    assert event.kind == "message"
    assert event.stanza.get("from") == str(jid)
    assert event.stanza.get("to") == "bob@example.org"
    assert event.stanza.findtext("{jabber:client}body") == "hé <&>"

    incoming = ET.Element("{jabber:client}message", {"from": "bob@example.org/pc", "to": str(jid)})
    ET.SubElement(incoming, "{jabber:client}body").text = "'quoted' \"text\""
    client.server.send_stanza(incoming)
    client._read()
    got = client.take()
    assert got[-1].findtext("{jabber:client}body") == "'quoted' \"text\""

    assert client.send(b"</stream:stream>") == [StreamEnded(by_peer=True)]
    assert not client.closed, "our closing tag waits for replies still on their way"
    client.server.send_stanza(incoming)  # a late reply still goes out before the close
    client.server.close()
    client._read()
    assert client.take()[-1].findtext("{jabber:client}body") == "'quoted' \"text\""
    assert client.raw.endswith(xml.STREAM_CLOSE)
    assert client.send(b"<message/>") == []  # nothing is read after the peer closed
    client.server.send_stanza(incoming)  # after the end: dropped, nothing sent
    assert client.server.data_to_send() == b""


def test_direct_tls_starts_at_authentication() -> None:
    client = Client(direct_tls=True)
    assert isinstance(client.authenticate(mechanism="SCRAM-SHA-1"), AuthSucceeded)
    client.bind("laptop")


def test_plain_is_offered_only_under_tls() -> None:
    client = Client()
    client.send(HEADER)
    features = client.take()[-1]
    assert features.find(f"{{{SASL}}}mechanisms") is None, "no SASL before STARTTLS"
    client.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    client.server.tls_established()
    client.restart()
    client.send(HEADER)
    offered = [m.text for m in client.take()[-1].iter(f"{{{SASL}}}mechanism")]
    assert offered == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    events = client.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{plain}</auth>".encode())
    assert events == [AuthSucceeded("alice", "PLAIN")]


def test_wrong_password_then_too_many_attempts() -> None:
    client = Client()
    client.starttls()
    for attempt in range(MAX_AUTH_ATTEMPTS):
        event = client.authenticate(password="wrong", retry=attempt > 0)
        assert event == AuthFailed("alice", "SCRAM-SHA-256", "not-authorized")
    assert client.raw.endswith(
        b"<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too many failed authentication "
        b"attempts</text></stream:error></stream:stream>"
    )
    assert client.server.phase is Phase.CLOSED


def test_a_login_the_server_cannot_check_now_is_not_a_failed_attempt() -> None:
    # (A cluster node cut off from the account's shard: villaged.net.c2s raises this.)
    def unreachable(username: str) -> Mapping[str, ScramCredential] | None:
        raise SaslError("temporary-auth-failure", "cannot reach the account's data")

    client = Client(credentials=unreachable)
    client.starttls()
    client.send(HEADER)
    client.take()
    first = base64.b64encode(ScramClient("SCRAM-SHA-256", "alice", PASSWORD).client_first())
    for _ in range(MAX_AUTH_ATTEMPTS + 2):
        auth = f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first.decode()}</auth>"
        events = client.send(auth.encode())
        assert events == [AuthFailed("alice", "SCRAM-SHA-256", "temporary-auth-failure")]
        assert client.take()[-1].find(f"{{{SASL}}}temporary-auth-failure") is not None
    assert client.server.phase is not Phase.CLOSED  # no policy-violation: not guesses


def test_bad_base64_is_incorrect_encoding() -> None:
    client = Client(direct_tls=True)
    client.send(HEADER)
    client.take()
    events = client.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>***</auth>".encode())
    assert events == [AuthFailed(None, "PLAIN", "incorrect-encoding")]
    assert client.take()[-1].find(f"{{{SASL}}}incorrect-encoding") is not None


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (HEADER.replace(b"example.org'", b"elsewhere.org'"), "host-unknown"),
        (HEADER.replace(b" to='example.org'", b""), "host-unknown"),
        (HEADER.replace(b"xmlns='jabber:client'", b"xmlns='jabber:server'"), "invalid-namespace"),
        (HEADER.replace(b"org' version='1.0'>", b"org'>"), "unsupported-version"),
        (HEADER.replace(b"org' version='1.0'>", b"org' version='0.9'>"), "unsupported-version"),
        (b"<!DOCTYPE x><stream:stream/>", "restricted-xml"),
        (b"<<<", "not-well-formed"),
    ],
)
def test_bad_stream_headers(header: bytes, condition: str) -> None:
    client = Client()
    events = client.send(header)
    assert events == [StreamEnded(condition=condition, text=events[0].text)]  # type: ignore[attr-defined]
    assert client.opened, "a stream header is sent before any stream error"
    assert client.stream_error() == condition
    assert client.closed


@pytest.mark.parametrize(
    ("phase_setup", "data", "condition"),
    [
        ("pre-tls", f"<auth xmlns='{SASL}' mechanism='PLAIN'>=</auth>", "policy-violation"),
        ("pre-auth", "<message to='bob@example.org'><body>x</body></message>", "not-authorized"),
        ("pre-bind", "<message to='bob@example.org'><body>x</body></message>", "not-authorized"),
        ("ready", "<foo xmlns='jabber:client'/>", "unsupported-stanza-type"),
        ("ready", "<message xmlns='urn:other'/>", "unsupported-stanza-type"),
        ("ready", "<message from='mallory@example.org/x'><body>x</body></message>", "invalid-from"),
    ],
)
def test_out_of_phase_input_is_a_stream_error(phase_setup: str, data: str, condition: str) -> None:
    client = Client()
    if phase_setup == "pre-tls":
        client.send(HEADER)
    else:
        client.starttls()
        if phase_setup == "pre-auth":
            client.send(HEADER)
        else:
            client.authenticate()
            if phase_setup == "pre-bind":
                client.send(HEADER)
            else:
                client.bind()
    events = client.send(data.encode())
    assert [type(e) for e in events] == [StreamEnded]
    assert client.stream_error() == condition


def test_data_pipelined_after_starttls_is_refused() -> None:
    client = Client()
    client.send(HEADER)
    events = client.send(
        b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='x'/>"
    )
    assert [type(e) for e in events] == [StreamEnded]
    assert client.stream_error() == "policy-violation"
    assert not any(e.tag.endswith("proceed") for e in client.received)


@pytest.mark.parametrize("after", [b"", b"<<not xml", b"<iq type='get' id='early'/>"])
def test_input_after_sasl_success_is_discarded_by_the_restart(after: bytes) -> None:
    client = Client()
    client.starttls()
    client.send(HEADER)
    client.take()
    scram = ScramClient("SCRAM-SHA-256", "alice", PASSWORD)
    first = base64.b64encode(scram.client_first()).decode()
    client.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>".encode())
    challenge = client.take()[-1]
    final = base64.b64encode(scram.client_final(base64.b64decode(challenge.text or "")))
    events = client.send(f"<response xmlns='{SASL}'>{final.decode()}</response>".encode() + after)
    assert [type(e) for e in events] == [AuthSucceeded]
    assert client.take()[-1].tag == f"{{{SASL}}}success"
    client.restart()
    assert client.bind() == JID.parse(f"alice@{DOMAIN}/phone")
    assert client.server.phase is Phase.READY


def test_pre_bind_session_and_bad_requests() -> None:
    client = Client(direct_tls=True)
    client.authenticate()
    client.send(HEADER)
    client.take()
    client.send(
        b"<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
    )
    assert client.take()[-1].get("type") == "result"
    client.send(b"<iq type='get' id='g1'><query xmlns='jabber:iq:roster'/></iq>")
    error = client.take()[-1]
    assert error.get("type") == "error"
    assert error.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}not-authorized") is not None
    client.send(
        b"<iq type='set' id='b0'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<resource>\x07</resource></bind></iq>"
    )
    assert client.stream_error() == "not-well-formed"  # a control character is not XML


def test_bind_refused_and_server_chosen_resource() -> None:
    client = Client(direct_tls=True)
    client.authenticate()
    client.send(HEADER)
    client.take()
    events = client.send(
        b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    assert events == [BindRequested(None)]
    events = client.send(
        b"<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    assert events == []
    assert (
        client.take()[-1].find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}unexpected-request")
        is not None
    )
    client.server.refuse_bind("resource-constraint", "too many resources")
    client._read()
    reply = client.take()[-1]
    assert reply.get("id") == "b1"
    assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None
    with pytest.raises(RuntimeError):
        client.server.complete_bind(JID.parse("alice@example.org/x"))


def test_malformed_to_gets_jid_malformed_and_is_dropped() -> None:
    client = Client()
    client.ready()
    events = client.send(b"<message to='a@b@c' id='m2'><body>x</body></message>")
    assert events == [StanzaRejected()]  # handled here: stream management counts it
    reply = client.take()[-1]
    assert reply.get("type") == "error"
    assert reply.get("id") == "m2"
    assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}jid-malformed") is not None
    assert client.send(b"<message to='a@b@c' type='error'/>") == [StanzaRejected()]
    assert client.take() == []  # errors are not answered


def test_shutdown_and_eof() -> None:
    client = Client()
    client.ready()
    client.server.fail("system-shutdown")
    client._read()
    assert client.stream_error() == "system-shutdown"
    assert client.closed
    client.server.fail("system-shutdown")  # idempotent
    client.server.close()
    assert client.server.data_to_send() == b""

    other = Client()
    other.send(HEADER)
    assert other.send(b"") == [ConnectionLost()]


def test_clean_close_from_our_side() -> None:
    client = Client()
    client.ready()
    client.server.close()
    client._read()
    assert client.closed
    assert client.send(b"<message/>") == []


# ----- framed mode (XMPP over WebSocket, RFC 7395) ------------------------------------------

FRAMED_OPEN = b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.org' version='1.0'/>"


class FramedClient:
    """Like Client, but every message in either direction is one standalone document."""

    def __init__(self) -> None:
        counter = itertools.count()
        self.server = C2SStream(
            StreamSettings(domain=DOMAIN),
            lookup=lookup,
            entropy=lambda n: bytes([next(counter) % 256]) * n,
            unknown_user_secret=b"s" * 32,
            direct_tls=True,
            framed=True,
        )
        self.messages: list[bytes] = []

    def send(self, message: bytes) -> list[Event]:
        self.server.receive_data(message)
        events: list[Event] = []
        while (event := self.server.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            events.append(event)
        return events

    def take(self) -> list[ET.Element]:
        """What the server sent since last time, each message parsed on its own."""
        out = self.server.messages_to_send()
        self.messages += out
        return [ET.fromstring(message) for message in out]  # noqa: S314 - our own output

    def login(self) -> JID:
        self.send(FRAMED_OPEN)
        opened, features = self.take()
        assert opened.tag == f"{{{xml.FRAMING_NS}}}open"
        assert opened.get("from") == DOMAIN
        assert features.find(f"{{{SASL}}}mechanisms") is not None
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None
        scram = ScramClient("SCRAM-SHA-256", "alice", PASSWORD)
        first = base64.b64encode(scram.client_first()).decode()
        self.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>".encode())
        (challenge,) = self.take()
        final = base64.b64encode(scram.client_final(base64.b64decode(challenge.text or "")))
        events = self.send(f"<response xmlns='{SASL}'>{final.decode()}</response>".encode())
        assert isinstance(events[0], AuthSucceeded)
        (success,) = self.take()
        assert success.tag == f"{{{SASL}}}success"
        self.send(FRAMED_OPEN)  # the restart is simply a new <open/>
        opened, features = self.take()
        assert features.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
        events = self.send(
            b"<iq xmlns='jabber:client' type='set' id='b1'>"
            b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>web</resource></bind></iq>"
        )
        assert events == [BindRequested("web")]
        jid = JID.parse(f"alice@{DOMAIN}/web")
        self.server.complete_bind(jid)
        (bound,) = self.take()
        assert bound.tag == "{jabber:client}iq"
        assert bound.get("type") == "result"
        return jid


def test_framed_login_chat_and_close() -> None:
    client = FramedClient()
    jid = client.login()
    events = client.send(
        b"<message xmlns='jabber:client' to='bob@example.org' type='chat'><body>h\xc3\xa9</body>"
        b"</message>"
    )
    assert len(events) == 1
    assert isinstance(events[0], StanzaReceived)
    assert events[0].stanza.get("from") == str(jid)
    incoming = ET.Element("{jabber:client}message", {"from": "bob@example.org/pc"})
    ET.SubElement(incoming, "{jabber:client}body").text = "<&>"
    client.server.send_stanza(incoming)
    client.server.send_stanza(incoming)
    first, second = client.take()  # two messages, each a document declaring its namespace
    assert first.findtext("{jabber:client}body") == second.findtext("{jabber:client}body") == "<&>"
    assert client.send(b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>") == [
        StreamEnded(by_peer=True)
    ]
    client.server.close()
    (closing,) = client.take()
    assert closing.tag == f"{{{xml.FRAMING_NS}}}close"


@pytest.mark.parametrize(
    ("message", "condition"),
    [
        (b"<message/><message/>", "not-well-formed"),
        (b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>", "invalid-namespace"),
        (b"<message xmlns='jabber:client'><!-- hi --></message>", "restricted-xml"),
    ],
)
def test_framed_stream_errors_are_framed(message: bytes, condition: str) -> None:
    client = FramedClient()
    client.login()
    (event,) = client.send(message)
    assert isinstance(event, StreamEnded)
    assert event.condition == condition
    error, closing = client.take()
    assert error.tag == f"{{{STREAMS}}}error"  # declares the stream prefix itself
    assert error[0].tag == f"{{urn:ietf:params:xml:ns:xmpp-streams}}{condition}"
    assert closing.tag == f"{{{xml.FRAMING_NS}}}close"


def test_framed_mode_needs_tls_and_never_compacts() -> None:
    with pytest.raises(ValueError, match="direct_tls"):
        C2SStream(
            StreamSettings(domain=DOMAIN),
            lookup=lookup,
            entropy=bytes,
            unknown_user_secret=b"s" * 32,
            framed=True,
        )
    client = FramedClient()
    client.login()
    assert not client.server.compact()


# ----- stream management (XEP-0198) and client state (XEP-0352) ----------------------------

SM = "urn:xmpp:sm:3"


def chat(body: str) -> ET.Element:
    message = ET.Element("{jabber:client}message", {"from": "bob@example.org/pc"})
    ET.SubElement(message, "{jabber:client}body").text = body
    return message


def test_sm_counts_stanzas_requests_acks_and_answers_with_what_is_handled() -> None:
    client = Client()
    client.ready()
    (event,) = client.send(f"<enable xmlns='{SM}' resume='true' max='600'/>".encode())
    assert event == SmEnableRequested(resume=True, max=600)
    state = client.server.enable_sm("sm-1", resume=True, max_s=300)
    client._read()
    (enabled,) = client.take()
    assert (enabled.tag, enabled.get("id"), enabled.get("resume"), enabled.get("max")) == (
        f"{{{SM}}}enabled",
        "sm-1",
        "true",
        "300",
    )
    for n in range(SM_REQUEST_EVERY):
        client.server.send_stanza(chat(f"m{n}"))
    client._read()
    got = client.take()
    assert [e.tag for e in got] == ["{jabber:client}message"] * SM_REQUEST_EVERY + [f"{{{SM}}}r"]
    assert state.sent == SM_REQUEST_EVERY
    assert len(state.unacked) == SM_REQUEST_EVERY
    assert client.send(f"<a xmlns='{SM}' h='3'/>".encode()) == []
    assert [s.findtext("{jabber:client}body") for _, s in state.unacked] == ["m3", "m4"]
    # Inbound: <a/> reports only what the driver said is handled (durable).
    events = client.send(b"<message to='bob@example.org'><body>x</body></message>")
    assert isinstance(events[0], StanzaReceived)
    assert client.send(f"<r xmlns='{SM}'/>".encode()) == [AckRequested()]
    client.server.send_ack()
    client._read()
    assert client.take()[-1].get("h") == "0"
    client.server.stanza_handled()
    client.send(f"<r xmlns='{SM}'/>".encode())
    client.server.send_ack()
    client._read()
    assert client.take()[-1].get("h") == "1"
    # A second enable fails; acknowledging stanzas never sent ends the stream.
    client.send(f"<enable xmlns='{SM}'/>".encode())
    assert client.take()[-1].tag == f"{{{SM}}}failed"
    assert client.send(f"<a xmlns='{SM}' h='9'/>".encode()) == [
        StreamEnded(condition="undefined-condition", text="<a/> acknowledges stanzas never sent")
    ]


def test_sm_needs_a_bound_stream_and_refuses_bad_requests() -> None:
    client = Client()
    client.starttls()
    client.authenticate()
    client.send(HEADER)
    client.take()
    client.send(f"<enable xmlns='{SM}'/>".encode())  # before bind
    assert client.take()[-1][0].tag.endswith("unexpected-request")
    client.send(f"<resume xmlns='{SM}' previd='x' h='-1'/>".encode())
    assert client.take()[-1][0].tag.endswith("bad-request")
    assert client.send(f"<resume xmlns='{SM}' previd='x' h='7'/>".encode()) == [
        SmResumeRequested("x", 7)
    ]
    client.server.refuse_sm("item-not-found", h=0)
    client._read()
    failed = client.take()[-1]
    assert (failed.get("h"), failed[0].tag.split("}")[1]) == ("0", "item-not-found")
    client.send(  # after a failed resume the client binds on the same stream
        b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    client.server.complete_bind(JID.parse("alice@example.org/x"))
    assert client.send(f"<r xmlns='{SM}'/>".encode()) == [
        StreamEnded(condition="unsupported-stanza-type", text="stream management is not enabled")
    ]


def test_resume_retransmits_the_unacked_in_order_under_their_old_counts() -> None:
    state = SmState("sm-2", resume=True, max=300)
    for body in ("a", "b", "c"):
        state.hold(chat(body))
    assert state.acknowledge(1)
    client = Client()
    client.starttls()
    client.authenticate()
    client.send(HEADER)
    client.take()
    client.send(f"<resume xmlns='{SM}' previd='sm-2' h='1'/>".encode())
    jid = JID.parse("alice@example.org/phone")
    client.server.resume_sm(state, jid)
    client._read()
    got = client.take()
    assert got[0].tag == f"{{{SM}}}resumed"
    assert (got[0].get("previd"), got[0].get("h")) == ("sm-2", "0")
    assert [e.findtext("{jabber:client}body") for e in got[1:3]] == ["b", "c"]
    assert got[3].tag == f"{{{SM}}}r"
    assert client.server.phase is Phase.READY
    assert client.send(f"<a xmlns='{SM}' h='3'/>".encode()) == []
    assert state.unacked == []
    assert state.sent == 3


def test_counters_wrap_at_two_to_the_32() -> None:
    state = SmState("w", resume=False, max=0, sent=2**32 - 2)
    for body in ("a", "b", "c"):
        state.hold(chat(body))
    assert state.sent == 1
    assert [n for n, _ in state.unacked] == [2**32 - 1, 0, 1]
    assert not state.acknowledge(2)  # past what was sent
    assert state.acknowledge(0)
    assert [n for n, _ in state.unacked] == [1]
    assert [s.findtext("{jabber:client}body") for s in state.take_unacked()] == ["c"]


def test_client_state_indication_events() -> None:
    client = Client()
    client.ready()
    assert client.send(b"<inactive xmlns='urn:xmpp:csi:0'/>") == [ClientStateChanged(False)]
    assert client.send(b"<active xmlns='urn:xmpp:csi:0'/>") == [ClientStateChanged(True)]


def test_a_stale_ack_is_ignored_and_one_request_is_outstanding_at_a_time() -> None:
    client = Client()
    client.ready()
    client.send(f"<enable xmlns='{SM}'/>".encode())
    state = client.server.enable_sm("s", resume=False, max_s=0)
    for n in range(3 * SM_REQUEST_EVERY):
        client.server.send_stanza(chat(f"m{n}"))
    client._read()
    assert [e.tag for e in client.take()].count(f"{{{SM}}}r") == 1  # none while one is out
    assert client.send(f"<a xmlns='{SM}' h='4'/>".encode()) == []
    assert client.send(f"<a xmlns='{SM}' h='2'/>".encode()) == []  # older: acknowledges nothing
    assert len(state.unacked) == 3 * SM_REQUEST_EVERY - 4
    assert not state.request_pending
    client.server.send_stanza(chat("next"))
    client._read()
    assert client.take()[-1].tag == f"{{{SM}}}r"  # the next one may go


def test_an_ack_without_stream_management_is_an_error() -> None:
    client = Client()
    client.ready()
    assert client.send(f"<a xmlns='{SM}' h='0'/>".encode()) == [
        StreamEnded(condition="unsupported-stanza-type", text="stream management is not enabled")
    ]
