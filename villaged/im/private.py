"""XEP-0049 Private XML Storage (``jabber:iq:private``): each user keeps XML fragments on the
server, one per (element name, namespace), readable and writable only by that user.

This module owns the ``private`` view and its record type, the iq handlers, and the helpers
both it and :mod:`villaged.im.vcard` use to keep client XML at rest:

* ``private.set`` v1 — ``{"u": bare JID, "id": record id, "s": sealed item}``. The sealed item is
  msgpack ``[Clark tag, serialized element]``; an empty serialization removes the item. The
  tag is sealed too: which namespaces a user stores (bookmarks, a client's preferences) is
  theirs to keep private, so the view learns it only by unsealing at apply time.

The view keeps only the sealed bodies (which the snapshot needs anyway); plaintext exists only
while a request is answered. A record whose user's data key is gone is skipped (the account
was deleted), so deleted users' items vanish on the next start. Items applied before a
deletion in the same run stay in memory until then, unreadable: reads treat them as absent
and the quota does not count them.

Protocol choices, after XEP-0049 §2.3 and what Prosody does:

* a set carries one or more elements (the XEP allows several); an element with no attributes,
  children or text removes the stored one, as in Prosody, so an empty fragment costs nothing;
* a get names exactly one element (the XEP: a client MUST NOT ask for more than one
  namespace); none or several is ``bad-request``, RFC 6120's name for the XEP's "Bad Format";
* a set with no element, an element without a namespace, or one in a namespace the XEP lists
  as reserved (``jabber:client``, ``jabber:server``, ``jabber:iq:private``, ``vcard-temp``) is
  ``not-acceptable``; the wider reservation of every ``jabber:*`` and ``http://jabber.org/*``
  namespace is OPTIONAL in the XEP and not applied, so no client's existing data is refused;
* an iq to another user's bare JID is ``forbidden`` (the XEP prefers it to
  ``service-unavailable``);
* quotas per item, per user in bytes and per user in items are ``not-acceptable`` with a text
  naming the limit, the condition RFC 6120 gives a request the server's criteria refuse;
* the feature is advertised in the server's disco#info, as Prosody does (the XEP defines no
  disco feature; ``jabber:iq:private`` is the namespace's own name).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError, text
from villaged.xmpp import xml
from villaged.xmpp.stanza import error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Mapping

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal
    from villaged.storage.store import Store

NS_PRIVATE: Final = "jabber:iq:private"
QUERY: Final = f"{{{NS_PRIVATE}}}query"
PRIVATE_SET: Final = "private.set"

# XEP-0049 §2.3 names these; storing a stanza, a private-storage query or a vCard in private
# storage would only confuse the clients that read it back.
RESERVED_NAMESPACES: Final = frozenset({"jabber:client", "jabber:server", NS_PRIVATE, "vcard-temp"})

MAX_ITEM_BYTES: Final = 128 * 1024  # a few hundred XEP-0048 bookmarks
MAX_USER_BYTES: Final = 256 * 1024
MAX_USER_ITEMS: Final = 64

# What a sealed record adds to its payload: msgpack framing, record type and id, the AES-GCM
# nonce and tag, and the user's bare JID (at most 2047 bytes, RFC 7622 §3.1).
RECORD_OVERHEAD: Final = 4096

_STORED_STREAM_OPEN: Final = f"<stream:stream xmlns:stream='{xml.STREAMS_NS}'>".encode()
_XML_WHITESPACE: Final = " \t\r\n"


# ----- XML at rest (shared with villaged.im.vcard) ------------------------------------------


def element_bytes(element: ET.Element) -> bytes:
    """``element`` as a standalone document fragment that declares its own namespace."""
    return xml.serialize(element, default_ns=None)


def element_from_bytes(data: bytes) -> ET.Element:
    """Parse what `element_bytes` wrote, with the stream parser every stanza goes through.

    The bytes are our own (authenticated on unsealing) and were inside the stanza limits when
    they arrived, so the limits here only need to let them through; a ValueError or
    XmlStreamError means they are not what `element_bytes` writes.
    """
    parser = xml.StreamParser(
        xml.XmlLimits(max_stanza_bytes=len(data) + 1, max_depth=4096, max_attributes=4096)
    )
    parser.receive_data(_STORED_STREAM_OPEN + data)
    while True:
        event = parser.next_event()
        if isinstance(event, xml.StanzaReceived):
            return event.element
        if event is xml.NEED_DATA:
            raise ValueError("stored XML is not one complete element")


def is_empty(element: ET.Element) -> bool:
    """No attributes, no children and no text but whitespace: storing it would say nothing."""
    return (
        not element.attrib and not len(element) and not (element.text or "").strip(_XML_WHITESPACE)
    )


def sealed_parts(rtype: str, body: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
    """``(user, record id, envelope)`` of a body made by ``Store.sealed_body``, else StateError."""
    user, record_id, sealed = text(body, "u"), text(body, "id"), body.get("s")
    if not isinstance(sealed, dict):
        raise StateError(f"{rtype} for {user} has no sealed payload")
    return user, record_id, sealed


def check_record_fits(store: Store, payload_bytes: int, what: str) -> None:
    """Refuse, at startup, a limit whose largest record the log would refuse at run time."""
    largest = payload_bytes + RECORD_OVERHEAD
    if largest > store.options.max_record_bytes:
        raise ValueError(
            f"{what} allows records of {largest} bytes, more than the store's max_record_bytes "
            f"({store.options.max_record_bytes})"
        )


def namespace_of(tag: str) -> str:
    return tag[1 : tag.index("}")] if tag.startswith("{") else ""


# ----- the view ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredItem:
    body: Mapping[str, Any]  # the record body as logged: {"u", "id", "s"}
    size: int  # bytes of the serialized element, what the quotas count


def pack_item(tag: str, data: bytes) -> bytes:
    packed: bytes = msgpack.packb([tag, data], use_bin_type=True)
    return packed


def unpack_item(plaintext: bytes) -> tuple[str, bytes]:
    try:
        tag, data = msgpack.unpackb(plaintext, raw=False)
    except (ValueError, TypeError) as exc:
        raise StateError(f"sealed private item is malformed: {exc}") from exc
    if not isinstance(tag, str) or not isinstance(data, bytes):
        raise StateError("sealed private item is not [tag, bytes]")
    return tag, data


class PrivateView:
    """Each user's private XML items by Clark tag, sealed."""

    name = "private"
    record_types: Mapping[str, int] = {PRIVATE_SET: 1}

    def __init__(self) -> None:
        self._items: dict[str, dict[str, StoredItem]] = {}

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        sealed_parts(rtype, body)

    def forget_user(self, jid: str) -> None:
        """The account was deleted (State calls this in log order)."""
        self._items.pop(jid, None)

    def items(self, user: str) -> Mapping[str, StoredItem]:
        return self._items.get(user, {})

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        user, record_id, sealed = sealed_parts(rtype, body)
        self._put(user, record_id, sealed, unseal)

    def to_snapshot(self) -> list[list[Any]]:
        return [
            [user, item.body["id"], item.body["s"]]
            for user, items in self._items.items()
            for item in items.values()
        ]

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._items.clear()
        for user, record_id, sealed in data or ():
            self._put(user, record_id, sealed, unseal)

    def _put(self, user: str, record_id: str, sealed: Mapping[str, Any], unseal: Unseal) -> None:
        try:
            tag, data = unpack_item(unseal(PRIVATE_SET, user, record_id, sealed))
        except ShreddedError:
            return  # the account was deleted after this record: its items went with it
        items = self._items.setdefault(user, {})
        if data:
            items[tag] = StoredItem({"u": user, "id": record_id, "s": sealed}, len(data))
        else:
            items.pop(tag, None)
        if not items:
            del self._items[user]


