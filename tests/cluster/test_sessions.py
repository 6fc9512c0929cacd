"""Session mirroring between nodes: mirrors wired through an in-memory network whose frames
really go through the cluster wire format (msgpack, application frames), flushed by hand."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from villaged.cluster.sessions import RemoteSession, SessionMirror
from villaged.cluster.wire import AppFrame, FrameDecoder, encode_app_frame
from villaged.im.sessions import Session, SessionRegistry
from villaged.xmpp import xml
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import Sequence

ALICE = JID("alice", "example.org", "phone")
BOB = JID("bob", "example.org", "laptop")
CLIENT = "jabber:client"


def presence(show: str, prio: int = 0) -> ET.Element:
    element = ET.Element(f"{{{CLIENT}}}presence")
    ET.SubElement(element, f"{{{CLIENT}}}show").text = show
    ET.SubElement(element, f"{{{CLIENT}}}priority").text = str(prio)
    ET.SubElement(element, "{urn:xmpp:caps}c", {"node": "n", "ver": "v", "hash": "sha-1"})
    return element


def show(session: Session) -> str | None:
    assert session.presence is not None
    return session.presence.findtext(f"{{{CLIENT}}}show")


def message(to: JID, body: str = "hi") -> ET.Element:
    element = ET.Element(f"{{{CLIENT}}}message", {"to": str(to), "id": "m1", "type": "chat"})
    ET.SubElement(element, f"{{{CLIENT}}}body").text = body
    ET.SubElement(element, "{urn:xmpp:receipts}received", {"id": "r1"})
    return element


@dataclass(eq=False)
class Client:
    """A local session whose stanzas land in ``inbox``."""

    node: Node
    session: Session = field(init=False)
    inbox: list[ET.Element] = field(default_factory=list)
    terminated: list[tuple[str, str]] = field(default_factory=list)

    def end(self) -> None:
        """The driver ends the session (as c2s does after terminate or a disconnect)."""
        self.node.registry.remove(self.session)
        self.node.mirror.withdraw(self.session)


class Node:
    def __init__(self, net: Net, name: str, peers: Sequence[str], **limits: int) -> None:
        self.name = name
        self.now = 1000.0
        self.registry = SessionRegistry()
        self.mirror = SessionMirror(
            name, self.registry, net.sender(name), peers, clock=lambda: self.now, **limits
        )

    def bind(self, jid: JID, *, announce: bool = True) -> Client:
        """Bind a local session the way c2s does: a session it replaces is told 'conflict'."""
        client = Client(self)

        def enqueue(stanza: ET.Element) -> bool:
            client.inbox.append(stanza)
            return True

        def terminate(condition: str, text: str) -> None:
            client.terminated.append((condition, text))

        client.session = Session(jid=jid, enqueue=enqueue, terminate=terminate)
        replaced = self.registry.add(client.session)
        if replaced is not None:
            replaced.terminate("conflict", "replaced by a new login with the same resource")
        if announce:
            self.mirror.announce(client.session)
        return client

    def proxy(self, jid: JID) -> RemoteSession:
        session = self.registry.get(jid)
        assert isinstance(session, RemoteSession), session
        return session


class Net:
    """Frames in flight, in order; ``up`` False makes the transport refuse them."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.frames: list[tuple[str, str, bytes]] = []
        self.up = True

    def add(self, name: str, **limits: int) -> Node:
        peers = [n for n in ("a", "b", "c") if n != name]
        node = self.nodes[name] = Node(self, name, peers, **limits)
        return node

    def sender(self, source: str) -> Any:
        def send(peer: str, kind: str, body: Any) -> bool:
            if not self.up:
                return False
            self.frames.append((source, peer, encode_app_frame(kind, body)))
            return True

        return send

    def kinds(self) -> list[tuple[str, str, str]]:
        return [(src, dst, _decode(data).kind) for src, dst, data in self.frames]

    def flush(self) -> int:
        """Deliver every frame (and those they cause); how many were delivered."""
        count = 0
        while self.frames:
            source, target, data = self.frames.pop(0)
            frame = _decode(data)
            if target in self.nodes:
                self.nodes[target].mirror.receive(source, frame.kind, frame.body)
            count += 1
        return count


