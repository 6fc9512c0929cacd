"""A user sees operator access to their data with a real XMPP client (slixmpp): the notice
when a grant on them opens, and the access list the server reads from its audit log."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyotp
import trio

from tests.e2e.test_slixmpp_blocking import login
from tests.e2e.xmpp_client import open_xmpp_client
from tests.nodes import start_node
from villaged.admin import server as admin_server
from villaged.admin.client import run_command
from villaged.admin.operators import OperatorStore
from villaged.storage import crypto

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import pytest


async def test_the_user_is_told_and_can_list_the_accesses(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await start_node(nursery, tmp_path)
    config = node.config
    keyset = crypto.Keyset.load(config.storage.keyset)
    operators = OperatorStore.open(config.storage.dir / "admin", keyset)
    secret, _ = operators.enroll("ops1", os.getuid(), datetime.now(UTC).timestamp())
    totp = pyotp.TOTP(secret)
    clock = [1_900_000_000.0]
    monkeypatch.setattr(admin_server, "wall_clock", lambda: clock[0])

    def codes() -> Iterator[str]:
        while True:
            clock[0] += 30
            yield str(totp.at(clock[0]))

    async with open_xmpp_client("alice") as alice:
        await login(alice, node, "alice")
        with trio.fail_after(30):
            await alice.send_presence()
            assert "urn:villaged:access:0" in (await alice.disco_info("alice@localhost")).features
            assert await alice.access_list() == ()
            grant = await run_command(
                config.admin.socket,
                "grant.request",
                {
                    "jid": "alice@localhost",
                    "reason": "abuse-investigation",
                    "justification": "reports of spam sent from this account",
                    "ticket": "ABUSE-3",
                },
                codes(),
                True,
            )
            notice = await alice.wait_message(lambda m: m.type == "headline")
            assert "abuse-investigation" in (notice.body or "")
            await run_command(
                config.admin.socket,
                "inspect",
                {"what": "roster", "jid": "alice@localhost", "grant": grant["id"]},
                codes(),
                False,
            )
            accesses = await alice.access_list()
    assert [(a["action"], a["operator"], a["reason"], a["ticket"]) for a in accesses] == [
        ("grant.request", "ops1", "abuse-investigation", "ABUSE-3"),
        ("inspect.roster", "ops1", "abuse-investigation", "ABUSE-3"),
    ]
    nursery.cancel_scope.cancel()
