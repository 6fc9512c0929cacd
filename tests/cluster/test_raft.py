"""The Raft core through its public API: messages in, Readies out, no mocks."""

from __future__ import annotations

import ast
import random
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import pytest

from tests.cluster.sim import Disk
from villaged.cluster import raft
from villaged.cluster.raft import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    NotLeaderError,
    PreVoteRequest,
    PreVoteResponse,
    ProposalDroppedError,
    RaftConfig,
    RaftNode,
    RaftUsageError,
    Ready,
    RemoteProtocolError,
    Role,
    Snapshot,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    message_from_wire,
    message_to_wire,
)

if TYPE_CHECKING:
    from collections.abc import Callable

G = "g"
M = TypeVar("M", bound=Message)
ELECTION = 10


def config(node_id: str, **overrides: Any) -> RaftConfig:
    return RaftConfig(node_id=node_id, group=G, election_ticks=ELECTION, **overrides)


class Cluster:
    """Nodes wired by a lossless in-order queue; ``isolated`` nodes neither send nor receive."""

    def __init__(
        self,
        ids: tuple[str, ...] = ("a", "b", "c"),
        *,
        node_class: type[RaftNode] = RaftNode,
        **overrides: Any,
    ) -> None:
        self.node_class = node_class
        self.overrides = overrides
        self.nodes: dict[str, RaftNode] = {}
        self.disks: dict[str, Disk] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.restored: dict[str, list[Snapshot]] = {}
        self.queue: deque[Message] = deque()
        self.sent: list[Message] = []
        self.isolated: set[str] = set()
        self.drop: Callable[[Message], bool] | None = None
        for node_id in ids:
            self.add(node_id, frozenset(ids))

    def add(self, node_id: str, voters: frozenset[str] = frozenset()) -> RaftNode:
        node = self.node_class(
            config(node_id, **self.overrides), random.Random(node_id), voters=voters
        )
        self.nodes[node_id] = node
        self.disks[node_id] = Disk()
        self.applied[node_id] = []
        self.restored[node_id] = []
        return node

    def drain(self, node_id: str) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            disk = self.disks[node_id]
            if ready.truncate_after is not None:
                disk.truncate_after(ready.truncate_after)
            if ready.snapshot is not None:
                disk.install_snapshot(ready.snapshot)
                self.restored[node_id].append(ready.snapshot)
            for entry in ready.entries:
                disk.append(entry)
            if ready.hard_state is not None:
                disk.hard_state = ready.hard_state
            self.queue.extend(ready.messages)
            self.sent.extend(ready.messages)
            self.applied[node_id].extend(ready.committed)
            node.advance(ready)

    def settle(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            for node_id in self.nodes:
                self.drain(node_id)
            if not self.queue:
                return
            message = self.queue.popleft()
            if message.sender in self.isolated or message.to in self.isolated:
                continue
            if self.drop is not None and self.drop(message):
                continue
            if message.to in self.nodes:
                self.nodes[message.to].step(message)
        raise AssertionError("cluster did not settle")

    def tick(self, *ids: str, times: int = 1) -> None:
        for _ in range(times):
            for node_id in ids or tuple(self.nodes):
                self.nodes[node_id].tick()
            self.settle()

    def elect(self, node_id: str) -> RaftNode:
        node = self.nodes[node_id]
        for _ in range(3 * ELECTION):
            node.tick()
            self.settle()
            if role(node) is Role.LEADER:
                return node
        raise AssertionError(f"{node_id} did not become leader")

    def propose(self, node_id: str, data: bytes) -> int:
        index = self.nodes[node_id].propose(data)
        self.settle()
        return index

    def data_applied(self, node_id: str) -> list[bytes]:
        return [e.data for e in self.applied[node_id] if e.kind is EntryKind.DATA]

    def sent_of(self, kind: type[M]) -> list[M]:
        return [m for m in self.sent if isinstance(m, kind)]


def transferee(node: RaftNode) -> str | None:
    return node.transferee


def role(node: RaftNode) -> Role:
    """The node's role now (a call, so mypy does not carry narrowing across steps)."""
    return node.role


def take_ready(node: RaftNode) -> Ready:
    ready = node.ready()
    node.advance(ready)
    return ready


# --- elections ------------------------------------------------------------------------------


def test_single_voter_elects_itself_and_commits_alone() -> None:
    cluster = Cluster(("a",))
    leader = cluster.elect("a")
    assert leader.term == 1
    assert leader.leader == "a"
    assert cluster.propose("a", b"x") == 2
    assert cluster.data_applied("a") == [b"x"]
    assert cluster.disks["a"].hard_state == HardState(1, "a", 2)


def test_three_voters_elect_with_pre_vote_then_vote() -> None:
    cluster = Cluster()
    leader = cluster.elect("a")
    assert leader.term == 1
    assert [m.term for m in cluster.sent_of(PreVoteRequest)] == [1, 1]
    assert len(cluster.sent_of(VoteRequest)) == 2
    for follower in ("b", "c"):
        node = cluster.nodes[follower]
        assert (node.role, node.term, node.leader, node.voted_for) == (
            Role.FOLLOWER,
            1,
            "a",
            "a",
        )
    # The new leader's empty entry commits everywhere.
    cluster.tick(times=2)
    for node_id in ("a", "b", "c"):
        assert [e.kind for e in cluster.applied[node_id]] == [EntryKind.NOOP]
        assert cluster.nodes[node_id].commit == 1


def test_ready_reports_role_changes_once() -> None:
    node = RaftNode(config("a"), random.Random(1), voters={"a"})
    assert not node.has_ready()
    for _ in range(2 * ELECTION):
        node.tick()
    ready = take_ready(node)
    assert ready.soft_state == SoftState("a", Role.LEADER)
    assert ready.hard_state == HardState(1, "a", 1)
    assert [e.kind for e in ready.entries] == [EntryKind.NOOP]
    assert ready.committed == ready.entries
    assert not node.has_ready()


def test_pre_vote_keeps_a_partitioned_node_from_bumping_terms() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("c")
    cluster.tick(times=10 * ELECTION)
    isolated = cluster.nodes["c"]
    assert isolated.term == 1
    assert role(isolated) is Role.PRE_CANDIDATE
    # Rejoining does not disturb the leader: everyone is still in term 1 under "a".
    cluster.isolated.clear()
    cluster.tick(times=3)
    assert {n.term for n in cluster.nodes.values()} == {1}
    assert role(cluster.nodes["a"]) is Role.LEADER
    assert isolated.leader == "a"
    assert role(isolated) is Role.FOLLOWER


def test_leader_stickiness_ignores_higher_term_vote_requests() -> None:
    cluster = Cluster()
    cluster.elect("a")
    follower = cluster.nodes["b"]
    follower.step(VoteRequest(G, "c", "b", 7, 99, 9))
    follower.step(PreVoteRequest(G, "c", "b", 7, 99, 9))
    assert follower.term == 1
    assert not take_ready(follower).messages
    # Once it has not heard from the leader for an election timeout, it listens.
    for _ in range(ELECTION):
        follower.tick()
        if role(follower) is not Role.FOLLOWER:
            break
    take_ready(follower)
    follower.step(PreVoteRequest(G, "c", "b", 7, 99, 9))
    (response,) = take_ready(follower).messages
    assert response == PreVoteResponse(G, "b", "c", 7, True)
    assert follower.term == 1


def test_vote_only_for_an_up_to_date_log_and_once_per_term() -> None:
    node = RaftNode.restore(
        config("a"),
        random.Random(0),
        hard_state=HardState(term=2),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP), Entry(2, 2, EntryKind.NOOP)],
        voters={"a", "b", "c"},
    )
    node.step(VoteRequest(G, "b", "a", 3, 5, 1))  # longer log, older last term
    assert take_ready(node).messages == (VoteResponse(G, "a", "b", 3, False),)
    assert node.voted_for is None
    node.step(VoteRequest(G, "b", "a", 3, 2, 2))
    ready = take_ready(node)
    assert ready.messages == (VoteResponse(G, "a", "b", 3, True),)
    assert ready.hard_state == HardState(3, "b", 0)
    node.step(VoteRequest(G, "c", "a", 3, 9, 3))
    assert take_ready(node).messages == (VoteResponse(G, "a", "c", 3, False),)
    node.step(VoteRequest(G, "b", "a", 3, 2, 2))  # a retransmission is granted again
    assert take_ready(node).messages == (VoteResponse(G, "a", "b", 3, True),)


