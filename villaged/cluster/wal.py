"""One write-ahead log for every Raft group a node hosts: one ``fdatasync`` per driver cycle.

:mod:`villaged.cluster.persist` gives each group a :class:`~villaged.storage.log.SegmentLog`
and a hard-state file of its own, so a node hosting 17 groups pays 17 syncs (plus hard-state
file replacements) per cycle. This module puts every group's Raft state into ONE
SegmentLog per node and writes all the Readies of one cycle as one batch.

Layout (all under the directory given to :meth:`NodeWal.open`)::

    DIR/log/                      the SegmentLog (the WAL); its own snapshots are WAL checkpoints
    DIR/snapshots/GROUP/I-T.snap  a group's Raft snapshot at index I, term T (written atomically)

Records (msgpack bodies; every record's envelope term is 0, see below)::

    raft.entry            {"g": group, "i": raft index, "t": term, "k": kind, "d": data}
    raft.truncate         {"g": group, "after": index}     drop that group's entries after index
    raft.hardstate        {"g": group, "t": term, "v": voted_for | None, "c": commit}
    raft.snapshot_marker  {"g": group, "i": index, "t": term, "r": replaces the group's log}

WAL positions (the SegmentLog's indexes) are not Raft indexes: each group keeps, in memory, the
WAL position and term of every entry after its snapshot (16 bytes an entry, never the data),
its hard state and its snapshot's (index, term). The data is read back by position
(:meth:`SegmentLog.read`) only by :meth:`NodeWal.load`.

The envelope term of every record is 0 and the entry's term is in the body: the SegmentLog
keeps its terms as runs, and interleaving groups at different terms would make one run per
record (memory growing with the log); it also makes the WAL checkpoint's term trivially right.

Theory of operation
-------------------
*One state machine, two callers.* :func:`_apply` turns one record into a change of a group's
in-memory state. Recovery (:meth:`NodeWal.open`) runs it over every record after the latest
checkpoint; a write runs it over the records it just made durable. So the state after a
reopen is, by construction, the state before the crash minus the records the crash lost (only
the torn final batch, which was never acknowledged). :func:`_apply` is strict: an entry that
does not continue its group's log, a truncation below the snapshot, a compaction marker that
the log does not hold -- all raise :class:`WalError`. :meth:`NodeWal.persist_many` checks the
same rules *before* writing anything (:class:`WalMismatchError`), so a bad Ready is refused
without touching the disk.

*One cycle, one sync* (:meth:`NodeWal.persist_many`). For every group's Ready, in the order of
the Ready contract: snapshots arrive as files first (each written to a temp file, fsynced,
renamed, directory fsynced -- several MB do not belong in a log record, and a file lets the
WAL drop old segments), then ONE ``append_many`` holds, group after group, the truncation
marker, the snapshot marker (``r`` true: it replaces the group's log), the entries and the
hard state if it changed. A crash before that batch is durable loses all of it together --
fine, no Ready of the cycle was advanced; a snapshot file without its marker is an orphan that
the next open deletes.

*Compaction of a group* (:meth:`NodeWal.save_snapshot`, after :meth:`RaftNode.compact`): the
file, then a marker with ``r`` false (the entries after the index stay). A marker at or below
the group's current snapshot (an installation overtook the compaction) is stale and ignored.
Superseded snapshot files are deleted once the newer marker is durable.

*Compaction of the WAL* (:meth:`NodeWal.compact`). The lowest position still needed is the
smallest position of any group's first live entry (the entry after its snapshot). Hard states
and snapshot pointers live in records too, so instead of re-writing them we checkpoint: with
every write held off (the lock), ``T`` = the WAL's durable end, and the checkpoint holds each
group's exact state at ``T`` -- hard state, snapshot pointer, and the positions and terms of
its live entries (all > ``P``). It is saved as the SegmentLog's snapshot at ``P`` = lowest
needed position - 1 (or ``T`` when no group has live entries), which lets the SegmentLog delete
every sealed segment wholly at or below ``P``. Recovery starts from the checkpoint's state and
replays only records after ``T``: records in ``(P, T]`` are already reflected in it, and are
still there only because live entries among them are read by position. (A checkpoint of the
state at ``P`` itself would need the state *at* ``P``, and replaying ``(P, T]`` on top of a later
state is not idempotent: a stale marker ignored there can leave a dead entry behind.)

Locking: one :class:`trio.Lock` orders ``persist_many``, the marker append of ``save_snapshot``
and ``compact``; a snapshot file is written outside it (it may be large), under a name no one
else uses, and the staleness check happens under the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import zlib
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.cluster.persist import RECORD_OVERHEAD, PersistedState, PersistError
from villaged.cluster.raft import Entry, EntryKind, HardState, Ready, Snapshot
from villaged.storage.log import SegmentLog
from villaged.storage.records import Record

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from villaged.storage.log import FileOps

__all__ = [
    "ENTRY_RECORD",
    "HARD_STATE_RECORD",
    "SNAPSHOT_MARKER_RECORD",
    "TRUNCATE_RECORD",
    "CompactResult",
    "NodeWal",
    "WalError",
    "WalGroupStorage",
    "WalMismatchError",
]

logger = logging.getLogger("villaged.cluster")

ENTRY_RECORD: Final = "raft.entry"
TRUNCATE_RECORD: Final = "raft.truncate"
HARD_STATE_RECORD: Final = "raft.hardstate"
SNAPSHOT_MARKER_RECORD: Final = "raft.snapshot_marker"
LOG_DIR: Final = "log"
SNAPSHOT_DIR: Final = "snapshots"
_SNAP_SUFFIX: Final = ".snap"
_TMP_SUFFIX: Final = ".tmp"
_CHECKPOINT_VERSION: Final = 1
_GROUP_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_SNAP_NAME: Final = re.compile(r"([0-9]{20})-([0-9]{20})\.snap")


class WalError(PersistError):
    """The node WAL's files are not what this module wrote, or disagree with each other."""


