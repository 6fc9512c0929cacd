"""The router and the basic message/presence features, on the in-process harness."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.im.harness import im_harness

if TYPE_CHECKING:
    from pathlib import Path

ERR = "{urn:ietf:params:xml:ns:xmpp-stanzas}"


async def test_message_to_available_resources_and_bounces(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        alice, bob1, bob2 = h.connect("alice"), h.connect("bob", "one"), h.connect("bob", "two")
        for c in (alice, bob1, bob2):
            await h.send(c, "<presence/>")
        await h.send(bob2, "<presence><priority>-1</priority></presence>")
        for c in (alice, bob1, bob2):
            c.take()
        await h.send(alice, "<message to='bob@example.org' type='chat'><body>hi</body></message>")
        assert bob1.only().findtext("{jabber:client}body") == "hi"
        assert bob2.take() == []  # negative priority: not for bare-JID messages
        await h.send(
            alice, "<message to='bob@example.org/two' type='chat'><body>x</body></message>"
        )
        assert bob2.only().findtext("{jabber:client}body") == "x"
        await h.send(alice, "<message to='nobody@example.org' id='m1'><body>x</body></message>")
        assert alice.only().find(f".//{ERR}service-unavailable") is not None
        await h.send(
            alice, "<message to='bob@example.org' type='groupchat'><body>x</body></message>"
        )
        assert alice.only().find(f".//{ERR}service-unavailable") is not None
        await h.send(alice, "<message to='x@elsewhere.org'><body>x</body></message>")
        assert alice.only().find(f".//{ERR}remote-server-not-found") is not None


async def test_iq_routing(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        alice, bob = h.connect("alice"), h.connect("bob")
        await h.send(
            alice, "<iq type='get' id='1' to='bob@example.org/r'><query xmlns='x:y'/></iq>"
        )
        assert bob.only().get("id") == "1"
        await h.send(alice, "<iq type='get' id='2' to='bob@example.org/gone'><q xmlns='x:y'/></iq>")
        assert alice.only().find(f".//{ERR}service-unavailable") is not None
        await h.send(alice, "<iq type='get' id='3'/>")
        assert alice.only().find(f".//{ERR}bad-request") is not None
        await h.send(alice, "<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert alice.only().find(f".//{ERR}bad-request") is not None
        await h.send(alice, "<iq type='get' id='4'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert alice.only().get("type") == "result"
        await h.send(alice, "<iq type='result' id='5' to='example.org'/>")
        assert alice.take() == []


async def test_own_resources_see_presence_and_departure(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        one, two = h.connect("alice", "one"), h.connect("alice", "two")
        await h.send(one, "<presence/>")
        await h.send(two, "<presence><show>away</show></presence>")
        got = one.only()
        assert got.get("from") == "alice@example.org/two"
        assert got.findtext("{jabber:client}show") == "away"
        await h.disconnect(two)
        assert one.only().get("type") == "unavailable"


async def test_iq_to_another_account_goes_to_contact_handlers(tmp_path: Path) -> None:
    async with im_harness(tmp_path) as h:
        alice = h.connect("alice")
        await h.send(alice, "<iq type='get' id='1' to='bob@example.org'><q xmlns='x:y'/></iq>")
        assert alice.only().find(f".//{ERR}service-unavailable") is not None
        await h.send(alice, "<iq type='get' id='2' to='nobody@example.org'><q xmlns='x:y'/></iq>")
        assert alice.only().find(f".//{ERR}service-unavailable") is not None
