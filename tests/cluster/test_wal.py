"""NodeWal: every group's Raft state in one log, one fdatasync per cycle, survives reopening."""

from __future__ import annotations

import random
import threading
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio

from villaged.cluster.persist import GroupStorage, PersistedState
from villaged.cluster.raft import (
    Entry,
    EntryKind,
    HardState,
    Message,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    Snapshot,
)
from villaged.cluster.wal import NodeWal, WalError, WalGroupStorage, WalMismatchError
from villaged.storage.log import OsFileOps

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


class CountingOps(OsFileOps):
    """Counts the log's syncs (called from worker threads)."""

    def __init__(self) -> None:
        self.fdatasyncs = 0
        self._lock = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self.fdatasyncs += 1
        super().fdatasync(fd)


@asynccontextmanager
async def opened(directory: Path, **kwargs: Any) -> AsyncIterator[NodeWal]:
    wal = await trio.to_thread.run_sync(partial(NodeWal.open, directory, **kwargs))
    async with trio.open_nursery() as nursery:
        await nursery.start(wal.run)
        try:
            yield wal
        finally:
            wal.close()


def ready(
    *,
    entries: tuple[Entry, ...] = (),
    hard_state: HardState | None = None,
    truncate_after: int | None = None,
    snapshot: Snapshot | None = None,
) -> Ready:
    return Ready(hard_state, truncate_after, snapshot, entries, (), (), None)


def data_entries(first: int, last: int, term: int, tag: str = "") -> tuple[Entry, ...]:
    return tuple(
        Entry(i, term, EntryKind.DATA, f"{tag}e{i}t{term}".encode()) for i in range(first, last + 1)
    )


def segment_files(wal_dir: Path) -> list[Path]:
    return sorted((wal_dir / "log").glob("*.seg"))


async def load_all(wal: NodeWal) -> dict[str, PersistedState]:
    return {g: await trio.to_thread.run_sync(wal.load, g) for g in sorted(wal.groups)}


def node_state(node: RaftNode) -> tuple[HardState, int, int, tuple[Entry, ...]]:
    return (
        HardState(node.term, node.voted_for, node.commit),
        node.snapshot.index,
        node.snapshot.term,
        node.entries(node.first_index),
    )


def durable_matches(durable: HardState, node: RaftNode) -> bool:
    """The WAL holds the core's term and vote; its commit index may lag (it is volatile in
    Raft, and a commit-only change waits for a batch that is written anyway), never lead."""
    return (durable.term, durable.voted_for) == (node.term, node.voted_for) and (
        durable.commit <= node.commit
    )


def restore(node_id: str, group: str, state: PersistedState, voters: frozenset[str]) -> RaftNode:
    return RaftNode.restore(
        RaftConfig(node_id, group),
        random.Random(0),
        hard_state=state.hard_state,
        snapshot=state.snapshot,
        entries=state.entries,
        voters=voters,
    )


# --- one fdatasync per cycle -----------------------------------------------------------------

GROUPS = [f"shard{i:02d}" for i in range(16)] + ["meta"]


def drive_single_voter_groups(nodes: dict[str, RaftNode], step: int) -> dict[str, Ready]:
    """One cycle's inputs for 17 single-voter groups: ticks until leader, then proposals."""
    for name, node in nodes.items():
        if node.role is Role.LEADER:
            node.propose(f"{name}:{step}".encode())
        else:
            node.tick()
    return {name: node.ready() for name, node in nodes.items() if node.has_ready()}