def test_stale_messages_are_answered_with_the_current_term() -> None:
    node = RaftNode.restore(
        config("a"),
        random.Random(0),
        hard_state=HardState(term=5),
        snapshot=None,
        entries=[],
        voters={"a", "b", "c"},
    )
    node.step(AppendEntries(G, "b", "a", 4, 0, 0, (), 0))
    node.step(Heartbeat(G, "b", "a", 4, 0))
    node.step(PreVoteRequest(G, "c", "a", 4, 0, 0))
    node.step(VoteRequest(G, "c", "a", 4, 0, 0))
    node.step(VoteResponse(G, "c", "a", 4, True))
    assert take_ready(node).messages == (
        AppendResponse(G, "a", "b", 5, False, 0),
        AppendResponse(G, "a", "b", 5, False, 0),
        PreVoteResponse(G, "a", "c", 5, False),
    )
    leader = Cluster().elect("a")
    leader.step(AppendResponse(G, "b", "a", 9, False, 0))
    assert (leader.role, leader.term, leader.leader) == (Role.FOLLOWER, 9, None)


def test_candidate_loses_when_a_quorum_rejects_and_falls_back_to_follower() -> None:
    node = RaftNode(config("a"), random.Random(3), voters={"a", "b", "c"})
    while role(node) is Role.FOLLOWER:
        node.tick()
    assert role(node) is Role.PRE_CANDIDATE
    take_ready(node)
    node.step(PreVoteResponse(G, "b", "a", 0, False))
    node.step(PreVoteResponse(G, "c", "a", 0, False))
    assert role(node) is Role.FOLLOWER
    assert node.term == 0
    # A real candidate that is rejected by a quorum also steps back.
    while role(node) is Role.FOLLOWER:
        node.tick()
    node.step(PreVoteResponse(G, "b", "a", 1, True))
    assert role(node) is Role.CANDIDATE
    assert node.term == 1
    node.step(PreVoteResponse(G, "c", "a", 1, True))  # late answer to the pre-vote: ignored
    node.step(VoteResponse(G, "b", "a", 1, False))
    node.step(VoteResponse(G, "c", "a", 1, False))
    assert role(node) is Role.FOLLOWER
    assert node.voted_for == "a"


def test_candidate_times_out_and_campaigns_again() -> None:
    cluster = Cluster()
    cluster.isolated.update({"b", "c"})
    candidate = cluster.nodes["a"]
    for _ in range(6 * ELECTION):
        candidate.tick()
        cluster.settle()
    assert role(candidate) is Role.PRE_CANDIDATE
    assert candidate.term == 0
    cluster.isolated.clear()
    cluster.elect("a")
    assert candidate.term == 1


def test_candidate_yields_to_a_leader_of_its_term() -> None:
    node = RaftNode(config("a"), random.Random(3), voters={"a", "b", "c"})
    while role(node) is not Role.CANDIDATE:
        node.tick()
        if role(node) is Role.PRE_CANDIDATE:
            node.step(PreVoteResponse(G, "b", "a", node.term + 1, True))
    node.step(Heartbeat(G, "b", "a", node.term, 0))
    assert (node.role, node.leader) == (Role.FOLLOWER, "b")


# --- replication ----------------------------------------------------------------------------


