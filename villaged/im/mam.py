"""XEP-0313 Message Archive Management (``urn:xmpp:mam:2`` and ``urn:xmpp:mam:2#extended``),
XEP-0441 archiving preferences, and the per-user archive index they read.

What this module owns:

* which messages are worth keeping (`has_im_content`, `archivable`): XEP-0313's rules for
  user archives say they SHOULD hold every chat/normal message with a body; receipts, chat
  markers and encrypted payloads are kept too (they carry conversation state a second device
  needs), and the XEP-0334 hints ``no-store``, ``no-permanent-store`` and ``store`` are obeyed;
* the sealed payload of an archived or offline message (`pack_payload`, `unpack_stanza`):
  msgpack ``{"w": the correspondent's JID, "x": the stanza as a standalone XML document}``,
  sealed under the archive owner's data key with record type `PAYLOAD_RECORD`;
* `Archives`: per user, in archive order, ``(archive id, timestamp, correspondent, sealed
  payload)``. The view that applies records (``messages.MessageStoreView``) holds it; keeping
  the sealed payload in the view means snapshots carry it and a restart needs no log reads.
  A later issue should move payloads out of memory: keep only log references here, read bodies
  from the log, and give compaction a retention floor so it never drops a referenced segment;
* archive preferences (`ArchivePrefs`, `PrefsTable`), durable and sealed (record ``mam.prefs``);
* the iq handler (`Mam`): queries with the ``with``/``start``/``end`` form fields (and the
  #extended ``after-id``/``before-id``/``ids``), XEP-0059 paging, ``flip-page``, form
  discovery, archive metadata, and preferences get/set;
* XEP-0082 timestamps (`parse_stamp`, `format_stamp`).

Ordering: an archive is in log order, which is the order its owner received the messages in.
Timestamps are made non-decreasing within an archive when applied (a clock step backwards
must not make ``start``/``end`` filters disagree with that order).

Retention: every archived entry carries the archive bound in force when it was written
(``"k"``: keep the newest k entries); applying it drops the oldest entries beyond that bound.
The bound travels in the record rather than in configuration so that replaying the log gives
the same archive whatever the configuration is today; dropping only the oldest leaves no gap
(XEP-0313, "Message retention and deletion"), and dropped ids are never reused (they are random).

``default='roster'`` needs the roster: `Mam`'s owner passes an ``in_roster`` callable; with
none, 'roster' is accepted and stored, and treated as 'always'.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final

import msgpack

from villaged.storage.errors import DecryptError, ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError
from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import NS_CLIENT, error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal

NS_MAM: Final = "urn:xmpp:mam:2"
NS_MAM_EXTENDED: Final = "urn:xmpp:mam:2#extended"
NS_SID: Final = "urn:xmpp:sid:0"
NS_RSM: Final = "http://jabber.org/protocol/rsm"
NS_FORWARD: Final = "urn:xmpp:forward:0"
NS_DELAY: Final = "urn:xmpp:delay"
NS_DATA: Final = "jabber:x:data"
NS_HINTS: Final = "urn:xmpp:hints"

#: The record type message payloads are sealed under (the record that carries them).
PAYLOAD_RECORD: Final = "message"
#: Archive preferences: ``{"u": user, "id": record id, "s": sealed prefs}``.
PREFS_RECORD: Final = "mam.prefs"

MAX_PAGE: Final = 250
DEFAULT_PAGE: Final = 50
MAX_PREFS_JIDS: Final = 1000  # per list: preferences are one sealed record, so bound it
MAX_QUERY_IDS: Final = MAX_PAGE

# Payloads that make a message part of a conversation even without a <body/>.
_CONTENT_NAMESPACES: Final = frozenset(
    {
        "urn:xmpp:receipts",  # XEP-0184
        "urn:xmpp:chat-markers:0",  # XEP-0333
        "urn:xmpp:eme:0",  # XEP-0380: whatever is encrypted is presumed to matter
        "eu.siacs.conversations.axolotl",  # OMEMO (legacy)
        "urn:xmpp:omemo:2",
        "urn:xmpp:openpgp:0",  # XEP-0373
        "jabber:x:encrypted",  # XEP-0027
        "urn:xmpp:jingle-message:0",  # XEP-0353 call invitations
        "urn:xmpp:jingle-message:1",
    }
)
_BODY: Final = f"{{{NS_CLIENT}}}body"
_SUBJECT: Final = f"{{{NS_CLIENT}}}subject"
_STANZA_ID: Final = f"{{{NS_SID}}}stanza-id"

# Stored stanzas were parsed under the c2s limits (at most 16 MiB, depth 256, 1024 attributes
# by configuration); reading them back must not be stricter than what was accepted.
_STORED_LIMITS: Final = xml.XmlLimits(
    max_stanza_bytes=64 * 2**20, max_depth=260, max_attributes=1030
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DATETIME: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)

log = logging.getLogger("villaged.im.mam")


# ----- what is worth keeping ---------------------------------------------------------------


def has_hint(message: ET.Element, hint: str) -> bool:
    """Whether ``message`` carries the XEP-0334 processing hint ``hint``."""
    return message.find(f"{{{NS_HINTS}}}{hint}") is not None


def has_im_content(message: ET.Element) -> bool:
    """A body, a subject, or a payload that belongs to a conversation (receipts, markers,
    encrypted content): what users expect on every device and in history. Chat states alone
    are not content (XEP-0085 notifications are ephemeral)."""
    for child in message:
        tag = child.tag
        if tag in (_BODY, _SUBJECT):
            return True
        if tag.startswith("{") and tag[1 : tag.index("}")] in _CONTENT_NAMESPACES:
            return True
    return False


def archivable(message: ET.Element) -> bool:
    """XEP-0313's rules for user archives, with XEP-0334 hints: chat and normal messages with
    content, unless the sender asked that they not be stored; groupchat, headline and error
    are never archived."""
    if message.get("type", "normal") not in ("chat", "normal"):
        return False
    if has_hint(message, "no-store") or has_hint(message, "no-permanent-store"):
        return False
    return has_hint(message, "store") or has_im_content(message)


def add_stanza_id(message: ET.Element, by: str, archive_id: str) -> None:
    """XEP-0359: record where (``by``, the archive's JID) and under which id it is stored."""
    ET.SubElement(message, _STANZA_ID, {"id": archive_id, "by": by})


def strip_stanza_ids(message: ET.Element, domain: str) -> None:
    """Remove <stanza-id/> elements that claim to come from an archive of ``domain``: only the
    server may say what its archives hold (XEP-0359, security considerations). Other
    archives' ids, and <origin-id/>, stay."""
    for child in message.findall(_STANZA_ID):
        try:
            by = JID.parse(child.get("by", ""))
        except JIDError:
            continue  # cannot equal any archive's JID as a client compares it
        if by.domain == domain:
            message.remove(child)


# ----- sealed payloads ---------------------------------------------------------------------


def pack_payload(with_jid: str, stanza: ET.Element) -> bytes:
    packed: bytes = msgpack.packb(
        {"w": with_jid, "x": xml.serialize(stanza, default_ns=None)}, use_bin_type=True
    )
    return packed


def _unpack(data: bytes) -> tuple[str, bytes]:
    try:
        obj = msgpack.unpackb(data, raw=False)
        with_jid, stanza = obj["w"], obj["x"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"stored message payload is malformed: {exc}") from exc
    if not isinstance(with_jid, str) or not isinstance(stanza, bytes):
        raise StateError("stored message payload has the wrong field types")
    return with_jid, stanza


def unpack_with(data: bytes) -> str:
    """The correspondent's JID from a payload."""
    return _unpack(data)[0]


def unpack_stanza(data: bytes) -> ET.Element:
    """The stored stanza from a payload, parsed as the server parses a standalone stanza."""
    parser = xml.FramedStreamParser(_STORED_LIMITS)
    try:
        parser.receive_message(_unpack(data)[1])
        event = parser.next_event()
    except xml.XmlStreamError as exc:
        raise StateError(f"stored message does not parse: {exc}") from exc
    if not isinstance(event, xml.StanzaReceived):
        raise StateError("stored message is not a stanza")
    return event.element


# ----- XEP-0082 timestamps -----------------------------------------------------------------


def parse_stamp(text: str) -> int:
    """A XEP-0082 DateTime (the time zone is required) as microseconds since the epoch;
    ValueError if it is not one."""
    match = _DATETIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a XEP-0082 DateTime: {text[:40]!r}")
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    micro = int((match[7] or "")[:6].ljust(6, "0"))
    zone = UTC
    if match[8] != "Z":
        offset_hours, offset_minutes = int(match[10]), int(match[11])
        if offset_hours > 23 or offset_minutes > 59:
            raise ValueError(f"bad time zone offset in {text[:40]!r}")
        offset = timedelta(hours=offset_hours, minutes=offset_minutes)
        zone = timezone(-offset if match[9] == "-" else offset)
    moment = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def format_stamp(micros: int) -> str:
    """XEP-0082 DateTime in UTC: milliseconds when they are exact, else microseconds."""
    moment = _EPOCH + timedelta(microseconds=micros)
    fraction = (
        f"{moment.microsecond // 1000:03d}"
        if moment.microsecond % 1000 == 0
        else f"{moment.microsecond:06d}"
    )
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction}Z"


