"""Routing of stanzas from local clients (RFC 6120 §10): iqs go to the server's or the
account's handlers or to a local session; messages and presence go to their features.

The router never touches a socket: it hands stanzas to sessions, whose drivers write them.
An iq between a user and a JID either of them blocks (XEP-0191, ``blocking``) goes nowhere:
a get or set is answered with the blocking feature's refusal, a result or error is dropped.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Protocol

from villaged.xmpp.jid import JID
from villaged.xmpp.stanza import error_reply

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import Callable, Mapping

    from villaged.im.blocking import Blocking
    from villaged.im.context import ImContext
    from villaged.im.handlers import IqHandler
    from villaged.im.messages import Messages, PendingDelivery
    from villaged.im.presence import Presence
    from villaged.im.sessions import Session

log = logging.getLogger("villaged.im.router")


class Router:
    def __init__(
        self,
        ctx: ImContext,
        *,
        messages: Messages,
        presence: Presence,
        blocking: Blocking | None = None,
    ) -> None:
        self.ctx = ctx
        self.domain = ctx.domain
        self.sessions = ctx.sessions
        self.handlers = ctx.handlers
        self.messages = messages
        self.presence = presence
        self.blocking = blocking
        #: Federation (app.py sets it when ``[federation]`` is on): iqs for other domains.
        self.remote: RemoteStanzas | None = None

    # ----- entry points ------------------------------------------------------------------

    async def from_client(
        self, session: Session, stanza: ET.Element, kind: str, to: JID | None
    ) -> None:
        """A stanza from a bound local client: 'from' already stamped and 'to' (here parsed)
        already checked by the stream."""
        if kind == "iq":
            await self._iq(session, stanza, to)
        elif kind == "message":
            await self.messages.from_client(session, stanza, to or session.jid.bare)
        else:
            await self.presence.from_client(session, stanza, to)

    async def accept_message(
        self, session: Session, message: ET.Element, to: JID | None
    ) -> PendingDelivery:
        """A message from a bound local client, accepted but not yet delivered: the caller
        completes it (see ``messages.PendingDelivery``), in the order the client sent them."""
        return await self.messages.accept_from_client(session, message, to or session.jid.bare)

    async def session_ended(self, session: Session) -> None:
        await self.presence.session_ended(session)

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
        if to is not None and self.blocking is not None:
            why = self.blocking.blocked(session.jid, to)
            if why is not None:
                if request:
                    session.send(self.blocking.refusal(iq, why))
                return
        if to is None or to == session.jid.bare:
            await self._handle_iq(session, iq, self.handlers.account_iq, to)
        elif to == JID("", self.domain):
            await self._handle_iq(session, iq, self.handlers.server_iq, to)
        elif to.domain != self.domain:
            if self.remote is not None:
                bounce = partial(_bounce_iq, session, iq) if request else None
                self.remote.send_ephemeral(iq, to, bounce)
            elif request:
                session.send(error_reply(iq, "remote-server-not-found"))
        elif to.resource:
            target = self.sessions.get(to)
            if target is not None:
                target.send(iq)
            elif request:
                session.send(error_reply(iq, "service-unavailable"))
        elif self.ctx.user_exists(to):
            await self._handle_iq(session, iq, self.handlers.contact_iq, to)
        elif request:
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


class RemoteStanzas(Protocol):
    """Where stanzas for other domains go (villaged.federation.service.Federation)."""

    def send_ephemeral(
        self, stanza: ET.Element, to: JID, on_failure: Callable[[str], None] | None = None
    ) -> None: ...


def _bounce_iq(session: Session, iq: ET.Element, condition: str) -> None:
    session.send(error_reply(iq, condition))


def _namespace(tag: str) -> str:
    return tag[1 : tag.index("}")] if tag.startswith("{") else ""
