"""What the server says about itself: XEP-0030 disco (listing exactly the registered
features), XEP-0199 ping and XEP-0092 software version."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Final

from villaged import __version__
from villaged.xmpp.stanza import error_reply, iq_result

if TYPE_CHECKING:
    from villaged.im.handlers import HandlerRegistry
    from villaged.im.sessions import Session

NS_DISCO_INFO: Final = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS: Final = "http://jabber.org/protocol/disco#items"
NS_PING: Final = "urn:xmpp:ping"
NS_VERSION: Final = "jabber:iq:version"


def register(handlers: HandlerRegistry) -> None:
    async def disco_info(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get" or iq[0].get("node"):
            return error_reply(iq, "item-not-found" if iq[0].get("node") else "bad-request")
        query = ET.Element(f"{{{NS_DISCO_INFO}}}query")
        ET.SubElement(
            query,
            f"{{{NS_DISCO_INFO}}}identity",
            {"category": "server", "type": "im", "name": "villaged"},
        )
        for feature in sorted(handlers.server_features):
            ET.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", {"var": feature})
        return iq_result(iq, query)

    async def account_disco_info(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get":
            return error_reply(iq, "bad-request")
        query = ET.Element(f"{{{NS_DISCO_INFO}}}query")
        ET.SubElement(
            query, f"{{{NS_DISCO_INFO}}}identity", {"category": "account", "type": "registered"}
        )
        for feature in sorted(handlers.account_features | {NS_DISCO_INFO}):
            ET.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", {"var": feature})
        return iq_result(iq, query)

    async def disco_items(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get":
            return error_reply(iq, "bad-request")
        return iq_result(iq, ET.Element(f"{{{NS_DISCO_ITEMS}}}query"))

    async def ping(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get":
            return error_reply(iq, "bad-request")
        return iq_result(iq)

    async def version(session: Session, iq: ET.Element) -> ET.Element:
        if iq.get("type") != "get":
            return error_reply(iq, "bad-request")
        query = ET.Element(f"{{{NS_VERSION}}}query")
        ET.SubElement(query, f"{{{NS_VERSION}}}name").text = "villaged"
        ET.SubElement(query, f"{{{NS_VERSION}}}version").text = __version__
        return iq_result(iq, query)

    handlers.on_server_iq(NS_DISCO_INFO, disco_info)
    handlers.on_server_iq(NS_DISCO_ITEMS, disco_items)
    handlers.on_server_iq(NS_PING, ping)
    handlers.on_server_iq(NS_VERSION, version)
    handlers.on_account_iq(NS_DISCO_INFO, account_disco_info, feature=False)
    handlers.on_account_iq(NS_PING, ping, feature=False)
