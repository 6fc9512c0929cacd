"""The slixmpp harness itself, against a tiny fake XMPP server that lives in this module.

The fake speaks just enough c2s XMPP over real TLS on 127.0.0.1 (direct TLS or STARTTLS, SASL
PLAIN, bind, echo of messages, ping, disco#info) to drive the harness's connect, messaging,
requests and disconnect for real, before villaged's own listener exists. It knows nothing of
the harness. Beyond that, a test can give it answers for other iq namespaces, read what it
received, and make it write anything (the body of a message to `REPLAY`, verbatim).
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.e2e.xmpp_client import (
    AuthFailedError,
    ConnectFailedError,
    InboxError,
    NotConnectedError,
    ReceivedMessage,
    RosterItem,
    StanzaError,
    TlsVerificationError,
    TrioXmppClient,
    XmppTestClient,
    open_xmpp_client,
)
from tests.ports import free_port_base
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file
from villaged.xmpp.xml import (
    NEED_DATA,
    STREAM_CLOSE,
    StanzaReceived,
    StreamClosed,
    StreamOpened,
    StreamParser,
    serialize,
    stream_header,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from villaged.xmpp.xml import Event

DOMAIN = "localhost"
USER = "alice"
PASSWORD = "correct horse"
STEP_S = 10  # bound of each step; a healthy run takes milliseconds

CLIENT_NS = "jabber:client"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
PING_NS = "urn:xmpp:ping"
SID_NS = "urn:xmpp:sid:0"
ROSTER_NS = "jabber:iq:roster"
CARBONS_NS = "urn:xmpp:carbons:2"
FORWARD_NS = "urn:xmpp:forward:0"
DELAY_NS = "urn:xmpp:delay"
MAM_NS = "urn:xmpp:mam:2"
RSM_NS = "http://jabber.org/protocol/rsm"
VCARD_NS = "vcard-temp"
PRIVATE_NS = "jabber:iq:private"
PRESENCE_FIELDS = ("show", "status", "priority")
REPLAY = "replay@localhost"  # the fake writes the body of a message to this address, raw


# --- the fake server ----------------------------------------------------------------------------


@dataclass
class FakeServer:
    port: int
    direct_tls: bool
    bound: list[str] = field(default_factory=list)  # JIDs bound, in order
    broken: list[str] = field(default_factory=list)  # why connections broke (TLS alerts...)
    some_broke: trio.Event = field(default_factory=trio.Event)
    # Stanzas received after binding, and answers for get/set iqs by payload namespace.
    received: list[ET.Element] = field(default_factory=list)
    answers: dict[str, Callable[[ET.Element], list[ET.Element]]] = field(default_factory=dict)

    def last_received(self, tag: str) -> ET.Element:
        return next(element for element in reversed(self.received) if element.tag == tag)


class FakeConnection:
    """One client connection: canned answers to what the harness sends."""

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext, server: FakeServer):
        self.stream: trio.abc.Stream = stream
        self.context = context
        self.server = server
        self.parser = StreamParser()
        self.tls = False
        self.user: str | None = None
        self.jid: str | None = None

    async def run(self) -> None:
        if self.server.direct_tls:
            await self.start_tls()
        while True:
            event = await self.next_event()
            if isinstance(event, StreamOpened):
                header = stream_header(from_=DOMAIN, id_=secrets.token_hex(8))
                await self.stream.send_all(header + self.features())
            elif isinstance(event, StanzaReceived):
                await self.answer(event.element)
            else:
                if isinstance(event, StreamClosed):
                    await self.stream.send_all(STREAM_CLOSE)
                return

    async def next_event(self) -> Event:
        while (event := self.parser.next_event()) is NEED_DATA:
            self.parser.receive_data(bytes(await self.stream.receive_some(65536)))
        return event

    async def start_tls(self) -> None:
        self.stream = trio.SSLStream(self.stream, self.context, server_side=True)
        await self.stream.do_handshake()
        self.tls = True

    def features(self) -> bytes:
        if not self.tls:
            starttls = f"<starttls xmlns='{TLS_NS}'><required/></starttls>"
            return f"<stream:features>{starttls}</stream:features>".encode()
        if self.user is None:
            mechanisms = f"<mechanisms xmlns='{SASL_NS}'><mechanism>PLAIN</mechanism></mechanisms>"
            return f"<stream:features>{mechanisms}</stream:features>".encode()
        return f"<stream:features><bind xmlns='{BIND_NS}'/></stream:features>".encode()

    async def answer(self, element: ET.Element) -> None:
        if element.tag == f"{{{TLS_NS}}}starttls":
            await self.stream.send_all(f"<proceed xmlns='{TLS_NS}'/>".encode())
            self.parser.reset()
            await self.start_tls()
        elif element.tag == f"{{{SASL_NS}}}auth":
            _, user, password = base64.b64decode(element.text or "").split(b"\0")
            if password.decode() == PASSWORD:
                self.user = user.decode()
                await self.stream.send_all(f"<success xmlns='{SASL_NS}'/>".encode())
                self.parser.reset()
            else:
                failure = f"<failure xmlns='{SASL_NS}'><not-authorized/></failure>"
                await self.stream.send_all(failure.encode())
        else:
            if self.jid is not None:
                self.server.received.append(element)
            answer = self.answer_stanza(element)
            if answer:
                await self.stream.send_all(answer)

    def answer_stanza(self, stanza: ET.Element) -> bytes:
        if stanza.tag == f"{{{CLIENT_NS}}}message" and stanza.get("to") == REPLAY:
            return (stanza.findtext(f"{{{CLIENT_NS}}}body") or "").encode()
        if stanza.tag == f"{{{CLIENT_NS}}}message":
            return serialize(self.echo(stanza))
        if stanza.tag == f"{{{CLIENT_NS}}}iq" and stanza.get("type") in ("get", "set"):
            namespace = stanza[0].tag[1:].partition("}")[0] if len(stanza) else ""
            answer = self.server.answers.get(namespace)
            replies = answer(stanza) if answer is not None else [self.answer_iq(stanza)]
            return b"".join(serialize(reply) for reply in replies)
        return b""  # presences, and the client's answers to our iqs

    def answer_iq(self, iq: ET.Element) -> ET.Element:
        reply = result_of(iq)
        bind = iq.find(f"{{{BIND_NS}}}bind")
        if bind is not None:
            resource = bind.findtext(f"{{{BIND_NS}}}resource") or "fake"
            self.jid = f"{self.user}@{DOMAIN}/{resource}"
            self.server.bound.append(self.jid)
            bound = ET.SubElement(reply, f"{{{BIND_NS}}}bind")
            ET.SubElement(bound, f"{{{BIND_NS}}}jid").text = self.jid
        elif iq.find(f"{{{DISCO_INFO_NS}}}query") is not None:
            query = ET.SubElement(reply, f"{{{DISCO_INFO_NS}}}query")
            ET.SubElement(query, f"{{{DISCO_INFO_NS}}}identity", category="server", type="im")
            for feature in (DISCO_INFO_NS, PING_NS):
                ET.SubElement(query, f"{{{DISCO_INFO_NS}}}feature", var=feature)
        elif iq.find(f"{{{PING_NS}}}ping") is None and iq.find(f"{{{SESSION_NS}}}session") is None:
            reply.set("type", "error")
            error = ET.SubElement(reply, f"{{{CLIENT_NS}}}error", type="cancel")
            ET.SubElement(error, f"{{{STANZAS_NS}}}service-unavailable")
        return reply

    def echo(self, message: ET.Element) -> ET.Element:
        """The message back to its sender, as if from its addressee, with a stanza id."""
        message.set("from", message.get("to", ""))
        message.set("to", self.jid or "")
        stanza_id = f"sid-{message.get('id', '')}"
        ET.SubElement(message, f"{{{SID_NS}}}stanza-id", id=stanza_id, by=f"{self.user}@{DOMAIN}")
        return message


def result_of(iq: ET.Element) -> ET.Element:
    """An empty result for ``iq``, from whom it was addressed to."""
    reply = ET.Element(f"{{{CLIENT_NS}}}iq", {"type": "result", "id": iq.get("id", "")})
    if "to" in iq.attrib:
        reply.set("from", iq.attrib["to"])
    return reply


async def serve_connection(
    context: ssl.SSLContext, server: FakeServer, stream: trio.SocketStream
) -> None:
    connection = FakeConnection(stream, context, server)
    try:
        await connection.run()
    except trio.BrokenResourceError as exc:
        server.broken.append(repr(exc.__cause__))
        server.some_broke.set()
    finally:
        await trio.aclose_forcefully(connection.stream)


# --- fixtures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def write_cert(directory: Path) -> TlsFiles:
    directory.mkdir()
    cert_pem, key_pem = make_self_signed(DOMAIN, dt.datetime.now(dt.UTC))
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    write_file_atomic(files.cert, cert_pem, 0o644)
    write_private_file(files.key, key_pem)
    return files


@pytest.fixture(autouse=True)
def no_client_thread_outlives_its_test() -> Iterator[None]:
    yield  # torn down after the trio run, so after every async fixture's teardown
    assert not [t.name for t in threading.enumerate() if t.name.startswith("slixmpp ")]


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return write_cert(tmp_path / "server")


@pytest.fixture(params=[True, False], ids=["direct-tls", "starttls"])
async def server(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tls_files: TlsFiles
) -> FakeServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    fake = FakeServer(port=0, direct_tls=request.param)
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, partial(serve_connection, context, fake), 0, host="127.0.0.1")
    )
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


@pytest.fixture
async def alice() -> AsyncIterator[TrioXmppClient]:
    async with open_xmpp_client("alice") as client:
        yield client


async def login(
    client: TrioXmppClient,
    server: FakeServer,
    ca_file: Path,
    *,
    password: str = PASSWORD,
    jid: str = f"{USER}@{DOMAIN}",
) -> str:
    with trio.fail_after(STEP_S):
        return await client.connect(
            "127.0.0.1",
            server.port,
            direct_tls=server.direct_tls,
            ca_file=ca_file,
            password=password,
            jid=jid,
            resource="harness",
        )


# --- tests --------------------------------------------------------------------------------------


async def test_chat_requests_and_clean_disconnect(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    jid = await login(alice, server, tls_files.cert)
    assert jid == alice.jid == "alice@localhost/harness"
    assert server.bound == [jid]

    text = "grüße, 世界 🙂 <&>'\" ]]> &amp;"
    with trio.fail_after(STEP_S):
        sent_id = await alice.send_message("bob@localhost", text)
        echo = await alice.wait_message()
    assert (echo.from_, echo.to, echo.type, echo.body, echo.id) == (
        "bob@localhost",
        jid,
        "chat",
        text,
        sent_id,
    )
    assert echo.stanza_id("alice@localhost") == f"sid-{sent_id}"
    assert echo.carbon is None
    assert echo.forwarded is None
    assert "&lt;&amp;&gt;" in echo.xml
    with trio.fail_after(STEP_S):
        await alice.send_raw("<message to='bob@localhost' id='raw-1'><body>as is</body></message>")
        raw_echo = await alice.wait_message()
    assert (raw_echo.id, raw_echo.body, raw_echo.type) == ("raw-1", "as is", "normal")

    with trio.fail_after(STEP_S):
        round_trip = await alice.ping("localhost")
        info = await alice.disco_info("localhost")
        with pytest.raises(StanzaError) as refused:
            await alice.get_vcard()
    assert 0 <= round_trip < STEP_S
    assert info.features == {DISCO_INFO_NS, PING_NS}
    assert {(i.category, i.type) for i in info.identities} == {("server", "im")}
    assert (refused.value.condition, refused.value.error_type) == ("service-unavailable", "cancel")

    with trio.fail_after(STEP_S):
        ended = await alice.disconnect()
    assert ended.by_us
    assert ended.server_closed_stream
    assert ended.stream_error is None
    assert server.broken == []
    with trio.fail_after(STEP_S), pytest.raises(NotConnectedError):
        await alice.send_message("bob@localhost", "after the end")


async def test_wait_message_takes_the_oldest_match_and_honours_cancellation(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    await login(alice, server, tls_files.cert)
    # A cancelled wait that would take any message: if its asyncio side survived the
    # cancellation, it would steal one of the messages below and a later wait would time out.
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.wait_message)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

    with trio.fail_after(STEP_S):
        for body in ("one", "two", "three"):
            await alice.send_message("bob@localhost", body)
        second = await alice.wait_message(lambda m: m.body == "two")
        rest = [await alice.wait_message(), await alice.wait_message()]
    assert second.body == "two"
    assert [m.body for m in rest] == ["one", "three"]


def answer_roster(iq: ET.Element) -> list[ET.Element]:
    """A canned roster for a get; a set is accepted and pushed back."""
    reply = result_of(iq)
    if iq.get("type") == "get":
        query = ET.SubElement(reply, f"{{{ROSTER_NS}}}query", ver="v1")
        carol = ET.SubElement(
            query, f"{{{ROSTER_NS}}}item", jid="carol@localhost", name="Carol", subscription="both"
        )
        for group in ("Friends", "Work"):
            ET.SubElement(carol, f"{{{ROSTER_NS}}}group").text = group
        ET.SubElement(query, f"{{{ROSTER_NS}}}item", jid="dave@localhost", ask="subscribe")
        return [reply]
    push = ET.Element(f"{{{CLIENT_NS}}}iq", type="set", id=f"push-{iq.get('id')}")
    ET.SubElement(push, f"{{{ROSTER_NS}}}query", ver="v2").append(iq[0][0])
    return [reply, push]


def answer_mam(iq: ET.Element) -> list[ET.Element]:
    """Two archived messages for any query, then the last page's <fin/>."""
    query_id = iq[0].get("queryid", "")
    pages: list[ET.Element] = []
    for number, body in enumerate(("first", "second")):
        message = ET.Element(f"{{{CLIENT_NS}}}message", to="alice@localhost/harness")
        result = ET.SubElement(message, f"{{{MAM_NS}}}result", queryid=query_id, id=f"a{number}")
        forwarded = ET.SubElement(result, f"{{{FORWARD_NS}}}forwarded")
        ET.SubElement(forwarded, f"{{{DELAY_NS}}}delay", stamp=f"2024-05-01T10:00:0{number}Z")
        archived = ET.SubElement(
            forwarded,
            f"{{{CLIENT_NS}}}message",
            {"from": "bob@localhost/phone", "to": "alice@localhost", "type": "chat"},
        )
        ET.SubElement(archived, f"{{{CLIENT_NS}}}body").text = body
        pages.append(message)
    reply = result_of(iq)
    fin = ET.SubElement(reply, f"{{{MAM_NS}}}fin", complete="true")
    rsm = ET.SubElement(fin, f"{{{RSM_NS}}}set")
    for name, value in (("first", "a0"), ("last", "a1"), ("count", "2")):
        ET.SubElement(rsm, f"{{{RSM_NS}}}{name}").text = value
    return [*pages, reply]