async def test_seventeen_groups_share_one_fdatasync_per_cycle(tmp_path: Path) -> None:
    ops = CountingOps()
    nodes = {
        g: RaftNode(RaftConfig("n1", g), random.Random(i), voters={"n1"})
        for i, g in enumerate(GROUPS)
    }
    syncs_per_cycle: list[int] = []
    async with opened(tmp_path / "wal", file_ops=ops) as wal:
        for step in range(40):
            readies = drive_single_voter_groups(nodes, step)
            while readies:
                before = ops.fdatasyncs, wal.log.batches_written
                await wal.persist_many(readies)
                writes = any(r.entries or r.hard_state for r in readies.values())
                syncs = ops.fdatasyncs - before[0]
                assert wal.log.batches_written - before[1] == (1 if writes else 0)
                if len(readies) == len(GROUPS) and writes:
                    syncs_per_cycle.append(syncs)
                for name, rd in readies.items():
                    nodes[name].advance(rd)
                readies = {n: node.ready() for n, node in nodes.items() if node.has_ready()}
        assert all(node.role is Role.LEADER for node in nodes.values())
        assert all(node.commit > 20 for node in nodes.values())
        assert syncs_per_cycle
        assert set(syncs_per_cycle) == {1}
        for name, node in nodes.items():
            assert durable_matches(wal.hard_state(name), node)
            assert wal.last_index(name) == node.last_index

    async with opened(tmp_path / "wal") as wal:
        states = await load_all(wal)
    assert set(states) == set(GROUPS)
    for name, node in nodes.items():
        state = states[name]
        assert state.entries == node.entries(1)
        restored = restore("n1", name, state, frozenset({"n1"}))
        assert node_state(restored)[1:] == node_state(node)[1:]
        assert durable_matches(node_state(restored)[0], node)


async def test_per_group_storage_pays_a_sync_per_group(tmp_path: Path) -> None:
    """The baseline: the same cycles through GroupStorage cost one fdatasync per group."""
    nodes = {
        g: RaftNode(RaftConfig("n1", g), random.Random(i), voters={"n1"})
        for i, g in enumerate(GROUPS)
    }
    storages = {g: await trio.to_thread.run_sync(GroupStorage.open, tmp_path / g) for g in GROUPS}
    per_cycle: list[int] = []
    async with trio.open_nursery() as nursery:
        for storage in storages.values():
            await nursery.start(storage.run)
        for step in range(40):
            readies = drive_single_voter_groups(nodes, step)
            while readies:
                before = sum(s.log.batches_written + s.hard_state_writes for s in storages.values())
                async with trio.open_nursery() as inner:
                    for name, rd in readies.items():
                        inner.start_soon(storages[name].persist, rd)
                after = sum(s.log.batches_written + s.hard_state_writes for s in storages.values())
                if len(readies) == len(GROUPS) and any(r.entries for r in readies.values()):
                    per_cycle.append(after - before)
                for name, rd in readies.items():
                    nodes[name].advance(rd)
                readies = {n: node.ready() for n, node in nodes.items() if node.has_ready()}
        for storage in storages.values():
            storage.close()
    # Each group: one log batch (fdatasync), and a hard-state file (fsync + dir fsync) most cycles.
    assert min(per_cycle) >= len(GROUPS)


async def test_a_commit_that_moved_alone_costs_no_sync_and_rides_with_the_next_batch(
    tmp_path: Path,
) -> None:
    ops = CountingOps()
    async with opened(tmp_path, file_ops=ops) as wal:
        await wal.persist(
            "a", ready(entries=data_entries(1, 5, 1), hard_state=HardState(1, "n1", 2))
        )
        syncs, batches = ops.fdatasyncs, wal.log.batches_written
        # Only the commit index moved: nothing is written, nothing synced.
        await wal.persist("a", ready(hard_state=HardState(1, "n1", 4)))
        assert (ops.fdatasyncs, wal.log.batches_written) == (syncs, batches)
        assert wal.hard_state("a") == HardState(1, "n1", 2)
        assert wal.commit_only_deferred == 1
        # A new term (or vote) is written at once, commit included; and the core, which
        # counts a Ready's hard state as persisted, never hands "a"'s again: the pending one
        # rides along with this batch.
        await wal.persist("b", ready(hard_state=HardState(3, None, 0)))
        assert wal.log.batches_written == batches + 1
        assert wal.hard_state("a") == HardState(1, "n1", 4)
        # A later commit replaces the pending one; a batch of another group carries it.
        await wal.persist("a", ready(hard_state=HardState(1, "n1", 5)))
        await wal.persist("b", ready(entries=data_entries(1, 1, 3)))
        assert wal.log.batches_written == batches + 2
    async with opened(tmp_path) as wal:
        states = await load_all(wal)
    assert states["a"].hard_state == HardState(1, "n1", 5)
    assert states["b"].hard_state == HardState(3, None, 0)


