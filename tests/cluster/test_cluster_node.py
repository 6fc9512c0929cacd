"""Three cluster nodes in one process (each built by app.run_node, as `villaged run` does, with
real mutual-TLS links on loopback): accounts and messages written on one node are committed to
the user's shard and read on the others, and a user's sessions are reachable from every node."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING

import trio

from tests.cluster.harness import wait_until, write_cluster
from tests.e2e.test_durability import archived_bodies
from tests.net.rawclient import RawClient
from villaged.app import run_node
from villaged.cluster.sessions import RemoteSession, SessionMirror
from villaged.config import load_config
from villaged.im.roster import RosterView

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator
    from pathlib import Path

    from villaged.app import Node
    from villaged.config import Config

PING = b"<iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>"


@contextlib.asynccontextmanager
async def cluster_of_three(
    tmp_path: Path, users: tuple[str, ...] = ()
) -> AsyncIterator[list[Node]]:
    files = write_cluster(tmp_path)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:

        async def start(config: Config) -> None:
            nodes.append(await nursery.start(partial(run_node, config, handle_signals=False)))

        # At the same time: a new cluster starts once every node has heard the others.
        async with trio.open_nursery() as starting:
            for config in [load_config(f.config) for f in files]:
                starting.start_soon(start, config)
        nodes.sort(key=lambda node: node.config.server.node)
        await wait_until(
            lambda: all(n.cluster is not None and n.cluster.has_quorum() for n in nodes),
            20,
            "every group has a leader",
        )
        for user in users:
            await nodes[0].store.add_user(f"{user}@localhost", f"{user}-password")
        yield nodes
        nursery.cancel_scope.cancel()


async def login(node: Node, user: str, resource: str = "test") -> RawClient:
    port = node.config.listeners.c2s_tls.bind[0].port
    client = await RawClient.connect(port, node.config.tls.cert, direct_tls=True)
    await client.login(user, f"{user}-password", starttls=False, resource=resource)
    return client


async def synced(client: RawClient) -> list[ET.Element]:
    """Everything the client got before the answer to a ping (sent now)."""
    await client.send(PING)
    got = []
    while (element := await client.element()).get("id") != "sync":
        got.append(element)
    return got


async def presence_of(client: RawClient, bare: str) -> str | None:
    """The type of the next presence ``client`` gets from ``bare`` (None: available)."""
    with trio.fail_after(5):
        while True:
            element = await client.element()
            if element.tag == "{jabber:client}presence" and element.get("from", "").startswith(
                bare
            ):
                return element.get("type")


def message(to: str, body: str) -> bytes:
    return f"<message to='{to}' type='chat' id='{body}'><body>{body}</body></message>".encode()


def bodies(elements: list[ET.Element]) -> list[str]:
    return [b for e in elements if (b := e.findtext("{jabber:client}body")) is not None]


async def test_accounts_created_on_one_node_exist_on_all(tmp_path: Path) -> None:
    async with cluster_of_three(tmp_path) as nodes:
        await nodes[0].store.add_user("alice@localhost", "alice-password")
        await nodes[2].store.add_user("bob@localhost", "bob-password")
        # The writer's own node has applied its write when add_user returns.
        assert "bob@localhost" in nodes[2].store.state.accounts
        await wait_until(
            lambda: all(len(n.store.state.accounts) == 2 for n in nodes), 5, "replicated"
        )
        # Ready (every group has a leader), and the groups' Raft state is on /metrics.
        assert nodes[1].status.route("GET", "/readyz")[0] == 200
        metrics = nodes[1].status.route("GET", "/metrics")[2].decode()
        assert 'villaged_cluster_group_has_leader{group="shard-0"} 1.0' in metrics
        assert 'villaged_cluster_peer_linked{peer="n1"} 1.0' in metrics
        # Every node can log the users in: their data keys came through the shards too.
        for node in nodes:
            await (await login(node, "alice")).aclose()


async def test_a_message_sent_on_one_node_waits_offline_for_a_login_on_another(
    tmp_path: Path,
) -> None:
    async with cluster_of_three(tmp_path, ("alice", "bob")) as nodes:
        alice = await login(nodes[1], "alice")
        for n in range(20):
            await alice.send(message("bob@localhost", f"m{n}"))
        await synced(alice)
        bob = await login(nodes[2], "bob")
        await bob.send(b"<presence/>")
        got: list[str] = []
        with trio.fail_after(10):
            while len(got) < 20:
                got += bodies([await bob.element()])
        assert got == [f"m{n}" for n in range(20)]
        await alice.aclose()
        await bob.aclose()


async def test_sessions_on_other_nodes_get_messages_and_presence(tmp_path: Path) -> None:
    async with cluster_of_three(tmp_path, ("alice", "bob")) as nodes:
        alice = await login(nodes[0], "alice")
        bob = await login(nodes[1], "bob")
        # Mutual subscription, across nodes.
        # (Each side answers after the request was handled; the other node reads it even if it
        # arrives before that node applied the request: roster changes wait for their shards.)
        await alice.send(b"<presence to='bob@localhost' type='subscribe'/>")
        await synced(alice)
        await bob.send(b"<presence to='alice@localhost' type='subscribed'/>")
        await bob.send(b"<presence to='alice@localhost' type='subscribe'/>")
        await synced(bob)
        await alice.send(b"<presence to='bob@localhost' type='subscribed'/>")
        await synced(alice)

        def both_ways(node: Node) -> bool:
            roster = node.store.state.view(RosterView.name)
            assert isinstance(roster, RosterView)
            entries = [
                roster.entry(f"{user}@localhost", f"{contact}@localhost")
                for user, contact in (("alice", "bob"), ("bob", "alice"))
            ]
            return all(e is not None and e.state.subscription == "both" for e in entries)

        # The nodes that did not make the last change apply it a moment later.
        await wait_until(lambda: all(both_ways(n) for n in nodes), 5, "subscribed both ways")
        await alice.send(b"<presence/>")
        await bob.send(b"<presence/>")
        await wait_until(
            lambda: all(len([s for s in n.sessions.all() if s.available]) == 2 for n in nodes),
            5,
            "every node sees both sessions available",
        )
        await synced(alice)
        await alice.send(message("bob@localhost/test", "live"))
        with trio.fail_after(5):
            while "live" not in bodies([await bob.element()]):
                pass
        # bob's node is taken for gone by alice's node (its link stayed down): alice sees bob
        # leave; when bob's node announces its sessions again, she sees him back.
        assert nodes[0].cluster is not None
        for hook in nodes[0].cluster.on_peer_lost:
            hook("n2")
        assert await presence_of(alice, "bob@localhost") == "unavailable"
        mirror = nodes[1].c2s.session_observer
        assert isinstance(mirror, SessionMirror)
        mirror.link_up("n1")
        assert await presence_of(alice, "bob@localhost") is None  # available
        # bob logs out on his node: alice, on another, sees him leave.
        assert any(isinstance(s, RemoteSession) for s in nodes[0].sessions.all())
        await bob.send(b"<presence type='unavailable'/>")
        with trio.fail_after(5):
            while True:
                element = await alice.element()
                if element.get("type") == "unavailable" and element.get("from", "").startswith(
                    "bob@localhost"
                ):
                    break
        await alice.aclose()
        await bob.aclose()


def files_holding(root: Path, blob: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and blob in p.read_bytes()]


async def test_a_deleted_account_s_data_key_leaves_every_node_s_disk(tmp_path: Path) -> None:
    async with cluster_of_three(tmp_path, ("alice", "bob", "carol")) as nodes:
        alice = await login(nodes[1], "alice")
        for n in range(5):
            await alice.send(message("bob@localhost", f"m{n}"))
        await synced(alice)
        cluster = nodes[0].cluster
        assert cluster is not None
        wrapped = cluster.shared.vault.export("bob@localhost")
        assert wrapped
        blobs = list(wrapped.values())
        for node in nodes:  # the key travelled through bob's shard: it is in every node's log
            assert any(files_holding(node.config.storage.dir, b) for b in blobs)

        await nodes[2].store.delete_user("bob@localhost")
        await wait_until(
            lambda: all(n.cluster is not None and n.cluster.shredded == 1 for n in nodes),
            30,
            "every node shredded bob's key",
        )
        for node in nodes:
            for blob in blobs:
                assert files_holding(node.config.storage.dir, blob) == []
        # The cluster goes on: alice's messages still commit and her archive (all of it:
        # every group was compacted meanwhile) is readable.
        await alice.send(message("carol@localhost", "after"))
        await synced(alice)
        assert await archived_bodies(alice) == ["m0", "m1", "m2", "m3", "m4", "after"]
        await alice.aclose()
