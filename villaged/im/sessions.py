"""Sessions: which resources are connected, and how to hand each a stanza.

A session is soft state owned by its connection's driver. Handing a stanza to a session never
blocks: it goes into that connection's bounded send queue, and a client too slow to drain it
is disconnected (its driver is told to end the stream) rather than slowing everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import Callable

    from villaged.xmpp.jid import JID


@dataclass(eq=False)
class Session:
    jid: JID
    # Queue a stanza for the client; False when the queue is full (the driver then ends it).
    enqueue: Callable[[ET.Element], bool]
    # End the stream with this stream error (e.g. "conflict" when a newer login replaces it).
    terminate: Callable[[str, str], None]
    available: bool = False  # sent initial presence and not yet unavailable
    priority: int = 0
    presence: ET.Element | None = None
    interested: bool = False  # requested the roster (RFC 6121 §2.1.6)
    features: set[str] = field(default_factory=set)  # e.g. "carbons"

    def send(self, stanza: ET.Element) -> bool:
        if self.enqueue(stanza):
            return True
        self.terminate("policy-violation", "too many stanzas waiting for a slow client")
        return False


class SessionRegistry:
    def __init__(self) -> None:
        self._by_full: dict[JID, Session] = {}
        self._by_bare: dict[JID, dict[str, Session]] = {}
        self._emptied = trio.Event()
        self._emptied.set()

    async def wait_empty(self) -> None:
        """Return once no session is registered (shutdown waits on this)."""
        await self._emptied.wait()

    def __len__(self) -> int:
        return len(self._by_full)

    def add(self, session: Session) -> Session | None:
        """Register ``session``; a session already bound to the same full JID is replaced and
        returned (RFC 6120 §7.7.2.2: the newer login wins; the caller ends the old stream)."""
        old = self._by_full.get(session.jid)
        if old is not None:
            self.remove(old)
        if self._emptied.is_set():
            self._emptied = trio.Event()
        self._by_full[session.jid] = session
        self._by_bare.setdefault(session.jid.bare, {})[session.jid.resource] = session
        return old

    def remove(self, session: Session) -> bool:
        if self._by_full.get(session.jid) is not session:
            return False
        del self._by_full[session.jid]
        resources = self._by_bare[session.jid.bare]
        del resources[session.jid.resource]
        if not resources:
            del self._by_bare[session.jid.bare]
        if not self._by_full:
            self._emptied.set()
        return True

    def get(self, full: JID) -> Session | None:
        return self._by_full.get(full)

    def of_user(self, bare: JID) -> list[Session]:
        return list(self._by_bare.get(bare, {}).values())

    def resource_taken(self, full: JID) -> bool:
        return full in self._by_full

    def all(self) -> list[Session]:
        return list(self._by_full.values())