# ----- the archive index -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    seq: int  # position in its archive, increasing; compares ids for RSM after/before
    id: str  # the archive UID, also the XEP-0359 stanza-id
    stamp: int  # microseconds since the epoch, when the owner sent or received it
    with_full: str  # the correspondent's JID as seen in the stanza
    record_id: str  # the id the payload is sealed under
    # The entry as its snapshot row, msgpack [id, stamp, record id, sealed payload], made
    # once when it is applied: a snapshot then copies bytes instead of re-encoding every
    # entry of every archive on the event loop, and bytes are smaller than the envelope map.
    row: bytes

    @property
    def sealed(self) -> Mapping[str, Any]:
        sealed: Mapping[str, Any] = msgpack.unpackb(self.row, raw=False)[3]
        return sealed

    @property
    def with_bare(self) -> str:
        # JIDs here are canonical; '/' never occurs before the resource.
        return self.with_full.partition("/")[0]


class UserArchive:
    """One user's archive in archive order, with its ids indexed."""

    def __init__(self) -> None:
        self.entries: list[ArchivedMessage] = []
        self._by_id: dict[str, ArchivedMessage] = {}
        self._next_seq = 0

    def get(self, archive_id: str) -> ArchivedMessage | None:
        return self._by_id.get(archive_id)

    def append(
        self,
        archive_id: str,
        stamp: int,
        with_full: str,
        record_id: str,
        sealed: Mapping[str, Any],
        keep: int | None,
    ) -> None:
        if archive_id in self._by_id:
            return  # ids are random: a repeat is the same entry applied twice
        if self.entries:
            stamp = max(stamp, self.entries[-1].stamp)
        row = msgpack.packb([archive_id, stamp, record_id, sealed], use_bin_type=True)
        entry = ArchivedMessage(self._next_seq, archive_id, stamp, with_full, record_id, row)
        self._next_seq += 1
        self.entries.append(entry)
        self._by_id[archive_id] = entry
        if keep is not None and len(self.entries) > keep:
            dropped = len(self.entries) - keep
            for old in self.entries[:dropped]:
                del self._by_id[old.id]
            del self.entries[:dropped]


