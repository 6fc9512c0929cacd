"""Deterministic simulation of whole Raft clusters in one process, with checkers.

Everything -- network, disks, clocks, faults, clients -- is driven by one ``random.Random(seed)``
through a discrete-event loop over a virtual clock in milliseconds. The Raft core is sans-I/O, so
the same seed always yields the same run (:attr:`SimResult.trace` shows it).

The driver follows the core's Ready contract: persist (truncate, snapshot, entries, hard state),
then send, then apply, then ``advance``. A crash can strike in the middle of persisting a Ready
(a torn tail): a random prefix of its writes reaches the disk and nothing after that happens.
A restart rebuilds the node from its disk only.

Faults: partitions (symmetric and one-way), crashes with restarts, message loss, duplication,
delay (hence reordering) and stragglers that arrive terms later, leadership transfers, adding
and removing voters (3 to 5 of them) and log compaction (so lagging nodes need InstallSnapshot).

Clients: each user has one write outstanding at a time, payload ``user:seq``; a write is
acknowledged when the node that accepted it applies it; unacknowledged writes are retried, and the
state machine drops a ``(user, seq)`` it has applied already, so retries never duplicate.

Checkers (raising :class:`SimCheckError`): election safety, leader completeness (checked whenever a
node becomes leader), state-machine safety and per-user order at every apply, consistency of the
core's persistence instructions with the disk, log matching, and at the end -- after healing and
running to quiescence -- that every acknowledged write is applied exactly once, in order, on every
voter.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from villaged.cluster.raft import (
    Entry,
    EntryKind,
    HardState,
    Message,
    NotLeaderError,
    ProposalDroppedError,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    Snapshot,
    VoteResponse,
    message_from_wire,
    message_to_wire,
)

if TYPE_CHECKING:
    from collections.abc import Callable

GROUP = "g0"
NODE_IDS = ("n1", "n2", "n3", "n4", "n5")
INITIAL_VOTERS = frozenset(NODE_IDS[:3])
USERS = ("alice", "bob", "carol")
TICK_MS = 10
RETRY_MS = 400
CHECK_EVERY_MS = 100


class SimCheckError(AssertionError):
    """A checker found a violation (or the cluster did not settle)."""


def reproduce_hint(seed: int) -> str:
    return (
        f"seed {seed}; reproduce with: RAFT_SIM_SEED={seed} .venv/bin/pytest "
        f"tests/cluster/test_raft_sim.py -k test_seed_from_env"
    )


@dataclass
class SimOptions:
    fault_ms: int = 2500
    settle_ms: int = 5000
    faults: bool = True
    node_class: type[RaftNode] = RaftNode
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    trace_messages: bool = False  # also record every delivered message (for determinism tests)


@dataclass
class SimResult:
    seed: int
    trace: list[str]
    acked: int
    elections: int
    crashes: int
    snapshots_installed: int
    compactions: int
    transfers: int
    config_changes: int
    end_ms: int


class Disk:
    """What a node has made durable, with the segment log's semantics."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    @property
    def base(self) -> int:
        return self.snapshot.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.base + len(self.entries)

    def truncate_after(self, index: int) -> None:
        if index < self.base:
            raise SimCheckError(f"truncate after {index} below the snapshot at {self.base}")
        del self.entries[index - self.base :]

    def install_snapshot(self, snap: Snapshot) -> None:
        if snap.index <= self.base:
            return
        held = snap.index <= self.last_index and self.entries[snap.index - self.base - 1]
        if held and held.term == snap.term:
            self.entries = self.entries[snap.index - self.base :]
        else:
            self.entries = []
        self.snapshot = snap

    def save_snapshot(self, snap: Snapshot) -> None:
        if not self.base <= snap.index <= self.last_index:
            raise SimCheckError(f"compaction at {snap.index} outside the disk log")
        self.entries = self.entries[snap.index - self.base :]
        self.snapshot = snap

    def append(self, entry: Entry) -> None:
        if entry.index != self.last_index + 1:
            raise SimCheckError(f"append of {entry.index} after {self.last_index}: log would gap")
        self.entries.append(entry)


