"""XEP-0198 stream management and XEP-0352 client state over real TLS connections: durable
acks, resumption after a dropped connection, unacknowledged messages to offline storage when
the window ends, and what an inactive client is spared."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import trio

from tests.net import test_c2s
from villaged.app import _shut_down
from villaged.net.c2s import MAX_DETACHED_PER_USER
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from tests.net.rawclient import RawClient
    from tests.net.test_c2s import Harness

harness = test_c2s.harness  # the in-process node with real TLS listeners

SM = "urn:xmpp:sm:3"
SID = "{urn:xmpp:sid:0}stanza-id"


async def with_sm(h: Harness, user: str, *, resume: bool = True) -> tuple[RawClient, str]:
    client = await h.logged_in(user)
    await client.send(f"<enable xmlns='{SM}' resume='{str(resume).lower()}'/>".encode())
    enabled = await client.element()
    assert enabled.tag == f"{{{SM}}}enabled", ET.tostring(enabled)
    return client, enabled.get("id", "")


async def chat_to(sender: RawClient, to: str, *bodies: str) -> None:
    await sender.send(
        b"".join(
            f"<message to='{to}' type='chat' id='{b}'><body>{b}</body></message>".encode()
            for b in bodies
        )
    )


async def messages(client: RawClient, count: int) -> list[ET.Element]:
    """The next ``count`` messages (skipping presence, acks requests and the like)."""
    got: list[ET.Element] = []
    for _ in range(count * 10):
        element = await client.element()
        if element.tag == "{jabber:client}message":
            got.append(element)
            if len(got) == count:
                return got
    raise AssertionError(f"only {len(got)} of {count} messages arrived")


def bodies(elements: list[ET.Element]) -> list[str | None]:
    return [e.findtext("{jabber:client}body") for e in elements]


async def test_the_ack_for_a_burst_comes_once_all_of_it_is_durable(harness: Harness) -> None:
    alice, _ = await with_sm(harness, "alice")
    await harness.logged_in("bob")
    await chat_to(alice, "bob@localhost", *(f"m{n}" for n in range(20)))
    await alice.send(f"<r xmlns='{SM}'/>".encode())
    ack = await alice.element()
    # <r/> is answered in order: after the 20 messages before it were committed.
    assert (ack.tag, ack.get("h")) == (f"{{{SM}}}a", "20")
    archive = harness.node.store.state.view("messages").archives.of("alice@localhost")  # type: ignore[attr-defined]
    assert archive is not None
    assert len(archive.entries) == 20


async def test_a_dropped_stream_resumes_with_the_unacked_in_order_exactly_once(
    harness: Harness,
) -> None:
    alice, sm_id = await with_sm(harness, "alice")
    bob = await harness.logged_in("bob")
    await chat_to(bob, "alice@localhost", "one", "two", "three")
    first = await messages(alice, 3)
    assert bodies(first) == ["one", "two", "three"]
    await alice.send(f"<a xmlns='{SM}' h='1'/>".encode())  # acknowledges "one" only
    await alice.tcp.aclose()  # the network goes away mid-stream
    await trio.sleep(0.2)
    await chat_to(bob, "alice@localhost", "four", "five")  # while detached
    await trio.sleep(0.2)

    again = await harness.client()
    await again.login("alice", "alice-password", bind=False)
    # "two" arrived before the drop but was not acknowledged: h=2 says it did.
    await again.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='2'/>".encode())
    resumed = await again.element()
    assert resumed.tag == f"{{{SM}}}resumed", ET.tostring(resumed)
    assert resumed.get("previd") == sm_id
    rest = await messages(again, 3)
    assert bodies(rest) == ["three", "four", "five"]
    assert rest[0].find(SID) is not None
    assert rest[0].find(SID).get("id") == first[2].find(SID).get("id")  # type: ignore[union-attr]
    # Nothing more (no duplicate), and the session works as before.
    await chat_to(bob, "alice@localhost", "six")
    assert bodies(await messages(again, 1)) == ["six"]
    # An unknown id fails; the resumed one now belongs to the new stream (resuming it again
    # takes it over from there, as a client whose connection broke a second time would).
    third = await harness.client()
    await third.login("alice", "alice-password", bind=False)
    await third.send(f"<resume xmlns='{SM}' previd='nope' h='0'/>".encode())
    failed = await third.element()
    assert failed.tag == f"{{{SM}}}failed"
    assert failed[0].tag.endswith("item-not-found")


async def test_sm_and_csi_are_offered_once_authenticated(harness: Harness) -> None:
    client = await harness.client()
    await client.login("alice", "alice-password", bind=False)
    assert client.features is not None
    assert client.features.find(f"{{{SM}}}sm") is not None
    assert client.features.find("{urn:xmpp:csi:0}csi") is not None


async def test_another_user_cannot_resume_a_stream(harness: Harness) -> None:
    alice, sm_id = await with_sm(harness, "alice")
    await alice.tcp.aclose()
    await trio.sleep(0.2)
    carol = await harness.client()
    await carol.login("carol", "carol-password", bind=False)
    await carol.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>".encode())
    failed = await carol.element()
    assert failed.tag == f"{{{SM}}}failed"
    assert failed[0].tag.endswith("item-not-found")


async def test_when_the_window_ends_the_unacked_go_offline_with_their_stanza_ids(
    harness: Harness,
) -> None:
    harness.node.c2s.limits = dataclasses.replace(harness.node.c2s.limits, sm_resume_timeout=1)
    alice, _ = await with_sm(harness, "alice")
    bob = await harness.logged_in("bob")
    await chat_to(bob, "alice@localhost", "lost-1", "lost-2")
    seen = await messages(alice, 2)
    await alice.tcp.aclose()  # never acknowledged
    await trio.sleep(2.5)  # past the one-second window
    again = await harness.logged_in("alice", resource="other")  # initial presence: flush
    delivered = await messages(again, 2)
    assert bodies(delivered) == ["lost-1", "lost-2"]
    assert [d.find(SID).get("id") for d in delivered] == [  # type: ignore[union-attr]
        s.find(SID).get("id")  # type: ignore[union-attr]
        for s in seen
    ]


async def test_an_inactive_client_gets_messages_at_once_and_presence_on_active(
    harness: Harness,
) -> None:
    bob = await harness.logged_in("bob")
    await bob.send(b"<inactive xmlns='urn:xmpp:csi:0'/>")
    alice = await harness.logged_in("alice")
    # alice and bob share no subscription; directed presence reaches bob anyway.
    await alice.send(b"<presence to='bob@localhost/r'><status>away for lunch</status></presence>")
    await chat_to(alice, "bob@localhost/r", "urgent")
    first = await bob.element()
    assert first.tag == "{jabber:client}message"  # the presence waited, the message did not
    assert bodies([first]) == ["urgent"]
    await bob.send(b"<active xmlns='urn:xmpp:csi:0'/>")
    presence = await bob.element()
    assert presence.tag == "{jabber:client}presence"
    assert presence.findtext("{jabber:client}status") == "away for lunch"


async def test_a_login_with_the_same_resource_ends_a_detached_session_keeping_its_messages(
    harness: Harness,
) -> None:
    alice, _ = await with_sm(harness, "alice")
    bob = await harness.logged_in("bob")
    await chat_to(bob, "alice@localhost", "kept")
    await messages(alice, 1)
    await alice.tcp.aclose()  # detached, "kept" unacknowledged
    await trio.sleep(0.2)
    again = await harness.logged_in("alice")  # binds the same resource instead of resuming
    assert bodies(await messages(again, 1)) == ["kept"]


async def test_a_second_login_with_the_same_resource_replaces_the_first(harness: Harness) -> None:
    first = await harness.logged_in("alice")
    second = await harness.logged_in("alice")
    assert await first.stream_error() == "conflict"
    bob = await harness.logged_in("bob")
    await chat_to(bob, "alice@localhost/r", "to the newer one")
    assert bodies(await messages(second, 1)) == ["to the newer one"]


async def test_what_precedes_enable_is_not_counted_and_rejected_stanzas_are(
    harness: Harness,
) -> None:
    alice = await harness.logged_in("alice")
    await harness.logged_in("bob")
    await chat_to(alice, "bob@localhost", "a", "b", "c")
    await alice.send(f"<enable xmlns='{SM}'/><r xmlns='{SM}'/>".encode())
    assert (await alice.element()).tag == f"{{{SM}}}enabled"
    assert (await alice.element()).get("h") == "0"
    await alice.send(b"<message to='a@@b' id='bad'><body>x</body></message>")
    await alice.send(f"<r xmlns='{SM}'/>".encode())
    error = await alice.element()
    assert (error.get("id"), error.get("type")) == ("bad", "error")
    assert (await alice.element()).get("h") == "1"


async def test_resuming_a_live_stream_counts_what_it_had_in_flight(harness: Harness) -> None:
    alice, sm_id = await with_sm(harness, "alice")
    bob = await harness.logged_in("bob")
    await chat_to(alice, "bob@localhost", "x1", "x2", "x3")  # and at once, from elsewhere:
    again = await harness.client()
    await again.login("alice", "alice-password", bind=False)
    await again.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>".encode())
    resumed = await again.element()
    assert resumed.tag == f"{{{SM}}}resumed"
    assert resumed.get("h") == "3"  # all three were durable before the old stream let go
    assert bodies(await messages(bob, 3)) == ["x1", "x2", "x3"]


async def test_a_cleanly_closed_stream_cannot_be_resumed(harness: Harness) -> None:
    alice, sm_id = await with_sm(harness, "alice")
    await alice.send(b"</stream:stream>")
    assert await alice.next() is None
    again = await harness.client()
    await again.login("alice", "alice-password", bind=False)
    await again.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>".encode())
    failed = await again.element()
    assert failed.tag == f"{{{SM}}}failed"
    assert failed[0].tag.endswith("item-not-found")


async def test_shutdown_puts_a_detached_sessions_unacked_messages_offline(
    harness: Harness,
) -> None:
    alice, _ = await with_sm(harness, "alice")
    bob = await harness.logged_in("bob")
    await chat_to(bob, "alice@localhost/r", "keep me")
    await messages(alice, 1)
    await alice.tcp.aclose()  # detached, unacknowledged
    await trio.sleep(0.2)
    with trio.fail_after(10):
        await _shut_down(harness.node)
    view = harness.node.store.state.view("messages")
    with trio.fail_after(5):  # the session is gone at once; its messages are being stored
        while view.offline.count("alice@localhost") < 1:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert not harness.node.c2s.resumable
    assert len(harness.node.sessions) == 0


async def test_one_account_keeps_only_a_few_detached_sessions(harness: Harness) -> None:
    clients = []
    for n in range(MAX_DETACHED_PER_USER + 1):
        client = await harness.logged_in("alice", resource=f"phone{n}")
        await client.send(f"<enable xmlns='{SM}' resume='true'/>".encode())
        for _ in range(20):  # the other resources' presence comes first
            if (await client.element()).tag == f"{{{SM}}}enabled":
                break
        else:
            raise AssertionError("stream management was not enabled")
        clients.append(client)
    for client in clients:
        await client.tcp.aclose()
    alice = JID("alice", "localhost")
    with trio.fail_after(5):  # the last one to drop ends at once: nothing waits for it
        while len(harness.node.sessions.of_user(alice)) > MAX_DETACHED_PER_USER:  # noqa: ASYNC110
            await trio.sleep(0.02)
    await trio.sleep(0.3)
    assert len(harness.node.sessions.of_user(alice)) == MAX_DETACHED_PER_USER
