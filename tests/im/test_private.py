"""XEP-0049 private XML storage on the in-process harness: items per (name, namespace), the
XEP's error cases, quotas, and what the store keeps (sealed, durable, snapshotted, gone with
the account)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.im.harness import DOMAIN, im_harness, parse_stanza
from villaged.im import private
from villaged.im.private import (
    PRIVATE_SET,
    QUERY,
    PrivateStorage,
    PrivateView,
    element_bytes,
    element_from_bytes,
    pack_item,
)
from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.storage.state import Unseal

ERR = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
ALICE = f"alice@{DOMAIN}"
BOOKMARKS = (
    "<storage xmlns='storage:bookmarks'>"
    "<conference jid='tea@rooms.example.org' autojoin='true' name='Quokka-Marker &amp; co'>"
    "<nick>al ✓</nick></conference></storage>"
)
PREFS = "<prefs xmlns='urn:example:quokka-prefs' theme='dark'>\n  <font size='12'/>\n</prefs>"


@asynccontextmanager
async def private_node(
    tmp_path: Path, **limits: int
) -> AsyncIterator[tuple[ImHarness, PrivateStorage]]:
    view = PrivateView()
    async with im_harness(tmp_path, views=[view]) as h:
        yield h, private.register(h.ctx, view, **limits)


def condition(reply: ET.Element) -> str:
    assert reply.get("type") == "error", reply.attrib
    error = reply.find("{jabber:client}error")
    assert error is not None
    names = [child.tag for child in error if child.tag != ERR + "text"]
    assert len(names) == 1, names
    return names[0][len(ERR) :]


def query(*fragments: str) -> str:
    return f"<query xmlns='jabber:iq:private'>{''.join(fragments)}</query>"


def as_stored(fragment: str) -> bytes:
    """A fragment as the server received it inside a query, serialized the way it is stored."""
    iq = parse_stanza(
        f"<iq type='set' id='x'><query xmlns='jabber:iq:private'>{fragment}</query></iq>".encode()
    )
    return element_bytes(iq[0][0])


async def store(h: ImHarness, client: FakeClient, *fragments: str, attrs: str = "") -> ET.Element:
    await h.send(
        client,
        f"<iq type='set' id='s'{attrs}>{query(*fragments)}</iq>",
    )
    return client.only()


async def fetch(h: ImHarness, client: FakeClient, fragment: str, attrs: str = "") -> ET.Element:
    """The one element a successful get returns."""
    await h.send(
        client,
        f"<iq type='get' id='g'{attrs}><query xmlns='jabber:iq:private'>{fragment}</query></iq>",
    )
    reply = client.only()
    assert reply.get("type") == "result", reply.attrib
    assert len(reply) == 1
    assert reply[0].tag == QUERY
    assert len(reply[0]) == 1
    return reply[0][0]


async def test_get_returns_what_was_set_or_an_empty_element(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        empty = await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")
        assert empty.tag == "{storage:bookmarks}storage"
        assert len(empty) == 0
        assert not empty.attrib

        reply = await store(h, alice, BOOKMARKS)
        assert reply.get("type") == "result"
        assert reply.get("id") == "s"
        assert len(reply) == 0
        got = await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")
        assert element_bytes(got) == as_stored(BOOKMARKS)

        # The key is name and namespace: the same name elsewhere, or another name here, is
        # another item.
        assert len(await fetch(h, alice, "<storage xmlns='storage:rosternotes'/>")) == 0
        other = await fetch(h, alice, "<other xmlns='storage:bookmarks'/>")
        assert other.tag == "{storage:bookmarks}other"
        # What the get carried inside its element does not matter.
        got = await fetch(h, alice, "<storage xmlns='storage:bookmarks'><junk/></storage>")
        assert element_bytes(got) == as_stored(BOOKMARKS)

        # To one's own bare JID is the same as no 'to'.
        own = " to='alice@example.org'"
        assert (await store(h, alice, PREFS, attrs=own)).get("type") == "result"
        got = await fetch(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>", attrs=own)
        assert element_bytes(got) == as_stored(PREFS)

        # Each user has their own storage.
        assert len(await fetch(h, h.connect("bob"), "<storage xmlns='storage:bookmarks'/>")) == 0


async def test_one_set_may_carry_several_elements(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, storage):
        alice = h.connect("alice")
        first = "<storage xmlns='storage:bookmarks'><conference jid='a@b'/></storage>"
        assert (await store(h, alice, first, PREFS, BOOKMARKS)).get("type") == "result"
        assert sorted(storage.view.items(ALICE)) == [
            "{storage:bookmarks}storage",
            "{urn:example:quokka-prefs}prefs",
        ]
        # The later of two elements with one tag wins.
        got = await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")
        assert element_bytes(got) == as_stored(BOOKMARKS)
        assert element_bytes(
            await fetch(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>")
        ) == as_stored(PREFS)


async def test_an_empty_element_removes_the_item(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, storage):
        alice = h.connect("alice")
        before = h.store.log.last_index
        # Removing what is not there writes nothing.
        reply = await store(h, alice, "<storage xmlns='storage:bookmarks'/>")
        assert reply.get("type") == "result"
        assert h.store.log.last_index == before

        await store(h, alice, BOOKMARKS, PREFS)
        reply = await store(h, alice, "<storage xmlns='storage:bookmarks'>\n </storage>")
        assert reply.get("type") == "result"
        assert list(storage.view.items(ALICE)) == ["{urn:example:quokka-prefs}prefs"]
        assert len(await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")) == 0
        await store(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>")
        assert storage.view.items(ALICE) == {}
        assert h.store.log.last_index == before + 4

        # Attributes alone, or text alone, are content.
        await store(h, alice, "<a xmlns='urn:x' k='v'/>", "<b xmlns='urn:x'>t</b>")
        assert (await fetch(h, alice, "<a xmlns='urn:x'/>")).get("k") == "v"
        assert (await fetch(h, alice, "<b xmlns='urn:x'/>")).text == "t"


@pytest.mark.parametrize(
    ("iq_type", "query", "expected"),
    [
        # XEP-0049 §2.3: a get names one element ("Bad Format", RFC 6120's bad-request) ...
        ("get", "<query xmlns='jabber:iq:private'/>", "bad-request"),
        ("get", f"<query xmlns='jabber:iq:private'>{BOOKMARKS}{PREFS}</query>", "bad-request"),
        # ... a set carries at least one ...
        ("set", "<query xmlns='jabber:iq:private'>\n</query>", "not-acceptable"),
        # ... each in a namespace of its own, not a reserved one.
        ("get", "<query xmlns='jabber:iq:private'><bare xmlns=''/></query>", "not-acceptable"),
        ("set", "<query xmlns='jabber:iq:private'><inherits/></query>", "not-acceptable"),
        (
            "set",
            f"<query xmlns='jabber:iq:private'>{PREFS}<bare xmlns=''>x</bare></query>",
            "not-acceptable",
        ),
        (
            "get",
            "<query xmlns='jabber:iq:private'><message xmlns='jabber:client'/></query>",
            "not-acceptable",
        ),
        (
            "set",
            "<query xmlns='jabber:iq:private'><db xmlns='jabber:server'>x</db></query>",
            "not-acceptable",
        ),
        (
            "set",
            "<query xmlns='jabber:iq:private'><vCard xmlns='vcard-temp'><FN>x</FN></vCard></query>",
            "not-acceptable",
        ),
        (
            "get",
            "<query xmlns='jabber:iq:private'><vCard xmlns='vcard-temp'/></query>",
            "not-acceptable",
        ),
        # The payload is <query/>.
        ("get", "<storage xmlns='jabber:iq:private'/>", "bad-request"),
        ("set", f"<other xmlns='jabber:iq:private'>{PREFS}</other>", "bad-request"),
    ],
)
async def test_malformed_requests(tmp_path: Path, iq_type: str, query: str, expected: str) -> None:
    async with private_node(tmp_path) as (h, storage):
        alice = h.connect("alice")
        before = h.store.log.last_index
        await h.send(alice, f"<iq type='{iq_type}' id='e'>{query}</iq>")
        reply = alice.only()
        assert reply.get("id") == "e"
        assert condition(reply) == expected
        assert h.store.log.last_index == before
        assert storage.view.items(ALICE) == {}


async def test_another_users_storage_is_forbidden(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, storage):
        alice, bob = h.connect("alice"), h.connect("bob")
        await store(h, alice, BOOKMARKS)
        for iq_type, fragment in (("get", "<storage xmlns='storage:bookmarks'/>"), ("set", PREFS)):
            await h.send(
                bob,
                f"<iq type='{iq_type}' id='f' to='alice@example.org'>{query(fragment)}</iq>",
            )
            assert condition(bob.only()) == "forbidden"
        assert alice.take() == []
        assert list(storage.view.items(ALICE)) == ["{storage:bookmarks}storage"]
        # Not an account: the router's answer, as for any iq to an unknown address.
        await h.send(
            bob,
            f"<iq type='get' id='f' to='nobody@example.org'>{query(PREFS)}</iq>",
        )
        assert condition(bob.only()) == "service-unavailable"


async def test_quota_per_item(tmp_path: Path) -> None:
    async with private_node(tmp_path, max_item_bytes=100) as (h, storage):
        alice = h.connect("alice")
        at_limit = "<n xmlns='urn:x'>" + "x" * (100 - len("<n xmlns='urn:x'></n>")) + "</n>"
        assert len(as_stored(at_limit)) == 100
        assert (await store(h, alice, at_limit)).get("type") == "result"
        over = at_limit.replace("<n ", "<m ").replace("</n>", "x</m>")
        reply = await store(h, alice, PREFS.replace("12", "1"), over)
        assert condition(reply) == "not-acceptable"
        assert "{urn:x}m is 101 bytes" in (reply.findtext(f".//{ERR}text") or "")
        assert list(storage.view.items(ALICE)) == ["{urn:x}n"]  # nothing of the refused set


async def test_quota_per_user_counts_what_would_be_stored(tmp_path: Path) -> None:
    async with private_node(tmp_path, max_user_bytes=200) as (h, storage):
        alice = h.connect("alice")
        a60 = "<a xmlns='urn:x'>" + "x" * (60 - 21) + "</a>"
        b100 = "<b xmlns='urn:x'>" + "x" * (100 - 21) + "</b>"
        assert (len(as_stored(a60)), len(as_stored(b100))) == (60, 100)
        assert (await store(h, alice, a60, b100)).get("type") == "result"
        b140 = b100.replace("</b>", "x" * 40 + "</b>")
        # Replacing b with 140 bytes would make 200: fits; one byte more does not.
        reply = await store(h, alice, b140.replace("</b>", "x</b>"))
        assert condition(reply) == "not-acceptable"
        assert "201 bytes; its limit is 200" in (reply.findtext(f".//{ERR}text") or "")
        assert (await store(h, alice, b140)).get("type") == "result"
        # Full: another item fits only if it takes a's place.
        c60 = a60.replace("<a ", "<c ").replace("</a>", "</c>")
        assert condition(await store(h, alice, c60)) == "not-acceptable"
        assert (await store(h, alice, "<a xmlns='urn:x'/>", c60)).get("type") == "result"
        assert sorted(storage.view.items(ALICE)) == ["{urn:x}b", "{urn:x}c"]
        # Other users have quotas of their own.
        assert (await store(h, h.connect("bob"), b140)).get("type") == "result"


async def test_quota_of_items_per_user(tmp_path: Path) -> None:
    async with private_node(tmp_path, max_user_items=2) as (h, storage):
        alice = h.connect("alice")
        assert (await store(h, alice, "<a xmlns='urn:x'>1</a>", "<b xmlns='urn:x'>1</b>")).get(
            "type"
        ) == "result"
        assert (await store(h, alice, "<a xmlns='urn:x'>2</a>")).get(
            "type"
        ) == "result"  # a replacement
        reply = await store(h, alice, "<c xmlns='urn:x'>1</c>")
        assert condition(reply) == "not-acceptable"
        assert "at most 2 elements" in (reply.findtext(f".//{ERR}text") or "")
        assert (await store(h, alice, "<a xmlns='urn:x'/>", "<c xmlns='urn:x'>1</c>")).get(
            "type"
        ) == "result"
        assert sorted(storage.view.items(ALICE)) == ["{urn:x}b", "{urn:x}c"]


async def test_concurrent_sets_cannot_both_pass_the_quota(tmp_path: Path) -> None:
    async with private_node(tmp_path, max_user_items=1) as (h, storage):
        one, two = h.connect("alice", "one"), h.connect("alice", "two")
        answers: dict[str, str] = {}

        async def set_item(client: FakeClient, name: str) -> None:
            reply = await store(h, client, f"<{name} xmlns='urn:x'>1</{name}>")
            answers[name] = reply.get("type") or ""

        async with trio.open_nursery() as nursery:
            nursery.start_soon(set_item, one, "a")
            nursery.start_soon(set_item, two, "b")
        # Whichever came second checked the quota after the first had written.
        assert sorted(answers.values()) == ["error", "result"]
        winner = next(name for name, answer in answers.items() if answer == "result")
        assert list(storage.view.items(ALICE)) == [f"{{urn:x}}{winner}"]


async def test_server_disco_lists_private_storage(tmp_path: Path) -> None:
    # Where Prosody lists it; XEP-0049 defines no feature of its own.
    async with private_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        disco = "<query xmlns='http://jabber.org/protocol/disco#info'/>"
        await h.send(alice, f"<iq type='get' id='d' to='example.org'>{disco}</iq>")
        info = "{http://jabber.org/protocol/disco#info}feature"
        assert "jabber:iq:private" in {f.get("var") for f in alice.only().iter(info)}
        await h.send(alice, f"<iq type='get' id='d' to='alice@example.org'>{disco}</iq>")
        assert "jabber:iq:private" not in {f.get("var") for f in alice.only().iter(info)}


async def test_limits_the_log_cannot_hold_are_refused(tmp_path: Path) -> None:
    view = PrivateView()
    async with im_harness(tmp_path, views=[view]) as h:
        half = h.store.options.max_record_bytes // 2
        with pytest.raises(ValueError, match="max_record_bytes"):
            private.register(h.ctx, view, max_item_bytes=half)
        assert "jabber:iq:private" not in h.ctx.handlers.account_iq


async def test_items_survive_a_restart_and_a_snapshot(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, _):
        await store(h, h.connect("alice"), BOOKMARKS, PREFS)
    async with private_node(tmp_path) as (h, storage):  # replayed from the log
        alice = h.connect("alice")
        assert element_bytes(
            await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")
        ) == as_stored(BOOKMARKS)
        await store(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>")
        await store(h, h.connect("bob"), PREFS)
        await h.store.snapshot()
        snapshot = h.store.log.latest_snapshot()
        assert snapshot is not None
        assert snapshot.index == h.store.log.last_index
    async with private_node(tmp_path) as (h, storage):  # restored from the snapshot alone
        alice, bob = h.connect("alice"), h.connect("bob")
        assert list(storage.view.items(ALICE)) == ["{storage:bookmarks}storage"]
        assert element_bytes(
            await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")
        ) == as_stored(BOOKMARKS)
        assert len(await fetch(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>")) == 0
        assert element_bytes(
            await fetch(h, bob, "<prefs xmlns='urn:example:quokka-prefs'/>")
        ) == as_stored(PREFS)


async def test_no_plaintext_reaches_the_disk(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        await store(h, alice, BOOKMARKS, PREFS)
        await h.store.snapshot()
        await store(h, alice, BOOKMARKS.replace("tea@", "coffee@"))
        assert len(await fetch(h, alice, "<prefs xmlns='urn:example:quokka-prefs'/>")) == 1
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.parent.name == "log" and p.stat().st_size > 2 * len(BOOKMARKS) for p in files)
    # The namespaces too: which clients and features a user stores data for is theirs.
    secrets = [b"Quokka-Marker", b"rooms.example.org", b"storage:bookmarks", b"quokka-prefs"]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, (path, secret)


async def test_a_deleted_accounts_items_go_with_it(tmp_path: Path) -> None:
    async with private_node(tmp_path, max_user_bytes=300) as (h, storage):
        await store(h, h.connect("alice"), BOOKMARKS)
        await store(h, h.connect("bob"), PREFS)
        await h.store.delete_user(ALICE)
        # A new account of the same name neither sees nor pays for the old items.
        await h.store.add_user(ALICE, "new-password")
        alice = h.connect("alice", "new")
        assert len(await fetch(h, alice, "<storage xmlns='storage:bookmarks'/>")) == 0
        big = "<big xmlns='urn:x'>" + "x" * (300 - 25) + "</big>"
        assert len(as_stored(big)) == 300
        assert (await store(h, alice, big)).get("type") == "result"
        # account.delete made the view forget the old items at once.
        assert list(storage.view.items(ALICE)) == ["{urn:x}big"]
        # Stored again, then deleted with the account before a snapshot.
        await store(h, alice, BOOKMARKS)
        await h.store.delete_user(ALICE)
        await h.store.snapshot()
        await h.store.delete_user(f"bob@{DOMAIN}")
    async with private_node(tmp_path) as (h, storage):
        # alice's dropped restoring the snapshot, bob's replaying the log after it.
        assert storage.view.items(ALICE) == {}
        assert storage.view.items(f"bob@{DOMAIN}") == {}


async def test_records_are_checked_before_writing_and_when_applied(tmp_path: Path) -> None:
    async with private_node(tmp_path) as (h, _):
        before = h.store.log.last_index
        for body in (
            {"u": ALICE, "id": "x"},
            {"u": ALICE, "id": "x", "s": b"no"},
            {"id": "x", "s": {}},
        ):
            with pytest.raises(StateError):
                await h.store.commit(Record(PRIVATE_SET, dict(body)))
        assert h.store.log.last_index == before

    def unsealing_to(plaintext: bytes) -> Unseal:
        def unseal(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
            return plaintext

        return unseal

    view = PrivateView()
    body = {"u": ALICE, "id": "r1", "s": {}}
    for plaintext in (b"\xc1", b"junk", pack_item("{urn:x}a", b"x")[:-1], b"\x93\xa1a\xa1b\xa1c"):
        with pytest.raises(StateError, match="malformed"):
            view.apply(PRIVATE_SET, body, unsealing_to(plaintext))
    with pytest.raises(StateError, match=r"not \[tag, bytes\]"):
        view.apply(PRIVATE_SET, body, unsealing_to(b"\x92\xa1a\xa1b"))

    def shredded(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        raise ShreddedError(user)

    view.restore([[ALICE, "r1", {}]], shredded)
    assert view.to_snapshot() == []


def test_stored_xml_round_trips_and_refuses_fragments() -> None:
    fragment = parse_stanza(f"<iq type='set' id='x'>{PREFS}</iq>".encode())[0]
    data = element_bytes(fragment)
    assert data.startswith(b"<prefs xmlns='urn:example:quokka-prefs' theme='dark'>")
    assert element_bytes(element_from_bytes(data)) == data
    with pytest.raises(ValueError, match="not one complete element"):
        element_from_bytes(data[:-1])
