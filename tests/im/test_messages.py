"""Message routing with durability first: RFC 6121 §8.5 rules, XEP-0359 stanza-ids, one
durable record per message, sealing at rest, snapshots and restarts."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from tests.im.harness import DOMAIN, im_harness
from villaged.im.mam import NS_MAM, NS_SID, PAYLOAD_RECORD
from villaged.im.messages import MESSAGE_RECORD, Messages, MessageStoreView
from villaged.im.offline import DELIVERED_RECORD
from villaged.im.presence import Presence
from villaged.storage.state import StateError
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.im.context import ImContext
    from villaged.im.mam import ArchivedMessage

ERR = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
CLIENT = "{jabber:client}"
SID = f"{{{NS_SID}}}stanza-id"
ALICE, BOB, CAROL = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))


def ticking_clock(start: int = 1_700_000_000_000_000) -> Callable[[], int]:
    """A clock that moves one millisecond per reading (µs since the epoch)."""
    return itertools.count(start, 1_000).__next__


@asynccontextmanager
async def messaging(
    tmp_path: Path, *, users: tuple[str, ...] = ("alice", "bob", "carol"), **options: Any
) -> AsyncIterator[tuple[ImHarness, Messages]]:
    """The harness with the message store view and a `Messages` built with ``options``."""
    view = MessageStoreView()
    built: list[Messages] = []
    options.setdefault("clock", ticking_clock())

    def build(ctx: ImContext) -> tuple[Messages, Presence]:
        built.append(Messages(ctx, **options))
        return built[0], Presence(ctx)

    async with im_harness(tmp_path, users=users, views=[view], build=build) as h:
        yield h, built[0]


async def online(h: ImHarness, user: str, resource: str = "r", presence: str = "") -> FakeClient:
    """A connected client that sent initial presence, its inbox emptied (the user's other
    resources get its presence: tests take() what they check)."""
    client = h.connect(user, resource)
    await h.send(client, f"<presence>{presence}</presence>")
    client.take()
    return client


def chat(to: str, body: str, extra: str = "", mtype: str = "chat") -> str:
    return f"<message to='{to}' type='{mtype}' id='m1'><body>{body}</body>{extra}</message>"


def stanza_ids(message: ET.Element) -> list[tuple[str | None, str | None]]:
    return [(s.get("by"), s.get("id")) for s in message.findall(SID)]


def entries(messages: Messages, user: str) -> list[ArchivedMessage]:
    archive = messages.view.archives.of(user)
    return list(archive.entries) if archive is not None else []


def archive_ids(messages: Messages, user: str) -> list[str]:
    return [e.id for e in entries(messages, user)]


def condition(stanza: ET.Element) -> str:
    error = stanza.find(f"{CLIENT}error")
    assert error is not None
    return error[0].tag.removeprefix(ERR)


# ----- the message path ----------------------------------------------------------------------


async def test_chat_is_archived_for_both_then_delivered(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        bob = await online(h, "bob")
        alice.take()
        seen_at_delivery: list[list[str]] = []
        deliver = bob.session.enqueue

        def enqueue(stanza: ET.Element) -> bool:
            # Delivery happens only once the record is durable and applied.
            seen_at_delivery.append(archive_ids(messages, BOB))
            return deliver(stanza)

        bob.session.enqueue = enqueue
        before = h.store.log.last_index
        await h.send(alice, chat(BOB, "hi"))
        assert h.store.log.last_index == before + 1  # one record for everything
        got = bob.only()
        assert got.findtext(f"{CLIENT}body") == "hi"
        assert got.get("from") == f"{ALICE}/r"
        [(by, bob_id)] = stanza_ids(got)
        assert by == BOB
        assert seen_at_delivery == [[bob_id]]
        [alice_id] = archive_ids(messages, ALICE)
        assert alice_id != bob_id
        assert alice.take() == []  # no echo, no stanza-id leaked to the sender
        assert len(bob_id or "") >= 22


async def test_from_client_returns_after_the_commit(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        applied = h.store.state.applied_index
        await h.send(alice, chat(BOB, "offline"))
        # The record is applied (so durable) before from_client returned.
        assert h.store.state.applied_index == applied + 1
        assert messages.view.offline.count(BOB) == 1
        assert len(archive_ids(messages, BOB)) == len(archive_ids(messages, ALICE)) == 1


async def test_client_stanza_ids_for_our_domain_are_stripped(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        extra = (
            f"<stanza-id xmlns='{NS_SID}' by='{BOB}' id='forged'/>"
            f"<stanza-id xmlns='{NS_SID}' by='{DOMAIN}' id='forged2'/>"
            f"<stanza-id xmlns='{NS_SID}' by='elsewhere.org' id='theirs'/>"
            f"<stanza-id xmlns='{NS_SID}' by='@bad' id='unparsable'/>"
            f"<origin-id xmlns='{NS_SID}' id='origin'/>"
        )
        await h.send(alice, chat(BOB, "hi", extra))
        got = bob.only()
        ids = stanza_ids(got)
        assert ("elsewhere.org", "theirs") in ids
        assert ("@bad", "unparsable") in ids
        assert [by for by, _ in ids if by in (BOB, DOMAIN)] == [BOB]
        assert ("bob@example.org", "forged") not in ids
        origin = got.find(f"{{{NS_SID}}}origin-id")
        assert origin is not None
        assert origin.get("id") == "origin"
        alice.take()


@pytest.mark.parametrize(
    ("to", "mtype", "body", "bob_one", "bob_two", "bounce"),
    [
        (BOB, "chat", True, True, True, None),
        (BOB, "normal", True, True, True, None),
        (BOB, "headline", True, True, True, None),
        (BOB, "groupchat", True, False, False, "service-unavailable"),
        (BOB, "error", False, False, False, None),
        (f"{BOB}/one", "groupchat", True, True, False, None),
        (f"{BOB}/one", "error", False, True, False, None),
        (f"{BOB}/one", "headline", True, True, False, None),
        (f"{BOB}/gone", "chat", True, True, True, None),
        (f"{BOB}/gone", "normal", True, True, True, None),
        (f"{BOB}/gone", "headline", True, False, False, None),
        (f"{BOB}/gone", "groupchat", True, False, False, "service-unavailable"),
        (f"{BOB}/gone", "error", False, False, False, None),
    ],
)
async def test_routing_by_type(
    tmp_path: Path,
    to: str,
    mtype: str,
    body: bool,
    bob_one: bool,
    bob_two: bool,
    bounce: str | None,
) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        one, two = await online(h, "bob", "one"), await online(h, "bob", "two")
        low = await online(h, "bob", "low", "<priority>-1</priority>")
        for client in (alice, one, two, low):
            client.take()
        content = "<body>x</body>" if body else ""
        await h.send(alice, f"<message to='{to}' type='{mtype}'>{content}</message>")
        assert bool(one.take()) is bob_one
        assert bool(two.take()) is bob_two
        assert low.take() == []  # negative priority: never for bare-JID routing
        got = alice.take()
        if bounce is None:
            assert got == []
        else:
            assert [condition(s) for s in got] == [bounce]


@pytest.mark.parametrize(
    ("to", "mtype", "expected"),
    [
        ("x@elsewhere.org", "chat", "remote-server-not-found"),
        ("x@elsewhere.org", "error", None),
        (DOMAIN, "chat", "service-unavailable"),
        (DOMAIN, "headline", None),
        (DOMAIN, "error", None),
        (f"nobody@{DOMAIN}", "normal", "service-unavailable"),
        (f"nobody@{DOMAIN}", "error", None),
    ],
)
async def test_refusals(tmp_path: Path, to: str, mtype: str, expected: str | None) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, chat(to, "x", mtype=mtype))
        got = alice.take()
        assert [condition(s) for s in got] == ([expected] if expected else [])
        assert archive_ids(messages, ALICE) == []


async def test_message_to_self_is_archived_once_and_reaches_every_resource(
    tmp_path: Path,
) -> None:
    async with messaging(tmp_path) as (h, messages):
        one, two = await online(h, "alice", "one"), await online(h, "alice", "two")
        one.take()
        await h.send(one, "<message type='chat'><body>note to self</body></message>")
        [archived] = archive_ids(messages, ALICE)
        for client in (one, two):
            got = client.only()
            assert stanza_ids(got) == [(ALICE, archived)]


async def test_too_large_to_store_bounces(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        # Two sealed copies of 600 KB exceed the store's 1 MiB record bound (the harness's
        # parser would refuse so large a stanza: build it directly, as a c2s with a higher
        # max_stanza_bytes would have).
        big = ET.Element(f"{CLIENT}message", {"to": BOB, "type": "chat", "from": f"{ALICE}/r"})
        ET.SubElement(big, f"{CLIENT}body").text = "x" * 600_000
        await messages.from_client(alice.session, big, JID.parse(BOB))
        assert condition(alice.only()) == "policy-violation"
        assert bob.take() == []
        assert archive_ids(messages, ALICE) == []


async def test_chat_states_to_an_absent_user_are_dropped(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(
            alice,
            f"<message to='{BOB}' type='chat'>"
            "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
        )
        assert alice.take() == []
        assert messages.view.offline.count(BOB) == 0


async def test_chat_states_between_online_users_are_not_archived(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        before = h.store.log.last_index
        await h.send(
            alice,
            f"<message to='{BOB}' type='chat'>"
            "<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        )
        assert stanza_ids(bob.only()) == []
        assert h.store.log.last_index == before  # nothing durable to write
        assert archive_ids(messages, BOB) == []


async def test_hints_and_content(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        await h.send(alice, chat(BOB, "secret", "<no-store xmlns='urn:xmpp:hints'/>"))
        await h.send(alice, chat(BOB, "p", "<no-permanent-store xmlns='urn:xmpp:hints'/>"))
        assert archive_ids(messages, BOB) == []
        await h.send(
            alice, f"<message to='{BOB}'><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
        )
        await h.send(alice, f"<message to='{BOB}'><store xmlns='urn:xmpp:hints'/></message>")
        await h.send(alice, f"<message to='{BOB}'><subject>s</subject></message>")
        assert len(archive_ids(messages, BOB)) == 3
        assert len(bob.take()) == 5


async def test_deliver_without_a_sending_session(tmp_path: Path) -> None:
    # How federation will hand over a message from another domain: no session to bounce to.
    async with messaging(tmp_path) as (h, messages):
        bob = await online(h, "bob")
        remote = ET.Element(
            f"{CLIENT}message", {"from": "juliet@capulet.example/balcony", "type": "chat"}
        )
        ET.SubElement(remote, f"{CLIENT}body").text = "from afar"
        assert await messages.deliver(remote, JID.parse(BOB), sender=None)
        got = bob.only()
        [entry] = entries(messages, BOB)
        assert stanza_ids(got) == [(BOB, entry.id)]
        assert entry.with_full == "juliet@capulet.example/balcony"
        remote.set("type", "groupchat")
        assert not await messages.deliver(remote, JID.parse(BOB), sender=None)  # no bounce
        unsigned = ET.Element(f"{CLIENT}message", {"from": "@bad", "type": "chat"})
        ET.SubElement(unsigned, f"{CLIENT}body").text = "who?"
        assert await messages.deliver(unsigned, JID.parse(BOB), sender=None)
        assert bob.only().findtext(f"{CLIENT}body") == "who?"
        assert len(archive_ids(messages, BOB)) == 1  # no known correspondent: not archived


# ----- without the store view ----------------------------------------------------------------


async def test_without_the_view_messages_are_only_routed_online(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        messages = h.router.messages
        assert not messages.durable
        alice, bob = await online(h, "alice"), await online(h, "bob")
        await h.send(alice, chat(BOB, "hi"))
        assert stanza_ids(bob.only()) == []
        await h.disconnect(bob)
        await h.send(alice, chat(BOB, "gone"))
        assert condition(alice.only()) == "service-unavailable"
        await h.send(alice, "<iq type='set' id='q'><query xmlns='urn:xmpp:mam:2'/></iq>")
        assert condition(alice.only()) == "service-unavailable"
        assert NS_MAM not in h.ctx.handlers.account_features
        await messages.flush_offline(alice.session)
        assert alice.take() == []


async def test_constructor_checks(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        with pytest.raises(ValueError, match="archive_keep"):
            Messages(h.ctx, archive_keep=0)
        with pytest.raises(ValueError, match="not the one the store was opened with"):
            Messages(h.ctx, MessageStoreView())
        with pytest.raises(ValueError, match="offline queue limit"):
            Messages(h.ctx, offline_limit=0)
        assert Messages(h.ctx, messages.view).durable


# ----- durability ----------------------------------------------------------------------------


async def test_nothing_readable_at_rest(tmp_path: Path) -> None:
    secret = "Tr3s-S3cret-<&>'\"-é"
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        await h.send(
            alice,
            chat(BOB, "Tr3s-S3cret-&lt;&amp;&gt;&apos;&quot;-é", "<thread>thr-7777</thread>"),
        )
        await h.send(
            alice,
            f"<iq type='set' id='p'><prefs xmlns='{NS_MAM}' default='always'>"
            f"<never><jid>never-me@elsewhere.org</jid></never></prefs></iq>",
        )
        await h.store.snapshot()
        await h.send(alice, chat(BOB, "after-the-snapshot-42"))
    needles = [
        secret.encode(),
        b"Tr3s-S3cret",
        b"thr-7777",
        b"after-the-snapshot-42",
        b"never-me",
    ]
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert len(files) > 3
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, (path, needle)


async def test_snapshot_round_trip(tmp_path: Path) -> None:
    async with messaging(tmp_path, archive_keep=3) as (h, messages):
        alice = await online(h, "alice")
        for n in range(5):
            await h.send(alice, chat(BOB, f"m{n}"))
        await h.send(
            alice,
            f"<iq type='set' id='p'><prefs xmlns='{NS_MAM}' default='roster'>"
            f"<always><jid>{CAROL}</jid></always></prefs></iq>",
        )
        await h.store.snapshot()
        await h.send(alice, chat(CAROL, "after"))
        before = messages.view.to_snapshot()
        alice_archive = archive_ids(messages, ALICE)
        bob_archive = archive_ids(messages, BOB)
    assert len(bob_archive) == 3
    async with messaging(tmp_path) as (h, messages):
        assert messages.view.to_snapshot() == before
        assert archive_ids(messages, ALICE) == alice_archive
        assert archive_ids(messages, BOB) == bob_archive
        assert messages.view.prefs.get(ALICE).default == "roster"
        assert messages.view.offline.count(BOB) == 5


async def test_deleted_users_messages_go_with_them(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, chat(BOB, "one"))
        await h.send(
            alice, f"<iq type='set' id='p'><prefs xmlns='{NS_MAM}' default='always'/></iq>"
        )
        await h.store.snapshot()
        await h.send(alice, chat(BOB, "two"))
        view: MessageStoreView = messages.view
        view.forget_user(ALICE)  # what applying account.delete does to views
        assert view.archives.of(ALICE) is None
        await h.store.delete_user(BOB)
    # Bob's key is destroyed: his entries (snapshot and log) are skipped; Alice's stay.
    async with messaging(tmp_path, users=("alice",)) as (h, messages):
        assert len(archive_ids(messages, ALICE)) == 2
        assert archive_ids(messages, BOB) == []
        assert messages.view.offline.count(BOB) == 0
        assert messages.view.prefs.get(BOB).default == "always"


async def test_prefs_of_a_deleted_user_are_skipped(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        bob = await online(h, "bob")
        await h.send(bob, f"<iq type='set' id='p'><prefs xmlns='{NS_MAM}' default='never'/></iq>")
        await h.store.delete_user(BOB)
    async with messaging(tmp_path, users=("alice",)) as (h, messages):
        assert messages.view.prefs.get(BOB).default == "always"


# ----- the view's records --------------------------------------------------------------------

ENVELOPE: dict[str, Any] = {"k": 1, "n": b"n" * 12, "c": b"c" * 16}
ENTRY: dict[str, Any] = {"u": ALICE, "id": "r1", "s": ENVELOPE, "t": 1, "a": "a1", "k": 5}


@pytest.mark.parametrize(
    ("rtype", "body", "problem"),
    [
        (MESSAGE_RECORD, {}, "1 to 2 entries"),
        (MESSAGE_RECORD, {"e": []}, "1 to 2 entries"),
        (MESSAGE_RECORD, {"e": [ENTRY, ENTRY, ENTRY]}, "1 to 2 entries"),
        (MESSAGE_RECORD, {"e": ["x"]}, "not a map"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "u": ""}]}, "'u'"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "id": 3}]}, "'id'"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "s": "x"}]}, "sealed payload"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "t": -1}]}, "timestamp"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "t": True}]}, "timestamp"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "a": ""}]}, "'a'"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "k": 0}]}, "bound"),
        (MESSAGE_RECORD, {"e": [{**ENTRY, "o": 1}]}, "neither"),
        (MESSAGE_RECORD, {"e": [{"u": ALICE, "id": "r", "s": ENVELOPE, "t": 1}]}, "neither"),
        (DELIVERED_RECORD, {"ids": ["x"]}, "no user"),
        (DELIVERED_RECORD, {"u": BOB, "ids": []}, "record ids"),
        (DELIVERED_RECORD, {"u": BOB, "ids": "x"}, "record ids"),
        (DELIVERED_RECORD, {"u": BOB, "ids": [""]}, "record ids"),
        ("mam.prefs", {"u": BOB}, "'id'"),
        ("mam.prefs", {"u": BOB, "id": "r"}, "sealed payload"),
    ],
)
def test_malformed_records_are_refused(rtype: str, body: dict[str, Any], problem: str) -> None:
    with pytest.raises(StateError, match=problem):
        MessageStoreView().validate(rtype, body)


def test_well_formed_records_validate() -> None:
    view = MessageStoreView()
    view.validate(MESSAGE_RECORD, {"e": [ENTRY, {**ENTRY, "o": True}]})
    view.validate(MESSAGE_RECORD, {"e": [{"u": BOB, "id": "r", "s": ENVELOPE, "t": 0, "o": True}]})
    view.validate(DELIVERED_RECORD, {"u": BOB, "ids": ["r"]})
    view.validate("mam.prefs", {"u": BOB, "id": "r", "s": ENVELOPE})
    assert PAYLOAD_RECORD == MESSAGE_RECORD
    view.restore(None, lambda *a: b"")
    assert view.to_snapshot() == {"archive": {}, "offline": {}, "prefs": {}}
