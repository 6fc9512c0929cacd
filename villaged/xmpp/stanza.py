"""Stanza helpers: namespaces, error replies (RFC 6120 §8.3) and small element builders.

Stanzas are ``xml.etree.ElementTree.Element`` objects with Clark-notation tags; the stream
layer has already parsed them and will serialize them. Nothing here does I/O.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Final

NS_CLIENT: Final = "jabber:client"
NS_SERVER: Final = "jabber:server"
NS_STREAMS: Final = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND: Final = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION: Final = "urn:ietf:params:xml:ns:xmpp-session"
NS_XML: Final = "http://www.w3.org/XML/1998/namespace"
XML_LANG: Final = f"{{{NS_XML}}}lang"

STANZA_KINDS: Final = frozenset({"message", "presence", "iq"})

# RFC 6120 §8.3.3: each defined condition with the error type it is usually sent with.
STANZA_ERROR_TYPES: Final = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


def kind(stanza: ET.Element) -> str:
    """'message', 'presence' or 'iq' for a jabber:client/jabber:server stanza, else ''."""
    tag = stanza.tag
    for ns in (NS_CLIENT, NS_SERVER):
        prefix = f"{{{ns}}}"
        if tag.startswith(prefix):
            local = tag[len(prefix) :]
            return local if local in STANZA_KINDS else ""
    return ""


def error_reply(
    stanza: ET.Element, condition: str, *, text: str | None = None, error_type: str | None = None
) -> ET.Element:
    """The error a server returns for ``stanza``: same kind and id, addresses swapped.

    The original payload is not echoed back (RFC 6120 §8.3.1 makes that optional, and not
    echoing keeps error replies small and never reflects a large stanza)."""
    if condition not in STANZA_ERROR_TYPES:
        raise ValueError(f"unknown stanza error condition {condition!r}")
    reply = ET.Element(stanza.tag)
    if (stanza_id := stanza.get("id")) is not None:
        reply.set("id", stanza_id)
    if (sender := stanza.get("from")) is not None:
        reply.set("to", sender)
    if (recipient := stanza.get("to")) is not None:
        reply.set("from", recipient)
    reply.set("type", "error")
    reply.append(error_element(condition, text=text, error_type=error_type, ns=_ns(stanza.tag)))
    return reply


def error_element(
    condition: str, *, text: str | None = None, error_type: str | None = None, ns: str = NS_CLIENT
) -> ET.Element:
    error = ET.Element(f"{{{ns}}}error", {"type": error_type or STANZA_ERROR_TYPES[condition]})
    ET.SubElement(error, f"{{{NS_STANZA_ERRORS}}}{condition}")
    if text:
        ET.SubElement(error, f"{{{NS_STANZA_ERRORS}}}text").text = text
    return error


def _ns(tag: str) -> str:
    return tag[1 : tag.index("}")] if tag.startswith("{") else NS_CLIENT


def iq_result(request: ET.Element, *children: ET.Element) -> ET.Element:
    """The type='result' answer to an iq get/set, addressed back to its sender."""
    reply = ET.Element(request.tag, {"type": "result"})
    if (iq_id := request.get("id")) is not None:
        reply.set("id", iq_id)
    if (sender := request.get("from")) is not None:
        reply.set("to", sender)
    if (recipient := request.get("to")) is not None:
        reply.set("from", recipient)
    reply.extend(children)
    return reply
