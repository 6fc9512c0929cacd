"""GroupStorage: a Raft group's durable state survives reopening, as RaftNode.restore needs it."""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from villaged.cluster.persist import GroupStorage, PersistError
from villaged.cluster.raft import (
    Entry,
    EntryKind,
    HardState,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    Snapshot,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@asynccontextmanager
async def opened(directory: Path) -> AsyncIterator[GroupStorage]:
    storage = await trio.to_thread.run_sync(partial(GroupStorage.open, directory))
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        try:
            yield storage
        finally:
            storage.close()


def ready(
    *,
    entries: tuple[Entry, ...] = (),
    hard_state: HardState | None = None,
    truncate_after: int | None = None,
    snapshot: Snapshot | None = None,
) -> Ready:
    return Ready(hard_state, truncate_after, snapshot, entries, (), (), None)


def data_entries(first: int, last: int, term: int) -> tuple[Entry, ...]:
    return tuple(Entry(i, term, EntryKind.DATA, b"e%d" % i) for i in range(first, last + 1))


async def test_a_single_node_group_restores_from_its_readies(tmp_path: Path) -> None:
    config = RaftConfig("n1", "g1")
    node = RaftNode(config, random.Random(1), voters={"n1"})
    applied: list[bytes] = []
    async with opened(tmp_path) as storage:
        for step in range(60):
            if node.role is Role.LEADER and step % 3 == 0:
                node.propose(b"p%d" % step)
            else:
                node.tick()
            while node.has_ready():
                rd = node.ready()
                await storage.persist(rd)
                applied += [e.data for e in rd.committed if e.kind is EntryKind.DATA]
                node.advance(rd)
        writes = storage.hard_state_writes
    assert node.role is Role.LEADER
    assert len(applied) > 5
    # Only changes are written: election (term/vote) plus one per commit advance at most.
    assert writes <= 2 + len(applied) + 1

    async with opened(tmp_path) as storage:
        state = await trio.to_thread.run_sync(storage.load)
    assert state.hard_state == HardState(node.term, node.voted_for, node.commit)
    assert state.snapshot is None
    assert state.entries == node.entries(1)
    restored = RaftNode.restore(
        config,
        random.Random(2),
        hard_state=state.hard_state,
        snapshot=state.snapshot,
        entries=state.entries,
        voters={"n1"},
    )
    assert (restored.last_index, restored.term, restored.commit) == (
        node.last_index,
        node.term,
        node.commit,
    )
    replayed = restored.ready().committed
    assert [e.data for e in replayed if e.kind is EntryKind.DATA] == applied


async def test_truncation_replaces_a_conflicting_suffix(tmp_path: Path) -> None:
    async with opened(tmp_path) as storage:
        await storage.persist(ready(entries=data_entries(1, 5, 1), hard_state=HardState(1)))
        await storage.persist(
            ready(truncate_after=3, entries=data_entries(4, 6, 2), hard_state=HardState(2, "n2"))
        )
    async with opened(tmp_path) as storage:
        state = storage.load()
    assert [(e.index, e.term) for e in state.entries] == [
        (1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2),
    ]  # fmt: skip
    assert state.hard_state == HardState(2, "n2", 0)


async def test_installed_snapshot_replaces_the_log(tmp_path: Path) -> None:
    snap = Snapshot(10, 3, frozenset({"n1", "n2", "n3"}), b"app state")
    async with opened(tmp_path) as storage:
        await storage.persist(ready(entries=data_entries(1, 4, 1)))
        await storage.persist(
            ready(snapshot=snap, entries=data_entries(11, 12, 3), hard_state=HardState(3, None, 10))
        )
    async with opened(tmp_path) as storage:
        state = storage.load()
    assert state.snapshot == snap
    assert [e.index for e in state.entries] == [11, 12]
    restored = RaftNode.restore(
        RaftConfig("n1", "g1"),
        random.Random(1),
        hard_state=state.hard_state,
        snapshot=state.snapshot,
        entries=state.entries,
    )
    assert restored.voters == snap.voters
    assert (restored.first_index, restored.last_index, restored.commit) == (11, 12, 10)


async def test_an_installed_snapshot_the_log_already_holds_still_ends_the_log(
    tmp_path: Path,
) -> None:
    snap = Snapshot(3, 1, frozenset({"n1"}), b"s3")
    async with opened(tmp_path) as storage:
        await storage.persist(ready(entries=data_entries(1, 5, 1)))
        await storage.persist(ready(snapshot=snap, entries=data_entries(4, 4, 2)))
    async with opened(tmp_path) as storage:
        state = storage.load()
    assert state.snapshot == snap
    assert [(e.index, e.term) for e in state.entries] == [(4, 2)]


async def test_compaction_keeps_the_entries_after_the_snapshot(tmp_path: Path) -> None:
    async with opened(tmp_path) as storage:
        await storage.persist(
            ready(entries=data_entries(1, 5, 1), hard_state=HardState(1, None, 5))
        )
        await storage.save_snapshot(Snapshot(3, 1, frozenset({"n1"}), b"s3"))
        await storage.save_snapshot(Snapshot(2, 1, frozenset({"n1"}), b"old"))  # ignored
        await storage.persist(ready(entries=data_entries(6, 6, 1)))
    async with opened(tmp_path) as storage:
        state = storage.load()
    assert state.snapshot == Snapshot(3, 1, frozenset({"n1"}), b"s3")
    assert [e.index for e in state.entries] == [4, 5, 6]


async def test_entries_that_do_not_follow_the_log_are_refused(tmp_path: Path) -> None:
    async with opened(tmp_path) as storage:
        await storage.persist(ready(entries=data_entries(1, 2, 1)))
        with pytest.raises(PersistError, match="start at 5"):
            await storage.persist(ready(entries=data_entries(5, 5, 1)))


async def test_a_torn_final_batch_is_cut_and_commit_is_clamped(tmp_path: Path) -> None:
    async with opened(tmp_path) as storage:
        await storage.persist(ready(entries=data_entries(1, 3, 1), hard_state=HardState(1)))
        await storage.persist(
            ready(entries=data_entries(4, 6, 1), hard_state=HardState(1, None, 6))
        )
    segment = max((tmp_path / "log").glob("*.seg"))
    with segment.open("r+b") as f:
        f.truncate(segment.stat().st_size - 3)
    async with opened(tmp_path) as storage:
        state = storage.load()
    # Recovery keeps the whole frames before the torn one.
    assert [e.index for e in state.entries] == [1, 2, 3, 4, 5]
    assert state.hard_state.commit == 6
    restored = RaftNode.restore(
        RaftConfig("n1", "g1"),
        random.Random(1),
        hard_state=state.hard_state,
        snapshot=None,
        entries=state.entries,
        voters={"n1"},
    )
    assert restored.commit == 5


@pytest.mark.parametrize(
    "content",
    [b"\xc1", b"\x80", b"\x84\xa7version\x02\xa4term\x00\xa4vote\xc0\xa6commit\x00"],
)
def test_a_damaged_hard_state_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "hardstate").write_bytes(content)
    with pytest.raises(PersistError):
        GroupStorage.open(tmp_path)