def _decode(data: bytes) -> AppFrame:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    frame = decoder.next_frame()
    assert isinstance(frame, AppFrame)
    return frame


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def a(net: Net) -> Node:
    return net.add("a")


@pytest.fixture
def b(net: Net) -> Node:
    return net.add("b")


def locals_of(node: Node, jid: JID) -> list[Session]:
    session = node.registry.get(jid)
    return [] if session is None or isinstance(session, RemoteSession) else [session]


# -- announcing -----------------------------------------------------------------------------------


def test_announce_creates_a_proxy_with_the_sessions_fields(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE, announce=False)
    session = client.session
    session.available, session.priority, session.presence = True, 5, presence("away", 5)
    session.interested = True
    session.features.add("carbons")
    a.mirror.announce(session)
    assert net.kinds() == [("a", "b", "sess.up"), ("a", "c", "sess.up")]
    assert net.flush() == 2
    proxy = b.proxy(ALICE)
    assert (proxy.node, proxy.bound_at) == ("a", 1000.0)
    assert proxy.available
    assert proxy.interested
    assert proxy.priority == 5
    assert proxy.features == {"carbons"}
    assert proxy.presence is not None
    assert xml.serialize(proxy.presence) == xml.serialize(session.presence)
    assert b.registry.of_user(ALICE.bare) == [proxy]
    assert b.mirror.remote_sessions("a") == [proxy]