class Archives:
    """Every user's archive (held by the messages view; see the module docstring)."""

    def __init__(self) -> None:
        self._users: dict[str, UserArchive] = {}

    def of(self, user: str) -> UserArchive | None:
        return self._users.get(user)

    def append(
        self,
        user: str,
        archive_id: str,
        stamp: int,
        with_full: str,
        record_id: str,
        sealed: Mapping[str, Any],
        keep: int | None,
    ) -> None:
        archive = self._users.get(user)
        if archive is None:
            archive = self._users[user] = UserArchive()
        archive.append(archive_id, stamp, with_full, record_id, sealed, keep)

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def to_snapshot(self) -> dict[str, list[bytes]]:
        return {user: [e.row for e in archive.entries] for user, archive in self._users.items()}

    def restore(self, data: Mapping[str, Sequence[Any]], unseal: Unseal) -> None:
        self._users.clear()
        for user, rows in data.items():
            for row in rows:
                # A row is its msgpack bytes; older snapshots hold it unpacked (a list).
                fields: Sequence[Any] = (
                    msgpack.unpackb(row, raw=False) if isinstance(row, bytes) else row
                )
                archive_id, stamp, record_id, sealed = fields
                try:
                    with_full = unpack_with(unseal(PAYLOAD_RECORD, user, record_id, sealed))
                except ShreddedError:
                    continue  # its user was deleted (crypto-shredded): gone for good
                self.append(user, archive_id, stamp, with_full, record_id, sealed, None)


