"""Wires a node: opens the store, starts the listeners, reports readiness, shuts down cleanly.

This is the one place that builds a node's parts; tests build nodes through `run_node` too.
Shutdown has one shape: on SIGTERM/SIGINT every client stream ends with <system-shutdown/>
(a bounded wait for them), then the serving nursery is cancelled; the store's nursery outlives
it and the log is closed last, so every acknowledged write is on disk. SIGHUP reloads the TLS
certificate for new connections.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from villaged import __version__
from villaged.admin.node import kicker, open_admin, serve_operator_access
from villaged.admin.operators import OperatorError
from villaged.cluster.node import ClusterNode, ClusterStartupError, FrameRoute
from villaged.cluster.sessions import RemoteSession, SessionMirror
from villaged.federation.glue import InboundRouter, RemotePresence
from villaged.federation.service import Federation
from villaged.im import private, server_info, stream_management, vcard
from villaged.im.blocking import Blocking
from villaged.im.context import ImContext
from villaged.im.features import FeatureViews
from villaged.im.handlers import HandlerRegistry
from villaged.im.messages import Messages
from villaged.im.presence import Presence
from villaged.im.roster import Roster
from villaged.im.router import Router
from villaged.im.sessions import SessionRegistry
from villaged.net.c2s import C2SContext, serve_c2s
from villaged.net.http import Response, serve_http
from villaged.net.s2s_tls import S2STlsConfigError
from villaged.net.tls import ALPN_XMPP_CLIENT, ServerTlsSpec, TlsConfigError, TlsContextHolder
from villaged.net.websocket import ALPN_HTTP_1_1, WebSocketSettings, serve_websocket
from villaged.ops.backup import read_backup_status
from villaged.ops.control import control_socket_path, serve_control
from villaged.ops.logging import reopen_log_files
from villaged.ops.metrics import BackupWatch, Metrics
from villaged.ops.monitor import MonitorService
from villaged.ops.sdnotify import notify
from villaged.storage.errors import StorageError
from villaged.storage.store import Store, StoreOptions
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from villaged.admin.server import AdminContext
    from villaged.cluster.wire import AppFrame
    from villaged.config.model import Config
    from villaged.im.sessions import Session

log = logging.getLogger("villaged.app")

#: What the node answers: SIGHUP reloads, SIGTERM and SIGINT stop it gracefully.
SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class NodeStatus:
    """What /healthz, /readyz and /metrics report."""

    metrics: Metrics
    ready: bool = False
    http_ports: list[int] = field(default_factory=list)
    #: On a cluster node: whether every group it replicates has a leader (else not ready).
    quorum: Callable[[], bool] | None = None

    def route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if not self.ready:
                return 503, "text/plain", b"starting\n"
            if self.quorum is not None and not self.quorum():
                return 503, "text/plain", b"no quorum: a shard has no leader\n"
            return 200, "text/plain", b"ready\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        return 404, "text/plain", b"not found\n"


class StartupError(Exception):
    """The node cannot start; the message names the config key at fault."""


SHUTDOWN_GRACE_S: Final = 5.0
GC_YOUNG_THRESHOLD: Final = 20_000


@dataclass
class Node:
    """The parts of a running node, for the signal handler and for tests."""

    config: Config
    store: Store
    tls: TlsContextHolder
    sessions: SessionRegistry
    c2s: C2SContext
    status: NodeStatus
    monitor: MonitorService
    admin: AdminContext | None = None  # operator access (the admin socket), once opened
    federation: Federation | None = None  # server-to-server links, when [federation] is on
    cluster: ClusterNode | None = None  # the cluster side, when [cluster] is on


def build_tls(config: Config) -> TlsContextHolder:
    specs = [_tls_spec(config, name) for name in ("c2s", "c2s_tls", "websocket")]
    try:
        return TlsContextHolder(config.tls.cert, config.tls.key, specs)
    except TlsConfigError as exc:
        raise StartupError(f"{config.source}: tls: {exc}") from None


def _tls_spec(config: Config, listener: str) -> ServerTlsSpec:
    profile = config.listeners.by_name()[listener].profile(config.tls.profile)
    alpn = {"c2s_tls": (ALPN_XMPP_CLIENT,), "websocket": (ALPN_HTTP_1_1,)}.get(listener, ())
    return ServerTlsSpec(profile=profile, alpn_protocols=alpn)


async def run_node(
    config: Config,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Signals are caught from the start: a SIGTERM that arrives while the node starts (say,
    # just after READY=1, before the loop below reads signals) waits here for a graceful stop
    # instead of killing the process with Python's default handler.
    with (
        trio.open_signal_receiver(*SIGNALS) if handle_signals else contextlib.nullcontext()
    ) as signals:
        await _run(config, signals, task_status)


async def _run(
    config: Config,
    signals: AsyncIterator[int] | None,
    task_status: trio.TaskStatus[Node],
) -> None:
    tls = build_tls(config)
    views = FeatureViews()
    clustered = config.cluster.enabled
    options = StoreOptions.from_config(config.storage, replicated=clustered)
    store = await trio.to_thread.run_sync(Store.open, options, views.all())
    try:
        node = _assemble(config, store, tls, views)
        node.admin = await _open_operator_access(node, views)
        # Two nurseries: the store's outlives the serving one, so on shutdown every
        # connection task (and so every commit it started) is finished before the log closes
        # (and, on a cluster node, before the Raft groups stop).
        async with trio.open_nursery() as storage_nursery:
            await storage_nursery.start(store.run)
            if node.cluster is not None:
                try:
                    await storage_nursery.start(node.cluster.run)
                except ClusterStartupError as exc:
                    raise StartupError(str(exc)) from None
                store.replicator = node.cluster.replicator
            _tune_garbage_collector()
            try:
                async with trio.open_nursery() as serving:
                    await _start_listeners(node, serving)
                    node.status.ready = True
                    notify("READY=1")
                    log.info(
                        "node ready",
                        extra={
                            "event": "node.ready",
                            "version": __version__,
                            "domain": config.server.domain,
                            "accounts": len(store.state.accounts),
                            "log_last_index": store.log.last_index,
                        },
                    )
                    task_status.started(node)
                    if signals is None:
                        await trio.sleep_forever()
                    else:
                        await _serve_signals(node, signals)
                    await _shut_down(node)
                    serving.cancel_scope.cancel()
            finally:
                store.log.close()
                if node.cluster is not None:
                    storage_nursery.cancel_scope.cancel()
                if node.admin is not None:
                    node.admin.audit.close()  # after every admin connection has ended
    finally:
        store.close()
        log.info("node stopped", extra={"event": "node.stopped"})


def _tune_garbage_collector() -> None:
    """The rebuilt views are long-lived: move them out of the collector's sight (gc.freeze),
    and collect the young generation less often — per-stanza garbage is short-lived and
    mostly freed by reference counting, so frequent scans cost more than they find."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


