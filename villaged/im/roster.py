"""Rosters and presence subscriptions for users of this domain (RFC 6121 §2, §3, Appendix A).

This module owns:

* `RosterView`, the durable per-user state: roster items (contact bare JID, name, groups,
  subscription, pending-out "ask") and pending inbound subscription requests, each request
  kept with the stanza that made it so it can be redelivered (RFC 6121 §3.1.3);
* the subscription state machine: RFC 6121 Appendix A.2 (a user's own subscription stanzas,
  "outbound") and A.3 (stanzas that reach a user, "inbound") as the tables `OUTBOUND` and
  `INBOUND`;
* the ``jabber:iq:roster`` handler: get with versioning (§2.6, XEP-0237), set and remove
  (§2.3-§2.5), pushes to every interested resource (§2.1.6);
* the stanzas the RFC ties to subscription changes: delivery of subscription stanzas to the
  recipient's available resources, the sender's current presence after ``subscribed``
  (§3.1.5) and unavailable presence after ``unsubscribed`` (§3.2.2) and ``unsubscribe``
  (§3.3.3).

Theory of operation
-------------------
A change is planned in a `_Transaction`: the tables give each side's new state, and when the
other side is a local user the inbound processing at that user is planned in the same
transaction (at most the two entries (user, contact) and (contact, user)). The transaction
commits as one ``roster.change`` record, so both rosters change atomically; only after the
record is durable are roster pushes sent and subscription stanzas delivered. The pair of users
is locked (striped locks, always taken in the same order) from reading the state until the
deliveries are queued, so concurrent changes cannot both start from the same old state and
pushes leave in version order. Stanzas for other domains go to the ``outbound_remote`` hook
after the lock is released; until federation exists the default hook drops them.

Record type (body fields; ``s`` is a sealed envelope, see storage.crypto):

* ``roster.change`` v1 — ``{"c": [{"u": user bare JID, "id": record id, "s": sealed entry},
  ...]}``, one or two changes applied in order. A sealed entry is msgpack ``{"j": contact,
  "d": true}`` (the entry is gone) or ``{"j": contact, "l": listed, "n": name or nil, "g":
  [group, ...], "s": "none"|"to"|"from"|"both", "o": pending out, "i": pending in, "r": the
  pending request stanza or nil}``. Everything about a contact is sealed under the user's
  data key; only the user's JID and the record id are in the clear. The view keeps, per
  contact, the envelope that made its current entry, so a snapshot is ciphertext too.

A user's roster version is the id of the last change to what the user's roster shows (a
pending request alone is not shown): it changes with every such change, is the same after
a restart and says nothing about the roster. A client whose cached version is current
gets an empty result; any other gets the full roster (RFC 6121 §2.6.3 allows either that or
pushes). Pre-approval (§3.4) is not implemented, and so not advertised.

A deleted account's entries are dropped when its ``account.delete`` is applied (the store
calls `RosterView.forget_user`); on replay and restore, an entry whose user's data key is gone
is skipped. Entries about a deleted contact stay in other users' rosters, as they would for
a contact on another server: probes for it are answered ``unsubscribed`` (presence module).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError, text
from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import NS_CLIENT, error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session, SessionRegistry
    from villaged.storage.state import Unseal

log = logging.getLogger("villaged.im.roster")

NS_ROSTER: Final = "jabber:iq:roster"
NS_ROSTER_VERSIONING: Final = "urn:xmpp:features:rosterver"
QUERY: Final = f"{{{NS_ROSTER}}}query"
ITEM: Final = f"{{{NS_ROSTER}}}item"
GROUP: Final = f"{{{NS_ROSTER}}}group"
PRESENCE: Final = f"{{{NS_CLIENT}}}presence"

ROSTER_CHANGE: Final = "roster.change"
SUBSCRIPTION_TYPES: Final = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
#: The version of a roster that has never changed (record ids never look like this).
INITIAL_VERSION: Final = "0"

# Bounds. Names and groups as RFC 6121 §2.3.3 lets a server choose; the per-user text budget
# keeps one account from holding 1000 x 32 x 1023 characters of group names in memory.
DEFAULT_MAX_ITEMS: Final = 1000
DEFAULT_MAX_PENDING: Final = 200  # requests from contacts not on the roster
DEFAULT_MAX_TEXT_CHARS: Final = 256 * 1024  # names and group names of all items together
MAX_NAME_CHARS: Final = 1023
MAX_GROUPS: Final = 32
MAX_GROUP_CHARS: Final = 1023
#: A stored request bigger than this keeps only its addresses and type (a status text of a
#: few KiB is more than any client shows).
MAX_REQUEST_BYTES: Final = 4096
#: Changes in one record: the (user, contact) and (contact, user) entries.
MAX_CHANGES: Final = 2
# Largest sealed entry: contact JID (3071 bytes), name and groups (4 bytes a character at
# most), the stored request, plus msgpack and sealing overhead.
_MAX_ENTRY_BYTES: Final = 3071 + 4 * MAX_NAME_CHARS + MAX_GROUPS * 4 * MAX_GROUP_CHARS
_RECORD_OVERHEAD: Final = 4096 + 3071 * MAX_CHANGES
_LOCK_STRIPES: Final = 64


async def drop_remote(stanza: ET.Element) -> None:
    """The ``outbound_remote`` hook until federation exists: stanzas for other domains are
    dropped (RFC 6121 lets a server drop presence and subscription stanzas it cannot route)."""
    log.debug(
        "no federation yet: dropped a stanza for another domain",
        extra={"event": "im.remote_dropped", "type": stanza.get("type") or "available"},
    )


# ----- the subscription state machine (RFC 6121 Appendix A) ----------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """One of the nine states of RFC 6121 Appendix A.1, from the user's side of a contact."""

    subscription: str  # "none", "to", "from" or "both"
    pending_out: bool = False  # the user asked to see the contact's presence (ask="subscribe")
    pending_in: bool = False  # the contact asked to see the user's presence

    @property
    def to(self) -> bool:
        """The user receives the contact's presence."""
        return self.subscription in ("to", "both")

    @property
    def from_(self) -> bool:
        """The contact receives the user's presence."""
        return self.subscription in ("from", "both")