# ----- preferences (XEP-0441) --------------------------------------------------------------

PREFS_DEFAULTS: Final = ("always", "never", "roster")


class QueryError(Exception):
    """A request the archive refuses: the stanza error condition and an explanation."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class ArchivePrefs:
    default: str = "always"
    always: frozenset[str] = frozenset()
    never: frozenset[str] = frozenset()

    def allows(self, with_jid: JID, in_roster: Callable[[], bool]) -> bool:
        """Whether a message exchanged with ``with_jid`` goes into the archive. 'never' wins
        over 'always' for a JID on both lists: the safer reading of a contradiction."""
        full, bare = str(with_jid), str(with_jid.bare)
        if full in self.never or bare in self.never:
            return False
        if full in self.always or bare in self.always:
            return True
        if self.default == "roster":
            return in_roster()
        return self.default == "always"

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"d": self.default, "a": sorted(self.always), "n": sorted(self.never)},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> ArchivePrefs:
        try:
            obj = msgpack.unpackb(data, raw=False)
            prefs = cls(obj["d"], frozenset(obj["a"]), frozenset(obj["n"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"stored archive preferences are malformed: {exc}") from exc
        if prefs.default not in PREFS_DEFAULTS:
            raise StateError(f"stored archive preferences name default {prefs.default!r}")
        return prefs

    def to_element(self) -> ET.Element:
        prefs = ET.Element(f"{{{NS_MAM}}}prefs", {"default": self.default})
        for name, jids in (("always", self.always), ("never", self.never)):
            listing = ET.SubElement(prefs, f"{{{NS_MAM}}}{name}")
            for jid in sorted(jids):
                ET.SubElement(listing, f"{{{NS_MAM}}}jid").text = jid
        return prefs

    @classmethod
    def from_element(cls, prefs: ET.Element) -> ArchivePrefs:
        default = prefs.get("default")
        if default not in PREFS_DEFAULTS:
            raise QueryError("bad-request", "default must be always, never or roster")
        lists: dict[str, frozenset[str]] = {}
        for name in ("always", "never"):
            jids: set[str] = set()
            for listing in prefs.findall(f"{{{NS_MAM}}}{name}"):
                for item in listing.findall(f"{{{NS_MAM}}}jid"):
                    try:
                        jids.add(str(JID.parse((item.text or "").strip())))
                    except JIDError as exc:
                        raise QueryError("jid-malformed", f"{name}: {exc}") from None
            if len(jids) > MAX_PREFS_JIDS:
                raise QueryError("not-acceptable", f"at most {MAX_PREFS_JIDS} JIDs per list")
            lists[name] = frozenset(jids)
        return cls(default, lists["always"], lists["never"])


class PrefsTable:
    """Each user's archive preferences, with the sealed record they came from."""

    def __init__(self) -> None:
        self._users: dict[str, tuple[ArchivePrefs, str, Mapping[str, Any]]] = {}

    def get(self, user: str) -> ArchivePrefs:
        found = self._users.get(user)
        return found[0] if found is not None else ArchivePrefs()

    def apply(self, user: str, record_id: str, sealed: Mapping[str, Any], unseal: Unseal) -> None:
        try:
            prefs = ArchivePrefs.unpack(unseal(PREFS_RECORD, user, record_id, sealed))
        except ShreddedError:
            self._users.pop(user, None)
            return
        self._users[user] = (prefs, record_id, sealed)

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def to_snapshot(self) -> dict[str, list[Any]]:
        return {user: [rid, dict(sealed)] for user, (_, rid, sealed) in self._users.items()}

    def restore(self, data: Mapping[str, Sequence[Any]], unseal: Unseal) -> None:
        self._users.clear()
        for user, (record_id, sealed) in data.items():
            self.apply(user, record_id, sealed, unseal)