def storage(stored: dict[str, ET.Element]) -> Callable[[ET.Element], list[ET.Element]]:
    """vCard or private XML storage: a set keeps the payload, a get returns what was kept."""

    def answer(iq: ET.Element) -> list[ET.Element]:
        reply = result_of(iq)
        payload = iq[0] if iq[0].tag != f"{{{PRIVATE_NS}}}query" else iq[0][0]
        if iq.get("type") == "set":
            stored[payload.tag] = payload
        elif payload.tag in stored and payload is iq[0]:
            reply.append(stored[payload.tag])
        elif payload.tag in stored:
            ET.SubElement(reply, f"{{{PRIVATE_NS}}}query").append(stored[payload.tag])
        return [reply]

    return answer


async def test_roster_presence_carbons_archive_and_storage(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    stored: dict[str, ET.Element] = {}
    server.answers.update(
        {
            ROSTER_NS: answer_roster,
            MAM_NS: answer_mam,
            CARBONS_NS: lambda iq: [result_of(iq)],
            VCARD_NS: storage(stored),
            PRIVATE_NS: storage(stored),
        }
    )
    jid = await login(alice, server, tls_files.cert)
    with trio.fail_after(STEP_S):
        roster = await alice.get_roster()
        await alice.set_roster_item("erin@localhost", name="Erin", groups=("Friends",))
        push = await alice.wait_roster_push()
        await alice.remove_roster_item("dave@localhost")
        removal = await alice.wait_roster_push()
    assert roster == {
        "carol@localhost": RosterItem(
            "carol@localhost", "Carol", "both", None, frozenset({"Friends", "Work"})
        ),
        "dave@localhost": RosterItem("dave@localhost", None, "none", "subscribe", frozenset()),
    }
    assert push.items == (
        RosterItem("erin@localhost", "Erin", "none", None, frozenset({"Friends"})),
    )
    assert push.version == "v2"
    assert removal.items == (RosterItem("dave@localhost", None, "remove", None, frozenset()),)

    with trio.fail_after(STEP_S):
        await alice.send_presence(show="away", status="lunch", priority=5)
        await alice.send_presence(to="bob@localhost", type_="subscribe")
        await alice.send_message(
            REPLAY,
            "<presence from='bob@localhost/phone' to='alice@localhost/harness'>"
            "<show>dnd</show><status>busy</status><priority>-1</priority></presence>"
            "<presence from='bob@localhost' type='subscribed'/>",
        )
        subscribed = await alice.wait_presence(lambda p: p.type == "subscribed")
        busy = await alice.wait_presence()
    presences = [e for e in server.received if e.tag == f"{{{CLIENT_NS}}}presence"]
    assert [(p.get("to"), p.get("type")) for p in presences] == [
        (None, None),
        ("bob@localhost", "subscribe"),
    ]
    assert [presences[0].findtext(f"{{{CLIENT_NS}}}{name}") for name in PRESENCE_FIELDS] == [
        "away",
        "lunch",
        "5",
    ]
    assert (busy.from_, busy.type, busy.show, busy.status, busy.priority) == (
        "bob@localhost/phone",
        "available",
        "dnd",
        "busy",
        -1,
    )
    assert (subscribed.from_, subscribed.type, subscribed.priority) == (
        "bob@localhost",
        "subscribed",
        0,
    )

    with trio.fail_after(STEP_S):
        await alice.enable_carbons()
        await alice.send_message(
            REPLAY,
            f"<message from='alice@localhost' to='{jid}' type='chat'>"
            f"<received xmlns='{CARBONS_NS}'><forwarded xmlns='{FORWARD_NS}'>"
            "<message xmlns='jabber:client' from='bob@localhost/phone' to='alice@localhost/other'"
            " type='chat'><body>for the other resource</body></message>"
            "</forwarded></received></message>",
        )
        carbon = await alice.wait_message()
    assert server.last_received(f"{{{CLIENT_NS}}}iq").find(f"{{{CARBONS_NS}}}enable") is not None
    assert carbon.carbon == "received"
    assert carbon.body is None
    assert carbon.forwarded is not None
    assert (carbon.forwarded.from_, carbon.forwarded.body) == (
        "bob@localhost/phone",
        "for the other resource",
    )

    start = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    with trio.fail_after(STEP_S):
        page = await alice.mam_query(with_="bob@localhost", start=start, max_=2, before="")
    query = server.last_received(f"{{{CLIENT_NS}}}iq")[0]
    fields = {
        f.get("var"): f.findtext("{jabber:x:data}value") for f in query.iter("{jabber:x:data}field")
    }
    assert fields == {"FORM_TYPE": MAM_NS, "with": "bob@localhost", "start": "2024-05-01T00:00:00Z"}
    assert query.findtext(f"{{{RSM_NS}}}set/{{{RSM_NS}}}max") == "2"
    assert query.findtext(f"{{{RSM_NS}}}set/{{{RSM_NS}}}before") == ""
    assert [(m.archive_id, m.stamp, m.message.body) for m in page.messages] == [
        ("a0", "2024-05-01T10:00:00Z", "first"),
        ("a1", "2024-05-01T10:00:01Z", "second"),
    ]
    assert (page.first, page.last, page.complete, page.count) == ("a0", "a1", True, 2)

    with trio.fail_after(STEP_S):
        await alice.set_vcard({"FN": "Alice Liddell", "NICKNAME": "al"})
        vcard = await alice.get_vcard()
        await alice.private_store("<note xmlns='x:notes'>tea at <b>five</b></note>")
        note = await alice.private_get("note", "x:notes")
    assert vcard == {"FN": "Alice Liddell", "NICKNAME": "al"}
    assert ET.fromstring(note).findtext("{x:notes}b") == "five"  # noqa: S314

    # Nothing unexpected arrived meanwhile (the inbox is empty: a wait blocks).
    with trio.move_on_after(0.05) as idle:
        await alice.wait_message()
    assert idle.cancelled_caught


async def test_unreadable_stanza_fails_the_wait(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    await login(alice, server, tls_files.cert)
    with trio.fail_after(STEP_S):
        await alice.send_message(
            REPLAY, "<presence from='bob@localhost'><priority>high</priority></presence>"
        )
        with pytest.raises(InboxError, match="could not read"):
            await alice.wait_presence()


async def test_server_stream_error_ends_the_session(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    server.answers[PRIVATE_NS] = lambda iq: []  # never answered
    await login(alice, server, tls_files.cert)

    async def unanswered_request() -> None:
        with pytest.raises(NotConnectedError, match="no answer before the end"):
            await alice.private_get("note", "x:notes")

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unanswered_request)
            await trio.testing.wait_all_tasks_blocked()
            await alice.send_message(
                REPLAY,
                "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                "</stream:error></stream:stream>",
            )
            ended = await alice.wait_disconnected()
        with pytest.raises(NotConnectedError, match="connection closed"):
            await alice.wait_message()
        assert await alice.disconnect() == ended
    assert (ended.by_us, ended.server_closed_stream, ended.stream_error) == (
        False,
        True,
        "system-shutdown",
    )


async def test_wrong_password_is_an_auth_failure(
    server: FakeServer, alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    with pytest.raises(AuthFailedError) as refused:
        await login(alice, server, tls_files.cert, password="wrong")
    assert refused.value.condition == "not-authorized"
    assert server.bound == []
    # The same client can try again.
    assert await login(alice, server, tls_files.cert) == "alice@localhost/harness"


@pytest.mark.parametrize(
    ("trust", "jid", "why"),
    [
        ("other CA", f"{USER}@{DOMAIN}", "certificate verify failed"),
        ("right CA", f"{USER}@example.org", "Hostname mismatch"),
    ],
)
async def test_certificate_is_verified(
    server: FakeServer,
    alice: TrioXmppClient,
    tls_files: TlsFiles,
    tmp_path: Path,
    trust: str,
    jid: str,
    why: str,
) -> None:
    ca_file = write_cert(tmp_path / "other").cert if trust == "other CA" else tls_files.cert
    with pytest.raises(TlsVerificationError, match=why):
        await login(alice, server, ca_file, jid=jid)
    assert server.bound == []
    # The handshake broke off (the client's doing: the server accepts anyone).
    with trio.fail_after(STEP_S):
        await server.some_broke.wait()


async def test_refused_connection_is_a_connect_failure(
    alice: TrioXmppClient, tls_files: TlsFiles
) -> None:
    closed = FakeServer(port=free_port_base(1), direct_tls=True)
    with pytest.raises(ConnectFailedError, match="connection failed"):
        await login(alice, closed, tls_files.cert)


@pytest.mark.parametrize("host", ["192.0.2.1", "localhost", "example.org"])
async def test_only_loopback_addresses_are_accepted(
    alice: TrioXmppClient, tls_files: TlsFiles, host: str
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await alice.connect(
            host,
            5222,
            direct_tls=True,
            ca_file=tls_files.cert,
            password=PASSWORD,
            jid=f"{USER}@{DOMAIN}",
        )


async def test_blocking_api_through_worker_threads(server: FakeServer, tls_files: TlsFiles) -> None:
    client = await trio.to_thread.run_sync(XmppTestClient, "carol")
    thread_names = {thread.name for thread in threading.enumerate()}
    assert "slixmpp carol" in thread_names
    try:
        jid = await trio.to_thread.run_sync(
            partial(
                client.connect,
                "127.0.0.1",
                server.port,
                direct_tls=server.direct_tls,
                ca_file=tls_files.cert,
                password=PASSWORD,
                jid=f"{USER}@{DOMAIN}",
            )
        )
        assert jid.startswith("alice@localhost/")
        await trio.to_thread.run_sync(client.send_message, "bob@localhost", "hello")

        def is_hello(message: ReceivedMessage) -> bool:
            return message.body == "hello"

        echo = await trio.to_thread.run_sync(partial(client.wait_message, is_hello))
        assert echo.from_ == "bob@localhost"
        with pytest.raises(TimeoutError, match=r"carol: message took longer than 0\.2 s"):
            await trio.to_thread.run_sync(partial(client.wait_message, timeout=0.2))
    finally:
        await trio.to_thread.run_sync(client.close)
    assert "slixmpp carol" not in {thread.name for thread in threading.enumerate()}
    assert server.broken == []