async def test_with_real_readies_the_durable_commit_keeps_up_with_the_entries(
    tmp_path: Path,
) -> None:
    # Three voters, one proposal at a time: the leader's and the followers' commits move in
    # Readies of their own (the commit notices), which are not written alone; each durable
    # commit is at most one step behind, carried by the next entry's batch.
    ids = ("n1", "n2", "n3")
    nodes = {
        i: RaftNode(RaftConfig(i, "a"), random.Random(k), voters=set(ids))
        for k, i in enumerate(ids)
    }
    network: list[Message] = []
    async with AsyncExitStack() as stack:
        wals = {i: await stack.enter_async_context(opened(tmp_path / i)) for i in ids}

        async def settle() -> None:
            for _ in range(100):
                for i, node in nodes.items():
                    while node.has_ready():
                        rd = node.ready()
                        await wals[i].persist("a", rd)
                        network.extend(rd.messages)
                        node.advance(rd)
                if not network:
                    return
                batch, network[:] = list(network), []
                for message in batch:
                    nodes[message.to].step(message)

        for _ in range(40):
            for node in nodes.values():
                node.tick()
            await settle()
            leader = next((n for n in nodes.values() if n.role is Role.LEADER), None)
            if leader is not None:
                leader.propose(b"x")
                await settle()
        assert all(node.commit > 10 for node in nodes.values())
        assert sum(wal.commit_only_deferred for wal in wals.values()) > 10
        for i, node in nodes.items():
            assert node.commit - wals[i].hard_state("a").commit <= 1
    for i, node in nodes.items():
        async with opened(tmp_path / i) as wal:
            assert node.commit - (await load_all(wal))["a"].hard_state.commit <= 1


# --- truncation, snapshots, mismatches ---------------------------------------------------------


async def test_truncating_one_group_leaves_the_others_alone(tmp_path: Path) -> None:
    async with opened(tmp_path) as wal:
        await wal.persist_many(
            {
                "a": ready(entries=data_entries(1, 5, 1, "a"), hard_state=HardState(1, "n1", 2)),
                "b": ready(entries=data_entries(1, 5, 1, "b"), hard_state=HardState(1, "n2", 5)),
            }
        )
        await wal.persist_many(
            {
                "a": ready(truncate_after=2, entries=data_entries(3, 4, 2, "a")),
                "b": ready(entries=data_entries(6, 7, 1, "b")),
            }
        )
        # Truncate a suffix without new entries too.
        await wal.persist("a", ready(truncate_after=3, hard_state=HardState(2, None, 2)))
        live = await load_all(wal)
    expected_a = data_entries(1, 2, 1, "a") + data_entries(3, 3, 2, "a")
    expected_b = data_entries(1, 7, 1, "b")
    async with opened(tmp_path) as wal:
        states = await load_all(wal)
    assert states == live
    assert states["a"] == PersistedState(HardState(2, None, 2), None, expected_a)
    assert states["b"] == PersistedState(HardState(1, "n2", 5), None, expected_b)


