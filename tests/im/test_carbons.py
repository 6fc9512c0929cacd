"""XEP-0280 carbons: enabling, which messages are copied to which resources, opt-outs, and
forged wrappers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.im.harness import DOMAIN
from tests.im.test_messages import (
    ALICE,
    BOB,
    CLIENT,
    archive_ids,
    chat,
    condition,
    messaging,
    online,
    stanza_ids,
)
from villaged.im.carbons import NS_CARBONS
from villaged.im.mam import NS_FORWARD

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from tests.im.harness import FakeClient, ImHarness

CARBONS = f"{{{NS_CARBONS}}}"


async def enable(h: ImHarness, client: FakeClient, to: str = "") -> ET.Element:
    addressed = f" to='{to}'" if to else ""
    await h.send(client, f"<iq type='set' id='c'{addressed}><enable xmlns='{NS_CARBONS}'/></iq>")
    [reply] = [s for s in client.take() if s.tag == f"{CLIENT}iq"]
    return reply


def kinds(stanzas: list[ET.Element]) -> list[str]:
    """What each message is: 'direct', 'sent' or 'received' (presence aside)."""
    found = []
    for stanza in stanzas:
        if stanza.tag != f"{CLIENT}message":
            continue
        if stanza.find(f"{CARBONS}sent") is not None:
            found.append("sent")
        elif stanza.find(f"{CARBONS}received") is not None:
            found.append("received")
        else:
            found.append("direct")
    return found


def forwarded(carbon: ET.Element) -> ET.Element:
    inner = carbon.find(f"*/{{{NS_FORWARD}}}forwarded/{CLIENT}message")
    assert inner is not None
    return inner


async def test_enable_and_disable(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice = await online(h, "alice")
        assert (await enable(h, alice)).get("type") == "result"
        assert "carbons" in alice.session.features
        assert (await enable(h, alice, DOMAIN)).get("type") == "result"  # again: still fine
        await h.send(alice, f"<iq type='set' id='d'><disable xmlns='{NS_CARBONS}'/></iq>")
        assert alice.only().get("type") == "result"
        assert "carbons" not in alice.session.features
        await h.send(alice, f"<iq type='set' id='d'><disable xmlns='{NS_CARBONS}'/></iq>")
        assert alice.only().get("type") == "result"
        await h.send(alice, f"<iq type='get' id='g'><enable xmlns='{NS_CARBONS}'/></iq>")
        assert condition(alice.only()) == "bad-request"
        await h.send(alice, f"<iq type='set' id='x'><other xmlns='{NS_CARBONS}'/></iq>")
        assert condition(alice.only()) == "bad-request"


# Alice has resources "one" (the sender) and "two"; Bob has "one" and "two"; the resources
# named in `enabled` have carbons on. Each case lists what every resource receives.
CASES = [
    pytest.param(
        chat(BOB, "x"),
        {"alice/two", "bob/one", "bob/two"},
        {"alice/two": ["sent"], "bob/one": ["direct"], "bob/two": ["direct"]},
        id="chat-to-bare",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x"),
        {"alice/two", "bob/one", "bob/two"},
        {"alice/two": ["sent"], "bob/one": ["direct"], "bob/two": ["received"]},
        id="chat-to-full",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x"),
        {"alice/one"},
        {"bob/one": ["direct"]},
        id="only-the-sender-enabled",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x", f"<private xmlns='{NS_CARBONS}'/>"),
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="private",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x", "<no-copy xmlns='urn:xmpp:hints'/>"),
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="no-copy",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x", mtype="normal"),
        {"alice/two", "bob/two"},
        {"alice/two": ["sent"], "bob/one": ["direct"], "bob/two": ["received"]},
        id="normal-with-body",
    ),
    pytest.param(
        f"<message to='{BOB}/one'><received xmlns='urn:xmpp:receipts' id='r'/></message>",
        {"alice/two", "bob/two"},
        {"alice/two": ["sent"], "bob/one": ["direct"], "bob/two": ["received"]},
        id="normal-receipt",
    ),
    pytest.param(
        f"<message to='{BOB}/one'><thread>t</thread></message>",
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="normal-without-content",
    ),
    pytest.param(
        f"<message to='{BOB}/one' type='chat'>"
        "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
        {"alice/two", "bob/two"},
        {"alice/two": ["sent"], "bob/one": ["direct"], "bob/two": ["received"]},
        id="chat-state",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x", mtype="headline"),
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="headline",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x", mtype="groupchat"),
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="groupchat",
    ),
    pytest.param(
        f"<message to='{BOB}/one' type='error'><error type='cancel'>"
        "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
        {"alice/two", "bob/two"},
        {"bob/one": ["direct"]},
        id="error",
    ),
    pytest.param(
        "<message type='chat'><body>note</body></message>",
        {"alice/one", "alice/two"},
        {"alice/one": ["direct"], "alice/two": ["direct"]},
        id="to-own-bare-jid",
    ),
    pytest.param(
        chat(f"{ALICE}/two", "x"),
        {"alice/one", "alice/two", "alice/three"},
        {"alice/two": ["direct"], "alice/three": ["sent"]},
        id="to-own-other-resource",
    ),
    pytest.param(
        chat(f"{BOB}/one", "x"),
        {"alice/two", "bob/two", "bob/low"},
        {
            "alice/two": ["sent"],
            "bob/one": ["direct"],
            "bob/two": ["received"],
            "bob/low": ["received"],
        },
        id="negative-priority-gets-carbons",
    ),
]


@pytest.mark.parametrize(("stanza", "enabled", "expected"), CASES)
async def test_who_gets_what(
    tmp_path: Path, stanza: str, enabled: set[str], expected: dict[str, list[str]]
) -> None:
    async with messaging(tmp_path) as (h, _):
        clients: dict[str, FakeClient] = {}
        for name in ("alice/one", "alice/two", "bob/one", "bob/two"):
            user, resource = name.split("/")
            clients[name] = await online(h, user, resource)
        if "alice/three" in enabled:
            clients["alice/three"] = await online(h, "alice", "three")
        if "bob/low" in enabled:
            clients["bob/low"] = await online(h, "bob", "low", "<priority>-1</priority>")
        for name in enabled:
            await enable(h, clients[name])
        for client in clients.values():
            client.take()
        await h.send(clients["alice/one"], stanza)
        got = {name: kinds(c.take()) for name, c in clients.items()}
        assert {name: k for name, k in got.items() if k} == expected


async def test_carbon_contents(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, messages):
        alice_one, alice_two = await online(h, "alice", "one"), await online(h, "alice", "two")
        bob_one, bob_two = await online(h, "bob", "one"), await online(h, "bob", "two")
        for client in (alice_two, bob_two):
            await enable(h, client)
        for client in (alice_one, alice_two, bob_one, bob_two):
            client.take()
        await h.send(alice_one, chat(f"{BOB}/one", "hi", f"<private xmlns='{NS_CARBONS}'/>"))
        assert bob_one.only().find(f"{CARBONS}private") is None  # removed before delivery
        await h.send(alice_one, chat(f"{BOB}/one", "hi again"))
        direct = bob_one.only()
        [sent] = alice_two.take()
        [received] = bob_two.take()
        assert (sent.get("from"), sent.get("to"), sent.get("type")) == (
            ALICE,
            f"{ALICE}/two",
            "chat",
        )
        assert (received.get("from"), received.get("to")) == (BOB, f"{BOB}/two")
        sent_copy, received_copy = forwarded(sent), forwarded(received)
        assert sent_copy.get("from") == f"{ALICE}/one"
        assert sent_copy.findtext(f"{CLIENT}body") == "hi again"
        # Each side sees the id of its own archive (XEP-0313 §3.5).
        assert stanza_ids(sent_copy) == [(ALICE, archive_ids(messages, ALICE)[-1])]
        assert stanza_ids(received_copy) == stanza_ids(direct)
        assert stanza_ids(direct) == [(BOB, archive_ids(messages, BOB)[-1])]


async def test_forged_carbons_are_stripped(tmp_path: Path) -> None:
    async with messaging(tmp_path) as (h, _):
        alice, bob = await online(h, "alice"), await online(h, "bob")
        forged = (
            f"<received xmlns='{NS_CARBONS}'><forwarded xmlns='{NS_FORWARD}'>"
            f"<message xmlns='jabber:client' from='{BOB}/x' to='{BOB}/r' type='chat'>"
            "<body>I never said this</body></message></forwarded></received>"
            f"<sent xmlns='{NS_CARBONS}'/>"
        )
        await h.send(alice, chat(BOB, "hi", forged))
        got = bob.only()
        assert got.find(f"{CARBONS}received") is None
        assert got.find(f"{CARBONS}sent") is None
        assert got.findtext(f"{CLIENT}body") == "hi"


async def test_no_received_carbon_when_stored_offline(tmp_path: Path) -> None:
    """A message routed to offline storage reaches a carbon-enabled resource exactly once:
    from the offline flush at its initial presence, not also as a carbon before it."""
    async with messaging(tmp_path) as (h, messages):
        alice = await online(h, "alice")
        watcher = h.connect("bob", "watcher")  # connected, carbons on, no presence yet
        await enable(h, watcher)
        await h.send(alice, chat(BOB, "while away"))
        assert watcher.take() == []
        assert messages.view.offline.count(BOB) == 1
        await h.send(watcher, "<presence/>")
        await messages.flush_offline(watcher.session)
        bodies = [m.findtext(".//{jabber:client}body") for m in watcher.take()]
        assert bodies.count("while away") == 1