def test_replication_applies_in_order_everywhere() -> None:
    cluster = Cluster()
    cluster.elect("a")
    for i in range(5):
        cluster.propose("a", f"v{i}".encode())
    cluster.tick(times=2)
    expected = [f"v{i}".encode() for i in range(5)]
    for node_id in cluster.nodes:
        assert cluster.data_applied(node_id) == expected
    assert cluster.nodes["a"].match_index("b") == 6
    assert cluster.nodes["a"].match_index("a") == 6
    assert cluster.nodes["a"].match_index("zz") is None
    assert cluster.nodes["b"].match_index("a") is None


def test_append_messages_respect_entry_and_byte_limits() -> None:
    cluster = Cluster(max_append_entries=2, max_append_bytes=10, max_inflight=1)
    cluster.elect("a")
    cluster.isolated.add("c")
    leader = cluster.nodes["a"]
    for i in range(6):
        leader.propose(b"%d" % i)
    leader.propose(b"x" * 30)  # larger than the byte limit: still sent, alone
    cluster.isolated.clear()
    cluster.tick(times=5)
    batches = [m.entries for m in cluster.sent_of(AppendEntries) if m.to == "c" and m.entries]
    assert all(len(b) <= 2 for b in batches)
    assert ((Entry(8, 1, EntryKind.DATA, b"x" * 30),)) in batches
    assert cluster.data_applied("c") == [*(b"%d" % i for i in range(6)), b"x" * 30]


def test_conflicting_suffix_is_truncated_and_persisted_as_such() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=2, commit=1),
        snapshot=None,
        entries=[
            Entry(1, 1, EntryKind.NOOP),
            Entry(2, 2, EntryKind.DATA, b"old2"),
            Entry(3, 2, EntryKind.DATA, b"old3"),
        ],
        voters={"a", "b", "c"},
    )
    new = (Entry(2, 3, EntryKind.NOOP), Entry(3, 3, EntryKind.DATA, b"new3"))
    follower.step(AppendEntries(G, "a", "b", 3, 1, 1, new, 3))
    ready = take_ready(follower)
    assert ready.truncate_after == 1
    assert ready.entries == new
    assert ready.messages == (AppendResponse(G, "b", "a", 3, True, 3),)
    assert [e.index for e in ready.committed] == [1, 2, 3]
    assert ready.hard_state == HardState(3, None, 3)
    # A retransmission changes nothing.
    follower.step(AppendEntries(G, "a", "b", 3, 1, 1, new, 3))
    ready = take_ready(follower)
    assert (ready.truncate_after, ready.entries) == (None, ())


def test_several_conflicts_in_one_ready_truncate_to_the_lowest_point() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=2, commit=1),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP)] + [Entry(i, 2, EntryKind.NOOP) for i in range(2, 5)],
        voters={"a", "b", "c"},
    )
    follower.step(AppendEntries(G, "a", "b", 3, 2, 2, (Entry(3, 3, EntryKind.NOOP),), 1))
    follower.step(AppendEntries(G, "c", "b", 4, 3, 3, (Entry(4, 4, EntryKind.NOOP),), 1))
    follower.step(AppendEntries(G, "c", "b", 4, 2, 2, (Entry(3, 4, EntryKind.NOOP),), 1))
    follower.step(AppendEntries(G, "c", "b", 4, 1, 1, (Entry(2, 4, EntryKind.NOOP),), 1))
    follower.step(AppendEntries(G, "c", "b", 4, 2, 4, (Entry(3, 4, EntryKind.NOOP),), 1))
    ready = take_ready(follower)
    assert ready.truncate_after == 1
    assert ready.entries == (Entry(2, 4, EntryKind.NOOP), Entry(3, 4, EntryKind.NOOP))
    assert [m.success for m in ready.messages if isinstance(m, AppendResponse)] == [True] * 5


def test_late_pre_vote_grants_from_an_earlier_campaign_do_not_count() -> None:
    node = RaftNode(config("a"), random.Random(3), voters={"a", "b", "c"})
    while role(node) is Role.FOLLOWER:
        node.tick()
    node.step(Heartbeat(G, "b", "a", 1, 0))  # a leader of term 1 appears
    while role(node) is Role.FOLLOWER:
        node.tick()
    assert (role(node), node.term) == (Role.PRE_CANDIDATE, 1)
    node.step(PreVoteResponse(G, "c", "a", 1, True))  # answers the campaign for term 1
    assert role(node) is Role.PRE_CANDIDATE
    node.step(PreVoteResponse(G, "c", "a", 2, True))
    assert (role(node), node.term) == (Role.CANDIDATE, 2)


def test_rejection_carries_a_hint_that_skips_a_term() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=3, commit=1),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP)] + [Entry(i, 2, EntryKind.NOOP) for i in range(2, 6)],
        voters={"a", "b", "c"},
    )
    follower.step(AppendEntries(G, "a", "b", 4, 7, 3, (), 1))  # beyond our log
    follower.step(AppendEntries(G, "a", "b", 4, 5, 3, (), 1))  # our entry 5 is of term 2
    assert take_ready(follower).messages == (
        AppendResponse(G, "b", "a", 4, False, 7, 5, 2),
        AppendResponse(G, "b", "a", 4, False, 5, 5, 2),
    )
    follower.step(AppendEntries(G, "a", "b", 4, 5, 1, (), 1))  # leader's 5 is of term 1
    assert take_ready(follower).messages == (AppendResponse(G, "b", "a", 4, False, 5, 1, 1),)


def test_leader_backtracks_over_a_diverged_follower() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("a")
    stale = cluster.nodes["a"]
    for i in range(5):
        stale.propose(b"lost%d" % i)  # never replicated: "a" is cut off
    cluster.settle()
    cluster.tick("b", "c", times=ELECTION)  # let the lease run out
    cluster.elect("b")
    for i in range(3):
        cluster.propose("b", b"kept%d" % i)
    cluster.isolated.clear()
    cluster.tick(times=3 * ELECTION)
    assert role(stale) is Role.FOLLOWER
    assert stale.leader == "b"
    assert cluster.data_applied("a") == [b"kept0", b"kept1", b"kept2"]
    assert cluster.disks["a"].entries == list(stale.entries(1))


