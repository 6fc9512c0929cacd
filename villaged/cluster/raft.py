"""Raft consensus for one replica of one group: a sans-I/O state machine (etcd/raft style).

Theory of operation
-------------------
A :class:`RaftNode` is one replica of one Raft group. It never touches a clock, a disk, a socket
or a random source: the driver feeds it and carries out what it asks for.

* ``step(message)`` hands it a message from a peer (the driver routes by ``group`` and ``to``).
* ``tick()`` advances logical time by one tick. Elections time out after a number of ticks drawn
  from ``[election_ticks, 2 * election_ticks)`` with the :class:`RandomSource` given at
  construction; a leader sends heartbeats every ``heartbeat_ticks``.
* ``propose(data)`` appends an entry if this node leads (else :class:`NotLeaderError` with a hint);
  ``add_voter`` / ``remove_voter`` propose a membership change; ``transfer_leadership`` hands
  leadership to another voter; ``compact(index, data)`` records an application snapshot.
* ``ready()`` returns a :class:`Ready` with everything that accumulated; the driver must then,
  **in this order**:

  1. make durable: ``truncate_after`` (drop every entry after that index), then ``snapshot``
     (install it, replacing the log), then append ``entries``, then save ``hard_state``;
  2. only once all of that is durable, send ``messages`` -- a vote or an acknowledgement must never
     leave before the state it promises is on disk;
  3. restore the state machine from ``snapshot`` (if any), then apply ``committed`` in order;
  4. call ``advance(ready)``.

  Between ``ready()`` and ``advance()`` the node accepts no input (``step``, ``tick``, ``propose``
  ... raise :class:`RaftUsageError`): the driver buffers what arrives meanwhile and steps it in one
  go afterwards, which batches the next round of persistence (group commit) for free. A crash
  anywhere before ``advance`` is fine: nothing of that Ready was promised to anyone, so a torn
  tail of its writes may be lost. (The leader counts its own entries as replicated when it appends
  them; that is safe because its AppendEntries leave only after the same Ready is durable.)

Persistence maps onto a Raft log such as :class:`villaged.storage.log.SegmentLog`:
``truncate_after`` → ``truncate_after(index)``; ``snapshot`` → ``install_snapshot`` (the core
only sends one when its log does not hold the snapshot's last entry, so the whole log is
replaced); ``entries`` → ``append_many`` keeping each entry's index and term; the value
returned by ``compact`` → ``save_snapshot``. A :class:`Snapshot` carries its ``voters`` besides
the application's ``data``: persist both. After a restart, :meth:`RaftNode.restore` takes the hard
state, the latest snapshot and the entries after it; a commit index beyond the log is clamped.

Roles and transitions (``term`` only ever grows, and is persisted before anyone hears of it)::

    role           event                                        next role
    FOLLOWER       election timeout, node is a voter            PRE_CANDIDATE (term unchanged)
    PRE_CANDIDATE  pre-votes from a quorum                       CANDIDATE (term + 1, votes self)
    PRE_CANDIDATE  pre-vote rejected by a quorum                 FOLLOWER
    FOLLOWER       TimeoutNow from its leader                    CANDIDATE (skips pre-vote)
    CANDIDATE      votes from a quorum                           LEADER (appends an empty entry)
    CANDIDATE      election timeout                              PRE_CANDIDATE
    any            message with a higher term (see below)        FOLLOWER at that term
    any candidate  AppendEntries/Heartbeat/Snapshot of its term  FOLLOWER
    LEADER         no quorum heard from in election_ticks        FOLLOWER (check-quorum)
    LEADER         its own removal committed                     FOLLOWER (never campaigns again)

Safety rules (Raft §5, dissertation §3-4):

* A vote is granted only to a candidate whose log is at least as up to date as ours, at most once
  per term; ``voted_for`` is in the hard state of the same Ready as the reply.
* Pre-vote: a would-be candidate first asks whether it *could* win at ``term + 1`` without changing
  any term, so a node cut off by a partition does not inflate terms and depose a healthy leader
  on its return. Leader stickiness: a node that heard from a leader within ``election_ticks``
  ignores (pre-)vote requests of higher terms, unless the request comes from a leadership transfer.
* AppendEntries carries ``prev_index``/``prev_term``; a follower accepts only if its log holds
  that entry, drops a conflicting suffix (never a committed entry) and answers a rejection with a
  hint (``hint_index``/``hint_term``) that lets the leader skip a whole term per round trip.
* The leader commits an index only when a quorum of the current configuration holds it **and** its
  entry is of the current term (Figure 8); earlier entries commit indirectly.
* Check-quorum: a leader that has not heard from a quorum in ``election_ticks`` steps down (the
  check runs once per ``election_ticks``, so a cut-off leader is gone within twice that).
* Membership changes one voter at a time (dissertation §4.1): the new voter set takes effect as
  soon as the config entry is appended (on every node), only one may be uncommitted, and a leader
  proposes one only after it has committed an entry of its own term. A leader that removed itself
  keeps replicating until the removal commits, not counting itself, then steps down.
* Snapshots: ``compact(index, data)`` drops the log through ``index`` (which must be applied). A
  follower whose next entry is no longer in the log gets the whole snapshot in one
  :class:`InstallSnapshot` (``data`` is bounded by ``max_snapshot_bytes``, so links must carry
  messages of that size) and the Ready then carries it for the driver to persist and restore.

Progress of each follower, on the leader: PROBE (one AppendEntries at a time until a match is
found), REPLICATE (optimistic pipelining, at most ``max_inflight`` unacknowledged messages, each at
most ``max_append_entries`` / ``max_append_bytes``) and SNAPSHOT (waiting for an InstallSnapshot to
land; retried after ``election_ticks`` without an answer).

Messages are kept few, since every one is encoded, framed, sent and parsed: a commit that
advances tells each follower once per Ready (an empty AppendEntries only to a follower that no
AppendEntries of that Ready already told), and a heartbeat goes only to a follower that was sent
nothing since the previous heartbeat tick (a busy group's appends are its heartbeats).

Bounds: ``max_uncommitted_entries`` proposals may be in flight, ``max_entry_bytes`` each
(beyond either, and during a leadership transfer, :class:`ProposalDroppedError`); ``committed``
in one Ready holds at most ``max_apply_entries``. Errors say whose fault they are:
:class:`RaftUsageError` (the local driver), :class:`RemoteProtocolError` (a peer's message).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import MISSING, Field, dataclass, fields
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "AppendEntries",
    "AppendResponse",
    "Entry",
    "EntryKind",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "Message",
    "NotLeaderError",
    "PreVoteRequest",
    "PreVoteResponse",
    "ProposalDroppedError",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "RaftUsageError",
    "RandomSource",
    "Ready",
    "RemoteProtocolError",
    "Role",
    "Snapshot",
    "SoftState",
    "TimeoutNow",
    "VoteRequest",
    "VoteResponse",
    "decode_voters",
    "encode_voters",
    "message_from_wire",
    "message_to_wire",
]

_VOTER_SEPARATOR: Final = ","

#: How far back (in election timeouts) a follower must have applied what its leader had
#: committed to count as in touch (RaftNode.in_touch).
IN_TOUCH_ELECTIONS: Final = 4


class RandomSource(Protocol):
    """Where election timeouts come from (``random.Random`` fits); passed in, never imported."""

    def randrange(self, start: int, stop: int, /) -> int: ...


# --- errors -------------------------------------------------------------------------------------


class RaftError(Exception):
    """Base of every error this module raises."""


class RaftUsageError(RaftError):
    """The local driver broke the calling contract (a bug on this side, not the peer's)."""


class RemoteProtocolError(RaftError):
    """A peer sent something malformed; the driver should drop it (and may log the peer)."""


class NotLeaderError(RaftError):
    """Only the leader accepts proposals; ``leader`` is the node believed to lead, if known."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDroppedError(RaftError):
    """The leader refused a proposal for now (bounds, transfer, pending change); retry later."""


# --- data ---------------------------------------------------------------------------------------


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class EntryKind(enum.Enum):
    DATA = "data"  # an application proposal
    NOOP = "noop"  # appended by each new leader so it can commit entries of earlier terms
    CONFIG = "config"  # ``data`` is the new voter set, see :func:`encode_voters`


def encode_voters(voters: Iterable[str]) -> bytes:
    """A voter set as the bytes of a CONFIG entry (sorted, comma-separated UTF-8)."""
    return _VOTER_SEPARATOR.join(sorted(voters)).encode()


def decode_voters(data: bytes) -> frozenset[str]:
    text = data.decode()
    return frozenset(text.split(_VOTER_SEPARATOR)) if text else frozenset()


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind
    data: bytes = b""

    def voters(self) -> frozenset[str]:
        """The voter set a CONFIG entry installs."""
        if self.kind is not EntryKind.CONFIG:
            raise ValueError(f"entry {self.index} is not a config entry")
        return decode_voters(self.data)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Application state through ``index`` (whose entry had ``term``) and the voters then."""

    index: int
    term: int
    voters: frozenset[str]
    data: bytes


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message of the same Ready is sent."""

    term: int = 0
    voted_for: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile, for the driver's routing: who leads and what this node is."""

    leader: str | None
    role: Role


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``sender``/``to`` are node ids, ``group`` the Raft group id."""

    group: str
    sender: str
    to: str
    term: int


@dataclass(frozen=True, slots=True)
class PreVoteRequest(Message):
    """ "Would you vote for me at ``term``?" -- changes no one's term."""

    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True)
