"""What the federation tests share: a client inbox that keeps what arrived until a step asks for
it, the IM scenario every interop test runs (subscriptions both ways, presence, chat both ways,
the roster), and how villaged's log says a peer authenticated."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import Callable

    import pytest

    from tests.e2e.xmpp_client import TrioXmppClient
    from tests.net.rawclient import RawClient

STEP_S = 20.0
CLIENT = "{jabber:client}"


class Inbox:
    """Everything a raw client's stream delivered, kept until a test step asks for it
    (presence may arrive before the step that looks for it)."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.seen: list[ET.Element] = []

    async def wait(self, predicate: Callable[[ET.Element], bool]) -> ET.Element:
        with trio.fail_after(STEP_S):
            while True:
                for element in self.seen:
                    if predicate(element):
                        self.seen.remove(element)
                        return element
                self.seen.append(await self.raw.element(STEP_S))

    async def presence(self, sender: str, ptype: str | None = None) -> ET.Element:
        """A presence from ``sender`` (bare) of ``ptype`` (None: available)."""
        return await self.wait(
            lambda e: (
                e.tag == f"{CLIENT}presence"
                and e.get("from", "").split("/")[0] == sender
                and e.get("type") == ptype
            )
        )

    async def tagged(self, tag: str) -> ET.Element:
        return await self.wait(lambda element: element.tag == f"{CLIENT}{tag}")


async def subscribe_see_and_chat(
    vera: RawClient,
    inbox: Inbox,
    vera_jid: str,
    other: TrioXmppClient,
    other_jid: str,
    *,
    villaged_starts: bool,
) -> None:
    """The IM flow across two domains: ``vera`` (a raw client of villaged, resource "r", not
    yet available) and ``other`` (slixmpp, on the other server, available) subscribe to each
    other — the handshake started by villaged's user or by the other — see each other's
    presence, chat both ways, and villaged's roster ends with subscription "both"."""
    await vera.send(b"<presence/>")
    if villaged_starts:
        await vera.send(f"<presence to='{other_jid}' type='subscribe'/>".encode())
        with trio.fail_after(STEP_S):
            await other.wait_presence(lambda p: p.type == "subscribe" and p.from_ == vera_jid)
            await other.send_presence(to=vera_jid, type_="subscribed")
            await other.send_presence(to=vera_jid, type_="subscribe")
        await inbox.presence(other_jid, "subscribe")
        await vera.send(f"<presence to='{other_jid}' type='subscribed'/>".encode())
    else:
        with trio.fail_after(STEP_S):
            await other.send_presence(to=vera_jid, type_="subscribe")
        await inbox.presence(other_jid, "subscribe")
        await vera.send(f"<presence to='{other_jid}' type='subscribed'/>".encode())
        await vera.send(f"<presence to='{other_jid}' type='subscribe'/>".encode())
        with trio.fail_after(STEP_S):
            await other.wait_presence(lambda p: p.type == "subscribe" and p.from_ == vera_jid)
            await other.send_presence(to=vera_jid, type_="subscribed")

    # Each sees the other available once both subscriptions stand.
    with trio.fail_after(STEP_S):
        await other.wait_presence(lambda p: p.type == "available" and p.from_.startswith(vera_jid))
    await inbox.presence(other_jid)

    # Chat both ways.
    await vera.send(
        f"<message to='{other_jid}' type='chat'><body>hi there</body></message>".encode()
    )
    with trio.fail_after(STEP_S):
        message = await other.wait_message(lambda m: m.body == "hi there")
        assert message.from_ == f"{vera_jid}/r"
        await other.send_message(f"{vera_jid}/r", "hi vera")
    got = await inbox.tagged("message")
    assert got.findtext(f"{CLIENT}body") == "hi vera"
    assert got.get("from", "").startswith(f"{other_jid}/")

    # The roster on villaged's side says "both".
    await vera.send(b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
    roster = await inbox.wait(lambda e: e.get("id") == "r1")
    items = {i.get("jid"): i.get("subscription") for i in roster.iter("{jabber:iq:roster}item")}
    assert items == {other_jid: "both"}


def inbound_methods(caplog: pytest.LogCaptureFixture) -> set[str]:
    """How peers authenticated their streams to villaged ("sasl-external", "dialback")."""
    return {
        r.__dict__["method"]
        for r in caplog.records
        if r.__dict__.get("event") == "s2s.inbound_authenticated"
    }