# ----- queries -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveQuery:
    with_jid: JID | None = None
    start: int | None = None
    end: int | None = None
    after_id: str | None = None  # #extended: range bounds, not paging direction
    before_id: str | None = None
    ids: tuple[str, ...] | None = None
    after: str | None = None  # XEP-0059
    before: str | None = None  # "" asks for the last page
    max: int = DEFAULT_PAGE
    flip: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    items: list[ArchivedMessage]
    count: int  # items in the whole result set
    first_index: int  # position of items[0] in the result set
    complete: bool  # no further page in the direction of paging


def select_page(archive: UserArchive | None, query: ArchiveQuery) -> Page:
    """The page ``query`` asks for, in chronological order. QueryError('item-not-found') for
    an id that is not in the archive (XEP-0313: a missing UID is item-not-found)."""
    entries = archive.entries if archive is not None else []

    def position(archive_id: str) -> int:
        found = archive.get(archive_id) if archive is not None else None
        if found is None:
            raise QueryError("item-not-found", f"no message {archive_id[:64]!r} in the archive")
        return found.seq

    lo, hi = 0, len(entries)
    if query.start is not None:
        lo = bisect_left(entries, query.start, key=lambda e: e.stamp)
    if query.end is not None:
        hi = bisect_right(entries, query.end, key=lambda e: e.stamp)
    if query.after_id is not None:
        lo = max(lo, bisect_right(entries, position(query.after_id), key=lambda e: e.seq))
    if query.before_id is not None:
        hi = min(hi, bisect_left(entries, position(query.before_id), key=lambda e: e.seq))
    matches = entries[lo:hi]
    if query.with_jid is not None:
        wanted = str(query.with_jid)
        if query.with_jid.resource:
            matches = [e for e in matches if e.with_full == wanted]
        else:
            matches = [e for e in matches if e.with_bare == wanted]
    if query.ids is not None:
        for archive_id in query.ids:
            position(archive_id)
        wanted_ids = set(query.ids)
        matches = [e for e in matches if e.id in wanted_ids]

    first, last = 0, len(matches)
    if query.after is not None:
        first = bisect_right(matches, position(query.after), key=lambda e: e.seq)
    if query.before:
        last = bisect_left(matches, position(query.before), key=lambda e: e.seq)
    last = max(first, last)
    if query.before is not None:  # paging backwards: the page ending at `last`
        begin = max(first, last - query.max)
        return Page(matches[begin:last], len(matches), begin, complete=begin == first)
    end = min(last, first + query.max)
    return Page(matches[first:end], len(matches), first, complete=end == last)


def parse_query(query: ET.Element) -> ArchiveQuery:
    """The filters and paging of a <query xmlns='urn:xmpp:mam:2'/>; QueryError if refused."""
    fields: dict[str, Any] = {}
    form = query.find(f"{{{NS_DATA}}}x")
    if form is not None:
        fields = _form_fields(form)
    flip = query.find(f"{{{NS_MAM}}}flip-page") is not None
    rsm = query.find(f"{{{NS_RSM}}}set")
    paging: dict[str, Any] = {}
    if rsm is not None:
        paging = _rsm(rsm)
    return ArchiveQuery(**fields, **paging, flip=flip)


