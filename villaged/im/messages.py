"""Messages between local users: routing (RFC 6121 §8.5), durability first, then delivery.

A message from a client goes through these steps, in this order:

1. refusals: a message between a user and a JID either of them blocks (``blocking``,
   XEP-0191) → ``not-acceptable`` with ``<blocked/>`` to a sender who blocks the recipient,
   ``service-unavailable`` to a sender the recipient blocks — before anything is archived
   or queued; then (RFC 6121 §8.5.1/§8.5.2) another domain → its federation queue
   (`_accept_remote`; ``remote-server-not-found`` without federation or by policy), the
   server itself or an unknown user → ``service-unavailable``;
2. sanitizing: <stanza-id/> elements claiming one of our archives and carbons wrappers are
   removed (only the server may make those: see the security considerations of XEP-0359 and
   XEP-0280);
3. routing: a full JID that is online gets it; otherwise chat/normal go to every available
   resource with a non-negative priority (Prosody does the same, and with carbons every
   device sees the conversation), groupchat bounces, error and (to a full JID) headline are
   dropped; chat/normal for a user with no such resource are stored offline (``offline``);
4. archiving (``mam``): when the message is archivable and each user's preferences allow,
   it gets a fresh XEP-0359 stanza-id for the recipient's archive (in the copy the recipient
   sees) and another for the sender's (in the copy the sender's other devices see);
5. **one durable record** (`MESSAGE_RECORD`) covering everything that must survive: the
   recipient's entry (archive and/or offline queue, sharing one sealed payload) and the
   sender's archive entry. `from_client` returns only after that record is durable and
   applied, so stream management can count the stanza as handled at that point (DESIGN.md:
   nothing is acknowledged before it is durable);
6. delivery to sessions, then carbons (``carbons``) to the other resources.

Why one record with one entry per user rather than one record per user: a single record is
atomic (never an archive without the offline copy, or the sender's archive without the
recipient's), costs one append, and each entry is self-contained — owner, sealed payload,
ids, timestamp — so when users are spread over shards the record splits into per-shard
records mechanically. The record shows which two users exchanged a message at that time
(each entry names its owner in the clear, as every sealed record does); separate records
appended together would show the same to anyone reading the log.

Record types owned here (all applied by `MessageStoreView`):

* ``message`` v1 — ``{"e": [entry, …]}`` with one or two entries, each
  ``{"u": bare JID, "id": record id, "s": sealed payload, "t": µs since the epoch,
  "a": archive id (when archived), "k": archive bound (with "a"), "o": true (when queued
  offline)}``; the payload (see ``mam.pack_payload``) holds the correspondent and the stanza;
* ``offline.delivered`` v1 — see ``offline``;
* ``mam.prefs`` v1 — see ``mam``.

Deleting an account empties its archive, queue and preferences (`MessageStoreView.forget_user`,
called as ``account.delete`` is applied); replaying older records of a deleted user meets
payloads sealed under a destroyed key, and skips them.
"""

from __future__ import annotations

import copy
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

from villaged.im import carbons
from villaged.im.carbons import Carbons
from villaged.im.mam import (
    PAYLOAD_RECORD,
    PREFS_RECORD,
    Archives,
    Mam,
    PrefsTable,
    add_stanza_id,
    archivable,
    pack_payload,
    strip_stanza_ids,
    unpack_with,
)
from villaged.im.offline import (
    DEFAULT_LIMIT,
    DELIVERED_RECORD,
    Offline,
    OfflineQueues,
    QueuedMessage,
    storable,
    validate_delivered,
)
from villaged.storage.entropy import random_token
from villaged.storage.errors import RecordTooLargeError, ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError, text
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import error_reply

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import Awaitable, Callable, Mapping

    from villaged.im.blocking import Blocking
    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal
    from villaged.storage.store import Pending

MESSAGE_RECORD: Final = PAYLOAD_RECORD
MAX_ENTRIES: Final = 2  # a message touches at most its sender's and its recipient's data
DEFAULT_ARCHIVE_KEEP: Final = 10_000