def test_announcing_an_unchanged_session_sends_nothing(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    a.mirror.announce(client.session)
    client.session.features.discard("carbons")
    a.mirror.announce(client.session)
    assert net.frames == []


def test_changes_update_the_proxy(net: Net, a: Node, b: Node) -> None:
    session = a.bind(ALICE).session
    net.flush()
    first = b.proxy(ALICE)
    assert not first.available
    assert first.presence is None
    session.available, session.priority, session.presence = True, -3, presence("dnd", -3)
    a.mirror.announce(session)
    assert net.flush() == 2
    proxy = b.proxy(ALICE)
    assert proxy is first  # updated in place
    assert proxy.available
    assert proxy.priority == -3
    assert show(proxy) == "dnd"
    session.presence = presence("chat")
    a.mirror.announce(session)
    net.flush()
    assert show(b.proxy(ALICE)) == "chat"
    session.available, session.presence, session.interested = False, None, True
    session.features.add("carbons")
    a.mirror.announce(session)
    net.flush()
    proxy = b.proxy(ALICE)
    assert not proxy.available
    assert proxy.presence is None
    assert proxy.interested
    assert proxy.features == {"carbons"}


def test_withdraw_removes_the_proxy(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    client.end()
    assert net.kinds() == [("a", "b", "sess.down"), ("a", "c", "sess.down")]
    net.flush()
    assert b.registry.get(ALICE) is None
    assert b.mirror.remote_sessions("a") == []


def test_a_session_never_announced_is_withdrawn_silently(net: Net, a: Node) -> None:
    client = a.bind(ALICE, announce=False)
    client.end()
    assert net.frames == []


def test_remote_sessions_are_never_announced(net: Net, a: Node, b: Node) -> None:
    a.bind(ALICE)
    net.flush()
    proxy = b.proxy(ALICE)
    proxy.priority = 9
    b.mirror.announce(proxy)
    b.mirror.withdraw(proxy)
    assert net.frames == []


def test_a_session_not_in_the_registry_is_not_announced(net: Net, a: Node) -> None:
    client = a.bind(ALICE, announce=False)
    a.registry.remove(client.session)
    a.mirror.announce(client.session)
    assert net.frames == []


# -- sync and lost peers ------------------------------------------------------------------------


def test_sync_replaces_the_peers_proxies(net: Net, a: Node, b: Node) -> None:
    a.bind(ALICE)
    stale = a.bind(JID("carol", "example.org", "x"))
    net.flush()
    net.up = False  # these changes are lost on the way
    stale.end()
    a.bind(BOB)
    net.up = True
    assert a.mirror.unsent == 4
    assert b.registry.get(stale.session.jid) is not None
    a.mirror.link_up("b")
    assert net.kinds() == [("a", "b", "sess.sync")]
    net.flush()
    assert sorted(str(p.jid) for p in b.mirror.remote_sessions("a")) == [str(ALICE), str(BOB)]
    assert b.registry.get(stale.session.jid) is None


def test_a_large_sync_comes_in_chunks_and_an_empty_one_clears(net: Net, a: Node, b: Node) -> None:
    clients = [a.bind(JID(f"u{i}", "example.org", "r")) for i in range(1100)]
    for client in clients[:3]:
        client.session.presence = presence("x" * 400_000)
        a.mirror.announce(client.session)
    net.frames.clear()
    a.mirror.link_up("b")
    assert len(net.frames) == 4  # two big presences per chunk at most, 512 sessions per chunk
    net.flush()
    assert len(b.mirror.remote_sessions("a")) == 1100
    for client in clients:
        client.node.registry.remove(client.session)
        a.mirror.withdraw(client.session)
    net.frames.clear()
    a.mirror.link_up("b")
    assert net.kinds() == [("a", "b", "sess.sync")]
    net.flush()
    assert b.mirror.remote_sessions("a") == []
    assert len(b.registry) == 0


def test_link_up_to_a_stranger_is_a_local_error(a: Node) -> None:
    with pytest.raises(ValueError, match="not a peer"):
        a.mirror.link_up("z")


def test_peer_lost_removes_and_returns_its_proxies(net: Net, a: Node, b: Node) -> None:
    a.bind(ALICE)
    a.bind(BOB)
    b.bind(JID("carol", "example.org", "x"))
    net.flush()
    gone = b.mirror.peer_lost("a")
    assert sorted(str(p.jid) for p in gone) == [str(ALICE), str(BOB)]
    assert [str(s.jid) for s in b.registry.all()] == ["carol@example.org/x"]
    assert b.mirror.peer_lost("a") == []
    assert b.mirror.peer_lost("z") == []
    gone[0].terminate("conflict", "late")  # a forgotten proxy tells nobody
    assert net.frames == []


# -- delivery and ending --------------------------------------------------------------------------


def test_a_stanza_for_a_proxy_reaches_the_real_session_intact(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    stanza = message(ALICE)
    assert b.proxy(ALICE).send(stanza) is True
    assert net.kinds() == [("b", "a", "sess.deliver")]
    net.flush()
    (got,) = client.inbox
    assert got.tag == f"{{{CLIENT}}}message"
    assert got.find("{urn:xmpp:receipts}received") is not None
    assert xml.serialize(got) == xml.serialize(stanza)
    assert xml.serialize(got, default_ns=None) == xml.serialize(stanza, default_ns=None)
    assert a.mirror.delivered == 1


def test_a_delivery_for_a_gone_session_is_dropped_and_counted(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    proxy = b.proxy(ALICE)
    a.registry.remove(client.session)
    proxy.send(message(ALICE))
    net.flush()
    assert client.inbox == []
    assert (a.mirror.delivered, a.mirror.dropped_deliveries) == (0, 1)


def test_a_delivery_is_never_forwarded_again(net: Net, a: Node, b: Node) -> None:
    a.bind(ALICE)
    net.flush()
    stanza = xml.serialize(message(ALICE), default_ns=None)
    b.mirror.receive("a", "sess.deliver", {"j": str(ALICE), "x": stanza})
    assert net.frames == []
    assert b.mirror.dropped_deliveries == 1


def test_a_full_link_does_not_end_the_remote_session(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    net.up = False
    assert b.proxy(ALICE).send(message(ALICE)) is True
    assert (b.mirror.dropped_deliveries, b.mirror.unsent) == (1, 1)
    assert b.registry.get(ALICE) is not None
    assert client.terminated == []


def test_an_oversized_stanza_is_not_sent(net: Net, a: Node) -> None:
    b = net.add("b", max_stanza_bytes=1000)
    a.bind(ALICE)
    net.flush()
    assert b.proxy(ALICE).send(message(ALICE, "x" * 2000)) is True
    assert net.frames == []
    assert b.mirror.dropped_deliveries == 1


def test_terminating_a_proxy_ends_the_real_session(net: Net, a: Node, b: Node) -> None:
    client = a.bind(ALICE)
    net.flush()
    proxy = b.proxy(ALICE)
    proxy.terminate("policy-violation", "too slow")
    assert b.registry.get(ALICE) is None
    proxy.terminate("policy-violation", "too slow")  # once is enough
    assert net.kinds() == [("b", "a", "sess.end")]
    net.flush()
    assert client.terminated == [("policy-violation", "too slow")]


def test_an_end_for_an_earlier_login_spares_the_later_one(net: Net, a: Node, b: Node) -> None:
    first = a.bind(ALICE)
    net.flush()
    proxy = b.proxy(ALICE)
    a.now = 2000.0
    second = a.bind(ALICE)  # replaces the first on the same node
    assert first.terminated[0][0] == "conflict"
    proxy.terminate("conflict", "stale")  # b still had the first login's proxy
    net.flush()
    assert second.terminated == []
    assert a.registry.get(ALICE) is second.session


def test_a_down_for_an_earlier_login_spares_the_later_ones_proxy(
    net: Net, a: Node, b: Node
) -> None:
    first = a.bind(ALICE)
    net.flush()
    a.now = 2000.0
    a.bind(ALICE)
    first.end()
    assert [kind for _, _, kind in net.kinds()] == ["sess.up"] * 2 + ["sess.down"] * 2
    net.flush()
    assert b.proxy(ALICE).bound_at == 2000.0


# -- conflicts ----------------------------------------------------------------------------------


def survivors(nodes: Sequence[Node], jid: JID) -> list[tuple[str, Session]]:
    return [(node.name, s) for node in nodes for s in locals_of(node, jid)]


def test_a_later_login_elsewhere_replaces_the_session(net: Net, a: Node, b: Node) -> None:
    old = a.bind(ALICE)
    net.flush()
    b.now = 1500.0
    new = b.bind(ALICE)  # replaces a's proxy, which tells a
    net.flush()
    assert old.terminated[0][0] == "conflict"
    assert survivors([a, b], ALICE) == [("b", new.session)]
    assert a.proxy(ALICE).node == "b"
    old.end()
    net.flush()
    assert b.registry.get(ALICE) is new.session
    assert new.terminated == []


def test_a_later_login_wins_even_when_its_clock_is_behind(net: Net, a: Node, b: Node) -> None:
    a.now = 5000.0  # a's clock runs far ahead of b's
    old = a.bind(ALICE)
    net.flush()
    b.now = 10.0
    new = b.bind(ALICE)  # replaces a's proxy: stamped after it, whatever b's clock says
    net.flush()
    assert old.terminated[0][0] == "conflict"
    old.end()
    net.flush()
    assert survivors([a, b], ALICE) == [("b", new.session)]
    assert a.proxy(ALICE).bound_at > 5000.0
    assert new.terminated == []


@pytest.mark.parametrize(
    ("a_time", "b_time", "winner"),
    [(1000.0, 1000.0, "b"), (2000.0, 1000.0, "a"), (1000.0, 2000.0, "b")],
)
def test_simultaneous_logins_leave_exactly_one(
    net: Net, a: Node, b: Node, a_time: float, b_time: float, winner: str
) -> None:
    c = net.add("c")
    a.now, b.now = a_time, b_time
    clients = {"a": a.bind(ALICE), "b": b.bind(ALICE)}  # both announce before either hears
    net.flush()
    loser = "a" if winner == "b" else "b"
    assert survivors([a, b, c], ALICE) == [(winner, clients[winner].session)]
    assert clients[loser].terminated[0][0] == "conflict"
    assert clients[winner].terminated == []
    for node in (net.nodes[loser], c):
        assert node.proxy(ALICE).node == winner
    clients[loser].end()
    net.flush()
    for node in (net.nodes[loser], c):
        assert node.proxy(ALICE).node == winner


def test_an_older_announcement_is_ignored_by_a_newer_local_login(
    net: Net, a: Node, b: Node
) -> None:
    b.now = 900.0
    late = a.bind(ALICE, announce=False)  # a stamps it 1000 when it first sees it
    early = b.bind(ALICE)
    net.flush()
    assert a.registry.get(ALICE) is late.session
    assert late.terminated == []
    a.mirror.announce(late.session)  # b ends its own once it hears of the newer login
    net.flush()
    assert survivors([a, b], ALICE) == [("a", late.session)]
    assert early.terminated[0][0] == "conflict"


# -- bad frames and limits ------------------------------------------------------------------------

UP: dict[str, Any] = {
    "j": str(ALICE),
    "t": 1.5,
    "a": True,
    "p": 0,
    "x": None,
    "i": False,
    "f": [],
}


def up(**changes: Any) -> dict[str, Any]:
    return {**UP, **changes}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in UP.items() if k != key}


BAD_FRAMES: list[tuple[str, Any]] = [
    ("sess.nope", {}),
    ("sess.up", None),
    ("sess.up", [1, 2]),
    *(("sess.up", without(key)) for key in UP if key != "x"),
    ("sess.up", up(j=5)),
    ("sess.up", up(j="alice@example.org")),
    ("sess.up", up(j="@@@/x")),
    ("sess.up", up(j="a@" + "d" * 5000 + "/x")),
    ("sess.up", up(t="1")),
    ("sess.up", up(t=float("inf"))),
    ("sess.up", up(t=float("nan"))),
    ("sess.up", up(t=True)),
    ("sess.up", up(t=2**63)),
    ("sess.up", up(a=1)),
    ("sess.up", up(i=None)),
    ("sess.up", up(p=128)),
    ("sess.up", up(p=-129)),
    ("sess.up", up(p=True)),
    ("sess.up", up(p=1.0)),
    ("sess.up", up(f="carbons")),
    ("sess.up", up(f=["x"] * 33)),
    ("sess.up", up(f=["x" * 65])),
    ("sess.up", up(f=[""])),
    ("sess.up", up(f=[1])),
    ("sess.up", up(x="<presence xmlns='jabber:client'/>")),
    ("sess.up", up(x=b"<presence xmlns='jabber:client'>")),
    ("sess.up", up(x=b"<message xmlns='jabber:client'/>")),
    ("sess.up", up(x=b"<presence/>")),
    ("sess.up", up(x=b"")),
    ("sess.up", up(x=b"<presence xmlns='jabber:client'/><presence xmlns='jabber:client'/>")),
    ("sess.up", up(x=b"<!DOCTYPE p [<!ENTITY e 'x'>]><presence xmlns='jabber:client'/>")),
    ("sess.up", up(x=b"<presence xmlns='jabber:client'><!-- c --></presence>")),
    ("sess.up", up(x=b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")),
    ("sess.down", {"j": str(ALICE)}),
    ("sess.down", {"j": "example.org", "t": 1.0}),
    ("sess.down", "alice"),
    ("sess.sync", {"g": 1, "k": 0, "e": True}),
    ("sess.sync", {"g": 1, "k": 0, "e": 1, "s": []}),
    ("sess.sync", {"g": "1", "k": 0, "e": True, "s": []}),
    ("sess.sync", {"g": 1, "k": 0, "e": True, "s": [UP] * 8193}),
    ("sess.sync", {"g": 1, "k": 0, "e": True, "s": [UP, up(p=500)]}),
    ("sess.sync", {"g": 1, "k": 1, "e": True, "s": []}),
    ("sess.deliver", {"j": str(ALICE)}),
    ("sess.deliver", {"j": str(ALICE), "x": b"<body xmlns='jabber:client'>x</body>"}),
    ("sess.deliver", {"j": str(ALICE), "x": b"<message xmlns='jabber:client'>"}),
    ("sess.deliver", {"j": str(ALICE), "x": b"<message xmlns='jabber:client'/>" + b" " * 600_000}),
    ("sess.deliver", {"j": str(ALICE.bare), "x": xml.serialize(message(ALICE))}),
    ("sess.end", {"j": str(ALICE), "t": 1000.0, "c": "nonsense", "m": ""}),
    ("sess.end", {"j": str(ALICE), "t": 1000.0, "c": ["conflict"], "m": ""}),
    ("sess.end", {"j": str(ALICE), "t": 1000.0, "c": "conflict", "m": None}),
    ("sess.end", {"j": str(ALICE), "t": 1000.0, "c": "conflict", "m": "x" * 1025}),
    ("sess.end", {"j": str(ALICE), "c": "conflict", "m": ""}),
]


@pytest.mark.parametrize(("kind", "body"), BAD_FRAMES)
def test_a_bad_frame_is_rejected_counted_and_logged(
    net: Net, a: Node, b: Node, kind: str, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = a.bind(ALICE)
    net.frames.clear()
    before = [(s.jid, type(s)) for s in a.registry.all()]
    with caplog.at_level(logging.WARNING, logger="villaged.cluster"):
        a.mirror.receive("b", kind, body)
    assert a.mirror.rejected == 1
    assert [(s.jid, type(s)) for s in a.registry.all()] == before
    assert client.inbox == []
    assert client.terminated == []
    assert net.frames == []
    (record,) = caplog.records
    assert record.__dict__["event"] == "cluster.bad_session_frame"
    assert record.__dict__["peer"] == "b"


def test_frames_from_a_stranger_or_ourselves_are_rejected(a: Node) -> None:
    a.mirror.receive("z", "sess.up", UP)
    a.mirror.receive("a", "sess.up", UP)
    assert a.mirror.rejected == 2
    assert len(a.registry) == 0


def test_the_good_frame_the_bad_ones_are_made_from_is_accepted(a: Node) -> None:
    a.mirror.receive("b", "sess.up", up(x=b"<presence xmlns='jabber:client'/>", f=["carbons"]))
    a.mirror.receive("b", "sess.up", up(j="x.example/r", t=2))  # any domain; an int time
    assert a.mirror.rejected == 0
    assert len(a.registry) == 2


def test_a_broken_sync_is_abandoned_until_the_next_one(net: Net, a: Node, b: Node) -> None:
    carol = JID("carol", "example.org", "x")
    b.mirror.receive("a", "sess.up", up(j=str(carol)))
    b.mirror.receive("a", "sess.sync", {"g": 7, "k": 0, "e": False, "s": [UP]})
    b.mirror.receive("a", "sess.sync", {"g": 7, "k": 2, "e": False, "s": []})
    b.mirror.receive("a", "sess.sync", {"g": 7, "k": 3, "e": True, "s": []})  # ignored quietly
    b.mirror.receive("a", "sess.sync", {"g": 6, "k": 1, "e": True, "s": []})
    assert b.mirror.rejected == 2
    assert b.registry.get(carol) is not None  # the stale proxy stays until a sync completes
    b.mirror.receive("a", "sess.sync", {"g": 8, "k": 0, "e": False, "s": [UP]})
    b.mirror.receive("a", "sess.sync", {"g": 8, "k": 1, "e": True, "s": [up(j=str(BOB))]})
    assert sorted(str(p.jid) for p in b.mirror.remote_sessions("a")) == [str(ALICE), str(BOB)]
    assert b.mirror.rejected == 2


def test_at_most_max_remote_sessions_proxies(net: Net, a: Node) -> None:
    b = net.add("b", max_remote_sessions=2)
    c = net.add("c")
    users = [a.bind(JID(f"u{i}", "example.org", "r")) for i in range(2)]
    c.bind(JID("u9", "example.org", "r"))
    net.flush()
    assert len(b.registry) == 2
    assert b.mirror.rejected == 1
    users[0].session.available = True  # updating a held proxy needs no room
    a.mirror.announce(users[0].session)
    net.flush()
    assert b.mirror.rejected == 1
    # A sync that swaps a peer's sessions for others fits: proxies it drops do not count.
    for user in users:
        user.end()
    net.frames.clear()
    a.bind(JID("v1", "example.org", "r"))
    a.bind(JID("v2", "example.org", "r"))
    net.frames.clear()
    a.mirror.link_up("b")
    net.flush()
    assert sorted(str(p.jid) for p in b.registry.all()) == ["v1@example.org/r", "v2@example.org/r"]
    assert b.mirror.rejected == 1


def test_an_oversized_presence_is_rejected(net: Net, a: Node) -> None:
    b = net.add("b", max_stanza_bytes=1000)
    session = a.bind(ALICE).session
    session.available, session.presence = True, presence("x" * 2000)
    a.mirror.announce(session)
    net.flush()
    assert b.mirror.rejected == 1  # the announcement with it, not the one before
    assert not b.proxy(ALICE).available
    assert b.proxy(ALICE).presence is None


def test_kinds_lists_what_the_mirror_handles(a: Node) -> None:
    assert sorted(a.mirror.KINDS) == [
        "sess.deliver",
        "sess.down",
        "sess.end",
        "sess.sync",
        "sess.up",
    ]


def test_an_end_for_no_local_session_is_ignored(net: Net, a: Node, b: Node) -> None:
    a.bind(ALICE)
    net.flush()
    for jid in (ALICE, BOB):  # a proxy here, and nobody
        b.mirror.receive("a", "sess.end", {"j": str(jid), "t": 1000.0, "c": "reset", "m": ""})
    assert b.mirror.rejected == 0
    assert net.frames == []
    assert b.proxy(ALICE).node == "a"


def test_a_proxy_removed_behind_the_mirrors_back_comes_back(net: Net, a: Node, b: Node) -> None:
    session = a.bind(ALICE).session
    net.flush()
    old = b.proxy(ALICE)
    b.registry.remove(old)
    session.available = True
    a.mirror.announce(session)
    net.flush()
    assert b.proxy(ALICE) is not old
    assert b.mirror.remote_sessions("a") == [b.proxy(ALICE)]


def test_displaced_bind_times_are_remembered_within_a_bound(net: Net, a: Node, b: Node) -> None:
    users = [JID(f"u{i}", "example.org", "r") for i in range(4097)]
    for jid in users:
        a.bind(jid)
    net.flush()
    b.now = 10.0  # behind a's clock
    clients = [b.bind(jid, announce=False) for jid in users]  # each displaces a's proxy
    net.frames.clear()
    for client in (clients[0], clients[-1]):
        b.mirror.announce(client.session)
    stamps = [_decode(data).body["t"] for source, target, data in net.frames if target == "a"]
    assert stamps[0] == 10.0  # the oldest floor was forgotten
    assert stamps[1] > 1000.0
