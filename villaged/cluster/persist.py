"""Durable state of one replica of one Raft group, in a directory of its own.

This module owns a group's directory::

    DIR/hardstate   term, voted_for, commit: msgpack, replaced atomically (temp + rename + fsync)
    DIR/log/        a :class:`~villaged.storage.log.SegmentLog`: one ``raft.entry`` record per
                    entry, and the group's snapshots

and the mapping of the Raft core's persistence duties onto it (steps 1 of the Ready contract,
see :mod:`villaged.cluster.raft`):

* ``truncate_after`` → :meth:`SegmentLog.truncate_after`;
* ``snapshot`` → :meth:`SegmentLog.install_snapshot` (the core sends one only when it replaces
  the log); the file holds msgpack ``{"v": sorted voters, "d": application data}`` because a
  Raft snapshot carries the voter set of its index;
* ``entries`` → one :meth:`SegmentLog.append_many` (one batch, one ``fdatasync``). The log
  assigns indexes itself, in order after its end, and keeps each record's term: after the
  truncation or installation above, its end is exactly where the core's entries continue, and
  every assigned index is checked against the entry's (a mismatch is a bug, never papered over);
* ``hard_state`` → the ``hardstate`` file, only when it differs from the one on disk.

:meth:`GroupStorage.save_snapshot` saves what :meth:`RaftNode.compact` returns (which does not
pass through a Ready). All writes of one group are serialized by a lock, so a compaction never
races a truncation or an installation.

After a crash the log's own recovery cuts a torn final batch; :meth:`GroupStorage.load` then
returns what :meth:`RaftNode.restore` takes. A commit index beyond the surviving log is clamped
by the core.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.cluster.raft import Entry, EntryKind, HardState, Ready, Snapshot
from villaged.storage.errors import StorageError
from villaged.storage.log import SegmentLog
from villaged.storage.records import Record

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "ENTRY_RECORD",
    "GroupStorage",
    "PersistError",
    "PersistedState",
    "decode_snapshot_data",
    "encode_snapshot_data",
]

ENTRY_RECORD: Final = "raft.entry"
HARD_STATE_FILE: Final = "hardstate"
_HARD_STATE_VERSION: Final = 1
#: Room in a log record for its keys, term, index and batch start beside the entry's data.
RECORD_OVERHEAD: Final = 1024


class PersistError(StorageError):
    """The group's files are not what this module wrote, or the log disagrees with the core."""


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What :meth:`RaftNode.restore` needs: the hard state, latest snapshot, entries after it."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]


def encode_snapshot_data(snapshot: Snapshot) -> bytes:
    packed: bytes = msgpack.packb(
        {"v": sorted(snapshot.voters), "d": snapshot.data}, use_bin_type=True
    )
    return packed


def decode_snapshot_data(index: int, term: int, data: bytes) -> Snapshot:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        voters, app_data = obj["v"], obj["d"]
    except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise PersistError(f"snapshot {index} is not a raft snapshot: {exc!r}") from exc
    if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
        raise PersistError(f"snapshot {index}: voters are not a list of strings")
    if not isinstance(app_data, bytes):
        raise PersistError(f"snapshot {index}: data is not bytes")
    return Snapshot(index, term, frozenset(voters), app_data)