class WalMismatchError(WalError):
    """A Ready does not fit its group's durable log (a driver or core bug; nothing written)."""


def _check_group(group: str) -> None:
    if not isinstance(group, str) or not _GROUP_NAME.fullmatch(group) or group in {".", ".."}:
        raise WalError(f"group id {group!r} is not a safe directory name")


class _Group:
    """A group's durable state as far as the WAL has made it durable (no entry data)."""

    __slots__ = ("hard_state", "positions", "snap_index", "snap_term", "terms")

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snap_index = 0
        self.snap_term = 0
        #: WAL position and term of entries snap_index + 1, snap_index + 2, ...
        self.positions: array[int] = array("Q")
        self.terms: array[int] = array("Q")

    @property
    def last_index(self) -> int:
        return self.snap_index + len(self.positions)

    def term_at(self, index: int) -> int | None:
        if index == self.snap_index:
            return self.snap_term
        if self.snap_index < index <= self.last_index:
            return self.terms[index - self.snap_index - 1]
        return None


# --- the state machine shared by recovery and writes ----------------------------------------


def _apply(groups: dict[str, _Group], record: Record) -> tuple[str, int] | None:
    """Apply one durable record (its ``index`` is its WAL position) to ``groups``.

    Returns ``(group, snapshot index)`` when a snapshot marker moved a group's snapshot (so
    older snapshot files can go); raises :class:`WalError` for anything out of order."""
    body: dict[str, Any] = record.body
    group = body.get("g")
    if not isinstance(group, str):
        raise WalError(f"WAL record {record.index} ({record.type}) names no group")
    _check_group(group)
    state = groups.get(group)
    if state is None:
        state = groups[group] = _Group()
    where = f"WAL record {record.index}, group {group}"
    if record.type == ENTRY_RECORD:
        index, term = _uint(body, "i", where), _uint(body, "t", where)
        if index != state.last_index + 1:
            raise WalError(f"{where}: entry {index} does not follow {state.last_index}")
        state.positions.append(record.index)
        state.terms.append(term)
    elif record.type == TRUNCATE_RECORD:
        after = _uint(body, "after", where)
        if after < state.snap_index:
            raise WalError(f"{where}: truncation after {after}, below snapshot {state.snap_index}")
        keep = after - state.snap_index
        del state.positions[keep:]
        del state.terms[keep:]
    elif record.type == HARD_STATE_RECORD:
        vote = body.get("v")
        if vote is not None and not isinstance(vote, str):
            raise WalError(f"{where}: bad vote {vote!r}")
        state.hard_state = HardState(_uint(body, "t", where), vote, _uint(body, "c", where))
    elif record.type == SNAPSHOT_MARKER_RECORD:
        index, term = _uint(body, "i", where), _uint(body, "t", where)
        replaces = body.get("r")
        if not isinstance(replaces, bool):
            raise WalError(f"{where}: snapshot marker without a replaces flag")
        if index <= state.snap_index:
            return None  # stale: an installed snapshot overtook this compaction
        if replaces:
            del state.positions[:]
            del state.terms[:]
        else:
            if state.term_at(index) != term:
                raise WalError(
                    f"{where}: compaction at {index} (term {term}) but the log holds"
                    f" {state.snap_index + 1}..{state.last_index} with term {state.term_at(index)}"
                )
            drop = index - state.snap_index
            del state.positions[:drop]
            del state.terms[:drop]
        state.snap_index, state.snap_term = index, term
        return group, index
    else:
        raise WalError(f"WAL record {record.index} has unknown type {record.type!r}")
    return None


