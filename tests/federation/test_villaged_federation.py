"""villaged ↔ villaged between two domains on loopback: real TLS under a test CA, SASL EXTERNAL
or dialback, subscriptions, presence and chat both ways, refusals of bad peers."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest
import trio

from tests.federation.interop import Inbox
from tests.federation.nodes import (
    FederatedNode,
    Route,
    start_federated_node,
    write_federated_config,
)
from tests.federation.pki import issue, issue_expired, make_ca, write_pem_pair
from tests.net.rawclient import RawClient
from tests.ports import free_port_base
from villaged.federation import service
from villaged.xmpp import xml
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from pathlib import Path

    from tests.federation.pki import PemPair

CLIENT = "{jabber:client}"


async def client(
    node: FederatedNode, user: str, *, available: bool = True, ca_file: Path | None = None
) -> RawClient:
    """``user`` logged in (and available), trusting ``ca_file`` (default: the test CA)."""
    raw = await RawClient.connect(node.c2s, ca_file or node.ca_file, domain=node.domain)
    await raw.login(user, f"{user}-password", resource="r")
    if available:
        await raw.send(b"<presence/>")
    return raw


async def next_of(raw: RawClient, tag: str, within_s: float = 20) -> ET.Element:
    """The next element with ``tag`` (others, such as roster pushes, are skipped)."""
    with trio.fail_after(within_s):
        while True:
            element = await raw.element(within_s)
            if element.tag == f"{CLIENT}{tag}":
                return element


async def pair(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    ca_a: PemPair | None = None,
    cert_a: PemPair | None = None,
    ca_b: PemPair | None = None,
    cert_b: PemPair | None = None,
    federation_toml: str = "",
    direct_tls: bool = False,
) -> tuple[FederatedNode, FederatedNode]:
    """Two nodes, a.test and b.test, each with a static route to the other (to its direct-TLS
    port, XEP-0368, with ``direct_tls``)."""
    ca = make_ca("federation test CA")
    base_a, base_b = free_port_base(), free_port_base()
    while abs(base_a - base_b) < 8:
        base_b = free_port_base()
    a_path = write_federated_config(
        tmp_path / "a",
        "a.test",
        ca_a or ca,
        certificate=cert_a,
        routes={"b.test": Route(base_b + (5 if direct_tls else 4), direct_tls)},
        federation_toml=federation_toml,
        port_base=base_a,
    )
    b_path = write_federated_config(
        tmp_path / "b",
        "b.test",
        ca_b or ca,
        certificate=cert_b,
        routes={"a.test": Route(base_a + (5 if direct_tls else 4), direct_tls)},
        federation_toml=federation_toml,
        port_base=base_b,
    )
    a = await start_federated_node(nursery, a_path)
    b = await start_federated_node(nursery, b_path)
    return a, b


async def chat(sender: RawClient, receiver: RawClient, to: str, body: str) -> ET.Element:
    await sender.send(f"<message to='{to}' type='chat'><body>{body}</body></message>".encode())
    got = await next_of(receiver, "message")
    assert got.findtext(f"{CLIENT}body") == body
    return got


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
async def test_chat_both_ways_with_certificates(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, direct_tls: bool
) -> None:
    caplog.set_level(logging.INFO, "villaged.federation")
    a, b = await pair(nursery, tmp_path, direct_tls=direct_tls)
    alice, bob = await client(a, "alice"), await client(b, "bob")
    got = await chat(alice, bob, "bob@b.test", "hello from a")
    assert got.get("from") == "alice@a.test/r"
    got = await chat(bob, alice, "alice@a.test/r", "hello back from b")
    assert got.get("from") == "bob@b.test/r"
    methods = {
        r.__dict__["method"]
        for r in caplog.records
        if r.__dict__.get("event") == "s2s.inbound_authenticated"
    }
    assert methods == {"sasl-external"}
    await alice.aclose()
    await bob.aclose()
    nursery.cancel_scope.cancel()


def last_error(federation: service.Federation, domain: str) -> str:
    status = federation.counts().get(domain)
    return str(status["last_error"]) if status is not None else ""


def security_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.__dict__ for r in caplog.records if r.__dict__.get("security")]


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
@pytest.mark.parametrize("auth_mode", ["certs", "dialback"])
async def test_subscription_presence_and_chat_across_domains(
    tmp_path: Path,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    direct_tls: bool,
    auth_mode: str,
) -> None:
    """The whole IM flow across the two domains, each proving itself with its certificate
    (SASL EXTERNAL) — or, with certificates neither can verify, with dialback."""
    caplog.set_level(logging.INFO, "villaged.federation")
    ca = make_ca("federation test CA")
    issuer = make_ca("not trusted by the servers") if auth_mode == "dialback" else ca
    a, b = await pair(
        nursery,
        tmp_path,
        ca_a=ca,
        ca_b=ca,
        cert_a=issue(issuer, "a.test"),
        cert_b=issue(issuer, "b.test"),
        direct_tls=direct_tls,
        federation_toml="dialback = false\n" if auth_mode == "certs" else "",
    )
    clients_ca, _ = write_pem_pair(tmp_path / "clients", "ca", issuer)
    alice = await client(a, "alice", ca_file=clients_ca)
    bob = await client(b, "bob", ca_file=clients_ca)
    alice_in, bob_in = Inbox(alice), Inbox(bob)

    await alice.send(b"<presence to='bob@b.test' type='subscribe'/>")
    await bob_in.presence("alice@a.test", "subscribe")
    await bob.send(b"<presence to='alice@a.test' type='subscribed'/>")
    await bob.send(b"<presence to='alice@a.test' type='subscribe'/>")
    await alice_in.presence("bob@b.test")  # bob's presence follows his 'subscribed'
    await alice_in.presence("bob@b.test", "subscribe")
    await alice.send(b"<presence to='bob@b.test' type='subscribed'/>")
    await bob_in.presence("alice@a.test")

    await alice.send(b"<message to='bob@b.test' type='chat'><body>across</body></message>")
    got = await bob_in.wait(lambda e: e.tag == f"{CLIENT}message")
    assert got.findtext(f"{CLIENT}body") == "across"
    await bob.send(b"<message to='alice@a.test' type='chat'><body>and back</body></message>")
    got = await alice_in.wait(lambda e: e.tag == f"{CLIENT}message")
    assert got.findtext(f"{CLIENT}body") == "and back"
    await bob.send(b"<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
    roster = await bob_in.wait(lambda e: e.get("id") == "roster")
    items = {i.get("jid"): i.get("subscription") for i in roster.iter("{jabber:iq:roster}item")}
    assert items == {"alice@a.test": "both"}

    # An iq across domains: bob pings alice's server and gets the answer.
    await bob.send(b"<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    pong = await bob_in.wait(lambda e: e.get("id") == "p1")
    assert (pong.get("type"), pong.get("from")) == ("result", "a.test")
    # Disco of the remote server.
    await bob.send(
        b"<iq type='get' id='d1' to='a.test'>"
        b"<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    )
    info = await bob_in.wait(lambda e: e.get("id") == "d1")
    assert info.get("type") == "result"
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert identity.get("category") == "server"

    methods = {
        r.__dict__["method"]
        for r in caplog.records
        if r.__dict__.get("event") == "s2s.inbound_authenticated"
    }
    assert methods == {"sasl-external" if auth_mode == "certs" else "dialback"}
    # Each dialback check was answered on a verify-only stream: no storm of checks of checks.
    handshakes = [
        r for r in caplog.records if r.__dict__.get("event") == "s2s.certificate_unverified"
    ]
    assert len(handshakes) <= 8
    await alice.aclose()
    await bob.aclose()
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("problem", ["wrong domain", "expired"])
async def test_a_peer_whose_certificate_does_not_prove_its_domain_is_refused(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    ca = make_ca("federation test CA")
    bad = issue(ca, "other.test") if problem == "wrong domain" else issue_expired(ca, "a.test")
    a, _ = await pair(
        nursery, tmp_path, ca_a=ca, ca_b=ca, cert_a=bad, federation_toml="dialback = false\n"
    )
    # (No client: a.test's certificate is as bad for clients as for peers.) Queued directly.
    federation = a.node.federation
    assert federation is not None
    message = ET.fromstring(  # noqa: S314 - our own literal
        "<message xmlns='jabber:client' from='alice@a.test/r' to='bob@b.test' type='chat'>"
        "<body>refused</body></message>"
    )
    commit = await federation.enqueue(JID.parse("alice@a.test"), message, JID.parse("bob@b.test"))
    await commit.wait()
    federation.wake("b.test")
    with trio.fail_after(20):
        while "not-authorized" not in last_error(federation, "b.test"):  # noqa: ASYNC110
            await trio.sleep(0.05)  # the link retries on its own: no event to wait on
    refused = [e for e in security_events(caplog) if e["event"] == "s2s.certificate_refused"]
    assert refused
    assert refused[0]["domain"] == "a.test"
    expected = "certificate not valid for a.test" if problem == "wrong domain" else "expired"
    assert expected in str(refused[0]["error"])
    assert federation.counts()["b.test"]["queued"] == 1  # kept, not lost
    nursery.cancel_scope.cancel()


async def raw_s2s(
    port: int, header_to: str = "b.test"
) -> tuple[trio.SocketStream, xml.StreamParser]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        f"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
        f"from='a.test' to='{header_to}' version='1.0'>".encode()
    )
    return stream, xml.StreamParser()


async def stream_error_of(stream: trio.SocketStream, parser: xml.StreamParser) -> str:
    with trio.fail_after(10):
        while True:
            event = parser.next_event()
            if isinstance(event, xml.StanzaReceived) and event.element.tag.endswith("}error"):
                return event.element[0].tag.split("}")[1]
            if event is xml.NEED_DATA:
                parser.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, xml.ConnectionClosed):
                return "closed"


@pytest.mark.parametrize(
    ("header_to", "first", "condition"),
    [
        (
            "b.test",
            "<db:result from='a.test' to='b.test'>0123456789abcdef</db:result>",
            "policy-violation",
        ),
        (
            "b.test",
            "<message from='alice@a.test' to='bob@b.test'><body>x</body></message>",
            "policy-violation",
        ),
        ("nowhere.test", "", "host-unknown"),
    ],
)
async def test_a_peer_without_tls_or_for_another_host_gets_a_stream_error(
    tmp_path: Path,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    header_to: str,
    first: str,
    condition: str,
) -> None:
    _, b = await pair(nursery, tmp_path)
    stream, parser = await raw_s2s(b.s2s, header_to)
    if first:
        await stream.send_all(first.encode())
    assert await stream_error_of(stream, parser) == condition
    await stream.aclose()
    with trio.fail_after(5):
        while not [e for e in security_events(caplog) if e.get("condition") == condition]:  # noqa: ASYNC110
            await trio.sleep(0.02)  # the node logs from its own task
    nursery.cancel_scope.cancel()


async def test_a_message_past_the_queue_deadline_bounces_to_its_sender(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = make_ca("federation test CA")
    nobody = free_port_base(1)  # b.test's server is down: nothing listens there
    path = write_federated_config(tmp_path / "a", "a.test", ca, routes={"b.test": Route(nobody)})
    a = await start_federated_node(nursery, path)
    federation = a.node.federation
    assert federation is not None
    alice = await client(a, "alice")
    await alice.send(
        b"<message to='bob@b.test' type='chat' id='late'><body>hello?</body></message>"
    )
    with trio.fail_after(10):
        while "b.test" not in federation.counts() or not federation.counts()["b.test"]["failures"]:  # noqa: ASYNC110
            await trio.sleep(0.02)  # the link retries on its own: no event to wait on
    assert federation.counts()["b.test"]["queued"] == 1
    # A day later (the deadline is a day): the next attempt fails too, and the message bounces.
    later = service._now_micros() + 86_401 * 1_000_000
    monkeypatch.setattr(service, "_now_micros", lambda: later)
    bounce = await next_of(alice, "message")
    assert (bounce.get("type"), bounce.get("id"), bounce.get("from")) == (
        "error",
        "late",
        "bob@b.test",
    )
    condition = bounce.find("{jabber:client}error")
    assert condition is not None
    assert condition[0].tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}remote-server-timeout"
    with trio.fail_after(10):
        while "b.test" in federation.counts() and federation.counts()["b.test"]["queued"]:  # noqa: ASYNC110
            await trio.sleep(0.02)
    await alice.aclose()
    nursery.cancel_scope.cancel()


async def test_federation_refuses_domains_outside_its_policy(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca = make_ca("federation test CA")
    path = write_federated_config(
        tmp_path / "a", "a.test", ca, federation_toml='deny = ["evil.test"]\n'
    )
    a = await start_federated_node(nursery, path)
    alice = await client(a, "alice")
    await alice.send(b"<message to='x@evil.test' type='chat' id='no'><body>x</body></message>")
    bounce = await next_of(alice, "message")
    assert (bounce.get("type"), bounce.get("id")) == ("error", "no")
    error = bounce.find("{jabber:client}error")
    assert error is not None
    assert error[0].tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}remote-server-not-found"
    assert a.node.federation is not None
    assert a.node.federation.counts() == {}
    await alice.aclose()
    nursery.cancel_scope.cancel()


async def test_carbons_and_archives_on_both_sides(tmp_path: Path, nursery: trio.Nursery) -> None:
    a, b = await pair(nursery, tmp_path)
    alice = await client(a, "alice")
    phone = await RawClient.connect(a.c2s, a.ca_file, domain="a.test")
    await phone.login("alice", "alice-password", resource="phone")
    await phone.send(b"<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq><presence/>")
    bob = await client(b, "bob")
    phone_in, bob_in = Inbox(phone), Inbox(bob)
    await phone_in.wait(lambda e: e.get("id") == "c")

    await alice.send(b"<message to='bob@b.test' type='chat'><body>archived</body></message>")
    got = await bob_in.wait(lambda e: e.tag == f"{CLIENT}message")
    assert got.findtext(f"{CLIENT}body") == "archived"
    carbon = await phone_in.wait(lambda e: e.find("{urn:xmpp:carbons:2}sent") is not None)
    assert "archived" in ET.tostring(carbon, encoding="unicode")

    for raw, inbox, peer in ((alice, Inbox(alice), "bob@b.test"), (bob, bob_in, "alice@a.test")):
        await raw.send(b"<iq type='set' id='mam'><query xmlns='urn:xmpp:mam:2'/></iq>")
        result = await inbox.wait(lambda e: e.find("{urn:xmpp:mam:2}result") is not None)
        forwarded = ET.tostring(result, encoding="unicode")
        assert "archived" in forwarded
        assert peer in forwarded
        done = await inbox.wait(lambda e: e.get("id") == "mam")
        assert done.get("type") == "result"
    for raw in (alice, phone, bob):
        await raw.aclose()
    nursery.cancel_scope.cancel()


async def test_iqs_from_another_domain_reach_users_and_honour_blocking(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    a, b = await pair(nursery, tmp_path)
    alice, bob = await client(a, "alice"), await client(b, "bob")
    alice_in, bob_in = Inbox(alice), Inbox(bob)

    async def ask(iq: str, id_: str) -> ET.Element:
        await bob.send(iq.encode())
        return await bob_in.wait(lambda e: e.get("id") == id_)

    def condition(reply: ET.Element) -> str:
        error = reply.find(f"{CLIENT}error")
        assert error is not None, ET.tostring(reply)
        return error[0].tag.split("}")[1]

    # A full JID: passed to alice's client, whose answer goes back across.
    await bob.send(b"<iq type='get' id='p1' to='alice@a.test/r'><ping xmlns='urn:xmpp:ping'/></iq>")
    ping = await alice_in.wait(lambda e: e.get("id") == "p1")
    assert ping.get("from") == "bob@b.test/r"
    await alice.send(b"<iq type='result' id='p1' to='bob@b.test/r'/>")
    assert (await bob_in.wait(lambda e: e.get("id") == "p1")).get("type") == "result"
    # A bare JID: the account's handlers (vCard); an unknown account: service-unavailable.
    await alice.send(
        b"<iq type='set' id='vs'><vCard xmlns='vcard-temp'><FN>Alice</FN></vCard></iq>"
    )
    await alice_in.wait(lambda e: e.get("id") == "vs")
    vcard = await ask(
        "<iq type='get' id='v1' to='alice@a.test'><vCard xmlns='vcard-temp'/></iq>", "v1"
    )
    assert vcard.get("type") == "result"
    assert vcard.findtext("{vcard-temp}vCard/{vcard-temp}FN") == "Alice"
    nobody = await ask(
        "<iq type='get' id='v2' to='nobody@a.test'><vCard xmlns='vcard-temp'/></iq>", "v2"
    )
    assert condition(nobody) == "service-unavailable"
    bad = await ask("<iq type='get' id='v3' to='alice@a.test'/>", "v3")  # no child
    assert condition(bad) == "bad-request"
    # Once alice blocks bob (XEP-0191), his iqs to her are refused.
    await alice.send(
        b"<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'>"
        b"<item jid='bob@b.test'/></block></iq>"
    )
    await alice_in.wait(lambda e: e.get("id") == "b1")
    blocked = await ask(
        "<iq type='get' id='v4' to='alice@a.test'><vCard xmlns='vcard-temp'/></iq>", "v4"
    )
    assert condition(blocked) == "service-unavailable"
    await alice.aclose()
    await bob.aclose()
    nursery.cancel_scope.cancel()