class StateMachine:
    """The replicated application: per-user ordered writes, deduplicated by (user, seq)."""

    def __init__(self) -> None:
        self.index = 0
        self.last_seq: dict[str, int] = {}
        self.writes: list[tuple[str, int]] = []

    def apply(self, entry: Entry) -> tuple[str, int] | None:
        """Apply one committed entry; returns the write it carries (even if a duplicate)."""
        if entry.index != self.index + 1:
            raise SimCheckError(f"applied {entry.index} after {self.index}")
        self.index = entry.index
        if entry.kind is not EntryKind.DATA:
            return None
        user, _, seq_text = entry.data.decode().partition(":")
        seq = int(seq_text)
        last = self.last_seq.get(user, 0)
        if seq > last + 1:
            raise SimCheckError(f"{user}:{seq} applied at {entry.index} before {user}:{last + 1}")
        if seq == last + 1:
            self.last_seq[user] = seq
            self.writes.append((user, seq))
        return user, seq

    def to_bytes(self) -> bytes:
        return json.dumps([self.index, self.last_seq, self.writes]).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> StateMachine:
        machine = cls()
        if data:
            index, last_seq, writes = json.loads(data)
            machine.index = index
            machine.last_seq = dict(last_seq)
            machine.writes = [(user, seq) for user, seq in writes]
        return machine


@dataclass
class SimNode:
    id: str
    disk: Disk = field(default_factory=Disk)
    raft: RaftNode | None = None
    machine: StateMachine = field(default_factory=StateMachine)
    generation: int = 0
    started: bool = False
    tear_next_persist: bool = False
    compact_every: int = 0
    seen_leader_terms: set[int] = field(default_factory=set)


@dataclass
class Client:
    user: str
    seq: int = 0
    acked: bool = True
    hint: str | None = None


