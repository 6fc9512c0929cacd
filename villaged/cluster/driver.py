"""The per-node Raft driver: every Raft group this node hosts, run by one trio task set.

This module owns the trio side of :mod:`villaged.cluster.raft`: the replicas (one
:class:`RaftNode` per hosted group), their storage (one node-wide write-ahead log,
:class:`~villaged.cluster.wal.NodeWal` under ``storage_root/wal/``, with a
:class:`~villaged.cluster.wal.WalGroupStorage` view per group), the coalesced tick timer, the
inbound message buffer, the
proposals waiting to be applied, and the calls into each group's application. Links to peers
are not its business: it sends through a :class:`Transport` and is handed inbound messages
through :meth:`NodeDriver.deliver` (:mod:`villaged.cluster.links` does both over mutual TLS).

Theory of operation
-------------------
One task, the *cycle loop*, is the only code that touches a :class:`RaftNode`. Everything else
only queues work for it and wakes it:

* the tick task counts elapsed ``tick_seconds`` (one timer for all groups, not one per group);
* :meth:`NodeDriver.deliver` (called by the links) buffers a peer's message, bounded by
  ``max_inbox_messages`` (beyond that messages are dropped and counted -- Raft tolerates loss);
* :meth:`propose`, :meth:`transfer_leadership` and :meth:`compact` queue an *action* (a function
  of the node) and wait for its result.

Each cycle the loop first feeds everything queued into the nodes -- messages, then the pending
ticks, then actions -- and then takes the Ready of every group with ``has_ready()`` and carries
out the contract of :mod:`villaged.cluster.raft`:

1. persist them all at once (``NodeWal.persist_many``: every group's truncation markers,
   entries and changed hard state in ONE batch, ONE ``fdatasync`` for the whole cycle; snapshot
   files before it) -- the batching across groups the design asks for;
2. send each group's messages -- only now, so no vote or acknowledgement leaves before what it
   promises is durable;
3. restore the application from a Ready's snapshot, if any, then apply ``committed`` DATA
   entries in order, waking each proposal whose entry that is (or failing it if another term's
   entry took its index);
4. ``advance``.

Whatever arrives while a cycle persists waits for the next one, so load batches itself into
fewer, larger Readies (group commit across every group of the node). The loop sleeps only when
no group has a Ready. Compaction saves a group's snapshot (a file, then a marker record) and
checkpoints the WAL so that segments no group needs any more are dropped.

A failed write (:class:`~villaged.storage.errors.LogWriteError`) ends :meth:`NodeDriver.run`:
a replica that cannot persist must stop (fail-stop), and a restart recovers from the disk.

The applications' state is volatile: at start each group's application is restored from the
latest snapshot and the committed entries after it are applied again (``apply`` sees each
entry's index, so an application that keeps durable state of its own can skip what it has).
"""

from __future__ import annotations

import enum
import logging
import math
import random
import re
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import trio

from villaged.cluster.identity import node_of
from villaged.cluster.raft import (
    EntryKind,
    NotLeaderError,
    ProposalDroppedError,
    RaftConfig,
    RaftError,
    RaftNode,
    RandomSource,
    Ready,
    Role,
    Snapshot,
)
from villaged.cluster.wal import NodeWal, WalGroupStorage
from villaged.storage.errors import LogWriteError, StorageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from villaged.cluster.raft import Entry, Message

__all__ = [
    "DriverConfig",
    "GroupApplication",
    "GroupStatus",
    "NodeDriver",
    "NotLeaderError",
    "ProposalDroppedError",
    "ProposalLostError",
    "Transport",
]

logger = logging.getLogger("villaged.cluster")

#: Where a node keeps its write-ahead log, under its storage root.
WAL_DIR: Final = "wal"
#: How far a learner may trail the commit index and still be made a voter (NodeDriver.caught_up).
CAUGHT_UP_ENTRIES: Final = 64

T = TypeVar("T")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class Transport(Protocol):
    """Carries messages to peers; ``send`` never blocks and may drop (Raft retries)."""

    def send(self, message: Message) -> None: ...


