"""XEP-0054 vcard-temp on the in-process harness: own and other users' vCards, limits, and
what the store keeps (sealed, durable, snapshotted, gone with the account)."""

from __future__ import annotations

import base64
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

from tests.im.harness import DOMAIN, im_harness, parse_stanza
from villaged.im import vcard
from villaged.im.private import element_bytes
from villaged.im.vcard import VCARD, VCARD_SET, VCards, VCardView
from villaged.storage.records import Record
from villaged.storage.state import StateError

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness

ERR = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
PHOTO = base64.b64encode(bytes(range(256)) * 64).decode()  # 16 KiB of "image"
ALICE_VCARD = f"""<vCard xmlns='vcard-temp' version='3.0'>
    <FN>Alice Quokka-Marker</FN>
    <N><FAMILY>Liddell</FAMILY><GIVEN>Alice</GIVEN><MIDDLE/></N>
    <NICKNAME>al &amp; &lt;ice&gt; ✓</NICKNAME>
    <EMAIL><INTERNET/><PREF/><USERID>alice@example.org</USERID></EMAIL>
    <PHOTO><TYPE>image/png</TYPE><BINVAL>{PHOTO}</BINVAL></PHOTO>
    <X-EXT xmlns='urn:example:ext' xml:lang='en'>extension data</X-EXT>
  </vCard>"""


@asynccontextmanager
async def vcard_node(
    tmp_path: Path, *, max_bytes: int = vcard.MAX_VCARD_BYTES
) -> AsyncIterator[tuple[ImHarness, VCards]]:
    view = VCardView()
    async with im_harness(tmp_path, views=[view]) as h:
        yield h, vcard.register(h.ctx, view, max_bytes=max_bytes)


def condition(reply: ET.Element) -> str:
    assert reply.get("type") == "error", reply.attrib
    error = reply.find("{jabber:client}error")
    assert error is not None
    names = [
        child.tag for child in error if child.tag.startswith(ERR) and child.tag != ERR + "text"
    ]
    assert len(names) == 1, names
    return names[0][len(ERR) :]


def sent_vcard(vcard_xml: str) -> bytes:
    """The vCard as the server received it inside an iq, serialized the way it is stored."""
    return element_bytes(parse_stanza(f"<iq type='set' id='x'>{vcard_xml}</iq>".encode())[0])


async def get_own(h: ImHarness, client: FakeClient) -> ET.Element:
    await h.send(client, "<iq type='get' id='g'><vCard xmlns='vcard-temp'/></iq>")
    reply = client.only()
    assert reply.get("type") == "result"
    assert len(reply) == 1
    assert reply[0].tag == VCARD
    return reply[0]


async def set_own(h: ImHarness, client: FakeClient, vcard_xml: str) -> ET.Element:
    await h.send(client, f"<iq type='set' id='s'>{vcard_xml}</iq>")
    return client.only()