async def test_a_ready_that_does_not_fit_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as wal:
        await wal.persist("a", ready(entries=data_entries(1, 3, 1)))
        batches = wal.log.batches_written
        with pytest.raises(WalMismatchError, match="does not continue"):
            await wal.persist_many(
                {
                    "b": ready(entries=data_entries(1, 2, 1)),
                    "a": ready(entries=data_entries(5, 5, 1)),
                }
            )
        await wal.persist("a", ready(snapshot=Snapshot(3, 1, frozenset({"n1"}), b"s")))
        with pytest.raises(WalMismatchError, match="below the snapshot"):
            await wal.persist("a", ready(truncate_after=1))
        with pytest.raises(WalMismatchError, match="at or below"):
            await wal.persist("a", ready(snapshot=Snapshot(2, 1, frozenset({"n1"}), b"s")))
        with pytest.raises(WalMismatchError, match="compaction"):
            await wal.save_snapshot("b", Snapshot(1, 1, frozenset({"n1"}), b""))
        with pytest.raises(WalError, match="safe directory name"):
            await wal.persist("../x", ready(entries=data_entries(1, 1, 1)))
        assert wal.log.batches_written == batches + 1  # the snapshot install only
        assert wal.groups == {"a"}
        assert wal.last_index("a") == 3
        assert wal.snapshot_index("a") == 3


async def test_an_installed_snapshot_replaces_only_its_groups_log(tmp_path: Path) -> None:
    snap = Snapshot(10, 3, frozenset({"n1", "n2", "n3"}), b"state@10")
    async with opened(tmp_path) as wal:
        await wal.persist_many({g: ready(entries=data_entries(1, 5, 1, g)) for g in "abc"})
        await wal.persist_many(
            {
                "a": ready(
                    truncate_after=4,
                    snapshot=snap,
                    entries=data_entries(11, 12, 3, "a"),
                    hard_state=HardState(3, None, 10),
                ),
                "b": ready(entries=data_entries(6, 6, 1, "b")),
            }
        )
        assert wal.snapshot_files_written == 1
    async with opened(tmp_path) as wal:
        states = await load_all(wal)
    assert states["a"] == PersistedState(HardState(3, None, 10), snap, data_entries(11, 12, 3, "a"))
    assert states["b"].entries == data_entries(1, 6, 1, "b")
    assert states["c"].entries == data_entries(1, 5, 1, "c")
    node = restore("n1", "a", states["a"], frozenset())
    assert (node.first_index, node.last_index, node.commit) == (11, 12, 10)


async def test_compaction_keeps_later_entries_and_a_stale_one_is_dropped(tmp_path: Path) -> None:
    voters = frozenset({"n1"})
    async with opened(tmp_path) as wal:
        await wal.persist("a", ready(entries=data_entries(1, 8, 1)))
        await wal.save_snapshot("a", Snapshot(5, 1, voters, b"five"))
        await wal.save_snapshot("a", Snapshot(4, 1, voters, b"four"))  # older: ignored
        assert wal.snapshot_index("a") == 5
    snap_dir = tmp_path / "snapshots" / "a"
    assert [p.name[:20] for p in snap_dir.iterdir()] == [f"{5:020d}"]
    async with opened(tmp_path) as wal:
        state = await trio.to_thread.run_sync(wal.load, "a")
    assert state.snapshot == Snapshot(5, 1, voters, b"five")
    assert state.entries == data_entries(6, 8, 1)


async def test_an_orphan_snapshot_file_is_removed_and_a_missing_one_refused(
    tmp_path: Path,
) -> None:
    voters = frozenset({"n1"})
    async with opened(tmp_path) as wal:
        await wal.persist("a", ready(entries=data_entries(1, 4, 1)))
        await wal.save_snapshot("a", Snapshot(2, 1, voters, b"two"))
    orphan = tmp_path / "snapshots" / "a" / f"{9:020d}-{1:020d}.snap"
    orphan.write_bytes(b"an install whose marker never became durable")
    async with opened(tmp_path) as wal:
        state = await trio.to_thread.run_sync(wal.load, "a")
    assert not orphan.exists()
    assert state.snapshot is not None
    assert state.snapshot.data == b"two"
    (tmp_path / "snapshots" / "a" / f"{2:020d}-{1:020d}.snap").unlink()
    with pytest.raises(WalError, match="missing"):
        await trio.to_thread.run_sync(NodeWal.open, tmp_path)


