"""Presence (RFC 6121 §4) on the in-process harness: initial presence with broadcast and
probes, updates, unavailable presence sent or implied, directed presence, errors, the
``on_available`` hook, and presence without a roster."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest

from tests.im.harness import DOMAIN, im_harness
from tests.im.test_roster import (
    ALICE,
    BOB,
    ROMEO,
    Bed,
    error_condition,
    put_in_state,
    roster_bed,
)
from villaged.im.presence import Presence, priority
from villaged.im.roster import BOTH, FROM, TO
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from pathlib import Path

    from tests.im.harness import FakeClient
    from villaged.im.sessions import Session

C = "{jabber:client}"
CAROL = f"carol@{DOMAIN}"
DAVE = f"dave@{DOMAIN}"
USERS = ("alice", "bob", "carol", "dave")


def senders(stanzas: list[ET.Element]) -> list[str]:
    return sorted(str(s.get("from")) for s in stanzas)


def available(client: FakeClient) -> bool:
    return client.session.available


async def contacts(bed: Bed) -> tuple[FakeClient, FakeClient, FakeClient, FakeClient]:
    """alice and bob see each other; carol sees alice (alice: from); alice sees dave (to)."""
    alice = await bed.online("alice")
    bob, carol, dave = await bed.online("bob"), await bed.online("carol"), await bed.online("dave")
    await put_in_state(bed, alice, BOB, BOTH, contact_client=bob)
    await put_in_state(bed, alice, CAROL, FROM, contact_client=carol)
    await put_in_state(bed, alice, DAVE, TO, contact_client=dave)
    await bed.h.disconnect(alice)
    for client in (bob, carol, dave):
        client.take()
    return alice, bob, carol, dave


async def test_initial_presence_broadcast_and_probes(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, bob, carol, dave = await contacts(bed)
        bob2 = bed.h.connect("bob", "two")
        await bed.h.send(bob2, "<presence><show>away</show></presence>")
        bob.take()
        bob2.take()

        one = bed.h.connect("alice", "one")
        await bed.h.send(one, "<presence><show>chat</show><priority>5</priority></presence>")
        assert available(one)
        assert one.session.priority == 5
        # broadcast to subscribers' available resources (§4.2.2), addressed to their bare JID
        for client in (bob, bob2, carol):
            (got,) = client.take()
            assert (got.get("from"), got.get("to")) == (
                f"{ALICE}/one",
                str(client.session.jid.bare),
            )
            assert got.findtext(f"{C}show") == "chat"
        assert dave.take() == []
        # probes of alice's subscriptions answered at once (§4.3.2)
        answers = one.take()
        assert senders(answers) == [f"{BOB}/r", f"{BOB}/two", f"{DAVE}/r"]
        assert all(p.get("to") == f"{ALICE}/one" for p in answers)
        shows = [p.findtext(f"{C}show") for p in answers if p.get("from") == f"{BOB}/two"]
        assert shows == ["away"]

        # a second resource: its siblings see it, and it sees them (§4.2.2)
        two = bed.h.connect("alice", "two")
        await bed.h.send(two, "<presence/>")
        assert senders(one.take()) == [f"{ALICE}/two"]
        assert senders(two.take()) == [f"{ALICE}/one", f"{BOB}/r", f"{BOB}/two", f"{DAVE}/r"]
        for client in (bob, bob2, carol):
            assert senders(client.take()) == [f"{ALICE}/two"]

        # an update goes to the same audience, without probing again (§4.4.2)
        await bed.h.send(one, "<presence><show>dnd</show></presence>")
        assert one.take() == []
        for client in (two, bob, bob2, carol):
            (got,) = client.take()
            assert got.findtext(f"{C}show") == "dnd"
        assert dave.take() == []

        # unavailable: the same audience, the client's status included (§4.5.2)
        await bed.h.send(one, "<presence type='unavailable'><status>gone</status></presence>")
        assert not available(one)
        for client in (two, bob, bob2, carol):
            (got,) = client.take()
            assert got.get("type") == "unavailable"
            assert got.findtext(f"{C}status") == "gone"
        # a second unavailable says nothing more
        await bed.h.send(one, "<presence type='unavailable'/>")
        assert bob.take() == []
        # available again is initial presence again: probes are answered again
        await bed.h.send(one, "<presence/>")
        assert senders(one.take()) == [f"{ALICE}/two", f"{BOB}/r", f"{BOB}/two", f"{DAVE}/r"]
        for client in (two, bob, bob2, carol):
            assert senders(client.take()) == [f"{ALICE}/one"]

        # the session ending implies unavailable
        await bed.h.disconnect(two)
        for client in (one, bob, bob2, carol):
            (got,) = client.take()
            assert (got.get("type"), got.get("from")) == ("unavailable", f"{ALICE}/two")
        assert dave.take() == []


async def test_presence_to_own_bare_jid_is_a_broadcast(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, bob, _, _ = await contacts(bed)
        alice = bed.h.connect("alice")
        await bed.h.send(alice, f"<presence to='{ALICE}'/>")
        (got,) = bob.take()
        assert got.get("to") == BOB
        assert alice.session.presence is not None
        assert alice.session.presence.get("to") is None


async def test_offline_contacts_are_not_answered(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, bob, carol, dave = await contacts(bed)
        for client in (bob, carol, dave):
            await bed.h.disconnect(client)
        alice = bed.h.connect("alice")
        await bed.h.send(alice, "<presence/>")
        assert alice.take() == []  # §4.3.2 allows silence for a contact with no resource


async def test_remote_contacts(tmp_path: Path) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = await bed.online("alice")
        await put_in_state(bed, alice, ROMEO, BOTH)
        await bed.h.disconnect(alice)
        bed.remote.clear()
        alice = bed.h.connect("alice", "desk")
        await bed.h.send(alice, "<presence/>")
        got = [(s.get("type"), s.get("from"), s.get("to")) for s in bed.remote]
        assert got == [
            (None, f"{ALICE}/desk", ROMEO),
            ("probe", f"{ALICE}/desk", ROMEO),
        ]
        bed.remote.clear()
        # a probe from romeo's server (federation will call this) is answered
        prober = JID.parse(f"{ROMEO}/phone")
        await bed.presence.probe(prober, JID.parse(ALICE))
        (answer,) = bed.remote
        assert (answer.get("type"), answer.get("from"), answer.get("to")) == (
            None,
            f"{ALICE}/desk",
            f"{ROMEO}/phone",
        )
        bed.remote.clear()
        # ... unless romeo may not see alice: then he hears so (§4.3.2)
        stranger = JID.parse("tybalt@remote.example/x")
        await bed.presence.probe(stranger, JID.parse(ALICE))
        (answer,) = bed.remote
        assert (answer.get("type"), answer.get("to")) == ("unsubscribed", "tybalt@remote.example")
        bed.remote.clear()
        await bed.h.disconnect(alice)
        assert [(s.get("type"), s.get("to")) for s in bed.remote] == [("unavailable", ROMEO)]


async def test_probe_of_a_contact_that_does_not_share(tmp_path: Path) -> None:
    """A stale 'to' (here: the contact's account is gone) is ended by the probe's answer."""
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, _, _, dave = await contacts(bed)
        await bed.h.disconnect(dave)
        await bed.h.store.delete_user(DAVE)
        alice = bed.h.connect("alice")
        await bed.h.send(alice, "<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>")
        alice.take()
        await bed.h.send(alice, "<presence/>")
        assert bed.state(ALICE, DAVE).subscription == "none"
        pushes = [s for s in alice.take() if s.get("type") == "set"]
        assert len(pushes) == 1


# ----- directed presence ---------------------------------------------------------------------


async def test_directed_presence_is_remembered(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        alice = await bed.online("alice")
        carol, carol2 = await bed.online("carol"), await bed.online("carol", "two")
        carol.take()
        # §4.6: to a full JID, only that resource
        await bed.h.send(alice, f"<presence to='{CAROL}/r'><show>xa</show></presence>")
        (got,) = carol.take()
        assert (got.get("from"), got.get("to")) == (f"{ALICE}/r", f"{CAROL}/r")
        assert carol2.take() == []
        # to a bare JID, every available resource
        await bed.h.send(alice, f"<presence to='{DAVE}'/>")
        dave = await bed.online("dave")
        await bed.h.send(alice, f"<presence to='{DAVE}'/>")
        assert len(dave.take()) == 1
        # directed unavailable is delivered and forgets the entity
        await bed.h.send(alice, f"<presence type='unavailable' to='{DAVE}'/>")
        assert dave.only().get("type") == "unavailable"
        # the end of the session reaches whoever still has directed presence (§4.6.3)
        await bed.h.disconnect(alice)
        (got,) = carol.take()
        assert (got.get("type"), got.get("to")) == ("unavailable", f"{CAROL}/r")
        assert carol2.take() == []
        assert dave.take() == []


async def test_directed_presence_to_a_subscriber_is_not_sent_twice(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, bob, _, _ = await contacts(bed)
        alice = await bed.online("alice")
        bob.take()
        await bed.h.send(alice, f"<presence to='{BOB}/r'><status>psst</status></presence>")
        assert bob.only().findtext(f"{C}status") == "psst"
        await bed.h.disconnect(alice)
        assert bob.only().get("type") == "unavailable"


async def test_directed_presence_before_initial_presence(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        carol = await bed.online("carol")
        alice = bed.h.connect("alice")
        await bed.h.send(alice, f"<presence to='{CAROL}'/>")
        assert carol.only().get("type") is None
        assert not available(alice)
        await bed.h.send(alice, "<presence type='unavailable'/>")
        assert carol.only().get("type") == "unavailable"
        await bed.h.disconnect(alice)
        assert carol.take() == []


async def test_directed_presence_targets(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        alice = await bed.online("alice")
        await bed.h.send(alice, f"<presence to='nobody@{DOMAIN}'/>")
        await bed.h.send(alice, f"<presence to='{DOMAIN}'/>")
        await bed.h.send(alice, f"<presence to='{ROMEO}/phone'/>")
        assert [(s.get("type"), s.get("to")) for s in bed.remote] == [(None, f"{ROMEO}/phone")]
        assert alice.take() == []
        await bed.h.disconnect(alice)
        assert [(s.get("type"), s.get("to")) for s in bed.remote[1:]] == [
            ("unavailable", f"{ROMEO}/phone")
        ]


async def test_directed_presence_is_bounded(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        bed.presence.max_directed = 1
        alice = await bed.online("alice")
        carol, dave = await bed.online("carol"), await bed.online("dave")
        await bed.h.send(alice, f"<presence to='{CAROL}'/>")
        await bed.h.send(alice, f"<presence to='{CAROL}'/>")  # already remembered
        assert len(carol.take()) == 2
        await bed.h.send(alice, f"<presence to='{DAVE}' id='d'/>")
        assert error_condition(alice.only()) == "policy-violation"
        assert dave.take() == []


# ----- other presence stanzas ------------------------------------------------------------------


async def test_probes_errors_and_unknown_types(tmp_path: Path) -> None:
    async with roster_bed(tmp_path, users=USERS) as bed:
        _, bob, _, _ = await contacts(bed)
        alice = await bed.online("alice")
        bob.take()
        await bed.h.send(alice, f"<presence type='probe' to='{BOB}'/>")
        assert alice.take() == []  # §4.3: probing is the server's business
        assert bob.take() == []
        # errors go where they are addressed
        await bed.h.send(alice, f"<presence type='error' to='{BOB}/r'/>")
        assert bob.only().get("type") == "error"
        await bed.h.send(alice, f"<presence type='error' to='{BOB}'/>")
        assert bob.only().get("type") == "error"
        await bed.h.send(alice, f"<presence type='error' to='{ROMEO}'/>")
        assert [s.get("type") for s in bed.remote] == ["error"]
        await bed.h.send(alice, f"<presence type='error' to='nobody@{DOMAIN}'/>")
        await bed.h.send(alice, "<presence type='error'/>")
        assert alice.take() == []
        assert bob.take() == []
        await bed.h.send(alice, "<presence type='invisible' id='i'/>")
        assert error_condition(alice.only()) == "bad-request"


async def test_on_available_runs_after_initial_presence(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    async def on_available(session: Session) -> None:
        seen.append((str(session.jid), len(inboxes[str(session.jid)].inbox)))

    inboxes: dict[str, FakeClient] = {}
    async with roster_bed(tmp_path, users=USERS, on_available=on_available) as bed:
        bob = bed.h.connect("bob")
        inboxes[f"{BOB}/r"] = bob
        await bed.h.send(bob, "<presence/>")
        assert seen == [(f"{BOB}/r", 0)]
        alice = bed.h.connect("alice")
        inboxes[f"{ALICE}/r"] = alice
        await bed.h.send(alice, f"<presence type='subscribe' to='{BOB}'/>")
        await bed.h.send(bob, "<presence type='unavailable'/>")
        bob.take()
        await bed.h.send(bob, "<presence/>")
        # the hook runs once the pending request has been redelivered
        assert seen[-1] == (f"{BOB}/r", 1)
        await bed.h.send(bob, "<presence><show>away</show></presence>")
        assert len(seen) == 2  # an update is not initial presence


@pytest.mark.parametrize(
    ("xml", "value"),
    [
        ("<presence/>", 0),
        ("<presence><priority>-1</priority></presence>", -1),
        ("<presence><priority>500</priority></presence>", 127),
        ("<presence><priority>-500</priority></presence>", -128),
        ("<presence><priority>high</priority></presence>", 0),
    ],
)
async def test_priority(tmp_path: Path, xml: str, value: int) -> None:
    async with roster_bed(tmp_path) as bed:
        alice = bed.h.connect("alice")
        await bed.h.send(alice, xml)
        assert alice.session.priority == value


async def test_presence_without_a_roster(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node built without the roster feature: own resources and directed presence only."""
    async with im_harness(tmp_path) as h:
        presence = h.router.presence
        assert isinstance(presence, Presence)
        assert presence.roster is None
        one, two, bob = h.connect("alice", "one"), h.connect("alice", "two"), h.connect("bob")
        await h.send(bob, "<presence/>")
        await h.send(one, "<presence/>")
        await h.send(two, "<presence/>")
        assert senders(one.take()) == [f"{ALICE}/two"]
        assert senders(two.take()) == [f"{ALICE}/one"]
        assert bob.take() == []
        await h.send(one, f"<presence type='subscribe' to='{BOB}'/>")
        assert bob.take() == []
        await h.send(one, f"<presence to='{BOB}'/>")
        assert senders(bob.take()) == [f"{ALICE}/one"]
        await presence.probe(JID.parse(f"{BOB}/r"), JID.parse(ALICE))
        assert bob.take() == []
        with caplog.at_level(logging.DEBUG, logger="villaged.im.roster"):
            await h.send(one, f"<presence to='{ROMEO}'/>")
        events = [r.__dict__.get("event") for r in caplog.records if r.name.endswith(".roster")]
        assert events == ["im.remote_dropped"]
        await h.disconnect(one)
        assert senders(bob.take()) == [f"{ALICE}/one"]

        # a hook of its own for stanzas to other domains
        sent: list[ET.Element] = []

        async def collect(stanza: ET.Element) -> None:
            sent.append(stanza)

        own = Presence(h.ctx, outbound_remote=collect)
        stanza = ET.Element(f"{C}presence", {"from": f"{BOB}/r", "to": ROMEO})
        await own.from_client(bob.session, stanza, JID.parse(ROMEO))
        assert sent == [stanza]


def test_priority_function() -> None:
    stanza = ET.Element(f"{C}presence")
    ET.SubElement(stanza, f"{C}priority").text = "7"
    assert priority(stanza) == 7