async def test_own_vcard_starts_empty_and_is_replaced_by_each_set(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        empty = await get_own(h, alice)
        assert len(empty) == 0
        assert not empty.attrib

        reply = await set_own(h, alice, ALICE_VCARD)
        assert reply.get("type") == "result"
        assert reply.get("id") == "s"
        assert len(reply) == 0
        assert element_bytes(await get_own(h, alice)) == sent_vcard(ALICE_VCARD)

        replacement = "<vCard xmlns='vcard-temp'><FN>Just Alice</FN></vCard>"
        assert (await set_own(h, alice, replacement)).get("type") == "result"
        got = await get_own(h, alice)
        assert got.findtext("{vcard-temp}FN") == "Just Alice"
        assert got.find("{vcard-temp}PHOTO") is None

        # Addressed to one's own bare JID is the same as no 'to'.
        await h.send(
            alice, "<iq type='get' id='b' to='alice@example.org'><vCard xmlns='vcard-temp'/></iq>"
        )
        assert alice.only().findtext("{vcard-temp}vCard/{vcard-temp}FN") == "Just Alice"


async def test_other_users_read_a_vcard_but_cannot_set_it(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        alice, bob = h.connect("alice"), h.connect("bob")
        await set_own(h, alice, ALICE_VCARD)

        await h.send(
            bob, "<iq type='get' id='v3' to='alice@example.org'><vCard xmlns='vcard-temp'/></iq>"
        )
        reply = bob.only()
        assert reply.get("type") == "result"
        assert reply.get("from") == f"alice@{DOMAIN}"
        assert reply.get("to") == f"bob@{DOMAIN}/r"
        assert element_bytes(reply[0]) == sent_vcard(ALICE_VCARD)
        assert alice.take() == []  # answered by the server, never forwarded (XEP-0054 §3.3)

        await h.send(
            bob,
            "<iq type='set' id='v4' to='alice@example.org'>"
            "<vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard></iq>",
        )
        assert condition(bob.only()) == "forbidden"
        assert element_bytes(await get_own(h, alice)) == sent_vcard(ALICE_VCARD)


async def test_no_vcard_and_no_account_get_the_same_error(tmp_path: Path) -> None:
    # XEP-0054 §3.3: the same condition for both, so vCard probes do not reveal accounts.
    async with vcard_node(tmp_path) as (h, _):
        bob = h.connect("bob")
        for target in ("carol@example.org", "nobody@example.org"):
            await h.send(
                bob, f"<iq type='get' id='v' to='{target}'><vCard xmlns='vcard-temp'/></iq>"
            )
            assert condition(bob.only()) == "service-unavailable"


async def test_only_the_vcard_element_is_understood(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        for to in ("", " to='alice@example.org'", " to='bob@example.org'"):
            for iq_type in ("get", "set"):
                await h.send(
                    alice, f"<iq type='{iq_type}' id='w'{to}><vcard xmlns='vcard-temp'/></iq>"
                )
                assert condition(alice.only()) == "bad-request"


async def test_clearing_a_vcard_removes_it(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, vcards):
        alice, bob = h.connect("alice"), h.connect("bob")
        before = h.store.log.last_index
        # Clearing what is not there writes nothing.
        reply = await set_own(h, alice, "<vCard xmlns='vcard-temp'>\n  </vCard>")
        assert reply.get("type") == "result"
        assert h.store.log.last_index == before

        await set_own(h, alice, "<vCard xmlns='vcard-temp'><FN>A</FN></vCard>")
        assert len(vcards.view) == 1
        assert (await set_own(h, alice, "<vCard xmlns='vcard-temp'/>")).get("type") == "result"
        assert h.store.log.last_index == before + 2
        assert len(vcards.view) == 0
        assert len(await get_own(h, alice)) == 0
        await h.send(
            bob, "<iq type='get' id='v' to='alice@example.org'><vCard xmlns='vcard-temp'/></iq>"
        )
        assert condition(bob.only()) == "service-unavailable"

        # A vCard with only attributes is not empty: it is kept as sent.
        await set_own(h, alice, "<vCard xmlns='vcard-temp' version='3.0'/>")
        assert (await get_own(h, alice)).get("version") == "3.0"


def vcard_of_size(size: int) -> str:
    frame = "<vCard xmlns='vcard-temp'><FN></FN></vCard>"
    vcard_xml = f"<vCard xmlns='vcard-temp'><FN>{'x' * (size - len(frame))}</FN></vCard>"
    assert len(sent_vcard(vcard_xml)) == size
    return vcard_xml


async def test_size_limit(tmp_path: Path) -> None:
    async with vcard_node(tmp_path, max_bytes=200) as (h, _):
        alice = h.connect("alice")
        assert (await set_own(h, alice, vcard_of_size(200))).get("type") == "result"
        before = h.store.log.last_index
        reply = await set_own(h, alice, vcard_of_size(201))
        assert condition(reply) == "not-acceptable"
        assert reply.findtext(f".//{ERR}text") == (
            "the vCard is 201 bytes; this server keeps at most 200"
        )
        assert h.store.log.last_index == before
        assert element_bytes(await get_own(h, alice)) == sent_vcard(vcard_of_size(200))


async def test_a_limit_the_log_cannot_hold_is_refused(tmp_path: Path) -> None:
    view = VCardView()
    async with im_harness(tmp_path, views=[view]) as h:
        with pytest.raises(ValueError, match="max_record_bytes"):
            vcard.register(h.ctx, view, max_bytes=h.store.options.max_record_bytes)


async def test_server_disco_lists_vcard_temp(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        query = "<query xmlns='http://jabber.org/protocol/disco#info'/>"
        await h.send(alice, f"<iq type='get' id='d' to='example.org'>{query}</iq>")
        features = {
            f.get("var")
            for f in alice.only().iter("{http://jabber.org/protocol/disco#info}feature")
        }
        assert "vcard-temp" in features


async def test_vcards_survive_a_restart_and_a_snapshot(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        await set_own(h, h.connect("alice"), ALICE_VCARD)
    async with vcard_node(tmp_path) as (h, vcards):  # replayed from the log
        assert len(vcards.view) == 1
        assert element_bytes(await get_own(h, h.connect("alice"))) == sent_vcard(ALICE_VCARD)
        await set_own(h, h.connect("bob"), "<vCard xmlns='vcard-temp'><FN>Bob</FN></vCard>")
        await set_own(h, h.connect("carol"), "<vCard xmlns='vcard-temp'><FN>Carol</FN></vCard>")
        await set_own(h, h.connect("carol"), "<vCard xmlns='vcard-temp'/>")
        await h.store.snapshot()
        snapshot = h.store.log.latest_snapshot()
        assert snapshot is not None
        assert snapshot.index == h.store.log.last_index
    async with vcard_node(tmp_path) as (h, vcards):  # restored from the snapshot alone
        assert len(vcards.view) == 2
        assert element_bytes(await get_own(h, h.connect("alice"))) == sent_vcard(ALICE_VCARD)
        assert (await get_own(h, h.connect("bob"))).findtext("{vcard-temp}FN") == "Bob"
        assert len(await get_own(h, h.connect("carol"))) == 0


async def test_no_plaintext_reaches_the_disk(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        alice = h.connect("alice")
        await set_own(h, alice, ALICE_VCARD)
        await h.store.snapshot()
        await set_own(h, alice, ALICE_VCARD.replace("Alice Quokka", "Alicia Quokka"))
        assert (await get_own(h, alice)).findtext("{vcard-temp}FN") == "Alicia Quokka-Marker"
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.parent.name == "log" and p.stat().st_size > 2 * len(PHOTO) for p in files)
    secrets = [b"Quokka-Marker", PHOTO[:64].encode(), b"Liddell", b"urn:example:ext"]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, (path, secret)


async def test_a_deleted_accounts_vcard_goes_with_it(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, vcards):
        alice = h.connect("alice")
        await set_own(h, h.connect("bob"), "<vCard xmlns='vcard-temp'><FN>Bob</FN></vCard>")
        await set_own(h, h.connect("carol"), "<vCard xmlns='vcard-temp'><FN>Carol</FN></vCard>")
        await h.store.delete_user(f"bob@{DOMAIN}")
        await h.send(
            alice, "<iq type='get' id='v' to='bob@example.org'><vCard xmlns='vcard-temp'/></iq>"
        )
        assert condition(alice.only()) == "service-unavailable"  # the router: no such account

        # A new account of the same name does not inherit the old vCard.
        await h.store.add_user(f"bob@{DOMAIN}", "new-password")
        assert len(await get_own(h, h.connect("bob", "new"))) == 0
        await h.send(
            alice, "<iq type='get' id='v' to='bob@example.org'><vCard xmlns='vcard-temp'/></iq>"
        )
        assert condition(alice.only()) == "service-unavailable"
        assert len(vcards.view) == 1  # forgotten when account.delete was applied
        await h.store.snapshot()
        await h.store.delete_user(f"carol@{DOMAIN}")
    async with vcard_node(tmp_path) as (h, vcards):
        # bob's was dropped restoring the snapshot, carol's replaying the log after it.
        assert len(vcards.view) == 0
        assert vcards.view.get(f"bob@{DOMAIN}") is None


async def test_records_without_a_sealed_vcard_are_refused_before_writing(tmp_path: Path) -> None:
    async with vcard_node(tmp_path) as (h, _):
        before = h.store.log.last_index
        for body in (
            {"u": f"alice@{DOMAIN}", "id": "x"},
            {"u": f"alice@{DOMAIN}", "id": "x", "s": "no"},
            {"id": "x", "s": {}},
        ):
            with pytest.raises(StateError):
                await h.store.commit(Record(VCARD_SET, dict(body)))
        assert h.store.log.last_index == before