class Sim:
    def __init__(self, seed: int, options: SimOptions | None = None) -> None:
        self.seed = seed
        self.options = options or SimOptions()
        self.rng = random.Random(seed)
        self.now = 0
        self._queue: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._sequence = 0
        self.nodes = {node_id: SimNode(node_id) for node_id in NODE_IDS}
        self.blocked: Counter[tuple[str, str]] = Counter()
        faults = self.options.faults
        self.loss = self.rng.choice((0.0, 0.01, 0.05, 0.15)) if faults else 0.0
        self.duplicate = self.rng.choice((0.0, 0.02, 0.1)) if faults else 0.0
        self.max_delay = self.rng.choice((2, 10, 30, 80)) if faults else 5
        self.straggle = self.rng.choice((0.0, 0.005, 0.02)) if faults else 0.0
        self.compact_every = self.rng.choice((0, 5, 20, 60))
        self.clients = {user: Client(user) for user in USERS}
        self.attempts: set[tuple[str, str, int]] = set()
        self.acked: set[tuple[str, int]] = set()
        self.leaders_by_term: dict[int, str] = {}
        #: Every vote granted (not pre-votes): (voter, term) -> candidate. A second, different
        #: candidate in the same term is a double vote (a forgotten or unpersisted vote).
        self.votes: dict[tuple[str, int], str] = {}
        self.committed: dict[int, tuple[int, EntryKind, bytes]] = {}
        self.trace: list[str] = []
        self.healed = False
        self.stats: Counter[str] = Counter()

    # --- the event loop ---

    def at(self, delay: int, action: Callable[..., None], *args: Any) -> None:
        self._sequence += 1
        heapq.heappush(self._queue, (self.now + delay, self._sequence, action, args))

    def fail(self, what: str) -> SimCheckError:
        return SimCheckError(f"{what}\n  at t={self.now}ms, {reproduce_hint(self.seed)}")

    def run(self) -> SimResult:
        for node_id in sorted(INITIAL_VOTERS):
            self.start(self.nodes[node_id])
        if self.seed % 2:
            # Odd seeds: a learner from the start (every entry and snapshot, never a vote or
            # a count toward commit), as every node of a cluster that is not a shard's voter.
            self.start(self.nodes[NODE_IDS[3]])
        for client in self.clients.values():
            self.at(self.rng.randrange(50, 300), self.client_write, client)
        if self.options.faults:
            self.at(self.rng.randrange(100, 400), self.fault)
        self.at(self.options.fault_ms, self.heal)
        deadline = self.options.fault_ms + self.options.settle_ms
        while self._queue:
            when, _, action, args = heapq.heappop(self._queue)
            self.now = when
            if when > deadline:
                raise self.fail(
                    f"no quiescence within {self.options.settle_ms}ms of healing: {self.describe()}"
                )
            try:
                action(*args)
            except SimCheckError:
                raise
            except Exception as exc:
                raise self.fail(f"{type(exc).__name__}: {exc}") from exc
            if action == self.settled_check and self.settled():
                break
        self.final_checks()
        return SimResult(
            seed=self.seed,
            trace=self.trace,
            acked=len(self.acked),
            elections=len(self.leaders_by_term),
            crashes=self.stats["crash"],
            snapshots_installed=self.stats["snapshot_installed"],
            compactions=self.stats["compaction"],
            transfers=self.stats["transfer"],
            config_changes=self.stats["config_change"],
            end_ms=self.now,
        )

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now} {text}")

    # --- nodes ---

    def make_config(self, node_id: str) -> RaftConfig:
        return RaftConfig(
            node_id=node_id,
            group=GROUP,
            election_ticks=self.options.election_ticks,
            heartbeat_ticks=self.options.heartbeat_ticks,
            max_append_entries=self.rng.choice((1, 4, 64)),
            max_inflight=self.rng.choice((1, 4)),
            max_uncommitted_entries=64,
        )

    def start(self, node: SimNode) -> None:
        """Boot a node for the first time, or restart it from its disk."""
        node_rng = random.Random(self.rng.getrandbits(32))
        disk = node.disk
        node.raft = self.options.node_class.restore(
            self.make_config(node.id),
            node_rng,
            hard_state=disk.hard_state,
            snapshot=disk.snapshot,
            entries=list(disk.entries),
            voters=INITIAL_VOTERS if node.id in INITIAL_VOTERS else frozenset(),
        )
        node.machine = StateMachine.from_bytes(disk.snapshot.data if disk.snapshot else b"")
        node.started = True
        node.tear_next_persist = False
        node.generation += 1
        self.log(f"start {node.id} term={node.raft.term} last={node.raft.last_index}")
        self.at(self.rng.randrange(1, TICK_MS + 1), self.tick, node, node.generation)

    def crash(self, node: SimNode) -> None:
        if node.raft is None:
            return
        node.raft = None
        node.generation += 1
        node.tear_next_persist = False
        self.stats["crash"] += 1
        self.log(f"crash {node.id}")

    def crash_if_same(self, node: SimNode, generation: int) -> None:
        if node.generation == generation:
            self.crash(node)

    def restart(self, node: SimNode, generation: int) -> None:
        if node.raft is None and node.generation == generation:
            self.start(node)

    def tick(self, node: SimNode, generation: int) -> None:
        if node.raft is None or node.generation != generation:
            return
        node.raft.tick()
        self.process(node)
        self.at(TICK_MS, self.tick, node, generation)

    def process(self, node: SimNode) -> None:
        """Run the Ready cycle until the node has nothing more to do."""
        while node.raft is not None and node.raft.has_ready():
            raft = node.raft
            ready = raft.ready()
            if not self.persist(node, ready):
                return
            for message in ready.messages:
                if isinstance(message, VoteResponse) and message.granted:
                    key = (message.sender, message.term)
                    if self.votes.setdefault(key, message.to) != message.to:
                        raise self.fail(
                            f"{message.sender} voted for {self.votes[key]} and {message.to} "
                            f"in term {message.term}"
                        )
                self.send(message)
            if ready.snapshot is not None:
                node.machine = StateMachine.from_bytes(ready.snapshot.data)
                if node.machine.index != ready.snapshot.index:
                    raise self.fail(f"{node.id}: snapshot data does not match its index")
                self.stats["snapshot_installed"] += 1
            for entry in ready.committed:
                self.apply(node, entry)
            raft.advance(ready)
            if ready.soft_state is not None:
                self.observe_role(node, raft)
            if raft.role is Role.LEADER:
                self.keep_learners(raft)
            every = self.compact_every
            if every and raft.applied - raft.snapshot.index >= every:
                try:
                    snap = raft.compact(raft.applied, node.machine.to_bytes())
                except ValueError:
                    # A node that started knowing no voters has not applied a configuration
                    # entry yet: it cannot say who votes in such a snapshot (RaftNode.compact).
                    assert raft.snapshot.index == 0
                    self.stats["compaction_deferred"] += 1
                else:
                    node.disk.save_snapshot(snap)
                    self.stats["compaction"] += 1

    def persist(self, node: SimNode, ready: Ready) -> bool:
        """Write the Ready to disk; False if the node crashed half-way (torn write)."""
        writes: list[Callable[[], None]] = []
        disk = node.disk
        if ready.truncate_after is not None:
            writes.append(lambda: disk.truncate_after(ready.truncate_after or 0))
        if ready.snapshot is not None:
            snap = ready.snapshot
            writes.append(lambda: disk.install_snapshot(snap))
        for entry in ready.entries:
            writes.append(lambda entry=entry: disk.append(entry))  # type: ignore[misc]
        if ready.hard_state is not None:
            hard_state = ready.hard_state
            writes.append(lambda: setattr(disk, "hard_state", hard_state))
        if node.tear_next_persist and writes:
            for write in writes[: self.rng.randrange(len(writes))]:
                write()
            self.log(f"torn write on {node.id}")
            self.crash(node)
            return False
        for write in writes:
            write()
        raft = node.raft
        assert raft is not None
        if disk.last_index != raft.last_index or disk.base != raft.snapshot.index:
            raise self.fail(
                f"{node.id}: disk holds ({disk.base}, {disk.last_index}] but the core"
                f" ({raft.snapshot.index}, {raft.last_index}]"
            )
        return True

    def apply(self, node: SimNode, entry: Entry) -> None:
        seen = self.committed.setdefault(entry.index, (entry.term, entry.kind, entry.data))
        if seen != (entry.term, entry.kind, entry.data):
            raise self.fail(
                f"state-machine safety: {node.id} applied {entry} at {entry.index}, another node"
                f" applied term {seen[0]} {seen[2]!r}"
            )
        write = node.machine.apply(entry)
        if write is None:
            return
        user, seq = write
        client = self.clients[user]
        if (node.id, user, seq) in self.attempts and client.seq == seq and not client.acked:
            client.acked = True
            self.acked.add(write)
            self.log(f"ack {user}:{seq} via {node.id}@{entry.index}")
            if not self.healed:
                self.at(self.rng.randrange(0, 50), self.client_write, client)

    def observe_role(self, node: SimNode, raft: RaftNode) -> None:
        if raft.role is not Role.LEADER or raft.term in node.seen_leader_terms:
            return
        node.seen_leader_terms.add(raft.term)
        other = self.leaders_by_term.setdefault(raft.term, node.id)
        if other != node.id:
            raise self.fail(f"election safety: {other} and {node.id} both lead term {raft.term}")
        self.log(f"leader {node.id} term={raft.term}")
        # Leader completeness: everything committed so far is in the new leader's log.
        for index, (term, _, _) in self.committed.items():
            if index > raft.snapshot.index and raft.term_at(index) != term:
                raise self.fail(
                    f"leader completeness: {node.id} leads term {raft.term} without committed"
                    f" entry {index} (term {term})"
                )
        self.check_log_matching()

    def keep_learners(self, raft: RaftNode) -> None:
        """Like a cluster node's leader: every started node that does not vote is a learner."""
        learners = frozenset(n.id for n in self.nodes.values() if n.started) - raft.voters
        if raft.learners != learners:
            raft.set_learners(learners)

    def live(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.raft is not None]

    def leader(self) -> SimNode | None:
        leaders = [n for n in self.live() if n.raft is not None and n.raft.role is Role.LEADER]
        return max(leaders, key=lambda n: n.raft.term if n.raft else 0, default=None)

    # --- network ---

    def send(self, message: Message) -> None:
        if self.blocked[message.sender, message.to] or self.rng.random() < self.loss:
            return
        # Through the wire form, as over a real link: what a peer receives is what it decodes.
        message = message_from_wire(message_to_wire(message))
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.straggle:
                delay = self.rng.randrange(200, 2000)  # arrives terms later
            else:
                delay = self.rng.randrange(1, self.max_delay + 1)
            self.at(delay, self.deliver, message)

    def deliver(self, message: Message) -> None:
        node = self.nodes[message.to]
        if node.raft is None or self.blocked[message.sender, message.to]:
            return
        if self.options.trace_messages:
            self.log(f"deliver {message!r}")
        node.raft.step(message)
        self.process(node)

    # --- clients ---

    def client_write(self, client: Client) -> None:
        if self.healed:
            return
        client.seq += 1
        client.acked = False
        self.client_attempt(client, client.seq)

    def client_attempt(self, client: Client, seq: int) -> None:
        if client.acked or client.seq != seq:
            return
        live = self.live()
        hinted = self.nodes[client.hint] if client.hint else None
        if hinted is not None and hinted.raft is not None:
            node = hinted
        elif live:
            node = self.rng.choice(live)
        else:
            self.at(50, self.client_attempt, client, seq)
            return
        assert node.raft is not None
        try:
            node.raft.propose(f"{client.user}:{seq}".encode())
        except NotLeaderError as exc:
            client.hint = exc.leader if exc.leader != node.id else None
            self.at(self.rng.randrange(5, 40), self.client_attempt, client, seq)
            return
        except ProposalDroppedError:
            self.at(self.rng.randrange(20, 80), self.client_attempt, client, seq)
            return
        client.hint = node.id
        self.attempts.add((node.id, client.user, seq))
        self.process(node)
        self.at(RETRY_MS, self.client_attempt, client, seq)

    # --- faults ---

    def fault(self) -> None:
        if self.healed:
            return
        action = self.rng.choice(
            (
                self.fault_partition,
                self.fault_partition,
                self.fault_one_way,
                self.fault_crash,
                self.fault_crash,
                self.fault_transfer,
                self.fault_membership,
                self.fault_membership,
                self.fault_network,
            )
        )
        action()
        self.at(self.rng.randrange(50, 500), self.fault)

    def fault_partition(self) -> None:
        started = [n.id for n in self.nodes.values() if n.started]
        side = set(self.rng.sample(started, self.rng.randrange(1, len(started))))
        pairs = [(a, b) for a in started for b in started if (a in side) != (b in side)]
        self.block(pairs, f"partition {sorted(side)}")

    def fault_one_way(self) -> None:
        started = [n.id for n in self.nodes.values() if n.started]
        a, b = self.rng.sample(started, 2)
        self.block([(a, b)], f"one-way {a}->{b}")

    def block(self, pairs: list[tuple[str, str]], what: str) -> None:
        self.blocked.update(pairs)
        self.log(what)
        self.at(self.rng.randrange(100, 1200), self.unblock, pairs)

    def unblock(self, pairs: list[tuple[str, str]]) -> None:
        self.blocked -= Counter(pairs)  # drops counts at or below zero (after a heal)

    def fault_crash(self) -> None:
        live = self.live()
        if not live:
            return
        node = self.rng.choice(live)
        down_for = self.rng.randrange(50, 1200)
        if self.rng.random() < 0.5:
            node.tear_next_persist = True  # crash during its next write
            self.at(self.rng.randrange(1, 30), self.crash_if_same, node, node.generation)
        else:
            self.crash(node)
        self.at(down_for, self.restart, node, node.generation + 1)

    def fault_transfer(self) -> None:
        leader = self.leader()
        if leader is None or leader.raft is None:
            return
        targets = sorted(leader.raft.voters - {leader.id})
        if targets:
            target = self.rng.choice(targets)
            leader.raft.transfer_leadership(target)
            self.stats["transfer"] += 1
            self.log(f"transfer {leader.id}->{target}")
            self.process(leader)

    def fault_membership(self) -> None:
        leader = self.leader()
        if leader is None or leader.raft is None:
            return
        raft = leader.raft
        voters = raft.voters
        others = [node_id for node_id in NODE_IDS if node_id not in voters]
        try:
            if others and (len(voters) == 3 or self.rng.random() < 0.4):
                added = self.rng.choice(others)
                if not self.nodes[added].started:
                    self.start(self.nodes[added])
                raft.add_voter(added)
                self.log(f"add {added}")
            elif len(voters) > 3:
                removed = self.rng.choice(sorted(voters))
                raft.remove_voter(removed)
                self.log(f"remove {removed}")
            else:
                return
        except ProposalDroppedError:
            return
        self.stats["config_change"] += 1
        self.process(leader)

    def fault_network(self) -> None:
        self.loss = self.rng.choice((0.0, 0.01, 0.05, 0.15, 0.3))
        self.max_delay = self.rng.choice((2, 10, 30, 80))

    def heal(self) -> None:
        self.healed = True
        self.blocked.clear()
        self.loss = 0.0
        self.duplicate = 0.0
        self.straggle = 0.0
        self.max_delay = 5
        self.log("heal")
        for node in self.nodes.values():
            node.tear_next_persist = False
            if node.started and node.raft is None:
                self.start(node)
        self.at(CHECK_EVERY_MS, self.settled_check)

    def settled_check(self) -> None:
        self.at(CHECK_EVERY_MS, self.settled_check)

    def settled(self) -> bool:
        if not all(client.acked for client in self.clients.values()):
            return False
        leader = self.leader()
        if leader is None or leader.raft is None:
            return False
        raft = leader.raft
        if raft.commit != raft.last_index or raft.term_at(raft.commit) != raft.term:
            return False
        for node_id in raft.voters | raft.learners:
            member = self.nodes[node_id].raft
            if member is None or member.applied != raft.commit or member.leader != leader.id:
                return False
        return True

    def describe(self) -> str:
        parts = []
        for node in self.nodes.values():
            raft = node.raft
            if raft is None:
                parts.append(f"{node.id}: {'down' if node.started else 'unused'}")
                continue
            parts.append(
                f"{node.id}: {raft.role.value} term={raft.term} leader={raft.leader}"
                f" last={raft.last_index} commit={raft.commit} applied={raft.applied}"
                f" snap={raft.snapshot.index} voters={sorted(raft.voters)}"
            )
        waiting = [f"{c.user}:{c.seq}" for c in self.clients.values() if not c.acked]
        return "; ".join(parts) + f"; unacked={waiting}"

    # --- checkers ---

    def check_log_matching(self) -> None:
        live = [(node.id, node.raft) for node in self.live() if node.raft is not None]
        for position, (a_id, a) in enumerate(live):
            for b_id, b in live[position + 1 :]:
                low = max(a.first_index, b.first_index)
                high = min(a.last_index, b.last_index)
                same = [i for i in range(low, high + 1) if a.term_at(i) == b.term_at(i)]
                if not same:
                    continue
                top = same[-1]
                if a.entries(low, top + 1) != b.entries(low, top + 1):
                    raise self.fail(
                        f"log matching: {a_id} and {b_id} agree on the term at {top}"
                        " but differ before it"
                    )

    def final_checks(self) -> None:
        self.check_log_matching()
        leader = self.leader()
        if leader is None or leader.raft is None:
            raise self.fail("no leader after healing")
        reference = leader.machine.writes
        for user in USERS:
            seqs = [seq for u, seq in reference if u == user]
            if seqs != list(range(1, len(seqs) + 1)):
                raise self.fail(f"{user}'s writes applied as {seqs}: duplicate or out of order")
        for user, seq in self.acked:
            if (user, seq) not in set(reference):
                raise self.fail(f"acknowledged write {user}:{seq} lost")
        for node_id in sorted(leader.raft.voters | leader.raft.learners):
            member = self.nodes[node_id]
            if member.machine.writes != reference:
                raise self.fail(
                    f"{node_id} applied {len(member.machine.writes)} writes, "
                    f"{leader.id} {len(reference)}: state machines differ"
                )


def run_seed(seed: int, options: SimOptions | None = None) -> SimResult:
    return Sim(seed, options).run()
