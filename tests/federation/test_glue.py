"""The federation glue on its own: the presence hook's durable and ephemeral paths, the
error a user gets when a domain's queue is full, and the remote session."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import trio
import trio.testing

from villaged.federation.glue import RemotePresence, remote_session
from villaged.federation.service import QueueFullError
from villaged.im.sessions import Session, SessionRegistry
from villaged.xmpp.jid import JID

PRESENCE = "{jabber:client}presence"


class FakeFederation:
    def __init__(self, *, full: bool = False) -> None:
        self.full = full
        self.queued: list[ET.Element] = []
        self.ephemeral: list[tuple[ET.Element, JID]] = []
        self.woken: list[str] = []

    def permits(self, domain: str) -> bool:
        return domain != "refused.test"

    async def enqueue(self, sender: JID, stanza: ET.Element, to: JID) -> Any:
        if self.full:
            raise QueueFullError(to.domain)
        self.queued.append(stanza)

        class Done:
            async def wait(self) -> int:
                return 1

        return Done()

    def wake(self, domain: str) -> None:
        self.woken.append(domain)

    def send_ephemeral(self, stanza: ET.Element, to: JID, on_failure: object = None) -> None:
        self.ephemeral.append((stanza, to))


def presence(ptype: str | None, to: str = "pat@b.test") -> ET.Element:
    attrs = {"from": "alice@a.test", "to": to}
    if ptype:
        attrs["type"] = ptype
    return ET.Element(PRESENCE, attrs)


def registry_with_alice(received: list[ET.Element]) -> SessionRegistry:
    sessions = SessionRegistry()

    def enqueue(stanza: ET.Element) -> bool:
        received.append(stanza)
        return True

    session = Session(
        jid=JID.parse("alice@a.test/r"), enqueue=enqueue, terminate=lambda condition, text: None
    )
    session.available = True
    sessions.add(session)
    return sessions


async def test_subscriptions_are_durable_and_the_rest_ephemeral() -> None:
    federation = FakeFederation()
    hook = RemotePresence(federation)  # type: ignore[arg-type]
    await hook(presence("subscribe"))
    await hook(presence(None))
    await hook(presence("probe"))
    await hook(presence("subscribe", to="x@refused.test"))  # policy: dropped
    await hook(ET.Element(PRESENCE, {"to": "pat@b.test"}))  # no sender: dropped
    assert [p.get("type") for p in federation.queued] == ["subscribe"]
    assert federation.woken == ["b.test"]
    assert [(p.get("type"), str(to)) for p, to in federation.ephemeral] == [
        (None, "pat@b.test"),
        ("probe", "pat@b.test"),
    ]


async def test_a_full_queue_tells_the_users_clients() -> None:
    received: list[ET.Element] = []
    hook = RemotePresence(FakeFederation(full=True), registry_with_alice(received))  # type: ignore[arg-type]
    await hook(presence("subscribe"))
    (error,) = received
    assert (error.tag, error.get("type"), error.get("from")) == (PRESENCE, "error", "pat@b.test")
    assert error.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None


async def test_a_remote_session_sends_over_federation() -> None:
    federation = FakeFederation()
    session = remote_session(federation, JID.parse("pat@b.test/phone"))  # type: ignore[arg-type]
    reply = ET.Element("{jabber:client}iq", {"type": "result", "to": "pat@b.test/phone"})
    assert session.send(reply)
    session.terminate("conflict", "ignored")  # a remote entity's stream is not ours to end
    ((sent, to),) = federation.ephemeral
    assert sent is reply
    assert str(to) == "pat@b.test/phone"
    await trio.lowlevel.checkpoint()


class FakeDelivery:
    """Stands for a PendingDelivery whose record never becomes durable."""

    def __init__(self) -> None:
        self.abandoned = False

    async def complete(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.abandon()  # as PendingDelivery.complete does

    def abandon(self) -> None:
        self.abandoned = True


async def test_deliveries_cut_short_give_back_their_reservations() -> None:
    from villaged.federation.service import Federation

    send, receive = trio.open_memory_channel[Any](8)
    completed = trio.Event()
    deliveries = [FakeDelivery() for _ in range(5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Federation._complete_in_order, object(), receive, completed)  # type: ignore[arg-type]
        for delivery in deliveries:
            await send.send(delivery)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert completed.is_set()
    assert [d.abandoned for d in deliveries] == [True] * 5
