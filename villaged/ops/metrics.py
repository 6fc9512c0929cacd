"""The node's Prometheus metrics: one registry per node, rendered for GET /metrics.

Each node owns its `CollectorRegistry` (never prometheus_client's global one), so several
in-process nodes — as in the tests — count separately. The parts that count get this object
(`C2SContext.metrics`, `AdminContext.metrics`) or one of its methods as a callback (the
segment log's `on_batch_written`); storage never imports it.

Counting is cheap on purpose: labelled children are resolved once here, so a hot path does a
dictionary lookup and `inc()`, never `labels()`. Gauges that mirror state the node already
keeps (sessions, the log's last index) are read when scraped rather than updated as it changes.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from villaged import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from villaged.ops.backup import BackupStatus


TRANSPORTS: Final = ("c2s", "c2s_tls", "websocket")
STANZA_KINDS: Final = ("message", "presence", "iq")
AUDIT_RESULTS: Final = ("success", "failure")
#: How often the backup directory is read for the backup metrics.
BACKUP_STATUS_TTL_S: Final = 30.0

#: Seconds. A healthy fdatasync takes a fraction of a millisecond (NVMe) to tens of
#: milliseconds (spinning disks, busy cloud volumes); past a second something is wrong.
STORAGE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Metrics:
    """Every metric a node exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: Set when the node watches a backup directory (app.py runs it).
        self.backup_watch: BackupWatch | None = None
        registry = self.registry
        connections = Gauge(
            "villaged_connections",
            "Open client connections, by transport.",
            ["transport"],
            registry=registry,
        )
        self.connections = {name: connections.labels(name) for name in TRANSPORTS}
        stanzas = Counter(
            "villaged_stanzas",
            "Stanzas read from (in) and written to (out) clients, by kind.",
            ["direction", "kind"],
            registry=registry,
        )
        self._stanzas_in = {kind: stanzas.labels("in", kind) for kind in STANZA_KINDS}
        self._stanzas_out = {kind: stanzas.labels("out", kind) for kind in STANZA_KINDS}
        auth = Counter(
            "villaged_auth",
            "Client SASL authentications, by result.",
            ["result"],
            registry=registry,
        )
        self._auth_success = auth.labels("success")
        self._auth_failure = auth.labels("failure")
        self.storage_append_seconds = Histogram(
            "villaged_storage_append_seconds",
            "Time to make one batch of log records durable (write and fdatasync).",
            buckets=STORAGE_BUCKETS,
            registry=registry,
        )
        self.storage_fsync_seconds = Histogram(
            "villaged_storage_fsync_seconds",
            "Time the fdatasync of one log batch took.",
            buckets=STORAGE_BUCKETS,
            registry=registry,
        )
        audit = Counter(
            "villaged_audit_records",
            "Operator actions written to the audit log (failure: the write failed).",
            ["result"],
            registry=registry,
        )
        self._audit = {result: audit.labels(result) for result in AUDIT_RESULTS}
        self._sessions = Gauge("villaged_sessions", "Bound client sessions.", registry=registry)
        self._log_last_index = Gauge(
            "villaged_log_last_index", "Index of the last durable log record.", registry=registry
        )
        Info("villaged_build", "The running villaged.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )

    def watch(self, *, sessions: Callable[[], int], log_last_index: Callable[[], int]) -> None:
        """Read these when scraped (app.py wires the session registry and the log)."""
        self._sessions.set_function(sessions)
        self._log_last_index.set_function(log_last_index)

    def watch_backups(self, watch: BackupWatch, wall_clock: Callable[[], float]) -> None:
        """Report the backups beside this node (``[backup] dir``) as ``watch`` last read them
        (off the event loop; a scrape never touches the directory)."""
        nan = float("nan")

        def created() -> float:
            value = watch.status.newest_created if watch.status else None
            return nan if value is None else value

        def verified() -> float:
            value = watch.status.newest_verified if watch.status else None
            return nan if value is None else value

        def age() -> float:
            value = watch.status.newest_created if watch.status else None
            return float("inf") if value is None else max(0.0, wall_clock() - value)

        def count() -> float:
            return float(watch.status.count) if watch.status else nan

        gauges = (
            (
                "villaged_backup_last_created_timestamp_seconds",
                "When the newest backup was taken (Unix time).",
                created,
            ),
            (
                "villaged_backup_last_verified_timestamp_seconds",
                "When a backup still kept last passed `backup verify` (Unix time).",
                verified,
            ),
            (
                "villaged_backup_age_seconds",
                "Seconds since the newest backup was taken (+Inf: there is none).",
                age,
            ),
            ("villaged_backups", "Backups kept in the backup directory.", count),
        )
        for name, documentation, function in gauges:
            Gauge(name, documentation, registry=self.registry).set_function(function)

    def watch_cluster(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """Report a cluster node's groups and links, read from ``status`` (the document of
        ``villaged cluster status``) when scraped."""
        self.registry.register(_ClusterCollector(status))

    def stanza_received(self, kind: str) -> None:
        self._stanzas_in[kind].inc()

    def stanza_sent(self, tag: str) -> None:
        """Count one stanza written to a client; ``tag`` is its element's (Clark) tag."""
        child = self._stanzas_out.get(tag[tag.find("}") + 1 :])
        if child is not None:
            child.inc()

    def auth_result(self, succeeded: bool) -> None:
        (self._auth_success if succeeded else self._auth_failure).inc()

    def observe_batch(self, append_seconds: float, fsync_seconds: float) -> None:
        """The segment log's ``on_batch_written`` callback."""
        self.storage_append_seconds.observe(append_seconds)
        self.storage_fsync_seconds.observe(fsync_seconds)

    def audit_record(self, result: str) -> None:
        self._audit[result].inc()

    def render(self) -> bytes:
        """The text exposition format (`prometheus_client.CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


class BackupWatch:
    """The backup directory's status, read in a worker thread every `BACKUP_STATUS_TTL_S`
    seconds (a hung network mount delays only this reading, never a client or a scrape)."""

    def __init__(self, read: Callable[[], BackupStatus]) -> None:
        self._read = read
        #: The last reading (None until the first one finishes).
        self.status: BackupStatus | None = None

    async def refresh(self) -> None:
        with trio.move_on_after(BACKUP_STATUS_TTL_S):
            self.status = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.refresh()
            await trio.sleep(BACKUP_STATUS_TTL_S)


class _ClusterCollector(Collector):
    """Raft state per group and link state per peer, as this node sees them."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        return []  # values only exist while the node runs; nothing to check up front

    def collect(self) -> Iterable[Metric]:
        document = self._status()
        families = {
            key: GaugeMetricFamily(f"villaged_cluster_group_{key}", text, labels=["group"])
            for key, text in (
                ("term", "The group's Raft term as this node knows it."),
                ("commit", "The group's commit index as this node knows it."),
                ("applied", "The last index of the group this node applied."),
                ("leader", "1 if this node leads the group."),
                ("has_leader", "1 if this node knows a leader of the group (0: no quorum)."),
            )
        }
        me = document.get("node")
        for group in document.get("groups", ()):
            name = str(group["group"])
            families["term"].add_metric([name], group["term"])
            families["commit"].add_metric([name], group["commit"])
            families["applied"].add_metric([name], group["applied"])
            families["leader"].add_metric([name], 1 if group["leader"] == me else 0)
            families["has_leader"].add_metric([name], 1 if group["leader"] else 0)
        linked = GaugeMetricFamily(
            "villaged_cluster_peer_linked",
            "1 if this node's link to the peer is up.",
            labels=["peer"],
        )
        for member in document.get("members", ()):
            if member["id"] != me:
                linked.add_metric([str(member["id"])], 1 if member["linked"] else 0)
        yield from families.values()
        yield linked