def leader_with_old_entry(node_class: type[RaftNode]) -> RaftNode:
    node = node_class.restore(
        config("a"),
        random.Random(0),
        hard_state=HardState(term=3, voted_for=None, commit=1),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP), Entry(2, 2, EntryKind.DATA, b"t2")],
        voters={"a", "b", "c"},
    )
    while role(node) is Role.FOLLOWER:
        node.tick()
    node.step(PreVoteResponse(G, "b", "a", 4, True))
    node.step(VoteResponse(G, "b", "a", 4, True))
    assert role(node) is Role.LEADER
    assert node.term_at(3) == 4
    take_ready(node)
    node.step(AppendResponse(G, "b", "a", 4, True, 2))  # b holds the term-2 entry only
    return node


def test_old_entries_are_not_committed_by_counting_replicas() -> None:
    """Raft Figure 8: a leader must not commit an earlier term's entry by counting copies."""

    assert leader_with_old_entry(RaftNode).commit == 1

    class CountingCommit(RaftNode):
        def _commit_allowed(self, index: int) -> bool:
            return True  # the bug the rule prevents

    assert leader_with_old_entry(CountingCommit).commit == 2

    node = leader_with_old_entry(RaftNode)
    node.step(AppendResponse(G, "b", "a", 4, True, 3))  # the term-4 entry commits both
    assert node.commit == 3
    assert [e.index for e in take_ready(node).committed] == [2, 3]


def test_follower_with_a_longer_committed_prefix_skips_known_entries() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=1, commit=3),
        snapshot=None,
        entries=[Entry(i, 1, EntryKind.NOOP) for i in range(1, 4)],
        voters={"a", "b", "c"},
    )
    entries = tuple(Entry(i, 1, EntryKind.NOOP) for i in range(2, 6))
    follower.step(AppendEntries(G, "a", "b", 1, 1, 1, entries, 5))
    ready = take_ready(follower)
    assert [e.index for e in ready.entries] == [4, 5]
    assert ready.messages == (AppendResponse(G, "b", "a", 1, True, 5),)
    follower.step(AppendEntries(G, "a", "b", 1, 0, 0, (Entry(1, 1, EntryKind.NOOP),), 5))
    assert take_ready(follower).messages == (AppendResponse(G, "b", "a", 1, True, 5),)
    with pytest.raises(RemoteProtocolError):
        follower.step(AppendEntries(G, "a", "b", 1, 5, 1, (Entry(9, 1, EntryKind.NOOP),), 5))


def test_heartbeats_carry_commit_and_lost_appends_are_resent() -> None:
    cluster = Cluster(max_inflight=2)
    cluster.elect("a")
    leader = cluster.nodes["a"]
    leader.propose(b"1")
    leader.propose(b"2")
    leader.propose(b"3")
    cluster.drain("a")
    cluster.queue.clear()  # every append is lost
    cluster.tick(times=3)
    assert cluster.data_applied("b") == [b"1", b"2", b"3"]
    assert cluster.sent_of(HeartbeatResponse)