def _form_fields(form: ET.Element) -> dict[str, Any]:
    if form.get("type", "submit") != "submit":
        raise QueryError("bad-request", "the query form must be of type 'submit'")
    found: dict[str, Any] = {}
    for item in form.findall(f"{{{NS_DATA}}}field"):
        var = item.get("var", "")
        values = [(v.text or "").strip() for v in item.findall(f"{{{NS_DATA}}}value")]
        if var == "FORM_TYPE":
            if values != [NS_MAM]:
                raise QueryError("bad-request", f"FORM_TYPE must be {NS_MAM}")
            continue
        if var == "ids":
            if len(values) > MAX_QUERY_IDS:
                raise QueryError("policy-violation", f"at most {MAX_QUERY_IDS} ids at once")
            ids = tuple(v for v in values if v)
            if ids:  # a field without values filters nothing, like the others
                found["ids"] = ids
            continue
        if var not in ("with", "start", "end", "after-id", "before-id"):
            raise QueryError("feature-not-implemented", f"unknown field {var[:64]!r}")
        if len(values) > 1:
            raise QueryError("bad-request", f"field {var!r} takes one value")
        if not values or not values[0]:
            continue
        value = values[0]
        if var == "with":
            try:
                found["with_jid"] = JID.parse(value)
            except JIDError as exc:
                raise QueryError("jid-malformed", f"with: {exc}") from None
        elif var in ("start", "end"):
            try:
                found[var] = parse_stamp(value)
            except ValueError as exc:
                raise QueryError("bad-request", f"{var}: {exc}") from None
        else:
            found[var.replace("-", "_")] = value
    return found


def _rsm(rsm: ET.Element) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if rsm.find(f"{{{NS_RSM}}}index") is not None:
        raise QueryError("feature-not-implemented", "paging by index is not supported")
    max_text = rsm.findtext(f"{{{NS_RSM}}}max")
    if max_text is not None:
        try:
            value = int(max_text.strip())
        except ValueError:
            value = -1
        if value < 0:
            raise QueryError("bad-request", "<max/> must be a non-negative integer")
        found["max"] = min(value, MAX_PAGE)
    after = rsm.findtext(f"{{{NS_RSM}}}after")
    if after is not None:
        if not after.strip():
            raise QueryError("bad-request", "<after/> needs an id")
        found["after"] = after.strip()
    before = rsm.findtext(f"{{{NS_RSM}}}before")
    if before is not None:
        found["before"] = before.strip()
    return found


# ----- the iq handler ----------------------------------------------------------------------