NONE: Final = SubscriptionState("none")
NONE_OUT: Final = SubscriptionState("none", pending_out=True)
NONE_IN: Final = SubscriptionState("none", pending_in=True)
NONE_OUT_IN: Final = SubscriptionState("none", pending_out=True, pending_in=True)
TO: Final = SubscriptionState("to")
TO_IN: Final = SubscriptionState("to", pending_in=True)
FROM: Final = SubscriptionState("from")
FROM_OUT: Final = SubscriptionState("from", pending_out=True)
BOTH: Final = SubscriptionState("both")
STATES: Final = (NONE, NONE_OUT, NONE_IN, NONE_OUT_IN, TO, TO_IN, FROM, FROM_OUT, BOTH)


class Inbound(enum.Enum):
    """What the recipient's server does with an inbound subscription stanza (A.3)."""

    DELIVER = "deliver"  # to the user's available resources
    DROP = "drop"
    # A.3.1 "no *": the contact already has a subscription; answer "subscribed" on the
    # user's behalf (§3.1.3) instead of asking the user again.
    AUTO_REPLY = "auto-reply"


Y, N = True, False
# RFC 6121 A.2.1-A.2.4, rows in the RFC's order: existing state -> (route?, new state).
# "no state change" rows keep the state. Rows [1] of A.2.2 would be pre-approvals (§3.4),
# which this server does not offer.
OUTBOUND: Final[Mapping[str, Mapping[SubscriptionState, tuple[bool, SubscriptionState]]]] = {
    "subscribe": {
        NONE: (Y, NONE_OUT),
        NONE_OUT: (Y, NONE_OUT),
        NONE_IN: (Y, NONE_OUT_IN),
        NONE_OUT_IN: (Y, NONE_OUT_IN),
        TO: (Y, TO),
        TO_IN: (Y, TO_IN),
        FROM: (Y, FROM_OUT),
        FROM_OUT: (Y, FROM_OUT),
        BOTH: (Y, BOTH),
    },
    "subscribed": {
        NONE: (N, NONE),
        NONE_OUT: (N, NONE_OUT),
        NONE_IN: (Y, FROM),
        NONE_OUT_IN: (Y, FROM_OUT),
        TO: (N, TO),
        TO_IN: (Y, BOTH),
        FROM: (N, FROM),
        FROM_OUT: (N, FROM_OUT),
        BOTH: (N, BOTH),
    },
    "unsubscribe": {
        NONE: (Y, NONE),
        NONE_OUT: (Y, NONE),
        NONE_IN: (Y, NONE_IN),
        NONE_OUT_IN: (Y, NONE_IN),
        TO: (Y, NONE),
        TO_IN: (Y, NONE_IN),
        FROM: (Y, FROM),
        FROM_OUT: (Y, FROM),
        BOTH: (Y, FROM),
    },
    "unsubscribed": {
        NONE: (Y, NONE),
        NONE_OUT: (Y, NONE_OUT),
        NONE_IN: (Y, NONE),
        NONE_OUT_IN: (Y, NONE_OUT),
        TO: (Y, TO),
        TO_IN: (Y, TO),
        FROM: (Y, NONE),
        FROM_OUT: (Y, NONE_OUT),
        BOTH: (Y, TO),
    },
}