class PreVoteResponse(Message):
    granted: bool


@dataclass(frozen=True, slots=True)
class VoteRequest(Message):
    last_index: int
    last_term: int
    transfer: bool = False  # campaign caused by TimeoutNow: overrides leader stickiness


@dataclass(frozen=True, slots=True)
class VoteResponse(Message):
    granted: bool


@dataclass(frozen=True, slots=True)
class AppendEntries(Message):
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendResponse(Message):
    """``index``: last matching index on success, the rejected ``prev_index`` otherwise."""

    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    commit: int  # what the follower may commit: min(its match, the leader's commit)
    leader_commit: int = 0  # the leader's own commit index (how far behind the follower is)


@dataclass(frozen=True, slots=True)
class HeartbeatResponse(Message):
    pass


@dataclass(frozen=True, slots=True)
class InstallSnapshot(Message):
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class TimeoutNow(Message):
    """From the leader to a transfer target: campaign now, skipping pre-vote."""


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver; see the module docstring for the order of duties."""

    hard_state: HardState | None
    truncate_after: int | None
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    committed: tuple[Entry, ...]
    soft_state: SoftState | None


@dataclass(frozen=True, slots=True)
class RaftConfig:
    node_id: str
    group: str
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_append_entries: int = 64
    max_append_bytes: int = 1 << 20
    max_inflight: int = 8
    max_uncommitted_entries: int = 1024
    max_entry_bytes: int = 1 << 20
    max_snapshot_bytes: int = 64 << 20
    max_apply_entries: int = 1024

    def __post_init__(self) -> None:
        if not self.node_id or _VOTER_SEPARATOR in self.node_id:
            raise ValueError(f"node id {self.node_id!r} must be non-empty without commas")
        if not 0 < 2 * self.heartbeat_ticks < self.election_ticks:
            # A follower sent appends gets no heartbeat at the next tick: it may wait two.
            raise ValueError("need 0 < 2 * heartbeat_ticks < election_ticks")
        limits = (
            self.max_append_entries,
            self.max_append_bytes,
            self.max_inflight,
            self.max_uncommitted_entries,
            self.max_entry_bytes,
            self.max_snapshot_bytes,
            self.max_apply_entries,
        )
        if min(limits) < 1:
            raise ValueError("every max_* limit must be at least 1")


# --- the replica --------------------------------------------------------------------------------


class _Progress(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class _Follower:
    """The leader's view of one follower."""

    __slots__ = (
        "inflight",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "sent_commit",
        "sent_since_heartbeat",
        "snapshot_ticks",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = _Progress.PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()  # last index of each unacknowledged AppendEntries
        self.recent_active = False
        self.pending_snapshot = 0
        self.snapshot_ticks = 0
        self.sent_commit = 0  # the commit index last sent to it
        self.sent_since_heartbeat = False  # an AppendEntries went to it since the last tick

    def become_probe(self) -> None:
        self.state = _Progress.PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = _Progress.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def paused(self, max_inflight: int) -> bool:
        if self.state is _Progress.PROBE:
            return self.probe_sent
        if self.state is _Progress.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True


class RaftNode:
    """One replica of one Raft group; see the module docstring for how to drive it."""

    def __init__(
        self,
        config: RaftConfig,
        rng: RandomSource,
        *,
        voters: Iterable[str] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        applied: int | None = None,
    ) -> None:
        """A fresh replica (``voters`` is the bootstrap configuration; empty for a node that
        waits to be added), or -- through :meth:`restore` -- one rebuilt from its disk."""
        self.config = config
        self.id = config.node_id
        self._rng = rng
        snap = snapshot or Snapshot(0, 0, frozenset(voters), b"")
        self._snap = snap
        self._entries: list[Entry] = []
        self._config_history: list[tuple[int, frozenset[str]]] = []
        expected = snap.index + 1
        for entry in entries:
            if entry.index != expected:
                raise ValueError(f"entries must follow on from {expected - 1}, got {entry.index}")
            self._append_one(entry)
            expected += 1
        hs = hard_state or HardState()
        self.term = hs.term
        self.voted_for = hs.voted_for
        self.commit = max(snap.index, min(hs.commit, self.last_index))
        self.applied = snap.index if applied is None else max(snap.index, min(applied, self.commit))
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Follower] = {}
        # Learners: replicas the leader keeps up to date that neither vote nor count for
        # commit (every node of a cluster holds every shard; only some vote in it). Not part
        # of the replicated configuration: each leader is told them (``set_learners``).
        self._learners: frozenset[str] = frozenset()
        self._transferee: str | None = None
        self._transfer_elapsed = 0
        self._msgs: list[Message] = []
        self._commit_notice = False  # the leader's commit advanced: tell followers at ready()
        #: A follower's samples, one per tick, of the highest commit index its leader told it
        #: (the oldest first; see in_touch).
        self._told_commits: deque[int] = deque()
        self._persist_from = self.last_index + 1  # first entry not yet handed to a Ready
        self._pending_truncate: int | None = None
        self._pending_snapshot: Snapshot | None = None
        self._persisted = HardState(hs.term, hs.voted_for, hs.commit)
        self._soft = SoftState(None, Role.FOLLOWER)
        self._outstanding: Ready | None = None

    @classmethod
    def restore(
        cls,
        config: RaftConfig,
        rng: RandomSource,
        *,
        hard_state: HardState,
        snapshot: Snapshot | None,
        entries: Sequence[Entry],
        voters: Iterable[str] = (),
        applied: int | None = None,
    ) -> RaftNode:
        """Rebuild a replica from what earlier Readies persisted.

        ``entries`` follow on from ``snapshot`` (or from index 1 with the bootstrap ``voters``
        when there is no snapshot). The application must be restored from ``snapshot``; unless
        ``applied`` says how far its state already is, Readies re-deliver the committed
        entries after the snapshot."""
        return cls(
            config,
            rng,
            voters=voters,
            hard_state=hard_state,
            snapshot=snapshot,
            entries=entries,
            applied=applied,
        )

    # --- read-only views ---

    @property
    def last_index(self) -> int:
        return self._snap.index + len(self._entries)

    @property
    def first_index(self) -> int:
        """The first index still in the log (older ones are in the snapshot)."""
        return self._snap.index + 1

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snap.term

    @property
    def voters(self) -> frozenset[str]:
        return self._config_history[-1][1] if self._config_history else self._snap.voters

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    @property
    def transferee(self) -> str | None:
        return self._transferee

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``, or None if it is compacted away or absent."""
        if index == self._snap.index:
            return self._snap.term
        if self._snap.index < index <= self.last_index:
            return self._entries[index - self._snap.index - 1].term
        return None

    def entries(self, start: int, stop: int | None = None) -> tuple[Entry, ...]:
        """Entries in ``[start, stop)`` that are still in the log."""
        stop = self.last_index + 1 if stop is None else stop
        lo = max(start, self.first_index) - self._snap.index - 1
        hi = min(stop, self.last_index + 1) - self._snap.index - 1
        return tuple(self._entries[lo:hi]) if hi > lo else ()

    def match_index(self, peer: str) -> int | None:
        """On a leader, the highest index known replicated on ``peer``."""
        if self.role is not Role.LEADER:
            return None
        if peer == self.id:
            return self.last_index
        follower = self._progress.get(peer)
        return follower.match if follower else None

    # --- inputs ---

    @property
    def in_touch(self) -> bool:
        """Whether a leader is known and was heard from within ``election_ticks`` (on the
        leader: until check-quorum deposes it) and this node has applied an entry of the
        current term (so everything committed before the term began, restored from disk or
        not, is applied here), and, on a follower, it has applied what the leader had
        committed ``IN_TOUCH_ELECTIONS`` election timeouts ago: what it applied lags the group
        by about that much at most (a busy node lags a little; the window is wide enough that
        an overloaded one does not flap). A node cut off from the majority stops being in touch."""
        if self.term_at(self.applied) != self.term:
            return False
        if self.role is Role.LEADER:
            return True
        # A follower whose answers are lost is still sent heartbeats, but no entries.
        told_then = self._told_commits[0] if self._told_commits else 0
        return (
            self.leader is not None
            and self._election_elapsed < self.config.election_ticks
            and self.applied >= told_then
        )

    def tick(self) -> None:
        self._check_accepting()
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            told = self._told_commits
            if told and self.leader is not None:
                told.append(told[-1])  # one sample per tick while a leader talks to us
                if len(told) > IN_TOUCH_ELECTIONS * self.config.election_ticks:
                    told.popleft()
            if self._promotable() and self._election_elapsed >= self._timeout:
                self._campaign(pre_vote=True)

    def propose(self, data: bytes) -> int:
        """Append ``data`` as an entry; returns its index (the entry is identified by
        ``(index, node.term)``: if a different term commits there, the proposal was lost)."""
        self._check_accepting()
        self._check_can_propose()
        if len(data) > self.config.max_entry_bytes:
            raise ProposalDroppedError(f"entry of {len(data)} bytes exceeds max_entry_bytes")
        return self._leader_append(EntryKind.DATA, bytes(data))

    def add_voter(self, node_id: str) -> int:
        """Propose adding one voter; returns the config entry's index."""
        if not node_id or _VOTER_SEPARATOR in node_id:
            raise ValueError(f"bad node id {node_id!r}")
        self._check_accepting()
        self._check_can_propose()
        if node_id in self.voters:
            raise ValueError(f"{node_id} is already a voter")
        return self._propose_config(self.voters | {node_id})

    def remove_voter(self, node_id: str) -> int:
        """Propose removing one voter (possibly this leader); returns the config entry's index."""
        self._check_accepting()
        self._check_can_propose()
        if node_id not in self.voters:
            raise ValueError(f"{node_id} is not a voter")
        if len(self.voters) == 1:
            raise ValueError("cannot remove the last voter")
        return self._propose_config(self.voters - {node_id})

    def set_learners(self, learners: Iterable[str]) -> None:
        """Replicate to ``learners`` too (when leading): they get every entry and snapshot but
        never vote or count for commit. Voters among them are voters; this node is ignored."""
        self._learners = frozenset(learners) - {self.id}
        if self.role is Role.LEADER:
            self._apply_config_to_progress()

    @property
    def learners(self) -> frozenset[str]:
        return self._learners - self.voters

    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to ``target``: stop taking proposals, catch it up, send TimeoutNow.
        Abandoned (proposals resume) if it has not happened within ``election_ticks``."""
        self._check_accepting()
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.leader)
        if target == self.id or target == self._transferee:
            return
        if target not in self._progress or target not in self.voters:
            raise ValueError(f"{target} is not a voter")
        self._transferee = target
        self._transfer_elapsed = 0
        follower = self._progress[target]
        if follower.match == self.last_index:
            self._send(TimeoutNow(self.config.group, self.id, target, self.term))
        else:
            self._send_append(target)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Record that the application's state through ``index`` (already applied) is ``data``;
        the log before it is dropped. Returns the snapshot for the driver to save durably."""
        self._check_accepting()
        if not self._snap.index < index <= self.applied:
            raise ValueError(f"can compact only in ({self._snap.index}, {self.applied}]")
        if len(data) > self.config.max_snapshot_bytes:
            raise ValueError(f"snapshot of {len(data)} bytes exceeds max_snapshot_bytes")
        term = self.term_at(index)
        assert term is not None
        voters = self._snap.voters
        for config_index, config_voters in self._config_history:
            if config_index <= index:
                voters = config_voters
        if not voters:
            # A node that started knowing no voters (a joiner) learns them from configuration
            # entries; a snapshot before the first of those could not say who votes in it.
            raise ValueError(f"the voters at {index} are not known here yet")
        self._entries = self._entries[index - self._snap.index :]
        self._config_history = [item for item in self._config_history if item[0] > index]
        self._snap = Snapshot(index, term, voters, bytes(data))
        return self._snap

    def step(self, message: Message) -> None:
        """Handle a message from a peer of this group."""
        self._check_accepting()
        if message.to != self.id or message.group != self.config.group:
            raise RaftUsageError(f"message for {message.to}/{message.group} stepped into {self.id}")
        if message.term > self.term:
            if isinstance(message, PreVoteRequest | VoteRequest):
                transfer = isinstance(message, VoteRequest) and message.transfer
                in_lease = (
                    self.leader is not None and self._election_elapsed < self.config.election_ticks
                )
                if in_lease and not transfer:
                    return  # leader stickiness: we heard from a live leader recently
            if isinstance(message, PreVoteRequest):
                pass  # a pre-vote changes no term
            elif isinstance(message, PreVoteResponse) and message.granted:
                pass  # granted at the term we would campaign for
            elif isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
                self._become_follower(message.term, message.sender)
            else:
                self._become_follower(message.term, None)
        elif message.term < self.term:
            if isinstance(message, AppendEntries | Heartbeat):
                # A deposed leader learns the new term from this and steps down.
                self._reply_append(message, success=False, index=0)
            elif isinstance(message, PreVoteRequest):
                group = self.config.group
                self._send(PreVoteResponse(group, self.id, message.sender, self.term, False))
            return

        if isinstance(message, PreVoteRequest | VoteRequest):
            self._handle_vote_request(message)
        elif self.role is Role.LEADER:
            self._step_leader(message)
        elif self.role is Role.FOLLOWER:
            self._step_follower(message)
        else:
            self._step_candidate(message)

    # --- the Ready cycle ---

    def has_ready(self) -> bool:
        return self._outstanding is None and (
            bool(self._msgs)
            or self._commit_notice
            or self._pending_truncate is not None
            or self._pending_snapshot is not None
            or self._persist_from <= self.last_index
            or self.commit > self.applied
            or self.term != self._persisted.term
            or self.voted_for != self._persisted.voted_for
            or self.commit != self._persisted.commit
            or self.leader != self._soft.leader
            or self.role is not self._soft.role
        )

    def ready(self) -> Ready:
        """Take the accumulated work; the node accepts no input until :meth:`advance`."""
        self._check_accepting()
        if self._commit_notice:
            self._commit_notice = False
            if self.role is Role.LEADER:
                for peer, follower in self._progress.items():
                    if follower.sent_commit < self.commit:
                        self._send_append(peer)
        hard_state = self._hard_state()
        soft_state = self._soft_state()
        committed_stop = min(self.commit, self.applied + self.config.max_apply_entries)
        ready = Ready(
            hard_state=None if hard_state == self._persisted else hard_state,
            truncate_after=self._pending_truncate,
            snapshot=self._pending_snapshot,
            entries=self.entries(self._persist_from),
            messages=tuple(self._msgs),
            committed=self.entries(self.applied + 1, committed_stop + 1),
            soft_state=None if soft_state == self._soft else soft_state,
        )
        self._msgs = []
        self._pending_truncate = None
        self._pending_snapshot = None
        self._persist_from = self.last_index + 1
        self._soft = soft_state
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver has carried out ``ready`` (persisted, sent, applied)."""
        if ready is not self._outstanding:
            raise RaftUsageError("advance() must get the Ready that ready() returned last")
        self._outstanding = None
        if ready.hard_state is not None:
            self._persisted = ready.hard_state
        if ready.committed:
            self.applied = ready.committed[-1].index

    # --- internals: bookkeeping ---

    def _check_accepting(self) -> None:
        if self._outstanding is not None:
            raise RaftUsageError("a Ready is outstanding: call advance() first")

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.leader)
        if self._transferee is not None:
            raise ProposalDroppedError(f"leadership is being transferred to {self._transferee}")
        if self.last_index - self.commit >= self.config.max_uncommitted_entries:
            raise ProposalDroppedError("too many uncommitted entries")

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.commit)

    def _soft_state(self) -> SoftState:
        return SoftState(self.leader, self.role)

    def _random_timeout(self) -> int:
        ticks = self.config.election_ticks
        return self._rng.randrange(ticks, 2 * ticks)

    def _promotable(self) -> bool:
        return self.id in self.voters

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _send(self, message: Message) -> None:
        self._msgs.append(message)

    def _reply_append(
        self, to: Message, *, success: bool, index: int, hint_index: int = 0, hint_term: int = 0
    ) -> None:
        group = self.config.group
        response = AppendResponse(
            group, self.id, to.sender, self.term, success, index, hint_index, hint_term
        )
        self._send(response)

    def _append_one(self, entry: Entry) -> None:
        self._entries.append(entry)
        if entry.kind is EntryKind.CONFIG:
            self._config_history.append((entry.index, entry.voters()))

    def _truncate_after(self, index: int) -> None:
        """Drop the uncommitted suffix after ``index`` (a conflict with the leader's log)."""
        assert index >= self.commit, "committed entries are never truncated"
        del self._entries[index - self._snap.index :]
        while self._config_history and self._config_history[-1][0] > index:
            self._config_history.pop()
        if index < self._persist_from - 1:
            # Entries after ``index`` were handed to a Ready (are on disk): drop them there too.
            # A pending truncation is always at or above this point, so this one covers it.
            self._pending_truncate = index
            self._persist_from = index + 1

    def _log_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log is at least as up to date as ours."""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def _commit_allowed(self, index: int) -> bool:
        """Figure 8: only an entry of the leader's own term commits by counting replicas."""
        return self.term_at(index) == self.term

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose entry's term is <= ``term`` (or the snapshot)."""
        index = min(index, self.last_index)
        while index > self._snap.index:
            entry_term = self.term_at(index)
            assert entry_term is not None
            if entry_term <= term:
                break
            index -= 1
        return index

    # --- internals: roles ---

    def _become_follower(self, term: int, leader: str | None) -> None:
        if term != self.term:
            self.term = term
            self.voted_for = None
        if leader is None or leader != self.leader:
            self._told_commits.clear()
        self.role = Role.FOLLOWER
        self.leader = leader
        self._reset_timers()
        self._progress = {}
        self._transferee = None
        self._votes = {}

    def _reset_timers(self) -> None:
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self.role = Role.PRE_CANDIDATE
            vote_term = self.term + 1
        else:
            self.term += 1
            self.voted_for = self.id
            self.role = Role.CANDIDATE
            vote_term = self.term
        self.leader = None
        self._reset_timers()
        self._votes = {self.id: True}
        if self._tally_won():
            if pre_vote:
                self._campaign(pre_vote=False)
            else:
                self._become_leader()
            return
        group = self.config.group
        for peer in sorted(self.voters - {self.id}):
            if pre_vote:
                self._send(PreVoteRequest(group, self.id, peer, vote_term, *self._log_tip()))
            else:
                request = VoteRequest(group, self.id, peer, vote_term, *self._log_tip(), transfer)
                self._send(request)

    def _log_tip(self) -> tuple[int, int]:
        return self.last_index, self.last_term

    def _tally_won(self) -> bool:
        return sum(1 for v in self.voters if self._votes.get(v)) >= self._quorum()

    def _tally_lost(self) -> bool:
        rejected = sum(1 for v in self.voters if self._votes.get(v) is False)
        return rejected > len(self.voters) - self._quorum()

    def _become_leader(self) -> None:
        self.role = Role.LEADER
        self.leader = self.id
        self._reset_timers()
        self._votes = {}
        self._transferee = None
        self._progress = {
            peer: _Follower(self.last_index + 1)
            for peer in sorted(self.voters | self._learners)
            if peer != self.id
        }
        self._leader_append(EntryKind.NOOP, b"")

    def _handle_vote_request(self, request: PreVoteRequest | VoteRequest) -> None:
        pre = isinstance(request, PreVoteRequest)
        can_vote = (
            self.voted_for == request.sender
            or (self.voted_for is None and self.leader is None)
            or (pre and request.term > self.term)
        )
        grant = can_vote and self._log_up_to_date(request.last_index, request.last_term)
        response_term = request.term if grant else self.term
        group = self.config.group
        if pre:
            self._send(PreVoteResponse(group, self.id, request.sender, response_term, grant))
            return
        if grant:
            self._election_elapsed = 0
            self.voted_for = request.sender
        self._send(VoteResponse(group, self.id, request.sender, response_term, grant))

    def _step_candidate(self, message: Message) -> None:
        if isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
            self._become_follower(self.term, message.sender)
            self._step_follower(message)
            return
        pre = self.role is Role.PRE_CANDIDATE
        if pre and isinstance(message, PreVoteResponse):
            if message.granted and message.term != self.term + 1:
                return  # an answer to an older campaign
        elif not pre and isinstance(message, VoteResponse):
            pass
        else:
            return
        self._votes.setdefault(message.sender, message.granted)
        if self._tally_won():
            if pre:
                self._campaign(pre_vote=False)
            else:
                self._become_leader()
        elif self._tally_lost():
            self._become_follower(self.term, None)

    def _step_follower(self, message: Message) -> None:
        if isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
            if self.leader != message.sender or self._election_elapsed >= (
                self.config.election_ticks
            ):
                # Samples from before a silence (or of another leader) say nothing of now:
                # until a window is sampled again, the leader's word now is the yardstick.
                self._told_commits.clear()
            self._election_elapsed = 0
            self.leader = message.sender
            told = message.commit if isinstance(message, AppendEntries) else 0
            if isinstance(message, Heartbeat):
                told = message.leader_commit
            if self._told_commits:
                self._told_commits[-1] = max(self._told_commits[-1], told)
            else:
                self._told_commits.append(told)
            if isinstance(message, AppendEntries):
                self._handle_append(message)
            elif isinstance(message, Heartbeat):
                self.commit = max(self.commit, min(message.commit, self.last_index))
                group = self.config.group
                self._send(HeartbeatResponse(group, self.id, message.sender, self.term))
            else:
                self._handle_snapshot(message)
        elif isinstance(message, TimeoutNow) and self._promotable():
            self._campaign(pre_vote=False, transfer=True)

    def _handle_append(self, message: AppendEntries) -> None:
        prev_index, prev_term, entries = message.prev_index, message.prev_term, message.entries
        for offset, entry in enumerate(entries):
            if entry.index != prev_index + 1 + offset:
                raise RemoteProtocolError(f"AppendEntries from {message.sender}: not contiguous")
            if entry.term > message.term:
                raise RemoteProtocolError(f"AppendEntries from {message.sender}: future term")
            if len(entry.data) > self.config.max_entry_bytes:
                # Refused before it touches the log: written, it would fail every restart.
                raise RemoteProtocolError(
                    f"AppendEntries from {message.sender}: an entry larger than "
                    f"{self.config.max_entry_bytes} bytes"
                )
        if prev_index < self.commit:
            # Everything through our commit index is known to match the leader's log.
            entries = tuple(e for e in entries if e.index > self.commit)
            prev_index = self.commit
            term = self.term_at(prev_index)
            assert term is not None
            prev_term = term
        if self.term_at(prev_index) != prev_term:
            hint_index = self._find_conflict_by_term(min(prev_index, self.last_index), prev_term)
            self._reply_append(
                message,
                success=False,
                index=message.prev_index,
                hint_index=hint_index,
                hint_term=self.term_at(hint_index) or 0,
            )
            return
        for position, entry in enumerate(entries):
            existing = self.term_at(entry.index)
            if existing == entry.term:
                continue
            if existing is not None:
                self._truncate_after(entry.index - 1)
            for new in entries[position:]:
                self._append_one(new)
            break
        last_new = prev_index + len(entries)
        self.commit = max(self.commit, min(message.commit, last_new))
        self._reply_append(message, success=True, index=last_new)

    def _handle_snapshot(self, message: InstallSnapshot) -> None:
        snap = message.snapshot
        if snap.index <= self.commit:
            self._reply_append(message, success=True, index=self.commit)
            return
        if self.term_at(snap.index) == snap.term:
            # We hold the entry: the snapshot only tells us it is committed.
            self.commit = snap.index
        else:
            self._snap = snap
            self._entries = []
            self._config_history = []
            self.commit = snap.index
            self.applied = snap.index
            self._pending_snapshot = snap
            self._persist_from = snap.index + 1
        self._reply_append(message, success=True, index=snap.index)

    # --- internals: leader ---

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.config.election_ticks:
                self._transferee = None  # the target did not take over: lead on
        for peer, follower in self._progress.items():
            if follower.state is _Progress.SNAPSHOT:
                follower.snapshot_ticks += 1
                if follower.snapshot_ticks >= self.config.election_ticks:
                    follower.become_probe()  # the snapshot was probably lost; try again
                    self._send_append(peer)
        if self._election_elapsed >= self.config.election_ticks:
            self._election_elapsed = 0
            active = sum(
                1
                for v in self.voters
                if v == self.id or (v in self._progress and self._progress[v].recent_active)
            )
            for follower in self._progress.values():
                follower.recent_active = False
            if active < self._quorum():
                self._become_follower(self.term, None)
                return
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            for peer, follower in self._progress.items():
                if follower.sent_since_heartbeat:
                    follower.sent_since_heartbeat = False  # its appends were its heartbeats
                    continue
                commit = min(follower.match, self.commit)
                self._send(
                    Heartbeat(self.config.group, self.id, peer, self.term, commit, self.commit)
                )

    def _leader_append(self, kind: EntryKind, data: bytes) -> int:
        index = self.last_index + 1
        self._append_one(Entry(index, self.term, kind, data))
        if kind is EntryKind.CONFIG:
            self._apply_config_to_progress()
        self._broadcast_append(send_if_empty=False)
        if self._maybe_commit():
            self._commit_notice = True  # a group of one voter: its learners learn at ready()
        return index

    def _propose_config(self, voters: frozenset[str]) -> int:
        latest_config = self._config_history[-1][0] if self._config_history else 0
        if latest_config > self.commit:
            raise ProposalDroppedError("a membership change is still uncommitted")
        if self.term_at(self.commit) != self.term:
            raise ProposalDroppedError("the leader has not committed an entry of its term yet")
        return self._leader_append(EntryKind.CONFIG, encode_voters(voters))

    def _apply_config_to_progress(self) -> None:
        wanted = self.voters | self._learners
        for peer in sorted(wanted):
            if peer != self.id and peer not in self._progress:
                self._progress[peer] = _Follower(self.last_index + 1)
        for peer in list(self._progress):
            if peer not in wanted:
                del self._progress[peer]

    def _broadcast_append(self, *, send_if_empty: bool) -> None:
        for peer in list(self._progress):
            self._send_append(peer, send_if_empty=send_if_empty)

    def _send_append(self, peer: str, *, send_if_empty: bool = True) -> bool:
        follower = self._progress[peer]
        if follower.paused(self.config.max_inflight):
            return False
        group = self.config.group
        prev_index = follower.next - 1
        prev_term = self.term_at(prev_index)
        if prev_term is None:
            # The entries it needs are compacted away: send the snapshot instead.
            follower.state = _Progress.SNAPSHOT
            follower.pending_snapshot = self._snap.index
            follower.snapshot_ticks = 0
            follower.inflight.clear()
            self._send(InstallSnapshot(group, self.id, peer, self.term, self._snap))
            return True
        batch: list[Entry] = []
        size = 0
        for entry in self.entries(follower.next, follower.next + self.config.max_append_entries):
            if batch and size + len(entry.data) > self.config.max_append_bytes:
                break
            batch.append(entry)
            size += len(entry.data)
        if not batch and not send_if_empty:
            return False
        self._send(
            AppendEntries(
                group, self.id, peer, self.term, prev_index, prev_term, tuple(batch), self.commit
            )
        )
        follower.sent_commit = self.commit
        follower.sent_since_heartbeat = True
        if follower.state is _Progress.PROBE:
            follower.probe_sent = True
        elif batch:
            follower.next = batch[-1].index + 1
            follower.inflight.append(batch[-1].index)
        return True

    def _maybe_commit(self) -> bool:
        voters = self.voters  # never empty: the last voter cannot be removed
        matches = sorted(
            (self.last_index if v == self.id else self._progress[v].match for v in voters),
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        if candidate <= self.commit or not self._commit_allowed(candidate):
            return False
        self.commit = candidate
        latest_config = self._config_history[-1][0] if self._config_history else 0
        if self.id not in voters and self.commit >= latest_config:
            # Our own removal is committed: hand over by stepping down (we never campaign).
            self._broadcast_append(send_if_empty=True)
            self._become_follower(self.term, None)
        return True

    def _step_leader(self, message: Message) -> None:
        follower = self._progress.get(message.sender)
        if follower is None:
            return  # not (or no longer) a voter
        if isinstance(message, AppendResponse):
            follower.recent_active = True
            if message.success:
                self._handle_append_success(message.sender, follower, message.index)
            else:
                self._handle_append_reject(message.sender, follower, message)
        elif isinstance(message, HeartbeatResponse):
            follower.recent_active = True
            follower.probe_sent = False
            if follower.state is _Progress.REPLICATE and len(follower.inflight) >= max(
                1, self.config.max_inflight
            ):
                follower.inflight.popleft()
            if follower.match < self.last_index:
                self._send_append(message.sender)

    def _handle_append_success(self, peer: str, follower: _Follower, index: int) -> None:
        updated = index > follower.match
        if updated:
            follower.match = index
        if follower.state is _Progress.PROBE:
            follower.become_replicate()
        elif follower.state is _Progress.SNAPSHOT:
            if follower.match >= follower.pending_snapshot:
                follower.become_replicate()
        else:
            follower.next = max(follower.next, index + 1)
            while follower.inflight and follower.inflight[0] <= index:
                follower.inflight.popleft()
        if updated and self._maybe_commit():
            if self.role is not Role.LEADER:
                return
            # New entries carry the new commit index; followers that get none this Ready are
            # told by one empty AppendEntries each when the Ready is taken.
            self._commit_notice = True
            self._broadcast_append(send_if_empty=False)
        else:
            while self._send_append(peer, send_if_empty=False):
                pass
            if follower.sent_commit < self.commit:
                self._commit_notice = True  # it was paused when the commit moved: tell it now
        if peer == self._transferee and follower.match == self.last_index:
            self._send(TimeoutNow(self.config.group, self.id, peer, self.term))

    def _handle_append_reject(
        self, peer: str, follower: _Follower, message: AppendResponse
    ) -> None:
        if follower.state is _Progress.REPLICATE:
            if message.index <= follower.match:
                return  # stale
        elif follower.state is _Progress.PROBE:
            if message.index != follower.next - 1:
                return  # stale
        else:
            return
        hint = message.hint_index
        if message.hint_term > 0:
            hint = self._find_conflict_by_term(hint, message.hint_term)
        follower.become_probe()
        follower.next = max(min(message.index, hint + 1), follower.match + 1)
        self._send_append(peer)


# --- wire form ----------------------------------------------------------------------------------

_MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    cls.__name__: cls
    for cls in (
        PreVoteRequest,
        PreVoteResponse,
        VoteRequest,
        VoteResponse,
        AppendEntries,
        AppendResponse,
        Heartbeat,
        HeartbeatResponse,
        InstallSnapshot,
        TimeoutNow,
    )
}


def message_to_wire(message: Message) -> dict[str, Any]:
    """A message as a plain msgpack-able dict (str keys; ints, bools, bytes, lists)."""
    wire: dict[str, Any] = {"type": type(message).__name__}
    for f in _fields_of(type(message)):
        value = getattr(message, f.name)
        if f.name == "entries":
            value = [[e.index, e.term, e.kind.value, e.data] for e in value]
        elif f.name == "snapshot":
            value = [value.index, value.term, sorted(value.voters), value.data]
        wire[f.name] = value
    return wire


_FIELDS: dict[type, tuple[Field[Any], ...]] = {}


def _fields_of(cls: type) -> tuple[Field[Any], ...]:
    """``dataclasses.fields`` of a message class, looked up once (it is on every message's
    way to and from the wire)."""
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = fields(cls)
    return found


#: Entries (or voters) one message may carry; a leader sends far fewer (``max_append_entries``).
MAX_WIRE_ENTRIES: Final = 4096


def message_from_wire(wire: Mapping[str, Any]) -> Message:
    """The inverse of :func:`message_to_wire`; RemoteProtocolError if it does not fit."""
    try:
        cls = _MESSAGE_TYPES[wire["type"]]
        values: dict[str, Any] = {}
        for f in _fields_of(cls):
            if f.name not in wire and f.default is not MISSING:
                values[f.name] = f.default  # a field newer than the sender
                continue
            value = wire[f.name]
            if f.name == "entries":
                if len(value) > MAX_WIRE_ENTRIES:
                    raise ValueError(f"more than {MAX_WIRE_ENTRIES} entries in one message")
                value = tuple(_wire_entry(i, t, k, d) for i, t, k, d in value)
            elif f.name == "snapshot":
                index, term, voters, data = value
                if not all(isinstance(v, str) and v for v in voters) or not voters:
                    raise TypeError("voters must be non-empty strings")
                if len(voters) > MAX_WIRE_ENTRIES:
                    raise ValueError("too many voters")
                value = Snapshot(
                    _wire_int(index), _wire_int(term), frozenset(voters), _wire_bytes(data)
                )
            elif f.type == "str":
                if not isinstance(value, str):
                    raise TypeError(f"{f.name} must be a string")
            elif f.type == "int":
                value = _wire_int(value)
            elif f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{f.name} must be a bool")
            values[f.name] = value
        return cls(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed raft message: {exc!r}") from exc


#: Terms and indexes from peers stay below this: they are written as signed 64-bit integers,
#: and a term at the very top would overflow the next election's increment.
MAX_WIRE_INT: Final = 2**62


def _wire_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_WIRE_INT:
        raise TypeError(f"expected an int from 0 to 2**62, got {value!r}")
    return value


def _wire_entry(index: object, term: object, kind: object, data: object) -> Entry:
    entry = Entry(_wire_int(index), _wire_int(term), EntryKind(kind), _wire_bytes(data))
    if entry.index < 1:
        raise ValueError("entry index 0")
    if entry.kind is EntryKind.CONFIG:
        try:
            voters = decode_voters(entry.data)
        except UnicodeDecodeError:
            raise ValueError("a CONFIG entry that is not UTF-8") from None
        if not voters or "" in voters:
            raise ValueError("a CONFIG entry without voters")
    return entry


def _wire_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value