log = logging.getLogger("villaged.im.messages")


def new_archive_id() -> str:
    """An archive UID / stanza-id: 128 random bits, so unguessable and, in practice, unique
    (XEP-0313 and XEP-0359 ask for both)."""
    return random_token(16)


def _now_micros() -> int:
    # Millisecond resolution: the XEP-0082 stamps we show are then exact, so a client that
    # filters with a stamp it was shown finds that message again.
    return time.time_ns() // 1_000_000 * 1_000


class MessageStoreView:
    """The durable state of messaging: archives, offline queues and archive preferences."""

    name = "messages"
    record_types: Mapping[str, int] = {MESSAGE_RECORD: 1, DELIVERED_RECORD: 1, PREFS_RECORD: 1}

    def __init__(self) -> None:
        self.archives = Archives()
        self.offline = OfflineQueues()
        self.prefs = PrefsTable()

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        if rtype == MESSAGE_RECORD:
            _message_entries(body)
        elif rtype == DELIVERED_RECORD:
            validate_delivered(body)
        else:
            text(body, "u")
            text(body, "id")
            if not isinstance(body.get("s"), dict):
                raise StateError(f"{rtype} has no sealed payload")

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        if rtype == MESSAGE_RECORD:
            for entry in _message_entries(body):
                self._apply_entry(entry, unseal)
        elif rtype == DELIVERED_RECORD:
            self.offline.remove(*validate_delivered(body))
        else:
            self.validate(rtype, body)
            self.prefs.apply(body["u"], body["id"], body["s"], unseal)

    def _apply_entry(self, entry: Mapping[str, Any], unseal: Unseal) -> None:
        user, record_id, sealed, stamp = entry["u"], entry["id"], entry["s"], entry["t"]
        try:
            payload = unseal(MESSAGE_RECORD, user, record_id, sealed)
        except ShreddedError:
            return  # the user was deleted after this was written
        if "a" in entry:
            with_jid = unpack_with(payload)
            self.archives.append(user, entry["a"], stamp, with_jid, record_id, sealed, entry["k"])
        if entry.get("o"):
            self.offline.add(user, QueuedMessage(record_id, stamp, sealed))

    def forget_user(self, jid: str) -> None:
        """The account was deleted (``account.delete`` applied): drop all of its messages."""
        self.archives.forget(jid)
        self.offline.forget(jid)
        self.prefs.forget(jid)

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "archive": self.archives.to_snapshot(),
            "offline": self.offline.to_snapshot(),
            "prefs": self.prefs.to_snapshot(),
        }

    def restore(self, data: Any, unseal: Unseal) -> None:
        data = data or {}
        self.archives.restore(data.get("archive", {}), unseal)
        self.offline.restore(data.get("offline", {}), unseal)
        self.prefs.restore(data.get("prefs", {}), unseal)