class GroupApplication(Protocol):
    """The state machine of one group. Called from the cycle loop: must not block."""

    def apply(self, entry: Entry) -> None:
        """A committed DATA entry, in index order."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state by a snapshot's data."""

    def snapshot(self) -> bytes:
        """The state as of the last applied entry (for :meth:`NodeDriver.compact`).

        An application may also have ``applied_through(index)``: called after each Ready's
        committed entries (DATA or not) and snapshots, with the index now applied."""


class ProposalLostError(RaftError):
    """The proposal was not committed (another leader's entry took its index), or its fate is
    unknown because a snapshot replaced the log; the caller may retry (idempotently)."""


@dataclass(frozen=True, slots=True)
class DriverConfig:
    tick_seconds: float = 0.05
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    #: Proposals per group queued or waiting to be applied; beyond, ProposalDroppedError.
    max_pending_proposals: int = 1024
    #: Inbound messages buffered between cycles, over all groups; beyond, dropped.
    max_inbox_messages: int = 8192
    max_entry_bytes: int = 1 << 20
    max_snapshot_bytes: int = 64 << 20
    max_uncommitted_entries: int = 1024
    #: Compact a group once this many entries were applied since its snapshot (0: never).
    snapshot_every: int = 0
    segment_bytes: int = 64 << 20

    def raft_config(self, node_id: str, group: str) -> RaftConfig:
        return RaftConfig(
            node_id,
            group,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            max_entry_bytes=self.max_entry_bytes,
            max_snapshot_bytes=self.max_snapshot_bytes,
            max_uncommitted_entries=self.max_uncommitted_entries,
        )


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group: str
    role: Role
    term: int
    commit: int
    applied: int
    last_index: int
    snapshot_index: int
    leader: str | None
    voters: frozenset[str]
    #: On the leader: entries each follower lacks (last_index - match); empty elsewhere.
    follower_lag: Mapping[str, int] = field(default_factory=dict)


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class _Action:
    """Work for the cycle loop, and where its outcome goes."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[RaftNode], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Waiter:
    """A proposal appended at ``index`` in ``term``, waiting for that index to be applied."""

    __slots__ = ("done", "error", "term")

    def __init__(self, term: int) -> None:
        self.term = term
        self.done = trio.Event()
        self.error: RaftError | None = None


class _Group:
    __slots__ = (
        "actions",
        "application",
        "compact_after",
        "name",
        "node",
        "pending_proposals",
        "storage",
        "waiters",
    )

    def __init__(
        self, name: str, node: RaftNode, storage: WalGroupStorage, application: GroupApplication
    ) -> None:
        self.name = name
        self.node = node
        self.storage = storage
        self.application = application
        self.actions: deque[_Action] = deque()
        self.waiters: dict[int, _Waiter] = {}
        self.pending_proposals = 0
        self.compact_after = 0  # applied index before which compaction is not tried again


class NodeDriver:
    """Runs the Raft groups hosted on ``node_id``; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        storage_root: Path,
        transport: Transport,
        groups: Mapping[str, Iterable[str]],
        config: DriverConfig | None = None,
        *,
        applications: Mapping[str, GroupApplication],
        rng: RandomSource | None = None,
        manual_ticks: bool = False,
    ) -> None:
        """``manual_ticks``: no timer; whoever runs the driver calls :meth:`tick` (the tests do,
        in lockstep with :meth:`wait_idle`, because a mock clock would race ahead while the
        worker threads sync files)."""
        for name in groups:
            if not _GROUP_NAME.fullmatch(name) or name in {".", ".."}:
                raise ValueError(f"group id {name!r} is not a safe directory name")
            if name not in applications:
                raise ValueError(f"no application for group {name!r}")
        self.node_id = node_id
        self.storage_root = storage_root
        self.transport = transport
        self.config = config or DriverConfig()
        self._bootstrap = {name: frozenset(voters) for name, voters in groups.items()}
        self._applications = dict(applications)
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._groups: dict[str, _Group] = {}
        self._state = _State.NEW
        self._inbox: deque[Message] = deque()
        self._pending_ticks = 0
        self._wake = trio.Event()
        self._manual_ticks = manual_ticks
        self._idle = False
        self._idle_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._wal: NodeWal | None = None
        #: Counters for metrics and tests.
        self.dropped_inbound = 0
        self.rejected_inbound = 0
        self.cycles = 0

    # --- running ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every group's storage, restore its replica and application, then drive them
        until cancelled. Reports readiness once every group is restored."""
        if self._state is not _State.NEW:
            raise RuntimeError("a NodeDriver runs once")
        self._state = _State.RUNNING
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                wal = await trio.to_thread.run_sync(
                    partial(
                        NodeWal.open,
                        self.storage_root / WAL_DIR,
                        max_entry_bytes=self.config.max_entry_bytes,
                        segment_bytes=self.config.segment_bytes,
                    )
                )
                try:
                    await nursery.start(wal.run)
                except BaseException:
                    wal.close()
                    raise
                self._wal = wal
                for name in sorted(self._bootstrap):
                    self._groups[name] = await self._restore(name, WalGroupStorage(wal, name))
                if not self._manual_ticks:
                    nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._cycle_loop)
                task_status.started()
        finally:
            self._state = _State.STOPPED
            self._set_idle(True)
            if self._wal is not None:
                self._wal.close()
            for group in self._groups.values():
                self._fail_all(group, ProposalLostError("the node's driver stopped"))

    async def _restore(self, name: str, storage: WalGroupStorage) -> _Group:
        state = await trio.to_thread.run_sync(storage.load)
        node = RaftNode.restore(
            self.config.raft_config(self.node_id, name),
            self._rng,
            hard_state=state.hard_state,
            snapshot=state.snapshot,
            entries=state.entries,
            voters=self._bootstrap[name],
        )
        application = self._applications[name]
        if state.snapshot is not None:
            application.restore(state.snapshot.data)
            progress = getattr(application, "applied_through", None)
            if progress is not None:
                progress(state.snapshot.index)
        return _Group(name, node, storage, application)

    async def _tick_loop(self) -> None:
        while True:
            await trio.sleep(self.config.tick_seconds)
            self.tick()

    def tick(self) -> None:
        """One tick for every group (the timer's job unless ``manual_ticks``)."""
        self._pending_ticks += 1
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Whether the cycle loop sleeps with nothing queued (or the driver has stopped)."""
        return self._idle and (self._state is _State.STOPPED or not self._wake.is_set())

    async def wait_idle(self) -> None:
        while not self.idle:
            await self._idle_changed.wait()

    def _set_idle(self, idle: bool) -> None:
        if idle != self._idle:
            self._idle = idle
            self._idle_changed.set()
            self._idle_changed = trio.Event()

    async def _cycle_loop(self) -> None:
        while True:
            self._feed_inputs()
            readies = [(g, g.node.ready()) for g in self._groups.values() if g.node.has_ready()]
            if not readies:
                if not self._wake.is_set():
                    self._set_idle(True)
                    await self._wake.wait()
                    self._set_idle(False)
                self._wake = trio.Event()
                continue
            self.cycles += 1
            assert self._wal is not None
            try:
                await self._wal.persist_many({group.name: ready for group, ready in readies})
            except LogWriteError:
                if trio.current_effective_deadline() != -math.inf:
                    raise  # fail-stop: a replica that cannot persist must not go on
                await trio.lowlevel.checkpoint()  # stopping: the cancellation ends the loop
            for group, ready in readies:
                self._carry_out(group, ready)
            self._maybe_compact()
            await trio.lowlevel.checkpoint()

    def _feed_inputs(self) -> None:
        inbox, self._inbox = self._inbox, deque()
        for message in inbox:
            group = self._groups.get(message.group)
            if group is None or message.to != self.node_id:
                self.rejected_inbound += 1
                continue
            try:
                group.node.step(message)
            except (RaftError, ValueError) as exc:
                # One bad message from a peer is dropped, never the end of the driver.
                self.rejected_inbound += 1
                logger.warning(
                    "dropped a bad raft message from %s: %s",
                    message.sender,
                    exc,
                    extra={"event": "cluster.bad_message", "peer": message.sender},
                )
        # At most one tick per cycle, after the messages: ticks that piled up while a cycle
        # waited for the disk would otherwise run check-quorum twice in one burst and depose a
        # leader whose followers' answers are right there in the inbox. Timers only slow down.
        ticks, self._pending_ticks = min(self._pending_ticks, 1), 0
        for group in self._groups.values():
            for _ in range(ticks):
                group.node.tick()
            while group.actions:
                action = group.actions.popleft()
                try:
                    action.result = action.fn(group.node)
                except (RaftError, ValueError) as exc:
                    action.error = exc
                action.done.set()

    def _carry_out(self, group: _Group, ready: Ready) -> None:
        """Steps 2-4 of the contract for a Ready already persisted with its cycle."""
        for message in ready.messages:
            self.transport.send(message)
        if ready.snapshot is not None:
            group.application.restore(ready.snapshot.data)
            for index in [i for i in group.waiters if i <= ready.snapshot.index]:
                self._resolve(group, index, ProposalLostError("a snapshot replaced the log"))
        progress = getattr(group.application, "applied_through", None)
        if ready.snapshot is not None and progress is not None:
            progress(ready.snapshot.index)
        for entry in ready.committed:
            if entry.kind is EntryKind.DATA:
                group.application.apply(entry)
            waiter = group.waiters.get(entry.index)
            if waiter is not None:
                lost = waiter.term != entry.term
                self._resolve(
                    group,
                    entry.index,
                    ProposalLostError(f"entry {entry.index} went to another leader")
                    if lost
                    else None,
                )
        if ready.committed and progress is not None:
            progress(ready.committed[-1].index)  # config and no-op entries count too
        group.node.advance(ready)

    def _maybe_compact(self) -> None:
        every = self.config.snapshot_every
        if not every:
            return
        for group in self._groups.values():
            node = group.node
            if node.applied - node.snapshot.index >= every and node.applied >= group.compact_after:
                try:
                    self._compact_now(group)
                except ValueError as exc:  # the application's state is over max_snapshot_bytes
                    group.compact_after = node.applied + every  # not again at every cycle
                    logger.error(
                        "cannot compact group %s: %s",
                        group.name,
                        exc,
                        extra={"event": "cluster.compaction_failed", "group": group.name},
                    )

    def _compact_now(self, group: _Group) -> int:
        snapshot = _snapshot_of(group, group.node)
        if snapshot is None:
            return group.node.snapshot.index
        # The core has dropped the entries; the disk follows in the background (the WAL
        # ignores a snapshot that a later install has overtaken).
        assert self._nursery is not None
        self._nursery.start_soon(self._save_snapshot, group, snapshot)
        return snapshot.index

    async def shred(self, *, rounds: int = 5, pause: float = 1.0) -> bool:
        """Drop from this node's disk and memory every log entry and snapshot older than what
        it has applied: the last step of crypto-shredding on a cluster, where a deleted user's
        data key was also in their shard's log (a ``vault.key`` entry). Each round snapshots
        every group at its applied index, seals the WAL's active segment and compacts the
        WAL; rounds repeat (``pause`` apart, ``rounds`` at most) until no segment on disk
        holds a record the WAL had when this was called and no group keeps a snapshot file
        older than its current one. True when that was reached."""
        try:
            return await self._shred(rounds, pause)
        except LogWriteError:
            if trio.current_effective_deadline() != -math.inf:
                raise  # fail-stop, as for any write of the WAL
            return False  # stopping: the WAL's writer stopped with the driver
        except (RaftError, RuntimeError, StorageError, OSError) as exc:
            # Stopped meanwhile (RuntimeError, ProposalLostError), or the disk refused.
            logger.warning(
                "shredding stopped: %s",
                exc,
                extra={"event": "cluster.shred_failed", "error": str(exc)},
            )
            return False

    async def _shred(self, rounds: int, pause: float) -> bool:
        wal = self._wal
        if wal is None or self._state is not _State.RUNNING:
            return False
        target = wal.log.last_index
        for round_ in range(rounds):
            if round_:
                await trio.sleep(pause)
            for name, group in sorted(self._groups.items()):
                try:
                    snapshot = await self._call(name, partial(_snapshot_of, group))
                except ValueError as exc:  # over max_snapshot_bytes, or voters not known yet
                    logger.warning(
                        "cannot compact group %s to shred: %s",
                        name,
                        exc,
                        extra={"event": "cluster.compaction_failed", "group": name},
                    )
                    continue
                if snapshot is not None:
                    await group.storage.save_snapshot(snapshot)
            await wal.seal()
            await wal.compact()
            stale = await wal.remove_superseded_snapshots()
            if wal.log.oldest_on_disk > target and not stale:
                return True
        return False

    async def _save_snapshot(self, group: _Group, snapshot: Snapshot) -> None:
        try:
            await group.storage.save_snapshot(snapshot)
            assert self._wal is not None
            await self._wal.compact(min_positions=max(1, self.config.snapshot_every))
        except LogWriteError:
            if trio.current_effective_deadline() != -math.inf:
                raise
            # The driver is stopping and the WAL's writer with it: the snapshot is simply not
            # saved (the log still holds everything; the next start compacts again).

    # --- inputs from outside the loop ---

    def deliver(self, message: Message) -> None:
        """A message from a peer (called by the links; never blocks)."""
        if self._state is not _State.RUNNING:
            return
        if len(self._inbox) >= self.config.max_inbox_messages:
            self.dropped_inbound += 1
            return
        self._inbox.append(message)
        self._wake.set()

    async def _call(self, group_name: str, fn: Callable[[RaftNode], T]) -> T:
        group = self._group(group_name)
        action = _Action(fn)
        group.actions.append(action)
        self._wake.set()
        await action.done.wait()
        if action.error is not None:
            raise action.error
        result: T = action.result
        return result

    def _group(self, name: str) -> _Group:
        if self._state is not _State.RUNNING:
            raise RuntimeError("the driver is not running")
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"group {name!r} is not hosted on {self.node_id}") from None

    async def propose(self, group_name: str, data: bytes) -> tuple[int, int]:
        """Append ``data`` to the group's log; return ``(index, term)`` once the entry is
        committed and applied here. Raises NotLeaderError (with the leader hint) on a
        follower, ProposalDroppedError when too many proposals wait or the core refuses,
        ProposalLostError if the entry did not (or may not have) commit."""
        group = self._group(group_name)
        node = group.node
        if node.role is not Role.LEADER:
            raise NotLeaderError(node.leader)
        if group.pending_proposals >= self.config.max_pending_proposals:
            raise ProposalDroppedError(f"{group_name}: too many proposals are waiting")
        group.pending_proposals += 1
        try:
            index, waiter = await self._call(group_name, partial(self._append, group, data))
            await waiter.done.wait()
            if waiter.error is not None:
                raise waiter.error
            return index, waiter.term
        finally:
            group.pending_proposals -= 1

    def _append(self, group: _Group, data: bytes, node: RaftNode) -> tuple[int, _Waiter]:
        """In the loop: append, and register the waiter before the entry can be applied."""
        index = node.propose(data)
        if index in group.waiters:
            # An earlier term's proposal here was never committed: our new entry replaced it.
            self._resolve(group, index, ProposalLostError(f"entry {index} was overwritten"))
        waiter = group.waiters[index] = _Waiter(node.term)
        return index, waiter

    async def transfer_leadership(self, group_name: str, target: str) -> None:
        """Ask the leader to hand over to ``target`` (returns once asked, not once done)."""
        await self._call(group_name, lambda node: node.transfer_leadership(target))

    async def compact(self, group_name: str) -> int:
        """Snapshot the group's application at its applied index now; returns that index."""
        group = self._group(group_name)
        return await self._call(group_name, lambda _node: self._compact_now(group))

    # --- views ---

    def leader(self, group_name: str) -> str | None:
        return self._groups[group_name].node.leader

    def caught_up(self, group_name: str, member: str) -> bool:
        """On the group's leader: whether ``member`` (a learner, say) holds about everything
        committed (within CAUGHT_UP_ENTRIES), so that making it a voter stalls no commit."""
        node = self._groups[group_name].node
        match = node.match_index(member)
        return match is not None and node.commit - match <= CAUGHT_UP_ENTRIES

    def in_touch(self, group_name: str) -> bool:
        """Whether this node hears the group's leader (RaftNode.in_touch)."""
        return self._groups[group_name].node.in_touch

    def leader_node(self, group_name: str) -> str | None:
        """The node (not the Raft member id with its incarnation) believed to lead."""
        leader = self._groups[group_name].node.leader
        return None if leader is None else node_of(leader)

    def set_bootstrap(self, groups: Mapping[str, Iterable[str]]) -> None:
        """Replace the bootstrap voters (before ``run``: a node decides them only once it has
        heard its peers, see villaged.cluster.identity)."""
        if self._state is not _State.NEW or set(groups) != set(self._bootstrap):
            raise RuntimeError("bootstrap voters are set once, before run, for the same groups")
        self._bootstrap = {name: frozenset(voters) for name, voters in groups.items()}

    async def set_learners(self, group_name: str, learners: Iterable[str]) -> None:
        """Replicate the group to ``learners`` too while this node leads it (see
        RaftNode.set_learners); a node that becomes leader later is told again."""
        members = frozenset(learners)
        await self._call(group_name, lambda node: node.set_learners(members))

    def learners(self, group_name: str) -> frozenset[str]:
        return self._groups[group_name].node.learners

    async def change_voters(self, group_name: str, *, add: str = "", remove: str = "") -> int:
        """On the leader: propose one membership change (add or remove one voter)."""
        if add:
            return await self._call(group_name, lambda node: node.add_voter(add))
        return await self._call(group_name, lambda node: node.remove_voter(remove))

    def commit_index(self, group_name: str) -> int:
        return self._groups[group_name].node.commit

    def read_index(self, group_name: str) -> int | None:
        """On the leader: its commit index, once it has committed an entry of its own term
        (before that, entries of earlier terms may be committed without it knowing); None
        elsewhere or before then."""
        node = self._groups[group_name].node
        if node.role is not Role.LEADER or node.term_at(node.commit) != node.term:
            return None
        return node.commit

    def status(self) -> dict[str, GroupStatus]:
        result: dict[str, GroupStatus] = {}
        for name, group in sorted(self._groups.items()):
            node = group.node
            lag: dict[str, int] = {}
            if node.role is Role.LEADER:
                for peer in sorted(node.voters - {self.node_id}):
                    match = node.match_index(peer)
                    if match is not None:
                        lag[peer] = node.last_index - match
            result[name] = GroupStatus(
                group=name,
                role=node.role,
                term=node.term,
                commit=node.commit,
                applied=node.applied,
                last_index=node.last_index,
                snapshot_index=node.snapshot.index,
                leader=node.leader,
                voters=node.voters,
                follower_lag=lag,
            )
        return result

    # --- internals ---

    def _resolve(self, group: _Group, index: int, error: RaftError | None) -> None:
        waiter = group.waiters.pop(index)
        waiter.error = error
        waiter.done.set()

    def _fail_all(self, group: _Group, error: RaftError) -> None:
        for index in list(group.waiters):
            self._resolve(group, index, error)
        while group.actions:
            action = group.actions.popleft()
            action.error = error
            action.done.set()


def _snapshot_of(group: _Group, node: RaftNode) -> Snapshot | None:
    """Compact ``group`` at its applied index (in the cycle loop); None if nothing is new."""
    if node.applied <= node.snapshot.index:
        return None
    return node.compact(node.applied, group.application.snapshot())