D, X, A = Inbound.DELIVER, Inbound.DROP, Inbound.AUTO_REPLY
# RFC 6121 A.3.1-A.3.4: existing state (of the recipient towards the sender) -> (action,
# new state).
INBOUND: Final[Mapping[str, Mapping[SubscriptionState, tuple[Inbound, SubscriptionState]]]] = {
    "subscribe": {
        NONE: (D, NONE_IN),
        NONE_OUT: (D, NONE_OUT_IN),
        NONE_IN: (X, NONE_IN),
        NONE_OUT_IN: (X, NONE_OUT_IN),
        TO: (D, TO_IN),
        TO_IN: (X, TO_IN),
        FROM: (A, FROM),
        FROM_OUT: (A, FROM_OUT),
        BOTH: (A, BOTH),
    },
    "subscribed": {
        NONE: (X, NONE),
        NONE_OUT: (D, TO),
        NONE_IN: (X, NONE_IN),
        NONE_OUT_IN: (D, TO_IN),
        TO: (X, TO),
        TO_IN: (X, TO_IN),
        FROM: (X, FROM),
        FROM_OUT: (D, BOTH),
        BOTH: (X, BOTH),
    },
    "unsubscribe": {
        NONE: (X, NONE),
        NONE_OUT: (X, NONE_OUT),
        NONE_IN: (D, NONE),
        NONE_OUT_IN: (D, NONE_OUT),
        TO: (X, TO),
        TO_IN: (D, TO),
        FROM: (D, NONE),
        FROM_OUT: (D, NONE_OUT),
        BOTH: (D, TO),
    },
    "unsubscribed": {
        NONE: (X, NONE),
        NONE_OUT: (D, NONE),
        NONE_IN: (X, NONE_IN),
        NONE_OUT_IN: (D, NONE_IN),
        TO: (D, NONE),
        TO_IN: (D, NONE_IN),
        FROM: (X, FROM),
        FROM_OUT: (D, FROM),
        BOTH: (D, FROM),
    },
}
del Y, N, D, X, A


