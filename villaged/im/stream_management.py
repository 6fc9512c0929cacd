"""What happens to the stanzas a stream-management session (XEP-0198) leaves unacknowledged.

The stream machine (``xmpp.c2s.SmState``) and the driver (``net.c2s``) keep a session's
unacknowledged stanzas while it may still be resumed. When it ends for good — the resumption
window ran out, the node is shutting down, or the client closed without acknowledging — RFC
6121's rules for a session that is gone apply to them (XEP-0198 §5): `store_unacked` puts the
chat and normal messages with content into the user's offline queue (one durable ``message``
record each, queued only: the archive, if it keeps them, has them already), and they are
delivered on the user's next initial presence — at once if another resource is available now.
A message to the bare JID is not queued while another resource is available: RFC 6121 gave
it to every available resource, so they have it. The driver answers iq requests with
``service-unavailable``; everything else (presence, chat states) is dropped, as it would
have been for a session that ended. A message that came from offline storage keeps the time
it first arrived.

Never lost, never duplicated by the server: each message keeps the XEP-0359 stanza-id its
archive gave it, so a client that did receive it before the connection broke recognises the
copy; a ``<delay/>`` an earlier offline delivery added is removed (the flush adds a fresh one).
A full offline queue drops the message with a log event: the archive still has it.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Final

from villaged.im.mam import NS_DELAY, pack_payload, parse_stamp
from villaged.im.messages import MESSAGE_RECORD
from villaged.im.offline import storable
from villaged.storage.errors import RecordTooLargeError
from villaged.storage.records import Record
from villaged.xmpp.jid import JID, JIDError

if TYPE_CHECKING:
    from villaged.im.handlers import HandlerRegistry
    from villaged.im.messages import Messages
    from villaged.storage.store import Pending

log = logging.getLogger("villaged.im.stream_management")

NS_SM: Final = "urn:xmpp:sm:3"
NS_CSI: Final = "urn:xmpp:csi:0"


def register(handlers: HandlerRegistry) -> None:
    """Offer XEP-0198 and XEP-0352 in the stream features after authentication, and list them
    in disco#info (the driver, ``net.c2s``, implements both)."""
    for namespace, name in ((NS_SM, "sm"), (NS_CSI, "csi")):
        handlers.stream_features.append(ET.Element(f"{{{namespace}}}{name}"))
        handlers.server_features.add(namespace)


async def store_unacked(messages: Messages, owner: JID, stanzas: list[ET.Element]) -> int:
    """Queue ``owner``'s unacknowledged chat/normal messages offline; how many were queued."""
    if not messages.durable:
        return 0
    user = str(owner.bare)
    domain = messages.ctx.domain
    offline = messages.offline
    # The user's other available resources (a new login on the same resource replaced this
    # session and had none of its stanzas).
    others = [
        s
        for s in messages.ctx.sessions.of_user(owner.bare)
        if s.available and s.priority >= 0 and s.jid != owner
    ]
    commits: list[Pending] = []
    reserved = 0
    try:
        for stanza in stanzas:
            if not stanza.tag.endswith("}message") or stanza.get("type", "normal") not in (
                "chat",
                "normal",
            ):
                continue
            if not storable(stanza):
                continue
            if others and "/" not in stanza.get("to", "/"):
                continue  # to the bare JID: the user's other resources got it already
            stamp = _now_micros()
            for delay in stanza.findall(f"{{{NS_DELAY}}}delay"):
                if delay.get("from") == domain:  # it came from offline storage once before:
                    stamp = _stamp(delay.get("stamp", ""), stamp)  # keep when it arrived
                    stanza.remove(delay)
            if not offline.try_reserve(user):
                log.warning(
                    "offline queue full: an unacknowledged message stays in the archive only",
                    extra={"event": "sm.unacked_dropped", "user": user},
                )
                continue
            reserved += 1
            store = messages.ctx.store
            body = await store.sealed_body(
                MESSAGE_RECORD, user, pack_payload(_correspondent(stanza), stanza)
            )
            body["t"] = stamp
            body["o"] = True  # queued only: the archive has had it since it arrived
            try:
                commits.append(await store.submit(Record(MESSAGE_RECORD, {"e": [body]})))
            except RecordTooLargeError:
                continue  # it was stored once, so it fits; nothing else can be done here
        for commit in commits:
            await commit.wait()
    finally:
        for _ in range(reserved):
            offline.release(user)
    if commits:
        log.info(
            "unacknowledged messages queued offline",
            extra={"event": "sm.unacked_stored", "user": user, "count": len(commits)},
        )
        available = [
            s for s in messages.ctx.sessions.of_user(owner.bare) if s.available and s.priority >= 0
        ]
        if available:  # another resource (or a new login on this one) takes them now
            await messages.flush_offline(max(available, key=lambda s: s.priority))
    return len(commits)


def _correspondent(stanza: ET.Element) -> str:
    try:
        return str(JID.parse(stanza.get("from", "")))
    except JIDError:
        return ""


def _stamp(text: str, default: int) -> int:
    try:
        return parse_stamp(text)
    except ValueError:
        return default


def _now_micros() -> int:
    return time.time_ns() // 1_000_000 * 1_000