def _assemble(config: Config, store: Store, tls: TlsContextHolder, views: FeatureViews) -> Node:
    domain = config.server.domain
    sessions = SessionRegistry()
    metrics = _node_metrics(store, sessions, config.backup.dir)
    handlers = HandlerRegistry()
    im = ImContext(domain, store, sessions, handlers)
    server_info.register(handlers)
    stream_management.register(handlers)
    vcard.register(im, views.vcards)
    private.register(im, views.private)
    roster = Roster(im, views.roster)
    roster.register()
    blocking = Blocking(im, views.blocking)
    messages = Messages(im, views.messages, in_roster=roster.in_roster, blocking=blocking)
    presence = Presence(im, roster, on_available=messages.flush_offline, blocking=blocking)
    blocking.register(on_change=presence.blocking_changed)
    router = Router(im, messages=messages, presence=presence, blocking=blocking)
    monitor = MonitorService(config.monitor)
    c2s = C2SContext(
        domain=domain,
        limits=config.c2s,
        store=store,
        sessions=sessions,
        handlers=handlers,
        router=router,
        unknown_user_secret=store.node_secret("sasl_unknown_user"),
        store_unacked=partial(stream_management.store_unacked, messages),
        disabled=views.account_status.is_disabled,
        metrics=metrics,
        monitor=monitor,
    )
    monitor.block_listeners.append(c2s.end_unauthenticated_streams)
    node = Node(config, store, tls, sessions, c2s, NodeStatus(metrics), monitor)
    if config.cluster.enabled:
        node.cluster = _join_cluster(node, presence)
    if config.federation.enabled:
        node.federation = _federate(
            config, store, views, im, messages, presence, router, blocking, monitor
        )
        hook = RemotePresence(node.federation, sessions)
        roster.outbound_remote = presence.outbound_remote = hook
    return node