# ----- the view ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """What a user's server knows about one contact.

    ``listed`` entries are roster items; an unlisted entry is only a pending inbound request
    from someone not on the roster ("None + Pending In" without an item: RFC 6121 §3.1.3 says
    not to add an item before the user approves).
    """

    jid: JID  # the contact's bare JID
    listed: bool
    state: SubscriptionState = NONE
    name: str | None = None
    groups: tuple[str, ...] = ()
    request: bytes | None = None  # the pending subscribe stanza, serialized, while pending_in

    def text_chars(self) -> int:
        return len(self.name or "") + sum(map(len, self.groups))


def _visible(entry: RosterEntry | None) -> tuple[Any, ...] | None:
    """What a roster item shows a client; pushes and new versions are due when this changes."""
    if entry is None or not entry.listed:
        return None
    return (entry.name, entry.groups, entry.state.subscription, entry.state.pending_out)


class _UserRoster:
    __slots__ = ("entries", "sealed", "version")

    def __init__(self, version: str = INITIAL_VERSION) -> None:
        self.entries: dict[str, RosterEntry] = {}
        # contact -> (record id, envelope) of the sealed entry that made entries[contact]
        self.sealed: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self.version = version


class RosterView:
    """Roster entries by user and contact (bare JID strings), rebuilt from the log."""

    name = "roster"
    record_types: Mapping[str, int] = {ROSTER_CHANGE: 1}

    def __init__(self) -> None:
        self._users: dict[str, _UserRoster] = {}

    def entry(self, user: str, contact: str) -> RosterEntry | None:
        roster = self._users.get(user)
        return roster.entries.get(contact) if roster is not None else None

    def entries(self, user: str) -> list[RosterEntry]:
        roster = self._users.get(user)
        return list(roster.entries.values()) if roster is not None else []

    def version(self, user: str) -> str:
        roster = self._users.get(user)
        return roster.version if roster is not None else INITIAL_VERSION

    def forget_user(self, user: str) -> None:
        """The account was deleted (called in log order by the store's state)."""
        self._users.pop(user, None)

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        changes = body.get("c")
        if not isinstance(changes, list) or not 1 <= len(changes) <= MAX_CHANGES:
            raise StateError(f"{rtype} needs 1 to {MAX_CHANGES} changes")
        for change in changes:
            if not isinstance(change, dict):
                raise StateError(f"{rtype} has a change that is not a map")
            text(change, "u")
            text(change, "id")
            if not isinstance(change.get("s"), dict):
                raise StateError(f"{rtype} has a change with no sealed entry")

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        for change in body["c"]:
            user, record_id, envelope = change["u"], change["id"], change["s"]
            try:
                plain = unseal(ROSTER_CHANGE, user, record_id, envelope)
            except ShreddedError:
                continue  # the user was deleted: nothing of theirs is readable any more
            contact, entry = _unpack_entry(plain)
            roster = self._users.setdefault(user, _UserRoster())
            if _visible(entry) != _visible(roster.entries.get(contact)):
                roster.version = record_id
            if entry is None:
                roster.entries.pop(contact, None)
                roster.sealed.pop(contact, None)
            else:
                roster.entries[contact] = entry
                roster.sealed[contact] = (record_id, envelope)

    def to_snapshot(self) -> dict[str, list[Any]]:
        return {
            user: [roster.version, [[rid, dict(env)] for rid, env in roster.sealed.values()]]
            for user, roster in self._users.items()
        }

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._users.clear()
        for user, (version, sealed) in (data or {}).items():
            roster = _UserRoster(version)
            for record_id, envelope in sealed:
                try:
                    plain = unseal(ROSTER_CHANGE, user, record_id, envelope)
                except ShreddedError:
                    continue
                contact, entry = _unpack_entry(plain)
                if entry is None:
                    raise StateError(f"snapshot holds a deleted roster entry of {user}")
                roster.entries[contact] = entry
                roster.sealed[contact] = (record_id, envelope)
            if sealed and not roster.entries:
                continue  # every entry is shredded: the account is gone
            self._users[user] = roster


def _pack_entry(contact: JID, entry: RosterEntry | None) -> bytes:
    obj: dict[str, Any]
    if entry is None:
        obj = {"j": str(contact), "d": True}
    else:
        obj = {
            "j": str(contact),
            "l": entry.listed,
            "n": entry.name,
            "g": list(entry.groups),
            "s": entry.state.subscription,
            "o": entry.state.pending_out,
            "i": entry.state.pending_in,
            "r": entry.request,
        }
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack_entry(plain: bytes) -> tuple[str, RosterEntry | None]:
    """``(contact, entry or None for a deletion)``; StateError if it is not what we write."""
    try:
        obj = msgpack.unpackb(plain, raw=False)
        contact = obj["j"]
        jid = _canonical_bare(contact)
        if obj.get("d") is True:
            return contact, None
        state = SubscriptionState(obj["s"], obj["o"] is True, obj["i"] is True)
        name, groups, request = obj["n"], obj["g"], obj["r"]
        if (
            state not in STATES
            or not isinstance(obj["l"], bool)
            or not isinstance(name, str | None)
            or not isinstance(groups, list)
            or not all(isinstance(group, str) for group in groups)
            or not isinstance(request, bytes | None)
        ):
            raise ValueError("a field has the wrong type or value")
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"sealed roster entry is malformed: {exc}") from exc
    return contact, RosterEntry(jid, obj["l"], state, name, tuple(groups), request)


def _canonical_bare(contact: object) -> JID:
    # Stored JIDs were canonical when written: split them rather than run PRECIS again for
    # every entry of every roster at start.
    if not isinstance(contact, str) or not contact or "/" in contact:
        raise ValueError(f"{contact!r} is not a bare JID")
    local, _, domain = contact.rpartition("@")
    return JID(local, domain)


# ----- delivery helpers (shared with villaged.im.presence) -----------------------------------


def presence_stanza(ptype: str, sender: JID, to: JID) -> ET.Element:
    return ET.Element(PRESENCE, {"type": ptype, "from": str(sender), "to": str(to)})


def readdressed(stanza: ET.Element, to: JID | None, sender: JID | None = None) -> ET.Element:
    """A copy of ``stanza`` with a new 'to' (removed if None) and optionally 'from'. Sent
    stanzas may wait in a queue, so they are copied rather than changed."""
    copy = ET.Element(stanza.tag, dict(stanza.attrib))
    copy.text = stanza.text
    copy.extend(list(stanza))
    if to is None:
        copy.attrib.pop("to", None)
    else:
        copy.set("to", str(to))
    if sender is not None:
        copy.set("from", str(sender))
    return copy


def deliver_presence(sessions: SessionRegistry, stanza: ET.Element, to: JID) -> int:
    """Hand a presence stanza to a local recipient (RFC 6121 §8.5): a full JID's connected
    resource, or every available resource of a bare JID. Returns how many took it."""
    if to.resource:
        target = sessions.get(to)
        return int(target is not None and target.send(stanza))
    return sum(s.send(stanza) for s in sessions.of_user(to) if s.available)


