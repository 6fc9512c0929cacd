"""XEP-0191 Blocking Command (``urn:xmpp:blocking``): each user's list of blocked JIDs, kept
sealed and durable, and the rule every other feature asks before it passes a stanza on.

This module owns:

* `BlockingView`, the durable state: per user, the blocked JIDs in the order they were
  blocked;
* the ``urn:xmpp:blocking`` iq handler for the user's own account: ``<blocklist/>`` get,
  ``<block/>`` set with one or more items, ``<unblock/>`` set with items or empty ("unblock
  all"), and the pushes of every change to the user's *interested* resources — those that
  asked for the blocklist in their session (§3.3), marked by `SESSION_FEATURE` in
  ``Session.features``;
* `Blocking.blocked`, the one answer to "may this stanza go from A to B?", and
  `Blocking.refusal`, the error its sender gets. The router (iqs), ``messages`` (before a
  message is archived or queued) and ``presence`` (broadcast, probes, directed presence,
  subscription stanzas) call them; ``presence`` also sends the presence a change calls for
  (`BlockChange`, through the ``on_change`` hook).

Theory of operation
-------------------
A change is computed from the user's current list under a per-user lock, written as one
record holding the user's whole new list, and only once that record is durable and applied
are the pushes sent and presence adjusted (§3.3: unavailable presence to a newly blocked
contact that could see the user's presence; §3.4/§3.5: the current presence to a newly
unblocked one, and back from it, as a probe would bring it). A request that changes nothing
writes nothing and is still answered and pushed, as roster sets are.

Matching (§6, the rules of XEP-0016): an item ``user@domain/resource`` matches only that
resource; ``user@domain`` matches the bare JID and all its resources; ``domain/resource``
matches that resource at the domain; ``domain`` matches the domain itself, every address at
it and every address at a subdomain of it. So a JID is blocked when one of its *candidates*
(`candidates`) is on the list — at most three plus one per domain label, each a set lookup.

What a block stops, for a stanza from A to B where one of them is a local user with a list:

* B blocks A (inbound, §3.3): messages and iq get/set are answered ``service-unavailable``
  — the answer for an address with no account, so the block is not revealed — and never
  archived or queued offline; iq results and errors and every presence stanza (available,
  unavailable, subscriptions, probes) vanish without an answer;
* A blocks B (outbound, §3.3): messages, iq get/set, directed presence and subscription
  stanzas are refused with ``not-acceptable`` and ``<blocked xmlns='urn:xmpp:blocking:errors'/>``;
  presence the server sends on A's behalf (broadcast, probe answers) simply skips B.

A user and their own resources never block each other, and the server itself (its bare
domain JID, which answers disco and pings) is never blocked: a user who blocks their own
domain still blocks every other account there, but not their server.

Record type (``s`` is a sealed envelope, see storage.crypto):

* ``blocking.list`` v1 — ``{"u": bare JID, "id": record id, "s": sealed list}``; the sealed
  payload is msgpack ``[jid, ...]``, the user's complete list after the change (canonical
  JID strings, in blocking order; empty once everything is unblocked). Which JIDs a user
  blocks is theirs alone: only the user's JID and the record id are in the clear. The view
  keeps each user's newest envelope, so a snapshot is ciphertext too.

One record per change holds the whole list, so a list is bounded in entries and in bytes
(`DEFAULT_MAX_ITEMS`, `DEFAULT_MAX_BYTES`) and the largest record is checked against the
store's limit at start. A deleted account's list is dropped when its ``account.delete`` is
applied (`BlockingView.forget_user`); on replay and restore, a list whose user's data key is
gone is skipped.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.im.private import check_record_fits, sealed_parts
from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import NS_CLIENT, error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal

log = logging.getLogger("villaged.im.blocking")

NS_BLOCKING: Final = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS: Final = "urn:xmpp:blocking:errors"
BLOCKLIST: Final = f"{{{NS_BLOCKING}}}blocklist"
BLOCK: Final = f"{{{NS_BLOCKING}}}block"
UNBLOCK: Final = f"{{{NS_BLOCKING}}}unblock"
ITEM: Final = f"{{{NS_BLOCKING}}}item"
BLOCKED_ERROR: Final = f"{{{NS_BLOCKING_ERRORS}}}blocked"

BLOCKLIST_RECORD: Final = "blocking.list"
#: Marks, in ``Session.features``, a session that asked for the blocklist (gets pushes).
SESSION_FEATURE: Final = "blocklist"

DEFAULT_MAX_ITEMS: Final = 1000
#: UTF-8 bytes of all blocked JIDs of one user together (1,000 JIDs of 130 bytes each).
DEFAULT_MAX_BYTES: Final = 128 * 1024
# msgpack framing of the list: at most 5 bytes per string and the array header.
_PACKING_OVERHEAD_PER_ITEM: Final = 5
_LOCK_STRIPES: Final = 64


# ----- matching ---------------------------------------------------------------------------


def candidates(jid: JID) -> Iterator[str]:
    """The blocklist items that would match ``jid`` (XEP-0191 §6), most specific first."""
    domain = jid.domain
    if jid.local:
        if jid.resource:
            yield str(jid)
        yield f"{jid.local}@{domain}"
    elif jid.resource:
        yield str(jid)
    if jid.local and jid.resource:
        yield f"{domain}/{jid.resource}"
    yield domain
    if not _is_ip_literal(domain):
        # "domain" also matches every address at a subdomain of it.
        rest = domain
        while (dot := rest.find(".")) >= 0:
            rest = rest[dot + 1 :]
            yield rest


def _is_ip_literal(domain: str) -> bool:
    try:
        ipaddress.ip_address(domain.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


# ----- the view ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _UserList:
    record_id: str
    envelope: Mapping[str, Any]
    jids: tuple[str, ...]  # in blocking order
    members: frozenset[str]


def pack_list(jids: Sequence[str]) -> bytes:
    packed: bytes = msgpack.packb(list(jids), use_bin_type=True)
    return packed


def unpack_list(plain: bytes) -> tuple[str, ...]:
    try:
        jids = msgpack.unpackb(plain, raw=False)
    except (ValueError, TypeError) as exc:
        raise StateError(f"sealed blocklist is malformed: {exc}") from exc
    if not isinstance(jids, list) or not all(isinstance(j, str) and j for j in jids):
        raise StateError("sealed blocklist is not a list of JIDs")
    return tuple(jids)


class BlockingView:
    """Each user's blocked JIDs (canonical strings), rebuilt from the log."""

    name = "blocking"
    record_types: Mapping[str, int] = {BLOCKLIST_RECORD: 1}

    def __init__(self) -> None:
        self._lists: dict[str, _UserList] = {}

    def blocklist(self, user: str) -> tuple[str, ...]:
        found = self._lists.get(user)
        return found.jids if found is not None else ()

    def blocks(self, user: str, jid: JID) -> bool:
        """Whether the local ``user`` (bare JID string) has blocked ``jid``."""
        found = self._lists.get(user)
        if found is None:
            return False
        members = found.members
        return any(candidate in members for candidate in candidates(jid))

    def any_lists(self) -> bool:
        """Whether any user blocks anything (lets the hot paths skip parsing addresses)."""
        return bool(self._lists)

    def forget_user(self, user: str) -> None:
        """The account was deleted (called in log order by the store's state)."""
        self._lists.pop(user, None)

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        sealed_parts(rtype, body)

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        user, record_id, envelope = sealed_parts(rtype, body)
        self._put(user, record_id, envelope, unseal)

    def to_snapshot(self) -> list[list[Any]]:
        return [
            [user, found.record_id, dict(found.envelope)] for user, found in self._lists.items()
        ]

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._lists.clear()
        for user, record_id, envelope in data or ():
            self._put(user, record_id, envelope, unseal)

    def _put(self, user: str, record_id: str, envelope: Mapping[str, Any], unseal: Unseal) -> None:
        try:
            jids = unpack_list(unseal(BLOCKLIST_RECORD, user, record_id, envelope))
        except ShreddedError:
            return  # the account was deleted after this record: its list went with it
        if jids:
            self._lists[user] = _UserList(record_id, envelope, jids, frozenset(jids))
        else:
            self._lists.pop(user, None)