def test_check_quorum_makes_a_cut_off_leader_step_down() -> None:
    cluster = Cluster()
    leader = cluster.elect("a")
    cluster.isolated.add("a")
    cluster.tick("a", times=ELECTION // 2)
    assert role(leader) is Role.LEADER
    cluster.tick("a", times=2 * ELECTION)  # the check runs once per election timeout
    assert role(leader) is Role.FOLLOWER
    assert leader.leader is None
    with pytest.raises(NotLeaderError) as caught:
        leader.propose(b"x")
    assert caught.value.leader is None


# --- proposals ------------------------------------------------------------------------------


def test_followers_refuse_proposals_with_a_leader_hint() -> None:
    cluster = Cluster()
    cluster.elect("a")
    with pytest.raises(NotLeaderError) as caught:
        cluster.nodes["b"].propose(b"x")
    assert caught.value.leader == "a"
    follower = cluster.nodes["b"]
    with pytest.raises(NotLeaderError):
        follower.add_voter("d")
    with pytest.raises(NotLeaderError):
        follower.remove_voter("c")
    with pytest.raises(NotLeaderError):
        follower.transfer_leadership("c")


def test_proposals_are_bounded() -> None:
    cluster = Cluster(max_uncommitted_entries=3, max_entry_bytes=8)
    cluster.elect("a")
    cluster.tick(times=2)
    cluster.isolated.update({"b", "c"})
    leader = cluster.nodes["a"]
    with pytest.raises(ProposalDroppedError, match="max_entry_bytes"):
        leader.propose(b"123456789")
    for _ in range(3):
        leader.propose(b"x")
    with pytest.raises(ProposalDroppedError, match="uncommitted"):
        leader.propose(b"x")
    cluster.isolated.clear()
    cluster.tick(times=2)
    assert leader.propose(b"y") == 5


# --- snapshots ------------------------------------------------------------------------------


def test_compaction_and_install_snapshot_for_a_lagging_follower() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("c")
    for i in range(6):
        cluster.propose("a", b"%d" % i)
    cluster.tick("a", "b", times=2)
    leader = cluster.nodes["a"]
    assert leader.applied == 7
    snapshot = leader.compact(5, b"state-through-5")
    assert snapshot == Snapshot(5, 1, frozenset("abc"), b"state-through-5")
    assert leader.first_index == 6
    assert leader.term_at(4) is None
    assert leader.entries(1) == leader.entries(6)
    with pytest.raises(ValueError, match="compact only"):
        leader.compact(5, b"")
    with pytest.raises(ValueError, match="compact only"):
        leader.compact(8, b"")

    cluster.isolated.clear()
    cluster.tick(times=3)
    follower = cluster.nodes["c"]
    assert cluster.restored["c"] == [snapshot]
    assert cluster.sent_of(InstallSnapshot)
    assert cluster.data_applied("c") == [b"4", b"5"]  # the rest came in the snapshot
    assert (follower.commit, follower.applied, follower.snapshot) == (7, 7, snapshot)
    assert cluster.disks["c"].snapshot == snapshot
    assert [e.index for e in cluster.disks["c"].entries] == [6, 7]
    # A duplicate of the snapshot is acknowledged without reinstalling it.
    follower.step(InstallSnapshot(G, "a", "c", 1, snapshot))
    ready = take_ready(follower)
    assert ready.snapshot is None
    assert ready.messages == (AppendResponse(G, "c", "a", 1, True, 7),)


def test_a_node_is_in_touch_while_it_hears_a_leader() -> None:
    cluster = Cluster(("a", "b", "c"))

    def touch(node_id: str) -> bool:  # (a call: mypy does not narrow it across ticks)
        return cluster.nodes[node_id].in_touch

    assert not any(node.in_touch for node in cluster.nodes.values())  # no leader yet
    cluster.elect("a")
    assert all(node.in_touch for node in cluster.nodes.values())
    cluster.isolated = {"c"}
    cluster.tick("a", "b", times=ELECTION - 1)
    cluster.tick("c", times=ELECTION - 1)
    assert touch("c")  # not yet an election timeout without a word
    cluster.tick("c")
    assert not touch("c")
    assert touch("b")  # b heard the leader all along
    cluster.isolated = set()
    cluster.tick("a", times=2)
    assert touch("c")

    # Muted: c hears the leader, the leader never hears c. Heartbeats still come, entries
    # no longer (c is not acknowledged): once c lacks what the leader had committed
    # IN_TOUCH_ELECTIONS election timeouts ago, it is not in touch, however recently it
    # heard the leader.
    cluster.drop = lambda message: message.sender == "c"
    for n in range((raft.IN_TOUCH_ELECTIONS + 1) * ELECTION):  # (max_inflight get through)
        cluster.propose("a", b"w%d" % n)
        cluster.tick()
    assert cluster.nodes["c"].leader == "a"
    assert cluster.nodes["c"].applied < cluster.nodes["a"].commit
    assert not touch("c")
    assert touch("b")
    cluster.drop = None
    cluster.tick(times=3)
    assert cluster.nodes["c"].applied == cluster.nodes["a"].commit
    assert touch("c")


def test_a_node_back_from_a_silence_is_in_touch_only_once_caught_up() -> None:
    cluster = Cluster(("a", "b", "c"))
    cluster.add("d", frozenset("abc"))  # a learner: it never campaigns, keeps its leader
    leader = cluster.nodes["a"]
    leader.set_learners({"d"})
    cluster.elect("a")
    cluster.propose("a", b"x")
    cluster.tick(times=2)
    learner = cluster.nodes["d"]

    def touch(node: RaftNode) -> bool:  # (a call: mypy does not narrow it across steps)
        return node.in_touch

    assert touch(learner)
    cluster.isolated = {"d"}
    for n in range(2 * ELECTION):
        cluster.propose("a", b"y%d" % n)
        cluster.tick()
    assert learner.leader == "a"
    assert not touch(learner)  # silent for longer than an election timeout
    # The leader's first word after the silence: what d sampled before says nothing of now.
    learner.step(Heartbeat(G, "a", "d", leader.term, 0, leader.commit))
    take_ready(learner)
    assert learner.applied < leader.commit
    assert not touch(learner)
    cluster.isolated = set()
    cluster.tick(times=2)
    assert learner.applied == leader.commit
    assert touch(learner)

    # Restarted with what it had on disk (same term), it ticks before its links are up.
    restarted = RaftNode.restore(
        config("d"),
        random.Random(1),
        hard_state=HardState(leader.term, None, 2),
        snapshot=None,
        entries=leader.entries(1, 3),
        voters=frozenset("abc"),
    )
    for _ in range(3):
        restarted.tick()
    restarted.step(Heartbeat(G, "a", "d", leader.term, 2, leader.commit))
    take_ready(restarted)
    assert restarted.applied == 2 < leader.commit
    assert not touch(restarted)


def test_a_heartbeat_from_a_node_without_leader_commit_still_parses() -> None:
    wire = raft.message_to_wire(Heartbeat(G, "a", "b", 3, 1, 9))
    del wire["leader_commit"]  # what a node of the version before sends
    assert raft.message_from_wire(wire) == Heartbeat(G, "a", "b", 3, 1, 0)


def test_a_node_that_knows_no_voters_yet_does_not_compact() -> None:
    # A joiner starts knowing no voters and learns them from configuration entries; a snapshot
    # of the prefix before any such entry could not say who votes, so none is made.
    cluster = Cluster(("a", "b", "c"))
    cluster.add("d", frozenset())
    cluster.nodes["a"].set_learners({"d"})
    cluster.elect("a")
    cluster.propose("a", b"x")
    joiner = cluster.nodes["d"]
    assert cluster.data_applied("d") == [b"x"]
    with pytest.raises(ValueError, match="voters at 2 are not known"):
        joiner.compact(joiner.applied, b"")
    assert joiner.snapshot.index == 0
    assert cluster.nodes["a"].compact(2, b"s").voters == frozenset("abc")


def test_snapshot_of_entries_already_held_only_advances_commit() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=1),
        snapshot=None,
        entries=[Entry(i, 1, EntryKind.NOOP) for i in range(1, 4)],
        voters={"a", "b"},
    )
    follower.step(InstallSnapshot(G, "a", "b", 1, Snapshot(2, 1, frozenset("ab"), b"s")))
    ready = take_ready(follower)
    assert ready.snapshot is None
    assert follower.commit == 2
    assert [e.index for e in ready.committed] == [1, 2]


