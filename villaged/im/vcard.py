"""XEP-0054 vcard-temp: each user's vCard, set by its owner and readable by every local user.

This module owns the ``vcards`` view, its record type and the iq handlers:

* ``vcard.set`` v1 — ``{"u": bare JID, "id": record id, "s": sealed vCard}``. The sealed
  payload is the ``<vCard xmlns='vcard-temp'/>`` element serialized as sent (see
  :func:`villaged.im.private.element_bytes`); an empty payload means the user cleared it.

The view keeps the sealed bodies, not the vCards: a vCard may carry a photo (XEP-0153), the
snapshot needs the sealed form anyway, and one copy per user is what memory should hold.
Reads unseal and parse on demand. Records whose user's data key is gone are skipped when
applied or restored (the account was deleted), so a deleted user's vCard vanishes on the next
start; until then it is unreadable and every read treats it as absent.

Protocol (XEP-0054 §3 and §4):

* get or set with no 'to' (or to one's own bare JID): one's own vCard; with none stored the
  answer is an empty ``<vCard/>`` (§3.1 allows that or ``item-not-found``);
* get to another local account's bare JID: that account's vCard; with none stored the answer
  is ``service-unavailable``, because §3.3 requires the same error for "no vCard" as for "no
  such user" (so vCard probes cannot find out who has an account), and that is what the router
  answers for addresses that are not accounts;
* set to another account: ``forbidden`` (§3.2);
* a vCard larger than the configured limit: ``not-acceptable`` with a text naming it (the XEP
  has no limit; RFC 6120 §8.3.3.9 is for requests the server's criteria refuse);
* "vcard-temp" in the server's disco#info (§4).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, Final

from villaged.im.private import (
    check_record_fits,
    element_bytes,
    element_from_bytes,
    is_empty,
    sealed_parts,
)
from villaged.storage.errors import ShreddedError
from villaged.storage.records import Record
from villaged.xmpp.jid import JID
from villaged.xmpp.stanza import error_reply, iq_result

if TYPE_CHECKING:
    from collections.abc import Mapping

    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.storage.state import Unseal

NS_VCARD: Final = "vcard-temp"
VCARD: Final = f"{{{NS_VCARD}}}vCard"
VCARD_SET: Final = "vcard.set"

# Serialized bytes of one vCard: room for a photo of about 190 KiB after base64. The c2s
# stanza limit (256 KiB by default) bounds what arrives, this bounds what is kept.
MAX_VCARD_BYTES: Final = 256 * 1024


class VCardView:
    """Each user's sealed vCard by bare JID."""

    name = "vcards"
    record_types: Mapping[str, int] = {VCARD_SET: 1}

    def __init__(self) -> None:
        self._cards: dict[str, Mapping[str, Any]] = {}

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        sealed_parts(rtype, body)

    def get(self, user: str) -> Mapping[str, Any] | None:
        """The record body that holds ``user``'s vCard, if any."""
        return self._cards.get(user)

    def __len__(self) -> int:
        return len(self._cards)

    def forget_user(self, jid: str) -> None:
        """The account was deleted (State calls this in log order)."""
        self._cards.pop(jid, None)

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        user, record_id, sealed = sealed_parts(rtype, body)
        self._put(user, record_id, sealed, unseal)

    def to_snapshot(self) -> list[list[Any]]:
        return [[user, body["id"], body["s"]] for user, body in self._cards.items()]

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._cards.clear()
        for user, record_id, sealed in data or ():
            self._put(user, record_id, sealed, unseal)

    def _put(self, user: str, record_id: str, sealed: Mapping[str, Any], unseal: Unseal) -> None:
        try:
            plaintext = unseal(VCARD_SET, user, record_id, sealed)
        except ShreddedError:
            return  # the account was deleted after this record: its vCard went with it
        if plaintext:
            self._cards[user] = {"u": user, "id": record_id, "s": sealed}
        else:
            self._cards.pop(user, None)


class VCards:
    """Answers vcard-temp iqs and writes ``vcard.set`` records."""

    def __init__(
        self, ctx: ImContext, view: VCardView, *, max_bytes: int = MAX_VCARD_BYTES
    ) -> None:
        check_record_fits(ctx.store, max_bytes, "vCard max_bytes")
        self.ctx = ctx
        self.view = view
        self.max_bytes = max_bytes

    async def own_vcard(self, session: Session, iq: ET.Element) -> ET.Element:
        vcard = iq[0]
        if vcard.tag != VCARD:
            return error_reply(iq, "bad-request", text="expected <vCard xmlns='vcard-temp'/>")
        user = str(session.jid.bare)
        if iq.get("type") == "get":
            stored = self.load(user)
            # Not `or`: an element without children is false.
            return iq_result(iq, ET.Element(VCARD) if stored is None else stored)
        data = b"" if is_empty(vcard) else element_bytes(vcard)
        if len(data) > self.max_bytes:
            return error_reply(
                iq,
                "not-acceptable",
                text=f"the vCard is {len(data)} bytes; this server keeps at most {self.max_bytes}",
            )
        if data or self.view.get(user) is not None:
            body = await self.ctx.store.sealed_body(VCARD_SET, user, data)
            await self.ctx.store.commit(Record(VCARD_SET, body))
        return iq_result(iq)

    async def contact_vcard(self, session: Session, iq: ET.Element) -> ET.Element:
        if iq[0].tag != VCARD:
            return error_reply(iq, "bad-request", text="expected <vCard xmlns='vcard-temp'/>")
        if iq.get("type") == "set":
            return error_reply(iq, "forbidden", text="only its owner sets a vCard")
        # The router sends only iqs to an existing account's bare JID here.
        vcard = self.load(str(JID.parse(iq.get("to", "")).bare))
        if vcard is None:
            return error_reply(iq, "service-unavailable")
        return iq_result(iq, vcard)

    def load(self, user: str) -> ET.Element | None:
        """``user``'s vCard, or None if they have none."""
        body = self.view.get(user)
        if body is None:
            return None
        try:
            data = self.ctx.store.unseal_body(VCARD_SET, body)
        except ShreddedError:
            return None  # set by a deleted account of the same name
        return element_from_bytes(data)


def register(ctx: ImContext, view: VCardView, *, max_bytes: int = MAX_VCARD_BYTES) -> VCards:
    """Answer vcard-temp for one's own account and other local accounts, and list the feature
    in the server's disco#info."""
    vcards = VCards(ctx, view, max_bytes=max_bytes)
    ctx.handlers.on_account_iq(NS_VCARD, vcards.own_vcard, feature=False)
    ctx.handlers.on_contact_iq(NS_VCARD, vcards.contact_vcard)
    ctx.handlers.server_features.add(NS_VCARD)
    return vcards
