"""In-process IM test bed: a real store in a temporary directory, real sessions whose sent
stanzas are captured, and the router — everything a client connection would use, minus the
socket. Feature tests build their features on top of ``ImHarness``."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from villaged.im import server_info
from villaged.im.context import ImContext
from villaged.im.handlers import HandlerRegistry
from villaged.im.messages import Messages
from villaged.im.presence import Presence
from villaged.im.router import Router
from villaged.im.sessions import Session, SessionRegistry
from villaged.storage.crypto import Keyset
from villaged.storage.store import StoreOptions, open_store
from villaged.xmpp import xml
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

    from villaged.storage.state import View
    from villaged.storage.store import Store

DOMAIN = "example.org"


@dataclass(eq=False)
class FakeClient:
    """A bound session whose outgoing stanzas land in ``inbox``."""

    session: Session
    inbox: list[ET.Element] = field(default_factory=list)
    terminated: tuple[str, str] | None = None

    def take(self) -> list[ET.Element]:
        got, self.inbox[:] = list(self.inbox), []
        return got

    def only(self) -> ET.Element:
        got = self.take()
        assert len(got) == 1, [xml.serialize(e) for e in got]
        return got[0]


@dataclass
class ImHarness:
    ctx: ImContext
    router: Router
    store: Store

    def connect(self, user: str, resource: str = "r") -> FakeClient:
        client: FakeClient

        def enqueue(stanza: ET.Element) -> bool:
            # Serialize and parse back, as the wire would: no shared element objects.
            client.inbox.append(parse_stanza(xml.serialize(stanza)))
            return True

        def terminate(condition: str, text: str) -> None:
            client.terminated = (condition, text)

        jid = JID(user, DOMAIN, resource)
        client = FakeClient(Session(jid=jid, enqueue=enqueue, terminate=terminate))
        self.ctx.sessions.add(client.session)
        return client

    async def send(self, client: FakeClient, stanza_xml: str) -> None:
        """Send a stanza as the client would, 'from' stamped like the stream does."""
        stanza = parse_stanza(stanza_xml.encode())
        stanza.set("from", str(client.session.jid))
        to_jid = None
        if (to := stanza.get("to")) is not None:
            to_jid = JID.parse(to)
            stanza.set("to", str(to_jid))
        kind = stanza.tag.split("}")[1]
        await self.router.from_client(client.session, stanza, kind, to_jid)

    async def disconnect(self, client: FakeClient) -> None:
        self.ctx.sessions.remove(client.session)
        await self.router.session_ended(client.session)


def parse_stanza(data: bytes) -> ET.Element:
    """Parse one stanza the way the server does: inside a jabber:client stream."""
    parser = xml.StreamParser()
    parser.receive_data(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
        b"to='example.org' version='1.0'>" + data
    )
    while True:
        event = parser.next_event()
        if isinstance(event, xml.StanzaReceived):
            return event.element
        if event is xml.NEED_DATA:
            raise ValueError(f"not one complete stanza: {data!r}")


@asynccontextmanager
async def im_harness(
    tmp_path: Path,
    *,
    users: Sequence[str] = ("alice", "bob", "carol"),
    views: Sequence[View] = (),
    build: Callable[[ImContext], tuple[Messages, Presence]] | None = None,
) -> AsyncIterator[ImHarness]:
    """A store with ``users`` (password "<user>-password"), the given feature ``views``, and a
    router whose message and presence features ``build`` makes (the basic ones by default)."""
    keyset = tmp_path / "keyset.json"
    if not keyset.exists():
        Keyset.generate(datetime(2026, 11, 29, tzinfo=UTC)).save(keyset)
    options = StoreOptions(directory=tmp_path / "data", keyset=keyset)
    async with open_store(options, views) as store:
        for user in users:
            jid = f"{user}@{DOMAIN}"
            if jid not in store.state.accounts:
                await store.add_user(jid, f"{user}-password")
        handlers = HandlerRegistry()
        ctx = ImContext(DOMAIN, store, SessionRegistry(), handlers)
        server_info.register(handlers)
        messages, presence = build(ctx) if build else (Messages(ctx), Presence(ctx))
        yield ImHarness(ctx, Router(ctx, messages=messages, presence=presence), store)
