"""Rosters and subscriptions (RFC 6121 §2, §3, Appendix A) on the in-process harness: every
row of the state tables, the roster iq with versioning and pushes, limits, durability across
reopen and snapshots, and deleted accounts.

The helpers here are shared with test_presence.py.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import trio

from tests.im.harness import DOMAIN, im_harness
from villaged.im.messages import Messages
from villaged.im.presence import Presence
from villaged.im.roster import (
    BOTH,
    FROM,
    FROM_OUT,
    INBOUND,
    MAX_REQUEST_BYTES,
    NONE,
    NONE_IN,
    NONE_OUT,
    NONE_OUT_IN,
    NS_ROSTER,
    OUTBOUND,
    ROSTER_CHANGE,
    TO,
    TO_IN,
    Inbound,
    Roster,
    RosterEntry,
    RosterView,
    SubscriptionState,
    _pack_entry,
    _parse_request,
    presence_stanza,
)
from villaged.storage.errors import ShreddedError
from villaged.storage.state import StateError
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.im.context import ImContext
    from villaged.im.sessions import Session

C = "{jabber:client}"
R = f"{{{NS_ROSTER}}}"
ERR = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
ROMEO = "romeo@remote.example"


# ----- shared helpers ------------------------------------------------------------------------


@dataclass
class Bed:
    h: ImHarness
    roster: Roster
    presence: Presence
    remote: list[ET.Element] = field(default_factory=list)

    async def online(self, user: str, resource: str = "r", *, roster: bool = True) -> FakeClient:
        """A connected client that fetched its roster (so gets pushes) and sent presence."""
        client = self.h.connect(user, resource)
        if roster:
            await self.h.send(client, f"<iq type='get' id='g'><query xmlns='{NS_ROSTER}'/></iq>")
        await self.h.send(client, "<presence/>")
        client.take()
        return client

    def state(self, user: str, contact: str) -> SubscriptionState:
        entry = self.roster.view.entry(user, contact)
        return entry.state if entry is not None else NONE

    def entry(self, user: str, contact: str) -> RosterEntry | None:
        return self.roster.view.entry(user, contact)

    async def inbound(self, ptype: str, sender: str, user: str = ALICE) -> None:
        """A subscription stanza from another domain's user (what federation will hand in)."""
        stanza = presence_stanza(ptype, JID.parse(sender), JID.parse(user))
        await self.roster.inbound_subscription(stanza, JID.parse(sender), JID.parse(user))


@asynccontextmanager
async def roster_bed(
    tmp_path: Path,
    *,
    users: Sequence[str] = ("alice", "bob", "carol"),
    on_available: Callable[[Session], Awaitable[None]] | None = None,
    **limits: Any,
) -> AsyncIterator[Bed]:
    """The harness with the roster feature and presence built on it; stanzas for other
    domains are collected in ``bed.remote``."""
    remote: list[ET.Element] = []
    built: list[tuple[Roster, Presence]] = []

    async def to_remote(stanza: ET.Element) -> None:
        remote.append(stanza)

    def build(ctx: ImContext) -> tuple[Messages, Presence]:
        roster = Roster(ctx, view, outbound_remote=to_remote, **limits)
        roster.register()
        presence = Presence(ctx, roster, on_available=on_available)
        built.append((roster, presence))
        return Messages(ctx), presence

    view = RosterView()
    async with im_harness(tmp_path, users=users, views=[view], build=build) as h:
        roster, presence = built[0]
        yield Bed(h, roster, presence, remote)


def presences(stanzas: Sequence[ET.Element], ptype: str | None = None) -> list[ET.Element]:
    return [s for s in stanzas if s.tag == f"{C}presence" and s.get("type") == ptype]


def pushed_items(stanzas: Sequence[ET.Element]) -> list[ET.Element]:
    items = []
    for stanza in stanzas:
        if stanza.tag == f"{C}iq" and stanza.get("type") == "set":
            query = stanza.find(f"{R}query")
            assert query is not None
            assert query.get("ver")
            items.extend(query.findall(f"{R}item"))
    return items


def error_condition(stanza: ET.Element) -> str:
    assert stanza.get("type") == "error", ET.tostring(stanza)
    error = stanza.find(f"{C}error")
    assert error is not None
    return error[0].tag.removeprefix(ERR)


async def roster_get(bed: Bed, client: FakeClient, ver: str | None = None) -> ET.Element:
    attr = f" ver='{ver}'" if ver is not None else ""
    await bed.h.send(client, f"<iq type='get' id='get'><query xmlns='{NS_ROSTER}'{attr}/></iq>")
    got = client.take()
    assert len(got) == 1
    assert got[0].get("type") == "result"
    return got[0]


async def roster_set(bed: Bed, client: FakeClient, item_xml: str) -> list[ET.Element]:
    await bed.h.send(
        client, f"<iq type='set' id='set'><query xmlns='{NS_ROSTER}'>{item_xml}</query></iq>"
    )
    return client.take()


def result_of(stanzas: Sequence[ET.Element], iq_id: str = "set") -> ET.Element:
    found = [s for s in stanzas if s.tag == f"{C}iq" and s.get("id") == iq_id]
    assert len(found) == 1
    return found[0]


# The states by their names in RFC 6121 Appendix A.1.
NAMED: Mapping[str, SubscriptionState] = {
    "None": NONE,
    "None + Pending Out": NONE_OUT,
    "None + Pending In": NONE_IN,
    "None + Pending Out/In": NONE_OUT_IN,
    "To": TO,
    "To + Pending In": TO_IN,
    "From": FROM,
    "From + Pending Out": FROM_OUT,
    "Both": BOTH,
}

