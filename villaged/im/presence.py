"""Presence for users of this domain (RFC 6121 §4): what a client's presence stanzas do.

This module owns the routing of every presence stanza a local client sends, and the
availability of sessions:

* initial presence (§4.2): the session becomes available; its presence goes to the user's
  subscribers (subscription from/both) and other available resources; the user's
  subscriptions (to/both) are probed — a local contact's server is this one, so the probe is
  answered at once with the last presence of each of the contact's available resources
  (§4.3.2); the new session also gets the presence of the user's other resources, the
  subscription requests still waiting for an answer (§3.1.3), and then the ``on_available``
  hook runs (the messages feature flushes offline messages there);
* presence updates (§4.4) go to the same audience, without probes;
* unavailable presence (§4.5), sent or implied by the session ending, goes to the same
  audience and to everyone the session sent directed presence to (§4.6.3);
* directed presence (§4.6) is delivered and remembered, so that the session's end reaches
  its recipients too; subscription stanzas (§3) go to the roster's state machine; probes
  from clients are ignored (probing is the server's job, §4.3); presence errors are routed
  like directed presence.

A session's priority (§4.7.2.1) is kept current here; what a negative priority means for
message routing is the messages feature's business. Stanzas for other domains go to the
``outbound_remote`` hook (by default the roster's; federation's when it is on, see
``villaged.federation.glue``); presence from other domains comes in through `from_remote`.
Without a roster (a node built without the roster feature), presence reaches only the user's
own resources and the targets of directed presence.

With the blocking feature (XEP-0191), every presence stanza passes `Blocking.blocked` on its
way to each recipient resource (in ``_send``): a stanza between a user and a JID either of
them blocks is not delivered, probes between them go unanswered, stored subscription requests
from a blocked JID are not shown again, and a user's own directed presence or subscription
stanza to a JID they block is refused with ``<blocked/>``. After a blocklist changes,
`blocking_changed` sends the presence the change calls for (§3.3-§3.5).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Final

from villaged.im.blocking import Blocked
from villaged.im.roster import (
    PRESENCE,
    SUBSCRIPTION_TYPES,
    available_presence,
    deliver_presence,
    drop_remote,
    presence_stanza,
    readdressed,
)
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import error_reply

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator

    from villaged.im.blocking import BlockChange, Blocking
    from villaged.im.context import ImContext
    from villaged.im.roster import Roster
    from villaged.im.sessions import Session

log = logging.getLogger("villaged.im.presence")

#: Entities one session may have sent directed presence to and not yet unavailable.
DEFAULT_MAX_DIRECTED: Final = 1000


class Presence:
    def __init__(
        self,
        ctx: ImContext,
        roster: Roster | None = None,
        *,
        on_available: Callable[[Session], Awaitable[None]] | None = None,
        outbound_remote: Callable[[ET.Element], Awaitable[None]] | None = None,
        max_directed: int = DEFAULT_MAX_DIRECTED,
        blocking: Blocking | None = None,
    ) -> None:
        self.ctx = ctx
        self.roster = roster
        self.blocking = blocking
        self.on_available = on_available
        if outbound_remote is None:
            outbound_remote = roster.outbound_remote if roster is not None else drop_remote
        self.outbound_remote = outbound_remote
        #: Federation (app.py): how the answer to another domain's probe leaves — at once and
        #: not stored, so that a remote server probing cannot make this node write to its log.
        self.remote_answer: Callable[[ET.Element], None] | None = None
        self.max_directed = max_directed
        # Per session: who got directed available presence from it and must hear it leave.
        self._directed: dict[Session, set[JID]] = {}

    # ----- entry points (the router's) ---------------------------------------------------------

    async def from_client(self, session: Session, presence: ET.Element, to: JID | None) -> None:
        """A presence stanza from a local client ('from' stamped with its full JID)."""
        ptype = presence.get("type")
        if ptype in SUBSCRIPTION_TYPES:
            await self._subscription(session, presence, to)
        elif ptype == "probe":
            pass  # §4.3: the server probes on the user's behalf; a client's probe is ignored
        elif ptype == "error":
            await self._route_error(presence, to)
        elif ptype not in (None, "unavailable"):
            session.send(error_reply(presence, "bad-request", text="unknown presence type"))
        elif to is None or to == session.jid.bare:
            if ptype is None:
                await self._available(session, presence)
            else:
                await self._unavailable(session, presence)
        else:
            await self._directed_presence(session, presence, to)

    async def session_ended(self, session: Session) -> None:
        """The session is gone: everyone who saw it available sees it leave."""
        gone = ET.Element(PRESENCE, {"type": "unavailable", "from": str(session.jid)})
        await self._unavailable(session, gone)

    def gone_elsewhere(self, session: Session, here: Callable[[Session], bool]) -> int:
        """``session`` was on another cluster node, which is gone: this node's own sessions
        (``here``) that saw it available see it leave. Every node tells its own sessions, so
        nobody hears it twice. Returns how many were told."""
        if not session.available:
            return 0
        gone = ET.Element(PRESENCE, {"type": "unavailable", "from": str(session.jid)})
        return self._tell_here(session, gone, here)

    def back_elsewhere(self, session: Session, here: Callable[[Session], bool]) -> int:
        """``session``, on another cluster node, was taken for gone (its node's link stayed
        down) and is announced again: this node's own sessions see it available again."""
        if not session.available or session.presence is None:
            return 0
        return self._tell_here(session, readdressed(session.presence, None), here)

    def _tell_here(
        self, session: Session, presence: ET.Element, here: Callable[[Session], bool]
    ) -> int:
        user = session.jid.bare
        targets = [s for s in self.ctx.sessions.of_user(user) if s is not session]
        if self.roster is not None:
            for contact in self.roster.subscribers(user):
                targets.extend(self.ctx.sessions.of_user(contact))
        told = 0
        for target in targets:
            if here(target) and target.available:
                stamped = readdressed(presence, target.jid)
                stamped.set("from", str(session.jid))
                target.send(stamped)
                told += 1
        return told

    async def from_remote(self, presence: ET.Element, sender: JID, to: JID) -> None:
        """A presence stanza from another domain (federation) to a local JID: subscription
        stanzas go to the roster's state machine (RFC 6121 A.3), probes are answered (§4.3.2),
        availability and errors reach the addressed user's resources (§4.3-§4.6)."""
        if not to.local or not self.ctx.user_exists(to):
            return  # §4.3.2 / §8.5.1: nothing to deliver to (and no answer for presence)
        ptype = presence.get("type")
        if ptype in SUBSCRIPTION_TYPES:
            if self.roster is not None and not self._blocked(sender, to):
                stamped = readdressed(presence, to.bare, sender.bare)
                await self.roster.inbound_subscription(stamped, sender.bare, to.bare)
        elif ptype == "probe":
            await self.probe(sender, to.bare)
        elif ptype in (None, "unavailable", "error"):
            await self._send(presence, to)

    async def probe(self, prober: JID, contact: JID) -> None:
        """Answer a probe from ``prober`` for the presence of the local ``contact`` (§4.3.2).

        Called for each subscription of a session that sends initial presence; federation
        will call it for probes from other domains.
        """
        roster = self.roster
        if roster is None or self._blocked(contact, prober):
            return  # XEP-0191: a blocked prober gets no answer, a blocked contact is not heard
        if not self.ctx.user_exists(contact) or not roster.shares_presence(contact, prober.bare):
            # §4.3.2: say so, which ends the prober's stale subscription.
            unsubscribed = presence_stanza("unsubscribed", contact, prober.bare)
            if self.ctx.is_local(prober):
                await roster.inbound_subscription(unsubscribed, contact, prober.bare)
            elif self.remote_answer is not None:
                self.remote_answer(unsubscribed)
            else:
                await self.outbound_remote(unsubscribed)
            return
        # With no available resource there is nothing to send: §4.3.2 allows silence.
        for stanza in available_presence(self.ctx.sessions, contact):
            await self._send(readdressed(stanza, prober), prober)

    # ----- availability --------------------------------------------------------------------

    async def _available(self, session: Session, presence: ET.Element) -> None:
        initial = not session.available
        presence = readdressed(presence, None)  # a presence to the user's own bare JID too
        session.available = True
        session.priority = priority(presence)
        session.presence = presence
        await self._broadcast(session, presence)
        if initial:
            await self._initial(session)

    async def _initial(self, session: Session) -> None:
        user = session.jid.bare
        if self.roster is not None:
            for contact in self.roster.subscriptions(user):
                if self._blocked(contact, session.jid):
                    continue  # neither asked nor answered across a block
                if self.ctx.is_local(contact):
                    await self.probe(session.jid, contact)
                else:
                    await self.outbound_remote(presence_stanza("probe", session.jid, contact))
        for other in self.ctx.sessions.of_user(user):
            if other is not session and other.available and other.presence is not None:
                session.send(readdressed(other.presence, session.jid))
        if self.roster is not None:
            for request in self.roster.pending_requests(user):
                sender = self._sender(request)
                if sender is None or not self._blocked(sender, session.jid):
                    session.send(request)
        if self.on_available is not None:
            await self.on_available(session)

    async def _unavailable(self, session: Session, presence: ET.Element) -> None:
        directed = self._directed.pop(session, set())
        if session.available:
            session.available = False
            session.presence = None
            await self._broadcast(session, presence)
        for target in directed:
            await self._send(readdressed(presence, target), target)

    async def _broadcast(self, session: Session, presence: ET.Element) -> None:
        """To the user's subscribers and other available resources (§4.2.2, §4.4.2, §4.5.2)."""
        user = session.jid.bare
        if self.roster is not None:
            for contact in self.roster.subscribers(user):
                await self._send(readdressed(presence, contact), contact)
        for other in self.ctx.sessions.of_user(user):
            if other is not session and other.available:
                other.send(readdressed(presence, other.jid))

    # ----- directed presence, subscriptions, errors --------------------------------------------

    async def _directed_presence(self, session: Session, presence: ET.Element, to: JID) -> None:
        if self.ctx.is_local(to) and not self.ctx.user_exists(to):
            return  # §8.5.2.2.1 / §8.5.3.2.3: presence to no account is silently ignored
        if self._stopped_by_block(session, presence, to):
            return
        directed = self._directed.setdefault(session, set())
        if presence.get("type") == "unavailable":
            directed.discard(to)
        elif to not in directed and not self._subscriber(session.jid.bare, to):
            # Subscribers hear the session leave anyway; anyone else is remembered (§4.6.3).
            if len(directed) >= self.max_directed:
                session.send(
                    error_reply(presence, "policy-violation", text="too many directed presences")
                )
                return
            directed.add(to)
        await self._send(presence, to)

    def _subscriber(self, user: JID, to: JID) -> bool:
        return self.roster is not None and self.roster.shares_presence(user, to.bare)

    async def _subscription(self, session: Session, presence: ET.Element, to: JID | None) -> None:
        if self.roster is None or to is None or to.bare == session.jid.bare:
            return  # nobody to subscribe to (RFC 6121 lets a server drop what it cannot use)
        if self._stopped_by_block(session, presence, to):
            return
        await self.roster.outbound_subscription(session, presence, to.bare)

    async def _route_error(self, presence: ET.Element, to: JID | None) -> None:
        if to is not None and (not self.ctx.is_local(to) or self.ctx.user_exists(to)):
            await self._send(presence, to)

    async def _send(self, stanza: ET.Element, to: JID) -> None:
        """Deliver or route ``stanza``, except to a resource that is blocked from its sender
        or blocks it (XEP-0191: each resource on its own, so a blocked resource is skipped
        even in a broadcast to its bare JID)."""
        sender = None
        if self.blocking is not None and self.blocking.view.any_lists():
            sender = self._sender(stanza)
        if sender is None:
            await self._deliver(stanza, to)
        elif not self.ctx.is_local(to):
            if not self._blocked(sender, to):
                await self.outbound_remote(stanza)
        else:
            for target in self._resources(to):
                if not self._blocked(sender, target):
                    deliver_presence(self.ctx.sessions, stanza, target)

    async def _deliver(self, stanza: ET.Element, to: JID) -> None:
        if self.ctx.is_local(to):
            deliver_presence(self.ctx.sessions, stanza, to)
        else:
            await self.outbound_remote(stanza)

    # ----- blocking (XEP-0191) -----------------------------------------------------------------

    async def blocking_changed(self, change: BlockChange) -> None:
        """After a durable change of ``change.user``'s blocklist (§3.3-§3.5): a newly blocked
        JID that could see the user's presence sees the user's resources go offline, a newly
        unblocked one gets their current presence again; and the other way round, the user's
        resources see a newly blocked contact go offline, and get a newly unblocked contact's
        presence back as a probe would bring it."""
        user = change.user
        mine = [s for s in self.ctx.sessions.of_user(user) if s.available]
        subscribers = self.roster.subscribers(user) if self.roster is not None else []
        for session in mine:
            audience = {*subscribers, *self._directed.get(session, ())}
            for target in sorted(set(self._addressees(audience))):
                if not change.affects(target):
                    continue
                if change.blocked:  # the block is in force already: past the filter of _send
                    await self._deliver(presence_stanza("unavailable", session.jid, target), target)
                elif session.presence is not None:
                    await self._send(readdressed(session.presence, target), target)
        if self.roster is None or not mine:
            return
        for contact in self.roster.subscriptions(user):
            if not self.ctx.is_local(contact):
                if not change.blocked and change.affects(contact):
                    for session in mine:
                        await self.outbound_remote(presence_stanza("probe", session.jid, contact))
                continue
            for theirs in self.ctx.sessions.of_user(contact):
                if not theirs.available or theirs.presence is None:
                    continue
                if not change.affects(theirs.jid):
                    continue
                for session in mine:
                    if change.blocked:
                        session.send(presence_stanza("unavailable", theirs.jid, session.jid))
                    else:
                        await self._send(readdressed(theirs.presence, session.jid), session.jid)

    def _blocked(self, sender: JID, to: JID) -> bool:
        return self.blocking is not None and self.blocking.blocked(sender, to) is not None

    def _stopped_by_block(self, session: Session, presence: ET.Element, to: JID) -> bool:
        """XEP-0191 for a presence stanza the user sends: to a JID the user blocks it is
        refused with <blocked/>; to someone who blocks the user it vanishes. True if stopped."""
        if self.blocking is None:
            return False
        why = self.blocking.blocked(session.jid, to)
        if why is Blocked.BY_SENDER:
            session.send(self.blocking.refusal(presence, why))
        return why is not None

    def _resources(self, to: JID) -> list[JID]:
        """The local resources a presence stanza for ``to`` reaches (as `deliver_presence`)."""
        if to.resource:
            return [to] if self.ctx.sessions.get(to) is not None else []
        return [s.jid for s in self.ctx.sessions.of_user(to) if s.available]

    def _addressees(self, audience: Iterable[JID]) -> Iterator[JID]:
        """Each local resource the ``audience`` reaches, and each remote JID as it is."""
        for target in audience:
            if self.ctx.is_local(target):
                yield from self._resources(target)
            else:
                yield target

    @staticmethod
    def _sender(stanza: ET.Element) -> JID | None:
        try:
            return JID.parse(stanza.get("from", ""))
        except JIDError:
            return None


def priority(presence: ET.Element) -> int:
    """The stanza's priority (§4.7.2.3), clamped to -128..127; 0 when absent or not a number."""
    text = presence.findtext("{jabber:client}priority")
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return 0
    return max(-128, min(127, value))
