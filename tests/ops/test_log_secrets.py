"""What the daemon logs (its JSON lines, as `villaged run` writes them) during a failed login,
a rate-limit trip and an operator's inspection: the right events, and no secret anywhere —
no password, TOTP secret or code, key material or message body."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyotp
import pytest
import trio

from tests.net.rawclient import RawClient
from tests.nodes import start_node
from villaged.admin import server as admin_server
from villaged.admin.client import run_command
from villaged.admin.operators import OperatorStore
from villaged.ops.logging import configure_logging
from villaged.storage import crypto

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BODY = "the quarterly numbers are 4711"


async def test_events_are_logged_and_secrets_are_not(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = io.StringIO()
    configure_logging("debug", "node1", output)
    try:
        running = await start_node(
            nursery,
            tmp_path,
            extra_toml="[c2s]\nmax_stanza_bytes = 10240\nburst_bytes = 16384\n"
            "bytes_per_second = 1024",
        )
        config = running.config
        keyset = crypto.Keyset.load(config.storage.keyset)
        operators = OperatorStore.open(config.storage.dir / "admin", keyset)
        secret, _ = operators.enroll("ops1", os.getuid(), datetime.now(UTC).timestamp())
        totp = pyotp.TOTP(secret)
        clock = [1_900_000_000.0]
        used: list[str] = []
        monkeypatch.setattr(admin_server, "wall_clock", lambda: clock[0])

        def codes() -> Iterator[str]:
            while True:
                clock[0] += 30
                used.append(str(totp.at(clock[0])))
                yield used[-1]

        # A failed login, a chat message, a flood past the rate limit.
        wrong = await RawClient.connect(running.c2s, running.ca_file)
        with pytest.raises(PermissionError):
            await wrong.login("alice", "not-alice-password")
        await wrong.aclose()
        alice = await RawClient.connect(running.c2s, running.ca_file)
        await alice.login("alice", "alice-password")
        await alice.send(
            f"<message to='bob@localhost' type='chat'><body>{BODY}</body></message>".encode()
        )
        flood = (
            b"<message to='bob@localhost' type='chat'><body>" + b"f" * 900 + b"</body></message>"
        )
        with contextlib.suppress(trio.BrokenResourceError):
            await alice.send(flood * 100)
        assert await alice.stream_error() == "policy-violation"
        await alice.aclose()
        # An operator's inspection.
        grant = await run_command(
            config.admin.socket,
            "grant.request",
            {
                "jid": "alice@localhost",
                "reason": "abuse-investigation",
                "justification": "flooding reported by several users",
                "ticket": "AB-9",
            },
            codes(),
            True,
        )
        result = await run_command(
            config.admin.socket,
            "inspect",
            {"what": "messages", "jid": "alice@localhost", "grant": grant["id"]},
            codes(),
            False,
        )
        assert any(BODY in m["stanza"] for m in result["messages"])  # the data was there
    finally:
        root = logging.getLogger("villaged")  # as the other tests expect it
        root.handlers[:] = []
        root.propagate = True
        root.setLevel(logging.NOTSET)
    text = output.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    names = {e["event"] for e in events}
    assert {"c2s.auth_failed", "c2s.rate_limited", "admin.grant_opened"} <= names
    assert all(
        e["security"] for e in events if e["event"] in ("c2s.auth_failed", "c2s.rate_limited")
    )
    assert all({"ts", "level", "event", "node"} <= set(e) for e in events)
    secrets = [
        "alice-password",
        "not-alice-password",
        secret,
        BODY,
        *used,
        *(base64.b64encode(k.material).decode() for k in keyset._keys.values()),
    ]
    for item in secrets:
        assert item not in text, f"a secret is in the log: {item[:6]}…"