def _uint(body: Mapping[str, Any], key: str, where: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WalError(f"{where}: field {key!r} is {value!r}, not a non-negative integer")
    return value


# --- records -----------------------------------------------------------------------------------


def _entry_record(group: str, entry: Entry) -> Record:
    body = {"g": group, "i": entry.index, "t": entry.term, "k": entry.kind.value, "d": entry.data}
    return Record(ENTRY_RECORD, body)


def _hard_state_record(group: str, hs: HardState) -> Record:
    return Record(HARD_STATE_RECORD, {"g": group, "t": hs.term, "v": hs.voted_for, "c": hs.commit})


def _marker_record(group: str, snapshot: Snapshot, *, replaces: bool) -> Record:
    body = {"g": group, "i": snapshot.index, "t": snapshot.term, "r": replaces}
    return Record(SNAPSHOT_MARKER_RECORD, body)


# --- group snapshot files -------------------------------------------------------------------


def _snap_name(index: int, term: int) -> str:
    return f"{index:020d}-{term:020d}{_SNAP_SUFFIX}"


def _encode_snapshot_file(group: str, snapshot: Snapshot) -> bytes:
    payload: bytes = msgpack.packb(
        {
            "g": group,
            "i": snapshot.index,
            "t": snapshot.term,
            "v": sorted(snapshot.voters),
            "d": snapshot.data,
        },
        use_bin_type=True,
    )
    return zlib.crc32(payload).to_bytes(4, "big") + payload


def _decode_snapshot_file(path: Path, group: str, index: int, term: int) -> Snapshot:
    raw = path.read_bytes()
    payload = raw[4:]
    if len(raw) < 4 or zlib.crc32(payload) != int.from_bytes(raw[:4], "big"):
        raise WalError(f"{path}: snapshot file fails its checksum")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        fields = (obj["g"], obj["i"], obj["t"], obj["v"], obj["d"])
    except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise WalError(f"{path}: not a raft snapshot file: {exc!r}") from exc
    got_group, got_index, got_term, voters, data = fields
    if (got_group, got_index, got_term) != (group, index, term):
        raise WalError(f"{path}: holds {got_group}@{got_index}/{got_term}, not {group}@{index}")
    if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
        raise WalError(f"{path}: voters are not a list of strings")
    if not isinstance(data, bytes):
        raise WalError(f"{path}: data is not bytes")
    return Snapshot(index, term, frozenset(voters), data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_snapshot_files(root: Path, items: list[tuple[str, Snapshot]]) -> None:
    """Each snapshot to its file: temp file, fsync, rename, fsync the directory. Blocking."""
    for group, snapshot in items:
        directory = root / group
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(root)
        final = directory / _snap_name(snapshot.index, snapshot.term)
        tmp = final.with_name(final.name + _TMP_SUFFIX)
        contents = _encode_snapshot_file(group, snapshot)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(contents)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(directory)


def _list_snapshot_files(directory: Path) -> list[tuple[int, int, Path]]:
    found: list[tuple[int, int, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            match = _SNAP_NAME.fullmatch(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
    return sorted(found)


def _superseded(directory: Path, keep: tuple[int, int]) -> list[Path]:
    """The group's snapshot files older than ``keep`` (index, term). Blocking."""
    return [
        path
        for index, term, path in _list_snapshot_files(directory)
        if index < keep[0] or (index == keep[0] and term != keep[1])
    ]


def _count_superseded(targets: Iterable[tuple[Path, tuple[int, int]]]) -> int:
    return sum(len(_superseded(directory, keep)) for directory, keep in targets)


def _remove_superseded(directory: Path, keep: tuple[int, int]) -> None:
    """Delete the group's snapshot files older than ``keep`` (best effort). Blocking."""
    for path in _superseded(directory, keep):
        try:
            path.unlink()
        except OSError as exc:
            logger.warning(
                "could not delete superseded snapshot %s: %s",
                path,
                exc,
                extra={"event": "cluster.snapshot_cleanup_failed", "path": str(path)},
            )


# --- checkpoints (the WAL's own snapshots) ---------------------------------------------------


def _u64_bytes(values: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover - little-endian on every supported host
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def _u64_array(data: object, where: str) -> array[int]:
    if not isinstance(data, bytes) or len(data) % 8:
        raise WalError(f"{where}: not a packed array of u64")
    values = array("Q")
    values.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        values.byteswap()
    return values


def _encode_checkpoint(upto: int, groups: Mapping[str, _Group]) -> bytes:
    packed: bytes = msgpack.packb(
        {
            "version": _CHECKPOINT_VERSION,
            "T": upto,
            "groups": {
                name: {
                    "h": [g.hard_state.term, g.hard_state.voted_for, g.hard_state.commit],
                    "s": [g.snap_index, g.snap_term],
                    "p": _u64_bytes(g.positions),
                    "e": _u64_bytes(g.terms),
                }
                for name, g in groups.items()
            },
        },
        use_bin_type=True,
    )
    return packed


def _decode_checkpoint(data: bytes, first_position: int) -> tuple[int, dict[str, _Group]]:
    where = "WAL checkpoint"
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        version, upto, raw_groups = obj["version"], obj["T"], obj["groups"]
    except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise WalError(f"{where} does not decode: {exc!r}") from exc
    if version != _CHECKPOINT_VERSION:
        raise WalError(f"{where} has version {version!r}")
    if not isinstance(upto, int) or upto < first_position - 1 or not isinstance(raw_groups, dict):
        raise WalError(f"{where} is malformed")
    groups: dict[str, _Group] = {}
    for name, raw in raw_groups.items():
        _check_group(name)
        try:
            (term, vote, commit), (snap_index, snap_term) = raw["h"], raw["s"]
            positions, terms = raw["p"], raw["e"]
        except (TypeError, KeyError, ValueError) as exc:
            raise WalError(f"{where}: group {name} is malformed") from exc
        ints = (term, commit, snap_index, snap_term)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ints):
            raise WalError(f"{where}: group {name} has a bad number")
        if vote is not None and not isinstance(vote, str):
            raise WalError(f"{where}: group {name} has a bad vote")
        state = _Group()
        state.hard_state = HardState(term, vote, commit)
        state.snap_index, state.snap_term = snap_index, snap_term
        state.positions = _u64_array(positions, f"{where}: group {name}")
        state.terms = _u64_array(terms, f"{where}: group {name}")
        if len(state.positions) != len(state.terms):
            raise WalError(f"{where}: group {name} has {len(state.positions)} positions")
        if any(not first_position <= p <= upto for p in state.positions):
            raise WalError(f"{where}: group {name} points outside ({first_position - 1}, {upto}]")
        groups[name] = state
    return upto, groups


# --- the node WAL ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompactResult:
    """What :meth:`NodeWal.compact` did: the WAL's first position before and after."""

    first_before: int
    first_after: int


class NodeWal:
    """Every hosted group's Raft state in one log; build with :meth:`open`, run :meth:`run`."""

    def __init__(self, directory: Path, log: SegmentLog, groups: dict[str, _Group]) -> None:
        self.directory = directory
        self.log = log
        self._snapshot_root = directory / SNAPSHOT_DIR
        self._groups = groups
        self._lock = trio.Lock()
        #: Hard-state records and snapshot files written since open (metrics and tests).
        self.hard_state_writes = 0
        self.commit_only_deferred = 0  # commit-only hard states left for a later batch
        #: Per group: a hard state whose commit index moved, not written yet.
        self._pending_commits: dict[str, HardState] = {}
        self.snapshot_files_written = 0

    # --- opening ---

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        max_entry_bytes: int = 1 << 20,
        segment_bytes: int = 64 << 20,
        file_ops: FileOps | None = None,
    ) -> NodeWal:
        """Open (creating) and recover ``directory``: one scan of the WAL after its latest
        checkpoint. Blocking: call it in a worker thread."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = SegmentLog.open(
            directory / LOG_DIR,
            segment_bytes=segment_bytes,
            max_record_bytes=max_entry_bytes + RECORD_OVERHEAD,
            file_ops=file_ops,
        )
        try:
            groups = _recover_groups(log)
            _clean_snapshot_files(directory / SNAPSHOT_DIR, groups)
        except BaseException:
            log.close()
            raise
        return cls(directory, log, groups)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The WAL's writer task; returns after :meth:`close`."""
        await self.log.run(task_status=task_status)

    def close(self) -> None:
        self.log.close()

    # --- views ---

    @property
    def groups(self) -> frozenset[str]:
        """Groups the WAL holds any state for."""
        return frozenset(self._groups)

    def hard_state(self, group: str) -> HardState:
        state = self._groups.get(group)
        return HardState() if state is None else state.hard_state

    def last_index(self, group: str) -> int:
        state = self._groups.get(group)
        return 0 if state is None else state.last_index

    def snapshot_index(self, group: str) -> int:
        state = self._groups.get(group)
        return 0 if state is None else state.snap_index

    def live_entries(self) -> int:
        """Entries the WAL keeps for all groups (after their snapshots)."""
        return sum(len(g.positions) for g in self._groups.values())

    def load(self, group: str) -> PersistedState:
        """What :meth:`RaftNode.restore` needs for ``group`` (reads files: blocking).

        Meant for start-up, before the group's first write: a write or a WAL compaction that
        runs meanwhile may remove what this is about to read (then it raises)."""
        state = self._groups.get(group)
        if state is None:
            return PersistedState(HardState(), None, ())
        hard_state, snap_index, snap_term = state.hard_state, state.snap_index, state.snap_term
        positions, terms = array("Q", state.positions), array("Q", state.terms)
        snapshot = None
        if snap_index:
            path = self._snapshot_root / group / _snap_name(snap_index, snap_term)
            try:
                snapshot = _decode_snapshot_file(path, group, snap_index, snap_term)
            except FileNotFoundError as exc:
                raise WalError(f"{path}: the group's snapshot file is missing") from exc
        entries = tuple(
            self._read_entry(group, snap_index + 1 + offset, term, position)
            for offset, (position, term) in enumerate(zip(positions, terms, strict=True))
        )
        return PersistedState(hard_state, snapshot, entries)

    def _read_entry(self, group: str, index: int, term: int, position: int) -> Entry:
        record = self.log.read(position)
        body: dict[str, Any] = record.body
        where = f"WAL record {position}"
        if (
            record.type != ENTRY_RECORD
            or body.get("g") != group
            or body.get("i") != index
            or body.get("t") != term
        ):
            raise WalError(f"{where} is not entry {index} (term {term}) of group {group}")
        data = body.get("d")
        if not isinstance(data, bytes):
            raise WalError(f"{where}: entry data is not bytes")
        try:
            kind = EntryKind(body.get("k"))
        except ValueError as exc:
            raise WalError(f"{where}: entry kind {body.get('k')!r}") from exc
        return Entry(index, term, kind, data)

    # --- writing ---

    async def persist(self, group: str, ready: Ready) -> None:
        """Step 1 of the Ready contract for one group (see :meth:`persist_many`)."""
        await self.persist_many({group: ready})

    async def persist_many(self, readies: Mapping[str, Ready]) -> None:
        """Step 1 of the Ready contract for every group of one cycle, durably, with one
        ``fdatasync`` for all their truncations, entries and hard states (snapshot files,
        rare, are synced before it). Raises :class:`WalMismatchError` (nothing written) if a
        Ready does not continue its group's durable log; :class:`LogWriteError` if the batch
        failed (then none of it is durable)."""
        async with self._lock:
            for group, ready in readies.items():
                self._check_ready(group, ready)
            installs = [
                (group, snapshot)
                for group in sorted(readies)
                if (snapshot := readies[group].snapshot) is not None
            ]
            if installs:
                await trio.to_thread.run_sync(_write_snapshot_files, self._snapshot_root, installs)
                self.snapshot_files_written += len(installs)
            records: list[Record] = []
            for group in sorted(readies):
                ready = readies[group]
                if ready.truncate_after is not None:
                    records.append(
                        Record(TRUNCATE_RECORD, {"g": group, "after": ready.truncate_after})
                    )
                if ready.snapshot is not None:
                    records.append(_marker_record(group, ready.snapshot, replaces=True))
                records.extend(_entry_record(group, entry) for entry in ready.entries)
                durable = self.hard_state(group)
                if ready.hard_state is not None and ready.hard_state != durable:
                    if (ready.hard_state.term, ready.hard_state.voted_for) == (
                        durable.term,
                        durable.voted_for,
                    ):
                        # Only the commit index moved: Raft keeps it volatile (a restarted node
                        # learns it again from its leader), so it waits for a batch written
                        # anyway and never costs an fdatasync of its own.
                        self._pending_commits[group] = ready.hard_state
                        self.commit_only_deferred += 1
                    else:
                        self._pending_commits.pop(group, None)
                        records.append(_hard_state_record(group, ready.hard_state))
            if records:
                await self._append(self._with_pending_commits(records))

    def _with_pending_commits(self, records: list[Record]) -> list[Record]:
        """``records`` and the commit-only hard states waiting for a batch. Under the lock."""
        pending, self._pending_commits = self._pending_commits, {}
        records.extend(_hard_state_record(g, hs) for g, hs in sorted(pending.items()))
        self.hard_state_writes += sum(r.type == HARD_STATE_RECORD for r in records)
        return records

    def _check_ready(self, group: str, ready: Ready) -> None:
        """The checks :func:`_apply` makes, done before anything is written."""
        _check_group(group)
        state = self._groups.get(group) or _Group()
        snap_index, last = state.snap_index, state.last_index
        if ready.truncate_after is not None:
            if ready.truncate_after < snap_index:
                raise WalMismatchError(
                    f"{group}: truncation after {ready.truncate_after} is below the snapshot"
                    f" at {snap_index}"
                )
            last = min(last, ready.truncate_after)
        if ready.snapshot is not None:
            if ready.snapshot.index <= snap_index:
                raise WalMismatchError(
                    f"{group}: installing snapshot {ready.snapshot.index} at or below the"
                    f" durable one at {snap_index}"
                )
            last = ready.snapshot.index
        for entry in ready.entries:
            if entry.index != last + 1:
                raise WalMismatchError(
                    f"{group}: entry {entry.index} does not continue the log ending at {last}"
                )
            last = entry.index

    async def _append(self, records: list[Record]) -> None:
        """One batch; then the in-memory state follows what became durable. Under the lock."""
        if not records:
            return
        # Shielded: a batch that became durable must reach the in-memory state, or the next
        # Ready would be checked against a log that is not the disk's. (The wait ends when the
        # batch is durable or failed; closing the log fails it.)
        with trio.CancelScope(shield=True):
            positions = await self.log.append_many(records)
        moved: list[tuple[str, int]] = []
        for position, record in zip(positions, records, strict=True):
            change = _apply(
                self._groups,
                Record(record.type, record.body, record.version, record.term, position),
            )
            if change is not None:
                moved.append(change)
        if moved:
            targets = [
                (
                    self._snapshot_root / group,
                    (self._groups[group].snap_index, self._groups[group].snap_term),
                )
                for group, _ in moved
            ]
            await trio.to_thread.run_sync(_remove_all_superseded, targets)

    async def save_snapshot(self, group: str, snapshot: Snapshot) -> None:
        """Save what :meth:`RaftNode.compact` returned: its file, then a marker record (the
        group's entries after it stay). A snapshot an installation has overtaken is dropped."""
        _check_group(group)
        if snapshot.index <= self.snapshot_index(group):
            return
        await trio.to_thread.run_sync(
            _write_snapshot_files, self._snapshot_root, [(group, snapshot)]
        )
        self.snapshot_files_written += 1
        async with self._lock:
            state = self._groups.get(group)
            if state is None:
                state = _Group()
            if snapshot.index <= state.snap_index:
                path = self._snapshot_root / group / _snap_name(snapshot.index, snapshot.term)
                with contextlib.suppress(FileNotFoundError):
                    await trio.to_thread.run_sync(path.unlink)
                return
            if state.term_at(snapshot.index) != snapshot.term:
                raise WalMismatchError(
                    f"{group}: compaction at {snapshot.index} (term {snapshot.term}) but the"
                    f" durable log holds {state.snap_index + 1}..{state.last_index}"
                )
            await self._append(
                self._with_pending_commits([_marker_record(group, snapshot, replaces=False)])
            )

    async def remove_superseded_snapshots(self) -> int:
        """Delete every group's snapshot files older than its current one (their removal is
        best effort when a snapshot is adopted); how many could not be deleted."""
        async with self._lock:
            targets = [
                (self._snapshot_root / name, (group.snap_index, group.snap_term))
                for name, group in self._groups.items()
            ]
            await trio.to_thread.run_sync(_remove_all_superseded, targets)
            return await trio.to_thread.run_sync(_count_superseded, targets)

    async def seal(self) -> None:
        """Seal the active segment: one record (a group's hard state again, which changes
        nothing) goes into a new segment, so that a compaction can delete every earlier one."""
        async with self._lock:
            group = next((g for g in sorted(self._groups) if self._groups[g].hard_state.term), None)
            if group is None:
                return  # nothing was ever voted or written
            self.log.roll_at_next_append()
            hard_state = self._pending_commits.pop(group, self._groups[group].hard_state)
            await self._append(self._with_pending_commits([_hard_state_record(group, hard_state)]))

    async def compact(self, *, min_positions: int = 1) -> CompactResult:
        """Checkpoint the WAL so that it can drop every segment no group still needs.

        Does nothing unless the lowest needed position moved at least ``min_positions``
        past the WAL's current start. Segments are dropped as the SegmentLog compacts (sealed
        segments wholly at or below the checkpoint's position)."""
        async with self._lock:
            log = self.log
            before = log.first_index
            upto = log.last_index
            firsts = [g.positions[0] for g in self._groups.values() if g.positions]
            cut = min(firsts) - 1 if firsts else upto
            if cut - (before - 1) < min_positions:
                return CompactResult(before, before)
            data = _encode_checkpoint(upto, self._groups)
            await log.save_snapshot(cut, 0, data)
            return CompactResult(before, log.first_index)


def _remove_all_superseded(targets: Iterable[tuple[Path, tuple[int, int]]]) -> None:
    for directory, keep in targets:
        _remove_superseded(directory, keep)


def _recover_groups(log: SegmentLog) -> dict[str, _Group]:
    checkpoint = log.latest_snapshot()
    groups: dict[str, _Group] = {}
    upto = 0
    if checkpoint is not None:
        upto, groups = _decode_checkpoint(checkpoint.data, log.first_index)
    if log.last_index < upto:
        raise WalError(
            f"{log.directory}: the WAL ends at {log.last_index} but its checkpoint covers"
            f" records up to {upto}, which were durable"
        )
    for record in log.scan(upto + 1):
        _apply(groups, record)
    return groups


def _clean_snapshot_files(root: Path, groups: Mapping[str, _Group]) -> None:
    """Delete snapshot files no durable marker names (interrupted writes), check the named
    ones exist. Blocking."""
    if not root.exists():
        for name, state in groups.items():
            if state.snap_index:
                raise WalError(f"{root}: no snapshot files, but group {name} has a snapshot")
        return
    for directory in root.iterdir():
        if not directory.is_dir():
            continue
        for tmp in directory.glob("*" + _TMP_SUFFIX):
            tmp.unlink(missing_ok=True)
        owner = groups.get(directory.name)
        keep = (0, 0) if owner is None else (owner.snap_index, owner.snap_term)
        for index, term, path in _list_snapshot_files(directory):
            if (index, term) != keep:
                path.unlink()
    for name, state in groups.items():
        if state.snap_index:
            path = root / name / _snap_name(state.snap_index, state.snap_term)
            if not path.exists():
                raise WalError(f"{path}: group {name}'s snapshot file is missing")


class WalGroupStorage:
    """One group's view of a :class:`NodeWal`, with the methods the driver uses on
    :class:`~villaged.cluster.persist.GroupStorage` (the WAL's writer runs once per node:
    :meth:`NodeWal.run`, not here)."""

    def __init__(self, wal: NodeWal, group: str) -> None:
        _check_group(group)
        self.wal = wal
        self.group = group

    @property
    def hard_state(self) -> HardState:
        return self.wal.hard_state(self.group)

    def load(self) -> PersistedState:
        return self.wal.load(self.group)

    async def persist(self, ready: Ready) -> None:
        await self.wal.persist(self.group, ready)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.wal.save_snapshot(self.group, snapshot)

    async def persist_many(self, readies: Mapping[str, Ready]) -> None:
        """The batched path: every group's Ready of one cycle (any groups of this WAL)."""
        await self.wal.persist_many(readies)

    def close(self) -> None:
        """Nothing per group: the node closes the WAL."""
