"""Client connections end to end, in process: real sockets, real TLS, the node assembled by
app.run_node exactly as `villaged run` does."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ssl
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from tests.net.rawclient import RawClient, header
from tests.ports import free_port_base
from villaged.app import Node, _shut_down, run_node
from villaged.config import load_config
from villaged.net import c2s as c2s_driver
from villaged.net.c2s import HANDSHAKES_PER_IP
from villaged.ops.provision import init_dev
from villaged.storage.errors import LogWriteError
from villaged.storage.store import StoreOptions, open_store
from villaged.xmpp import c2s as core
from villaged.xmpp import xml

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class Harness:
    def __init__(self, node: Node, base: int, ca_file: Path) -> None:
        self.node = node
        self.c2s = base
        self.c2s_tls = base + 1
        self.ca_file = ca_file
        self.clients: list[RawClient] = []

    async def client(self, *, direct_tls: bool = False) -> RawClient:
        port = self.c2s_tls if direct_tls else self.c2s
        client = await RawClient.connect(port, self.ca_file, direct_tls=direct_tls)
        self.clients.append(client)
        return client

    async def logged_in(
        self, user: str, *, direct_tls: bool = False, resource: str = "r"
    ) -> RawClient:
        client = await self.client(direct_tls=direct_tls)
        await client.login(user, f"{user}-password", resource=resource, starttls=not direct_tls)
        await client.send(b"<presence/>")
        return client


@pytest.fixture
async def harness(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    base = free_port_base()
    result = init_dev(tmp_path / "n", port_base=base, now=datetime.now(UTC))
    text = (
        result.config.read_text()
        + "\n[c2s]\nhandshake_timeout = 1\nmax_connections_per_ip = 3000\n"
    )
    result.config.write_text(text)
    config = load_config(result.config)
    async with open_store(StoreOptions.from_config(config.storage)) as store:
        for user in ("alice", "bob", "carol"):
            await store.add_user(f"{user}@localhost", f"{user}-password")
    node = await nursery.start(partial(run_node, config, handle_signals=False))
    harness = Harness(node, base, config.tls.cert)
    yield harness
    for client in harness.clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def chat_works(h: Harness, sender: RawClient, receiver: RawClient, text: str) -> None:
    body = text.replace("&", "&amp;").replace("<", "&lt;")
    await sender.send(
        f"<message to='bob@localhost' type='chat'><body>{body}</body></message>".encode()
    )
    got = await receiver.element()
    assert got.tag == "{jabber:client}message"
    assert got.findtext("{jabber:client}body") == text


async def test_chat_over_starttls_and_direct_tls(harness: Harness) -> None:
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob", direct_tls=True)
    text = "héllo ✓ <&>'\""
    await alice.send(
        b"<message to='Bob@LOCALHOST' type='chat' id='m1'><body>h\xc3\xa9llo \xe2\x9c\x93 "
        b"&lt;&amp;&gt;'\"</body></message>"
    )
    got = await bob.element()
    assert got.get("from") == "alice@localhost/r"
    assert got.get("to") == "bob@localhost"
    assert got.findtext("{jabber:client}body") == text
    await bob.send(b"<message to='alice@localhost/r' type='chat'><body>back</body></message>")
    back = await alice.element()
    assert back.get("from") == "bob@localhost/r"
    assert back.findtext("{jabber:client}body") == "back"
    for client in (alice, bob):
        await client.send(b"</stream:stream>")
        assert await client.next() is None


async def test_wrong_password_and_unknown_user_are_refused(harness: Harness) -> None:
    for user, password in (("alice", "nope"), ("mallory", "whatever")):
        client = await harness.client()
        with pytest.raises(PermissionError, match="not-authorized"):
            await client.login(user, password)
        await client.aclose()


async def test_server_answers_ping_disco_version_and_bounces_unknown_users(
    harness: Harness,
) -> None:
    alice = await harness.logged_in("alice")
    await alice.send(b"<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    pong = await alice.element()
    assert (pong.get("type"), pong.get("id")) == ("result", "p1")
    await alice.send(
        b"<iq type='get' id='d1' to='localhost'>"
        b"<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    )
    info = await alice.element()
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert {
        "urn:xmpp:ping",
        "jabber:iq:version",
        "http://jabber.org/protocol/disco#info",
        "urn:xmpp:sm:3",
        "urn:xmpp:csi:0",
        "urn:xmpp:blocking",
    } <= features
    await alice.send(
        b"<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>"
    )
    version = await alice.element()
    assert version.findtext(".//{jabber:iq:version}name") == "villaged"
    await alice.send(b"<iq type='get' id='x1' to='localhost'><query xmlns='urn:nothing'/></iq>")
    unknown = await alice.element()
    assert unknown.find(f".//{{{STANZA_ERRORS}}}service-unavailable") is not None
    await alice.send(b"<message to='nobody@localhost' id='m9' type='chat'><body>x</body></message>")
    bounce = await alice.element()
    assert bounce.get("type") == "error"
    assert bounce.get("id") == "m9"
    assert bounce.find(f".//{{{STANZA_ERRORS}}}service-unavailable") is not None


async def test_pipelined_stanzas_take_effect_in_the_order_sent(harness: Harness) -> None:
    # One write: archived messages (each waits for its record) interleaved with bounces (no
    # record) and messages to herself, then an iq. Alice must see her own messages and the
    # errors strictly interleaved, and the iq answer last; Bob gets his in order.
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    batch = []
    for n in range(40):
        batch.append(
            f"<message to='bob@localhost' id='b{n}' type='chat'><body>{n}</body></message>"
        )
        batch.append(
            f"<message to='alice@localhost' id='s{n}' type='chat'><body>{n}</body></message>"
        )
        batch.append(
            f"<message to='nobody@localhost' id='e{n}' type='chat'><body>x</body></message>"
        )
    batch.append("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    await alice.send("".join(batch).encode())
    seen = [(await alice.element()).get("id") for _ in range(81)]
    assert seen == [i for n in range(40) for i in (f"s{n}", f"e{n}")] + ["p1"]
    assert [(await bob.element()).get("id") for _ in range(40)] == [f"b{n}" for n in range(40)]


async def test_messages_sent_just_before_the_stream_closes_are_delivered(
    harness: Harness,
) -> None:
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    messages = "".join(
        f"<message to='bob@localhost' id='b{n}' type='chat'><body>{n}</body></message>"
        for n in range(60)  # more than one pipeline's worth
    )
    await alice.send(messages.encode() + b"</stream:stream>")
    assert [(await bob.element()).get("id") for _ in range(60)] == [f"b{n}" for n in range(60)]


@pytest.mark.parametrize(
    ("stage", "payload", "condition"),
    [
        ("bound", b"<message><body>unclosed</bod></message>", "not-well-formed"),
        ("bound", b"<!-- a comment -->", "restricted-xml"),
        ("bound", b"<?pi data?>", "restricted-xml"),
        ("bound", b"<message><body>" + b"x" * 300_000 + b"</body></message>", "policy-violation"),
        ("tls", b"<message to='bob@localhost'><body>early</body></message>", "not-authorized"),
        ("open", b"<message to='bob@localhost'><body>early</body></message>", "policy-violation"),
    ],
)
async def test_bad_input_ends_only_that_stream(
    harness: Harness, stage: str, payload: bytes, condition: str
) -> None:
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    if stage == "bound":
        bad = await harness.logged_in("carol")
    else:
        bad = await harness.client(direct_tls=stage == "tls")
        await bad.send(header())
        await bad.element()  # features
    await bad.send(payload)
    assert await bad.stream_error() == condition
    assert await bad.next() is None
    await chat_works(harness, alice, bob, "still here")


async def test_bad_sasl_base64_is_a_sasl_failure(harness: Harness) -> None:
    client = await harness.client(direct_tls=True)
    await client.send(header())
    await client.element()
    await client.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>!!!notbase64</auth>".encode())
    failure = await client.element()
    assert failure.tag == f"{{{SASL}}}failure"
    assert failure.find(f"{{{SASL}}}incorrect-encoding") is not None


async def test_connections_that_never_finish_tls_are_dropped(harness: Harness) -> None:
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    idle = [await trio.open_tcp_stream("127.0.0.1", harness.c2s_tls) for _ in range(1000)]
    await chat_works(harness, alice, bob, "while 1000 sockets hang")
    with trio.fail_after(10):  # handshake_timeout is 1 s in this node
        for sock in idle:
            assert await sock.receive_some(1) == b""
            await sock.aclose()
    await chat_works(harness, alice, bob, "after they were dropped")


async def test_handshakes_from_one_address_take_turns(harness: Harness) -> None:
    c2s = harness.node.c2s
    stalled = [
        await trio.open_tcp_stream("127.0.0.1", harness.c2s_tls) for _ in range(HANDSHAKES_PER_IP)
    ]
    await trio.sleep(0.5)  # handshake_timeout is 1 s in this node
    assert c2s.handshakes_per_ip["127.0.0.1"].borrowed_tokens == HANDSHAKES_PER_IP
    started = trio.current_time()
    client = await harness.client(direct_tls=True)  # waits for a stalled one to be dropped
    assert trio.current_time() - started >= 0.3
    await client.login("alice", "alice-password", starttls=False)
    for sock in stalled:
        assert await sock.receive_some(1) == b""
        await sock.aclose()
    assert c2s.handshakes_per_ip == {}


async def test_plain_text_on_the_direct_tls_port_is_dropped(harness: Harness) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", harness.c2s_tls)
    await sock.send_all(header())
    with trio.fail_after(5):
        data = await sock.receive_some(100)
    assert data == b"" or not data.startswith(b"<")  # never XMPP in the clear
    await sock.aclose()


async def test_shutdown_sends_system_shutdown(harness: Harness) -> None:
    alice = await harness.logged_in("alice")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_shut_down, harness.node)
        assert await alice.stream_error() == "system-shutdown"
    assert len(harness.node.sessions) == 0


async def test_tls_certificate_is_verified_by_clients(harness: Harness, tmp_path: Path) -> None:
    other = init_dev(tmp_path / "other", now=datetime.now(UTC))
    wrong_ca = other.directory / "tls" / "cert.pem"
    with pytest.raises(trio.BrokenResourceError) as info:
        await RawClient.connect(harness.c2s_tls, wrong_ca, direct_tls=True)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def _node_with(nursery: trio.Nursery, tmp_path: Path, c2s_toml: str) -> Harness:
    from tests.nodes import start_node

    running = await start_node(nursery, tmp_path, extra_toml="[c2s]\n" + c2s_toml)
    return Harness(running.node, running.port_base, running.ca_file)


async def test_a_trickling_client_is_cut_off_at_the_negotiation_deadline(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    h = await _node_with(nursery, tmp_path, "negotiation_timeout = 5")
    alice = await h.logged_in("alice")
    bob = await h.logged_in("bob")
    slow = await h.client(direct_tls=True)
    began = trio.current_time()
    async with trio.open_nursery() as trickle:

        async def one_byte_per_second() -> None:
            for byte in header():
                await slow.send(bytes([byte]))
                await trio.sleep(1)

        trickle.start_soon(one_byte_per_second)
        assert await slow.stream_error(within_s=15) == "connection-timeout"
        trickle.cancel_scope.cancel()
    assert 4 < trio.current_time() - began < 10
    await chat_works(h, alice, bob, "unaffected by the trickle")
    for client in h.clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_a_flood_beyond_the_rate_limit_is_a_policy_violation(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    h = await _node_with(
        nursery,
        tmp_path,
        "max_stanza_bytes = 10240\nburst_bytes = 16384\nbytes_per_second = 1024",
    )
    alice = await h.logged_in("alice")
    bob = await h.logged_in("bob")
    flooder = await h.logged_in("carol")
    stanza = b"<message to='bob@localhost' type='chat'><body>" + b"f" * 900 + b"</body></message>"
    with contextlib.suppress(trio.BrokenResourceError):  # the server may hang up mid-flood
        await flooder.send(stanza * 100)
    assert await flooder.stream_error() == "policy-violation"
    assert any(getattr(r, "event", "") == "c2s.rate_limited" for r in caplog.records)
    await alice.send(b"<message to='bob@localhost' type='chat'><body>after</body></message>")
    with trio.fail_after(10):
        while (await bob.element()).findtext("{jabber:client}body") != "after":
            pass  # skip the part of the flood that arrived before the cut
    for client in h.clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_replies_to_pipelined_stanzas_arrive_before_our_close(harness: Harness) -> None:
    alice = await harness.logged_in("alice")
    burst = b"".join(
        f"<message to='nobody@localhost' id='n{i}' type='chat'><body>x</body></message>".encode()
        for i in range(20)
    )
    await alice.send(burst + b"</stream:stream>")
    bounced = []
    while (got := await alice.next()) is not None:
        if isinstance(got, ET.Element) and got.get("type") == "error":
            bounced.append(got.get("id"))
    assert bounced == [f"n{i}" for i in range(20)]


async def test_a_storage_failure_ends_one_stream_not_the_node(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    store = harness.node.store

    async def disk_full(record: object) -> object:
        raise LogWriteError("simulated: no space left on device")

    monkeypatch.setattr(store, "submit", disk_full)
    await alice.send(b"<message to='bob@localhost' type='chat'><body>lost?</body></message>")
    assert await alice.stream_error() == "internal-server-error"
    assert any(getattr(r, "event", "") == "c2s.storage_failed" for r in caplog.records)
    monkeypatch.undo()
    await bob.send(b"<iq type='get' id='still' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await bob.element()).get("id") == "still"
    carol = await harness.logged_in("carol")  # the listener still accepts logins
    await carol.send(b"<message to='bob@localhost' type='chat'><body>after</body></message>")
    assert (await bob.element()).findtext("{jabber:client}body") == "after"


async def test_quiet_clients_release_their_parser_get_pinged_and_time_out(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(c2s_driver, "COMPACT_AFTER_S", 0.3)
    compacted: list[bool] = []
    compact = core.C2SStream.compact

    def watched(stream: core.C2SStream) -> bool:
        compacted.append(compact(stream))
        return compacted[-1]

    monkeypatch.setattr(core.C2SStream, "compact", watched)
    harness.node.c2s.limits = dataclasses.replace(harness.node.c2s.limits, idle_timeout=2)
    alice = await harness.logged_in("alice")
    bob = await harness.logged_in("bob")
    await trio.sleep(1)
    assert compacted.count(True) >= 2  # both quiet streams released their parser
    await chat_works(harness, alice, bob, "after a quiet spell <&>")  # and reads on as before
    # Past the idle timeout each gets a ping; bob answers his, alice ignores hers.
    began = trio.current_time()
    ping = await bob.element(within_s=5)
    assert ping.find("{urn:xmpp:ping}ping") is not None
    await bob.send(f"<iq type='result' id='{ping.get('id')}' to='localhost'/>".encode())
    assert await alice.stream_error(within_s=8) == "connection-timeout"
    assert 2 < trio.current_time() - began < 7
    carol = await harness.logged_in("carol")
    await carol.send(b"<message to='bob@localhost' type='chat'><body>still here</body></message>")
    for _ in range(3):  # bob may see another ping first: he keeps answering
        got = await bob.element(within_s=5)
        if got.tag == "{jabber:client}message":
            break
        await bob.send(f"<iq type='result' id='{got.get('id')}' to='localhost'/>".encode())
    assert got.findtext("{jabber:client}body") == "still here"


async def test_during_shutdown_new_connections_and_late_binds_are_turned_away(
    harness: Harness,
) -> None:
    late = await harness.client()
    await late.send(header())  # negotiating while the node begins to shut down
    await late.element()  # features
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_shut_down, harness.node)
        await trio.sleep(0.1)
        newcomer = await RawClient.connect(harness.c2s, harness.ca_file)
        assert await newcomer.next() is None  # closed at once
        await newcomer.aclose()
        await late.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert (await late.element()).tag.endswith("proceed")
        await late._tls()
        await late.send(header())
        await late.element()
        await late.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            + base64.b64encode(b"\0alice\0alice-password")
            + b"</auth>"
        )
        assert (await late.element()).tag.endswith("success")
        late.parser = xml.StreamParser()
        await late.send(header())
        await late.element()
        await late.send(
            b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
        )
        assert await late.stream_error() == "system-shutdown"
