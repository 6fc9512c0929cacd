"""Routing of stanzas from local clients (RFC 6120 §10, RFC 6121 §8).

The router decides where a stanza goes — a local session, the server's own handlers, the
user's account handlers, or an error back to the sender — and never touches a socket: it hands
stanzas to sessions, whose drivers write them.

Messages to a bare JID go to every available resource with a non-negative priority (Prosody
does the same, and with carbons every device sees the conversation); a full JID that is not
online is treated as the bare JID for chat and normal messages (RFC 6121 §8.5.3.2.1).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import error_reply

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from villaged.im.handlers import HandlerRegistry, IqHandler
    from villaged.im.sessions import Session, SessionRegistry

log = logging.getLogger("villaged.im.router")


class Router:
    def __init__(
        self,
        domain: str,
        *,
        sessions: SessionRegistry,
        handlers: HandlerRegistry,
        user_exists: Callable[[JID], bool],
    ) -> None:
        self.domain = domain
        self.sessions = sessions
        self.handlers = handlers
        self.user_exists = user_exists

    # ----- entry points ------------------------------------------------------------------

    async def from_client(self, session: Session, stanza: ET.Element, kind: str) -> None:
        """A stanza from a bound local client ('from' already stamped by the stream)."""
        to = _to(stanza)
        if kind == "iq":
            await self._iq(session, stanza, to)
        elif kind == "message":
            self._message(session, stanza, to or session.jid.bare)
        else:
            self._presence(session, stanza, to)

    def session_ended(self, session: Session) -> None:
        """The session is gone: if it was available, its other resources see it leave."""
        if session.available:
            session.available = False
            gone = ET.Element("{jabber:client}presence", {"type": "unavailable"})
            gone.set("from", str(session.jid))
            self._broadcast_to_own_resources(session, gone)

    # ----- iq ----------------------------------------------------------------------------

    async def _iq(self, session: Session, iq: ET.Element, to: JID | None) -> None:
        iq_type = iq.get("type")
        if iq_type not in ("get", "set", "result", "error") or not iq.get("id"):
            if iq_type != "error":
                session.send(error_reply(iq, "bad-request", text="iq needs an id and a type"))
            return
        request = iq_type in ("get", "set")
        if request and len(iq) != 1:
            session.send(error_reply(iq, "bad-request", text="iq get/set has exactly one child"))
            return
        if to is None or to == session.jid.bare:
            await self._handle_iq(session, iq, self.handlers.account_iq, to)
        elif to == JID("", self.domain):
            await self._handle_iq(session, iq, self.handlers.server_iq, to)
        elif to.domain != self.domain:
            if request:
                session.send(error_reply(iq, "remote-server-not-found"))
        elif to.resource:
            target = self.sessions.get(to)
            if target is not None:
                target.send(iq)
            elif request:
                session.send(error_reply(iq, "service-unavailable"))
        elif request:
            # Another local account's bare JID: nothing answers on its behalf yet.
            session.send(error_reply(iq, "service-unavailable"))

    async def _handle_iq(
        self, session: Session, iq: ET.Element, table: Mapping[str, IqHandler], to: JID | None
    ) -> None:
        if iq.get("type") not in ("get", "set"):
            return  # results/errors addressed to us (e.g. answers to our pings)
        namespace = _namespace(iq[0].tag)
        handler = table.get(namespace)
        if handler is None:
            session.send(error_reply(iq, "service-unavailable"))
            return
        reply = await handler(session, iq)
        session.send(reply)

    # ----- message -----------------------------------------------------------------------

    def _message(self, session: Session, message: ET.Element, to: JID) -> None:
        mtype = message.get("type", "normal")
        if to.domain != self.domain:
            if mtype != "error":
                session.send(error_reply(message, "remote-server-not-found"))
            return
        if not to.local:
            if mtype not in ("error", "headline"):
                session.send(error_reply(message, "service-unavailable"))
            return
        if not self.user_exists(to.bare):
            if mtype != "error":
                session.send(error_reply(message, "service-unavailable"))
            return
        self.deliver_message(message, to, sender=session)

    def deliver_message(self, message: ET.Element, to: JID, *, sender: Session | None) -> bool:
        """Deliver a message to a local user per RFC 6121 §8.5; True if a session took it."""
        mtype = message.get("type", "normal")
        if to.resource:
            target = self.sessions.get(to)
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
        targets = [s for s in self.sessions.of_user(to.bare) if s.available and s.priority >= 0]
        for target in targets:
            target.send(message)
        if not targets and mtype != "headline" and sender is not None:
            # No offline storage yet: tell the sender the message was not delivered.
            sender.send(error_reply(message, "service-unavailable"))
        return bool(targets)

    # ----- presence ----------------------------------------------------------------------

    def _presence(self, session: Session, presence: ET.Element, to: JID | None) -> None:
        ptype = presence.get("type")
        if to is None or to == session.jid.bare:
            if ptype is None:
                session.available = True
                session.priority = _priority(presence)
                session.presence = presence
                self._broadcast_to_own_resources(session, presence)
            elif ptype == "unavailable":
                self.session_ended(session)
            return
        if ptype in (None, "unavailable") and to.domain == self.domain and to.local:
            targets = [self.sessions.get(to)] if to.resource else self.sessions.of_user(to)
            for target in targets:
                if target is not None and target.available:
                    target.send(presence)
        # Subscription requests and presence to other domains arrive with the roster and
        # federation features; until then they are dropped (RFC 6121 allows silent drops).

    def _broadcast_to_own_resources(self, session: Session, presence: ET.Element) -> None:
        for other in self.sessions.of_user(session.jid.bare):
            if other is not session and other.available:
                copy = ET.Element(presence.tag, dict(presence.attrib))
                copy.extend(list(presence))
                copy.set("to", str(other.jid))
                other.send(copy)


def _to(stanza: ET.Element) -> JID | None:
    to = stanza.get("to")
    if to is None:
        return None
    try:
        return JID.parse(to)  # already canonical: the stream checked it
    except JIDError:
        return None


def _namespace(tag: str) -> str:
    return tag[1 : tag.index("}")] if tag.startswith("{") else ""


def _priority(presence: ET.Element) -> int:
    text = presence.findtext("{jabber:client}priority")
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return 0
    return max(-128, min(127, value))
