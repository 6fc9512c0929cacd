"""XEP-0160 offline storage: what is stored, delivery with delay on initial presence, durable
removal of exactly what was delivered, the per-user bound, and restarts."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.im.harness import DOMAIN
from tests.im.test_messages import (
    ALICE,
    BOB,
    CAROL,
    CLIENT,
    archive_ids,
    chat,
    condition,
    messaging,
    online,
    stanza_ids,
)
from villaged.im import offline as offline_module
from villaged.im.mam import NS_DELAY, format_stamp
from villaged.im.offline import Offline, OfflineQueues, QueuedMessage, storable
from villaged.im.sessions import Session
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.im.messages import Messages


def bodies(stanzas: list[ET.Element]) -> list[str | None]:
    """The bodies of the messages among ``stanzas`` (presence of other resources aside)."""
    return [s.findtext(f"{CLIENT}body") for s in stanzas if s.tag == f"{CLIENT}message"]


async def come_online(h: ImHarness, messages: Messages, resource: str = "r") -> FakeClient:
    """Bob logs in and sends initial presence; the presence feature then flushes."""
    bob = h.connect("bob", resource)
    await h.send(bob, "<presence/>")
    await messages.flush_offline(bob.session)
    return bob


async def test_stored_then_delivered_with_delay_oldest_first(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        for n in range(3):
            await h.send(alice, chat(BOB, f"m{n}"))
        assert alice.take() == []  # stored: no error
        assert messages.view.offline.count(BOB) == 3
        queued = messages.view.offline.pending(BOB)
        bob = await come_online(h, messages)
        got = bob.take()
        assert bodies(got) == ["m0", "m1", "m2"]
        for stanza, entry in zip(got, queued, strict=True):
            delay = stanza.find(f"{{{NS_DELAY}}}delay")
            assert delay is not None
            assert delay.get("from") == DOMAIN
            assert delay.get("stamp") == format_stamp(entry.stamp)
            assert stanza.get("from") == f"{ALICE}/r"
        # The stanza-ids match the recipient's archive, so clients can de-duplicate.
        assert [i for s in got for _, i in stanza_ids(s)] == archive_ids(messages, BOB)
        assert messages.view.offline.count(BOB) == 0
        await messages.flush_offline(bob.session)
        assert bob.take() == []
        # Online now: new messages are delivered, not stored.
        await h.send(alice, chat(BOB, "live"))
        assert bodies(bob.take()) == ["live"]
        assert messages.view.offline.count(BOB) == 0


async def test_queue_survives_restart_and_delivered_messages_stay_delivered(
    tmp_path: Path,
) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = h.connect("alice")
        await h.send(alice, chat(BOB, "before restart"))
        await h.send(alice, chat(CAROL, "for carol"))
    async with messaging(tmp_path) as (h, messages):
        assert messages.view.offline.count(BOB) == 1
        bob = await come_online(h, messages)
        assert bodies(bob.take()) == ["before restart"]
    async with messaging(tmp_path) as (h, messages):
        assert messages.view.offline.count(BOB) == 0
        bob = await come_online(h, messages)
        assert bob.take() == []
        assert messages.view.offline.count(CAROL) == 1


async def test_negative_priority_neither_receives_nor_flushes(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        low = await online(h, "bob", "low", "<priority>-5</priority>")
        await h.send(alice, chat(BOB, "stored"))
        assert low.take() == []
        await messages.flush_offline(low.session)
        assert low.take() == []
        assert messages.view.offline.count(BOB) == 1
        idle = h.connect("bob", "idle")  # no initial presence yet
        await messages.flush_offline(idle.session)
        assert idle.take() == []
        bob = await come_online(h, messages, "main")
        assert bodies(bob.take()) == ["stored"]


async def test_full_queue_bounces_and_stores_nothing(tmp_path: Path) -> None:
    async with messaging(tmp_path, offline_limit=2) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, chat(BOB, "1"))
        await h.send(alice, chat(BOB, "2"))
        await h.send(alice, chat(BOB, "3"))
        [bounce] = alice.take()
        assert condition(bounce) == "service-unavailable"
        assert bounce.get("to") == f"{ALICE}/r"
        assert messages.view.offline.count(BOB) == 2
        assert len(archive_ids(messages, ALICE)) == len(archive_ids(messages, BOB)) == 2
        bob = await come_online(h, messages)
        assert bodies(bob.take()) == ["1", "2"]
        await h.disconnect(bob)
        await h.send(alice, chat(BOB, "room again"))
        assert alice.take() == []


@pytest.mark.parametrize(
    ("stanza", "stored", "archived", "bounce"),
    [
        (chat(BOB, "x", mtype="normal"), True, True, None),
        (chat(BOB, "x", mtype="headline"), False, False, None),
        (chat(BOB, "x", mtype="groupchat"), False, False, "service-unavailable"),
        (f"<message to='{BOB}' type='error'><body>x</body></message>", False, False, None),
        (chat(BOB, "x", "<no-store xmlns='urn:xmpp:hints'/>"), False, False, None),
        (chat(BOB, "x", "<no-permanent-store xmlns='urn:xmpp:hints'/>"), True, False, None),
        (
            f"<message to='{BOB}' type='chat'><gone xmlns='http://jabber.org/protocol/chatstates'/>"
            "</message>",
            False,
            False,
            None,
        ),
        (f"<message to='{BOB}'><store xmlns='urn:xmpp:hints'/></message>", True, True, None),
    ],
)
async def test_what_waits_for_an_absent_user(
    tmp_path: Path, stanza: str, stored: bool, archived: bool, bounce: str | None
) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, stanza)
        assert messages.view.offline.count(BOB) == int(stored)
        assert len(archive_ids(messages, BOB)) == int(archived)
        assert [condition(s) for s in alice.take()] == ([bounce] if bounce else [])


async def test_message_arriving_during_a_flush_stays_queued(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        await h.send(alice, chat(BOB, "first"))
        handed: list[ET.Element] = []
        async with trio.open_nursery() as nursery:

            def enqueue(stanza: ET.Element) -> bool:
                # While this flush waits for its removal record, another message arrives.
                handed.append(stanza)
                nursery.start_soon(h.send, alice, chat(BOB, "second"))
                return True

            # A session the registry does not know (so "second" is stored, not delivered).
            session = Session(JID("bob", DOMAIN, "x"), enqueue, lambda c, t: None, True)
            assert await messages.offline.flush(session) == 1
        assert bodies(handed) == ["first"]
        assert messages.view.offline.count(BOB) == 1
        bob = await come_online(h, messages)
        assert bodies(bob.take()) == ["second"]


async def test_message_committed_while_its_recipient_came_online(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        bob = h.connect("bob")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.send, alice, chat(BOB, "racing"))
            # Alice's message was routed (Bob unavailable) and is being sealed/committed.
            await trio.testing.wait_all_tasks_blocked()
            await h.send(bob, "<presence/>")
            await messages.flush_offline(bob.session)  # finds nothing yet
        assert bodies(bob.take()) == ["racing"]
        assert messages.view.offline.count(BOB) == 0


async def test_a_session_that_stops_reading_gets_the_rest_next_time(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        for n in range(3):
            await h.send(alice, chat(BOB, f"m{n}"))
        taken: list[ET.Element] = []
        ended: list[str] = []

        def enqueue(stanza: ET.Element) -> bool:
            if len(taken) == 2:
                return False  # its send queue is full
            taken.append(stanza)
            return True

        session = Session(
            JID("bob", DOMAIN, "slow"), enqueue, lambda c, t: ended.append(c), available=True
        )
        assert await messages.offline.flush(session) == 2
        assert ended == ["policy-violation"]
        assert bodies(taken) == ["m0", "m1"]
        bob = await come_online(h, messages)
        assert bodies(bob.take()) == ["m2"]


async def test_removal_is_written_in_bounded_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offline_module, "MAX_IDS_PER_RECORD", 2)
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        for n in range(5):
            await h.send(alice, chat(BOB, f"m{n}"))
        before = h.store.log.last_index
        bob = await come_online(h, messages)
        assert len(bob.take()) == 5
        assert h.store.log.last_index == before + 3


async def test_unreadable_entries_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = h.connect("alice")
        await h.send(alice, chat(BOB, "fine"))
        [good] = messages.view.offline.pending(BOB)
        # An entry whose envelope does not authenticate (as after tampering).
        messages.view.offline.add(BOB, QueuedMessage("bogus", good.stamp, dict(good.sealed)))
        with caplog.at_level(logging.ERROR, "villaged.im.offline"):
            bob = await come_online(h, messages)
        assert bodies(bob.take()) == ["fine"]
        assert messages.view.offline.count(BOB) == 0
        assert [getattr(r, "event", None) for r in caplog.records] == ["offline.unreadable"]


async def test_reservations_count_against_the_bound(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        offline = Offline(h.ctx, OfflineQueues(), limit=2)
        assert offline.try_reserve(BOB)
        assert offline.try_reserve(BOB)
        assert not offline.try_reserve(BOB)
        offline.release(BOB)
        assert offline.try_reserve(BOB)
        offline.release(BOB)
        offline.release(BOB)
        assert offline.try_reserve(CAROL)


def test_only_chat_and_normal_wait() -> None:
    for mtype, expected in (("chat", True), ("normal", True), ("headline", False)):
        message = ET.Element(f"{CLIENT}message", {"type": mtype})
        ET.SubElement(message, f"{CLIENT}body").text = "x"
        assert storable(message) is expected


def test_queues_ignore_unknown_users_and_ids() -> None:
    queues = OfflineQueues()
    queues.remove(BOB, ["nothing"])
    queues.add(BOB, QueuedMessage("a", 1, {}))
    queues.remove(BOB, ["nothing"])
    assert queues.count(BOB) == 1
    queues.forget(BOB)
    assert queues.pending(BOB) == []


async def test_disco_advertises_offline_storage(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = h.connect("alice")
        await h.send(
            alice,
            f"<iq type='get' id='d' to='{DOMAIN}'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        )
        features = {f.get("var") for f in alice.only().iter() if f.tag.endswith("feature")}
        assert {"msgoffline", "urn:xmpp:carbons:2"} <= features