# How to reach each state from None: "out X" is the user sending X, "in X" the contact.
RECIPES: Mapping[SubscriptionState, tuple[str, ...]] = {
    NONE: (),
    NONE_OUT: ("out subscribe",),
    NONE_IN: ("in subscribe",),
    NONE_OUT_IN: ("out subscribe", "in subscribe"),
    TO: ("out subscribe", "in subscribed"),
    TO_IN: ("out subscribe", "in subscribed", "in subscribe"),
    FROM: ("in subscribe", "out subscribed"),
    FROM_OUT: ("in subscribe", "out subscribed", "out subscribe"),
    BOTH: ("out subscribe", "in subscribed", "in subscribe", "out subscribed"),
}


async def put_in_state(
    bed: Bed,
    user: FakeClient,
    contact: str,
    state: SubscriptionState,
    contact_client: FakeClient | None = None,
) -> None:
    """Bring ``user``'s state towards ``contact`` to ``state`` through the protocol."""
    for step in RECIPES[state]:
        direction, ptype = step.split()
        if direction == "out":
            await bed.h.send(user, f"<presence type='{ptype}' to='{contact}'/>")
        elif contact_client is not None:
            await bed.h.send(contact_client, f"<presence type='{ptype}' to='{ALICE}'/>")
        else:
            await bed.inbound(ptype, contact)
    assert bed.state(str(user.session.jid.bare), contact) == state


def mirror(state: SubscriptionState) -> SubscriptionState:
    """The contact's view of the same relationship."""
    flipped = {"to": "from", "from": "to"}.get(state.subscription, state.subscription)
    return SubscriptionState(flipped, state.pending_in, state.pending_out)


def visible(entry: RosterEntry | None) -> tuple[str, bool] | None:
    if entry is None or not entry.listed:
        return None
    return entry.state.subscription, entry.state.pending_out


# ----- the state tables, transcribed from RFC 6121 Appendix A ----------------------------------

# A.2: (existing state, stanza the user sends, routed?, new state)
OUTBOUND_ROWS = [
    ("None", "subscribe", True, "None + Pending Out"),
    ("None + Pending Out", "subscribe", True, "None + Pending Out"),
    ("None + Pending In", "subscribe", True, "None + Pending Out/In"),
    ("None + Pending Out/In", "subscribe", True, "None + Pending Out/In"),
    ("To", "subscribe", True, "To"),
    ("To + Pending In", "subscribe", True, "To + Pending In"),
    ("From", "subscribe", True, "From + Pending Out"),
    ("From + Pending Out", "subscribe", True, "From + Pending Out"),
    ("Both", "subscribe", True, "Both"),
    ("None", "subscribed", False, "None"),
    ("None + Pending Out", "subscribed", False, "None + Pending Out"),
    ("None + Pending In", "subscribed", True, "From"),
    ("None + Pending Out/In", "subscribed", True, "From + Pending Out"),
    ("To", "subscribed", False, "To"),
    ("To + Pending In", "subscribed", True, "Both"),
    ("From", "subscribed", False, "From"),
    ("From + Pending Out", "subscribed", False, "From + Pending Out"),
    ("Both", "subscribed", False, "Both"),
    ("None", "unsubscribe", True, "None"),
    ("None + Pending Out", "unsubscribe", True, "None"),
    ("None + Pending In", "unsubscribe", True, "None + Pending In"),
    ("None + Pending Out/In", "unsubscribe", True, "None + Pending In"),
    ("To", "unsubscribe", True, "None"),
    ("To + Pending In", "unsubscribe", True, "None + Pending In"),
    ("From", "unsubscribe", True, "From"),
    ("From + Pending Out", "unsubscribe", True, "From"),
    ("Both", "unsubscribe", True, "From"),
    ("None", "unsubscribed", True, "None"),
    ("None + Pending Out", "unsubscribed", True, "None + Pending Out"),
    ("None + Pending In", "unsubscribed", True, "None"),
    ("None + Pending Out/In", "unsubscribed", True, "None + Pending Out"),
    ("To", "unsubscribed", True, "To"),
    ("To + Pending In", "unsubscribed", True, "To"),
    ("From", "unsubscribed", True, "None"),
    ("From + Pending Out", "unsubscribed", True, "None + Pending Out"),
    ("Both", "unsubscribed", True, "To"),
]

# A.3: (existing state, stanza that arrives, delivered? ("auto" = A.3.1's "no *"), new state)
INBOUND_ROWS = [
    ("None", "subscribe", "yes", "None + Pending In"),
    ("None + Pending Out", "subscribe", "yes", "None + Pending Out/In"),
    ("None + Pending In", "subscribe", "no", "None + Pending In"),
    ("None + Pending Out/In", "subscribe", "no", "None + Pending Out/In"),
    ("To", "subscribe", "yes", "To + Pending In"),
    ("To + Pending In", "subscribe", "no", "To + Pending In"),
    ("From", "subscribe", "auto", "From"),
    ("From + Pending Out", "subscribe", "auto", "From + Pending Out"),
    ("Both", "subscribe", "auto", "Both"),
    ("None", "subscribed", "no", "None"),
    ("None + Pending Out", "subscribed", "yes", "To"),
    ("None + Pending In", "subscribed", "no", "None + Pending In"),
    ("None + Pending Out/In", "subscribed", "yes", "To + Pending In"),
    ("To", "subscribed", "no", "To"),
    ("To + Pending In", "subscribed", "no", "To + Pending In"),
    ("From", "subscribed", "no", "From"),
    ("From + Pending Out", "subscribed", "yes", "Both"),
    ("Both", "subscribed", "no", "Both"),
    ("None", "unsubscribe", "no", "None"),
    ("None + Pending Out", "unsubscribe", "no", "None + Pending Out"),
    ("None + Pending In", "unsubscribe", "yes", "None"),
    ("None + Pending Out/In", "unsubscribe", "yes", "None + Pending Out"),
    ("To", "unsubscribe", "no", "To"),
    ("To + Pending In", "unsubscribe", "yes", "To"),
    ("From", "unsubscribe", "yes", "None"),
    ("From + Pending Out", "unsubscribe", "yes", "None + Pending Out"),
    ("Both", "unsubscribe", "yes", "To"),
    ("None", "unsubscribed", "no", "None"),
    ("None + Pending Out", "unsubscribed", "yes", "None"),
    ("None + Pending In", "unsubscribed", "no", "None + Pending In"),
    ("None + Pending Out/In", "unsubscribed", "yes", "None + Pending In"),
    ("To", "unsubscribed", "yes", "None"),
    ("To + Pending In", "unsubscribed", "yes", "None + Pending In"),
    ("From", "unsubscribed", "no", "From"),
    ("From + Pending Out", "unsubscribed", "yes", "From"),
    ("Both", "unsubscribed", "yes", "From"),
]


