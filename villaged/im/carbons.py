"""XEP-0280 Message Carbons (``urn:xmpp:carbons:2``): every device of a user sees both sides of
its conversations.

What this module owns:

* enabling and disabling per session (the ``"carbons"`` entry of ``Session.features``); the
  iq is answered whether it is addressed to the account (clients usually omit 'to') or to the
  server, and repeated requests simply succeed (business rules);
* which messages are copied (`eligible`, after the XEP's suggested rules): chat messages,
  and normal messages with conversation content (a body, a receipt, a marker, an encrypted
  payload — the same content the archive keeps); never groupchat, headline or error (our
  error bounces are generated for the sender alone, and a client's error reply cannot be tied
  to an eligible message without tracking every message, which the XEP itself calls
  inappropriate);
* the opt-outs: ``<private xmlns='urn:xmpp:carbons:2'/>`` and the XEP-0334
  ``<no-copy/>`` hint both suppress copies on both sides; <private/> is then removed before
  delivery, as the XEP says the receiving server should;
* forgery: a client may not send ``<sent/>`` or ``<received/>`` wrappers to anyone (only the
  server makes carbons), so `strip_forged` removes them from client messages;
* the wrappers (`wrap`): ``from`` the user's bare JID, ``to`` the receiving resource, the same
  ``type``, the original in a XEP-0297 ``<forwarded/>``.

Who gets which copy is decided with delivery, in ``messages``: sent copies go to the sender's
other carbons-enabled resources, received copies to the recipient's carbons-enabled resources
that did not get the message itself (RFC 6121 §8.5 delivery), and no resource gets two copies.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Final

from villaged.im.mam import NS_FORWARD, has_hint, has_im_content
from villaged.xmpp.stanza import NS_CLIENT, error_reply, iq_result

if TYPE_CHECKING:
    from villaged.im.context import ImContext
    from villaged.im.sessions import Session
    from villaged.xmpp.jid import JID

NS_CARBONS: Final = "urn:xmpp:carbons:2"
SESSION_FEATURE: Final = "carbons"
_PRIVATE: Final = f"{{{NS_CARBONS}}}private"
_WRAPPERS: Final = (f"{{{NS_CARBONS}}}sent", f"{{{NS_CARBONS}}}received")


def wants_copies(session: Session) -> bool:
    return SESSION_FEATURE in session.features


def is_private(message: ET.Element) -> bool:
    """The sender opted this message out of carbons (<private/>, or XEP-0334 no-copy)."""
    return message.find(_PRIVATE) is not None or has_hint(message, "no-copy")


def eligible(message: ET.Element) -> bool:
    """Whether ``message`` is copied to other resources at all (see the module docstring)."""
    if is_private(message):
        return False
    mtype = message.get("type", "normal")
    return mtype == "chat" or (mtype == "normal" and has_im_content(message))


def strip_private(message: ET.Element) -> None:
    for child in message.findall(_PRIVATE):
        message.remove(child)


def strip_forged(message: ET.Element) -> None:
    """Remove carbons wrappers from a message a client sent."""
    for tag in _WRAPPERS:
        for child in message.findall(tag):
            message.remove(child)


def wrap(direction: str, user: JID, to: JID, message: ET.Element) -> ET.Element:
    """The carbon of ``message`` for ``user``'s resource ``to``; ``direction`` is "sent" or
    "received"."""
    outer = ET.Element(
        f"{{{NS_CLIENT}}}message",
        {"from": str(user.bare), "to": str(to), "type": message.get("type", "normal")},
    )
    wrapper = ET.SubElement(outer, f"{{{NS_CARBONS}}}{direction}")
    ET.SubElement(wrapper, f"{{{NS_FORWARD}}}forwarded").append(message)
    return outer


class Carbons:
    """The enable/disable iq handler."""

    def __init__(self, ctx: ImContext) -> None:
        self.ctx = ctx

    def register(self) -> None:
        handlers = self.ctx.handlers
        handlers.on_server_iq(NS_CARBONS, self.handle)
        handlers.on_account_iq(NS_CARBONS, self.handle, feature=False)

    async def handle(self, session: Session, iq: ET.Element) -> ET.Element:
        name = iq[0].tag.rpartition("}")[2]
        if iq.get("type") != "set" or name not in ("enable", "disable"):
            return error_reply(iq, "bad-request", text="send <enable/> or <disable/> in a set")
        if name == "enable":
            session.features.add(SESSION_FEATURE)
        else:
            session.features.discard(SESSION_FEATURE)
        return iq_result(iq)
