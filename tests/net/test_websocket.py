"""XMPP over WebSocket (RFC 7395) end to end, in process: the node assembled by app.run_node,
real TLS on loopback, the `websockets` library as the browser-like client and the TCP
`RawClient` on the other side; plus the sans-I/O framing and the settings without sockets."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import ssl
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import h11
import pytest
import trio
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
)
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from tests.net.rawclient import RawClient
from tests.ports import free_port_base
from tests.xmpp.scram_client import ScramClient
from villaged.app import Node, _shut_down, run_node
from villaged.config import load_config
from villaged.net.c2s import TokenBucket
from villaged.net.websocket import (
    MAX_FRAGMENTS,
    NEED_DATA,
    HttpAnswer,
    MessageFraming,
    MessageReceived,
    PeerClosed,
    Refused,
    UpgradeAccepted,
    WebSocketSettings,
    answer_request,
    default_public_url,
    forwarded_client,
    origin_of,
)
from villaged.ops.monitor import AUTH_FAILURES_PER_IP
from villaged.ops.provision import init_dev
from villaged.storage.store import StoreOptions, open_store
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
OPEN = f"<open xmlns='{FRAMING}' to='localhost' version='1.0'/>"
CLOSE = f"<close xmlns='{FRAMING}'/>"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"
XRD = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
CAROL = JID("carol", "localhost")
ALT_WEBSOCKET = "urn:xmpp:alt-connections:websocket"
TRICKY = "héllo ✓ <&>'\""


def escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(record, "event", "") for record in caplog.records]


def security_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(record, "event", "")
        for record in caplog.records
        if getattr(record, "security", False)
    ]


# ----- the node and its clients ----------------------------------------------------------


class WsXmpp:
    """An XMPP client over a `websockets` connection: one element per message."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def element(self, within_s: float = 10) -> ET.Element:
        with trio.fail_after(within_s):
            message = await self.ws.recv()
        assert isinstance(message, str), message
        return ET.fromstring(message)  # noqa: S314 - our own server's output

    async def message(self, within_s: float = 10) -> ET.Element:
        """The next <message/>, skipping presence and the like (a few at most)."""
        for _ in range(20):
            got = await self.element(within_s)
            if got.tag == "{jabber:client}message":
                return got
        raise AssertionError("no message among the next 20 elements")

    async def login(self, user: str, *, resource: str = "web") -> str:
        """<open/>, SCRAM-SHA-256 (checking the server's signature), bind; the full JID."""
        await self.send(OPEN)
        opened = await self.element()
        assert opened.tag == f"{{{FRAMING}}}open"
        assert opened.get("from") == "localhost"
        features = await self.element()
        mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
        assert "SCRAM-SHA-256" in mechanisms
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None
        scram = ScramClient(
            "SCRAM-SHA-256", user, f"{user}-password", client_nonce=os.urandom(12).hex()
        )
        first = base64.b64encode(scram.client_first()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>")
        challenge = await self.element()
        assert challenge.tag == f"{{{SASL}}}challenge"
        final = scram.client_final(base64.b64decode(challenge.text or ""))
        await self.send(f"<response xmlns='{SASL}'>{base64.b64encode(final).decode()}</response>")
        success = await self.element()
        assert success.tag == f"{{{SASL}}}success"
        assert scram.server_final_is_genuine(base64.b64decode(success.text or ""))
        await self.send(OPEN)  # the restart is a new <open/>
        assert (await self.element()).tag == f"{{{FRAMING}}}open"
        features = await self.element()
        assert features.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
        await self.send(
            "<iq xmlns='jabber:client' type='set' id='bind'>"
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        bound = await self.element()
        jid = bound.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid")
        assert jid == f"{user}@localhost/{resource}", ET.tostring(bound)
        await self.send("<presence xmlns='jabber:client'/>")
        return jid

    async def chat(self, to: str, text: str) -> None:
        await self.send(
            f"<message xmlns='jabber:client' to='{to}' type='chat'>"
            f"<body>{escaped(text)}</body></message>"
        )


class Harness:
    def __init__(self, node: Node, base: int, ca_file: Path) -> None:
        self.node = node
        self.c2s = base
        self.ws_port = base + 2
        self.url = f"wss://localhost:{self.ws_port}/xmpp-websocket"
        self.client_tls = ssl.create_default_context(cafile=str(ca_file))
        self.ca_file = ca_file
        self.tcp_clients: list[RawClient] = []

    @contextlib.asynccontextmanager
    async def websocket(
        self,
        *,
        subprotocols: Sequence[str] | None = ("xmpp",),
        origin: str | None = None,
        forwarded_for: str | None = None,
    ) -> AsyncIterator[ClientConnection]:
        async with connect(
            self.url,
            ssl=self.client_tls,
            subprotocols=None if subprotocols is None else [Subprotocol(s) for s in subprotocols],
            origin=None if origin is None else Origin(origin),
            additional_headers=None
            if forwarded_for is None
            else {"X-Forwarded-For": forwarded_for},
            proxy=None,
            open_timeout=10,
            ping_interval=None,  # only the server's pings
            close_timeout=5,
            host="127.0.0.1",
            port=self.ws_port,
        ) as ws:
            yield ws

    @contextlib.asynccontextmanager
    async def xmpp(
        self, user: str, *, origin: str | None = None, forwarded_for: str | None = None
    ) -> AsyncIterator[WsXmpp]:
        async with self.websocket(origin=origin, forwarded_for=forwarded_for) as ws:
            client = WsXmpp(ws)
            await client.login(user)
            yield client

    async def tcp(self, user: str) -> RawClient:
        client = await RawClient.connect(self.c2s, self.ca_file)
        self.tcp_clients.append(client)
        await client.login(user, f"{user}-password", resource="r")
        await client.send(b"<presence/>")
        return client

    async def tls_stream(self) -> trio.SSLStream[trio.SocketStream]:
        tcp = await trio.open_tcp_stream("127.0.0.1", self.ws_port)
        stream = trio.SSLStream(tcp, self.client_tls, server_hostname="localhost")
        with trio.fail_after(10):
            await stream.do_handshake()
        return stream


async def start_harness(
    nursery: trio.Nursery, directory: Path, *, c2s_toml: str = "", websocket_toml: str = ""
) -> Harness:
    base = free_port_base()
    result = init_dev(directory, port_base=base, now=datetime.now(UTC))
    text = result.config.read_text().replace("[websocket]\n", f"[websocket]\n{websocket_toml}")
    text += f"\n[c2s]\nhandshake_timeout = 1\n{c2s_toml}\n"
    result.config.write_text(text)
    config = load_config(result.config)
    async with open_store(StoreOptions.from_config(config.storage)) as store:
        for user in ("alice", "bob", "carol"):
            await store.add_user(f"{user}@localhost", f"{user}-password")
    node = await nursery.start(partial(run_node, config, handle_signals=False))
    return Harness(node, base, config.tls.cert)


@pytest.fixture
async def harness(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = await start_harness(nursery, tmp_path / "n", c2s_toml="max_connections_per_ip = 3000")
    yield h
    for client in h.tcp_clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def tcp_receives(client: RawClient, sender: str, text: str) -> None:
    for _ in range(20):  # presence may come first
        got = await client.element()
        if got.tag == "{jabber:client}message":
            break
    assert got.tag == "{jabber:client}message"
    assert got.get("from") == sender
    assert got.findtext("{jabber:client}body") == text


async def still_chatting(web: WsXmpp, tcp: RawClient, text: str) -> None:
    """Both ways between a WebSocket client (alice) and a TCP client (bob)."""
    await web.chat("bob@localhost", text)
    await tcp_receives(tcp, "alice@localhost/web", text)
    reply = f"<message to='alice@localhost/web' type='chat'><body>{escaped(text)}</body></message>"
    await tcp.send(reply.encode())
    back = await web.message()
    assert back.get("from") == "bob@localhost/r"
    assert back.findtext("{jabber:client}body") == text


async def wait_for(condition: partial[bool], within_s: float = 5) -> None:
    with trio.fail_after(within_s):
        while not condition():  # noqa: ASYNC110 - the node's bookkeeping has no event to wait on
            await trio.sleep(0.02)


# ----- logging in, chatting, closing ------------------------------------------------------


async def test_scram_login_chat_with_a_tcp_client_and_a_clean_close(harness: Harness) -> None:
    bob = await harness.tcp("bob")
    async with harness.websocket() as ws:
        assert ws.subprotocol == "xmpp"
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers  # no compression offered
        alice = WsXmpp(ws)
        assert await alice.login("alice") == "alice@localhost/web"
        # One connection each, counted once (the listener hands its slot to the c2s driver).
        assert harness.node.c2s.connections_per_ip == {"127.0.0.1": 2}
        await still_chatting(alice, bob, TRICKY)
        # A message in fragments is one stanza; a client's ping is answered.
        parts = ["<message xmlns='jabber:client' to='bob@localhost' type='chat'><bo", "dy>", "x"]
        await ws.send([*parts, "</body></message>"])
        await tcp_receives(bob, "alice@localhost/web", "x")
        pong = await ws.ping()
        with trio.fail_after(5):
            await pong.wait()
        # Clean close: <close/> both ways, then the server closes the WebSocket with 1000.
        await alice.send(CLOSE)
        assert (await alice.element()).tag == f"{{{FRAMING}}}close"
        with pytest.raises(ConnectionClosedOK) as closed:
            await alice.element()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000
        assert closed.value.rcvd_then_sent  # the server closed first (RFC 6455 §7.1.1)
    await wait_for(partial(lambda: harness.node.c2s.connections_per_ip == {"127.0.0.1": 1}))


async def test_an_allowed_browser_origin_gets_in(harness: Harness) -> None:
    bob = await harness.tcp("bob")
    # The dev config lets in pages served from loopback on any port.
    async with harness.xmpp("alice", origin="https://localhost:8443") as alice:
        await still_chatting(alice, bob, "from a local page")


async def test_shutdown_ends_websocket_streams_with_system_shutdown(harness: Harness) -> None:
    async with harness.xmpp("alice") as alice, trio.open_nursery() as nursery:
        nursery.start_soon(_shut_down, harness.node)
        for _ in range(20):  # presence may come first
            if (got := await alice.element()).tag == f"{{{STREAMS}}}error":
                break
        assert got[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown"
        assert (await alice.element()).tag == f"{{{FRAMING}}}close"
        with pytest.raises(ConnectionClosedOK) as closed:
            await alice.element()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001  # RFC 6455: the server is going away
    assert len(harness.node.sessions) == 0


# ----- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subprotocols", "origin", "status", "event"),
    [
        (None, None, 400, "websocket.subprotocol_refused"),
        (("chat", "XMPP"), None, 400, "websocket.subprotocol_refused"),
        (("xmpp",), "https://evil.example", 403, "websocket.origin_refused"),
        (("xmpp",), "https://localhost.evil.example", 403, "websocket.origin_refused"),
        (("xmpp",), "null", 403, "websocket.origin_refused"),
    ],
)
async def test_handshake_refusals(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    subprotocols: tuple[str, ...] | None,
    origin: str | None,
    status: int,
    event: str,
) -> None:
    caplog.set_level(logging.INFO, logger="villaged")
    bob = await harness.tcp("bob")
    async with harness.xmpp("alice") as alice:
        with pytest.raises(InvalidStatus) as refused:
            async with harness.websocket(subprotocols=subprotocols, origin=origin):
                pass
        assert refused.value.response.status_code == status
        assert event in events(caplog)
        assert (event in security_events(caplog)) == (status == 403)
        await still_chatting(alice, bob, "unaffected by the refusal")


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """One client frame, built by hand (so it can be wrong)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([first_byte, 0x80 | len(payload)]) + mask + masked


@pytest.mark.parametrize(
    ("misbehaviour", "code", "event"),
    [
        ("binary", 1003, "websocket.binary_refused"),
        ("reserved bit", 1002, "websocket.protocol_error"),
        ("bad opcode", 1002, "websocket.protocol_error"),
        ("not utf-8", 1007, "websocket.protocol_error"),
        ("oversized", 1009, "websocket.message_too_big"),
        ("oversized in fragments", 1009, "websocket.message_too_big"),
    ],
)
async def test_frame_refusals_close_the_websocket_with_their_code(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    misbehaviour: str,
    code: int,
    event: str,
) -> None:
    bob = await harness.tcp("bob")
    async with harness.xmpp("alice") as alice, harness.xmpp("carol") as carol:
        ws = carol.ws
        if misbehaviour == "binary":
            await ws.send(b"<presence xmlns='jabber:client'/>")
        elif misbehaviour == "reserved bit":
            await ws.stream.send_all(masked_frame(0x80 | 0x40 | 0x1, b"<presence/>"))
        elif misbehaviour == "bad opcode":
            await ws.stream.send_all(masked_frame(0x80 | 0x3, b"x"))
        elif misbehaviour == "not utf-8":
            await ws.stream.send_all(masked_frame(0x80 | 0x1, b"<a>\xc3\x28</a>"))
        elif misbehaviour == "oversized":
            await ws.send("<message xmlns='jabber:client'><body>" + "x" * 300_000)
        else:
            await ws.send(["<message xmlns='jabber:client'><body>"] + ["y" * 30_000] * 10)
        with pytest.raises(ConnectionClosedError) as closed:  # noqa: PT012
            for _ in range(20):  # what the server sent before closing may come first
                await carol.element()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == code
        assert event in security_events(caplog)
        await still_chatting(alice, bob, "after carol was cut off")


async def test_a_stream_ended_by_a_refusal_or_a_stream_error_is_not_resumable(
    harness: Harness,
) -> None:
    sm = "urn:xmpp:sm:3"
    for misbehaviour in ("binary frame", "malformed xml"):
        async with harness.xmpp("carol") as carol:
            await carol.send(f"<enable xmlns='{sm}' resume='true'/>")
            for _ in range(20):
                if (enabled := await carol.element()).tag == f"{{{sm}}}enabled":
                    break
            sm_id = enabled.get("id", "")
            assert sm_id in harness.node.c2s.resumable
            if misbehaviour == "binary frame":
                await carol.ws.send(b"<presence xmlns='jabber:client'/>")
            else:
                await carol.send("<message xmlns='jabber:client'><body>unclosed")
            with pytest.raises(ConnectionClosed):  # noqa: PT012
                for _ in range(20):  # a stream error may come first
                    await carol.element()
            await wait_for(partial(lambda i: i not in harness.node.c2s.resumable, sm_id))
            await wait_for(partial(lambda: not harness.node.sessions.of_user(CAROL)))


async def test_server_pings_and_drops_a_client_that_does_not_answer(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="villaged")
    h = await start_harness(
        nursery, tmp_path / "n", websocket_toml="ping_interval = 1\nping_timeout = 1\n"
    )
    bob = await h.tcp("bob")
    async with h.xmpp("alice") as alice:  # the websockets client answers pings itself
        silent = await RawWebSocket.open(h)
        began = trio.current_time()
        got: list[object] = []
        with trio.fail_after(10):
            for _ in range(100):
                if isinstance(event := await silent.next_event(), CloseConnection):
                    break
                got.append(event)
        assert any(isinstance(e, Ping) for e in got)
        stream_errors = [e for e in got if isinstance(e, TextMessage) and "error" in e.data]
        assert len(stream_errors) == 1
        assert "connection-timeout" in stream_errors[0].data
        assert isinstance(event, CloseConnection)
        assert event.code == 1000
        assert 1.5 < trio.current_time() - began < 6  # pinged after 1 s, dropped 1 s later
        assert "websocket.ping_timeout" in events(caplog)
        await silent.aclose()
        await trio.sleep(1.5)  # more pings for alice, answered
        await still_chatting(alice, bob, "alice answers her pings")
    for client in h.tcp_clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_connections_per_address_are_capped_together_with_c2s(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_harness(nursery, tmp_path / "n", c2s_toml="max_connections_per_ip = 2")
    stalled = [await trio.open_tcp_stream("127.0.0.1", h.ws_port) for _ in range(2)]
    await wait_for(partial(lambda: h.node.c2s.connections_per_ip == {"127.0.0.1": 2}))
    for port in (h.ws_port, h.c2s):  # one count for both listeners
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(0.9):  # sooner than the stalled handshakes time out (1 s)
            assert await extra.receive_some(1) == b""
        await extra.aclose()
    assert "websocket.too_many_connections" in security_events(caplog)
    assert "c2s.too_many_connections" in security_events(caplog)
    with trio.fail_after(5):
        for sock in stalled:
            assert await sock.receive_some(1) == b""
            await sock.aclose()
    assert "websocket.tls_failed" in security_events(caplog)
    assert h.node.c2s.handshakes_per_ip == {}
    async with h.xmpp("alice"):
        assert h.node.c2s.connections_per_ip == {"127.0.0.1": 1}
    await wait_for(partial(lambda: h.node.c2s.connections_per_ip == {}))
    nursery.cancel_scope.cancel()


# ----- HTTP: host-meta and what is not served ---------------------------------------------


async def http_exchange(
    stream: trio.abc.Stream, conn: h11.Connection, method: str, target: str
) -> tuple[h11.Response, bytes]:
    request = h11.Request(method=method, target=target, headers=[("host", "localhost")])
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    response: h11.Response | None = None
    body = b""
    with trio.fail_after(10):
        for _ in range(1000):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert response is not None
    return response, body


def header(response: h11.Response, name: str) -> str | None:
    found = [v.decode() for n, v in response.headers if n == name.encode()]
    return found[0] if found else None


async def test_host_meta_advertises_the_websocket_url(harness: Harness) -> None:
    url = f"wss://localhost:{harness.ws_port}/xmpp-websocket"
    stream = await harness.tls_stream()
    conn = h11.Connection(h11.CLIENT)
    # Several requests on one connection (keep-alive), then the upgrade on it too.
    response, body = await http_exchange(stream, conn, "GET", "/.well-known/host-meta")
    assert response.status_code == 200
    assert header(response, "content-type") == "application/xrd+xml; charset=utf-8"
    assert header(response, "access-control-allow-origin") == "*"
    xrd = ET.fromstring(body)  # noqa: S314 - our own server's output
    assert xrd.tag == f"{{{XRD}}}XRD"
    links = [(link.get("rel"), link.get("href")) for link in xrd.iter(f"{{{XRD}}}Link")]
    assert links == [(ALT_WEBSOCKET, url)]
    conn.start_next_cycle()
    response, body = await http_exchange(stream, conn, "GET", "/.well-known/host-meta.json")
    assert response.status_code == 200
    assert header(response, "content-type") == "application/json"
    assert header(response, "access-control-allow-origin") == "*"
    assert json.loads(body) == {"links": [{"rel": ALT_WEBSOCKET, "href": url}]}
    conn.start_next_cycle()
    response, body = await http_exchange(stream, conn, "HEAD", "/.well-known/host-meta.json")
    assert response.status_code == 200
    assert body == b""
    conn.start_next_cycle()
    raw = await RawWebSocket.open(harness, stream=stream, early=OPEN)
    opened = await raw.next_event()  # the answer to the <open/> sent with the request
    assert isinstance(opened, TextMessage)
    assert opened.data.startswith(f"<open xmlns='{FRAMING}'")
    await raw.aclose()


@pytest.mark.parametrize(
    ("method", "target", "status", "event"),
    [
        ("GET", "/", 404, "websocket.not_found"),
        ("GET", "/xmpp-websocket/more", 404, "websocket.not_found"),
        ("POST", "/.well-known/host-meta", 405, "websocket.method_not_allowed"),
        ("PUT", "/xmpp-websocket", 405, "websocket.method_not_allowed"),
        ("GET", "/xmpp-websocket", 400, "websocket.bad_handshake"),  # not an upgrade
    ],
)
async def test_what_is_not_served(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    status: int,
    event: str,
) -> None:
    caplog.set_level(logging.INFO, logger="villaged")
    stream = await harness.tls_stream()
    response, _ = await http_exchange(stream, h11.Connection(h11.CLIENT), method, target)
    assert response.status_code == status
    assert header(response, "connection") == "close"
    assert event in events(caplog)
    with trio.fail_after(5):
        assert await stream.receive_some(1) == b""
    await stream.aclose()


@pytest.mark.parametrize(
    ("request_bytes", "status", "event"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, "bad_request"),
        (b"HELLO THERE\r\n\r\n", 400, "bad_request"),
        (
            b"POST /.well-known/host-meta HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n"
            + b"a" * 40_000,
            413,
            "bad_request",
        ),
        (b"GET /.well-known/host-meta HTTP/1.1\r\nHost: x\r\n", 408, "request_timeout"),
    ],
)
async def test_bad_and_slow_http_requests(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: int,
    event: str,
) -> None:
    caplog.set_level(logging.INFO, logger="villaged")
    stream = await harness.tls_stream()
    await stream.send_all(request_bytes)
    received = b""
    # The request timeout is c2s.handshake_timeout: 1 s here. The server hangs up without
    # reading the rest of an oversized request, so TLS may end without its close_notify.
    with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            received += chunk
    assert received.startswith(f"HTTP/1.1 {status} ".encode()), received[:80]
    assert f"websocket.{event}" in events(caplog)
    await stream.aclose()


class RawWebSocket:
    """A WebSocket client on wsproto that does only what a test tells it (no pongs)."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[object] = []

    @classmethod
    async def open(
        cls, h: Harness, *, stream: trio.abc.Stream | None = None, early: str | None = None
    ) -> RawWebSocket:
        """Handshake (on ``stream`` if given); ``early`` goes in the same write as the request,
        before the 101 has come back."""
        if stream is None:
            stream = await h.tls_stream()
        ws = WSConnection(ConnectionType.CLIENT)
        raw = cls(stream, ws)
        request = Request(host="localhost", target="/xmpp-websocket", subprotocols=["xmpp"])
        data = ws.send(request)
        if early is not None:
            data += Connection(ConnectionType.CLIENT).send(TextMessage(data=early))
        await stream.send_all(data)
        accepted = await raw.next_event()
        assert isinstance(accepted, AcceptConnection), accepted
        assert accepted.subprotocol == "xmpp"
        return raw

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def next_event(self) -> object:
        with trio.fail_after(10):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(bytes(data) or None)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def aclose(self) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            await self.stream.aclose()


# ----- the framing without sockets --------------------------------------------------------


@dataclass
class FramingPair:
    """A client wsproto connection and the server's framing, wired by hand."""

    client: Connection
    framing: MessageFraming
    now: float = 0.0

    @classmethod
    def make(cls, *, max_message_bytes: int = 1000, rate: float = 1e9) -> FramingPair:
        server = Connection(ConnectionType.SERVER)
        bucket = TokenBucket(rate, rate, 0.0)
        framing = MessageFraming(server, max_message_bytes=max_message_bytes, overhead=bucket)
        return cls(Connection(ConnectionType.CLIENT), framing)

    def client_sends(self, *events: object) -> list[object]:
        for event in events:
            assert isinstance(event, TextMessage | BytesMessage | Ping | Pong | CloseConnection)
            self.framing.receive_data(self.client.send(event), self.now)
        return self.server_events()

    def server_events(self) -> list[object]:
        out: list[object] = []
        while (event := self.framing.next_event()) is not NEED_DATA:
            out.append(event)
        return out

    def client_receives(self) -> list[object]:
        self.client.receive_data(self.framing.data_to_send())
        return list(self.client.events())


def test_framing_assembles_fragments_and_counts_utf8_bytes() -> None:
    pair = FramingPair.make(max_message_bytes=12)
    got = pair.client_sends(
        TextMessage(data="<a>", message_finished=False),
        TextMessage(data="é✓", message_finished=False),  # 5 bytes in UTF-8
        TextMessage(data="</a>"),
        TextMessage(data=""),  # empty: nothing to deliver
        TextMessage(data="<b/>"),
    )
    assert got == [MessageReceived("<a>é✓</a>".encode()), MessageReceived(b"<b/>")]
    got = pair.client_sends(
        TextMessage(data="<a>", message_finished=False),
        TextMessage(data="✓" * 4),
        TextMessage(data="<after/>"),  # not read: the WebSocket is closing
    )
    assert got == [Refused(1009, "message too big (limit 12 bytes)", "websocket.message_too_big")]
    (close,) = pair.client_receives()
    assert close == CloseConnection(1009, "message too big (limit 12 bytes)")
    assert pair.framing.awaiting_close
    assert pair.client_sends(close.response()) == [
        PeerClosed(1009, "message too big (limit 12 bytes)")
    ]
    assert not pair.framing.awaiting_close


def test_framing_bounds_the_fragments_of_one_message() -> None:
    pair = FramingPair.make(max_message_bytes=100_000)
    fragments = [TextMessage(data="", message_finished=False)] * MAX_FRAGMENTS
    got = pair.client_sends(*fragments, TextMessage(data="", message_finished=False))
    reason = f"more than {MAX_FRAGMENTS} fragments in one message"
    assert got == [Refused(1008, reason, "websocket.too_many_fragments")]
    pair = FramingPair.make()
    got = pair.client_sends(*fragments[:-1], TextMessage(data="<a/>"))
    assert got == [MessageReceived(b"<a/>")]  # up to the bound is fine


def test_framing_answers_only_the_latest_ping_and_matches_its_own() -> None:
    pair = FramingPair.make()
    assert pair.client_sends(Ping(b"1"), Ping(b"2")) == []
    assert pair.client_receives() == [Pong(b"2")]
    pair.framing.send_ping(b"ours")
    assert pair.framing.awaiting_pong
    assert pair.client_receives() == [Ping(b"ours")]
    pair.client_sends(Pong(b"not ours"))
    assert pair.framing.awaiting_pong
    pair.client_sends(Pong(b"ours"))
    assert not pair.framing.awaiting_pong


def test_framing_limits_bytes_that_carry_no_xmpp() -> None:
    pair = FramingPair.make(rate=100)  # bytes per second and burst
    for _ in range(10):  # 6 (header and mask) + 4 bytes of payload each: 100 in all
        assert pair.client_sends(Ping(b"ping")) == []
    pair.now = 0.1  # 10 more bytes' worth
    assert pair.client_sends(Ping(b"ping")) == []
    assert pair.client_sends(Ping(b"ping")) == [
        Refused(1008, "too much traffic that is not XMPP", "websocket.rate_limited")
    ]
    # Message payload is not charged here (c2s limits it): a big message passes.
    big = FramingPair.make(rate=100)
    assert big.client_sends(TextMessage(data="x" * 900)) == [MessageReceived(b"x" * 900)]


def test_framing_echoes_the_peers_close_and_reports_a_lost_connection() -> None:
    pair = FramingPair.make()
    assert pair.client_sends(CloseConnection(1001, "bye")) == [PeerClosed(1001, "bye")]
    assert pair.client_receives() == [CloseConnection(1001, "bye")]
    with pytest.raises(Exception, match="closing"):
        pair.framing.send_messages([b"<late/>"])
    lost = FramingPair.make()
    lost.framing.receive_data(b"", 0.0)
    assert lost.server_events() == [PeerClosed(1006, None)]
    assert lost.framing.data_to_send() == b""


def test_framing_sends_text_messages_and_closes_once() -> None:
    pair = FramingPair.make()
    frames = pair.framing.send_messages([b"<a>\xc3\xa9</a>", b"<b/>"])
    pair.client.receive_data(frames)
    assert list(pair.client.events()) == [TextMessage(data="<a>é</a>"), TextMessage(data="<b/>")]
    pair.framing.close()
    pair.framing.close()
    assert pair.client_receives() == [CloseConnection(1000, "")]
    assert pair.client.state is ConnectionState.REMOTE_CLOSING


# ----- settings ---------------------------------------------------------------------------


def settings(allowed: tuple[str, ...]) -> WebSocketSettings:
    return WebSocketSettings("/xmpp-websocket", "wss://example.org/ws", allowed, 30, 15)


@pytest.mark.parametrize(
    ("allowed", "origin", "admitted"),
    [
        (("https://example.org:443",), None, True),  # not a browser
        (("https://example.org:443",), "https://example.org", True),
        (("https://example.org:443",), "HTTPS://Example.ORG:443", True),
        (("https://example.org:443",), "http://example.org", False),
        (("https://example.org:443",), "https://example.org:8443", False),
        (("https://example.org:443",), "https://evil.example", False),
        (("https://example.org:443",), "null", False),
        (("https://example.org:443",), "https://example.org/", False),
        (("http://localhost:*",), "http://localhost:3000", True),
        (("http://localhost:*",), "https://localhost:3000", False),
        (("*",), "https://anywhere.example", True),
        ((), "https://example.org", False),
        ((), None, True),
    ],
)
def test_origin_checks(allowed: tuple[str, ...], origin: str | None, admitted: bool) -> None:
    assert settings(allowed).origin_allowed(origin) is admitted


def test_defaults_follow_the_domain_and_listener(tmp_path: Path) -> None:
    config = load_config(init_dev(tmp_path / "d", port_base=15222, now=datetime.now(UTC)).config)
    dev = WebSocketSettings.from_config(config)
    assert dev.public_url == "wss://localhost:15224/xmpp-websocket"
    assert dev.allowed_origins == (
        "https://localhost:*",
        "http://localhost:*",
        "https://127.0.0.1:*",
        "http://127.0.0.1:*",
    )
    text = config.source.read_text()
    start = text.index("[websocket]")
    config.source.write_text(text[:start] + text[text.index("[log]") :])
    production = WebSocketSettings.from_config(load_config(config.source))
    assert production.allowed_origins == ("https://localhost:443", "https://localhost:15224")
    assert default_public_url("example.org", 443, "/ws") == "wss://example.org/ws"
    assert origin_of("wss://example.org/ws") == "https://example.org:443"
    assert origin_of("wss://[::1]:5443/ws") == "https://[::1]:5443"


def upgrade_request(
    *extra: tuple[str, str], version: str = "13", key: str | None = None
) -> h11.Request:
    return h11.Request(
        method="GET",
        target="/xmpp-websocket?client=test",
        headers=[
            ("host", "example.org"),
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", key or base64.b64encode(b"0123456789abcdef").decode()),
            ("sec-websocket-version", version),
            *extra,
        ],
    )


def test_answers_to_upgrade_requests() -> None:
    site = settings(("https://example.org:443",))
    accepted = answer_request(
        upgrade_request(("origin", "https://example.org"), ("sec-websocket-protocol", "x, xmpp")),
        site,
    )
    assert isinstance(accepted, UpgradeAccepted)
    assert accepted.response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Protocol: xmpp\r\n" in accepted.response
    assert b"Sec-WebSocket-Accept: " in accepted.response
    assert accepted.connection.state is ConnectionState.OPEN

    def refusal(request: h11.Request) -> HttpAnswer:
        answer = answer_request(request, site)
        assert isinstance(answer, HttpAnswer)
        assert not answer.keep_alive
        return answer

    old = refusal(upgrade_request(("sec-websocket-protocol", "xmpp"), version="8"))
    assert (old.status, old.headers) == (
        426,
        (("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")),
    )
    for key in ("c2hvcnQ=", "not base64!", base64.b64encode(b"x" * 17).decode()):
        answer = refusal(upgrade_request(("sec-websocket-protocol", "xmpp"), key=key))
        assert (answer.status, answer.refusal) == (
            400,
            ("websocket.bad_handshake", "Sec-WebSocket-Key is not 16 bytes of base64"),
        )
    two = refusal(
        upgrade_request(
            ("origin", "https://example.org"),
            ("origin", "https://evil.example"),
            ("sec-websocket-protocol", "xmpp"),
        )
    )
    assert (two.status, two.refusal, two.security) == (
        400,
        ("websocket.bad_handshake", "more than one Origin header"),
        True,
    )
    evil = refusal(upgrade_request(("origin", "https://evil.example")))
    assert (evil.status, evil.security) == (403, True)
    assert evil.refusal is not None
    assert evil.refusal[0] == "websocket.origin_refused"
    plain = refusal(h11.Request(method="HEAD", target="/xmpp-websocket", headers=[("host", "x")]))
    assert (plain.status, plain.headers) == (405, (("allow", "GET"),))
    meta = refusal(
        h11.Request(method="POST", target="/.well-known/host-meta", headers=[("host", "x")])
    )
    assert (meta.status, meta.headers) == (405, (("allow", "GET, HEAD"),))


def test_host_meta_documents() -> None:
    site = WebSocketSettings("/ws", "wss://example.org/ws?a=1&b='2'", (), 30, 15)
    for target in (b"/.well-known/host-meta?x", b"/.well-known/host-meta.json"):
        answer = answer_request(
            h11.Request(method="GET", target=target, headers=[("host", "x")]), site
        )
        assert isinstance(answer, HttpAnswer)
        assert (answer.status, answer.keep_alive) == (200, True)
        assert ("access-control-allow-origin", "*") in answer.headers
    xrd = ET.fromstring(site.host_meta_xrd)  # noqa: S314 - our own output
    assert [link.get("href") for link in xrd] == ["wss://example.org/ws?a=1&b='2'"]
    assert json.loads(site.host_meta_json)["links"][0]["href"] == "wss://example.org/ws?a=1&b='2'"


async def test_an_address_the_monitor_blocks_is_turned_away(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = harness.node.monitor
    assert monitor is not None
    for _ in range(monitor.config.auth_failures_per_ip):
        monitor.record(AUTH_FAILURES_PER_IP, "127.0.0.1")
    assert monitor.is_blocked("127.0.0.1")
    with pytest.raises(Exception):  # noqa: B017, PT011 - closed before TLS: the error varies
        async with harness.websocket():
            pass
    assert "websocket.blocked" in security_events(caplog)


async def test_behind_a_trusted_proxy_clients_are_counted_and_blocked_by_their_own_address(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_harness(
        nursery,
        tmp_path / "n",
        c2s_toml="max_connections_per_ip = 1",
        websocket_toml='trusted_proxies = ["127.0.0.0/30"]\n',
    )
    # Two clients through the proxy: each counted by its own address, the proxy not at all.
    # The client wrote the leftmost entry itself; the proxies' entries are trusted.
    async with (
        h.xmpp("alice", forwarded_for="198.51.100.7") as alice,
        h.xmpp("bob", forwarded_for="203.0.113.66, 198.51.100.8, 127.0.0.2") as bob,
    ):
        assert h.node.c2s.connections_per_ip == {"198.51.100.7": 1, "198.51.100.8": 1}
        await alice.chat("bob@localhost", "through the proxy")
        assert (await bob.message()).findtext("{jabber:client}body") == "through the proxy"
        with pytest.raises(InvalidStatus) as refused:  # the cap, for that client address
            async with h.websocket(forwarded_for="198.51.100.7"):
                pass
        assert refused.value.response.status_code == 503
    assert "websocket.too_many_connections" in security_events(caplog)
    monitor = h.node.monitor
    for _ in range(monitor.config.auth_failures_per_ip):
        monitor.record(AUTH_FAILURES_PER_IP, "198.51.100.9")
    with pytest.raises(InvalidStatus) as refused:
        async with h.websocket(forwarded_for="198.51.100.9"):
            pass
    assert refused.value.response.status_code == 403
    async with h.xmpp("carol", forwarded_for="not-an-address, 198.51.100.10"):
        # Behind an entry that is no address nothing is believed: the proxy's own stands.
        assert h.node.c2s.connections_per_ip == {"198.51.100.10": 1}
    for unusable in ("198.51.100.11, junk", None):  # never counted as the proxy's own
        with pytest.raises(InvalidStatus) as refused:
            async with h.websocket(forwarded_for=unusable):
                pass
        assert refused.value.response.status_code == 400
    assert "websocket.forwarded_missing" in security_events(caplog)
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ([], None),
        ([(b"x-forwarded-for", b"198.51.100.1")], "198.51.100.1"),
        ([(b"x-forwarded-for", b"192.0.2.1, 198.51.100.1, 10.1.2.3")], "198.51.100.1"),
        ([(b"x-forwarded-for", b"192.0.2.1"), (b"x-forwarded-for", b"10.0.0.9")], "192.0.2.1"),
        ([(b"x-forwarded-for", b"10.0.0.8, 10.0.0.9")], "10.0.0.8"),
        ([(b"x-forwarded-for", b"[2001:db8::1]")], "2001:db8::1"),
        ([(b"x-forwarded-for", b"[2001:db8::1]:5678")], "2001:db8::1"),
        ([(b"x-forwarded-for", b"198.51.100.1:5678")], "198.51.100.1"),
        ([(b"x-forwarded-for", b"2001:db8::7")], "2001:db8::7"),
        ([(b"x-forwarded-for", b"::ffff:192.0.2.4")], "192.0.2.4"),
        ([(b"x-forwarded-for", b"192.0.2.1, unknown")], None),
        ([(b"x-forwarded-for", b",".join([b"10.0.0.1"] * 40))], "10.0.0.1"),
    ],
)
def test_the_forwarded_client_is_the_rightmost_untrusted_hop(
    headers: list[tuple[bytes, bytes]], client: str | None
) -> None:
    settings = WebSocketSettings(
        "/ws", "wss://example.org/ws", (), 30, 15, (ipaddress.ip_network("10.0.0.0/8"),)
    )
    assert forwarded_client(headers, settings) == client
    assert settings.is_trusted_proxy("10.9.9.9")
    assert not settings.is_trusted_proxy("11.0.0.1")
    assert not settings.is_trusted_proxy("unknown")