# ----- the feature ------------------------------------------------------------------------


class Blocked(enum.Enum):
    """Why a stanza may not pass (see the module docstring)."""

    BY_SENDER = "by-sender"  # the sender's user blocks the recipient
    BY_RECIPIENT = "by-recipient"  # the recipient's user blocks the sender


@dataclass(frozen=True, slots=True)
class BlockChange:
    """A durable change of ``user``'s blocklist, for the presence it calls for.

    ``blocked``: items were added (else removed); ``changed``: the items added or removed;
    ``others``: the items blocked besides them (before a block, or still after an unblock).
    """

    user: JID
    blocked: bool
    changed: frozenset[str]
    others: frozenset[str]

    def affects(self, jid: JID) -> bool:
        """Whether ``jid`` went from not blocked to blocked (or back) with this change."""
        keys = list(candidates(jid))
        return any(k in self.changed for k in keys) and not any(k in self.others for k in keys)


class BlocklistFullError(Exception):
    """A block would hold more than a blocklist may."""


class Blocking:
    """The blocking feature. Build it after the store is open with ``view`` among its views,
    then `register` it with the handlers."""

    def __init__(
        self,
        ctx: ImContext,
        view: BlockingView,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        try:
            fed = ctx.store.state.view(BlockingView.name) is view
        except KeyError:
            fed = False
        if not fed:
            raise ValueError("the store was opened without this BlockingView among its views")
        check_record_fits(
            ctx.store, max_bytes + max_items * _PACKING_OVERHEAD_PER_ITEM + 8, "blocklist limit"
        )
        self.ctx = ctx
        self.view = view
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.on_change: Callable[[BlockChange], Awaitable[None]] | None = None
        self._server = JID("", ctx.domain)
        self._locks = [trio.Lock() for _ in range(_LOCK_STRIPES)]

    def register(
        self, *, on_change: Callable[[BlockChange], Awaitable[None]] | None = None
    ) -> None:
        """Answer ``urn:xmpp:blocking`` for the sender's own account and list it in the
        server's disco#info (§3.1 asks the server); ``on_change`` runs after each durable
        change (the presence feature's ``blocking_changed``)."""
        self.on_change = on_change
        self.ctx.handlers.on_account_iq(NS_BLOCKING, self.handle_iq, feature=False)
        self.ctx.handlers.server_features.add(NS_BLOCKING)

    # ----- the rule other features ask ----------------------------------------------------

    def blocked(self, sender: JID, recipient: JID) -> Blocked | None:
        """Whether a stanza from ``sender`` to ``recipient`` (as addressed, full or bare) is
        blocked, and by whom; None when it may pass."""
        view = self.view
        if not view.any_lists() or sender.bare == recipient.bare:
            return None
        if sender == self._server or recipient == self._server:
            return None
        if sender.local and view.blocks(str(sender.bare), recipient):
            return Blocked.BY_SENDER
        if recipient.local and view.blocks(str(recipient.bare), sender):
            return Blocked.BY_RECIPIENT
        return None

    def refusal(self, stanza: ET.Element, why: Blocked) -> ET.Element:
        """The error for the sender of a blocked message or iq get/set (§3.3)."""
        if why is Blocked.BY_RECIPIENT:
            return error_reply(stanza, "service-unavailable")
        reply = error_reply(stanza, "not-acceptable", error_type="cancel")
        reply[-1].append(ET.Element(BLOCKED_ERROR))
        return reply

    # ----- the iq -------------------------------------------------------------------------

    async def handle_iq(self, session: Session, iq: ET.Element) -> ET.Element:
        payload = iq[0]
        if iq.get("type") == "get":
            if payload.tag != BLOCKLIST:
                return error_reply(iq, "bad-request", text="a get carries <blocklist/>")
            session.features.add(SESSION_FEATURE)  # §3.3: it gets pushes from now on
            result = ET.Element(BLOCKLIST)
            for jid in self.view.blocklist(str(session.jid.bare)):
                ET.SubElement(result, ITEM, {"jid": jid})
            return iq_result(iq, result)
        if payload.tag not in (BLOCK, UNBLOCK):
            return error_reply(iq, "bad-request", text="a set carries <block/> or <unblock/>")
        items = payload.findall(ITEM)
        if len(items) > self.max_items:
            return error_reply(
                iq, "not-allowed", text=f"a blocklist holds at most {self.max_items} JIDs"
            )
        jids: dict[str, None] = {}  # canonical, in request order, without repeats
        for item in items:
            text = item.get("jid")
            if not text:
                return error_reply(iq, "bad-request", text="an item needs a jid")
            try:
                jids[str(JID.parse(text))] = None
            except JIDError as exc:
                return error_reply(iq, "jid-malformed", text=f"bad item jid: {exc}")
        if payload.tag == BLOCK:
            if not jids:
                return error_reply(iq, "bad-request", text="<block/> needs at least one item")
            try:
                await self._change(session.jid.bare, list(jids), block=True)
            except BlocklistFullError as exc:
                return error_reply(iq, "not-allowed", text=str(exc))
        else:
            await self._change(session.jid.bare, list(jids), block=False)
        return iq_result(iq)

    async def _change(self, user: JID, jids: list[str], *, block: bool) -> None:
        """Block or unblock ``jids`` (unblock with none: unblock all), durably; then push
        and tell the presence feature."""
        async with self._locked(user):
            old = self.view.blocklist(str(user))
            members = frozenset(old)
            if block:
                changed = [j for j in jids if j not in members]
                new = old + tuple(changed)
                self._check_room(new)
                others = members
            else:
                gone = members.intersection(jids) if jids else members
                changed = [j for j in old if j in gone]
                new = tuple(j for j in old if j not in gone)
                others = frozenset(new)
            if changed:
                body = await self.ctx.store.sealed_body(BLOCKLIST_RECORD, str(user), pack_list(new))
                await self.ctx.store.commit(Record(BLOCKLIST_RECORD, body))
                log.info(
                    "blocklist changed",
                    extra={
                        "event": "im.blocking.changed",
                        "user": str(user),
                        "blocked": block,
                        "count": len(changed),
                        "size": len(new),
                    },
                )
            self._push(user, BLOCK if block else UNBLOCK, jids)
            if changed and self.on_change is not None:
                await self.on_change(BlockChange(user, block, frozenset(changed), others))

    def _check_room(self, jids: Sequence[str]) -> None:
        if len(jids) > self.max_items:
            raise BlocklistFullError(f"a blocklist holds at most {self.max_items} JIDs")
        if sum(len(j.encode()) for j in jids) > self.max_bytes:
            raise BlocklistFullError(f"a blocklist holds at most {self.max_bytes} bytes of JIDs")

    def _push(self, user: JID, tag: str, jids: list[str]) -> None:
        """§3.3-§3.5: tell every interested resource of ``user`` about the change."""
        for session in self.ctx.sessions.of_user(user):
            if SESSION_FEATURE not in session.features:
                continue
            push = ET.Element(
                f"{{{NS_CLIENT}}}iq",
                {"type": "set", "id": f"push-{secrets.token_urlsafe(6)}", "to": str(session.jid)},
            )
            payload = ET.SubElement(push, tag)
            for jid in jids:
                ET.SubElement(payload, ITEM, {"jid": jid})
            session.send(push)

    @contextlib.asynccontextmanager
    async def _locked(self, user: JID) -> AsyncIterator[None]:
        # Striped so memory stays bounded: one change per user at a time, so the list a change
        # starts from is the newest, and pushes leave in the order the changes were made.
        async with self._locks[hash(user) % _LOCK_STRIPES]:
            yield