class Mam:
    """Answers ``urn:xmpp:mam:2`` iqs addressed to the user's own account."""

    def __init__(
        self,
        ctx: ImContext,
        archives: Archives,
        prefs: PrefsTable,
        *,
        in_roster: Callable[[JID, JID], bool] | None = None,
    ) -> None:
        self.ctx = ctx
        self.archives = archives
        self.prefs = prefs
        self._in_roster = in_roster

    def register(self) -> None:
        handlers = self.ctx.handlers
        handlers.on_account_iq(NS_MAM, self.handle)
        handlers.account_features.update({NS_MAM_EXTENDED, NS_SID})

    def archives_with(self, user: JID, with_jid: JID) -> bool:
        """Whether ``user``'s preferences put a message exchanged with ``with_jid`` in their
        archive."""
        roster = self._in_roster

        def in_roster() -> bool:
            # Without roster knowledge 'roster' reads as 'always' (documented above).
            return roster is None or roster(user, with_jid.bare)

        return self.prefs.get(str(user)).allows(with_jid, in_roster)

    async def handle(self, session: Session, iq: ET.Element) -> ET.Element:
        payload = iq[0]
        name = payload.tag.rpartition("}")[2]
        is_get = iq.get("type") == "get"
        try:
            if name == "query":
                return self._form(iq) if is_get else self._query(session, iq, payload)
            if name == "prefs":
                if is_get:
                    return iq_result(iq, self.prefs.get(str(session.jid.bare)).to_element())
                return await self._set_prefs(session, iq, payload)
            if name == "metadata" and is_get:
                return self._metadata(session, iq)
        except QueryError as exc:
            return error_reply(iq, exc.condition, text=exc.text)
        return error_reply(iq, "feature-not-implemented" if is_get else "bad-request")

    def _form(self, iq: ET.Element) -> ET.Element:
        query = ET.Element(f"{{{NS_MAM}}}query")
        form = ET.SubElement(query, f"{{{NS_DATA}}}x", {"type": "form"})
        form_type = ET.SubElement(
            form, f"{{{NS_DATA}}}field", {"type": "hidden", "var": "FORM_TYPE"}
        )
        ET.SubElement(form_type, f"{{{NS_DATA}}}value").text = NS_MAM
        for var, kind in (
            ("with", "jid-single"),
            ("start", "text-single"),
            ("end", "text-single"),
            ("after-id", "text-single"),
            ("before-id", "text-single"),
            ("ids", "text-multi"),
        ):
            ET.SubElement(form, f"{{{NS_DATA}}}field", {"type": kind, "var": var})
        return iq_result(iq, query)

    def _query(self, session: Session, iq: ET.Element, payload: ET.Element) -> ET.Element:
        if payload.get("node"):
            raise QueryError("item-not-found", "a user archive has no nodes")
        user = str(session.jid.bare)
        query = parse_query(payload)
        page = select_page(self.archives.of(user), query)
        queryid = payload.get("queryid")
        sender = iq.get("to")
        for item in reversed(page.items) if query.flip else page.items:
            result = self._result(user, item, queryid)
            if sender is not None:
                result.set("from", sender)
            result.set("to", str(session.jid))
            if not session.send(result):
                break  # the session is being ended for not reading; stop feeding it
        fin = ET.Element(f"{{{NS_MAM}}}fin", {"complete": "true" if page.complete else "false"})
        rsm = ET.SubElement(fin, f"{{{NS_RSM}}}set")
        if page.items:
            first = ET.SubElement(rsm, f"{{{NS_RSM}}}first", {"index": str(page.first_index)})
            first.text = page.items[0].id
            ET.SubElement(rsm, f"{{{NS_RSM}}}last").text = page.items[-1].id
        ET.SubElement(rsm, f"{{{NS_RSM}}}count").text = str(page.count)
        return iq_result(iq, fin)

    def _result(self, user: str, item: ArchivedMessage, queryid: str | None) -> ET.Element:
        message = ET.Element(f"{{{NS_CLIENT}}}message")
        result = ET.SubElement(message, f"{{{NS_MAM}}}result", {"id": item.id})
        if queryid is not None:
            result.set("queryid", queryid)
        forwarded = ET.SubElement(result, f"{{{NS_FORWARD}}}forwarded")
        ET.SubElement(forwarded, f"{{{NS_DELAY}}}delay", {"stamp": format_stamp(item.stamp)})
        try:
            body = {"u": user, "id": item.record_id, "s": item.sealed}
            forwarded.append(unpack_stanza(self.ctx.store.unseal_body(PAYLOAD_RECORD, body)))
        except (ShreddedError, DecryptError, StateError) as exc:
            # XEP-0313 (retention and deletion) lets a result stand without its message;
            # the id, stamp and order stay so every query remains consistent.
            log.error(
                "archived message unreadable",
                extra={"event": "mam.unreadable", "user": user, "error": str(exc)},
            )
        return message

    def _metadata(self, session: Session, iq: ET.Element) -> ET.Element:
        metadata = ET.Element(f"{{{NS_MAM}}}metadata")
        archive = self.archives.of(str(session.jid.bare))
        if archive is not None and archive.entries:
            for name, item in (("start", archive.entries[0]), ("end", archive.entries[-1])):
                ET.SubElement(
                    metadata,
                    f"{{{NS_MAM}}}{name}",
                    {"id": item.id, "timestamp": format_stamp(item.stamp)},
                )
        return iq_result(iq, metadata)

    async def _set_prefs(self, session: Session, iq: ET.Element, payload: ET.Element) -> ET.Element:
        prefs = ArchivePrefs.from_element(payload)
        user = str(session.jid.bare)
        body = await self.ctx.store.sealed_body(PREFS_RECORD, user, prefs.pack())
        await self.ctx.store.commit(Record(PREFS_RECORD, body))
        return iq_result(iq, self.prefs.get(user).to_element())
