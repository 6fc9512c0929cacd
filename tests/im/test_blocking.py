"""XEP-0191 blocking on the in-process harness: the blocklist iq with pushes to interested
resources (after the record is durable), bounds and malformed requests, the matching rules,
what a block stops (messages, iqs, presence, probes, subscriptions — nothing archived or
queued), what unblocking restores, durability across restarts and snapshots, sealing at rest,
and deleted accounts."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import pytest

from tests.im.harness import DOMAIN, im_harness, parse_stanza
from tests.im.test_messages import chat, entries
from tests.im.test_roster import Bed, error_condition, put_in_state
from villaged.im.blocking import (
    BLOCKED_ERROR,
    BLOCKLIST_RECORD,
    NS_BLOCKING,
    BlockChange,
    Blocked,
    Blocking,
    BlockingView,
    candidates,
    pack_list,
)
from villaged.im.messages import Messages, MessageStoreView
from villaged.im.presence import Presence
from villaged.im.roster import BOTH, NONE, Roster, RosterView
from villaged.im.router import Router
from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.im.context import ImContext
    from villaged.storage.state import View

C = "{jabber:client}"
B = f"{{{NS_BLOCKING}}}"
ALICE, BOB, CAROL = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))
ROMEO = "romeo@remote.example"
BLOCKLIST_GET = f"<iq type='get' id='get'><blocklist xmlns='{NS_BLOCKING}'/></iq>"


# ----- the bed --------------------------------------------------------------------------------


@dataclass
class BlockBed:
    h: ImHarness
    blocking: Blocking
    messages: Messages
    roster: Roster
    presence: Presence
    remote: list[ET.Element] = field(default_factory=list)

    @property
    def roster_bed(self) -> Bed:
        return Bed(self.h, self.roster, self.presence, self.remote)

    async def online(
        self, user: str, resource: str = "r", *, blocklist: bool = True, presence: bool = True
    ) -> FakeClient:
        """A connected client that (by default) fetched its blocklist and sent presence."""
        client = self.h.connect(user, resource)
        if blocklist:
            await self.h.send(client, BLOCKLIST_GET)
        if presence:
            await self.h.send(client, "<presence/>")
        client.take()
        return client

    async def request(self, client: FakeClient, xml: str) -> tuple[ET.Element, list[ET.Element]]:
        """Send an iq (id 'q'); its reply and everything else the client got meanwhile."""
        await self.h.send(client, xml)
        got = client.take()
        replies = [s for s in got if s.tag == f"{C}iq" and s.get("id") == "q"]
        assert len(replies) == 1, [ET.tostring(s) for s in got]
        return replies[0], [s for s in got if s is not replies[0]]

    async def block(self, client: FakeClient, *jids: str) -> list[ET.Element]:
        reply, others = await self.request(client, block_iq("block", *jids))
        assert reply.get("type") == "result", ET.tostring(reply)
        return others

    async def unblock(self, client: FakeClient, *jids: str) -> list[ET.Element]:
        reply, others = await self.request(client, block_iq("unblock", *jids))
        assert reply.get("type") == "result", ET.tostring(reply)
        return others

    async def blocklist(self, client: FakeClient) -> list[str]:
        await self.h.send(client, BLOCKLIST_GET)
        reply = client.only()
        assert reply.get("type") == "result"
        (payload,) = list(reply)
        assert payload.tag == f"{B}blocklist"
        return [str(item.get("jid")) for item in payload]


def block_iq(tag: str, *jids: str) -> str:
    items = "".join(f"<item jid='{jid}'/>" for jid in jids)
    return f"<iq type='set' id='q'><{tag} xmlns='{NS_BLOCKING}'>{items}</{tag}></iq>"


@asynccontextmanager
async def blocking_bed(
    tmp_path: Path, *, users: Sequence[str] = ("alice", "bob", "carol"), **limits: Any
) -> AsyncIterator[BlockBed]:
    """The harness with rosters, messages (archive and offline storage), presence and
    blocking, wired as app.py wires them."""
    roster_view, message_view, blocking_view = RosterView(), MessageStoreView(), BlockingView()
    remote: list[ET.Element] = []
    built: list[tuple[Blocking, Messages, Roster, Presence]] = []

    async def to_remote(stanza: ET.Element) -> None:
        remote.append(stanza)

    def build(ctx: ImContext) -> tuple[Messages, Presence]:
        roster = Roster(ctx, roster_view, outbound_remote=to_remote)
        roster.register()
        blocking = Blocking(ctx, blocking_view, **limits)
        messages = Messages(ctx, message_view, in_roster=roster.in_roster, blocking=blocking)
        presence = Presence(ctx, roster, on_available=messages.flush_offline, blocking=blocking)
        blocking.register(on_change=presence.blocking_changed)
        built.append((blocking, messages, roster, presence))
        return messages, presence

    views: list[View] = [roster_view, message_view, blocking_view]
    async with im_harness(tmp_path, users=users, views=views, build=build) as h:
        blocking, messages, roster, presence = built[0]
        router = Router(h.ctx, messages=messages, presence=presence, blocking=blocking)
        h = dataclasses.replace(h, router=router)
        yield BlockBed(h, blocking, messages, roster, presence, remote)


def pushes(stanzas: Sequence[ET.Element]) -> list[tuple[str, list[str]]]:
    """The blocking pushes among ``stanzas``: (block or unblock, [jid, ...])."""
    found = []
    for stanza in stanzas:
        if stanza.tag == f"{C}iq" and stanza.get("type") == "set":
            (payload,) = list(stanza)
            assert payload.tag in (f"{B}block", f"{B}unblock")
            assert stanza.get("id")
            found.append((payload.tag.removeprefix(B), [str(i.get("jid")) for i in payload]))
    return found


def of_kind(stanzas: Sequence[ET.Element], kind: str) -> list[ET.Element]:
    return [s for s in stanzas if s.tag == f"{C}{kind}"]


def assert_blocked_error(stanza: ET.Element) -> None:
    """``not-acceptable`` with <blocked xmlns='urn:xmpp:blocking:errors'/> (§3.3)."""
    assert error_condition(stanza) == "not-acceptable"
    error = stanza.find(f"{C}error")
    assert error is not None
    assert error.get("type") == "cancel"
    assert error.find(BLOCKED_ERROR) is not None


# ----- the blocklist iq -------------------------------------------------------------------------


async def test_blocklist_get_block_unblock_and_pushes_to_interested_resources(
    tmp_path: Path,
) -> None:
    async with blocking_bed(tmp_path) as bed:
        phone = await bed.online("alice", "phone")
        laptop = await bed.online("alice", "laptop", blocklist=False)  # never asked: no pushes
        phone.take()  # the laptop's presence
        assert await bed.blocklist(phone) == []

        # One request may block several JIDs; they are kept canonical, without repeats.
        others = await bed.block(phone, "Bob@Example.ORG", ROMEO, BOB, "remote.example")
        assert pushes(others) == [("block", [BOB, ROMEO, "remote.example"])]
        assert pushes(laptop.take()) == []
        assert await bed.blocklist(phone) == [BOB, ROMEO, "remote.example"]
        assert await bed.blocklist(laptop) == [BOB, ROMEO, "remote.example"]

        # Blocking what is blocked already writes nothing, and is still answered and pushed.
        before = bed.h.store.log.last_index
        assert pushes(await bed.block(phone, ROMEO)) == [("block", [ROMEO])]
        assert bed.h.store.log.last_index == before
        assert pushes(laptop.take()) == [("block", [ROMEO])]  # the laptop asked meanwhile

        others = await bed.unblock(laptop, BOB, CAROL)  # carol was not blocked: no matter
        assert pushes(others) == [("unblock", [BOB, CAROL])]
        assert pushes(phone.take()) == [("unblock", [BOB, CAROL])]
        assert await bed.blocklist(phone) == [ROMEO, "remote.example"]

        # An empty <unblock/> unblocks everything, and the push says so.
        assert pushes(await bed.unblock(phone)) == [("unblock", [])]
        assert pushes(laptop.take()) == [("unblock", [])]
        assert await bed.blocklist(laptop) == []

        # Each user has their own list; to one's own bare JID is the same as no 'to'.
        bob = await bed.online("bob")
        await bed.block(phone, CAROL)
        assert await bed.blocklist(bob) == []
        own = f"<iq type='get' id='q' to='{ALICE}'><blocklist xmlns='{NS_BLOCKING}'/></iq>"
        reply, _ = await bed.request(laptop, own)
        assert [i.get("jid") for i in reply.iter(f"{B}item")] == [CAROL]
        # Another user's list is not reachable.
        other = f"<iq type='get' id='q' to='{BOB}'><blocklist xmlns='{NS_BLOCKING}'/></iq>"
        reply, _ = await bed.request(phone, other)
        assert error_condition(reply) == "service-unavailable"


async def test_pushes_leave_only_once_the_list_is_durable(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        watcher = await bed.online("alice", "watcher")
        seen_at_push: list[tuple[tuple[str, ...], int]] = []
        deliver = watcher.session.enqueue

        def enqueue(stanza: ET.Element) -> bool:
            # The view changes only when the record is durable and applied.
            seen_at_push.append((bed.blocking.view.blocklist(ALICE), bed.h.store.log.last_index))
            return deliver(stanza)

        watcher.session.enqueue = enqueue
        before = bed.h.store.log.last_index
        await bed.block(alice, BOB)
        assert seen_at_push == [((BOB,), before + 1)]
        records = list(bed.h.store.log.scan(before + 1))
        assert [r.type for r in records] == [BLOCKLIST_RECORD]


async def test_server_disco_lists_blocking(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = bed.h.connect("alice")
        disco = "<query xmlns='http://jabber.org/protocol/disco#info'/>"
        await bed.h.send(alice, f"<iq type='get' id='d' to='{DOMAIN}'>{disco}</iq>")
        info = "{http://jabber.org/protocol/disco#info}feature"
        assert NS_BLOCKING in {f.get("var") for f in alice.only().iter(info)}


@pytest.mark.parametrize(
    ("iq", "expected"),
    [
        ("<iq type='set' id='q'><blocklist xmlns='urn:xmpp:blocking'/></iq>", "bad-request"),
        ("<iq type='get' id='q'><block xmlns='urn:xmpp:blocking'/></iq>", "bad-request"),
        ("<iq type='get' id='q'><unblock xmlns='urn:xmpp:blocking'/></iq>", "bad-request"),
        ("<iq type='set' id='q'><block xmlns='urn:xmpp:blocking'/></iq>", "bad-request"),
        ("<iq type='set' id='q'><nonsense xmlns='urn:xmpp:blocking'/></iq>", "bad-request"),
        (
            "<iq type='set' id='q'><block xmlns='urn:xmpp:blocking'><other/></block></iq>",
            "bad-request",
        ),
        (
            "<iq type='set' id='q'><block xmlns='urn:xmpp:blocking'><item/></block></iq>",
            "bad-request",
        ),
        (
            "<iq type='set' id='q'><block xmlns='urn:xmpp:blocking'>"
            "<item jid='bob@example.org'/><item jid='@example.org'/></block></iq>",
            "jid-malformed",
        ),
        (
            "<iq type='set' id='q'><unblock xmlns='urn:xmpp:blocking'>"
            "<item jid='bob@exa mple.org'/></unblock></iq>",
            "jid-malformed",
        ),
        (
            "<iq type='set' id='q'><block xmlns='urn:xmpp:blocking'>"
            "<item jid='bob@example.org/'/></block></iq>",
            "jid-malformed",
        ),
    ],
)
async def test_malformed_requests(tmp_path: Path, iq: str, expected: str) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        before = bed.h.store.log.last_index
        reply, others = await bed.request(alice, iq)
        assert error_condition(reply) == expected
        assert others == []  # no push
        assert bed.h.store.log.last_index == before  # nothing written
        assert await bed.blocklist(alice) == []


async def test_bounds(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path, max_items=3, max_bytes=64) as bed:
        alice = await bed.online("alice")
        reply, _ = await bed.request(alice, block_iq("block", "a@x", "b@x", "c@x", "d@x"))
        assert error_condition(reply) == "not-allowed"
        await bed.block(alice, "a@x", "b@x", "c@x")
        reply, others = await bed.request(alice, block_iq("block", "d@x"))
        assert error_condition(reply) == "not-allowed"
        assert "at most 3" in ET.tostring(reply, encoding="unicode")
        assert others == []
        await bed.block(alice, "a@x")  # nothing new: fits
        await bed.unblock(alice, "c@x")
        long = "l" * 60 + "@x"  # 62 bytes, with the 6 already listed more than 64
        reply, _ = await bed.request(alice, block_iq("block", long))
        assert error_condition(reply) == "not-allowed"
        assert "64 bytes" in ET.tostring(reply, encoding="unicode")
        assert await bed.blocklist(alice) == ["a@x", "b@x"]


async def test_limits_need_room_in_records_and_the_view_the_store_feeds(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        with pytest.raises(ValueError, match="BlockingView"):
            Blocking(h.ctx, BlockingView())
    (tmp_path / "2").mkdir()
    view = BlockingView()
    async with im_harness(tmp_path / "2", views=[view]) as h:
        with pytest.raises(ValueError, match="BlockingView"):
            Blocking(h.ctx, BlockingView())  # not the one the store feeds
        with pytest.raises(ValueError, match="max_record_bytes"):
            Blocking(h.ctx, view, max_bytes=h.store.options.max_record_bytes)
        Blocking(h.ctx, view)  # the defaults fit the default store


# ----- matching -------------------------------------------------------------------------------


def test_candidates_follow_the_matching_rules() -> None:
    assert list(candidates(JID.parse("bob@chat.example.org/phone"))) == [
        "bob@chat.example.org/phone",
        "bob@chat.example.org",
        "chat.example.org/phone",
        "chat.example.org",
        "example.org",
        "org",
    ]
    assert list(candidates(JID.parse("bob@example.org"))) == [
        "bob@example.org",
        "example.org",
        "org",
    ]
    assert list(candidates(JID.parse("example.org/res"))) == [
        "example.org/res",
        "example.org",
        "org",
    ]
    # IP literals have no parent domains.
    assert list(candidates(JID.parse("bob@192.0.2.1"))) == ["bob@192.0.2.1", "192.0.2.1"]
    assert list(candidates(JID.parse("[2001:db8::1]"))) == ["[2001:db8::1]"]


@pytest.mark.parametrize(
    ("item", "matches", "misses"),
    [
        (
            "bob@example.org/phone",
            ["bob@example.org/phone"],
            ["bob@example.org", "bob@example.org/pc"],
        ),
        (
            "bob@example.org",
            ["bob@example.org", "bob@example.org/phone"],
            ["carol@example.org", "example.org"],
        ),
        (
            "example.org/phone",
            ["example.org/phone", "bob@example.org/phone"],
            ["example.org", "bob@example.org/pc"],
        ),
        (
            "example.org",
            ["example.org", "bob@example.org/r", "chat.example.org", "x@chat.example.org/y"],
            ["example.com", "bob@notexample.org"],
        ),
    ],
)
def test_view_matching(item: str, matches: list[str], misses: list[str]) -> None:
    view = BlockingView()
    view.apply(BLOCKLIST_RECORD, {"u": ALICE, "id": "r1", "s": {}}, _unseal_to(pack_list([item])))
    for jid in matches:
        assert view.blocks(ALICE, JID.parse(jid)), jid
    for jid in misses:
        assert not view.blocks(ALICE, JID.parse(jid)), jid
    assert not view.blocks(BOB, JID.parse(matches[0]))  # only alice's list says so


def test_block_change_affects_only_what_it_changed() -> None:
    change = BlockChange(
        JID.parse(ALICE), blocked=True, changed=frozenset({BOB}), others=frozenset({"remote.x"})
    )
    assert change.affects(JID.parse(f"{BOB}/r"))
    assert not change.affects(JID.parse(CAROL))
    # romeo@remote.x was blocked before (by its domain): the change does not concern it.
    assert not change.affects(JID.parse("bob@remote.x"))


# ----- what a block stops -----------------------------------------------------------------------


async def test_blocked_contacts_messages_bounce_and_are_not_archived_or_queued(
    tmp_path: Path,
) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        bob = await bed.online("bob")
        await bed.h.send(bob, chat(ALICE, "before"))
        assert of_kind(alice.take(), "message")
        archived = (len(entries(bed.messages, ALICE)), len(entries(bed.messages, BOB)))
        await bed.block(alice, BOB)
        bob.take()  # alice's unavailable presence

        before = bed.h.store.log.last_index
        # Inbound (§3.3): service-unavailable, as for an address with no account.
        for mtype in ("chat", "normal", "headline", "groupchat"):
            await bed.h.send(bob, chat(ALICE, "let me in", mtype=mtype))
            bounce = bob.only()
            assert error_condition(bounce) == "service-unavailable"
            assert bounce.get("from") == ALICE
        await bed.h.send(bob, chat(f"{ALICE}/r", "to the resource"))
        assert error_condition(bob.only()) == "service-unavailable"
        await bed.h.send(bob, chat(ALICE, "an error", mtype="error"))
        assert bob.take() == []  # errors never get errors
        assert alice.take() == []

        # Outbound: not-acceptable with <blocked/>.
        await bed.h.send(alice, chat(BOB, "you there?"))
        refusal = alice.only()
        assert_blocked_error(refusal)
        assert refusal.get("from") == BOB
        assert refusal.get("id") == "m1"
        await bed.h.send(alice, chat(f"{BOB}/r", "to the resource"))
        assert_blocked_error(alice.only())
        assert bob.take() == []

        # Offline: nothing waits for alice from bob.
        await bed.h.disconnect(alice)
        bob.take()
        await bed.h.send(bob, chat(ALICE, "while you are away"))
        assert error_condition(bob.only()) == "service-unavailable"
        assert bed.messages.view.offline.count(ALICE) == 0

        # Nothing of it was archived, for either side, nor written at all.
        assert bed.h.store.log.last_index == before
        assert (len(entries(bed.messages, ALICE)), len(entries(bed.messages, BOB))) == archived

        # Others still reach alice, and the block holds across her sessions.
        await bed.h.send(await bed.online("carol"), chat(ALICE, "hi from carol"))
        assert bed.messages.view.offline.count(ALICE) == 1
        alice = await bed.online("alice", "again")
        assert bed.messages.view.offline.count(ALICE) == 0
        await bed.h.send(bob, chat(ALICE, "still blocked"))
        assert error_condition(bob.only()) == "service-unavailable"

        # Unblocking restores the flow, archived again.
        await bed.unblock(alice, BOB)
        bob.take()
        await bed.h.send(bob, chat(ALICE, "back"))
        (got,) = of_kind(alice.take(), "message")
        assert got.findtext(f"{C}body") == "back"
        await bed.h.send(alice, chat(BOB, "welcome back"))
        (got,) = of_kind(bob.take(), "message")
        assert got.findtext(f"{C}body") == "welcome back"
        assert len(entries(bed.messages, BOB)) == archived[1] + 2


async def test_the_pipelined_path_bounces_before_anything_is_written(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        bob = await bed.online("bob")
        await bed.block(alice, BOB)
        bob.take()
        for client, to in ((bob, ALICE), (alice, BOB)):
            message = parse_stanza(chat(to, "x").encode())
            message.set("from", str(client.session.jid))
            pending = await bed.h.router.accept_message(client.session, message, JID.parse(to))
            assert pending.ready  # no record was handed to the log
            assert not await pending.complete()
        assert error_condition(bob.only()) == "service-unavailable"
        assert_blocked_error(alice.only())


async def test_iqs_across_a_block(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        bob = await bed.online("bob")
        ping = "<iq type='get' id='p' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>"
        await bed.h.send(bob, ping.format(f"{ALICE}/r"))
        assert alice.only().get("id") == "p"  # delivered before the block
        await bed.block(alice, BOB)
        bob.take()

        await bed.h.send(bob, ping.format(f"{ALICE}/r"))
        assert error_condition(bob.only()) == "service-unavailable"
        await bed.h.send(bob, f"<iq type='result' id='p' to='{ALICE}/r'/>")
        assert bob.take() == []  # results and errors vanish
        assert alice.take() == []
        await bed.h.send(alice, ping.format(f"{BOB}/r"))
        assert_blocked_error(alice.only())
        await bed.h.send(alice, f"<iq type='error' id='p' to='{BOB}/r'/>")
        assert alice.take() == []
        assert bob.take() == []

        # The server and one's own resources are never blocked, even by one's own domain.
        await bed.block(alice, DOMAIN)
        await bed.h.send(alice, ping.format(DOMAIN))
        assert alice.only().get("type") == "result"
        other = await bed.online("alice", "other")
        alice.take()  # the other resource's presence
        await bed.h.send(other, ping.format(f"{ALICE}/r"))
        assert alice.only().get("id") == "p"
        await bed.h.send(other, chat(f"{ALICE}/r", "note to self"))
        assert of_kind(alice.take(), "message")
        carol = await bed.online("carol")
        await bed.h.send(carol, chat(ALICE, "hi"))
        assert error_condition(carol.only()) == "service-unavailable"


async def _friends(bed: BlockBed) -> tuple[FakeClient, FakeClient]:
    """alice and bob, each subscribed to the other, both online."""
    alice = await bed.online("alice")
    bob = await bed.online("bob")
    await put_in_state(bed.roster_bed, alice, BOB, BOTH, contact_client=bob)
    alice.take()
    bob.take()
    return alice, bob


async def test_presence_stops_both_ways_and_unblocking_restores_it(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice, bob = await _friends(bed)
        await bed.h.send(alice, "<presence><show>dnd</show></presence>")
        assert [p.findtext(f"{C}show") for p in of_kind(bob.take(), "presence")] == ["dnd"]

        # §3.3: bob sees alice go offline; alice's resources see bob go too.
        others = await bed.block(alice, BOB)
        gone = of_kind(others, "presence")
        assert [(p.get("type"), p.get("from")) for p in gone] == [("unavailable", f"{BOB}/r")]
        gone = of_kind(bob.take(), "presence")
        assert [(p.get("type"), p.get("from")) for p in gone] == [("unavailable", f"{ALICE}/r")]

        # Broadcasts skip the block in both directions.
        await bed.h.send(alice, "<presence><show>away</show></presence>")
        await bed.h.send(bob, "<presence><show>chat</show></presence>")
        assert bob.take() == []
        assert alice.take() == []

        # Directed presence: from the blocked contact it vanishes; to it, it is refused.
        await bed.h.send(bob, f"<presence to='{ALICE}/r'/>")
        assert bob.take() == []
        await bed.h.send(alice, f"<presence to='{BOB}'/>")
        refusal = alice.only()
        assert refusal.tag == f"{C}presence"
        assert_blocked_error(refusal)

        # New sessions on either side: probes are neither answered nor sent across the block.
        bob2 = await bed.online("bob", "two", presence=False)
        await bed.h.send(bob2, "<presence/>")
        assert [p.get("from") for p in of_kind(bob2.take(), "presence")] == [f"{BOB}/r"]
        assert [p.get("from") for p in of_kind(bob.take(), "presence")] == [f"{BOB}/two"]
        assert alice.take() == []
        alice2 = await bed.online("alice", "two", presence=False)
        await bed.h.send(alice2, "<presence/>")
        assert [p.get("from") for p in of_kind(alice2.take(), "presence")] == [f"{ALICE}/r"]
        assert [p.get("from") for p in of_kind(alice.take(), "presence")] == [f"{ALICE}/two"]
        await bed.h.disconnect(alice2)
        assert [p.get("type") for p in of_kind(alice.take(), "presence")] == ["unavailable"]
        assert bob.take() == []
        assert bob2.take() == []

        # Unblocking: bob gets alice's current presence, alice's resources get bob's.
        others = await bed.unblock(alice, BOB)
        back = sorted(
            (p.get("from"), p.get("to"), p.findtext(f"{C}show"))
            for p in of_kind(others, "presence")
        )
        assert back == [(f"{BOB}/r", f"{ALICE}/r", "chat"), (f"{BOB}/two", f"{ALICE}/r", None)]
        for contact in (bob, bob2):
            (restored,) = of_kind(contact.take(), "presence")
            assert restored.get("from") == f"{ALICE}/r"
            assert restored.findtext(f"{C}show") == "away"
        await bed.h.send(alice, "<presence><show>xa</show></presence>")
        assert [p.findtext(f"{C}show") for p in of_kind(bob.take(), "presence")] == ["xa"]


async def test_subscription_stanzas_across_a_block(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        carol = await bed.online("carol")
        # carol's request waits for alice's answer (it is shown again at each login) ...
        await bed.h.send(carol, f"<presence type='subscribe' to='{ALICE}'/>")
        assert [p.get("type") for p in of_kind(alice.take(), "presence")] == ["subscribe"]
        await bed.block(alice, CAROL)
        # ... but not while carol is blocked.
        alice2 = await bed.online("alice", "two", presence=False)
        await bed.h.send(alice2, "<presence/>")
        assert [p.get("type") for p in of_kind(alice2.take(), "presence")] == [None]  # alice/r's
        alice.take()
        # alice's answer to a JID she blocks is refused, and changes nothing.
        await bed.h.send(alice, f"<presence type='subscribed' to='{CAROL}'/>")
        assert_blocked_error(alice.only())
        assert bed.roster_bed.state(ALICE, CAROL).pending_in
        # carol's further subscription stanzas vanish without an answer.
        await bed.h.send(carol, f"<presence type='unsubscribe' to='{ALICE}'/>")
        await bed.h.send(carol, f"<presence type='subscribe' to='{ALICE}/r'/>")
        assert carol.take() == []
        assert alice.take() == []
        assert bed.roster_bed.state(ALICE, CAROL).pending_in
        await bed.unblock(alice)
        alice3 = await bed.online("alice", "three", presence=False)
        await bed.h.send(alice3, "<presence/>")
        requests = [p for p in of_kind(alice3.take(), "presence") if p.get("type") == "subscribe"]
        assert [p.get("from") for p in requests] == [CAROL]
        await bed.h.send(alice, f"<presence type='subscribed' to='{CAROL}'/>")
        assert bed.roster_bed.state(ALICE, CAROL).from_


async def test_a_full_jid_blocks_one_resource_and_a_domain_everything_at_it(
    tmp_path: Path,
) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice, bob = await _friends(bed)
        laptop = await bed.online("bob", "laptop")
        alice.take()
        bob.take()
        await bed.block(alice, f"{BOB}/r")
        assert [p.get("type") for p in of_kind(bob.take(), "presence")] == ["unavailable"]
        assert laptop.take() == []
        # Only that resource's messages bounce; the broadcast skips only that resource.
        await bed.h.send(bob, chat(ALICE, "from r"))
        assert error_condition(bob.only()) == "service-unavailable"
        await bed.h.send(laptop, chat(ALICE, "from the laptop"))
        assert [m.findtext(f"{C}body") for m in of_kind(alice.take(), "message")] == [
            "from the laptop"
        ]
        await bed.h.send(alice, "<presence><show>away</show></presence>")
        assert bob.take() == []
        assert [p.get("from") for p in of_kind(laptop.take(), "presence")] == [f"{ALICE}/r"]
        await bed.h.send(alice, chat(f"{BOB}/r", "x"))
        assert_blocked_error(alice.only())
        # Directed presence from anyone else still reaches a resource.
        carol = await bed.online("carol")
        await bed.h.send(carol, f"<presence to='{ALICE}/r'><show>chat</show></presence>")
        assert [p.get("from") for p in of_kind(alice.take(), "presence")] == [f"{CAROL}/r"]

        # A domain: every address at it and at its subdomains, local or not.
        await bed.block(alice, "remote.example")
        for to in (ROMEO, "remote.example", "juliet@chat.remote.example/balcony"):
            await bed.h.send(alice, chat(to, "x"))
            assert_blocked_error(alice.only())
        await bed.h.send(alice, chat("romeo@other.example", "x"))
        assert error_condition(alice.only()) == "remote-server-not-found"  # no federation yet


async def test_presence_to_and_from_other_domains(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        roster = bed.roster_bed
        await roster.inbound("subscribe", ROMEO)
        await bed.h.send(alice, f"<presence type='subscribed' to='{ROMEO}'/>")
        await bed.h.send(alice, f"<presence type='subscribe' to='{ROMEO}'/>")
        await roster.inbound("subscribed", ROMEO)
        assert roster.state(ALICE, ROMEO) == BOTH
        await bed.block(alice, CAROL)  # another list entry: the filter stays in force
        bed.remote.clear()
        await bed.block(alice, ROMEO)
        assert [(p.get("type"), p.get("to")) for p in bed.remote] == [("unavailable", ROMEO)]
        bed.remote.clear()
        await bed.h.send(alice, "<presence><show>away</show></presence>")
        assert bed.remote == []
        await bed.presence.probe(JID.parse(f"{ROMEO}/x"), JID.parse(ALICE))
        assert bed.remote == []  # a blocked prober gets no answer, not even 'unsubscribed'
        await bed.unblock(alice, ROMEO)
        sent = [(p.get("type"), p.get("from"), p.get("to")) for p in bed.remote]
        # alice's current presence, and a probe for romeo's.
        assert sent == [(None, f"{ALICE}/r", ROMEO), ("probe", f"{ALICE}/r", ROMEO)]


async def test_blocking_a_stranger_sends_no_presence(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        bob = await bed.online("bob")
        assert bed.roster_bed.state(ALICE, BOB) == NONE
        assert of_kind(await bed.block(alice, BOB), "presence") == []
        assert bob.take() == []
        assert of_kind(await bed.unblock(alice, BOB), "presence") == []
        assert bob.take() == []


# ----- what the store keeps -------------------------------------------------------------------


async def test_blocklists_survive_a_restart_and_a_snapshot(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.block(alice, BOB, ROMEO)
        await bed.block(await bed.online("carol"), ALICE)
    async with blocking_bed(tmp_path) as bed:  # replayed from the log
        alice = await bed.online("alice")
        assert await bed.blocklist(alice) == [BOB, ROMEO]
        bob = await bed.online("bob")
        await bed.h.send(bob, chat(ALICE, "hi"))
        assert error_condition(bob.only()) == "service-unavailable"
        await bed.unblock(alice, ROMEO)
        await bed.h.store.snapshot()
        assert bed.h.store.log.latest_snapshot() is not None
    async with blocking_bed(tmp_path) as bed:  # restored from the snapshot
        assert bed.blocking.view.blocklist(ALICE) == (BOB,)
        assert bed.blocking.view.blocklist(CAROL) == (ALICE,)
        bob = await bed.online("bob")
        await bed.h.send(bob, chat(ALICE, "hi"))
        assert error_condition(bob.only()) == "service-unavailable"


async def test_no_blocked_jid_reaches_the_disk_in_the_clear(tmp_path: Path) -> None:
    secret = "quokka-marker@remote.example"
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.block(alice, secret)
        await bed.h.store.snapshot()
        await bed.block(alice, "wombat-marker.example")
        packed = msgpack.packb(bed.blocking.view.to_snapshot(), use_bin_type=True)
        assert b"quokka-marker" not in packed
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.parent.name == "log" for p in files)
    for path in files:
        data = path.read_bytes()
        for marker in (b"quokka-marker", b"wombat-marker"):
            assert marker not in data, (path, marker)


async def test_a_deleted_accounts_blocklist_goes_with_it(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        await bed.block(await bed.online("alice"), BOB)
        await bed.block(await bed.online("carol"), BOB)
        await bed.h.store.delete_user(ALICE)
        assert bed.blocking.view.blocklist(ALICE) == ()  # forgotten as the deletion applied
        await bed.h.store.add_user(ALICE, "new-password")
        alice = await bed.online("alice", "new")
        assert await bed.blocklist(alice) == []
        bob = await bed.online("bob")
        await bed.h.send(bob, chat(ALICE, "hello, new alice"))
        assert [m.findtext(f"{C}body") for m in of_kind(alice.take(), "message")] == [
            "hello, new alice"
        ]
        await bed.h.store.snapshot()
        await bed.h.store.delete_user(CAROL)
    async with blocking_bed(tmp_path, users=("alice", "bob")) as bed:
        # carol's dropped replaying the log after the snapshot, alice's old list long gone.
        assert bed.blocking.view.to_snapshot() == []


# ----- the view on its own ---------------------------------------------------------------------


def _unseal_to(plain: bytes) -> Any:
    def unseal(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        return plain

    return unseal


def _shredded(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
    raise ShreddedError(user)


async def test_records_are_checked_before_writing(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        before = bed.h.store.log.last_index
        bodies: list[dict[str, Any]] = [
            {"u": ALICE, "id": "x"},
            {"u": ALICE, "id": "x", "s": b"no"},
            {"s": {}},
        ]
        for body in bodies:
            with pytest.raises(StateError):
                await bed.h.store.commit(Record(BLOCKLIST_RECORD, dict(body)))
        assert bed.h.store.log.last_index == before


@pytest.mark.parametrize(
    "plain",
    [b"\xc1", msgpack.packb("bob@x"), msgpack.packb([1]), msgpack.packb([""]), b"\x91"],
)
def test_view_refuses_malformed_lists(plain: bytes) -> None:
    with pytest.raises(StateError, match="blocklist"):
        BlockingView().apply(BLOCKLIST_RECORD, {"u": ALICE, "id": "i", "s": {}}, _unseal_to(plain))


def test_view_apply_snapshot_restore_and_shredding() -> None:
    view = BlockingView()
    assert not view.any_lists()
    body = {"u": ALICE, "id": "r1", "s": {"k": 1}}
    view.apply(BLOCKLIST_RECORD, body, _unseal_to(pack_list([BOB, ROMEO])))
    assert view.blocklist(ALICE) == (BOB, ROMEO)
    assert view.any_lists()
    view.apply(BLOCKLIST_RECORD, {**body, "id": "r2"}, _shredded)  # skipped
    assert view.to_snapshot() == [[ALICE, "r1", {"k": 1}]]
    copy = BlockingView()
    copy.restore(view.to_snapshot(), _unseal_to(pack_list([BOB, ROMEO])))
    assert copy.blocklist(ALICE) == (BOB, ROMEO)
    copy.restore(view.to_snapshot(), _shredded)
    assert copy.to_snapshot() == []
    copy.restore(None, _shredded)
    # An empty list (everything unblocked) leaves nothing behind.
    view.apply(BLOCKLIST_RECORD, {**body, "id": "r3"}, _unseal_to(pack_list([])))
    assert view.blocklist(ALICE) == ()
    assert view.to_snapshot() == []
    view.apply(BLOCKLIST_RECORD, body, _unseal_to(pack_list([BOB])))
    view.forget_user(ALICE)
    assert not view.any_lists()


async def test_the_rule_between_two_jids(tmp_path: Path) -> None:
    async with blocking_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        rule = bed.blocking.blocked
        a, b = JID.parse(f"{ALICE}/r"), JID.parse(f"{BOB}/r")
        assert rule(a, b) is None  # no lists at all
        await bed.block(alice, BOB)
        assert rule(a, b) is Blocked.BY_SENDER
        assert rule(b, a) is Blocked.BY_RECIPIENT
        assert rule(b, JID.parse(ALICE)) is Blocked.BY_RECIPIENT
        assert rule(JID.parse(CAROL), a) is None
        assert rule(JID.parse(ROMEO), JID.parse(BOB)) is None  # only local users have lists
