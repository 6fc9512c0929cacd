"""villaged with a real XMPP client library (slixmpp) over real TLS sockets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.xmpp_client import AuthFailedError, TrioXmppClient, open_xmpp_client
from tests.nodes import RunningNode, start_node

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
async def node(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[RunningNode]:
    yield await start_node(nursery, tmp_path)
    nursery.cancel_scope.cancel()


async def login(
    client: TrioXmppClient, node: RunningNode, user: str, *, direct_tls: bool = False
) -> str:
    with trio.fail_after(20):
        return await client.connect(
            "127.0.0.1",
            node.c2s_tls if direct_tls else node.c2s,
            direct_tls=direct_tls,
            ca_file=node.ca_file,
            password=f"{user}-password",
            jid=f"{user}@localhost",
            resource="slix",
        )


async def test_login_starttls_and_direct_tls_then_chat(node: RunningNode) -> None:
    async with open_xmpp_client("alice") as alice, open_xmpp_client("bob") as bob:
        assert await login(alice, node, "alice") == "alice@localhost/slix"
        assert await login(bob, node, "bob", direct_tls=True) == "bob@localhost/slix"
        with trio.fail_after(10):
            await alice.send_presence()
            await bob.send_presence()
            text = "grüße ✓ <&>'\""
            await alice.send_message("bob@localhost", text)
            got = await bob.wait_message(lambda m: m.body == text)
            assert got.from_ == "alice@localhost/slix"
            await bob.send_message("alice@localhost", "und zurück")
            back = await alice.wait_message(lambda m: m.body == "und zurück")
            assert back.from_ == "bob@localhost/slix"
            assert await alice.ping("localhost") >= 0
            info = await alice.disco_info("localhost")
            assert "urn:xmpp:ping" in info.features
            gone = await alice.disconnect()
            assert gone.by_us


async def test_wrong_password_is_rejected(node: RunningNode) -> None:
    async with open_xmpp_client("alice") as alice:
        with trio.fail_after(20), pytest.raises(AuthFailedError):
            await alice.connect(
                "127.0.0.1",
                node.c2s,
                direct_tls=False,
                ca_file=node.ca_file,
                password="not-the-password",
                jid="alice@localhost",
            )


async def test_roster_subscription_handshake_and_presence_both_ways(node: RunningNode) -> None:
    async with open_xmpp_client("alice") as alice, open_xmpp_client("bob") as bob:
        await login(alice, node, "alice")
        await login(bob, node, "bob")
        with trio.fail_after(15):
            assert await alice.get_roster() == {}
            await bob.get_roster()
            await alice.send_presence()
            await bob.send_presence()
            await alice.set_roster_item("bob@localhost", name="Bob", groups=("Friends",))
            push = await alice.wait_roster_push()
            assert push.items[0].jid == "bob@localhost"
            # alice asks, bob approves and asks back, alice approves.
            await alice.send_presence(to="bob@localhost", type_="subscribe")
            request = await bob.wait_presence(lambda p: p.type == "subscribe")
            assert request.from_ == "alice@localhost"
            await bob.send_presence(to="alice@localhost", type_="subscribed")
            await bob.send_presence(to="alice@localhost", type_="subscribe")
            seen_bob = await alice.wait_presence(
                lambda p: p.from_ == "bob@localhost/slix" and p.type == "available"
            )
            assert seen_bob.to.startswith("alice@localhost")
            await alice.wait_presence(lambda p: p.type == "subscribe")
            await alice.send_presence(to="bob@localhost", type_="subscribed")
            await bob.wait_presence(
                lambda p: p.from_ == "alice@localhost/slix" and p.type == "available"
            )
            roster = await alice.get_roster()
            assert roster["bob@localhost"].subscription == "both"
            assert roster["bob@localhost"].name == "Bob"
            assert roster["bob@localhost"].groups == frozenset({"Friends"})
            # A presence change reaches the contact; leaving is seen too.
            await alice.send_presence(show="away", status="lunch")
            away = await bob.wait_presence(lambda p: p.show == "away")
            assert away.status == "lunch"
            await alice.disconnect()
            await bob.wait_presence(
                lambda p: p.from_ == "alice@localhost/slix" and p.type == "unavailable"
            )


async def test_offline_carbons_and_archive_paging(node: RunningNode) -> None:
    async with open_xmpp_client("alice") as alice:
        await login(alice, node, "alice")
        with trio.fail_after(20):
            await alice.send_presence()
            for i in range(25):
                await alice.send_message("bob@localhost", f"offline {i} <&>")
            await alice.ping("localhost")  # everything before this was processed
    async with (
        open_xmpp_client("bob-phone") as phone,
        open_xmpp_client("bob-laptop") as laptop,
        open_xmpp_client("alice") as alice,
    ):
        with trio.fail_after(30):
            await login(phone, node, "bob")
            await phone.enable_carbons()
            await phone.send_presence()
            for i in range(25):  # offline messages arrive in order, with a delay stamp
                got = await phone.wait_message(lambda m: (m.body or "").startswith("offline"))
                assert got.body == f"offline {i} <&>"
                assert "urn:xmpp:delay" in got.xml
            await laptop.connect(
                "127.0.0.1",
                node.c2s_tls,
                direct_tls=True,
                ca_file=node.ca_file,
                password="bob-password",
                jid="bob@localhost",
                resource="laptop",
            )
            await laptop.enable_carbons()
            await laptop.send_presence()
            await login(alice, node, "alice")
            await alice.send_presence()
            # A message to one of bob's resources is carbon-copied to the other.
            await alice.send_message("bob@localhost/slix", "for the phone")
            direct = await phone.wait_message(lambda m: m.body == "for the phone")
            assert direct.carbon is None
            copy = await laptop.wait_message(lambda m: m.carbon == "received")
            assert copy.forwarded is not None
            assert copy.forwarded.body == "for the phone"
            # What bob sends from the phone is carbon-copied to the laptop as sent.
            await phone.send_message("alice@localhost", "from the phone")
            sent = await laptop.wait_message(lambda m: m.carbon == "sent")
            assert sent.forwarded is not None
            assert sent.forwarded.body == "from the phone"
            # The archive pages through everything in order, without gaps or repeats.
            seen: list[str] = []
            after: str | None = None
            for _ in range(10):
                page = await phone.mam_query(with_="alice@localhost", max_=10, after=after)
                seen.extend(m.message.body or "" for m in page.messages)
                after = page.last
                if page.complete:
                    break
            assert seen == [f"offline {i} <&>" for i in range(25)] + [
                "for the phone",
                "from the phone",
            ]
