"""Peer links over real mutual TLS on 127.0.0.1: three nodes, a stranger, a restart."""

from __future__ import annotations

import datetime as dt
import stat
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from villaged.cluster import pki
from villaged.cluster.driver import DriverConfig, NodeDriver
from villaged.cluster.links import LinkConfig, Peer, PeerLinks
from villaged.cluster.raft import Entry, Heartbeat, Message, Role

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from villaged.cluster.wire import Hello

NODES = ("n1", "n2", "n3")
CLUSTER = "village"
NOW = dt.datetime.now(dt.UTC)
FAST = LinkConfig(
    send_queue_messages=64, handshake_timeout=5, reconnect_initial=0.02, reconnect_max=0.2
)


@dataclass
class Node:
    node_id: str
    directory: Path
    port: int = 0
    received: list[Message] = field(default_factory=list)
    links: PeerLinks | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    def files(self) -> tuple[Path, Path, Path]:
        return self.directory / "ca.pem", self.directory / "node.pem", self.directory / "node.key"


def make_credentials(root: Path, ca: pki.ClusterCa, node_id: str) -> Node:
    directory = root / node_id
    directory.mkdir(parents=True)
    node = Node(node_id, directory)
    ca_file, cert_file, key_file = node.files()
    ca_file.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    pki.issue_node_certificate(ca, node_id, ["127.0.0.1", "localhost"], NOW).save(
        cert_file, key_file
    )
    return node


def heartbeat(sender: str, to: str, term: int = 1) -> Heartbeat:
    return Heartbeat("g1", sender, to, term, commit=0)