async def test_the_group_adapter_has_the_group_storage_methods(tmp_path: Path) -> None:
    voters = frozenset({"n1"})
    async with opened(tmp_path) as wal:
        a, b = WalGroupStorage(wal, "a"), WalGroupStorage(wal, "b")
        await a.persist(ready(entries=data_entries(1, 3, 1), hard_state=HardState(1, "n1", 3)))
        batches = wal.log.batches_written
        await a.persist_many(
            {"a": ready(entries=data_entries(4, 4, 1)), "b": ready(entries=data_entries(1, 2, 1))}
        )
        assert wal.log.batches_written == batches + 1
        await a.save_snapshot(Snapshot(2, 1, voters, b"two"))
        assert a.hard_state == HardState(1, "n1", 3)
        assert b.hard_state == HardState()
        a.close()
    async with opened(tmp_path) as wal:
        state = await trio.to_thread.run_sync(WalGroupStorage(wal, "a").load)
    assert state == PersistedState(
        HardState(1, "n1", 3), Snapshot(2, 1, voters, b"two"), data_entries(3, 4, 1)
    )
    with pytest.raises(WalError):
        WalGroupStorage(wal, "..")


# --- WAL compaction ---------------------------------------------------------------------------


async def test_wal_compaction_drops_segments_once_every_group_has_a_snapshot(
    tmp_path: Path,
) -> None:
    groups = ["g0", "g1", "g2"]
    voters = frozenset({"n1"})
    last = dict.fromkeys(groups, 0)
    kwargs: dict[str, Any] = {"segment_bytes": 2048}

    async def write(wal: NodeWal, rounds: int) -> None:
        for _ in range(rounds):
            readies = {}
            for g in groups:
                readies[g] = ready(
                    entries=data_entries(last[g] + 1, last[g] + 3, 1, g),
                    hard_state=HardState(1, "n1", last[g] + 3),
                )
                last[g] += 3
            await wal.persist_many(readies)

    async with opened(tmp_path, **kwargs) as wal:
        await write(wal, 30)
        many = len(segment_files(tmp_path))
        assert many > 5
        # g2 has no snapshot: it pins every segment.
        for g in groups[:2]:
            await wal.save_snapshot(g, Snapshot(last[g] - 2, 1, voters, g.encode()))
        result = await wal.compact()
        # Only up to g2's first entry (the 9th record of the first batch) is free.
        assert result.first_after == 9
        assert len(segment_files(tmp_path)) == many
        await wal.save_snapshot("g2", Snapshot(last["g2"] - 2, 1, voters, b"g2"))
        result = await wal.compact()
        assert result.first_after > result.first_before
        assert len(segment_files(tmp_path)) <= 2
        await write(wal, 10)
        before = await load_all(wal)
    async with opened(tmp_path, **kwargs) as wal:
        assert await load_all(wal) == before
        # A second round of compaction on top of a checkpoint, then reopen again.
        for g in groups:
            await wal.save_snapshot(g, Snapshot(last[g] - 1, 1, voters, b"again"))
        await wal.compact()
        await write(wal, 3)
        before = await load_all(wal)
    async with opened(tmp_path, **kwargs) as wal:
        after = await load_all(wal)
    assert after == before
    for g in groups:
        assert after[g].snapshot is not None
        assert after[g].entries[-1].index == last[g]
        assert after[g].hard_state == HardState(1, "n1", last[g])
        node = restore("n1", g, after[g], voters)
        assert node.last_index == node.commit == last[g]


# --- crashes --------------------------------------------------------------------------------


