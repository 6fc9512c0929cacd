"""Where federation meets the IM layer: stanzas from other domains in, presence out.

`InboundRouter` takes each stanza an authenticated inbound s2s stream delivers (already in the
client namespace, its ``from`` proven to belong to the peer's domain and its ``to`` ours) and
hands it to the feature that owns it, as the router does for local clients:

* messages → ``Messages.deliver`` (archive, offline storage, carbons — durable before the next
  stanza of the stream is read);
* presence → ``Presence.from_remote`` (subscriptions through the roster, probes answered,
  availability delivered);
* iq → a local resource (full JID), the server's handlers (our domain: disco, ping, version)
  or the account's contact handlers (a user's bare JID: vCard, …); results and errors for a
  full JID are passed on.

Answers and errors for the remote entity leave through a *remote session*: a `Session` that is
never registered, whose ``send`` hands the stanza to the federation link of the entity's domain.
So the IM code that answers a local client answers a remote one unchanged.

`RemotePresence` is the roster's and presence's ``outbound_remote`` hook: subscription stanzas
go to the durable queue (a subscription request must not be lost, RFC 6121 §3.1.2), everything
else (available/unavailable, probes) to the ephemeral one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from villaged.im.messages import RemoteQueueFullError
from villaged.im.roster import SUBSCRIPTION_TYPES, deliver_presence
from villaged.im.sessions import Session
from villaged.xmpp.jid import JID
from villaged.xmpp.stanza import error_reply, kind

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    from villaged.federation.service import Federation
    from villaged.im.blocking import Blocking
    from villaged.im.context import ImContext
    from villaged.im.messages import Messages, PendingDelivery
    from villaged.im.presence import Presence
    from villaged.im.sessions import SessionRegistry

log = logging.getLogger("villaged.federation.glue")


def remote_session(federation: Federation, entity: JID) -> Session:
    """A session standing for ``entity`` of another domain: what is sent to it goes over s2s."""

    def enqueue(stanza: ET.Element) -> bool:
        to = JID.parse_or_none(stanza.get("to")) or entity
        federation.send_ephemeral(stanza, to)
        return True

    def terminate(condition: str, text: str) -> None:
        return None  # nothing to end: the remote server owns the entity's connection

    return Session(jid=entity, enqueue=enqueue, terminate=terminate)


class InboundRouter:
    """Routes authenticated stanzas from other domains to the IM features."""

    def __init__(
        self,
        ctx: ImContext,
        federation: Federation,
        *,
        messages: Messages,
        presence: Presence,
        blocking: Blocking | None = None,
    ) -> None:
        self.ctx = ctx
        self.federation = federation
        self.messages = messages
        self.presence = presence
        self.blocking = blocking

    async def __call__(self, stanza: ET.Element, sender: JID, to: JID) -> PendingDelivery | None:
        """Route one stanza. A message is only accepted (its record handed to the log): the
        caller completes the returned delivery, in the order the peer sent them, so that a
        run of messages shares one fsync. Presence and iq take effect before this returns —
        the caller completes earlier messages first (an iq can be a confirmation barrier)."""
        what = kind(stanza)
        if what == "message":
            session = remote_session(self.federation, sender)
            return await self.messages.accept_delivery(stanza, to, sender=session)
        if what == "presence":
            await self.presence.from_remote(stanza, sender, to)
        elif what == "iq":
            await self._iq(stanza, sender, to)
        return None

    async def _iq(self, iq: ET.Element, sender: JID, to: JID) -> None:
        iq_type = iq.get("type")
        request = iq_type in ("get", "set")
        session = remote_session(self.federation, sender)
        if iq_type not in ("get", "set", "result", "error") or not iq.get("id"):
            if iq_type != "error":
                session.send(error_reply(iq, "bad-request", text="iq needs an id and a type"))
            return
        if request and len(iq) != 1:
            session.send(error_reply(iq, "bad-request", text="iq get/set has exactly one child"))
            return
        if self.blocking is not None and to.local:
            why = self.blocking.blocked(sender, to)
            if why is not None:  # XEP-0191, as for local senders: refused, or dropped
                if request:
                    session.send(self.blocking.refusal(iq, why))
                return
        handlers = self.ctx.handlers
        if to.resource:
            target = self.ctx.sessions.get(to)
            if target is not None:
                target.send(iq)
            elif request:
                session.send(error_reply(iq, "service-unavailable"))
            return
        if not request:
            return  # results and errors for our domain or a bare JID end here
        if not to.local:
            table = handlers.server_iq
        elif self.ctx.user_exists(to):
            table = handlers.contact_iq
        else:
            session.send(error_reply(iq, "service-unavailable"))
            return
        handler = table.get(_namespace(iq[0].tag))
        if handler is None:
            session.send(error_reply(iq, "service-unavailable"))
            return
        session.send(await handler(session, iq))


class RemotePresence:
    """The ``outbound_remote`` hook of the roster and presence features."""

    def __init__(self, federation: Federation, sessions: SessionRegistry | None = None) -> None:
        self.federation = federation
        self.sessions = sessions

    async def __call__(self, stanza: ET.Element) -> None:
        to = JID.parse_or_none(stanza.get("to"))
        sender = JID.parse_or_none(stanza.get("from"))
        if to is None or sender is None or not self.federation.permits(to.domain):
            return  # RFC 6121 lets a server drop presence it cannot route
        if stanza.get("type") in SUBSCRIPTION_TYPES:
            try:
                commit = await self.federation.enqueue(sender, stanza, to)
            except RemoteQueueFullError:
                log.warning(
                    "subscription stanza dropped: the domain's queue is full",
                    extra={"event": "s2s.queue_full", "domain": to.domain},
                )
                if self.sessions is not None:  # the user's clients hear why (RFC 6120 §8.3)
                    error = error_reply(stanza, "resource-constraint", text="try again later")
                    deliver_presence(self.sessions, error, sender.bare)
                return
            await commit.wait()
            self.federation.wake(to.domain)
        else:
            self.federation.send_ephemeral(stanza, to)


def _namespace(tag: str) -> str:
    return tag[1 : tag.index("}")] if tag.startswith("{") else ""
