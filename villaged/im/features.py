"""The feature views every opener of a node's store must pass, in one place.

The log holds records of every feature; a store opened without a feature's view cannot
replay them ("unknown record type") and a snapshot it took would drop that feature's state.
So the node and every offline command (user, keys, demo accounts) open the store through
``open_node_store`` / ``feature_views`` here.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from villaged.admin.account_status import AccountStatusView
from villaged.federation.queue import OutboundQueueView
from villaged.im.blocking import BlockingView
from villaged.im.messages import MessageStoreView
from villaged.im.private import PrivateView
from villaged.im.roster import RosterView
from villaged.im.vcard import VCardView
from villaged.storage.store import StoreOptions, open_store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from villaged.config import Config
    from villaged.storage.state import View
    from villaged.storage.store import Store


@dataclass(frozen=True)
class FeatureViews:
    vcards: VCardView = field(default_factory=VCardView)
    private: PrivateView = field(default_factory=PrivateView)
    roster: RosterView = field(default_factory=RosterView)
    messages: MessageStoreView = field(default_factory=MessageStoreView)
    blocking: BlockingView = field(default_factory=BlockingView)
    account_status: AccountStatusView = field(default_factory=AccountStatusView)
    s2s_queue: OutboundQueueView = field(default_factory=OutboundQueueView)

    def all(self) -> list[View]:
        return [
            self.vcards,
            self.private,
            self.roster,
            self.messages,
            self.blocking,
            self.account_status,
            self.s2s_queue,
        ]


@asynccontextmanager
async def open_node_store(
    config: Config, views: FeatureViews | None = None
) -> AsyncIterator[Store]:
    """The node's store with every feature view, its writer running (for offline commands)."""
    async with open_store(
        StoreOptions.from_config(config.storage), (views or FeatureViews()).all()
    ) as store:
        yield store