def available_presence(sessions: SessionRegistry, owner: JID) -> list[ET.Element]:
    """The last presence of each of ``owner``'s available resources (from their full JIDs)."""
    return [s.presence for s in sessions.of_user(owner) if s.available and s.presence is not None]


# ----- the feature ---------------------------------------------------------------------------


class _Transaction:
    """Entries planned to change, and what to send once they are durable."""

    def __init__(self, view: RosterView) -> None:
        self.view = view
        self.planned: dict[tuple[JID, JID], RosterEntry | None] = {}
        self.local: list[Callable[[], object]] = []  # run in order after the commit
        self.remote: list[ET.Element] = []  # for the outbound_remote hook, in order

    def get(self, user: JID, contact: JID) -> RosterEntry | None:
        key = (user, contact)
        if key in self.planned:
            return self.planned[key]
        return self.view.entry(str(user), str(contact))

    def put(self, user: JID, contact: JID, entry: RosterEntry | None) -> None:
        self.planned[(user, contact)] = entry


class RosterFullError(Exception):
    """A change would list more items than a roster may hold."""


class Roster:
    """The roster feature. Build it after the store is open with ``view`` among its views,
    then `register` it with the handlers."""

    def __init__(
        self,
        ctx: ImContext,
        view: RosterView,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        outbound_remote: Callable[[ET.Element], Awaitable[None]] = drop_remote,
    ) -> None:
        try:
            fed = ctx.store.state.view(RosterView.name) is view
        except KeyError:
            fed = False
        if not fed:
            raise ValueError("the store was opened without this RosterView among its views")
        largest = MAX_CHANGES * (_MAX_ENTRY_BYTES + MAX_REQUEST_BYTES) + _RECORD_OVERHEAD
        if largest > ctx.store.options.max_record_bytes:
            raise ValueError(
                f"roster changes can take {largest} bytes, more than the store's "
                f"max_record_bytes ({ctx.store.options.max_record_bytes})"
            )
        self.ctx = ctx
        self.view = view
        self.max_items = max_items
        self.max_pending = max_pending
        self.max_text_chars = max_text_chars
        self.outbound_remote = outbound_remote
        self._locks = [trio.Lock() for _ in range(_LOCK_STRIPES)]

    def register(self) -> None:
        handlers = self.ctx.handlers
        handlers.on_account_iq(NS_ROSTER, self.handle_iq)
        handlers.on_contact_iq(NS_ROSTER, self._forbidden)
        handlers.stream_features.append(ET.Element(f"{{{NS_ROSTER_VERSIONING}}}ver"))

    # ----- reading (for presence) ------------------------------------------------------------

    def in_roster(self, user: JID, contact: JID) -> bool:
        """Whether ``contact`` (a bare JID) is an item of ``user``'s roster (for MAM's
        'roster' preference, XEP-0313 §6.1)."""
        entry = self.view.entry(str(user), str(contact))
        return entry is not None and entry.listed

    def subscribers(self, user: JID) -> list[JID]:
        """Contacts who receive ``user``'s presence (subscription from or both)."""
        return [e.jid for e in self.view.entries(str(user)) if e.state.from_]

    def subscriptions(self, user: JID) -> list[JID]:
        """Contacts whose presence ``user`` receives (subscription to or both)."""
        return [e.jid for e in self.view.entries(str(user)) if e.state.to]

    def shares_presence(self, owner: JID, viewer: JID) -> bool:
        """Whether ``owner``'s roster lets ``viewer`` (a bare JID) see ``owner``'s presence."""
        entry = self.view.entry(str(owner), str(viewer))
        return entry is not None and entry.state.from_

    def pending_requests(self, user: JID) -> list[ET.Element]:
        """Subscription requests ``user`` has not answered, for redelivery (§3.1.3)."""
        return [
            _request_stanza(entry, user)
            for entry in self.view.entries(str(user))
            if entry.state.pending_in
        ]

    # ----- subscription stanzas ----------------------------------------------------------------

    async def outbound_subscription(
        self, session: Session, stanza: ET.Element, contact: JID
    ) -> None:
        """A subscription stanza ``session``'s user sent to ``contact`` (a bare JID other than
        the user's own): RFC 6121 A.2 at the user, A.3 at a local contact."""
        user = session.jid.bare
        ptype = stanza.get("type", "")
        # §3.1.2 and its siblings: the server stamps both addresses as bare JIDs.
        stamped = readdressed(stanza, contact, user)
        async with self._locked(user, contact):
            txn = _Transaction(self.view)
            try:
                self._outbound(txn, user, contact, ptype, stamped)
            except RosterFullError as exc:
                session.send(error_reply(stanza, "not-allowed", text=str(exc)))
                return
            await self._commit(txn)
        await self._send_remote(txn)

    async def inbound_subscription(self, stanza: ET.Element, sender: JID, user: JID) -> None:
        """A subscription stanza from ``sender`` (bare; another domain's user, once federation
        exists) to the local ``user``: RFC 6121 A.3."""
        async with self._locked(user, sender):
            txn = _Transaction(self.view)
            self._inbound(txn, sender, user, stanza.get("type", ""), stanza)
            await self._commit(txn)
        await self._send_remote(txn)

    def _outbound(
        self, txn: _Transaction, user: JID, contact: JID, ptype: str, stamped: ET.Element
    ) -> None:
        entry = txn.get(user, contact)
        old = entry.state if entry is not None else NONE
        route, new = OUTBOUND[ptype][old]
        changed = _with_state(entry, contact, new)
        if changed.listed and not (entry is not None and entry.listed):
            self._check_room(user, changed)
        txn.put(user, contact, _worth_keeping(changed))
        if not route:
            return
        self._route(txn, stamped, user, contact)
        if ptype == "subscribed":
            # §3.1.5: the new subscriber gets the user's current presence at once.
            self._send_presence_of(txn, user, contact)
        elif ptype == "unsubscribed" and old.from_:
            # §3.2.2: the former subscriber sees the user go offline.
            self._send_unavailable_of(txn, user, contact)

    def _inbound(
        self, txn: _Transaction, sender: JID, user: JID, ptype: str, stamped: ET.Element
    ) -> None:
        if not self.ctx.user_exists(user):
            return  # no such account: nothing to deliver or remember
        entry = txn.get(user, sender)
        old = entry.state if entry is not None else NONE
        action, new = INBOUND[ptype][old]
        changed = _with_state(entry, sender, new)
        if new.pending_in and not old.pending_in:
            if not changed.listed and self._unlisted_pending(user) >= self.max_pending:
                log.info(
                    "subscription request dropped: too many pending",
                    extra={"event": "im.roster.pending_full", "user": str(user)},
                )
                return
            changed = replace(changed, request=_stored_request(stamped, sender, user))
        txn.put(user, sender, _worth_keeping(changed))
        if action is Inbound.DELIVER:
            txn.local.append(lambda: deliver_presence(self.ctx.sessions, stamped, user))
        elif action is Inbound.AUTO_REPLY:
            # §3.1.3: the user already shares presence with the sender; confirm for them, and
            # resend the presence the sender evidently lost track of.
            self._route(txn, presence_stanza("subscribed", user, sender), user, sender)
            self._send_presence_of(txn, user, sender)
        if ptype == "unsubscribe" and old.from_:
            self._send_unavailable_of(txn, user, sender)  # §3.3.3

    def _route(self, txn: _Transaction, stanza: ET.Element, sender: JID, to: JID) -> None:
        if not self.ctx.is_local(to):
            txn.remote.append(stanza)
        elif to.local:
            self._inbound(txn, sender, to, stanza.get("type", ""), stanza)
        # else: the server's own domain has no roster; the stanza ends here

    def _send_presence_of(self, txn: _Transaction, owner: JID, to: JID) -> None:
        if self.ctx.is_local(to):
            # Built when sent: the presence current after the commit, not before it.
            txn.local.append(lambda: self._deliver_all(self._presence_for(owner, to), to))
        else:
            txn.remote.extend(self._presence_for(owner, to))

    def _send_unavailable_of(self, txn: _Transaction, owner: JID, to: JID) -> None:
        gone = [
            presence_stanza("unavailable", s.jid, to)
            for s in self.ctx.sessions.of_user(owner)
            if s.available
        ]
        if self.ctx.is_local(to):
            txn.local.append(lambda: self._deliver_all(gone, to))
        else:
            txn.remote.extend(gone)

    def _presence_for(self, owner: JID, to: JID) -> list[ET.Element]:
        return [readdressed(p, to) for p in available_presence(self.ctx.sessions, owner)]

    def _deliver_all(self, stanzas: Iterable[ET.Element], to: JID) -> None:
        for stanza in stanzas:
            deliver_presence(self.ctx.sessions, stanza, to)

    # ----- the roster iq ----------------------------------------------------------------------

    async def handle_iq(self, session: Session, iq: ET.Element) -> ET.Element:
        query = iq[0]
        if query.tag != QUERY:
            return error_reply(iq, "bad-request", text="expected a jabber:iq:roster query")
        if iq.get("type") == "get":
            return self._get(session, iq, query)
        return await self._set(session, iq, query)

    async def _forbidden(self, session: Session, iq: ET.Element) -> ET.Element:
        # RFC 6121 §2.1.5: a roster belongs to its user alone.
        return error_reply(iq, "forbidden", text="that is not your roster")

    def _get(self, session: Session, iq: ET.Element, query: ET.Element) -> ET.Element:
        session.interested = True  # §2.1.6: it gets pushes from now on
        user = str(session.jid.bare)
        version = self.view.version(user)
        if query.get("ver") == version:
            return iq_result(iq)  # §2.6.3: the client's cached copy is current
        result = ET.Element(QUERY, {"ver": version})
        for entry in sorted(self.view.entries(user), key=lambda e: str(e.jid)):
            if entry.listed:
                result.append(_item(entry))
        return iq_result(iq, result)

    async def _set(self, session: Session, iq: ET.Element, query: ET.Element) -> ET.Element:
        items = query.findall(ITEM)
        if len(items) != 1:
            return error_reply(iq, "bad-request", text="a roster set carries exactly one item")
        item = items[0]
        user = session.jid.bare
        try:
            contact = JID.parse(item.get("jid") or "")
        except JIDError as exc:
            return error_reply(iq, "bad-request", text=f"bad item jid: {exc}")
        if contact.resource:
            return error_reply(iq, "bad-request", text="roster items are bare JIDs")
        if contact == user:
            return error_reply(iq, "not-acceptable", text="you cannot be your own contact")
        if item.get("subscription") == "remove":
            return await self._remove(iq, user, contact)
        name = item.get("name") or None
        groups = [group.text or "" for group in item.findall(GROUP)]
        problem = _item_problem(name, groups)
        if problem is not None:
            condition, reason = problem
            return error_reply(iq, condition, text=reason)
        async with self._locked(user):
            txn = _Transaction(self.view)
            entry = txn.get(user, contact)
            base = entry if entry is not None else RosterEntry(contact, listed=False)
            changed = replace(base, listed=True, name=name, groups=tuple(groups))
            try:
                self._check_room(user, changed, replacing=entry)
            except RosterFullError as exc:
                return error_reply(iq, "not-allowed", text=str(exc))
            if changed == entry:
                self._push(user, contact, changed)  # §2.3.2: a set is always answered by a push
            else:
                txn.put(user, contact, changed)
                await self._commit(txn)
        return iq_result(iq)

    async def _remove(self, iq: ET.Element, user: JID, contact: JID) -> ET.Element:
        """RFC 6121 §2.5.2: cancel the subscriptions both ways, then drop the item."""
        async with self._locked(user, contact):
            txn = _Transaction(self.view)
            entry = txn.get(user, contact)
            if entry is None or not entry.listed:
                return error_reply(iq, "item-not-found")
            state = entry.state
            if state.to or state.pending_out:
                stanza = presence_stanza("unsubscribe", user, contact)
                self._outbound(txn, user, contact, "unsubscribe", stanza)
            if state.from_ or state.pending_in:
                stanza = presence_stanza("unsubscribed", user, contact)
                self._outbound(txn, user, contact, "unsubscribed", stanza)
            txn.put(user, contact, None)
            await self._commit(txn)
        await self._send_remote(txn)
        return iq_result(iq)

    def _check_room(
        self, user: JID, changed: RosterEntry, replacing: RosterEntry | None = None
    ) -> None:
        entries = self.view.entries(str(user))
        already_listed = replacing is not None and replacing.listed
        if not already_listed and sum(e.listed for e in entries) >= self.max_items:
            raise RosterFullError(f"a roster holds at most {self.max_items} items")
        chars = sum(e.text_chars() for e in entries if e.listed) + changed.text_chars()
        if replacing is not None and already_listed:
            chars -= replacing.text_chars()
        if chars > self.max_text_chars:
            raise RosterFullError(
                f"names and groups of all items together are limited to "
                f"{self.max_text_chars} characters"
            )

    def _unlisted_pending(self, user: JID) -> int:
        return sum(not e.listed for e in self.view.entries(str(user)))

    # ----- committing and pushing -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, *users: JID) -> AsyncIterator[None]:
        # Striped so memory stays bounded; taken in ascending order so two transactions
        # locking the same pair from opposite ends cannot deadlock.
        stripes = sorted({hash(user) % _LOCK_STRIPES for user in users})
        async with contextlib.AsyncExitStack() as stack:
            for stripe in stripes:
                await stack.enter_async_context(self._locks[stripe])
            # On a cluster node a change made on another node may not be applied here yet.
            await self.ctx.store.catch_up(*(str(u) for u in users if self.ctx.is_local(u)))
            yield

    async def _commit(self, txn: _Transaction) -> None:
        changes = [
            (user, contact, entry)
            for (user, contact), entry in txn.planned.items()
            if entry != self.view.entry(str(user), str(contact))
        ]
        if changes:
            pushes = [
                (user, contact, entry)
                for user, contact, entry in changes
                if _visible(entry) != _visible(self.view.entry(str(user), str(contact)))
            ]
            bodies = [
                await self.ctx.store.sealed_body(
                    ROSTER_CHANGE, str(user), _pack_entry(contact, entry)
                )
                for user, contact, entry in changes
            ]
            await self.ctx.store.commit(Record(ROSTER_CHANGE, {"c": bodies}))
            for user, contact, entry in pushes:
                self._push(user, contact, entry)
        for effect in txn.local:
            effect()

    def _push(self, user: JID, contact: JID, entry: RosterEntry | None) -> None:
        """RFC 6121 §2.1.6: tell every interested resource of ``user`` about the change."""
        if entry is not None and entry.listed:
            item = _item(entry)
        else:
            item = ET.Element(ITEM, {"jid": str(contact), "subscription": "remove"})
        version = self.view.version(str(user))
        for session in self.ctx.sessions.of_user(user):
            if session.interested:
                push = ET.Element(
                    f"{{{NS_CLIENT}}}iq",
                    {
                        "type": "set",
                        "id": f"push-{secrets.token_urlsafe(6)}",
                        "to": str(session.jid),
                    },
                )
                ET.SubElement(push, QUERY, {"ver": version}).append(item)
                session.send(push)

    async def _send_remote(self, txn: _Transaction) -> None:
        for stanza in txn.remote:
            await self.outbound_remote(stanza)