def test_lost_snapshot_is_resent() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("c")
    for i in range(3):
        cluster.propose("a", b"%d" % i)
    cluster.tick("a", "b", times=2)
    leader = cluster.nodes["a"]
    leader.compact(leader.applied, b"s")
    cluster.isolated.clear()
    cluster.drop = lambda m: isinstance(m, InstallSnapshot)
    cluster.tick(times=3)
    assert len(cluster.sent_of(InstallSnapshot)) == 1
    cluster.drop = None
    cluster.tick(times=ELECTION)
    assert cluster.nodes["c"].commit == leader.commit
    assert len(cluster.sent_of(InstallSnapshot)) >= 2


def test_snapshot_install_discards_a_pending_truncation_safely() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=2, commit=1),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP), Entry(2, 2, EntryKind.NOOP)],
        voters={"a", "b", "c"},
    )
    follower.step(AppendEntries(G, "a", "b", 3, 1, 1, (Entry(2, 3, EntryKind.NOOP),), 1))
    snap = Snapshot(4, 3, frozenset("abc"), b"s")
    follower.step(InstallSnapshot(G, "a", "b", 3, snap))
    ready = take_ready(follower)
    # Order of duties: truncate, then install, then append.
    assert (ready.truncate_after, ready.snapshot, ready.entries) == (1, snap, ())
    assert follower.first_index == 5
    disk = Disk()
    disk.entries = [Entry(1, 1, EntryKind.NOOP), Entry(2, 2, EntryKind.NOOP)]
    disk.truncate_after(1)
    disk.install_snapshot(snap)
    assert (disk.base, disk.last_index) == (4, 4)


# --- leadership transfer --------------------------------------------------------------------


def test_leadership_transfer_catches_up_the_target_and_skips_pre_vote() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("b")
    cluster.propose("a", b"x")
    cluster.isolated.clear()
    leader = cluster.nodes["a"]
    pre_votes_before = len(cluster.sent_of(PreVoteRequest))
    leader.transfer_leadership("b")
    assert leader.transferee == "b"
    with pytest.raises(ProposalDroppedError, match="transferred"):
        leader.propose(b"y")
    leader.transfer_leadership("b")  # repeated: no-op
    cluster.settle()
    assert role(cluster.nodes["b"]) is Role.LEADER
    assert cluster.nodes["b"].term == 2
    assert role(leader) is Role.FOLLOWER
    assert len(cluster.sent_of(TimeoutNow)) == 1
    assert len(cluster.sent_of(PreVoteRequest)) == pre_votes_before
    assert all(m.transfer for m in cluster.sent_of(VoteRequest) if m.term == 2)


def test_transfer_to_a_caught_up_target_is_immediate_and_to_self_is_a_no_op() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.tick(times=2)
    leader = cluster.nodes["a"]
    leader.transfer_leadership("a")
    assert leader.transferee is None
    with pytest.raises(ValueError, match="not a voter"):
        leader.transfer_leadership("zz")
    leader.transfer_leadership("c")
    cluster.settle()
    assert role(cluster.nodes["c"]) is Role.LEADER


def test_transfer_is_abandoned_after_an_election_timeout() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolated.add("b")
    leader = cluster.nodes["a"]
    leader.propose(b"x")
    leader.transfer_leadership("b")
    cluster.tick("a", "c", times=ELECTION - 1)
    assert leader.transferee == "b"
    cluster.tick("a", "c")
    assert transferee(leader) is None
    assert role(leader) is Role.LEADER
    leader.propose(b"y")


# --- membership -----------------------------------------------------------------------------


def test_add_a_voter_one_at_a_time() -> None:
    with pytest.raises(ProposalDroppedError, match="not committed an entry"):
        leader_with_old_entry(RaftNode).add_voter("d")  # its empty entry is not committed yet
    cluster = Cluster()
    cluster.elect("a")
    leader = cluster.nodes["a"]
    cluster.tick(times=2)
    cluster.propose("a", b"before")
    newcomer = cluster.add("d")
    assert newcomer.voters == frozenset()
    for _ in range(3 * ELECTION):
        newcomer.tick()  # not a voter: never campaigns
    assert role(newcomer) is Role.FOLLOWER
    index = leader.add_voter("d")
    assert leader.voters == frozenset("abcd")  # effective once appended
    with pytest.raises(ProposalDroppedError, match="membership change"):
        leader.add_voter("e")
    with pytest.raises(ValueError, match="already a voter"):
        leader.add_voter("b")
    with pytest.raises(ValueError, match="bad node id"):
        leader.add_voter("x,y")
    cluster.tick(times=3)
    assert leader.commit >= index
    assert newcomer.voters == frozenset("abcd")
    assert cluster.data_applied("d") == [b"before"]
    config_entries = [e for e in cluster.applied["d"] if e.kind is EntryKind.CONFIG]
    assert [e.voters() for e in config_entries] == [frozenset("abcd")]
    with pytest.raises(ValueError, match="not a config"):
        cluster.applied["d"][0].voters()
    # Now four voters: two can no longer commit alone.
    cluster.isolated.update({"c", "d"})
    blocked = leader.propose(b"needs three")
    cluster.tick("a", "b", times=2)
    assert leader.commit < blocked


def test_removing_the_leader_hands_over_after_the_removal_commits() -> None:
    cluster = Cluster()
    cluster.elect("a")
    cluster.tick(times=2)
    leader = cluster.nodes["a"]
    with pytest.raises(ValueError, match="not a voter"):
        leader.remove_voter("zz")
    leader.remove_voter("a")
    assert leader.voters == frozenset("bc")
    cluster.settle()
    assert role(leader) is Role.FOLLOWER
    cluster.tick("b", "c", times=3 * ELECTION)
    new_leader = next(n for n in cluster.nodes.values() if role(n) is Role.LEADER)
    assert new_leader.id in {"b", "c"}
    assert new_leader.voters == frozenset("bc")
    cluster.tick(times=5 * ELECTION)
    assert role(leader) is Role.FOLLOWER  # the removed node never campaigns
    assert role(new_leader) is Role.LEADER


