"""XEP-0313 archive queries (forms, XEP-0059 paging, #extended fields, metadata), XEP-0441
preferences, retention, and XEP-0082 timestamps."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import pytest

from tests.im.test_messages import (
    ALICE,
    BOB,
    CAROL,
    CLIENT,
    archive_ids,
    chat,
    condition,
    entries,
    messaging,
    online,
    stanza_ids,
)
from villaged.im.mam import (
    NS_DELAY,
    NS_FORWARD,
    NS_MAM,
    NS_MAM_EXTENDED,
    NS_RSM,
    NS_SID,
    ArchivePrefs,
    format_stamp,
    pack_payload,
    parse_stamp,
    unpack_stanza,
    unpack_with,
)
from villaged.im.messages import MessageStoreView
from villaged.storage.state import StateError

if TYPE_CHECKING:
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness
    from villaged.xmpp.jid import JID

MAM = f"{{{NS_MAM}}}"
RSM = f"{{{NS_RSM}}}"
T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z, where the tests' clock starts


@dataclass
class Answer:
    results: list[ET.Element]
    iq: ET.Element

    @property
    def ids(self) -> list[str | None]:
        return [r.findall(f"{MAM}result")[0].get("id") for r in self.results]

    @property
    def bodies(self) -> list[str | None]:
        return [
            r.findtext(f"{MAM}result/{{{NS_FORWARD}}}forwarded/{CLIENT}message/{CLIENT}body")
            for r in self.results
        ]

    @property
    def complete(self) -> str | None:
        return self.fin.get("complete")

    @property
    def fin(self) -> ET.Element:
        fin = self.iq.find(f"{MAM}fin")
        assert fin is not None, self.iq
        return fin

    def rsm(self, name: str) -> str | None:
        return self.fin.findtext(f"{RSM}set/{RSM}{name}")

    @property
    def first_index(self) -> str | None:
        return self.fin.findall(f"{RSM}set/{RSM}first")[0].get("index")


def form(**fields: str | list[str]) -> str:
    parts = [f"<field var='FORM_TYPE' type='hidden'><value>{NS_MAM}</value></field>"]
    for var, value in fields.items():
        values = value if isinstance(value, list) else [value]
        inner = "".join(f"<value>{v}</value>" for v in values)
        parts.append(f"<field var='{var.replace('_', '-')}'>{inner}</field>")
    return f"<x xmlns='jabber:x:data' type='submit'>{''.join(parts)}</x>"


def rsm(**elements: str | int) -> str:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in elements.items())
    return f"<set xmlns='{NS_RSM}'>{inner}</set>"


async def ask(h: ImHarness, client: FakeClient, payload: str = "", attrs: str = "") -> Answer:
    await h.send(
        client,
        f"<iq type='set' id='q'{attrs}><query xmlns='{NS_MAM}' queryid='f1'>{payload}</query></iq>",
    )
    got = client.take()
    assert got, "no answer"
    return Answer(got[:-1], got[-1])


async def refused(h: ImHarness, client: FakeClient, payload: str) -> str:
    answer = await ask(h, client, payload)
    assert answer.results == []
    assert answer.iq.get("type") == "error"
    return condition(answer.iq)


async def alice_sends(h: ImHarness, alice: FakeClient, count: int, to: str = BOB) -> None:
    for n in range(count):
        await h.send(alice, chat(to, f"m{n}"))


# ----- results and paging --------------------------------------------------------------------


async def test_result_format(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, chat(BOB, "hello &lt;&amp;&gt;", "<thread>t1</thread>"))
        answer = await ask(h, alice, attrs=f" to='{ALICE}'")
        [result] = answer.results
        assert result.get("to") == f"{ALICE}/r"
        assert result.get("from") == ALICE  # the archive answers, as the iq was addressed
        inner = result.find(f"{MAM}result")
        assert inner is not None
        assert inner.get("queryid") == "f1"
        [entry] = entries(messages, ALICE)
        assert inner.get("id") == entry.id
        delay = inner.find(f"{{{NS_FORWARD}}}forwarded/{{{NS_DELAY}}}delay")
        assert delay is not None
        assert delay.get("stamp") == format_stamp(entry.stamp) == "2023-11-14T22:13:20.000Z"
        original = inner.find(f"{{{NS_FORWARD}}}forwarded/{CLIENT}message")
        assert original is not None
        assert original.get("from") == f"{ALICE}/r"
        assert original.get("to") == BOB
        assert original.findtext(f"{CLIENT}body") == "hello <&>"
        assert original.findtext(f"{CLIENT}thread") == "t1"
        # The sender's archive copy carries the sender's own stanza-id.
        assert stanza_ids(original) == [(ALICE, entry.id)]
        assert answer.iq.get("type") == "result"
        assert answer.iq.get("from") == ALICE
        assert answer.complete == "true"
        assert answer.rsm("first") == answer.rsm("last") == entry.id
        assert answer.rsm("count") == "1"
        answer = await ask(h, alice)  # no 'to': the results carry no 'from' either
        assert answer.results[0].get("from") is None


async def test_paging_120_messages_by_50(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 120)
        expected = archive_ids(messages, BOB)
        bob = await online(h, "bob", "pager")
        pages: list[Answer] = []
        after = ""
        while True:
            page = await ask(h, bob, rsm(max=50, **({"after": after} if after else {})))
            pages.append(page)
            if page.complete == "true":
                break
            after = page.ids[-1] or ""
        assert [len(p.ids) for p in pages] == [50, 50, 20]
        assert [p.complete for p in pages] == ["false", "false", "true"]
        assert [i for p in pages for i in p.ids] == expected  # no duplicate, no gap, in order
        assert [p.first_index for p in pages] == ["0", "50", "100"]
        assert {p.rsm("count") for p in pages} == {"120"}
        assert pages[0].bodies[:2] == ["m0", "m1"]

        # Backwards from the end, as infinite scrollback does.
        back: list[Answer] = [await ask(h, bob, rsm(max=50, before=""))]
        while back[-1].complete != "true":
            back.append(await ask(h, bob, rsm(max=50, before=back[-1].ids[0] or "")))
        assert [len(p.ids) for p in back] == [50, 50, 20]
        assert [i for p in reversed(back) for i in p.ids] == expected
        assert back[0].bodies[-1] == "m119"  # pages stay in chronological order
        assert back[0].first_index == "70"


async def test_default_and_maximum_page_sizes(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 60)
        assert len((await ask(h, alice)).ids) == 50
        answer = await ask(h, alice, rsm(max=10_000))  # clamped, still all 60 here
        assert len(answer.ids) == 60
        assert answer.complete == "true"
        counted = await ask(h, alice, rsm(max=0))
        assert counted.results == []
        assert counted.rsm("count") == "60"
        assert counted.rsm("first") is None
        assert counted.complete == "false"
        both = await ask(
            h,
            alice,
            rsm(after=archive_ids(messages, ALICE)[10], before=archive_ids(messages, ALICE)[14]),
        )
        assert both.bodies == ["m11", "m12", "m13"]


async def test_empty_archive(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        carol = await online(h, "carol")
        answer = await ask(h, carol)
        assert answer.results == []
        assert answer.complete == "true"
        assert answer.rsm("count") == "0"
        assert (await ask(h, carol, rsm(before=""))).complete == "true"


async def test_unknown_ids_are_item_not_found(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 2)
        bobs = archive_ids(messages, BOB)
        for payload in (
            rsm(after="nope"),
            rsm(before="nope"),
            rsm(after=bobs[0]),  # another archive's id is unknown in this one
            form(after_id="nope"),
            form(before_id="nope"),
            form(ids=["nope"]),
        ):
            assert await refused(h, alice, payload) == "item-not-found"
        carol = await online(h, "carol")
        assert await refused(h, carol, rsm(after="x")) == "item-not-found"


async def test_filters(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        bob = await online(h, "bob", "desk")
        await h.send(alice, chat(BOB, "a→b"))  # T0
        await h.send(bob, chat(ALICE, "b→a"))  # T0 + 1 ms
        await h.send(alice, chat(CAROL, "a→c"))  # T0 + 2 ms
        await h.send(alice, "<message type='chat'><body>a→a</body></message>")  # T0 + 3 ms
        await h.send(alice, chat(f"{BOB}/desk", "a→b/desk"))  # T0 + 4 ms
        alice.take()

        async def bodies(**fields: str | list[str]) -> list[str | None]:
            return (await ask(h, alice, form(**fields))).bodies

        assert await bodies(**{"with": BOB}) == ["a→b", "b→a", "a→b/desk"]
        assert await bodies(**{"with": f"{BOB}/desk"}) == ["b→a", "a→b/desk"]
        assert await bodies(**{"with": CAROL}) == ["a→c"]
        assert await bodies(**{"with": ALICE}) == ["a→a"]  # only messages to oneself
        assert await bodies(**{"with": "nobody@elsewhere.org"}) == []
        assert await bodies(start=format_stamp(T0 + 2_000)) == ["a→c", "a→a", "a→b/desk"]
        assert await bodies(end=format_stamp(T0 + 1_000)) == ["a→b", "b→a"]
        assert await bodies(
            start="2023-11-14T23:13:20.001+01:00", end=format_stamp(T0 + 2_000)
        ) == [
            "b→a",
            "a→c",
        ]
        assert await bodies(start=format_stamp(T0 + 9_000)) == []
        everything = ["a→b", "b→a", "a→c", "a→a", "a→b/desk"]
        assert await bodies(start="", end="") == everything
        assert await bodies(ids=[""]) == everything
        ids = archive_ids(messages, ALICE)
        assert await bodies(after_id=ids[0], before_id=ids[3]) == ["b→a", "a→c"]
        assert await bodies(ids=[ids[4], ids[1], ""]) == ["b→a", "a→b/desk"]
        flipped = await ask(h, alice, f"{form(**{'with': BOB})}<flip-page/>")
        assert flipped.bodies == ["a→b/desk", "b→a", "a→b"]
        assert flipped.rsm("first") == ids[0]  # flipping changes only the sending order


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("<x xmlns='jabber:x:data' type='form'/>", "bad-request"),
        (
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
            "<value>urn:xmpp:mam:1</value></field></x>",
            "bad-request",
        ),
        (form(start="yesterday"), "bad-request"),
        (form(start="2010-06-07"), "bad-request"),
        (form(start="2010-06-07T00:00:00"), "bad-request"),
        (form(start="2010-13-07T00:00:00Z"), "bad-request"),
        (form(start="2010-06-07T00:00:00+24:00"), "bad-request"),
        (form(end=["2010-06-07T00:00:00Z", "2010-06-08T00:00:00Z"]), "bad-request"),
        (form(**{"with": "@bad"}), "jid-malformed"),
        (form(**{"{urn:example}free-text": "x"}), "feature-not-implemented"),
        (form(ids=[str(n) for n in range(251)]), "policy-violation"),
        (rsm(max="many"), "bad-request"),
        (rsm(max=-1), "bad-request"),
        ("<set xmlns='http://jabber.org/protocol/rsm'><after/></set>", "bad-request"),
        (rsm(index=3), "feature-not-implemented"),
    ],
)
async def test_bad_queries(tmp_path: Path, payload: str, expected: str) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        assert await refused(h, alice, payload) == expected


async def test_other_requests(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        await h.send(alice, f"<iq type='set' id='n'><query xmlns='{NS_MAM}' node='x'/></iq>")
        assert condition(alice.only()) == "item-not-found"
        await h.send(alice, f"<iq type='set' id='m'><metadata xmlns='{NS_MAM}'/></iq>")
        assert condition(alice.only()) == "bad-request"
        await h.send(alice, f"<iq type='get' id='u'><unknown xmlns='{NS_MAM}'/></iq>")
        assert condition(alice.only()) == "feature-not-implemented"
        await h.send(alice, f"<iq type='get' id='f'><query xmlns='{NS_MAM}'/></iq>")
        reply = alice.only()
        fields = {f.get("var"): f.get("type") for f in reply.iter("{jabber:x:data}field")}
        assert fields == {
            "FORM_TYPE": "hidden",
            "with": "jid-single",
            "start": "text-single",
            "end": "text-single",
            "after-id": "text-single",
            "before-id": "text-single",
            "ids": "text-multi",
        }
        await h.send(
            alice,
            "<iq type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        )
        features = {f.get("var") for f in alice.only().iter() if f.tag.endswith("feature")}
        assert {NS_MAM, NS_MAM_EXTENDED, NS_SID} <= features


async def test_metadata(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, f"<iq type='get' id='m'><metadata xmlns='{NS_MAM}'/></iq>")
        metadata = alice.only().find(f"{MAM}metadata")
        assert metadata is not None
        assert len(metadata) == 0
        await alice_sends(h, alice, 3)
        await h.send(alice, f"<iq type='get' id='m'><metadata xmlns='{NS_MAM}'/></iq>")
        metadata = alice.only().find(f"{MAM}metadata")
        assert metadata is not None
        ids = archive_ids(messages, ALICE)
        start, end = metadata.find(f"{MAM}start"), metadata.find(f"{MAM}end")
        assert start is not None
        assert end is not None
        assert (start.get("id"), start.get("timestamp")) == (ids[0], format_stamp(T0))
        assert (end.get("id"), end.get("timestamp")) == (ids[2], format_stamp(T0 + 2_000))


async def test_unreadable_entry_keeps_its_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 2)
        archive = messages.view.archives.of(ALICE)
        assert archive is not None
        good = archive.entries[1]
        # Moved under another record id, the envelope no longer authenticates.
        archive.append("odd", good.stamp, BOB, "moved", good.sealed, None)
        with caplog.at_level(logging.ERROR, "villaged.im.mam"):
            answer = await ask(h, alice)
        assert answer.bodies == ["m0", "m1", None]
        assert answer.ids[-1] == "odd"
        assert [getattr(r, "event", None) for r in caplog.records] == ["mam.unreadable"]


async def test_a_session_that_stops_reading_gets_no_more_results(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 5)
        handed: list[ET.Element] = []
        deliver = alice.session.enqueue

        def enqueue(stanza: ET.Element) -> bool:
            handed.append(stanza)
            return len(handed) < 3 and deliver(stanza)

        alice.session.enqueue = enqueue
        await h.send(alice, f"<iq type='set' id='q'><query xmlns='{NS_MAM}'/></iq>")
        assert len(handed) == 4  # two results, the refused third, then the iq result
        assert alice.terminated is not None


# ----- retention and ordering ----------------------------------------------------------------


async def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    async with messaging(tmp_path, archive_keep=5) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 3)
        first = archive_ids(messages, ALICE)[0]
        await alice_sends(h, alice, 5)
        assert (await ask(h, alice)).bodies == ["m0", "m1", "m2", "m3", "m4"]
        assert await refused(h, alice, rsm(after=first)) == "item-not-found"
    async with messaging(tmp_path, archive_keep=100) as (h, messages):
        # The bound travels in the records: replay gives the same archive.
        assert len(archive_ids(messages, ALICE)) == 5


async def test_order_is_arrival_order_even_if_the_clock_steps_back(tmp_path: Path) -> None:
    stamps = iter([T0 + 5_000, T0, T0 + 1_000])
    async with messaging(tmp_path, clock=lambda: next(stamps)) as (h, messages):
        alice = await online(h, "alice")
        await alice_sends(h, alice, 3)
        archive = messages.view.archives.of(ALICE)
        assert archive is not None
        assert [e.stamp for e in archive.entries] == [T0 + 5_000] * 3
        answer = await ask(h, alice, form(start=format_stamp(T0 + 5_000)))
        assert answer.bodies == ["m0", "m1", "m2"]


# ----- preferences ---------------------------------------------------------------------------


async def set_prefs(
    h: ImHarness, client: FakeClient, default: str, always: str = "", never: str = ""
) -> ET.Element:
    lists = ""
    if always:
        lists += f"<always><jid>{always}</jid></always>"
    if never:
        lists += f"<never><jid>{never}</jid></never>"
    await h.send(
        client,
        f"<iq type='set' id='p'><prefs xmlns='{NS_MAM}' default='{default}'>{lists}</prefs></iq>",
    )
    return client.only()


async def test_prefs_get_set_and_effect(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        await h.send(alice, f"<iq type='get' id='g'><prefs xmlns='{NS_MAM}'/></iq>")
        prefs = alice.only().find(f"{MAM}prefs")
        assert prefs is not None
        assert prefs.get("default") == "always"
        assert [c.tag for c in prefs] == [f"{MAM}always", f"{MAM}never"]

        reply = await set_prefs(h, alice, "never", always=f"{CAROL}/Phone")
        stored = reply.find(f"{MAM}prefs")
        assert stored is not None
        assert stored.get("default") == "never"
        assert stored.findtext(f"{MAM}always/{MAM}jid") == f"{CAROL}/Phone"
        await h.send(alice, chat(BOB, "not archived for alice"))
        assert archive_ids(messages, ALICE) == []
        assert len(archive_ids(messages, BOB)) == 1  # Bob's preferences are his own
        bob.take()

        await set_prefs(h, bob, "always", never=ALICE)
        await h.send(alice, chat(BOB, "nowhere"))
        assert stanza_ids(bob.only()) == []
        assert len(archive_ids(messages, BOB)) == 1

        carol = await online(h, "carol", "Phone")
        await h.send(alice, chat(f"{CAROL}/Phone", "kept"))  # full JID on the always list
        await h.send(carol, chat(ALICE, "also kept"))  # from the full JID on the list
        assert len(archive_ids(messages, ALICE)) == 2
    async with messaging(tmp_path) as (h, messages):
        assert messages.view.prefs.get(ALICE).default == "never"
        assert messages.view.prefs.get(BOB).never == frozenset({ALICE})


async def test_roster_default(tmp_path: Path) -> None:
    asked: list[tuple[JID, JID]] = []

    def in_roster(user: JID, contact: JID) -> bool:
        asked.append((user, contact))
        return str(contact) == CAROL

    async with messaging(tmp_path, in_roster=in_roster) as (h, messages):
        alice = await online(h, "alice")
        await set_prefs(h, alice, "roster")
        await h.send(alice, chat(BOB, "stranger"))
        await h.send(alice, chat(f"{CAROL}/x", "contact"))
        assert len(archive_ids(messages, ALICE)) == 1
        assert [(str(u), str(c)) for u, c in asked] == [(ALICE, BOB), (ALICE, CAROL)]
    async with messaging(tmp_path) as (h, messages):
        # Without roster knowledge, 'roster' reads as 'always'.
        alice = await online(h, "alice")
        await h.send(alice, chat(BOB, "stranger"))
        assert len(archive_ids(messages, ALICE)) == 2


@pytest.mark.parametrize(
    ("prefs", "expected"),
    [
        (f"<prefs xmlns='{NS_MAM}'/>", "bad-request"),
        (f"<prefs xmlns='{NS_MAM}' default='sometimes'/>", "bad-request"),
        (
            f"<prefs xmlns='{NS_MAM}' default='always'><never><jid>@x</jid></never></prefs>",
            "jid-malformed",
        ),
        (
            f"<prefs xmlns='{NS_MAM}' default='always'><always>"
            + "".join(f"<jid>u{n}@example.org</jid>" for n in range(1001))
            + "</always></prefs>",
            "not-acceptable",
        ),
    ],
)
async def test_bad_prefs(tmp_path: Path, prefs: str, expected: str) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        await h.send(alice, f"<iq type='set' id='p'>{prefs}</iq>")
        assert condition(alice.only()) == expected
        assert messages.view.prefs.get(ALICE) == ArchivePrefs()


def test_prefs_matching() -> None:
    from villaged.xmpp.jid import JID

    prefs = ArchivePrefs("always", frozenset({BOB}), frozenset({BOB, f"{CAROL}/x"}))
    assert not prefs.allows(JID.parse(f"{BOB}/any"), lambda: True)  # 'never' wins
    assert not prefs.allows(JID.parse(f"{CAROL}/x"), lambda: True)
    assert prefs.allows(JID.parse(f"{CAROL}/y"), lambda: False)
    assert not ArchivePrefs("never").allows(JID.parse(CAROL), lambda: True)
    assert not ArchivePrefs("roster").allows(JID.parse(CAROL), lambda: False)
    assert ArchivePrefs.unpack(prefs.pack()) == prefs


@pytest.mark.parametrize("data", [b"\xc1", b"\x80", b"\x83\xa1d\xa1x\xa1a\x90\xa1n\x90"])
def test_malformed_stored_prefs(data: bytes) -> None:
    with pytest.raises(StateError):
        ArchivePrefs.unpack(data)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb({"w": "x"}),
        msgpack.packb({"w": 1, "x": b"<message/>"}),
        msgpack.packb({"w": "x", "x": b"<message"}),
        msgpack.packb({"w": "x", "x": b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"}),
    ],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(StateError):
        unpack_stanza(payload)


def test_payload_round_trip() -> None:
    stanza = ET.Element(f"{CLIENT}message", {"to": BOB})
    ET.SubElement(stanza, f"{CLIENT}body").text = "<&>"
    packed = pack_payload(ALICE, stanza)
    assert unpack_with(packed) == ALICE
    back = unpack_stanza(packed)
    assert (back.tag, back.get("to"), back.findtext(f"{CLIENT}body")) == (stanza.tag, BOB, "<&>")


# ----- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14T22:13:20.5Z", T0 + 500_000),
        ("2023-11-14T22:13:20.123456789Z", T0 + 123_456),
        ("2023-11-14T23:13:20+01:00", T0),
        ("2023-11-14T21:43:20-00:30", T0),
        (" 2023-11-14T22:13:20Z ", T0),
    ],
)
def test_parse_stamp(text: str, micros: int) -> None:
    assert parse_stamp(text) == micros


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2023-11-14",
        "2023-11-14T22:13:20",
        "2023-11-14 22:13:20Z",
        "2023-02-30T00:00:00Z",
        "2023-11-14T22:13:60Z",
        "2023-11-14T22:13:20+01:60",
        "\uff12\uff10\uff12\uff13-11-14T22:13:20Z",  # fullwidth digits are not XEP-0082
    ],
)
def test_bad_stamps(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        parse_stamp(text)


def test_format_stamp() -> None:
    assert format_stamp(T0) == "2023-11-14T22:13:20.000Z"
    assert format_stamp(T0 + 1_500) == "2023-11-14T22:13:20.001500Z"
    assert parse_stamp(format_stamp(T0 + 1_500)) == T0 + 1_500


def test_archive_index_bookkeeping() -> None:
    view = MessageStoreView()
    view.archives.append(ALICE, "a", 1, BOB, "r", {}, 1)
    view.archives.append(ALICE, "a", 2, BOB, "r", {}, 1)  # a repeated id is ignored
    view.archives.append(ALICE, "b", 3, BOB, "r2", {}, 1)
    archive = view.archives.of(ALICE)
    assert archive is not None
    assert [e.id for e in archive.entries] == ["b"]
    view.archives.forget(ALICE)
    assert view.to_snapshot()["archive"] == {}


def test_snapshot_rows_are_bytes_and_older_unpacked_rows_still_restore() -> None:
    view = MessageStoreView()
    sealed = {"k": 7, "n": b"\0" * 12, "c": b"ciphertext"}
    view.archives.append(ALICE, "a", 1, BOB, "r1", sealed, None)
    view.archives.append(ALICE, "b", 0, BOB, "r2", sealed, None)  # stamp made non-decreasing
    rows = view.to_snapshot()["archive"][ALICE]
    assert [msgpack.unpackb(row) for row in rows] == [
        ["a", 1, "r1", sealed],
        ["b", 1, "r2", sealed],
    ]

    def unseal(rtype: str, user: str, record_id: str, envelope: object) -> bytes:
        assert envelope == sealed
        return pack_payload(f"{record_id}@example.org", ET.Element("message"))

    for stored in (rows, [msgpack.unpackb(row) for row in rows]):
        restored = MessageStoreView()
        restored.restore({"archive": {ALICE: stored}}, unseal)
        archive = restored.archives.of(ALICE)
        assert archive is not None
        assert [(e.id, e.stamp, e.with_full, e.sealed) for e in archive.entries] == [
            ("a", 1, "r1@example.org", sealed),
            ("b", 1, "r2@example.org", sealed),
        ]