def _with_state(entry: RosterEntry | None, contact: JID, state: SubscriptionState) -> RosterEntry:
    """``entry`` (a new unlisted one if None) in ``state``."""
    base = entry if entry is not None else RosterEntry(contact, listed=False)
    # A subscription or an outbound request makes the contact a roster item (§3.1.2, §3.1.5);
    # a request alone from someone not listed does not (§3.1.3).
    listed = base.listed or state.subscription != "none" or state.pending_out
    request = base.request if state.pending_in else None
    return replace(base, listed=listed, state=state, request=request)


def _worth_keeping(entry: RosterEntry) -> RosterEntry | None:
    """None once nothing is left to keep about the contact: not listed, nothing pending."""
    return entry if entry.listed or entry.state.pending_in else None


def _item(entry: RosterEntry) -> ET.Element:
    item = ET.Element(ITEM, {"jid": str(entry.jid), "subscription": entry.state.subscription})
    if entry.name is not None:
        item.set("name", entry.name)
    if entry.state.pending_out:
        item.set("ask", "subscribe")
    for group in entry.groups:
        ET.SubElement(item, GROUP).text = group
    return item


def _item_problem(name: str | None, groups: list[str]) -> tuple[str, str] | None:
    """RFC 6121 §2.3.3's refusals of a roster set: (condition, text), or None if fine."""
    if name is not None and len(name) > MAX_NAME_CHARS:
        return "not-acceptable", f"a name is at most {MAX_NAME_CHARS} characters"
    if len(groups) > MAX_GROUPS:
        return "not-acceptable", f"an item is in at most {MAX_GROUPS} groups"
    for group in groups:
        if not group:
            return "not-acceptable", "a group needs a name"
        if len(group) > MAX_GROUP_CHARS:
            return "not-acceptable", f"a group name is at most {MAX_GROUP_CHARS} characters"
    if len(set(groups)) != len(groups):
        return "bad-request", "an item names a group twice"
    return None


def _stored_request(stanza: ET.Element, sender: JID, user: JID) -> bytes:
    data = xml.serialize(stanza, default_ns=None)
    if len(data) > MAX_REQUEST_BYTES:
        data = xml.serialize(presence_stanza("subscribe", sender, user), default_ns=None)
    return data


def _request_stanza(entry: RosterEntry, user: JID) -> ET.Element:
    """The stored request as a stanza (a plain subscribe if the stored bytes do not parse)."""
    parsed = _parse_request(entry.request) if entry.request is not None else None
    return parsed if parsed is not None else presence_stanza("subscribe", entry.jid, user)


def _parse_request(data: bytes) -> ET.Element | None:
    parser = xml.FramedStreamParser()
    try:
        parser.receive_message(data)
        event = parser.next_event()
    except xml.XmlStreamError:
        return None
    return event.element if isinstance(event, xml.StanzaReceived) else None
