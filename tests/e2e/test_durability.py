"""Acknowledged messages survive SIGKILL: a real `villaged run` process is killed while a client
sends, restarted, and every message the server had acknowledged is delivered from offline
storage exactly once and is in the sender's archive.

Without stream management (a later issue), a message counts as acknowledged once the server
has answered a ping sent after it: the server handles a connection's stanzas in order and
answers nothing before the commit of every stanza ahead of it has returned.
"""

from __future__ import annotations

import random
import signal
from typing import TYPE_CHECKING

import trio

from tests.net.rawclient import RawClient
from tests.nodes import add_users, spawn_node, write_node_config
from villaged.config import load_config

if TYPE_CHECKING:
    from pathlib import Path

    from villaged.config import Config

MAM = "urn:xmpp:mam:2"
ROUNDS = 3


async def connect(config: Config, user: str, proc: trio.Process, log: Path) -> RawClient:
    port = config.listeners.c2s_tls.bind[0].port
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, "villaged exited; see its log in the test's tmp_path"
            try:
                client = await RawClient.connect(port, config.tls.cert, direct_tls=True)
                break
            except OSError:
                await trio.sleep(0.1)
    await client.login(user, f"{user}-password", starttls=False)
    return client


async def send_until_killed(alice: RawClient, proc: trio.Process, first: int) -> set[str]:
    """Send numbered messages with a ping after every few; SIGKILL the server at a random
    moment. Returns the bodies acknowledged (answered by a later ping) before the kill; a
    message the server bounced (e.g. the recipient's offline queue was full) is not one."""
    acked: set[str] = set()
    pending: list[str] = []
    kill_at = trio.current_time() + random.uniform(0.3, 1.5)
    n = first
    try:
        while trio.current_time() < kill_at:
            for _ in range(random.randint(1, 8)):
                body = f"m{n}"
                n += 1
                pending.append(body)
                message = f"<message to='bob@localhost' type='chat' id='{body}'><body>{body}"
                await alice.send(message.encode() + b"</body></message>")
            ping = f"<iq type='get' id='p{n}'><ping xmlns='urn:xmpp:ping'/></iq>"
            await alice.send(ping.encode())
            while True:
                reply = await alice.element()
                if reply.get("id") == f"p{n}":
                    break
                if reply.get("type") == "error" and reply.get("id") in pending:
                    pending.remove(reply.get("id") or "")
            acked.update(pending)
            pending.clear()
    except (trio.BrokenResourceError, EOFError):  # pragma: no cover - killed mid-exchange
        pass
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    return acked


async def offline_bodies(bob: RawClient) -> list[str]:
    await bob.send(b"<presence/>")
    await bob.send(b"<iq type='get' id='done'><ping xmlns='urn:xmpp:ping'/></iq>")
    bodies: list[str] = []
    while True:
        got = await bob.element()
        if got.get("id") == "done":
            return bodies
        body = got.findtext("{jabber:client}body")
        if got.tag == "{jabber:client}message" and body is not None:
            bodies.append(body)


async def archived_bodies(alice: RawClient) -> list[str]:
    bodies: list[str] = []
    after = ""
    for page in range(1000):
        rsm = f"<after>{after}</after>" if after else ""
        await alice.send(
            f"<iq type='set' id='q{page}'><query xmlns='{MAM}' queryid='q{page}'>"
            f"<set xmlns='http://jabber.org/protocol/rsm'><max>100</max>{rsm}</set>"
            "</query></iq>".encode()
        )
        while True:
            got = await alice.element()
            if got.tag == "{jabber:client}iq" and got.get("id") == f"q{page}":
                break
            body = got.findtext(".//{jabber:client}body")
            if body is not None:
                bodies.append(body)
        fin = got.find(f"{{{MAM}}}fin")
        assert fin is not None
        if fin.get("complete") == "true":
            return bodies
        after = fin.findtext(".//{http://jabber.org/protocol/rsm}last") or ""
    raise AssertionError("archive paging did not finish")


async def test_acknowledged_messages_survive_sigkill(tmp_path: Path) -> None:
    config_path = write_node_config(tmp_path / "node")
    config = load_config(config_path)
    await add_users(config)
    log = tmp_path / "node.log"
    acked_total: set[str] = set()
    delivered: list[str] = []
    first = 0
    for _ in range(ROUNDS):
        proc = await spawn_node(config_path, log)
        alice = await connect(config, "alice", proc, log)
        acked_total |= await send_until_killed(alice, proc, first)
        await alice.aclose()
        first += 10_000
        proc = await spawn_node(config_path, log)
        try:
            bob = await connect(config, "bob", proc, log)
            with trio.fail_after(60):
                delivered += await offline_bodies(bob)
            await bob.aclose()
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await proc.wait()
    assert acked_total, "nothing was acknowledged before the kills"
    missing = acked_total - set(delivered)
    assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    proc = await spawn_node(config_path, log)
    try:
        alice = await connect(config, "alice", proc, log)
        with trio.fail_after(60):
            archived = await archived_bodies(alice)
        await alice.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    assert acked_total <= set(archived)
    assert len(archived) == len(set(archived))