class Harness:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.nodes: dict[str, Node] = {}

    def peers(self) -> dict[str, Peer]:
        return {n.node_id: Peer(n.node_id, "127.0.0.1", n.port) for n in self.nodes.values()}

    async def listen(self, node: Node) -> trio.SocketListener:
        listeners = await trio.open_tcp_listeners(node.port, host="127.0.0.1")
        node.port = listeners[0].socket.getsockname()[1]
        self.nodes[node.node_id] = node
        return listeners[0]

    async def start(
        self,
        node: Node,
        listener: trio.SocketListener,
        as_id: str = "",
        *,
        hello: Callable[[], tuple[str, Any]] | None = None,
        on_hello: Callable[[Hello], None] | None = None,
    ) -> PeerLinks:
        ca_file, cert_file, key_file = node.files()
        node.received = []
        links = PeerLinks(
            as_id or node.node_id,
            CLUSTER,
            self.peers(),
            server_context=pki.server_context(ca_file, cert_file, key_file),
            client_context=pki.client_context(ca_file, cert_file, key_file),
            deliver=node.received.append,
            hello=hello,
            on_hello=on_hello,
            config=FAST,
        )
        node.links = links
        node.stopped = trio.Event()
        await self.nursery.start(self._run, node, links, listener)
        return links

    async def _run(
        self,
        node: Node,
        links: PeerLinks,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                node.scope = scope
                await links.run([listener], task_status=task_status)
        finally:
            node.stopped.set()

    async def stop(self, node: Node) -> None:
        assert node.scope is not None
        node.scope.cancel()
        await node.stopped.wait()


async def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    """Real sockets, real time: poll counters (bounded) that have no event of their own."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.fixture
def ca() -> pki.ClusterCa:
    return pki.create_ca(CLUSTER, NOW)


async def test_messages_flow_between_three_nodes_and_a_restart_reconnects(
    tmp_path: Path, ca: pki.ClusterCa
) -> None:
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        nodes = [make_credentials(tmp_path, ca, n) for n in NODES]
        listeners = [await harness.listen(node) for node in nodes]
        for node, listener in zip(nodes, listeners, strict=True):
            await harness.start(node, listener)
        for node in nodes:
            assert node.links is not None
            for other in NODES:
                if other != node.node_id:
                    node.links.send(heartbeat(node.node_id, other))
        await wait_for(lambda: all(len(n.received) == 2 for n in nodes))
        for node in nodes:
            assert sorted(m.sender for m in node.received) == sorted(set(NODES) - {node.node_id})
            assert all(m.to == node.node_id for m in node.received)

        # n2 goes away and comes back on the same port; n1's link reconnects by itself.
        n1, n2 = nodes[0], nodes[1]
        assert n1.links is not None
        await harness.stop(n2)
        n1.links.send(heartbeat("n1", "n2", term=2))  # may be lost: Raft retransmits
        await wait_for(lambda: n1.links is not None and not n1.links.connected("n2"))
        await harness.start(n2, await harness.listen(n2))
        await wait_for(lambda: n1.links is not None and n1.links.connected("n2"))
        assert n1.links.connects("n2") == 2
        n1.links.send(heartbeat("n1", "n2", term=3))
        await wait_for(lambda: any(m.term == 3 for m in n2.received))
        nursery.cancel_scope.cancel()


async def test_a_changed_hello_reaches_peers_on_links_already_up(
    tmp_path: Path, ca: pki.ClusterCa
) -> None:
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        nodes = [make_credentials(tmp_path, ca, n) for n in NODES[:2]]
        listeners = [await harness.listen(node) for node in nodes]
        heard: dict[str, list[tuple[str, object]]] = {n.node_id: [] for n in nodes}
        says: dict[str, object] = {"n1": None, "n2": None}
        for node, listener in zip(nodes, listeners, strict=True):
            me = node.node_id
            await harness.start(
                node,
                listener,
                hello=partial(lambda me: ("inc" + me, says[me]), me),
                on_hello=partial(lambda me, h: heard[me].append((h.node_id, h.boot)), me),
            )
        n1 = nodes[0]
        assert n1.links is not None
        await wait_for(lambda: n1.links is not None and n1.links.connected("n2"))
        await wait_for(lambda: ("n1", None) in heard["n2"])
        says["n1"] = {"n1": "incn1", "n2": "incn2"}  # n1 decided how the cluster starts
        n1.links.announce()
        await wait_for(lambda: ("n1", says["n1"]) in heard["n2"])
        assert n1.links.connects("n2") == 1  # on the same link, not a new one
        nursery.cancel_scope.cancel()


async def test_a_node_certified_by_another_ca_is_refused_both_ways(
    tmp_path: Path, ca: pki.ClusterCa
) -> None:
    rogue_ca = pki.create_ca(CLUSTER, NOW)
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        n1 = make_credentials(tmp_path, ca, "n1")
        n1_listener = await harness.listen(n1)
        # The impostor claims to be n2, with a certificate from its own CA (which it trusts).
        impostor = make_credentials(tmp_path / "rogue", rogue_ca, "n2")
        impostor_listener = await harness.listen(impostor)
        n1_links = await harness.start(n1, n1_listener)
        impostor_links = await harness.start(impostor, impostor_listener)
        impostor_links.send(heartbeat("n2", "n1"))
        n1_links.send(heartbeat("n1", "n2"))
        await wait_for(
            lambda: n1_links.refused_inbound >= 2 and impostor_links.refused_inbound >= 2
        )
        assert n1.received == []
        assert impostor.received == []
        assert not n1_links.connected("n2")
        assert n1_links.accepted_inbound == 0
        nursery.cancel_scope.cancel()


async def test_a_valid_certificate_for_the_wrong_node_is_refused(
    tmp_path: Path, ca: pki.ClusterCa
) -> None:
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        n1 = make_credentials(tmp_path, ca, "n1")
        n2 = make_credentials(tmp_path, ca, "n2")
        n1_listener = await harness.listen(n1)
        n2_listener = await harness.listen(n2)
        n1_links = await harness.start(n1, n1_listener)
        # n2's address answers with n2's certificate, but it says (in its hello) it is n3, and
        # sends as n3: both ends refuse.
        liar = await harness.start(n2, n2_listener, as_id="n3")
        liar.send(heartbeat("n3", "n1"))
        await wait_for(lambda: n1_links.refused_inbound >= 1)
        assert n1.received == []
        nursery.cancel_scope.cancel()


def test_a_full_send_queue_drops_the_oldest(tmp_path: Path, ca: pki.ClusterCa) -> None:
    node = make_credentials(tmp_path, ca, "n1")
    ca_file, cert_file, key_file = node.files()
    links = PeerLinks(
        "n1",
        CLUSTER,
        {"n2": Peer("n2", "127.0.0.1", 1)},
        server_context=pki.server_context(ca_file, cert_file, key_file),
        client_context=pki.client_context(ca_file, cert_file, key_file),
        deliver=lambda message: None,
        config=FAST,
    )
    for term in range(100):
        links.send(heartbeat("n1", "n2", term))
    links.send(heartbeat("n1", "elsewhere"))
    assert links.dropped("n2") == 100 - FAST.send_queue_messages
    assert links.unroutable == 1


def test_node_certificates(tmp_path: Path, ca: pki.ClusterCa) -> None:
    node = make_credentials(tmp_path, ca, "n7")
    _, cert_file, key_file = node.files()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:villaged:node:n7"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    ca.save(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    loaded = pki.load_ca(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded.certificate == ca.certificate
    assert pki.peer_node_id({"subjectAltName": (("URI", "urn:villaged:node:n1"),)}) == "n1"
    assert pki.peer_node_id({"subjectAltName": (("DNS", "n1"),)}) is None
    assert pki.peer_node_id(None) is None
    with pytest.raises(ValueError, match="node id"):
        pki.issue_node_certificate(ca, "a,b", [], NOW)
    with pytest.raises(ValueError, match="timezone"):
        pki.create_ca(CLUSTER, dt.datetime(2026, 1, 1))


def deliver_to(drivers: dict[str, NodeDriver], node_id: str, message: Message) -> None:
    drivers[node_id].deliver(message)


class Counter:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def apply(self, entry: Entry) -> None:
        self.items.append(entry.data)

    def restore(self, data: bytes) -> None:
        raise AssertionError("no snapshots in this test")

    def snapshot(self) -> bytes:
        raise AssertionError("no snapshots in this test")


async def test_drivers_replicate_over_real_links(tmp_path: Path, ca: pki.ClusterCa) -> None:
    config = DriverConfig(tick_seconds=0.01, election_ticks=10)
    drivers: dict[str, NodeDriver] = {}
    apps = {n: Counter() for n in NODES}
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        nodes = [make_credentials(tmp_path, ca, n) for n in NODES]
        listeners = [await harness.listen(node) for node in nodes]
        for node, listener in zip(nodes, listeners, strict=True):
            ca_file, cert_file, key_file = node.files()
            links = PeerLinks(
                node.node_id,
                CLUSTER,
                harness.peers(),
                server_context=pki.server_context(ca_file, cert_file, key_file),
                client_context=pki.client_context(ca_file, cert_file, key_file),
                deliver=partial(deliver_to, drivers, node.node_id),
                config=FAST,
            )
            drivers[node.node_id] = NodeDriver(
                node.node_id,
                node.directory / "raft",
                links,
                {"g1": NODES},
                config,
                applications={"g1": apps[node.node_id]},
            )
            await nursery.start(links.run, [listener])
            await nursery.start(drivers[node.node_id].run)

        def leader() -> NodeDriver | None:
            leaders = [d for d in drivers.values() if d.status()["g1"].role is Role.LEADER]
            return leaders[0] if len(leaders) == 1 else None

        await wait_for(lambda: leader() is not None)
        with trio.fail_after(10):
            for n in range(20):
                current = leader()
                assert current is not None
                await current.propose("g1", b"%d" % n)
        expected = [b"%d" % n for n in range(20)]
        await wait_for(lambda: all(app.items == expected for app in apps.values()))
        nursery.cancel_scope.cancel()


class StuckStream:
    """A connection whose peer stopped reading: every write blocks."""

    async def send_all(self, data: bytes) -> None:
        await trio.sleep_forever()


async def test_a_write_that_makes_no_progress_ends_the_link(
    tmp_path: Path, ca: pki.ClusterCa, autojump_clock: trio.testing.MockClock
) -> None:
    node = make_credentials(tmp_path, ca, "n1")
    ca_file, cert_file, key_file = node.files()
    links = PeerLinks(
        "n1",
        CLUSTER,
        {"n2": Peer("n2", "127.0.0.1", 1)},
        server_context=pki.server_context(ca_file, cert_file, key_file),
        client_context=pki.client_context(ca_file, cert_file, key_file),
        deliver=node.received.append,
        config=replace(FAST, write_timeout=3.0),
    )
    outbound = links._outbound["n2"]
    links.send(heartbeat("n1", "n2"))
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await links._pump(outbound, StuckStream())  # type: ignore[arg-type]
    assert trio.current_time() - started == pytest.approx(3.0)


async def test_inbound_connections_beyond_the_cap_are_closed_at_once(
    tmp_path: Path, ca: pki.ClusterCa
) -> None:
    async with trio.open_nursery() as nursery:
        node = make_credentials(tmp_path, ca, "n1")
        ca_file, cert_file, key_file = node.files()
        links = PeerLinks(
            "n1",
            CLUSTER,
            {},
            server_context=pki.server_context(ca_file, cert_file, key_file),
            client_context=pki.client_context(ca_file, cert_file, key_file),
            deliver=node.received.append,
            config=replace(FAST, max_inbound=2, handshake_timeout=30.0),
        )
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await nursery.start(links.run, [listener])
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await wait_for(lambda: links._inbound == 2)  # handshaking: they never speak
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await extra.receive_some(1) == b""  # closed at once
        assert links.refused_inbound == 1
        for stream in (*held, extra):
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_drops_every_link_is_retried_ever_more_slowly(
    tmp_path: Path, ca: pki.ClusterCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)
        n1, n2 = (make_credentials(tmp_path, ca, n) for n in ("n1", "n2"))
        listeners = [await harness.listen(node) for node in (n1, n2)]
        await harness.start(n2, listeners[1])
        assert n2.links is not None

        async def hang_up(*args: object) -> None:
            return None  # accepts the link, then closes it at once

        monkeypatch.setattr(n2.links, "_receive", hang_up)
        await harness.start(n1, listeners[0])
        assert n1.links is not None
        await trio.sleep(1.5)
        # The backoff doubles up to reconnect_max (0.2 s) because no link stays up for
        # stable_after: about a dozen links, not the ~100 of retrying every 0.02 s.
        assert 3 <= n1.links.connects("n2") <= 40
        nursery.cancel_scope.cancel()
