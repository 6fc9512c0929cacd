"""Message routing to local users (RFC 6121 §8.5).

Messages to a bare JID go to every available resource with a non-negative priority (Prosody
does the same, and with carbons every device sees the conversation); a full JID that is not
online is treated as the bare JID for chat and normal messages (RFC 6121 §8.5.3.2.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from villaged.xmpp.stanza import error_reply

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.xmpp.jid import JID


class Messages:
    def __init__(self, ctx: ImContext) -> None:
        self.ctx = ctx

    async def from_client(self, session: Session, message: ET.Element, to: JID) -> None:
        mtype = message.get("type", "normal")
        if not self.ctx.is_local(to):
            if mtype != "error":
                session.send(error_reply(message, "remote-server-not-found"))
            return
        if not to.local:
            if mtype not in ("error", "headline"):
                session.send(error_reply(message, "service-unavailable"))
            return
        if not self.ctx.user_exists(to):
            if mtype != "error":
                session.send(error_reply(message, "service-unavailable"))
            return
        await self.deliver(message, to, sender=session)

    async def deliver(self, message: ET.Element, to: JID, *, sender: Session | None) -> bool:
        """Deliver a message to a local user per RFC 6121 §8.5; True if a session took it."""
        mtype = message.get("type", "normal")
        sessions = self.ctx.sessions
        if to.resource:
            target = sessions.get(to)
            if target is not None:
                return target.send(message)
            if mtype not in ("chat", "normal"):
                if mtype == "groupchat" and sender is not None:
                    sender.send(error_reply(message, "service-unavailable"))
                return False
        if mtype == "groupchat":
            if sender is not None:
                sender.send(error_reply(message, "service-unavailable"))
            return False
        if mtype == "error":
            return False
        targets = [s for s in sessions.of_user(to.bare) if s.available and s.priority >= 0]
        for target in targets:
            target.send(message)
        if not targets and mtype != "headline" and sender is not None:
            # No offline storage yet: tell the sender the message was not delivered.
            sender.send(error_reply(message, "service-unavailable"))
        return bool(targets)