def _join_cluster(node: Node, presence: Presence) -> ClusterNode:
    """The cluster side, wired into the IM layer: writes go through the shards, and other
    nodes' sessions are mirrored into the session registry (so routing reaches them)."""
    try:
        cluster = ClusterNode.build(node.config, node.store)
    except ClusterStartupError as exc:
        raise StartupError(str(exc)) from None
    mirror = SessionMirror(
        cluster.node_id, node.sessions, cluster.links.send_app, cluster.links.peers()
    )
    node.c2s.session_observer = mirror
    cluster.on_link_up.append(mirror.link_up)
    # Sessions of a peer taken for gone (its contacts here were told they left), by peer:
    # when the peer announces them again, those contacts are told they are back.
    taken_for_gone: dict[str, set[str]] = {}

    def here(session: Session) -> bool:
        return not isinstance(session, RemoteSession)

    def session_frame(peer: str, frame: AppFrame) -> None:
        mirror.receive(peer, frame.kind, frame.body)
        gone = taken_for_gone.get(peer)
        if gone and frame.kind in ("sess.sync", "sess.up"):
            for session in mirror.remote_sessions(peer):
                if str(session.jid) in gone and session.available:
                    gone.discard(str(session.jid))
                    presence.back_elsewhere(session, here)

    cluster.routes.append(FrameRoute("sess.", session_frame))

    def peer_lost(peer: str) -> None:
        gone = taken_for_gone.setdefault(peer, set())
        for session in mirror.peer_lost(peer):
            if presence.gone_elsewhere(session, here) or session.available:
                gone.add(str(session.jid))

    cluster.on_peer_lost.append(peer_lost)
    node.status.quorum = cluster.has_quorum
    node.status.metrics.watch_cluster(cluster.status_document)
    return cluster


def _federate(
    config: Config,
    store: Store,
    views: FeatureViews,
    im: ImContext,
    messages: Messages,
    presence: Presence,
    router: Router,
    blocking: Blocking,
    monitor: MonitorService,
) -> Federation:
    """Federation, wired into the IM layer: messages and iqs for other domains leave through
    it, and stanzas from other domains come in through `InboundRouter`."""
    try:
        federation = Federation(config, store, views.s2s_queue, monitor=monitor)
    except S2STlsConfigError as exc:
        raise StartupError(f"{config.source}: federation: {exc}") from None
    messages.remote = federation
    router.remote = federation
    federation.inbound = InboundRouter(
        im, federation, messages=messages, presence=presence, blocking=blocking
    )

    def answer_probe(stanza: ET.Element) -> None:
        federation.send_ephemeral(stanza, JID.parse(stanza.get("to", "")))

    presence.remote_answer = answer_probe

    async def bounce(stanza: ET.Element, to: JID) -> None:
        await messages.deliver(stanza, to, sender=None)

    federation.bounce_to_sender = bounce
    return federation


def _node_metrics(store: Store, sessions: SessionRegistry, backups: Path | None) -> Metrics:
    """The node's own registry, reading the session count, the log and the backup directory
    when scraped."""
    metrics = Metrics()
    metrics.watch(sessions=sessions.__len__, log_last_index=lambda: store.log.last_index)
    if backups is not None:
        metrics.backup_watch = BackupWatch(partial(read_backup_status, backups))
        metrics.watch_backups(metrics.backup_watch, time.time)
    store.log.on_batch_written = metrics.observe_batch
    return metrics


async def _open_operator_access(node: Node, views: FeatureViews) -> AdminContext:
    """The operator store and the audit log (files under the data directory)."""
    try:
        admin = await trio.to_thread.run_sync(
            partial(
                open_admin,
                node.config,
                node.store,
                node.sessions,
                views.messages,
                views.roster,
                node.c2s.handlers,
            )
        )
    except (OSError, ValueError, StorageError, OperatorError) as exc:
        raise StartupError(f"operator access (the [admin] section): {exc}") from exc
    admin.kick = kicker(node.sessions)
    admin.metrics = node.status.metrics
    admin.monitor = node.monitor
    if node.federation is not None:
        admin.federation = node.federation.counts
    return admin


