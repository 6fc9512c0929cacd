"""Access transparency: a user asks the server who looked at their data.

An iq get to the user's own account with ``<accesses xmlns='urn:villaged:access:0'/>`` is
answered with one ``<access/>`` per audited operator action on that user's data — a grant
opened or approved, an inspection — newest last, with when, which operator, the reason code,
the ticket and what was read::

    <accesses xmlns='urn:villaged:access:0'>
      <access time='2026-11-29T18:30:00.000Z' operator='ops1' action='inspect.messages'
              reason='abuse-investigation' ticket='T-42'/>
    </accesses>

The answer comes from the audit log (`villaged.admin.audit`), the same records ``villaged
audit verify`` checks, so it cannot leave out what the log holds. The namespace is listed in
the account's disco#info.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, Final

from villaged.xmpp.stanza import error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from villaged.im.handlers import HandlerRegistry
    from villaged.im.sessions import Session

NS_ACCESS: Final = "urn:villaged:access:0"
MAX_LISTED: Final = 1000  # the newest ones, when there are more

#: The audit records that are an access to a user's data (when they succeeded).
ACCESS_COMMANDS: Final = frozenset(
    {"grant.request", "grant.approve", "inspect.messages", "inspect.roster", "inspect.account"}
)


def is_access(record: dict[str, Any], user: str) -> bool:
    return (
        record.get("scope") == user
        and record.get("command") in ACCESS_COMMANDS
        and record.get("result") in ("ok", "pending")
    )


def register(
    handlers: HandlerRegistry,
    accesses_to: Callable[[str], Awaitable[list[dict[str, Any]]]],
    since: Callable[[str], str | None] | None = None,
) -> None:
    """Answer ``<accesses/>`` from ``accesses_to(user)``; ``since(user)`` is when the account
    was made (audit time text): accesses to a former account of the same JID are not its
    holder's to see."""

    async def handle(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get" or iq[0].tag != f"{{{NS_ACCESS}}}accesses":
            return error_reply(iq, "bad-request", text="ask with an iq get of <accesses/>")
        user = str(session.jid.bare)
        start = (since(user) if since is not None else None) or ""
        records = [
            r
            for r in await accesses_to(user)
            if is_access(r, user) and str(r.get("t", "")) >= start
        ][-MAX_LISTED:]
        listing = ET.Element(f"{{{NS_ACCESS}}}accesses")
        for record in records:
            attributes = {
                "time": str(record.get("t", "")),
                "operator": str(record.get("operator", "")),
                "action": str(record.get("command", "")),
            }
            for name in ("reason", "ticket"):
                if record.get(name):
                    attributes[name] = str(record[name])
            ET.SubElement(listing, f"{{{NS_ACCESS}}}access", attributes)
        return iq_result(iq, listing)

    handlers.on_account_iq(NS_ACCESS, handle)
