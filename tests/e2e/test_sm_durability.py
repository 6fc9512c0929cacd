"""XEP-0198 acks are durable: a client sends 1,000 messages with stream management, the
server (a real `villaged run` process) is SIGKILLed at a random point and restarted, and every
message the server had acknowledged with ``<a h=…/>`` is delivered exactly once."""

from __future__ import annotations

import random
import signal
from typing import TYPE_CHECKING

import trio

from tests.e2e.test_durability import connect
from tests.nodes import add_users, spawn_node, write_node_config
from villaged.config import load_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.net.rawclient import RawClient

SM = "urn:xmpp:sm:3"
SID = "{urn:xmpp:sid:0}stanza-id"
TOTAL = 1000
RECIPIENTS = ("bob", "carol")  # 500 each: within one offline queue's bound


async def send_with_acks(alice: RawClient, proc: trio.Process, kill_after: int) -> int:
    """Send m0, m1, … in bursts, each followed by <r/>; SIGKILL the server once
    ``kill_after`` messages are out (without waiting for their ack). The highest h seen."""
    await alice.send(f"<enable xmlns='{SM}'/>".encode())
    assert (await alice.element()).tag == f"{{{SM}}}enabled"
    acked = 0
    sent = 0
    try:
        while sent < kill_after:
            burst = min(random.randint(1, 20), kill_after - sent)
            data = ""
            for n in range(sent, sent + burst):
                to = RECIPIENTS[n % 2]
                data += f"<message to='{to}@localhost' type='chat' id='m{n}'><body>m{n}</body>"
                data += "</message>"
            await alice.send(data.encode() + f"<r xmlns='{SM}'/>".encode())
            sent += burst
            if sent >= kill_after:
                break
            while True:  # this burst's answer (earlier ones may still be on their way)
                got = await alice.element()
                if got.tag == f"{{{SM}}}a":
                    acked = max(acked, int(got.get("h", "0")))
                    if acked == sent:
                        break
                assert got.get("type") != "error", "a message bounced"
    except (trio.BrokenResourceError, EOFError):  # pragma: no cover - killed mid-exchange
        pass
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    return acked


async def delivered(client: RawClient) -> list[tuple[str, str]]:
    """(body, stanza-id) of every message the offline flush hands over."""
    await client.send(b"<presence/>")
    await client.send(b"<iq type='get' id='done'><ping xmlns='urn:xmpp:ping'/></iq>")
    got: list[tuple[str, str]] = []
    for _ in range(TOTAL * 2):
        element = await client.element()
        if element.get("id") == "done":
            return got
        body = element.findtext("{jabber:client}body")
        if element.tag == "{jabber:client}message" and body is not None:
            sid = element.find(SID)
            got.append((body, sid.get("id", "") if sid is not None else ""))
    raise AssertionError("the offline flush did not end")


async def test_every_acknowledged_message_survives_sigkill_exactly_once(tmp_path: Path) -> None:
    config_path = write_node_config(tmp_path / "node")
    config = load_config(config_path)
    await add_users(config, ("alice", *RECIPIENTS))
    log = tmp_path / "node.log"
    kill_after = random.randint(100, TOTAL - 1)
    proc = await spawn_node(config_path, log)
    alice = await connect(config, "alice", proc, log)
    with trio.fail_after(120):
        acked = await send_with_acks(alice, proc, kill_after)
    await alice.aclose()
    assert acked > 0, "nothing was acknowledged before the kill"

    proc = await spawn_node(config_path, log)
    try:
        received: list[tuple[str, str]] = []
        for user in RECIPIENTS:
            client = await connect(config, user, proc, log)
            with trio.fail_after(60):
                received += await delivered(client)
            await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    bodies = [body for body, _ in received]
    missing = {f"m{n}" for n in range(acked)} - set(bodies)
    assert not missing, f"acknowledged (h={acked}) but lost: {sorted(missing)[:10]}"
    assert len(bodies) == len(set(bodies)), "a message was delivered twice"
    ids = [sid for _, sid in received]
    assert all(ids), "a delivered message has no stanza-id"
    assert len(ids) == len(set(ids)), "a stanza-id was delivered twice"