# ----- the feature ------------------------------------------------------------------------


@dataclass
class _Writers:
    lock: trio.Lock
    count: int = 0


class PrivateStorage:
    """Answers ``jabber:iq:private`` iqs and writes ``private.set`` records."""

    def __init__(
        self,
        ctx: ImContext,
        view: PrivateView,
        *,
        max_item_bytes: int = MAX_ITEM_BYTES,
        max_user_bytes: int = MAX_USER_BYTES,
        max_user_items: int = MAX_USER_ITEMS,
    ) -> None:
        # A packed item holds its tag, never longer than the element written out, plus msgpack
        # framing: twice the element and a little.
        check_record_fits(ctx.store, 2 * max_item_bytes + 16, "private storage max_item_bytes")
        self.ctx = ctx
        self.view = view
        self.max_item_bytes = max_item_bytes
        self.max_user_bytes = max_user_bytes
        self.max_user_items = max_user_items
        # One writer per user at a time, so that two resources cannot both pass the quota
        # check before either has written. Entries live only while someone holds or waits.
        self._writers: dict[str, _Writers] = {}

    async def own_storage(self, session: Session, iq: ET.Element) -> ET.Element:
        query = iq[0]
        if query.tag != QUERY:
            return error_reply(
                iq, "bad-request", text="expected <query xmlns='jabber:iq:private'/>"
            )
        children = list(query)
        if iq.get("type") == "get":
            if len(children) != 1:
                return error_reply(iq, "bad-request", text="a get names exactly one element")
            if refusal := _refusal(children[0]):
                return error_reply(iq, "not-acceptable", text=refusal)
            tag = children[0].tag
            answer = ET.Element(QUERY)
            stored = self.load(str(session.jid.bare), tag)
            # Not `or`: an element without children is false.
            answer.append(ET.Element(tag) if stored is None else stored)
            return iq_result(iq, answer)
        if not children:
            return error_reply(iq, "not-acceptable", text="a set carries at least one element")
        for child in children:
            if refusal := _refusal(child):
                return error_reply(iq, "not-acceptable", text=refusal)
        # Several elements with one tag: the last wins, as if they had come one by one.
        changes = {
            child.tag: b"" if is_empty(child) else element_bytes(child) for child in children
        }
        user = str(session.jid.bare)
        async with self._one_writer(user):
            if refusal := self._over_quota(user, changes):
                return error_reply(iq, "not-acceptable", text=refusal)
            existing = self.view.items(user)
            for tag, data in changes.items():
                if data or tag in existing:
                    # One record per item keeps every envelope replaceable on its own; a set of
                    # several is therefore not atomic across a crash, and a client that got no
                    # answer sends it again.
                    body = await self.ctx.store.sealed_body(PRIVATE_SET, user, pack_item(tag, data))
                    await self.ctx.store.commit(Record(PRIVATE_SET, body))
        return iq_result(iq)

    async def other_storage(self, session: Session, iq: ET.Element) -> ET.Element:
        return error_reply(iq, "forbidden", text="private storage is its owner's alone")

    def load(self, user: str, tag: str) -> ET.Element | None:
        """``user``'s stored element with this Clark tag, or None."""
        item = self.view.items(user).get(tag)
        if item is None:
            return None
        try:
            plaintext = self.ctx.store.unseal_body(PRIVATE_SET, item.body)
        except ShreddedError:
            return None  # stored by a deleted account of the same name
        return element_from_bytes(unpack_item(plaintext)[1])

    def _over_quota(self, user: str, changes: Mapping[str, bytes]) -> str:
        for tag, data in changes.items():
            if len(data) > self.max_item_bytes:
                return f"{tag} is {len(data)} bytes; an item may have {self.max_item_bytes}"
        sizes = dict(self._live_sizes(user))
        for tag, data in changes.items():
            if data:
                sizes[tag] = len(data)
            else:
                sizes.pop(tag, None)
        if len(sizes) > self.max_user_items:
            return f"private storage holds at most {self.max_user_items} elements"
        if (total := sum(sizes.values())) > self.max_user_bytes:
            return f"private storage would hold {total} bytes; its limit is {self.max_user_bytes}"
        return ""

    def _live_sizes(self, user: str) -> Iterable[tuple[str, int]]:
        # Items a deleted account of the same name left behind do not count against the quota.
        for tag, item in self.view.items(user).items():
            try:
                self.ctx.store.unseal_body(PRIVATE_SET, item.body)
            except ShreddedError:
                continue
            yield tag, item.size

    @contextlib.asynccontextmanager
    async def _one_writer(self, user: str) -> AsyncIterator[None]:
        writers = self._writers.get(user)
        if writers is None:
            writers = self._writers[user] = _Writers(trio.Lock())
        writers.count += 1
        try:
            async with writers.lock:
                yield
        finally:
            writers.count -= 1
            if not writers.count:
                del self._writers[user]


def _refusal(element: ET.Element) -> str:
    namespace = namespace_of(element.tag)
    if not namespace:
        return "a stored element needs a namespace of its own"
    if namespace in RESERVED_NAMESPACES:
        return f"namespace {namespace} is reserved"
    return ""


def register(
    ctx: ImContext,
    view: PrivateView,
    *,
    max_item_bytes: int = MAX_ITEM_BYTES,
    max_user_bytes: int = MAX_USER_BYTES,
    max_user_items: int = MAX_USER_ITEMS,
) -> PrivateStorage:
    """Answer ``jabber:iq:private`` for the sender's own account (and ``forbidden`` for anyone
    else's), and list the feature in the server's disco#info."""
    storage = PrivateStorage(
        ctx,
        view,
        max_item_bytes=max_item_bytes,
        max_user_bytes=max_user_bytes,
        max_user_items=max_user_items,
    )
    ctx.handlers.on_account_iq(NS_PRIVATE, storage.own_storage, feature=False)
    ctx.handlers.on_contact_iq(NS_PRIVATE, storage.other_storage)
    ctx.handlers.server_features.add(NS_PRIVATE)
    return storage