async def _start_listeners(node: Node, nursery: trio.Nursery) -> None:
    config = node.config
    await nursery.start(node.monitor.run)  # the alert command's runner
    if node.status.metrics.backup_watch is not None:
        await nursery.start(node.status.metrics.backup_watch.run)
    if node.admin is not None:
        try:
            await nursery.start(serve_operator_access, node.admin, config)
        except OSError as exc:
            raise StartupError(
                f"[admin] socket = {str(config.admin.socket)!r} in {config.source}: cannot listen"
                f" there ({exc.strerror or exc})"
            ) from exc
    if node.cluster is not None:
        path = control_socket_path(config)
        try:
            await nursery.start(serve_control, path, node.cluster.control_handlers(node.store))
        except OSError as exc:
            raise StartupError(
                f"{config.source}: storage.dir: cannot serve the control socket {path}:"
                f" {exc.strerror or exc}"
            ) from None
    for endpoint in config.listeners.http.bind:
        listeners = await _listen(
            config,
            "http",
            endpoint,
            nursery,
            serve_http,
            endpoint.host,
            endpoint.port,
            node.status.route,
        )
        node.status.http_ports.extend(lst.socket.getsockname()[1] for lst in listeners)
    for name, direct_tls in (("c2s", False), ("c2s_tls", True)):
        source = node.tls.source(_tls_spec(config, name))
        for endpoint in config.listeners.by_name()[name].bind:
            await _listen(
                config,
                name,
                endpoint,
                nursery,
                partial(serve_c2s, direct_tls=direct_tls),
                node.c2s,
                endpoint.host,
                endpoint.port,
                source,
            )
    if node.federation is not None:
        await nursery.start(node.federation.run)
        for name, direct_tls in (("s2s", False), ("s2s_tls", True)):
            for endpoint in config.listeners.by_name()[name].bind:
                await _listen(
                    config,
                    name,
                    endpoint,
                    nursery,
                    partial(node.federation.serve, direct_tls=direct_tls),
                    endpoint.host,
                    endpoint.port,
                )
    if config.listeners.websocket.enabled:
        settings = WebSocketSettings.from_config(config)
        source = node.tls.source(_tls_spec(config, "websocket"))
        for endpoint in config.listeners.websocket.bind:
            await _listen(
                config,
                "websocket",
                endpoint,
                nursery,
                serve_websocket,
                node.c2s,
                settings,
                endpoint.host,
                endpoint.port,
                source,
            )


async def _listen(
    config: Config, name: str, endpoint: object, nursery: trio.Nursery, serve: Any, *args: Any
) -> list[trio.SocketListener]:
    try:
        listeners: list[trio.SocketListener] = await nursery.start(serve, *args)
    except OSError as exc:
        raise StartupError(
            f"{config.source}: listeners.{name}.bind: cannot listen on {endpoint}: "
            f"{exc.strerror or exc}"
        ) from None
    return listeners


async def _shut_down(node: Node) -> None:
    """Stop serving: every client gets <system-shutdown/>, with a bounded wait for them."""
    node.status.ready = False
    node.c2s.shutting_down = True
    notify("STOPPING=1")
    if node.cluster is not None:
        node.cluster.drop_peers()  # other nodes' sessions are theirs to end, not ours
    log.info("shutting down", extra={"event": "node.stopping", "sessions": len(node.sessions)})
    for session in node.sessions.all():
        session.terminate("system-shutdown", "the server is shutting down")
    with trio.move_on_after(SHUTDOWN_GRACE_S):
        await node.sessions.wait_empty()


async def _serve_signals(node: Node, signals: AsyncIterator[int]) -> None:
    """Handle SIGHUP (reload certificates for new connections) until SIGTERM or SIGINT."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            _reload(node)
            continue
        log.info("signal", extra={"event": "node.signal", "signal": signal.Signals(signum).name})
        return


def _reload(node: Node) -> None:
    notify("RELOADING=1")
    for problem in reopen_log_files():
        log.error(problem, extra={"event": "node.log_reopen_failed"})
    try:
        summary = node.tls.reload()
    except TlsConfigError as exc:
        log.error(
            "reload failed; keeping the current certificate",
            extra={"event": "node.reload_failed", "security": True, "error": str(exc)},
        )
    else:
        log.info(
            "certificate reloaded",
            extra={
                "event": "node.reload",
                "security": True,
                "certificate": summary.sha256_fingerprint,
                "not_valid_after": str(summary.not_valid_after),
            },
        )
    notify("READY=1")