async def test_a_torn_final_batch_leaves_a_consistent_prefix(tmp_path: Path) -> None:
    rng = random.Random(7)
    groups = [f"g{i}" for i in range(5)]
    for trial in range(12):
        directory = tmp_path / str(trial)
        async with opened(directory) as wal:
            await wal.persist_many(
                {
                    g: ready(entries=data_entries(1, 4, 1, g), hard_state=HardState(1, "n1", 4))
                    for g in groups
                }
            )
            pre = await load_all(wal)
            (segment,) = segment_files(directory)
            size_before = segment.stat().st_size
            await wal.persist_many(
                {
                    g: ready(
                        truncate_after=2 if g == "g0" else None,
                        entries=data_entries(3 if g == "g0" else 5, 9, 2, g),
                        hard_state=HardState(2, None, 6),
                    )
                    for g in groups
                }
            )
            post = await load_all(wal)
            size_after = segment.stat().st_size
        with segment.open("r+b") as f:
            f.truncate(rng.randrange(size_before, size_after))
        async with opened(directory) as wal:
            got = await load_all(wal)
        complete = 0
        for g in groups:
            state = got[g]
            assert state.hard_state in (pre[g].hard_state, post[g].hard_state)
            if state.hard_state == post[g].hard_state:
                assert state.entries == post[g].entries  # entries come before the hard state
                complete += 1
            # Every surviving entry is the old one or the new one at its index.
            for entry in state.entries:
                candidates = [e for e in pre[g].entries + post[g].entries if e.index == entry.index]
                assert entry in candidates
            indexes = [e.index for e in state.entries]
            assert indexes == list(range(1, len(indexes) + 1))
            node = restore("n1", g, state, frozenset({"n1"}))
            assert node.commit <= node.last_index
        assert complete < len(groups)


# --- fuzz: a 3-node cluster hosting several groups, crashing at random --------------------------

NODE_IDS = ("n1", "n2", "n3")
FUZZ_GROUPS = ("ga", "gb", "gc")


class FuzzNode:
    def __init__(self, node_id: str, directory: Path) -> None:
        self.id = node_id
        self.directory = directory
        self.wal: NodeWal | None = None
        self.rafts: dict[str, RaftNode] = {}
        self.applied: dict[str, int] = {}