def _message_entries(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    entries = body.get("e")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_ENTRIES:
        raise StateError(f"{MESSAGE_RECORD} needs 1 to {MAX_ENTRIES} entries")
    for entry in entries:
        if not isinstance(entry, dict):
            raise StateError(f"{MESSAGE_RECORD} entry is not a map")
        text(entry, "u")
        text(entry, "id")
        if not isinstance(entry.get("s"), dict):
            raise StateError(f"{MESSAGE_RECORD} entry has no sealed payload")
        if not _is_count(entry.get("t"), minimum=0):
            raise StateError(f"{MESSAGE_RECORD} entry has no timestamp")
        archived = "a" in entry
        if archived:
            text(entry, "a")
            if not _is_count(entry.get("k"), minimum=1):
                raise StateError(f"{MESSAGE_RECORD} archive entry has no bound")
        queued = entry.get("o", False)
        if type(queued) is not bool or not (archived or queued):
            raise StateError(f"{MESSAGE_RECORD} entry is neither archived nor queued")
    return entries


def _is_count(value: object, *, minimum: int) -> bool:
    return type(value) is int and value >= minimum


class PendingDelivery:
    """A message accepted for delivery (`Messages.accept_from_client`): its record, if it
    needs one, is in the log's queue; `complete` waits until that record is durable and
    applied, then hands the message to sessions and sends the sender any error.

    This split lets a connection read on while a message's record is being written: it
    accepts the client's messages one after another (their records get increasing log
    indexes, and can share one fdatasync) and completes them strictly in that order, so the
    client's stanzas still take effect in order and nothing is delivered, or acknowledged,
    before it is durable. Errors for the sender wait for `complete` as well, so they never
    overtake the outcome of an earlier message. A delivery that is never completed (its
    connection was torn down) must be `abandon`ed.
    """

    __slots__ = ("_commit", "_hand_over", "_release", "_replies", "sender")

    def __init__(self, sender: Session | None) -> None:
        self.sender = sender
        self._replies: list[ET.Element] = []
        self._commit: Pending | None = None
        self._hand_over: Callable[[], Awaitable[None]] | None = None
        self._release: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        """Whether `complete` would not wait for the disk."""
        return self._commit is None or self._commit.durable

    def reply(self, stanza: ET.Element) -> None:
        """Send ``stanza`` to the sender when this completes (there is always a sender)."""
        self._replies.append(stanza)

    def bounce(self, message: ET.Element, condition: str, reason: str | None = None) -> None:
        """Return ``message`` to its sender with an error, if there is a sender to tell."""
        if self.sender is not None and message.get("type") != "error":
            self._replies.append(error_reply(message, condition, text=reason))

    def accepted(
        self,
        commit: Pending | None,
        hand_over: Callable[[], Awaitable[None]],
        release: Callable[[], None] | None,
    ) -> None:
        self._commit, self._hand_over, self._release = commit, hand_over, release

    async def complete(self) -> bool:
        """Wait for the record, then deliver; True if a session took the message or it was
        stored offline."""
        try:
            if self._commit is not None:
                await self._commit.wait()
        finally:
            self.abandon()
        if self.sender is not None:
            for stanza in self._replies:
                self.sender.send(stanza)
        self._replies = []
        hand_over, self._hand_over = self._hand_over, None
        if hand_over is None:
            return False
        await hand_over()
        return True

    def abandon(self) -> None:
        """Give back what was reserved for this message (a place in an offline queue). Its
        record still becomes durable; it is only not handed to sessions."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Messages:
    """Message routing and everything durable about messages.

    ``view`` is the `MessageStoreView` the store was opened with (found by name when not
    given). Without one — a store opened without it, as in tests of other features —
    messages are only routed online: nothing is archived or stored offline, and chat/normal
    messages for a user with no available resource bounce as RFC 6121 requires of a server
    without offline storage. Constructing registers the iq handlers and disco features.
    """

    def __init__(
        self,
        ctx: ImContext,
        view: MessageStoreView | None = None,
        *,
        clock: Callable[[], int] = _now_micros,
        offline_limit: int = DEFAULT_LIMIT,
        archive_keep: int = DEFAULT_ARCHIVE_KEEP,
        in_roster: Callable[[JID, JID], bool] | None = None,
        blocking: Blocking | None = None,
    ) -> None:
        if archive_keep < 1:
            raise ValueError("archive_keep must be at least 1")
        self.ctx = ctx
        self.blocking = blocking
        found = view if view is not None else _registered_view(ctx)
        if found is not None and _registered_view(ctx) is not found:
            raise ValueError("the message view is not the one the store was opened with")
        self.durable = found is not None
        self.view = found if found is not None else MessageStoreView()
        self.archive_keep = archive_keep
        self._clock = clock
        #: Federation (app.py sets it when ``[federation]`` is on): messages for other domains.
        self.remote: RemoteQueue | None = None
        self.carbons = Carbons(ctx)
        self.mam = Mam(ctx, self.view.archives, self.view.prefs, in_roster=in_roster)
        self.offline = Offline(ctx, self.view.offline, limit=offline_limit)
        self.carbons.register()
        if self.durable:
            self.mam.register()
            self.offline.register()
        else:
            log.warning(
                "no message store: messages are routed online only",
                extra={"event": "messages.not_durable"},
            )

    # ----- entry points ------------------------------------------------------------------

    async def from_client(self, session: Session, message: ET.Element, to: JID) -> None:
        """A message from a local client ('from' stamped with its full JID). Returns once
        whatever must be durable about it is durable."""
        await (await self.accept_from_client(session, message, to)).complete()

    async def accept_from_client(
        self, session: Session, message: ET.Element, to: JID
    ) -> PendingDelivery:
        """The first half of `from_client`: route ``message`` and hand its record to the log,
        without waiting for the disk. The caller completes what this returns, in the order the
        client sent the messages (see `PendingDelivery`)."""
        pending = PendingDelivery(session)
        mtype = message.get("type", "normal")
        if self._refused_by_block(pending, message, session.jid, to):
            return pending
        if not self.ctx.is_local(to):
            if self.remote is not None and self.remote.permits(to.domain):
                await self._accept_remote(pending, session, message, to)
            elif mtype != "error":
                pending.reply(error_reply(message, "remote-server-not-found"))
            return pending
        if not to.local:
            if mtype not in ("error", "headline"):
                pending.reply(error_reply(message, "service-unavailable"))
            return pending
        if not self.ctx.user_exists(to):
            if mtype != "error":
                pending.reply(error_reply(message, "service-unavailable"))
            return pending
        strip_stanza_ids(message, self.ctx.domain)
        carbons.strip_forged(message)
        await self._accept(pending, message, to)
        return pending

    async def _accept_remote(
        self, pending: PendingDelivery, session: Session, message: ET.Element, to: JID
    ) -> None:
        """A message for another domain: the sender's archive keeps it (when archivable), and
        it is sealed into the domain's durable queue; both records are written before the
        sender hears anything, then the federation link sends it."""
        assert self.remote is not None
        if not self.remote.has_room(to.domain):  # before anything is archived
            pending.bounce(
                message, "resource-constraint", f"too many messages wait for {to.domain}"
            )
            return
        strip_stanza_ids(message, self.ctx.domain)
        carbons.strip_forged(message)
        sender_user = session.jid.bare
        archive_out = (
            self.durable and archivable(message) and self.mam.archives_with(sender_user, to)
        )
        copies = carbons.eligible(message)
        carbons.strip_private(message)
        outbound, outbound_id = _stamped_copy(message, sender_user if archive_out else None)
        try:
            if archive_out:
                entry = await self._entry(
                    sender_user, outbound, str(to), self._clock(), outbound_id, False
                )
                await self.ctx.store.submit(Record(MESSAGE_RECORD, {"e": [entry]}))
            # The log is one sequence: once the queue record is durable, so is the archive's.
            commit = await self.remote.enqueue(sender_user, message, to)
        except RecordTooLargeError:
            pending.bounce(message, "policy-violation", "message too large to store")
            return
        except RemoteQueueFullError:
            pending.bounce(
                message, "resource-constraint", f"too many messages wait for {to.domain}"
            )
            return
        remote = self.remote

        async def hand_over() -> None:
            if copies:
                self._send_carbons([], session, sender_user, to, outbound, outbound)
            remote.wake(to.domain)

        pending.accepted(commit, hand_over, None)

    async def flush_offline(self, session: Session) -> None:
        """Deliver the offline queue to ``session``: the presence feature's ``on_available``
        hook, called right after a session's initial presence."""
        await self.offline.flush(session)

    async def deliver(self, message: ET.Element, to: JID, *, sender: Session | None) -> bool:
        """Route ``message`` (its 'from' set) to the local user ``to`` per RFC 6121 §8.5:
        commit what must be durable, then hand it to sessions. True if a session took it or
        it was stored offline. Errors go to ``sender`` when there is one."""
        return await (await self.accept_delivery(message, to, sender=sender)).complete()

    async def accept_delivery(
        self, message: ET.Element, to: JID, *, sender: Session | None
    ) -> PendingDelivery:
        """The first half of `deliver`: route ``message`` and hand its record to the log
        without waiting for the disk; the caller completes what this returns, in order (a
        federation stream pipelines a peer's messages this way, as c2s does a client's)."""
        pending = PendingDelivery(sender)
        from_jid = _from_jid(message, sender)
        if from_jid is None or not self._refused_by_block(pending, message, from_jid, to):
            await self._accept(pending, message, to)
        return pending

    async def _accept(self, pending: PendingDelivery, message: ET.Element, to: JID) -> None:
        """Everything of `deliver` up to handing the record to the log; what is left to do
        once it is durable goes into ``pending``."""
        sender = pending.sender
        mtype = message.get("type", "normal")
        direct = self._route(message, to, pending)
        if direct is None:
            return
        from_jid = _from_jid(message, sender)
        recipient = to.bare
        sender_user = (
            from_jid.bare if from_jid is not None and self.ctx.user_exists(from_jid) else None
        )
        to_self = sender_user == recipient
        offline = not direct and mtype in ("chat", "normal")
        if offline and not (self.durable and storable(message)):
            if not self.durable:
                pending.bounce(message, "service-unavailable")
            return  # content-less (chat states) or no-store: dropped
        archive_in = archive_out = False
        if self.durable and archivable(message):
            archive_in = from_jid is not None and self.mam.archives_with(recipient, from_jid)
            archive_out = (
                sender_user is not None and not to_self and self.mam.archives_with(sender_user, to)
            )
        copies = carbons.eligible(message)
        carbons.strip_private(message)
        inbound, inbound_id = _stamped_copy(message, recipient if archive_in else None)
        outbound, outbound_id = (
            (inbound, inbound_id)
            if to_self
            else _stamped_copy(message, sender_user if archive_out else None)
        )

        if offline and not self.offline.try_reserve(str(recipient)):
            pending.bounce(message, "service-unavailable", "offline storage is full")
            return
        commit: Pending | None = None
        try:
            stamp = self._clock()
            entries: list[dict[str, Any]] = []
            if archive_in or offline:
                with_jid = str(from_jid) if from_jid is not None else ""
                entries.append(
                    await self._entry(recipient, inbound, with_jid, stamp, inbound_id, offline)
                )
            if archive_out and sender_user is not None:
                entries.append(
                    await self._entry(sender_user, outbound, str(to), stamp, outbound_id, False)
                )
            if entries:
                commit = await self.ctx.store.submit(Record(MESSAGE_RECORD, {"e": entries}))
        except RecordTooLargeError:
            pending.bounce(message, "policy-violation", "message too large to store")
            if offline:
                self.offline.release(str(recipient))
            return
        except BaseException:
            if offline:
                self.offline.release(str(recipient))
            raise

        async def hand_over() -> None:
            # Sessions chosen at accept time may have gone while the record was written.
            live = [s for s in direct if self.ctx.sessions.get(s.jid) is s]
            for session in live:
                session.send(inbound)
            if copies:
                self._send_carbons(
                    live, sender, sender_user, recipient, inbound, outbound, offline=offline
                )
            if offline:
                # A resource may have come online while the record was being written, after
                # its flush had looked at the queue: hand it over now rather than next login.
                online = self._available(recipient)
                if online:
                    await self.offline.flush(max(online, key=lambda s: s.priority))

        release = partial(self.offline.release, str(recipient)) if offline else None
        pending.accepted(commit, hand_over, release)

    # ----- helpers -----------------------------------------------------------------------

    def _refused_by_block(
        self, pending: PendingDelivery, message: ET.Element, sender: JID, to: JID
    ) -> bool:
        """XEP-0191: True if a blocklist stops ``message`` (the sender then gets its error)."""
        if self.blocking is None:
            return False
        why = self.blocking.blocked(sender, to)
        if why is None:
            return False
        if pending.sender is not None and message.get("type") != "error":
            pending.reply(self.blocking.refusal(message, why))
        return True

    def _route(
        self, message: ET.Element, to: JID, pending: PendingDelivery
    ) -> list[Session] | None:
        """The sessions that get ``message`` itself (possibly none), or None when it goes
        nowhere at all (bounced or dropped)."""
        mtype = message.get("type", "normal")
        if to.resource:
            target = self.ctx.sessions.get(to)
            if target is not None:
                return [target]
        if mtype == "groupchat":
            pending.bounce(message, "service-unavailable")
            return None
        if mtype == "error" or (to.resource and mtype == "headline"):
            return None  # RFC 6121 §8.5.2.1.1 and §8.5.3.2.1: silently ignored
        return self._available(to.bare)

    def _available(self, bare: JID) -> list[Session]:
        return [s for s in self.ctx.sessions.of_user(bare) if s.available and s.priority >= 0]

    async def _entry(
        self,
        user: JID,
        stanza: ET.Element,
        with_jid: str,
        stamp: int,
        archive_id: str | None,
        offline: bool,
    ) -> dict[str, Any]:
        body = await self.ctx.store.sealed_body(
            MESSAGE_RECORD, str(user), pack_payload(with_jid, stanza)
        )
        body["t"] = stamp
        if archive_id is not None:
            body["a"] = archive_id
            body["k"] = self.archive_keep
        if offline:
            body["o"] = True
        return body

    def _send_carbons(
        self,
        direct: list[Session],
        sender: Session | None,
        sender_user: JID | None,
        recipient: JID,
        inbound: ET.Element,
        outbound: ET.Element,
        *,
        offline: bool = False,
    ) -> None:
        # No resource gets two copies: those that got the message, and the sending one,
        # get no carbon; a message to oneself yields sent carbons only. A message routed to
        # offline storage gets no received carbons: the offline flush delivers it.
        served: set[Session] = set(direct)
        if sender is not None:
            served.add(sender)
        sessions = self.ctx.sessions
        if sender_user is not None:
            for session in sessions.of_user(sender_user):
                if session not in served and carbons.wants_copies(session):
                    session.send(carbons.wrap("sent", sender_user, session.jid, outbound))
                    served.add(session)
        if sender_user != recipient and not offline:
            for session in sessions.of_user(recipient):
                if session not in served and carbons.wants_copies(session):
                    session.send(carbons.wrap("received", recipient, session.jid, inbound))


class RemoteQueueFullError(Exception):
    """The destination domain's durable queue is full."""


class RemoteQueue(Protocol):
    """Where messages for other domains go (villaged.federation.service.Federation)."""

    def permits(self, domain: str) -> bool: ...

    def has_room(self, domain: str) -> bool: ...

    async def enqueue(self, sender: JID, stanza: ET.Element, to: JID) -> Pending:
        """Durably queue ``stanza``; raises `RemoteQueueFullError`."""
        ...

    def wake(self, domain: str) -> None: ...


def _stamped_copy(message: ET.Element, archive_owner: JID | None) -> tuple[ET.Element, str | None]:
    """A copy of ``message`` for one side of the conversation; when that side's archive
    (``archive_owner``) keeps it, with a fresh stanza-id naming that archive."""
    stamped = copy.deepcopy(message)
    if archive_owner is None:
        return stamped, None
    archive_id = new_archive_id()
    add_stanza_id(stamped, str(archive_owner), archive_id)
    return stamped, archive_id


def _registered_view(ctx: ImContext) -> MessageStoreView | None:
    try:
        view = ctx.store.state.view(MessageStoreView.name)
    except KeyError:
        return None
    return view if isinstance(view, MessageStoreView) else None


def _from_jid(message: ET.Element, sender: Session | None) -> JID | None:
    if sender is not None:
        return sender.jid  # what the stream stamped as 'from', already parsed
    try:
        return JID.parse(message.get("from", ""))
    except JIDError:
        return None
