"""What every IM feature gets: the domain, the store, the live sessions and the handler
registry. Built once per node by app.py; features keep a reference, never a copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from villaged.im.handlers import HandlerRegistry
    from villaged.im.sessions import SessionRegistry
    from villaged.storage.store import Store


@dataclass
class ImContext:
    domain: str
    store: Store
    sessions: SessionRegistry
    handlers: HandlerRegistry

    @property
    def server_jid(self) -> JID:
        return JID("", self.domain)

    def is_local(self, jid: JID) -> bool:
        return jid.domain == self.domain

    def user_exists(self, jid: JID) -> bool:
        """Whether ``jid``'s bare JID is an account of this server."""
        return (
            bool(jid.local)
            and jid.domain == self.domain
            and str(jid.bare) in (self.store.state.accounts)
        )
