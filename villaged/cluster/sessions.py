"""Session mirroring: every node's registry also holds the sessions bound on the other nodes.

This module owns the *proxy sessions* (`RemoteSession`) that stand for other nodes' client
sessions in this node's `SessionRegistry`, and the ``sess.*`` application frames that keep them
in step. It moves no bytes: frames go out through the ``send(peer_id, kind, body)`` callable the
node gives it and come in through `SessionMirror.receive`.

Theory of operation
-------------------
Routing code (presence, messages, roster pushes, carbons) only ever looks in the local
registry. So each node announces its own sessions to every peer, and each peer registers a
proxy for each of them: a stanza handed to a proxy (``proxy.send``) is serialized and sent to
the owner node as ``sess.deliver``, which hands it to the real session. Ending a proxy
(``proxy.terminate``, e.g. a newer login here replaced it) sends ``sess.end`` to the owner.

Local side. The node calls `SessionMirror.announce` after bind and after each stanza the
session's driver handled. It is cheap when nothing changed: a fingerprint of the fields routing
reads (available, priority, presence, interested, features) is compared with the last one
sent, and ``sess.up`` goes to every peer only when it differs. A session's *bind time* is
stamped the first time the mirror sees it. `SessionMirror.withdraw` sends ``sess.down`` when the
session ends; `SessionMirror.link_up` sends a peer the whole list (``sess.sync``, in chunks) when
our link to it comes up, which also repairs whatever a broken link lost.

Remote side. Proxies are kept per owner node. One full JID has at most one session cluster
wide: when two nodes hold one each, the newer login wins (RFC 6120 §7.7.2.2), "newer" meaning
the larger ``(bind time, node id)`` -- a total order every node computes alike, so exactly one
survives even when two nodes bind at once and cross announcements. A losing local session is
replaced in the registry by the proxy and terminated with ``conflict``; a losing announcement
is ignored (its owner terminates its own session when our announcement arrives). Between two
proxies the same rule picks the one to keep. When a local login replaces a proxy, the proxy's
bind time is remembered so the new session is stamped later than it even if clocks disagree.

Every frame from a peer is untrusted: each field's type, size and range is checked (JIDs are
parsed and must be full, stanzas go through the stream layer's bounded, DTD-refusing parser),
at most ``max_remote_sessions`` proxies are held, and a bad frame is counted in ``rejected``,
logged, and dropped -- `SessionMirror.receive` never raises for a peer's mistake.

Frames (bodies are msgpack maps; ``j`` is always a full JID, ``t`` the owner's bind time)::

    sess.up       {"j": str, "t": float, "a": bool available, "p": int priority (-128..127),
                   "x": bytes presence XML | None, "i": bool interested, "f": [str] features}
    sess.down     {"j": str, "t": float}              only the proxy with that bind time goes
    sess.sync     {"g": int generation, "k": int chunk index (from 0), "e": bool last chunk,
                   "s": [sess.up body, ...]}          after the last chunk the peer's proxies are
                                                      exactly the sessions listed
    sess.deliver  {"j": str, "x": bytes stanza XML}
    sess.end      {"j": str, "t": float, "c": str stream error condition, "m": str text}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from villaged.im.sessions import Session
from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.stanza import NS_CLIENT
from villaged.xmpp.stanza import kind as stanza_kind

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import Callable, Iterable

    from villaged.im.sessions import SessionRegistry

__all__ = [
    "KIND_DELIVER",
    "KIND_DOWN",
    "KIND_END",
    "KIND_SYNC",
    "KIND_UP",
    "RemoteSession",
    "SessionMirror",
]

logger = logging.getLogger("villaged.cluster")

KIND_UP: Final = "sess.up"
KIND_DOWN: Final = "sess.down"
KIND_SYNC: Final = "sess.sync"
KIND_DELIVER: Final = "sess.deliver"
KIND_END: Final = "sess.end"

_PRESENCE: Final = f"{{{NS_CLIENT}}}presence"
_MAX_JID_CHARS: Final = 3 * 1023 + 2
_MAX_FEATURES: Final = 32
_MAX_FEATURE_CHARS: Final = 64
_MAX_TEXT_CHARS: Final = 1024
# A sync chunk: few enough entries for the wire decoder's array limit (8192), and roughly
# bounded in bytes so one frame never carries a huge burst of presence stanzas.
_SYNC_CHUNK_SESSIONS: Final = 512
_SYNC_CHUNK_BYTES: Final = 1 << 20
_MAX_SYNC_ENTRIES: Final = 8192
# Bind times of proxies a local login displaced, kept until that login is stamped.
_MAX_FLOORS: Final = 4096

_Fingerprint = tuple[bool, int, bytes | None, bool, tuple[str, ...]]


@dataclass(eq=False, kw_only=True)
class RemoteSession(Session):
    """A proxy for a session bound on node ``node`` at ``bound_at`` (that node's clock).

    Its ``enqueue`` sends the stanza to ``node`` and always succeeds (a full link must not end
    the remote session); its ``terminate`` asks ``node`` to end the session and drops the proxy.
    """

    node: str
    bound_at: float
    presence_xml: bytes | None = field(default=None, repr=False)

    def newer_than(self, bound_at: float, node: str) -> bool:
        return (self.bound_at, self.node) > (bound_at, node)


@dataclass(slots=True)
class _LocalState:
    bound_at: float
    sent: _Fingerprint | None = None  # what peers were last told; None: not announced yet
    presence_element: ET.Element | None = None  # cache of the last presence serialized
    presence_xml: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Announcement:
    """A checked ``sess.up`` body."""

    jid: JID
    bound_at: float
    available: bool
    priority: int
    presence_xml: bytes | None
    presence: ET.Element | None
    interested: bool
    features: frozenset[str]


@dataclass(slots=True)
class _Sync:
    """A ``sess.sync`` in progress from one peer."""

    generation: int
    next_chunk: int
    seen: set[JID]
    failed: bool = False


class _BadFrameError(Exception):
    """A peer's frame broke the rules; the text says how (safe to log)."""


class SessionMirror:
    """Mirrors local sessions to the peers, and the peers' sessions into ``registry``."""

    KINDS: Final[frozenset[str]] = frozenset(
        {KIND_UP, KIND_DOWN, KIND_SYNC, KIND_DELIVER, KIND_END}
    )

    def __init__(
        self,
        node_id: str,
        registry: SessionRegistry,
        send: Callable[[str, str, Any], bool],
        peers: Iterable[str],
        *,
        max_remote_sessions: int = 100_000,
        max_stanza_bytes: int = 512 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self._registry = registry
        self._send = send
        self._peers = frozenset(peers) - {node_id}
        self.max_remote_sessions = max_remote_sessions
        self.max_stanza_bytes = max_stanza_bytes
        self._limits = xml.XmlLimits(max_stanza_bytes=max_stanza_bytes)
        self._clock = clock
        self._local: dict[Session, _LocalState] = {}
        self._proxies: dict[str, dict[JID, RemoteSession]] = {peer: {} for peer in self._peers}
        self._syncs: dict[str, _Sync] = {}
        self._floors: dict[JID, float] = {}
        self._generation = 0
        self._handlers: dict[str, Callable[[str, Any], None]] = {
            KIND_UP: self._on_up,
            KIND_DOWN: self._on_down,
            KIND_SYNC: self._on_sync,
            KIND_DELIVER: self._on_deliver,
            KIND_END: self._on_end,
        }
        self.rejected = 0  # frames from peers dropped as malformed or over a limit
        self.delivered = 0  # stanzas from peers handed to a local session
        self.dropped_deliveries = 0  # stanzas for a session lost: no such session, link full
        self.unsent = 0  # frames the transport refused

    # -- local side ----------------------------------------------------------------------------

    def announce(self, session: Session) -> None:
        """Tell every peer about ``session`` if it is new or changed since last time."""
        if isinstance(session, RemoteSession) or self._registry.get(session.jid) is not session:
            return
        state = self._stamp(session)
        fingerprint = self._fingerprint(session, state)
        if fingerprint == state.sent:
            return
        state.sent = fingerprint
        body = _up_body(session, state.bound_at, fingerprint)
        for peer in sorted(self._peers):
            self._transmit(peer, KIND_UP, body)

    def withdraw(self, session: Session) -> None:
        """``session`` ended: peers drop their proxy of it."""
        if isinstance(session, RemoteSession):
            return
        state = self._local.pop(session, None)
        if state is None or state.sent is None:
            return
        body = {"j": str(session.jid), "t": state.bound_at}
        for peer in sorted(self._peers):
            self._transmit(peer, KIND_DOWN, body)

    def link_up(self, peer_id: str) -> None:
        """Our link to ``peer_id`` (re)connected: send it every announced local session."""
        if peer_id not in self._peers:
            raise ValueError(f"{peer_id!r} is not a peer")
        self._generation += 1
        entries = [
            _up_body(session, state.bound_at, self._fingerprint(session, state))
            for session, state in self._local.items()
            if state.sent is not None and self._registry.get(session.jid) is session
        ]
        for index, (chunk, last) in enumerate(_chunks(entries)):
            body = {"g": self._generation, "k": index, "e": last, "s": chunk}
            self._transmit(peer_id, KIND_SYNC, body)

    def peer_lost(self, peer_id: str) -> list[RemoteSession]:
        """``peer_id`` is gone: unregister its proxies and return them."""
        proxies = self._proxies.get(peer_id)
        if proxies is None:
            return []
        self._proxies[peer_id] = {}
        self._syncs.pop(peer_id, None)
        return [proxy for proxy in proxies.values() if self._registry.remove(proxy)]

    def remote_sessions(self, peer_id: str) -> list[RemoteSession]:
        """The proxies of ``peer_id``'s sessions now registered."""
        return [
            proxy
            for proxy in self._proxies.get(peer_id, {}).values()
            if self._registry.get(proxy.jid) is proxy
        ]

    # -- remote side ---------------------------------------------------------------------------

    def receive(self, peer_id: str, kind: str, body: Any) -> None:
        """Handle one ``sess.*`` frame from ``peer_id``; a bad one is counted and dropped."""
        try:
            if peer_id not in self._peers:
                raise _BadFrameError("sender is not a peer")
            handler = self._handlers.get(kind)
            if handler is None:
                raise _BadFrameError("unknown kind")
            handler(peer_id, body)
        except _BadFrameError as exc:
            self.rejected += 1
            logger.warning(
                "dropped a bad session frame %.40r from %.64r: %s",
                kind,
                peer_id,
                exc,
                extra={"event": "cluster.bad_session_frame", "peer": peer_id},
            )

    def _on_up(self, peer: str, body: Any) -> None:
        self._upsert(peer, self._announcement(body))

    def _on_down(self, peer: str, body: Any) -> None:
        fields = _map(body)
        jid = _full_jid(fields.get("j"))
        bound_at = _bind_time(fields.get("t"))
        proxy = self._proxies[peer].get(jid)
        if proxy is not None and proxy.bound_at == bound_at:
            del self._proxies[peer][jid]
            self._registry.remove(proxy)

    def _on_sync(self, peer: str, body: Any) -> None:
        fields = _map(body)
        generation, index = fields.get("g"), fields.get("k")
        last, entries = fields.get("e"), fields.get("s")
        if type(generation) is not int or type(index) is not int or type(last) is not bool:
            raise _BadFrameError("sync needs int 'g', int 'k' and bool 'e'")
        if not isinstance(entries, list) or len(entries) > _MAX_SYNC_ENTRIES:
            raise _BadFrameError(f"sync needs a list 's' of at most {_MAX_SYNC_ENTRIES} sessions")
        sync = self._syncs.get(peer)
        if index == 0:
            sync = self._syncs[peer] = _Sync(generation, 0, set())
        elif sync is None or sync.generation != generation:
            raise _BadFrameError(f"sync chunk {index} of generation {generation} without its start")
        elif sync.failed:
            return  # already counted when it failed
        elif index != sync.next_chunk:
            sync.failed = True
            raise _BadFrameError(f"sync chunk {index}, expected {sync.next_chunk}")
        try:
            for announcement in [self._announcement(entry) for entry in entries]:
                sync.seen.add(announcement.jid)
                self._upsert(peer, announcement, syncing=sync)
        except _BadFrameError:
            sync.failed = True  # the rest of this sync is ignored; the next one repairs
            raise
        sync.next_chunk += 1
        if last:
            del self._syncs[peer]
            proxies = self._proxies[peer]
            for jid in [jid for jid in proxies if jid not in sync.seen]:
                self._registry.remove(proxies.pop(jid))

    def _on_deliver(self, peer: str, body: Any) -> None:
        fields = _map(body)
        jid = _full_jid(fields.get("j"))
        stanza = self._element(fields.get("x"))
        if not stanza_kind(stanza):
            raise _BadFrameError("delivered element is not a stanza")
        session = self._registry.get(jid)
        if session is None or isinstance(session, RemoteSession):
            self.dropped_deliveries += 1  # it ended meanwhile (a proxy: it moved; no loops)
            return
        self.delivered += 1
        session.send(stanza)

    def _on_end(self, peer: str, body: Any) -> None:
        fields = _map(body)
        jid = _full_jid(fields.get("j"))
        bound_at = _bind_time(fields.get("t"))
        condition, text = fields.get("c"), fields.get("m")
        if not isinstance(condition, str) or condition not in xml.STREAM_ERROR_CONDITIONS:
            raise _BadFrameError("'c' is not a stream error condition")
        if not isinstance(text, str) or len(text) > _MAX_TEXT_CHARS:
            raise _BadFrameError(f"'m' must be a string of at most {_MAX_TEXT_CHARS} characters")
        session = self._registry.get(jid)
        if session is None or isinstance(session, RemoteSession):
            return
        state = self._local.get(session)
        if state is not None and state.bound_at == bound_at:  # not a later login
            session.terminate(condition, text)

    # -- proxies -------------------------------------------------------------------------------

    def _upsert(self, peer: str, new: _Announcement, syncing: _Sync | None = None) -> None:
        """Create or update ``peer``'s proxy for ``new.jid``, unless a newer login holds it."""
        proxies = self._proxies[peer]
        current = self._registry.get(new.jid)
        mine = proxies.get(new.jid)
        if mine is not None and mine is not current:
            del proxies[new.jid]  # replaced behind our back
            mine = None
        if mine is not None:
            _update(mine, new)
            return
        if isinstance(current, RemoteSession):
            if current.newer_than(new.bound_at, peer):
                return
            self._proxies[current.node].pop(new.jid, None)
            self._registry.add(self._proxy(peer, new))
            return
        if current is not None and (new.bound_at, peer) < (
            self._stamp(current).bound_at,
            self.node_id,
        ):
            return  # our login is newer; the peer ends its own when our announcement arrives
        if not self._room_for_one(peer, syncing):
            raise _BadFrameError(f"more than max_remote_sessions ({self.max_remote_sessions})")
        replaced = self._registry.add(self._proxy(peer, new))
        if replaced is not None:
            replaced.terminate("conflict", "replaced by a new login on another node")

    def _room_for_one(self, peer: str, syncing: _Sync | None) -> bool:
        held = sum(len(proxies) for proxies in self._proxies.values())
        if syncing is not None:  # proxies the sync is about to drop do not count
            held -= sum(1 for jid in self._proxies[peer] if jid not in syncing.seen)
        return held < self.max_remote_sessions

    def _proxy(self, peer: str, new: _Announcement) -> RemoteSession:
        proxy: RemoteSession

        def enqueue(stanza: ET.Element) -> bool:
            self._forward(proxy, stanza)
            return True

        def terminate(condition: str, text: str) -> None:
            self._end_proxy(proxy, condition, text)

        proxy = RemoteSession(
            jid=new.jid, enqueue=enqueue, terminate=terminate, node=peer, bound_at=new.bound_at
        )
        _update(proxy, new)
        self._proxies[peer][new.jid] = proxy
        return proxy

    def _forward(self, proxy: RemoteSession, stanza: ET.Element) -> None:
        data = xml.serialize(stanza, default_ns=None)
        if len(data) > self.max_stanza_bytes:
            self.dropped_deliveries += 1
            return
        if not self._transmit(proxy.node, KIND_DELIVER, {"j": str(proxy.jid), "x": data}):
            self.dropped_deliveries += 1

    def _end_proxy(self, proxy: RemoteSession, condition: str, text: str) -> None:
        proxies = self._proxies.get(proxy.node, {})
        if proxies.get(proxy.jid) is not proxy:
            return  # already gone: its owner was told, or the proxy was superseded
        del proxies[proxy.jid]
        if not self._registry.remove(proxy):
            # A local login took its place: stamp that login later than this one.
            floor = max(proxy.bound_at, self._floors.pop(proxy.jid, proxy.bound_at))
            self._floors[proxy.jid] = floor
            if len(self._floors) > _MAX_FLOORS:
                del self._floors[next(iter(self._floors))]
        body = {"j": str(proxy.jid), "t": proxy.bound_at, "c": condition, "m": text}
        self._transmit(proxy.node, KIND_END, body)

    # -- helpers -------------------------------------------------------------------------------

    def _stamp(self, session: Session) -> _LocalState:
        """The mirror's record of a local session, its bind time set when first seen."""
        state = self._local.get(session)
        if state is None:
            now = self._clock()
            floor = self._floors.pop(session.jid, None)
            if floor is not None and now <= floor:
                now = math.nextafter(floor, math.inf)
            state = self._local[session] = _LocalState(now)
        return state

    def _fingerprint(self, session: Session, state: _LocalState) -> _Fingerprint:
        presence = session.presence
        if presence is None:
            data = None
        else:
            if presence is not state.presence_element:
                state.presence_element = presence
                state.presence_xml = xml.serialize(presence, default_ns=None)
            data = state.presence_xml
        features = tuple(sorted(session.features))
        return (session.available, session.priority, data, session.interested, features)

    def _transmit(self, peer: str, kind: str, body: dict[str, Any]) -> bool:
        if self._send(peer, kind, body):
            return True
        self.unsent += 1
        return False

    def _announcement(self, body: Any) -> _Announcement:
        fields = _map(body)
        available, interested = fields.get("a"), fields.get("i")
        if type(available) is not bool or type(interested) is not bool:
            raise _BadFrameError("'a' and 'i' must be booleans")
        priority = fields.get("p")
        if type(priority) is not int or not -128 <= priority <= 127:
            raise _BadFrameError("'p' must be an integer in -128..127")
        data = fields.get("x")
        presence = None if data is None else self._element(data)
        if presence is not None and presence.tag != _PRESENCE:
            raise _BadFrameError("'x' is not a jabber:client presence")
        assert data is None or isinstance(data, bytes)
        return _Announcement(
            jid=_full_jid(fields.get("j")),
            bound_at=_bind_time(fields.get("t")),
            available=available,
            priority=priority,
            presence_xml=data,
            presence=presence,
            interested=interested,
            features=_features(fields.get("f")),
        )

    def _element(self, data: Any) -> ET.Element:
        """One element from a peer's bytes, through the stream layer's limits and checks."""
        if not isinstance(data, bytes) or len(data) > self.max_stanza_bytes:
            raise _BadFrameError(
                f"XML must be bytes, at most max_stanza_bytes ({self.max_stanza_bytes})"
            )
        parser = xml.FramedStreamParser(self._limits)
        try:
            parser.receive_message(data)
            event = parser.next_event()
        except xml.XmlStreamError as exc:
            raise _BadFrameError(f"bad XML: {exc}") from None
        if not isinstance(event, xml.StanzaReceived):
            raise _BadFrameError("XML is not one element")
        return event.element


def _up_body(session: Session, bound_at: float, fingerprint: _Fingerprint) -> dict[str, Any]:
    available, priority, presence, interested, features = fingerprint
    return {
        "j": str(session.jid),
        "t": bound_at,
        "a": available,
        "p": priority,
        "x": presence,
        "i": interested,
        "f": list(features),
    }


def _chunks(entries: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bool]]:
    """``entries`` cut into sync chunks, each flagged whether it is the last; at least one."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for entry in entries:
        weight = len(entry["x"] or b"")
        if chunks[-1] and (
            len(chunks[-1]) >= _SYNC_CHUNK_SESSIONS or size + weight > _SYNC_CHUNK_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += weight
    return [(chunk, index == len(chunks) - 1) for index, chunk in enumerate(chunks)]


def _update(proxy: RemoteSession, new: _Announcement) -> None:
    proxy.bound_at = new.bound_at
    proxy.available = new.available
    proxy.priority = new.priority
    if new.presence_xml != proxy.presence_xml:
        proxy.presence_xml = new.presence_xml
        proxy.presence = new.presence
    proxy.interested = new.interested
    proxy.features = set(new.features)


def _map(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _BadFrameError("body is not a map")
    return body


def _full_jid(value: Any) -> JID:
    if not isinstance(value, str) or len(value) > _MAX_JID_CHARS:
        raise _BadFrameError("'j' must be a JID string")
    try:
        jid = JID.parse(value)
    except JIDError as exc:
        raise _BadFrameError(f"'j' is not a JID: {exc}") from None
    if not jid.resource:
        raise _BadFrameError("'j' is not a full JID")
    return jid


def _bind_time(value: Any) -> float:
    if type(value) is int and abs(value) <= 2**53:
        return float(value)
    if type(value) is not float or not math.isfinite(value):
        raise _BadFrameError("'t' must be a finite number")
    return value


def _features(value: Any) -> frozenset[str]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_FEATURES
        or not all(isinstance(f, str) and 0 < len(f) <= _MAX_FEATURE_CHARS for f in value)
    ):
        raise _BadFrameError(
            f"'f' must be a list of at most {_MAX_FEATURES} strings "
            f"of 1..{_MAX_FEATURE_CHARS} characters"
        )
    return frozenset(value)
