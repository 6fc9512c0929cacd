"""Offline message storage (XEP-0160): the per-user queue and its delivery on initial presence.

What this module owns:

* which messages may wait for a user (`storable`): chat and normal messages with content,
  unless they carry the XEP-0334 ``no-store`` hint. Chat states alone are dropped rather than
  stored or bounced (they are stale by the time anyone reads them); headlines are never stored
  (RFC 6121 §8.5.2.1.1), groupchat is answered with an error and errors are dropped by the
  router in ``messages``;
* `OfflineQueues`: per user, oldest first, ``(record id, timestamp, sealed payload)``. Entries
  are made by the ``message`` record (see ``messages``), which may share its sealed payload
  with the user's archive entry, and removed by ``offline.delivered``;
* `Offline.flush`: delivery to a session that sent initial presence with a non-negative
  priority, each message with ``<delay from='domain' stamp='…'/>`` (XEP-0203), then one
  durable record removing exactly the messages handed to the session — a message that arrives
  meanwhile is not in that record and stays queued;
* the per-user bound: a full queue makes the sender's message bounce with
  ``service-unavailable`` (XEP-0160 process flow, step 3).

Record type owned here (applied by ``messages.MessageStoreView``):

* ``offline.delivered`` v1 — ``{"u": bare JID, "ids": [record id, …]}`` (at most
  `MAX_IDS_PER_RECORD`).

Delivery is at least once: a crash after a message was handed to the connection and before
the removal record is durable delivers it again on the next login, with the same stanza-id.
Until stream management (XEP-0198) lands, "handed to the connection" is all a flush can know.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from villaged.im.mam import (
    NS_DELAY,
    PAYLOAD_RECORD,
    format_stamp,
    has_hint,
    has_im_content,
    unpack_stanza,
)
from villaged.storage.errors import DecryptError, ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal

FEATURE: Final = "msgoffline"  # the XEP-0160 disco feature
DELIVERED_RECORD: Final = "offline.delivered"
MAX_IDS_PER_RECORD: Final = 1000
DEFAULT_LIMIT: Final = 500

log = logging.getLogger("villaged.im.offline")


def storable(message: ET.Element) -> bool:
    """Whether a chat/normal ``message`` for a user with no available resource may wait."""
    if message.get("type", "normal") not in ("chat", "normal"):
        return False
    if has_hint(message, "no-store"):
        return False
    return has_hint(message, "store") or has_im_content(message)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    record_id: str
    stamp: int  # microseconds since the epoch, when the server accepted it
    sealed: Mapping[str, Any]


class OfflineQueues:
    """Every user's offline queue, oldest first."""

    def __init__(self) -> None:
        self._users: dict[str, dict[str, QueuedMessage]] = {}

    def count(self, user: str) -> int:
        return len(self._users.get(user, ()))

    def pending(self, user: str) -> list[QueuedMessage]:
        return list(self._users.get(user, {}).values())

    def add(self, user: str, message: QueuedMessage) -> None:
        self._users.setdefault(user, {})[message.record_id] = message

    def remove(self, user: str, record_ids: Iterable[str]) -> None:
        queue = self._users.get(user)
        if queue is None:
            return
        for record_id in record_ids:
            queue.pop(record_id, None)
        if not queue:
            del self._users[user]

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def to_snapshot(self) -> dict[str, list[list[Any]]]:
        return {
            user: [[m.record_id, m.stamp, dict(m.sealed)] for m in queue.values()]
            for user, queue in self._users.items()
        }

    def restore(self, data: Mapping[str, Sequence[Sequence[Any]]], unseal: Unseal) -> None:
        self._users.clear()
        for user, rows in data.items():
            for record_id, stamp, sealed in rows:
                try:
                    unseal(PAYLOAD_RECORD, user, record_id, sealed)
                except ShreddedError:
                    continue  # its user was deleted: nothing of theirs will be delivered
                self.add(user, QueuedMessage(record_id, stamp, sealed))


class Offline:
    """Offline delivery: reservations against the bound, and the flush on initial presence."""

    def __init__(self, ctx: ImContext, queues: OfflineQueues, *, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError("the offline queue limit must be at least 1")
        self.ctx = ctx
        self.queues = queues
        self.limit = limit
        # Messages sealed or being committed but not yet applied: they count against the
        # bound so that concurrent senders cannot overshoot it.
        self._reserved: dict[str, int] = {}
        # One flush at a time per user, so two flushes never hand out the same message.
        self._flush_locks: dict[str, trio.Lock] = {}

    def register(self) -> None:
        self.ctx.handlers.server_features.add(FEATURE)

    def try_reserve(self, user: str) -> bool:
        """Take a place in ``user``'s queue for a message about to be committed; False if the
        queue is full. Every successful call is paired with `release`."""
        reserved = self._reserved.get(user, 0)
        if self.queues.count(user) + reserved >= self.limit:
            return False
        self._reserved[user] = reserved + 1
        return True

    def release(self, user: str) -> None:
        left = self._reserved[user] - 1
        if left:
            self._reserved[user] = left
        else:
            del self._reserved[user]

    async def flush(self, session: Session) -> int:
        """Deliver ``session``'s user's queue to it, oldest first, then remove durably what it
        took. Returns how many messages left the queue. Only for an available session with a
        non-negative priority (XEP-0160 process flow, as RFC 6121 routes bare-JID messages)."""
        if not session.available or session.priority < 0:
            return 0
        user = str(session.jid.bare)
        lock = self._flush_locks.setdefault(user, trio.Lock())
        try:
            async with lock:
                return await self._flush_locked(session, user)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._flush_locks.pop(user, None)

    async def _flush_locked(self, session: Session, user: str) -> int:
        handed: list[str] = []
        for queued in self.queues.pending(user):
            stanza = self._stanza(user, queued)
            if stanza is not None and not session.send(stanza):
                break  # the session is being ended; the rest waits for the next login
            handed.append(queued.record_id)
        for start in range(0, len(handed), MAX_IDS_PER_RECORD):
            ids = handed[start : start + MAX_IDS_PER_RECORD]
            await self.ctx.store.commit(Record(DELIVERED_RECORD, {"u": user, "ids": ids}))
        return len(handed)

    def _stanza(self, user: str, queued: QueuedMessage) -> ET.Element | None:
        body = {"u": user, "id": queued.record_id, "s": queued.sealed}
        try:
            stanza = unpack_stanza(self.ctx.store.unseal_body(PAYLOAD_RECORD, body))
        except (ShreddedError, DecryptError, StateError) as exc:
            # Undeliverable for good: removing it is better than failing every login.
            log.error(
                "offline message unreadable; dropped",
                extra={"event": "offline.unreadable", "user": user, "error": str(exc)},
            )
            return None
        ET.SubElement(
            stanza,
            f"{{{NS_DELAY}}}delay",
            {"from": self.ctx.domain, "stamp": format_stamp(queued.stamp)},
        )
        return stanza


def validate_delivered(body: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The user and ids of an ``offline.delivered`` body; StateError if malformed."""
    user, ids = body.get("u"), body.get("ids")
    if not isinstance(user, str) or not user:
        raise StateError(f"{DELIVERED_RECORD} has no user")
    if (
        not isinstance(ids, list)
        or not 0 < len(ids) <= MAX_IDS_PER_RECORD
        or not all(isinstance(i, str) and i for i in ids)
    ):
        raise StateError(f"{DELIVERED_RECORD} needs 1 to {MAX_IDS_PER_RECORD} record ids")
    return user, ids
