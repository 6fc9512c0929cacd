"""XEP-0191 blocking with a real XMPP client library (slixmpp, its xep_0191 plugin) against a
node built as `villaged run` builds it: a block stops a contact's messages both ways, an
unblock lets them flow again, and nothing sent across the block is archived."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.xmpp_client import open_xmpp_client
from tests.nodes import RunningNode, start_node

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.e2e.xmpp_client import ReceivedMessage, TrioXmppClient


@pytest.fixture
async def node(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[RunningNode]:
    yield await start_node(nursery, tmp_path)
    nursery.cancel_scope.cancel()


async def login(client: TrioXmppClient, node: RunningNode, user: str) -> None:
    with trio.fail_after(20):
        await client.connect(
            "127.0.0.1",
            node.c2s,
            direct_tls=False,
            ca_file=node.ca_file,
            password=f"{user}-password",
            jid=f"{user}@localhost",
            resource="slix",
        )


def is_chat(message: ReceivedMessage) -> bool:
    return message.type == "chat" and message.body is not None


async def archived_bodies(client: TrioXmppClient, with_: str) -> list[str]:
    page = await client.mam_query(with_=with_, max_=50)
    assert page.complete
    return [m.message.body or "" for m in page.messages]


async def test_block_stops_messages_and_unblock_lets_them_flow_again(node: RunningNode) -> None:
    async with open_xmpp_client("alice") as alice, open_xmpp_client("bob") as bob:
        await login(alice, node, "alice")
        await login(bob, node, "bob")
        with trio.fail_after(20):
            assert "urn:xmpp:blocking" in (await alice.disco_info("localhost")).features
            assert await alice.get_blocklist() == ()
            await alice.send_presence()
            await bob.send_presence()
            await bob.send_message("alice@localhost", "before")
            assert (await alice.wait_message(is_chat)).body == "before"

            await alice.block("bob@localhost")
            assert await alice.get_blocklist() == ("bob@localhost",)
            # bob is told the address is unavailable; alice is told she blocks him.
            await bob.send_message("alice@localhost", "while blocked")
            bounce = await bob.wait_message(lambda m: m.type == "error")
            assert bounce.from_ == "alice@localhost"
            assert "service-unavailable" in bounce.xml
            await alice.send_message("bob@localhost", "to a blocked contact")
            refusal = await alice.wait_message(lambda m: m.type == "error")
            assert refusal.from_ == "bob@localhost"
            assert "not-acceptable" in refusal.xml
            assert "urn:xmpp:blocking:errors" in refusal.xml

            await alice.unblock()  # everything
            assert await alice.get_blocklist() == ()
            await bob.send_message("alice@localhost", "after")
            # The next chat message alice sees is this one: the blocked one never came.
            assert (await alice.wait_message(is_chat)).body == "after"
            await alice.send_message("bob@localhost", "welcome back")
            assert (await bob.wait_message(is_chat)).body == "welcome back"

            # Neither archive holds what was sent across the block.
            assert await archived_bodies(alice, "bob@localhost") == [
                "before",
                "after",
                "welcome back",
            ]
            assert await archived_bodies(bob, "alice@localhost") == [
                "before",
                "after",
                "welcome back",
            ]
