"""The registry of iq handlers and the features they advertise (XEP-0030 lists exactly these).

A feature module registers, per payload namespace, a coroutine that answers an iq get/set
addressed to the server or to the sender's own account. Handlers return the reply stanza
(result or error); the router sends it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    from villaged.im.sessions import Session

IqHandler = Callable[["Session", "ET.Element"], Awaitable["ET.Element"]]


@dataclass
class HandlerRegistry:
    # payload namespace -> handler, for iqs to the server's domain
    server_iq: dict[str, IqHandler] = field(default_factory=dict)
    # payload namespace -> handler, for iqs to the sender's own bare JID (or with no 'to')
    account_iq: dict[str, IqHandler] = field(default_factory=dict)
    # payload namespace -> handler, for iqs to ANOTHER local account's bare JID (e.g. vCard)
    contact_iq: dict[str, IqHandler] = field(default_factory=dict)
    # disco#info features of the server (and, for PEP-like features, of accounts)
    server_features: set[str] = field(default_factory=set)
    account_features: set[str] = field(default_factory=set)
    # stream features offered after authentication (e.g. roster versioning)
    stream_features: list[ET.Element] = field(default_factory=list)

    def on_server_iq(self, namespace: str, handler: IqHandler, *, feature: bool = True) -> None:
        self.server_iq[namespace] = handler
        if feature:
            self.server_features.add(namespace)

    def on_contact_iq(self, namespace: str, handler: IqHandler) -> None:
        """Answer iqs addressed to another local user's bare JID (the handler sees the 'to')."""
        self.contact_iq[namespace] = handler

    def on_account_iq(self, namespace: str, handler: IqHandler, *, feature: bool = True) -> None:
        self.account_iq[namespace] = handler
        if feature:
            self.account_features.add(namespace)