def row_id(row: tuple[Any, ...]) -> str:
    return f"{row[0]}-{row[1]}".replace(" ", "")


def test_tables_are_the_rfcs() -> None:
    assert len(OUTBOUND_ROWS) == len(INBOUND_ROWS) == 36
    for state, ptype, routed, new in OUTBOUND_ROWS:
        assert OUTBOUND[ptype][NAMED[state]] == (routed, NAMED[new])
    actions = {"yes": Inbound.DELIVER, "no": Inbound.DROP, "auto": Inbound.AUTO_REPLY}
    for state, ptype, action, new in INBOUND_ROWS:
        assert INBOUND[ptype][NAMED[state]] == (actions[action], NAMED[new])


@pytest.mark.parametrize(
    ("state", "ptype", "routed", "new"), OUTBOUND_ROWS, ids=[row_id(r) for r in OUTBOUND_ROWS]
)
async def test_outbound_row(tmp_path: Path, state: str, ptype: str, routed: bool, new: str) -> None:
    """A.2 at the user's server, with a contact on another domain: the stanza is routed to
    the remote hook (stamped with bare JIDs) or not, and the state moves as the RFC says."""
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await put_in_state(bed, alice, ROMEO, NAMED[state])
        alice.take()
        bed.remote.clear()
        before = bed.entry(ALICE, ROMEO)

        await bed.h.send(alice, f"<presence type='{ptype}' to='{ROMEO}/balcony' id='s1'/>")

        assert bed.state(ALICE, ROMEO) == NAMED[new]
        expected: list[str | None] = [ptype] if routed else []
        if routed and ptype == "subscribed":
            expected.append(None)  # §3.1.5: the user's current presence follows
        if ptype == "unsubscribed" and NAMED[state].from_:
            expected.append("unavailable")  # §3.2.2
        assert [s.get("type") for s in bed.remote] == expected
        if routed:
            sent = bed.remote[0]
            assert (sent.get("from"), sent.get("to"), sent.get("id")) == (ALICE, ROMEO, "s1")
        after = bed.entry(ALICE, ROMEO)
        items = pushed_items(alice.take())
        if visible(before) == visible(after):
            assert items == []
        else:
            assert len(items) == 1
            assert after is not None
            assert after.listed
            assert items[0].get("jid") == ROMEO
            assert items[0].get("subscription") == after.state.subscription
            assert (items[0].get("ask") == "subscribe") == after.state.pending_out


@pytest.mark.parametrize(
    ("state", "ptype", "action", "new"), INBOUND_ROWS, ids=[row_id(r) for r in INBOUND_ROWS]
)
async def test_inbound_row(tmp_path: Path, state: str, ptype: str, action: str, new: str) -> None:
    """A.3 at the user's server for a stanza from another domain's user: delivered to the
    user's available resources or not, auto-answered, and the state moves as the RFC says."""
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await put_in_state(bed, alice, ROMEO, NAMED[state])
        alice.take()
        bed.remote.clear()

        await bed.inbound(ptype, ROMEO)

        assert bed.state(ALICE, ROMEO) == NAMED[new]
        delivered = presences(alice.take(), ptype)
        assert len(delivered) == (1 if action == "yes" else 0)
        expected: list[str | None] = []
        if action == "auto":
            expected = ["subscribed", None]  # confirmed for alice, with her presence
        elif ptype == "unsubscribe" and NAMED[state].from_:
            expected = ["unavailable"]  # §3.3.3: romeo sees alice go
        assert [s.get("type") for s in bed.remote] == expected
        for sent in bed.remote:
            assert sent.get("to") == ROMEO


@pytest.mark.parametrize(
    ("state", "ptype", "routed", "new"), OUTBOUND_ROWS, ids=[row_id(r) for r in OUTBOUND_ROWS]
)
async def test_local_contacts_stay_in_step(
    tmp_path: Path, state: str, ptype: str, routed: bool, new: str
) -> None:
    """Between two users of this server, each stanza is processed on both sides in one
    record: after every row, the contact's state mirrors the user's."""
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        await put_in_state(bed, alice, BOB, NAMED[state], contact_client=bob)
        assert bed.state(BOB, ALICE) == mirror(NAMED[state])
        alice.take()
        bob.take()

        await bed.h.send(alice, f"<presence type='{ptype}' to='{BOB}'/>")

        assert bed.state(ALICE, BOB) == NAMED[new]
        assert bed.state(BOB, ALICE) == mirror(NAMED[new])
        assert bed.remote == []