def test_cannot_remove_the_last_voter() -> None:
    cluster = Cluster(("a",))
    leader = cluster.elect("a")
    with pytest.raises(ValueError, match="last voter"):
        leader.remove_voter("a")


def test_truncating_an_uncommitted_config_entry_reverts_the_configuration() -> None:
    follower = RaftNode.restore(
        config("b"),
        random.Random(0),
        hard_state=HardState(term=2, commit=1),
        snapshot=None,
        entries=[
            Entry(1, 1, EntryKind.NOOP),
            Entry(2, 2, EntryKind.CONFIG, raft.encode_voters({"a", "b", "c", "d"})),
        ],
        voters={"a", "b", "c"},
    )
    assert follower.voters == frozenset("abcd")
    follower.step(AppendEntries(G, "a", "b", 3, 1, 1, (Entry(2, 3, EntryKind.NOOP),), 1))
    assert follower.voters == frozenset("abc")


# --- restart --------------------------------------------------------------------------------


def test_restore_rebuilds_a_node_from_what_was_persisted() -> None:
    cluster = Cluster()
    cluster.elect("a")
    for i in range(4):
        cluster.propose("a", b"%d" % i)
    cluster.tick(times=2)
    b = cluster.nodes["b"]
    b.compact(3, b"state3")
    disk = cluster.disks["b"]
    disk.save_snapshot(b.snapshot)
    restored = RaftNode.restore(
        config("b"),
        random.Random(9),
        hard_state=disk.hard_state,
        snapshot=disk.snapshot,
        entries=disk.entries,
    )
    assert (restored.term, restored.voted_for, restored.commit) == (1, "a", 5)
    assert restored.voters == frozenset("abc")
    assert restored.entries(1) == b.entries(1)
    assert restored.applied == 3
    ready = take_ready(restored)
    assert ready.hard_state is None
    assert [e.index for e in ready.committed] == [4, 5]  # re-delivered after the snapshot
    partly = RaftNode.restore(
        config("b"),
        random.Random(9),
        hard_state=disk.hard_state,
        snapshot=disk.snapshot,
        entries=disk.entries,
        applied=4,
    )
    assert [e.index for e in take_ready(partly).committed] == [5]


def test_restore_clamps_a_commit_index_beyond_the_log() -> None:
    node = RaftNode.restore(
        config("a"),
        random.Random(0),
        hard_state=HardState(term=1, commit=9),
        snapshot=None,
        entries=[Entry(1, 1, EntryKind.NOOP)],
        voters={"a", "b", "c"},
    )
    assert node.commit == 1
    assert take_ready(node).hard_state == HardState(1, None, 1)
    with pytest.raises(ValueError, match="follow on"):
        RaftNode.restore(
            config("a"),
            random.Random(0),
            hard_state=HardState(),
            snapshot=None,
            entries=[Entry(2, 1, EntryKind.NOOP)],
        )


def test_apply_batches_are_bounded() -> None:
    node = RaftNode.restore(
        config("a", max_apply_entries=2),
        random.Random(0),
        hard_state=HardState(term=1, commit=5),
        snapshot=None,
        entries=[Entry(i, 1, EntryKind.NOOP) for i in range(1, 6)],
        voters={"a"},
    )
    batches = []
    while node.has_ready():
        batches.append([e.index for e in take_ready(node).committed])
    assert batches == [[1, 2], [3, 4], [5]]


# --- the driver contract and the wire form --------------------------------------------------


def test_no_input_while_a_ready_is_outstanding() -> None:
    node = RaftNode(config("a"), random.Random(0), voters={"a"})
    node.tick()
    ready = node.ready()
    for call in (
        node.tick,
        lambda: node.step(Heartbeat(G, "b", "a", 1, 0)),
        lambda: node.propose(b"x"),
        node.ready,
        lambda: node.compact(1, b""),
    ):
        with pytest.raises(RaftUsageError):
            call()
    assert not node.has_ready()
    with pytest.raises(RaftUsageError):
        node.advance(Ready(None, None, None, (), (), (), None))
    node.advance(ready)
    with pytest.raises(RaftUsageError, match="stepped into"):
        node.step(Heartbeat(G, "b", "elsewhere", 1, 0))
    with pytest.raises(RaftUsageError, match="stepped into"):
        node.step(Heartbeat("other-group", "b", "a", 1, 0))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="node id"):
        RaftConfig(node_id="a,b", group=G)
    with pytest.raises(ValueError, match="heartbeat"):
        RaftConfig(node_id="a", group=G, election_ticks=2, heartbeat_ticks=2)
    with pytest.raises(ValueError, match="heartbeat"):  # a skipped heartbeat: 6 ticks' silence
        RaftConfig(node_id="a", group=G, election_ticks=6, heartbeat_ticks=3)
    with pytest.raises(ValueError, match="limit"):
        RaftConfig(node_id="a", group=G, max_inflight=0)
    node = Cluster(("a",), max_snapshot_bytes=4).elect("a")
    take_ready(node)
    with pytest.raises(ValueError, match="max_snapshot_bytes"):
        node.compact(1, b"12345")


def test_every_message_survives_the_wire_form_through_msgpack() -> None:
    entries = (Entry(3, 2, EntryKind.DATA, b"\x00x"), Entry(4, 2, EntryKind.CONFIG, b"a,b"))
    snapshot = Snapshot(9, 2, frozenset("ab"), b"state")
    messages: list[Message] = [
        PreVoteRequest(G, "a", "b", 3, 10, 2),
        PreVoteResponse(G, "b", "a", 3, True),
        VoteRequest(G, "a", "b", 3, 10, 2, True),
        VoteResponse(G, "b", "a", 3, False),
        AppendEntries(G, "a", "b", 3, 2, 2, entries, 1),
        AppendResponse(G, "b", "a", 3, False, 2, 1, 1),
        Heartbeat(G, "a", "b", 3, 1),
        HeartbeatResponse(G, "b", "a", 3),
        InstallSnapshot(G, "a", "b", 3, snapshot),
        TimeoutNow(G, "a", "b", 3),
    ]
    for message in messages:
        wire = msgpack.unpackb(msgpack.packb(message_to_wire(message)))
        assert message_from_wire(wire) == message