class Cluster:
    def __init__(self, seed: int, root: Path, nursery: trio.Nursery) -> None:
        self.rng = random.Random(seed)
        self.root = root
        self.nursery = nursery
        self.nodes = {n: FuzzNode(n, root / n) for n in NODE_IDS}
        self.network: list[Message] = []
        self.committed: dict[str, dict[int, Entry]] = {g: {} for g in FUZZ_GROUPS}
        self.crashes = 0
        self.torn = 0
        self.compactions = 0
        self.cycles = 0
        self.installed = 0

    async def start(self, node: FuzzNode) -> None:
        wal = await trio.to_thread.run_sync(
            partial(NodeWal.open, node.directory, segment_bytes=4096)
        )
        await self.nursery.start(wal.run)
        node.wal = wal
        for g in FUZZ_GROUPS:
            state = await trio.to_thread.run_sync(wal.load, g)
            raft = RaftNode.restore(
                RaftConfig(node.id, g, max_append_entries=self.rng.choice((1, 8))),
                random.Random(self.rng.getrandbits(32)),
                hard_state=state.hard_state,
                snapshot=state.snapshot,
                entries=state.entries,
                voters=NODE_IDS,
            )
            node.rafts[g] = raft
            node.applied[g] = raft.snapshot.index
            # What the WAL holds is exactly what the core restored from.
            assert wal.last_index(g) == raft.last_index

    async def crash(self, node: FuzzNode, *, tear: bool) -> None:
        assert node.wal is not None
        wal = node.wal
        durable = {g: node_state(r) for g, r in node.rafts.items()}
        allowed = {g: {(e.index, e.term): e for e in durable[g][3]} for g in node.rafts}
        if tear:
            # Crash in the middle of a cycle: its batch is written, nothing sent or advanced,
            # and the disk kept only part of it.
            readies = {g: r.ready() for g, r in node.rafts.items() if r.has_ready()}
            for g, rd in readies.items():
                allowed[g].update({(e.index, e.term): e for e in rd.entries})
            before = {p: p.stat().st_size for p in segment_files(node.directory)}
            await wal.persist_many(readies)
            wal.close()
            newest = segment_files(node.directory)[-1]
            size = newest.stat().st_size
            low = before.get(newest, 0)
            if size > low:
                with newest.open("r+b") as f:
                    f.truncate(self.rng.randrange(low, size))
            self.torn += 1
        wal.close()
        node.wal = None
        self.crashes += 1
        await self.start(node)
        for g, raft in node.rafts.items():
            if not tear:
                # Nothing advanced was lost (the commit index may restart lower: volatile).
                assert node_state(raft)[1:] == durable[g][1:]
                hard_state = durable[g][0]
                assert (raft.term, raft.voted_for) == (hard_state.term, hard_state.voted_for)
                assert raft.commit <= hard_state.commit
                continue
            for entry in raft.entries(raft.first_index):
                if raft.snapshot.index == durable[g][1]:
                    assert allowed[g][entry.index, entry.term] == entry
            assert raft.snapshot.index >= durable[g][1]

    async def cycle(self, node: FuzzNode) -> None:
        assert node.wal is not None
        readies = {g: r.ready() for g, r in node.rafts.items() if r.has_ready()}
        if not readies:
            return
        self.cycles += 1
        batches = node.wal.log.batches_written
        await node.wal.persist_many(readies)
        assert node.wal.log.batches_written - batches <= 1
        for g, rd in readies.items():
            raft = node.rafts[g]
            for message in rd.messages:
                if self.rng.random() > 0.05:
                    self.network.append(message)
            if rd.snapshot is not None:
                node.applied[g] = rd.snapshot.index
                self.installed += 1
            for entry in rd.committed:
                seen = self.committed[g].setdefault(entry.index, entry)
                assert seen == entry, f"{g}: two entries committed at {entry.index}"
                node.applied[g] = entry.index
            raft.advance(rd)
            # The WAL's durable view of the group is the core's.
            assert durable_matches(node.wal.hard_state(g), raft)
            assert node.wal.last_index(g) == raft.last_index

    async def step(self) -> None:
        rng = self.rng
        node = self.nodes[rng.choice(NODE_IDS)]
        roll = rng.random()
        if roll < 0.02:
            await self.crash(node, tear=rng.random() < 0.5)
            return
        if roll < 0.06:
            await self.compact(node)
            return
        rng.shuffle(self.network)
        keep: list[Message] = []
        for message in self.network:
            if message.to == node.id and rng.random() < 0.7:
                node.rafts[message.group].step(message)
            else:
                keep.append(message)
        self.network = keep
        for g, raft in node.rafts.items():
            if rng.random() < 0.5:
                raft.tick()
            if raft.role is Role.LEADER and rng.random() < 0.5:
                raft.propose(f"{node.id}:{g}:{rng.getrandbits(20)}".encode())
        await self.cycle(node)

    async def compact(self, node: FuzzNode) -> None:
        assert node.wal is not None
        for g, raft in node.rafts.items():
            if raft.applied > raft.snapshot.index and self.rng.random() < 0.7:
                index = self.rng.randrange(raft.snapshot.index + 1, raft.applied + 1)
                snapshot = raft.compact(index, f"{g}@{index}".encode())
                await node.wal.save_snapshot(g, snapshot)
                self.compactions += 1
        await node.wal.compact()


@pytest.mark.parametrize("seed", range(6))
async def test_fuzz_a_cluster_on_node_wals_survives_crashes(tmp_path: Path, seed: int) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(seed, tmp_path, nursery)
        for node in cluster.nodes.values():
            await cluster.start(node)
        for _ in range(1500):
            await cluster.step()
        # Every node's durable state reloads exactly, and the committed prefixes agree.
        for node in cluster.nodes.values():
            assert node.wal is not None
            for g, raft in node.rafts.items():
                state = await trio.to_thread.run_sync(node.wal.load, g)
                assert durable_matches(state.hard_state, raft)
                assert state.entries == raft.entries(raft.first_index)
                if state.snapshot is not None:
                    assert state.snapshot.index == raft.snapshot.index
                for entry in state.entries:
                    if entry.index <= raft.commit:
                        assert cluster.committed[g].get(entry.index, entry) == entry
            node.wal.close()
        nursery.cancel_scope.cancel()
    assert cluster.crashes > 5
    assert cluster.compactions > 5
    assert all(len(c) > 20 for c in cluster.committed.values())