# ----- the handshake between two local users, seen by their clients --------------------------


async def test_subscription_handshake(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        bob_quiet = await bed.online("bob", "quiet", roster=False)

        await bed.h.send(
            alice, f"<presence type='subscribe' to='{BOB}'><status>hi</status></presence>"
        )
        (item,) = pushed_items(alice.take())
        assert (item.get("jid"), item.get("subscription"), item.get("ask")) == (
            BOB,
            "none",
            "subscribe",
        )
        for client in (bob, bob_quiet):
            got = client.take()
            assert pushed_items(got) == []  # §3.1.3: no item before bob approves
            (request,) = presences(got, "subscribe")
            assert request.get("from") == ALICE
            assert request.findtext(f"{C}status") == "hi"

        await bed.h.send(bob, f"<presence type='subscribed' to='{ALICE}'/>")
        (item,) = pushed_items(bob.take())
        assert (item.get("jid"), item.get("subscription"), item.get("ask")) == (ALICE, "from", None)
        assert bob_quiet.take() == []  # not interested: no pushes
        got = alice.take()
        (item,) = pushed_items(got)
        assert (item.get("subscription"), item.get("ask")) == ("to", None)
        assert len(presences(got, "subscribed")) == 1
        # §3.1.5: alice gets bob's presence from both of his available resources
        assert sorted(str(p.get("from")) for p in presences(got)) == [f"{BOB}/quiet", f"{BOB}/r"]

        # bob revokes: alice sees him go and her item fall back to none (§3.2)
        await bed.h.send(bob, f"<presence type='unsubscribed' to='{ALICE}'/>")
        got = alice.take()
        assert len(presences(got, "unsubscribed")) == 1
        assert sorted(str(p.get("from")) for p in presences(got, "unavailable")) == [
            f"{BOB}/quiet",
            f"{BOB}/r",
        ]
        (item,) = pushed_items(got)
        assert item.get("subscription") == "none"
        (item,) = pushed_items(bob.take())
        assert item.get("subscription") == "none"


async def test_unsubscribe_sends_unavailable_from_the_contact(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        await put_in_state(bed, alice, BOB, TO, contact_client=bob)
        alice.take()
        bob.take()
        await bed.h.send(alice, f"<presence type='unsubscribe' to='{BOB}'/>")
        got = alice.take()
        assert [p.get("from") for p in presences(got, "unavailable")] == [f"{BOB}/r"]  # §3.3.3
        assert pushed_items(got)[0].get("subscription") == "none"
        got = bob.take()
        assert len(presences(got, "unsubscribe")) == 1
        assert pushed_items(got)[0].get("subscription") == "none"


async def test_crossing_requests_are_serialized(tmp_path: Path) -> None:
    """Both users ask at once: each transaction reads the state the other left, so the pair
    ends in "None + Pending Out/In" on both sides rather than one overwriting the other."""
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bed.h.send, alice, f"<presence type='subscribe' to='{BOB}'/>")
            nursery.start_soon(bed.h.send, bob, f"<presence type='subscribe' to='{ALICE}'/>")
        assert bed.state(ALICE, BOB) == NONE_OUT_IN
        assert bed.state(BOB, ALICE) == NONE_OUT_IN
        # each side's pushes carry distinct versions, the last one current
        for client, user in ((alice, ALICE), (bob, BOB)):
            got = [s for s in client.take() if s.get("type") == "set"]
            vers = [s.find(f"{R}query").get("ver") for s in got]  # type: ignore[union-attr]
            assert len(set(vers)) == len(vers)
            assert vers[-1] == bed.roster.view.version(user)


async def test_already_subscribed_request_is_answered_for_the_contact(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        await put_in_state(bed, alice, BOB, TO, contact_client=bob)
        alice.take()
        bob.take()
        await bed.h.send(alice, f"<presence type='subscribe' to='{BOB}'/>")
        assert bob.take() == []  # A.3.1 "no *": bob is not asked again
        got = alice.take()
        assert presences(got, "subscribed") == []  # A.3.2 "To": nothing new to tell alice
        assert [p.get("from") for p in presences(got)] == [f"{BOB}/r"]


async def test_pending_requests_wait_for_an_answer(tmp_path: Path) -> None:
    """A request to an offline user is kept and given to every session's initial presence
    until answered, also after a restart."""
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.h.send(
            alice, f"<presence type='subscribe' to='{BOB}' id='req'><status>me</status></presence>"
        )
    async with roster_bed(tmp_path) as bed:
        bob = bed.h.connect("bob", "one")
        await bed.h.send(bob, "<presence/>")
        (request,) = presences(bob.take(), "subscribe")
        assert (request.get("from"), request.get("to"), request.get("id")) == (ALICE, BOB, "req")
        assert request.findtext(f"{C}status") == "me"
        other = bed.h.connect("bob", "two")
        await bed.h.send(other, "<presence/>")
        assert len(presences(other.take(), "subscribe")) == 1
        await bed.h.send(other, f"<presence type='unsubscribed' to='{ALICE}'/>")
        third = bed.h.connect("bob", "three")
        await bed.h.send(third, "<presence/>")
        assert presences(third.take(), "subscribe") == []
        assert bed.entry(BOB, ALICE) is None  # nothing left to remember
        assert bed.entry(ALICE, BOB) is not None
        assert bed.state(ALICE, BOB) == NONE


async def test_oversized_request_is_kept_without_its_payload(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        status = "x" * MAX_REQUEST_BYTES
        await bed.h.send(
            alice, f"<presence type='subscribe' to='{BOB}'><status>{status}</status></presence>"
        )
        bob = bed.h.connect("bob")
        await bed.h.send(bob, "<presence/>")
        (request,) = presences(bob.take(), "subscribe")
        assert request.get("from") == ALICE
        assert len(request) == 0


def test_unparsable_stored_request() -> None:
    assert _parse_request(b"<presence") is None
    assert _parse_request(b"not xml") is None


async def test_too_many_pending_requests_are_dropped(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=("alice", "bob", "carol", "dave"), max_pending=1) as bed:
        alice = await bed.online("alice")
        bob, carol = await bed.online("bob"), await bed.online("carol")
        await bed.h.send(bob, f"<presence type='subscribe' to='{ALICE}'/>")
        await bed.h.send(carol, f"<presence type='subscribe' to='{ALICE}'/>")
        assert [p.get("from") for p in presences(alice.take(), "subscribe")] == [BOB]
        assert bed.state(ALICE, f"carol@{DOMAIN}") == NONE
        # a contact already on the roster is not limited by the pending bound
        await roster_set(bed, alice, f"<item jid='dave@{DOMAIN}'/>")
        dave = await bed.online("dave")
        await bed.h.send(dave, f"<presence type='subscribe' to='{ALICE}'/>")
        assert bed.state(ALICE, f"dave@{DOMAIN}") == NONE_IN


async def test_subscription_to_no_account(tmp_path: Path) -> None:
    """Outbound processing happens at the user's side (RFC 6121 §3.1.2) even when the local
    contact does not exist; nothing is delivered and nothing is kept for the non-user."""
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.h.send(alice, f"<presence type='subscribe' to='nobody@{DOMAIN}'/>")
        (item,) = pushed_items(alice.take())
        assert (item.get("jid"), item.get("ask")) == (f"nobody@{DOMAIN}", "subscribe")
        assert bed.entry(f"nobody@{DOMAIN}", ALICE) is None
        await bed.h.send(alice, f"<presence type='subscribe' to='{DOMAIN}'/>")
        assert bed.state(ALICE, DOMAIN) == NONE_OUT
        assert bed.remote == []


async def test_subscription_stanzas_without_a_contact_are_dropped(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.h.send(alice, "<presence type='subscribe'/>")
        await bed.h.send(alice, f"<presence type='subscribe' to='{ALICE}/r'/>")
        assert alice.take() == []
        assert bed.roster.view.entries(ALICE) == []


async def test_deleted_contact(tmp_path: Path) -> None:
    """A contact whose account is gone: probes are answered 'unsubscribed' (RFC 6121 §4.3.2),
    which ends the stale subscription; bob's own roster is unreadable after a restart."""
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        await put_in_state(bed, alice, BOB, BOTH, contact_client=bob)
        await bed.h.disconnect(bob)
        await bed.h.store.delete_user(BOB)
        assert bed.roster.view.entries(BOB) == []  # forgotten as the deletion applied
        alice.take()
        again = bed.h.connect("alice", "again")
        await bed.h.send(again, "<presence/>")
        assert bed.state(ALICE, BOB) == FROM
        await bed.h.send(alice, f"<presence type='subscribe' to='{BOB}'/>")
        assert bed.state(ALICE, BOB) == FROM_OUT
    async with roster_bed(tmp_path, users=("alice",)) as bed:
        assert bed.state(ALICE, BOB) == FROM_OUT
        assert bed.roster.view.entries(BOB) == []


# ----- the roster iq -------------------------------------------------------------------------


async def test_roster_get_set_and_versions(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        one = bed.h.connect("alice", "one")
        two = bed.h.connect("alice", "two")
        silent = bed.h.connect("alice", "silent")
        assert [c.session.interested for c in (one, two)] == [False, False]
        result = await roster_get(bed, one)
        assert [c.session.interested for c in (one, two)] == [True, False]
        query = result.find(f"{R}query")
        assert query is not None
        assert len(query) == 0
        empty_version = query.get("ver")
        assert empty_version
        await roster_get(bed, two)

        got = await roster_set(
            bed,
            one,
            f"<item jid='{BOB}' name='Bob'><group>Friends</group><group>Work</group></item>",
        )
        assert result_of(got).get("type") == "result"
        (item,) = pushed_items(got)  # §2.3.2: the setting resource gets the push too
        assert (item.get("jid"), item.get("name"), item.get("subscription")) == (BOB, "Bob", "none")
        assert [g.text for g in item.findall(f"{R}group")] == ["Friends", "Work"]
        (push,) = [s for s in got if s.get("type") == "set"]
        assert push.get("to") == f"{ALICE}/one"
        version = push.find(f"{R}query").get("ver")  # type: ignore[union-attr]
        assert version
        assert version != empty_version
        assert len(pushed_items(two.take())) == 1
        assert silent.take() == []  # never asked for the roster

        # §2.6.3: a current version gets an empty result, an old one the full roster
        result = await roster_get(bed, one, ver=version)
        assert len(result) == 0
        result = await roster_get(bed, one, ver=empty_version)
        query = result.find(f"{R}query")
        assert query is not None
        assert query.get("ver") == version
        (item,) = query.findall(f"{R}item")
        assert item.get("name") == "Bob"

        # an update replaces name and groups; the same set again still gets a push
        got = await roster_set(bed, one, f"<item jid='{BOB}'/>")
        (item,) = pushed_items(got)
        assert item.get("name") is None
        assert item.findall(f"{R}group") == []
        newer = bed.roster.view.version(ALICE)
        got = await roster_set(bed, one, f"<item jid='{BOB}' name=''/>")
        assert len(pushed_items(got)) == 1
        assert bed.roster.view.version(ALICE) == newer

        # remove: the push says so, and the item is gone
        got = await roster_set(bed, one, f"<item jid='{BOB}' subscription='remove'/>")
        (item,) = pushed_items(got)
        assert (item.get("jid"), item.get("subscription")) == (BOB, "remove")
        query = (await roster_get(bed, one)).find(f"{R}query")
        assert query is not None
        assert len(query) == 0
        got = await roster_set(bed, one, f"<item jid='{BOB}' subscription='remove'/>")
        assert error_condition(result_of(got)) == "item-not-found"


@pytest.mark.parametrize(
    ("query", "condition"),
    [
        ("", "bad-request"),
        (f"<item jid='{BOB}'/><item jid='carol@{DOMAIN}'/>", "bad-request"),
        ("<item/>", "bad-request"),
        ("<item jid='a@b@c'/>", "bad-request"),
        (f"<item jid='{BOB}/phone'/>", "bad-request"),
        (f"<item jid='{ALICE}'/>", "not-acceptable"),
        (f"<item jid='{BOB}' name='{'n' * 1024}'/>", "not-acceptable"),
        (f"<item jid='{BOB}'>{'<group>g</group>' * 2}</item>", "bad-request"),
        (f"<item jid='{BOB}'><group/></item>", "not-acceptable"),
        (f"<item jid='{BOB}'><group>{'g' * 1024}</group></item>", "not-acceptable"),
        (
            f"<item jid='{BOB}'>{''.join(f'<group>{i}</group>' for i in range(33))}</item>",
            "not-acceptable",
        ),
    ],
    ids=[
        "no-item",
        "two-items",
        "no-jid",
        "bad-jid",
        "full-jid",
        "own-jid",
        "long-name",
        "duplicate-group",
        "empty-group",
        "long-group",
        "many-groups",
    ],
)
async def test_roster_set_refusals(tmp_path: Path, query: str, condition: str) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        got = await roster_set(bed, alice, query)
        assert error_condition(result_of(got)) == condition
        assert pushed_items(got) == []
        assert bed.roster.view.entries(ALICE) == []


async def test_roster_set_at_the_limits(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        groups = "".join(f"<group>{i:0>1023}</group>" for i in range(32))
        got = await roster_set(bed, alice, f"<item jid='{BOB}' name='{'n' * 1023}'>{groups}</item>")
        assert result_of(got).get("type") == "result"
        entry = bed.entry(ALICE, BOB)
        assert entry is not None
        assert len(entry.groups) == 32


async def test_roster_bounds(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, max_items=2, max_text_chars=10) as bed:
        alice = await bed.online("alice")
        assert (
            result_of(await roster_set(bed, alice, f"<item jid='{BOB}' name='12345'/>")).get("type")
            == "result"
        )
        got = await roster_set(bed, alice, f"<item jid='carol@{DOMAIN}' name='123456'/>")
        assert error_condition(result_of(got)) == "not-allowed"  # 11 characters in all
        got = await roster_set(bed, alice, f"<item jid='{BOB}' name='1234567890'/>")
        assert result_of(got).get("type") == "result"  # replacing bob's own name
        assert (
            result_of(await roster_set(bed, alice, f"<item jid='carol@{DOMAIN}'/>")).get("type")
            == "result"
        )
        got = await roster_set(bed, alice, f"<item jid='dave@{DOMAIN}'/>")
        assert error_condition(result_of(got)) == "not-allowed"
        # a subscription that would add an item is refused the same way
        await bed.h.send(alice, f"<presence type='subscribe' to='dave@{DOMAIN}' id='p'/>")
        (error,) = alice.take()
        assert error.tag == f"{C}presence"
        assert error_condition(error) == "not-allowed"
        assert bed.entry(ALICE, f"dave@{DOMAIN}") is None
        # ... but not one for an item already there
        await bed.h.send(alice, f"<presence type='subscribe' to='{BOB}'/>")
        assert bed.state(ALICE, BOB) == NONE_OUT


async def test_roster_iq_shapes(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.h.send(alice, f"<iq type='get' id='x'><other xmlns='{NS_ROSTER}'/></iq>")
        assert error_condition(alice.only()) == "bad-request"
        # §2.1.5: nobody reads or writes another user's roster
        await bed.h.send(
            alice, f"<iq type='get' id='y' to='{BOB}'><query xmlns='{NS_ROSTER}'/></iq>"
        )
        assert error_condition(alice.only()) == "forbidden"
        # an explicit 'to' of one's own bare JID is one's own roster
        await bed.h.send(
            alice, f"<iq type='get' id='z' to='{ALICE}'><query xmlns='{NS_ROSTER}'/></iq>"
        )
        assert alice.only().get("type") == "result"
        features = [f.tag for f in bed.h.ctx.handlers.stream_features]
        assert features == ["{urn:xmpp:features:rosterver}ver"]
        assert NS_ROSTER in bed.h.ctx.handlers.account_features


async def test_pending_request_from_someone_not_listed_is_not_an_item(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await bed.inbound("subscribe", ROMEO)
        assert len(presences(alice.take(), "subscribe")) == 1
        query = (await roster_get(bed, alice)).find(f"{R}query")
        assert query is not None
        assert len(query) == 0
        assert not bed.roster.in_roster(JID.parse(ALICE), JID.parse(ROMEO))
        # naming the contact lists it and keeps the request pending
        got = await roster_set(bed, alice, f"<item jid='{ROMEO}' name='R'/>")
        assert bed.roster.in_roster(JID.parse(ALICE), JID.parse(ROMEO))
        assert not bed.roster.in_roster(JID.parse(ALICE), JID.parse(BOB))
        (item,) = pushed_items(got)
        assert (item.get("name"), item.get("subscription")) == ("R", "none")
        assert bed.state(ALICE, ROMEO) == NONE_IN
        # approving makes it a subscription from romeo
        await bed.h.send(alice, f"<presence type='subscribed' to='{ROMEO}'/>")
        assert bed.state(ALICE, ROMEO) == FROM
        assert bed.entry(ALICE, ROMEO).request is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("state", "sent"),
    [
        (NONE, []),
        (NONE_OUT, ["unsubscribe"]),
        (NONE_IN, ["unsubscribed"]),
        (NONE_OUT_IN, ["unsubscribe", "unsubscribed"]),
        (TO, ["unsubscribe"]),
        (TO_IN, ["unsubscribe", "unsubscribed"]),
        (FROM, ["unsubscribed", "unavailable"]),
        (FROM_OUT, ["unsubscribe", "unsubscribed", "unavailable"]),
        (BOTH, ["unsubscribe", "unsubscribed", "unavailable"]),
    ],
    ids=[name.replace(" ", "") for name in NAMED],
)
async def test_remove_cancels_both_ways(
    tmp_path: Path, state: SubscriptionState, sent: list[str]
) -> None:
    """RFC 6121 §2.5.2, towards a contact on another domain and towards a local one."""
    async with roster_bed(tmp_path) as bed:
        alice, bob = await bed.online("alice"), await bed.online("bob")
        await put_in_state(bed, alice, ROMEO, state)
        await put_in_state(bed, alice, BOB, state, contact_client=bob)
        for contact in (ROMEO, BOB):
            await roster_set(bed, alice, f"<item jid='{contact}' name='x'/>")
        alice.take()
        bob.take()
        bed.remote.clear()

        got = await roster_set(bed, alice, f"<item jid='{ROMEO}' subscription='remove'/>")
        assert result_of(got).get("type") == "result"
        assert [s.get("type") for s in bed.remote] == sent
        assert bed.entry(ALICE, ROMEO) is None

        got = await roster_set(bed, alice, f"<item jid='{BOB}' subscription='remove'/>")
        (item,) = pushed_items(got)
        assert item.get("subscription") == "remove"
        assert bed.entry(ALICE, BOB) is None
        assert bed.state(BOB, ALICE) == NONE
        seen_by_bob = bob.take()
        for ptype in sent:
            assert len(presences(seen_by_bob, None if ptype == "available" else ptype)) == 1


# ----- durability ------------------------------------------------------------------------------


async def _make_some_rosters(bed: Bed) -> None:
    alice, bob = await bed.online("alice"), await bed.online("bob")
    await put_in_state(bed, alice, BOB, BOTH, contact_client=bob)
    await roster_set(
        bed, alice, f"<item jid='{BOB}' name='Roberto Marker'><group>Group Marker</group></item>"
    )
    await put_in_state(bed, alice, ROMEO, NONE_OUT_IN)
    await bed.inbound("subscribe", "juliet@remote.example")


def _check_rosters(bed: Bed, versions: Mapping[str, str]) -> None:
    assert bed.state(ALICE, BOB) == BOTH
    assert bed.state(BOB, ALICE) == BOTH
    entry = bed.entry(ALICE, BOB)
    assert entry is not None
    assert (entry.name, entry.groups) == ("Roberto Marker", ("Group Marker",))
    assert bed.state(ALICE, ROMEO) == NONE_OUT_IN
    juliet = bed.entry(ALICE, "juliet@remote.example")
    assert juliet is not None
    assert not juliet.listed
    assert juliet.request
    assert {u: bed.roster.view.version(u) for u in versions} == versions


async def test_rosters_survive_a_restart(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        await _make_some_rosters(bed)
        versions = {u: bed.roster.view.version(u) for u in (ALICE, BOB, f"carol@{DOMAIN}")}
        assert versions[f"carol@{DOMAIN}"] == "0"
    async with roster_bed(tmp_path) as bed:
        _check_rosters(bed, versions)
        alice = bed.h.connect("alice")
        result = await roster_get(bed, alice, ver=versions[ALICE])
        assert len(result) == 0  # the cached copy is still current after a restart


async def test_rosters_survive_a_snapshot(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        await _make_some_rosters(bed)
        await roster_set(bed, bed.h.connect("carol"), f"<item jid='{BOB}'/>")
        await roster_set(
            bed, bed.h.connect("carol", "2"), f"<item jid='{BOB}' subscription='remove'/>"
        )
        versions = {u: bed.roster.view.version(u) for u in (ALICE, BOB, f"carol@{DOMAIN}")}
        await bed.h.store.snapshot()
        snapshot = bed.roster.view.to_snapshot()
        assert snapshot[f"carol@{DOMAIN}"] == [versions[f"carol@{DOMAIN}"], []]
        assert bed.h.store.log.latest_snapshot() is not None
    async with roster_bed(tmp_path) as bed:
        _check_rosters(bed, versions)
        # and the snapshot holds no contact in the clear
        packed = msgpack.packb(bed.roster.view.to_snapshot(), use_bin_type=True)
        for marker in (b"romeo", b"juliet", b"Roberto Marker", b"Group Marker"):
            assert marker not in packed


async def test_records_hold_no_contact_in_the_clear(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        await _make_some_rosters(bed)
        records = list(bed.h.store.log.scan(1))
        bodies = [
            msgpack.packb(r.body, use_bin_type=True) for r in records if r.type == ROSTER_CHANGE
        ]
        assert bodies
        for body in bodies:
            for marker in (b"romeo", b"juliet", b"Roberto Marker", b"Group Marker"):
                assert marker not in body


async def test_deleted_users_entries_are_skipped_on_replay_and_restore(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        await _make_some_rosters(bed)
        await bed.h.store.delete_user(BOB)
    async with roster_bed(tmp_path, users=("alice", "carol")) as bed:
        assert bed.roster.view.entries(BOB) == []
        assert bed.state(ALICE, BOB) == BOTH  # alice's side is hers
        await bed.h.store.snapshot()
    async with roster_bed(tmp_path, users=("alice", "carol")) as bed:
        assert bed.roster.view.entries(BOB) == []
        assert bed.state(ALICE, BOB) == BOTH


async def test_snapshot_of_a_deleted_user_restores_without_them(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        await _make_some_rosters(bed)
        await bed.h.store.delete_user(BOB)
        await bed.h.store.snapshot()  # bob's sealed entries are in it, unreadable
    async with roster_bed(tmp_path, users=("alice", "carol")) as bed:
        assert BOB not in bed.roster.view.to_snapshot()
        assert bed.state(ALICE, BOB) == BOTH


# ----- the view on its own ---------------------------------------------------------------------


def _unseal_to(plain: bytes) -> Callable[..., bytes]:
    def unseal(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        return plain

    return unseal


def _shredded(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
    raise ShreddedError(user)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"c": []},
        {"c": [{"u": ALICE, "id": "i", "s": {}}] * 3},
        {"c": ["x"]},
        {"c": [{"u": ALICE, "id": "i"}]},
        {"c": [{"u": ALICE, "s": {}}]},
    ],
)
def test_view_refuses_malformed_records(body: dict[str, Any]) -> None:
    with pytest.raises(StateError):
        RosterView().validate(ROSTER_CHANGE, body)


GOOD = {"j": BOB, "l": True, "n": None, "g": [], "s": "both", "o": False, "i": False, "r": None}


@pytest.mark.parametrize(
    "obj",
    [
        [1],
        {"l": True},
        {**GOOD, "j": ""},
        {**GOOD, "j": f"{BOB}/r"},
        {**GOOD, "j": 5},
        {**GOOD, "s": "sideways"},
        {**GOOD, "s": "to", "o": True},  # not one of the nine states
        {**GOOD, "l": 1},
        {**GOOD, "n": 1},
        {**GOOD, "g": "G"},
        {**GOOD, "g": [1]},
        {**GOOD, "r": "text"},
        {**GOOD, "i": True, "x": 1, "s": None},
    ],
)
def test_view_refuses_malformed_entries(obj: Any) -> None:
    body = {"c": [{"u": ALICE, "id": "i", "s": {}}]}
    with pytest.raises(StateError, match="malformed"):
        RosterView().apply(ROSTER_CHANGE, body, _unseal_to(msgpack.packb(obj)))
    with pytest.raises(StateError):
        RosterView().apply(ROSTER_CHANGE, body, _unseal_to(b"\xc1"))


def test_view_apply_restore_and_shredding() -> None:
    view = RosterView()
    good = msgpack.packb(GOOD, use_bin_type=True)
    view.apply(ROSTER_CHANGE, {"c": [{"u": ALICE, "id": "r1", "s": {"k": 1}}]}, _unseal_to(good))
    entry = view.entry(ALICE, BOB)
    assert entry is not None
    assert entry.state == BOTH
    assert entry.jid == JID("bob", DOMAIN)
    assert view.version(ALICE) == "r1"
    # a change that shows nothing new (here: the very same entry) keeps the version
    view.apply(ROSTER_CHANGE, {"c": [{"u": ALICE, "id": "same", "s": {}}]}, _unseal_to(good))
    assert view.version(ALICE) == "r1"
    # a shredded change is skipped: no entry and no new version
    view.apply(ROSTER_CHANGE, {"c": [{"u": ALICE, "id": "r2", "s": {}}]}, _shredded)
    assert view.version(ALICE) == "r1"
    snapshot = view.to_snapshot()
    assert snapshot == {ALICE: ["r1", [["same", {}]]]}  # the newest envelope, old version
    copy = RosterView()
    copy.restore(snapshot, _unseal_to(good))
    assert copy.entry(ALICE, BOB) == entry
    copy.restore(snapshot, _shredded)
    assert copy.entries(ALICE) == []
    assert copy.version(ALICE) == "0"
    copy.restore(None, _shredded)
    deleted = _pack_entry(JID("bob", DOMAIN), None)
    with pytest.raises(StateError, match="deleted"):
        copy.restore(snapshot, _unseal_to(deleted))
    view.apply(ROSTER_CHANGE, {"c": [{"u": ALICE, "id": "r3", "s": {}}]}, _unseal_to(deleted))
    assert view.entries(ALICE) == []
    assert view.version(ALICE) == "r3"
    assert view.to_snapshot() == {ALICE: ["r3", []]}
    view.forget_user(ALICE)
    assert view.version(ALICE) == "0"


async def test_roster_needs_its_view_and_room_in_records(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        with pytest.raises(ValueError, match="RosterView"):
            Roster(h.ctx, RosterView())
    (tmp_path / "2").mkdir()
    view = RosterView()
    async with im_harness(tmp_path / "2", views=[view]) as h:
        with pytest.raises(ValueError, match="RosterView"):
            Roster(h.ctx, RosterView())  # not the one the store feeds
        h.store.options = dataclasses.replace(h.store.options, max_record_bytes=100_000)
        with pytest.raises(ValueError, match="max_record_bytes"):
            Roster(h.ctx, view)