@pytest.mark.parametrize(
    "wire",
    [
        {},
        {"type": "Nope"},
        {"type": "Heartbeat", "group": G, "sender": "a", "to": "b", "term": 1},
        {"type": "Heartbeat", "group": G, "sender": "a", "to": "b", "term": -1, "commit": 0},
        {"type": "Heartbeat", "group": 1, "sender": "a", "to": "b", "term": 1, "commit": 0},
        {"type": "Heartbeat", "group": G, "sender": "a", "to": "b", "term": True, "commit": 0},
        {"type": "VoteResponse", "group": G, "sender": "a", "to": "b", "term": 1, "granted": 1},
        {
            "type": "AppendEntries",
            "group": G,
            "sender": "a",
            "to": "b",
            "term": 1,
            "prev_index": 0,
            "prev_term": 0,
            "commit": 0,
            "entries": [[1, 1, "bogus", b""]],
        },
        {
            "type": "AppendEntries",
            "group": G,
            "sender": "a",
            "to": "b",
            "term": 1,
            "prev_index": 0,
            "prev_term": 0,
            "commit": 0,
            "entries": [[1, 1, "data", 10**12]],
        },
        {
            "type": "InstallSnapshot",
            "group": G,
            "sender": "a",
            "to": "b",
            "term": 1,
            "snapshot": [1, 1, [1], b""],
        },
    ],
)
def test_malformed_wire_messages_are_remote_errors(wire: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        message_from_wire(wire)


def append_wire(entries: list[list[Any]], term: int = 1) -> dict[str, Any]:
    return {
        "type": "AppendEntries",
        "group": G,
        "sender": "a",
        "to": "b",
        "term": term,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": entries,
    }


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (append_wire([[1, 1, "data", b""]], term=2**63), "2\\*\\*62"),  # would overflow
        (append_wire([[0, 1, "data", b""]]), "entry index 0"),
        (append_wire([[1, 1, "config", b"\xff\xfe"]]), "not UTF-8"),
        (append_wire([[1, 1, "config", b""]]), "without voters"),
        (append_wire([[1, 1, "config", b"a,,b"]]), "without voters"),
        (append_wire([[i, 1, "noop", b""] for i in range(1, 5000)]), "more than 4096"),
    ],
)
def test_a_peer_cannot_hand_over_entries_that_would_break_the_log(
    wire: dict[str, Any], why: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        message_from_wire(wire)


def test_entries_too_large_or_from_the_future_are_refused_before_the_log() -> None:
    node = RaftNode(RaftConfig("b", G, max_entry_bytes=8), random.Random(1), voters=("a", "b"))
    big = AppendEntries(G, "a", "b", 1, 0, 0, (Entry(1, 1, EntryKind.DATA, b"x" * 9),), 0)
    with pytest.raises(RemoteProtocolError, match="larger than 8 bytes"):
        node.step(big)
    future = AppendEntries(G, "a", "b", 1, 0, 0, (Entry(1, 2, EntryKind.NOOP),), 0)
    with pytest.raises(RemoteProtocolError, match="future term"):
        node.step(future)
    assert node.last_index == 0


def test_the_core_imports_no_io() -> None:
    tree = ast.parse(Path(raft.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported
    assert not imported & {"trio", "socket", "time", "random", "os", "asyncio", "threading"}


# --- learners -------------------------------------------------------------------------------


def test_a_learner_gets_every_entry_but_neither_votes_nor_counts() -> None:
    cluster = Cluster(("a", "b", "c"))
    cluster.add("d", frozenset({"a", "b", "c"}))  # d knows the voters; it is not one
    cluster.nodes["a"].set_learners({"d", "a"})  # (the leader itself is ignored)
    leader = cluster.elect("a")
    assert leader.learners == frozenset({"d"})
    cluster.propose("a", b"x")
    assert cluster.data_applied("d") == [b"x"]
    # Commit needs a majority of the voters: the learner's ack does not count.
    cluster.isolated = {"b", "c"}
    index = cluster.propose("a", b"y")
    assert leader.commit < index
    assert cluster.nodes["d"].last_index == index  # it has the entry all the same
    cluster.isolated = set()
    cluster.tick("a")  # b and c were sent the entry since the last tick: no heartbeat yet
    assert leader.commit < index
    cluster.tick("a")  # the heartbeats' answers show them behind; the entry goes again
    assert leader.commit == index
    # A learner never campaigns, whatever its timer says, and cannot be handed leadership.
    cluster.isolated = {"a"}
    cluster.tick("d", times=3 * ELECTION)
    assert role(cluster.nodes["d"]) is Role.FOLLOWER
    assert all(m.sender != "d" for m in cluster.sent_of(PreVoteRequest))
    cluster.isolated = set()
    with pytest.raises(ValueError, match="not a voter"):
        leader.transfer_leadership("d")


def test_learners_change_while_leading() -> None:
    cluster = Cluster(("a", "b", "c"))
    leader = cluster.elect("a")
    cluster.add("d", frozenset({"a", "b", "c"}))
    cluster.propose("a", b"before")
    leader.set_learners({"d"})
    cluster.tick("a")
    assert cluster.data_applied("d") == [b"before"]  # caught up from the start
    leader.set_learners(set())
    cluster.propose("a", b"after")
    assert cluster.data_applied("d") == [b"before"]  # no longer replicated to
