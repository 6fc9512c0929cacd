"""Presence (RFC 6121 §4): availability of a user's own resources and directed presence.

Subscriptions, probes and broadcast to contacts arrive with the roster.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.xmpp.jid import JID


class Presence:
    def __init__(self, ctx: ImContext) -> None:
        self.ctx = ctx

    async def from_client(self, session: Session, presence: ET.Element, to: JID | None) -> None:
        ptype = presence.get("type")
        if to is None or to == session.jid.bare:
            if ptype is None:
                session.available = True
                session.priority = priority(presence)
                session.presence = presence
                self._broadcast_to_own_resources(session, presence)
            elif ptype == "unavailable":
                await self.session_ended(session)
            return
        if ptype in (None, "unavailable") and self.ctx.is_local(to) and to.local:
            sessions = self.ctx.sessions
            targets = [sessions.get(to)] if to.resource else sessions.of_user(to)
            for target in targets:
                if target is not None and target.available:
                    target.send(presence)
        # Subscription requests and presence to other domains arrive with the roster and
        # federation features; until then they are dropped (RFC 6121 allows silent drops).

    async def session_ended(self, session: Session) -> None:
        """The session went unavailable or away: its other resources see it leave."""
        if session.available:
            session.available = False
            gone = ET.Element("{jabber:client}presence", {"type": "unavailable"})
            gone.set("from", str(session.jid))
            self._broadcast_to_own_resources(session, gone)

    def _broadcast_to_own_resources(self, session: Session, presence: ET.Element) -> None:
        for other in self.ctx.sessions.of_user(session.jid.bare):
            if other is not session and other.available:
                copy = ET.Element(presence.tag, dict(presence.attrib))
                copy.extend(list(presence))
                copy.set("to", str(other.jid))
                other.send(copy)


def priority(presence: ET.Element) -> int:
    text = presence.findtext("{jabber:client}priority")
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return 0
    return max(-128, min(127, value))
