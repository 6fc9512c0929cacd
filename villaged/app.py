"""Wires a node: opens the store, starts the listeners, reports readiness, shuts down cleanly.

This is the one place that builds a node's parts; tests build nodes through `run_node` too.
Shutdown has one shape: on SIGTERM/SIGINT stop accepting and cancel the node's nursery (the
store's shielded commits finish their batch first); the store is closed last, so every
acknowledged write is on disk.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from villaged import __version__
from villaged.net.http import Response, serve_http
from villaged.ops.sdnotify import notify
from villaged.storage.store import Store, StoreOptions

if TYPE_CHECKING:
    from villaged.config.model import Config

log = logging.getLogger("villaged.app")


@dataclass
class NodeStatus:
    """What /healthz and /readyz report."""

    ready: bool = False
    http_ports: list[int] = field(default_factory=list)

    def route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"starting\n"
        return 404, "text/plain", b"not found\n"


class StartupError(Exception):
    """The node cannot start; the message names the config key at fault."""


async def run_node(
    config: Config,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[NodeStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    status = NodeStatus()
    store = await trio.to_thread.run_sync(Store.open, StoreOptions.from_config(config.storage))
    try:
        # Two nurseries: the store's outlives the serving one, so on shutdown every
        # connection task (and so every commit it started) is finished before the log closes.
        async with trio.open_nursery() as storage_nursery:
            await storage_nursery.start(store.run)
            try:
                async with trio.open_nursery() as serving:
                    await _start_listeners(config, status, serving)
                    status.ready = True
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
                    task_status.started(status)
                    if not handle_signals:
                        await trio.sleep_forever()
                    await _wait_for_shutdown_signal()
                    status.ready = False
                    notify("STOPPING=1")
                    log.info("shutting down", extra={"event": "node.stopping"})
                    serving.cancel_scope.cancel()
            finally:
                store.log.close()
    finally:
        store.close()
        log.info("node stopped", extra={"event": "node.stopped"})


async def _start_listeners(config: Config, status: NodeStatus, nursery: trio.Nursery) -> None:
    for endpoint in config.listeners.http.bind:
        try:
            listeners = await nursery.start(serve_http, endpoint.host, endpoint.port, status.route)
        except OSError as exc:
            raise StartupError(
                f"{config.source}: listeners.http.bind: cannot listen on {endpoint}: "
                f"{exc.strerror or exc}"
            ) from None
        status.http_ports.extend(lst.socket.getsockname()[1] for lst in listeners)


async def _wait_for_shutdown_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # Nothing reloadable yet; certificates and config reload arrive with listeners.
                log.info("reload requested", extra={"event": "node.reload", "security": True})
                continue
            log.info(
                "signal", extra={"event": "node.signal", "signal": signal.Signals(signum).name}
            )
            return
