"""The outbound queue survives SIGKILL: with the remote domain down, a local user sends 200
messages (each acknowledged by XEP-0198 only once stored), villaged (a real process) is killed
and restarted, the remote comes up, and all 200 arrive exactly once and in order."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import trio

from tests.federation.nodes import Route, add_users, start_federated_node, write_federated_config
from tests.federation.pki import make_ca
from tests.net.rawclient import RawClient
from tests.nodes import spawn_node, wait_ready
from tests.ports import free_port_base
from villaged.config import load_config

if TYPE_CHECKING:
    from pathlib import Path

SM = "urn:xmpp:sm:3"
TOTAL = 200


async def send_acknowledged(alice: RawClient) -> None:
    await alice.send(f"<enable xmlns='{SM}'/>".encode())
    assert (await alice.element()).tag == f"{{{SM}}}enabled"
    for first in range(0, TOTAL, 20):
        data = "".join(
            f"<message to='bob@b.test' type='chat' id='m{n}'><body>m{n:03d}</body></message>"
            for n in range(first, first + 20)
        )
        await alice.send(data.encode() + f"<r xmlns='{SM}'/>".encode())
    with trio.fail_after(30):
        while True:
            got = await alice.element()
            assert got.get("type") != "error", "a message bounced"
            if got.tag == f"{{{SM}}}a" and int(got.get("h", "0")) == TOTAL:
                return


async def test_queued_messages_survive_sigkill_and_arrive_once_in_order(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca = make_ca("federation test CA")
    base_a, base_b = free_port_base(), free_port_base()
    while abs(base_a - base_b) < 8:
        base_b = free_port_base()
    a_path = write_federated_config(
        tmp_path / "a", "a.test", ca, routes={"b.test": Route(base_b + 4)}, port_base=base_a
    )
    b_path = write_federated_config(
        tmp_path / "b", "b.test", ca, routes={"a.test": Route(base_a + 4)}, port_base=base_b
    )
    a_config = load_config(a_path)
    await add_users(a_config, ("alice",))
    http = a_config.listeners.http.bind[0].port
    ca_file = a_config.federation.ca_file
    assert ca_file is not None

    # b.test is down: nothing listens on its port. alice's 200 messages are stored.
    proc = await spawn_node(a_path, tmp_path / "a.log")
    try:
        await wait_ready(proc, http)
        alice = await RawClient.connect(base_a, ca_file, domain="a.test")
        await alice.login("alice", "alice-password", resource="r")
        await send_acknowledged(alice)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await alice.aclose()

        # Restarted, with the queue from the log; then b.test comes up.
        proc = await spawn_node(a_path, tmp_path / "a.log")
        await wait_ready(proc, http)
        b = await start_federated_node(nursery, b_path, users=("bob",))
        bob = await RawClient.connect(b.c2s, ca_file, domain="b.test")
        await bob.login("bob", "bob-password", resource="r")
        await bob.send(b"<presence/>")  # available: offline messages come now, the rest live
        bodies: list[str] = []
        with trio.fail_after(60):
            while len(bodies) < TOTAL:
                got = await bob.element(60)
                if got.tag == "{jabber:client}message":
                    assert got.get("from") == "alice@a.test/r"
                    bodies.append(got.findtext("{jabber:client}body") or "")
        # Nothing more comes: each was delivered once.
        with trio.move_on_after(2):
            while True:
                got = await bob.element(2)
                if got.tag == "{jabber:client}message":
                    bodies.append(got.findtext("{jabber:client}body") or "")
        assert bodies == [f"m{n:03d}" for n in range(TOTAL)]
        await bob.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    nursery.cancel_scope.cancel()