class GroupStorage:
    """One group's durable Raft state; build with :meth:`open`, run :meth:`run` in a nursery."""

    def __init__(self, directory: Path, log: SegmentLog, hard_state: HardState) -> None:
        self.directory = directory
        self.log = log
        self._hard_state = hard_state
        self._lock = trio.Lock()
        #: Times the hard-state file was replaced since open (for metrics and tests).
        self.hard_state_writes = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        max_entry_bytes: int = 1 << 20,
        segment_bytes: int = 64 << 20,
    ) -> GroupStorage:
        """Open (creating) and recover ``directory``. Blocking: call it in a worker thread."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / (HARD_STATE_FILE + ".tmp")).unlink()
        hard_state = _read_hard_state(directory / HARD_STATE_FILE)
        log = SegmentLog.open(
            directory / "log",
            segment_bytes=segment_bytes,
            max_record_bytes=max_entry_bytes + RECORD_OVERHEAD,
        )
        return cls(directory, log, hard_state)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The log's writer task; returns after :meth:`close`."""
        await self.log.run(task_status=task_status)

    def close(self) -> None:
        self.log.close()

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def load(self) -> PersistedState:
        """Everything on disk, for :meth:`RaftNode.restore` (reads the whole log: blocking)."""
        stored = self.log.latest_snapshot()
        snapshot = (
            None if stored is None else decode_snapshot_data(stored.index, stored.term, stored.data)
        )
        entries = tuple(_entry_from_record(r) for r in self.log.scan(self.log.first_index))
        return PersistedState(self._hard_state, snapshot, entries)

    async def persist(self, ready: Ready) -> None:
        """Step 1 of the Ready contract, durably: truncation, snapshot, entries, hard state."""
        async with self._lock:
            log = self.log
            if ready.truncate_after is not None:
                await log.truncate_after(ready.truncate_after)
            if ready.snapshot is not None:
                snap = ready.snapshot
                await log.install_snapshot(snap.index, snap.term, encode_snapshot_data(snap))
                if log.last_index > snap.index:
                    # The log held the snapshot's entry, so it kept the entries after it; the
                    # core's log is the snapshot alone, and the disk must not say more.
                    await log.truncate_after(snap.index)
            if ready.entries:
                first = ready.entries[0].index
                if first != log.last_index + 1:
                    raise PersistError(
                        f"entries start at {first} but the log ends at {log.last_index}"
                    )
                records = [
                    Record(ENTRY_RECORD, {"k": e.kind.value, "d": e.data}, term=e.term)
                    for e in ready.entries
                ]
                indexes = await log.append_many(records)
                if indexes[0] != first or indexes[-1] != ready.entries[-1].index:
                    raise PersistError(f"log put entries {first}.. at {indexes[0]}..")
            if ready.hard_state is not None and ready.hard_state != self._hard_state:
                await trio.to_thread.run_sync(_write_hard_state, self.directory, ready.hard_state)
                self._hard_state = ready.hard_state
                self.hard_state_writes += 1

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Save what :meth:`RaftNode.compact` returned; the log is compacted through it."""
        async with self._lock:
            if snapshot.index <= self.log.first_index - 1:
                return  # an installed snapshot already covers it
            await self.log.save_snapshot(
                snapshot.index, snapshot.term, encode_snapshot_data(snapshot)
            )


def _entry_from_record(record: Record) -> Entry:
    body: dict[str, Any] = record.body
    kind, data = body.get("k"), body.get("d")
    if record.type != ENTRY_RECORD or not isinstance(data, bytes):
        raise PersistError(f"record {record.index} is not a raft entry")
    try:
        entry_kind = EntryKind(kind)
    except ValueError as exc:
        raise PersistError(f"record {record.index} has entry kind {kind!r}") from exc
    return Entry(record.index, record.term, entry_kind, data)


def _read_hard_state(path: Path) -> HardState:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return HardState()
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        version, term, vote, commit = obj["version"], obj["term"], obj["vote"], obj["commit"]
    except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise PersistError(f"{path}: not a hard state file: {exc!r}") from exc
    if version != _HARD_STATE_VERSION:
        raise PersistError(f"{path}: hard state version {version!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (term, commit)):
        raise PersistError(f"{path}: bad term or commit")
    if vote is not None and not isinstance(vote, str):
        raise PersistError(f"{path}: bad vote")
    return HardState(term, vote, commit)


def _write_hard_state(directory: Path, hard_state: HardState) -> None:
    """Replace the file atomically and durably: write a temp file, fsync, rename, fsync dir."""
    packed: bytes = msgpack.packb(
        {
            "version": _HARD_STATE_VERSION,
            "term": hard_state.term,
            "vote": hard_state.voted_for,
            "commit": hard_state.commit,
        },
        use_bin_type=True,
    )
    path = directory / HARD_STATE_FILE
    tmp = directory / (HARD_STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(packed)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
