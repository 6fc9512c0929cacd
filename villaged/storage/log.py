"""The segment log: durable, indexed, append-only records, with snapshots and compaction.

This module owns one log directory: its segment files (``{base:020d}.seg``), its snapshot files
(``{index:020d}.snap``), recovery when it is opened, the group-commit writer task, and the
offline checker :func:`verify_log`. The bytes inside the files belong to
:mod:`villaged.storage.segment`. Locking the directory against a second process is the store's
job, not this module's.

Theory of operation
-------------------

*Planned versus durable.* Two views of the log's end are kept. ``_next_index`` (with
``_planned_bytes``, ``_planned_term``) moves synchronously when ``append`` is called: the record
gets its index, is encoded once, framed into the open batch's ``bytearray`` and waits.
``_last_index`` (with each segment's ``offsets``/``size`` and the term runs) moves only when a
batch is durable. Reads see durable entries only, so nothing unacknowledged is ever visible.

*Group commit.* The writer task (``run``) takes one item at a time from ``_queue``. For a batch
it makes one ``pwrite`` + one ``fdatasync`` in a worker thread and then sets the batch's single
``trio.Event``, waking every appender of that batch at once. While that thread runs, new
appends go into the next batch, so batches grow with load by themselves. Every record carries
the first index of its batch (``"B"``, see :mod:`villaged.storage.records`), which is why a
record's batch is chosen before it is encoded. A batch never spans two segments: the append
that finds the targeted segment at ``segment_bytes`` or more opens a batch marked
``new_segment``, and the writer rolls (fsync old segment, create new file, fsync directory)
before writing it. An ``append_many`` call is one batch, never split: it rolls first when its
frames would not fit in what is left of the segment, and a call larger than ``segment_bytes``
makes a segment that large. Queued bytes are bounded by ``max_pending_bytes``; appends beyond
that wait before they get an index.

*Failure.* If a batch's write or fdatasync fails, that batch and every batch queued behind it
fail with ``LogWriteError``, the active file is cut back to its durable size (ftruncate + fsync)
and ``_next_index`` rolls back to ``_last_index + 1``; the log stays usable. If the cut itself
fails, nothing about the file's tail can be trusted any more: the log enters the failed state
and only closing it is possible. Durable bytes are never rewritten: writes only ever go past
the durable size, and cuts only ever remove bytes that were never acknowledged (or that
``truncate_after`` was asked to drop).

*Control operations.* ``truncate_after`` and ``install_snapshot`` change where the next index
goes, so they run inside the writer as jobs that close the append gate: appends made after
them wait, and the jobs run after every batch queued before them. ``save_snapshot`` writes its
file in its own thread and then queues a (non-gating) compaction job. All three are serialized
by ``_control_lock`` and wait for their job shielded from cancellation, so a snapshot file is
never left adopted-by-disk but not by memory.

*Crash safety of multi-file changes.* Files are removed in an order that always leaves a
contiguous log behind: compaction deletes oldest first, truncation and snapshot installation
delete newest first, and a snapshot file is durable before anything it covers is removed. An
installed snapshot that replaces the log says so in its file (``replaces_log``), and the
oldest replaced segment, whose base is at or below the snapshot's index, is removed only once
the others are durably gone: so "latest snapshot replaces the log and a segment starts at or
below it" means exactly "an installation was interrupted". Recovery finishes that, and an
interrupted compaction; any other disagreement between the snapshot and the segments is
corruption, never a reason to delete segments.

*Recovery of the newest segment.* A crash can leave the final batch torn, and only that batch
may be cut. After the first bad frame, recovery looks for whole frames further on
(:func:`~villaged.storage.segment.assess_damage`): one written by a later batch proves the
damaged batch was durable, hence acknowledged, and the log refuses to open
(:class:`CorruptionError`) rather than cut acknowledged records. A cut that would end the log
below the latest snapshot's index is refused for the same reason (the snapshot shows those
entries were durable). Frame lengths are checked against the format's hard cap, never against
``max_record_bytes``, which limits new appends only.

*File descriptors.* Each segment keeps one read-write descriptor for reads (``pread``, on the
event loop: durable data is in the page cache) and, for the active one, writes. Only the writer
task (or ``close`` when no writer runs) closes descriptors, so a descriptor number is never
reused under a worker thread that still holds it.
"""

from __future__ import annotations

import bisect
import errno
import logging
import operator
import os
import time
import zlib
from array import array
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from villaged.background import running_in_background
from villaged.storage.errors import (
    CorruptionError,
    IndexOutOfRange,
    LogWriteError,
    RecordTooLargeError,
    StorageError,
)
from villaged.storage.records import Record, encode_record
from villaged.storage.segment import (
    FRAME_HEADER,
    HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    SEGMENT_SUFFIX,
    SNAPSHOT_SUFFIX,
    TMP_SUFFIX,
    FrameError,
    SegmentScan,
    SnapshotContents,
    assess_damage,
    decode_record_frame,
    decode_snapshot,
    encode_snapshot,
    parse_segment_file_name,
    parse_snapshot_file_name,
    scan_segment,
    segment_file_name,
    snapshot_file_name,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
    from pathlib import Path

logger = logging.getLogger("villaged.storage")

DEFAULT_SEGMENT_BYTES = 64 * 2**20
DEFAULT_MAX_RECORD_BYTES = 2**20
DEFAULT_MAX_PENDING_BYTES = 32 * 2**20
#: Snapshot files kept after a new one is saved (the newest is the one in use).
SNAPSHOTS_KEPT = 2
#: ``scan`` reads segments in pieces of about this size, so its memory stays bounded.
_SCAN_CHUNK_BYTES = 2**20

_pack_header = FRAME_HEADER.pack
_crc32 = zlib.crc32
_segment_base = operator.attrgetter("base")


class FileOps(Protocol):
    """The file system calls the log makes on data it must make durable.

    Tests inject failures (ENOSPC, EIO) through it; the benchmark counts syncs through it.
    Calls are made from worker threads, never on the event loop.
    """

    def write(self, fd: int, data: memoryview, offset: int) -> int: ...
    def fdatasync(self, fd: int) -> None: ...
    def fsync(self, fd: int) -> None: ...
    def ftruncate(self, fd: int, length: int) -> None: ...


class OsFileOps:
    """:class:`FileOps` straight onto ``os``."""

    def write(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State up to and including ``index`` (whose entry had ``term``), as opaque bytes."""

    index: int
    term: int
    data: bytes


class _Segment:
    """One segment file: where each durable frame starts, and the durable size."""

    __slots__ = ("base", "fd", "offsets", "path", "size")

    def __init__(self, base: int, path: Path, fd: int) -> None:
        self.base = base
        self.path = path
        self.fd = fd
        self.offsets: array[int] = array("Q")
        self.size = 0

    @property
    def last_index(self) -> int:
        return self.base + len(self.offsets) - 1


class _TermRuns:
    """Term of every durable entry, stored as runs: ``starts[i]`` is the first index with
    ``terms[i]``. Terms change rarely, so this stays tiny however long the log is."""

    __slots__ = ("starts", "terms")

    def __init__(self) -> None:
        self.starts: array[int] = array("Q")
        self.terms: array[int] = array("Q")

    def add(self, index: int, term: int) -> None:
        if not self.terms or self.terms[-1] != term:
            self.starts.append(index)
            self.terms.append(term)

    def term_at(self, index: int) -> int:
        # Callers check that ``index`` is a durable entry, so a run covers it.
        return self.terms[bisect.bisect_right(self.starts, index) - 1]

    def truncate_after(self, index: int) -> None:
        keep = bisect.bisect_right(self.starts, index)
        del self.starts[keep:]
        del self.terms[keep:]

    def drop_before(self, index: int) -> None:
        first_kept = bisect.bisect_right(self.starts, index) - 1
        if first_kept > 0:
            del self.starts[:first_kept]
            del self.terms[:first_kept]


class _Batch:
    """Appends that become durable together: their frames, and the event that wakes them."""

    __slots__ = ("buf", "done", "error", "first_index", "new_segment", "offsets", "term_changes")

    def __init__(self, first_index: int, *, new_segment: bool) -> None:
        self.first_index = first_index
        self.new_segment = new_segment
        self.buf = bytearray()
        self.offsets: array[int] = array("Q")
        self.term_changes: list[tuple[int, int]] = []
        self.done = trio.Event()
        self.error: str | None = None


class Appended:
    """A record handed to the log by :meth:`SegmentLog.submit`: its index, and its batch."""

    __slots__ = ("_batch", "index")

    def __init__(self, index: int, batch: _Batch) -> None:
        self.index = index
        self._batch = batch

    @property
    def durable(self) -> bool:
        """Whether the record is durable now (``wait`` would return without waiting)."""
        return self._batch.done.is_set() and self._batch.error is None

    async def wait(self) -> int:
        """Return the index once the record is durable; LogWriteError if its batch failed."""
        await self._batch.done.wait()
        if self._batch.error is not None:
            raise LogWriteError(self._batch.error)
        return self.index


class _Job:
    """A control operation the writer runs between batches."""

    __slots__ = ("action", "done", "error", "gates_appends")

    def __init__(self, action: Callable[[], Awaitable[None]], *, gates_appends: bool) -> None:
        self.action = action
        self.gates_appends = gates_appends
        self.done = trio.Event()
        self.error: Exception | None = LogWriteError("the log writer stopped before this ran")


class SegmentLog:
    """A durable log of :class:`Record` in one directory; see the module docstring.

    Build it with :meth:`open` (or :func:`open_segment_log`) and run :meth:`run` in a nursery:
    appends and control operations wait for the writer task.
    """

    def __init__(
        self,
        *,
        directory: Path,
        dir_fd: int,
        segments: list[_Segment],
        terms: _TermRuns,
        snapshot: Snapshot | None,
        ops: FileOps,
        segment_bytes: int,
        max_record_bytes: int,
        max_pending_bytes: int,
    ) -> None:
        self._directory = directory
        self._dir_fd = dir_fd
        self._segments = segments
        self._terms = terms
        self._snapshot = snapshot
        self._ops = ops
        self._segment_bytes = segment_bytes
        self._max_record_bytes = max_record_bytes
        self._max_pending_bytes = max_pending_bytes

        self._last_index = segments[-1].last_index
        # Planned state: where the next append goes (see "Planned versus durable").
        self._next_index = self._last_index + 1
        self._planned_term: int | None = None
        self._planned_bytes = segments[-1].size
        self._pending_bytes = 0

        self._queue: deque[_Batch | _Job] = deque()
        self._open_batch: _Batch | None = None
        self._writer_idle: trio.Event | None = None
        self._admission: trio.Event | None = None
        self._gating_jobs = 0
        self._control_lock = trio.Lock()

        self._running = False
        self._closed = False
        self._fds_closed = False
        self._failure: str | None = None

        #: Called by the writer, with the new last durable index, each time a batch has
        #: become durable and before its appenders wake (the store applies records here, so
        #: that a durable record reaches the views whether or not its appender still waits).
        #: It must not raise and must not block.
        self.on_durable: Callable[[int], None] | None = None
        #: Called by the writer with each durable batch's seconds for write plus fdatasync
        #: (as the writer waited for them) and for the fdatasync alone (for metrics).
        #: It must not raise and must not block.
        self.on_batch_written: Callable[[float, float], None] | None = None

        #: Batches and records made durable since open (for metrics and the benchmark).
        self.batches_written = 0
        self.records_written = 0

    # ---------------------------------------------------------------- opening and recovery

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        file_ops: FileOps | None = None,
    ) -> SegmentLog:
        """Open (creating if absent) and recover the log in ``directory``. Blocking.

        Recovery cuts a torn final batch off the newest segment (logged as
        ``storage.tail_truncated``), raises :class:`CorruptionError` for any other damage, and
        finishes an interrupted compaction or snapshot installation. ``max_record_bytes``
        limits new appends only: records already written stay readable whatever it is.
        """
        if segment_bytes < 1 or max_record_bytes < 1 or max_pending_bytes < 1:
            raise ValueError("segment_bytes, max_record_bytes and max_pending_bytes must be > 0")
        if max_record_bytes > MAX_RECORD_PAYLOAD:
            raise ValueError(f"max_record_bytes cannot exceed {MAX_RECORD_PAYLOAD}")
        ops = file_ops if file_ops is not None else OsFileOps()
        created = not directory.exists()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            _fsync_dir(ops, directory.parent)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        segments: list[_Segment] = []
        try:
            snapshot, terms = _recover(directory, dir_fd, ops, segments)
        except BaseException:
            for segment in segments:
                _close_fd(segment)
            os.close(dir_fd)
            raise
        return cls(
            directory=directory,
            dir_fd=dir_fd,
            segments=segments,
            terms=terms,
            snapshot=snapshot,
            ops=ops,
            segment_bytes=segment_bytes,
            max_record_bytes=max_record_bytes,
            max_pending_bytes=max_pending_bytes,
        )

    # ---------------------------------------------------------------- reading

    @property
    def first_index(self) -> int:
        """First index still in the log: 1, or the latest snapshot's index + 1."""
        return 1 if self._snapshot is None else self._snapshot.index + 1

    @property
    def last_index(self) -> int:
        """Last durable index (``first_index - 1`` when the log holds no entries)."""
        return self._last_index

    @property
    def directory(self) -> Path:
        return self._directory

    def term_at(self, index: int) -> int:
        """Term of the entry at ``index``; also answers for ``first_index - 1`` (the snapshot's
        term, or 0 before any snapshot)."""
        first = self.first_index
        if index == first - 1:
            return 0 if self._snapshot is None else self._snapshot.term
        if not first <= index <= self._last_index:
            raise IndexOutOfRange(
                f"no term for index {index}: the log holds [{first}, {self._last_index}]"
            )
        return self._terms.term_at(index)

    def latest_snapshot(self) -> Snapshot | None:
        return self._snapshot

    def read(self, index: int) -> Record:
        """The durable record at ``index``."""
        self._check_readable()
        first = self.first_index
        if not first <= index <= self._last_index:
            raise IndexOutOfRange(f"index {index} is outside the log [{first}, {self._last_index}]")
        segment = self._segment_for(index)
        position = index - segment.base
        start = segment.offsets[position]
        end = segment.offsets[position + 1] if position + 1 < len(segment.offsets) else segment.size
        data = os.pread(segment.fd, end - start, start)
        record, _ = self._decode_frame(segment, data, 0, start, index)
        return record

    def scan(self, start: int, stop: int | None = None) -> Iterator[Record]:
        """Durable records ``start..stop`` inclusive (``stop`` defaults to ``last_index``).

        An empty range (``stop == start - 1``) is fine; anything outside the log raises
        :class:`IndexOutOfRange` now. Records are read lazily in bounded pieces; if the log is
        truncated or compacted below a record before the iterator reaches it, the iterator
        raises :class:`IndexOutOfRange` rather than ending early.
        """
        self._check_readable()
        last = self._last_index if stop is None else stop
        first = self.first_index
        if start < first or last > self._last_index or start > last + 1:
            raise IndexOutOfRange(
                f"range [{start}, {last}] is outside the log [{first}, {self._last_index}]"
            )
        return self._scan(start, last)

    def _scan(self, start: int, stop: int) -> Iterator[Record]:
        index = start
        while index <= stop:
            self._check_still_there(index)
            segment = self._segment_for(index)
            offsets = segment.offsets
            count = len(offsets)
            first = index - segment.base
            end = min(stop - segment.base + 1, count)  # exclusive, within this segment
            start_offset = offsets[first]
            limit = start_offset + _SCAN_CHUNK_BYTES
            # offsets[k] is where frame k-1 ends: take whole frames up to ``limit``, at least one.
            fit = bisect.bisect_right(offsets, limit, first + 1, end)
            upto = max(fit - 1, first + 1)
            if fit == end and (offsets[end] if end < count else segment.size) <= limit:
                upto = end
            end_offset = offsets[upto] if upto < count else segment.size
            data = os.pread(segment.fd, end_offset - start_offset, start_offset)
            position = 0
            for expected in range(index, segment.base + upto):
                record, position = self._decode_frame(
                    segment, data, position, start_offset, expected
                )
                # The chunk was read earlier: do not hand out what has since been dropped.
                self._check_still_there(expected)
                yield record
            index = segment.base + upto

    def _check_still_there(self, index: int) -> None:
        self._check_readable()
        if not self.first_index <= index <= self._last_index:
            raise IndexOutOfRange(f"entry {index} was removed while it was being scanned")

    def _segment_for(self, index: int) -> _Segment:
        return self._segments[bisect.bisect_right(self._segments, index, key=_segment_base) - 1]

    def _decode_frame(
        self, segment: _Segment, data: bytes, position: int, file_offset: int, index: int
    ) -> tuple[Record, int]:
        try:
            record, end = decode_record_frame(data, position, max_payload=MAX_RECORD_PAYLOAD)
        except FrameError as exc:
            raise CorruptionError(segment.path, file_offset + exc.offset, exc.reason) from exc
        if record.index != index:
            raise CorruptionError(
                segment.path,
                file_offset + position,
                f"record index {record.index} where index {index} was expected",
            )
        return record, end

    def _check_readable(self) -> None:
        if self._closed:
            raise StorageError(f"{self._directory}: log is closed")

    # ---------------------------------------------------------------- appending

    async def append(self, record: Record) -> int:
        """Append ``record`` (its ``index`` is ignored, its ``term`` kept); return its index once
        it is durable.

        The index is assigned when the call is made, so indexes follow call order. If the
        caller is cancelled while waiting, the record may still become durable. Raises
        :class:`RecordTooLargeError` or :class:`~villaged.storage.records.RecordEncodeError`
        (nothing written, no index used) or :class:`LogWriteError`.
        """
        appended = await self.submit(record)
        return await appended.wait()

    async def submit(self, record: Record) -> Appended:
        """The first half of :meth:`append`: give ``record`` its index and frame it into the
        open batch, without waiting for it to become durable (``Appended.wait`` does that).

        Waits only when the queue is full or a control job holds the gate; once it returns
        the record is queued and will become durable unless its batch fails. A caller can
        so hand over several records in order, one after another, and wait for all of them
        at once. Raises as :meth:`append` does before anything is written.
        """
        if self._gating_jobs or self._pending_bytes >= self._max_pending_bytes or self._closed:
            await self._admit()
        elif self._failure is not None:
            raise LogWriteError(self._failure)
        index = self._next_index
        # The batch this frame joins, as ``_add_frame`` will choose it (the record names it).
        batch = self._open_batch
        if batch is None or self._planned_bytes >= self._segment_bytes:
            batch_start = index
        else:
            batch_start = batch.first_index
        payload = encode_record(
            Record(record.type, record.body, record.version, record.term, index),
            batch=batch_start,
        )
        if len(payload) > self._max_record_bytes:
            raise self._too_large(payload)
        batch = self._add_frame(index, record.term, payload)
        self._next_index = index + 1
        return Appended(index, batch)

    @property
    def oldest_on_disk(self) -> int:
        """The first index the oldest segment file holds (records before it are gone from
        the disk; after a compaction, records from here to ``first_index - 1`` may remain in
        a segment that also holds live ones)."""
        return self._segments[0].base

    def roll_at_next_append(self) -> None:
        """Start a new segment with the next append, sealing the active one (if it holds
        anything): a later compaction that covers it can then delete it whole."""
        if self._planned_bytes > 0:
            self._planned_bytes = max(self._planned_bytes, self._segment_bytes)

    async def append_many(self, records: Sequence[Record]) -> list[int]:
        """Append ``records`` at consecutive indexes, all in one batch (one ``fdatasync``).

        Either all are acknowledged or the call raises; if it raises none of them is in the
        log. The batch never spans segments: if its frames would not fit in what is left of
        the active segment, the segment is rolled first, and a batch larger than
        ``segment_bytes`` makes a segment that large.
        """
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        await self._admit()
        first = self._next_index
        planned = self._planned_bytes
        open_batch = self._open_batch
        if planned >= self._segment_bytes:
            open_batch = None  # full: the next frame starts a batch (and a segment)
        payloads = self._encode_many(
            records, first, first if open_batch is None else open_batch.first_index
        )
        size = sum(map(len, payloads)) + HEADER_SIZE * len(payloads)
        roll = planned > 0 and planned + size > self._segment_bytes
        if roll and open_batch is not None:
            # A batch of its own after all, so the records name another batch start.
            payloads = self._encode_many(records, first, first)
        for payload in payloads:
            if len(payload) > self._max_record_bytes:
                raise self._too_large(payload)
        if roll:
            batch = self._new_batch(first, new_segment=True)
            self._planned_bytes = 0
        elif open_batch is None:
            batch = self._new_batch(first, new_segment=False)
        else:
            batch = open_batch
        for offset, (record, payload) in enumerate(zip(records, payloads, strict=True)):
            self._frame_into(batch, first + offset, record.term, payload)
        self._next_index = first + len(records)
        await batch.done.wait()
        if batch.error is not None:
            raise LogWriteError(batch.error)
        return list(range(first, first + len(records)))

    @staticmethod
    def _encode_many(records: Sequence[Record], first: int, batch_start: int) -> list[bytes]:
        return [
            encode_record(
                Record(r.type, r.body, r.version, r.term, first + offset), batch=batch_start
            )
            for offset, r in enumerate(records)
        ]

    def _too_large(self, payload: bytes) -> RecordTooLargeError:
        return RecordTooLargeError(
            f"encoded record of {len(payload)} bytes exceeds max_record_bytes"
            f" ({self._max_record_bytes})"
        )

    async def _admit(self) -> None:
        """Wait until an append may take an index: no gating job pending, room in the queue."""
        while True:
            if self._closed:
                raise LogWriteError(f"{self._directory}: log is closed")
            if self._failure is not None:
                raise LogWriteError(self._failure)
            if not self._gating_jobs and self._pending_bytes < self._max_pending_bytes:
                return
            if self._admission is None:
                self._admission = trio.Event()
            await self._admission.wait()

    def _add_frame(self, index: int, term: int, payload: bytes) -> _Batch:
        """Frame ``payload`` into the batch it belongs to (the hot path: keep it lean)."""
        batch = self._open_batch
        if self._planned_bytes >= self._segment_bytes:
            batch = self._new_batch(index, new_segment=True)
            self._planned_bytes = 0
        elif batch is None:
            batch = self._new_batch(index, new_segment=False)
        self._frame_into(batch, index, term, payload)
        return batch

    def _frame_into(self, batch: _Batch, index: int, term: int, payload: bytes) -> None:
        buf = batch.buf
        batch.offsets.append(len(buf))
        buf += _pack_header(len(payload), _crc32(payload))
        buf += payload
        if term != self._planned_term:
            batch.term_changes.append((index, term))
            self._planned_term = term
        frame_bytes = HEADER_SIZE + len(payload)
        self._planned_bytes += frame_bytes
        self._pending_bytes += frame_bytes

    def _new_batch(self, first_index: int, *, new_segment: bool) -> _Batch:
        batch = _Batch(first_index, new_segment=new_segment)
        self._queue.append(batch)
        self._open_batch = batch
        self._wake_writer()
        return batch

    def _wake_writer(self) -> None:
        if self._writer_idle is not None:
            self._writer_idle.set()
            self._writer_idle = None

    def _notify_admission(self) -> None:
        if self._admission is not None:
            self._admission.set()
            self._admission = None

    # ---------------------------------------------------------------- the writer task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: makes batches durable and runs control jobs, one at a time.

        Returns after :meth:`close`; if cancelled, closes the log (pending appends fail). The
        descriptors are closed when this returns.
        """
        if self._running:
            raise RuntimeError("the log writer is already running")
        if self._closed:
            raise LogWriteError(f"{self._directory}: log is closed")
        self._running = True
        task_status.started()
        try:
            while not self._closed:
                if not self._queue:
                    self._writer_idle = trio.Event()
                    await self._writer_idle.wait()
                    continue
                item = self._queue.popleft()
                if item is self._open_batch:
                    self._open_batch = None
                if isinstance(item, _Batch):
                    try:
                        await self._write_batch(item)
                    except BaseException:
                        # Cancelled between the roll and the write, or a bug: either way
                        # this batch was not made durable, and its appenders must hear so.
                        if not item.done.is_set():
                            item.error = f"{self._directory}: the log writer stopped"
                            item.done.set()
                        raise
                else:
                    await self._run_job(item)
                self._notify_admission()
        finally:
            self._running = False
            self.close()
            self._close_fds()

    async def _write_batch(self, batch: _Batch) -> None:
        if self._failure is not None:
            self._fail_queued(batch, self._failure)
            return
        active = self._segments[-1]
        if batch.new_segment and active.base != batch.first_index:
            try:
                active = await self._roll(batch.first_index)
            except OSError as exc:
                self._fail_queued(batch, f"could not start a new segment: {exc}")
                return
        offset = active.size
        data = batch.buf
        started = time.perf_counter()
        error, rollback_error, fsync_seconds = await trio.to_thread.run_sync(
            _write_durably, self._ops, active.fd, data, offset
        )
        append_seconds = time.perf_counter() - started
        # No checkpoint between here and the end: the in-memory state must follow the disk.
        if error is not None:
            reason = f"{active.path}: write at offset {offset} failed: {error}"
            if rollback_error is not None:
                self._enter_failed_state(
                    f"{reason}; cutting the file back also failed: {rollback_error}"
                )
            self._fail_queued(batch, reason)
            return
        offsets = active.offsets
        if offset:
            offsets.extend([offset + relative for relative in batch.offsets])
        else:
            offsets.extend(batch.offsets)
        active.size = offset + len(data)
        for index, term in batch.term_changes:
            self._terms.add(index, term)
        self._last_index = batch.first_index + len(batch.offsets) - 1
        self._pending_bytes -= len(data)
        self.batches_written += 1
        self.records_written += len(batch.offsets)
        if self.on_batch_written is not None:
            self.on_batch_written(append_seconds, fsync_seconds)
        if self.on_durable is not None:
            self.on_durable(self._last_index)
        batch.done.set()

    async def _roll(self, base: int) -> _Segment:
        path = self._directory / segment_file_name(base)
        try:
            fd = await trio.to_thread.run_sync(
                _create_segment, self._ops, self._segments[-1].fd, self._dir_fd, path
            )
        except _UndoFailedError as exc:
            self._enter_failed_state(str(exc))
            raise
        segment = _Segment(base, path, fd)
        self._segments.append(segment)
        return segment

    def _fail_queued(self, batch: _Batch, reason: str) -> None:
        """Fail ``batch`` and every batch queued behind it; roll the planned state back."""
        batch.error = reason
        batch.done.set()
        kept: deque[_Batch | _Job] = deque()
        for item in self._queue:
            if isinstance(item, _Batch):
                item.error = reason
                item.done.set()
            else:
                kept.append(item)
        self._queue = kept
        self._open_batch = None
        self._reset_planning()
        logger.error(
            "log append batch failed: %s",
            reason,
            extra={"event": "storage.append_failed", "reason": reason},
        )

    def _reset_planning(self) -> None:
        self._next_index = self._last_index + 1
        self._planned_term = None
        self._planned_bytes = self._segments[-1].size
        self._pending_bytes = 0

    def _enter_failed_state(self, reason: str) -> None:
        if self._failure is None:
            self._failure = f"log is in the failed state: {reason}"
            logger.critical(
                "log entered the failed state: %s",
                reason,
                extra={"event": "storage.log_failed", "reason": reason},
            )

    async def _run_job(self, job: _Job) -> None:
        try:
            await job.action()
        except (StorageError, ValueError) as exc:
            job.error = exc
        else:
            job.error = None
        finally:
            if job.gates_appends:
                self._gating_jobs -= 1
            job.done.set()

    async def _submit(self, action: Callable[[], Awaitable[None]], *, gates_appends: bool) -> None:
        """Queue a control job and wait for it, shielded: once queued it will run, and the
        caller must not let the next control operation start before it has."""
        self._check_control()
        job = _Job(action, gates_appends=gates_appends)
        if gates_appends:
            self._gating_jobs += 1
        self._queue.append(job)
        # Appends made from now on belong after the job.
        self._open_batch = None
        self._wake_writer()
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error

    def _check_control(self) -> None:
        if self._closed:
            raise LogWriteError(f"{self._directory}: log is closed")
        if self._failure is not None:
            raise LogWriteError(self._failure)
        if not self._running:
            raise LogWriteError(f"{self._directory}: the log writer is not running")

    # ---------------------------------------------------------------- control operations

    async def truncate_after(self, index: int) -> None:
        """Durably drop every entry after ``index`` (Raft's log conflict resolution)."""
        async with self._control_lock:
            await self._submit(partial(self._truncate_job, index), gates_appends=True)

    async def _truncate_job(self, index: int) -> None:
        if self._failure is not None:
            raise LogWriteError(self._failure)
        if index < self.first_index - 1:
            raise IndexOutOfRange(
                f"cannot truncate after {index}: entries up to {self.first_index - 1}"
                " are in a snapshot"
            )
        if index >= self._last_index:
            return
        position = bisect.bisect_right(self._segments, index + 1, key=_segment_base) - 1
        target = self._segments[position]
        removed = self._segments[position + 1 :]
        cut_position = index + 1 - target.base
        cut = target.offsets[cut_position]
        # Entries above ``index`` stop being readable before their bytes go.
        self._last_index = index
        try:
            await trio.to_thread.run_sync(
                _truncate_files,
                self._ops,
                self._dir_fd,
                [segment.path for segment in reversed(removed)],
                target.fd,
                cut,
            )
        except OSError as exc:
            self._enter_failed_state(f"truncating after index {index} failed: {exc}")
            raise LogWriteError(self._failure or str(exc)) from exc
        for segment in removed:
            _close_fd(segment)
        del self._segments[position + 1 :]
        del target.offsets[cut_position:]
        target.size = cut
        self._terms.truncate_after(index)
        self._reset_planning()

    async def save_snapshot(self, index: int, term: int, data: bytes) -> None:
        """Durably save a snapshot of the state through ``index``, then compact.

        ``index`` must be a durable entry (or the current snapshot's index) and ``term`` its
        term. Afterwards ``first_index == index + 1``; sealed segments whose entries are all
        covered are deleted, and only the :data:`SNAPSHOTS_KEPT` newest snapshot files remain.
        """
        async with self._control_lock:
            self._check_control()
            if not self.first_index - 1 <= index <= self._last_index:
                raise IndexOutOfRange(
                    f"cannot snapshot at {index}: the log holds"
                    f" [{self.first_index}, {self._last_index}]"
                )
            if self.term_at(index) != term:
                raise ValueError(
                    f"snapshot term {term} does not match term {self.term_at(index)}"
                    f" of entry {index}"
                )
            snapshot = Snapshot(index, term, bytes(data))
            await trio.to_thread.run_sync(
                _write_snapshot_file, self._ops, self._directory, snapshot
            )
            await self._submit(partial(self._adopt_snapshot, snapshot), gates_appends=False)

    async def _adopt_snapshot(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` (already durable on disk) the log's, and delete what it covers."""
        self._snapshot = snapshot
        self._terms.drop_before(snapshot.index + 1)
        covered = 0
        for segment in self._segments[:-1]:
            if segment.last_index > snapshot.index:
                break
            covered += 1
        if not covered:
            return
        doomed = self._segments[:covered]
        removed, error = await trio.to_thread.run_sync(
            _remove_oldest_first, self._ops, self._dir_fd, [s.path for s in doomed]
        )
        for segment in doomed[:removed]:
            _close_fd(segment)
        del self._segments[:removed]
        if error is not None:
            # Not fatal: the files hold nothing the log still needs, and the next compaction
            # (or recovery) removes them.
            logger.warning(
                "log compaction could not delete %s: %s",
                doomed[removed].path,
                error,
                extra={"event": "storage.compaction_failed", "path": str(doomed[removed].path)},
            )

    async def install_snapshot(self, index: int, term: int, data: bytes) -> None:
        """Adopt a snapshot from elsewhere (Raft InstallSnapshot).

        If the log already holds ``index`` with ``term``, this is :meth:`save_snapshot` and the
        entries after it stay. Otherwise the whole log is replaced: the next append gets
        ``index + 1``. A snapshot at or below the current one is ignored.
        """
        async with self._control_lock:
            snapshot = Snapshot(index, term, bytes(data))
            await self._submit(partial(self._install_job, snapshot), gates_appends=True)

    async def _install_job(self, snapshot: Snapshot) -> None:
        if self._failure is not None:
            raise LogWriteError(self._failure)
        if snapshot.index <= self.first_index - 1:
            return
        keeps_suffix = snapshot.index <= self._last_index and (
            self._terms.term_at(snapshot.index) == snapshot.term
        )
        await trio.to_thread.run_sync(
            partial(
                _write_snapshot_file,
                self._ops,
                self._directory,
                snapshot,
                replaces_log=not keeps_suffix,
            )
        )
        if keeps_suffix:
            await self._adopt_snapshot(snapshot)
            return
        old = list(self._segments)
        self._snapshot = snapshot
        self._last_index = snapshot.index
        path = self._directory / segment_file_name(snapshot.index + 1)
        try:
            fd = await trio.to_thread.run_sync(
                _replace_segments,
                self._ops,
                self._dir_fd,
                [segment.path for segment in reversed(old)],
                path,
            )
        except OSError as exc:
            self._enter_failed_state(f"installing snapshot {snapshot.index} failed: {exc}")
            raise LogWriteError(self._failure or str(exc)) from exc
        for segment in old:
            _close_fd(segment)
        self._segments[:] = [_Segment(snapshot.index + 1, path, fd)]
        self._terms = _TermRuns()
        self._reset_planning()

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop the log: queued appends and jobs fail with :class:`LogWriteError`.

        Idempotent. Descriptors are closed now if no writer runs, else when :meth:`run`
        returns (right after any write in flight completes).
        """
        if self._closed:
            return
        self._closed = True
        reason = f"{self._directory}: log closed before the append was durable"
        for item in self._queue:
            if isinstance(item, _Batch):
                item.error = reason
            else:
                item.error = LogWriteError(reason)
                if item.gates_appends:
                    self._gating_jobs -= 1
            item.done.set()
        self._queue.clear()
        self._open_batch = None
        self._wake_writer()
        self._notify_admission()
        if not self._running:
            self._close_fds()

    def _close_fds(self) -> None:
        if self._fds_closed:
            return
        self._fds_closed = True
        for segment in self._segments:
            _close_fd(segment)
        os.close(self._dir_fd)


@asynccontextmanager
async def open_segment_log(directory: Path, **kwargs: Any) -> AsyncIterator[SegmentLog]:
    """Open the log (in a worker thread: recovery reads every segment), run its writer in a
    nursery of its own, and close it on exit."""
    log = await trio.to_thread.run_sync(partial(SegmentLog.open, directory, **kwargs))
    try:
        async with running_in_background(log.run, log.close):
            yield log
    finally:
        log.close()


# -------------------------------------------------------------------- recovery


def _recover(
    directory: Path, dir_fd: int, ops: FileOps, segments: list[_Segment]
) -> tuple[Snapshot | None, _TermRuns]:
    """Fill ``segments`` (opened so far, so the caller can close them on error) from disk."""
    segment_files, snapshot_files = _list_log_files(directory, remove_tmp=True)
    latest = _load_snapshot(snapshot_files[-1][1]) if snapshot_files else None
    for _, stale in snapshot_files[:-SNAPSHOTS_KEPT]:
        stale.unlink(missing_ok=True)
    snapshot = None if latest is None else Snapshot(latest.index, latest.term, latest.data)
    if latest is not None and _install_leftovers(latest, segment_files):
        logger.warning(
            "log %s: finishing an interrupted snapshot installation at index %d",
            directory,
            latest.index,
            extra={"event": "storage.snapshot_install_resumed", "index": latest.index},
        )
        _remove_replaced_segments(ops, dir_fd, [path for _, path in reversed(segment_files)])
        segment_files = []

    terms = _TermRuns()
    for position, (base, path) in enumerate(segment_files):
        if segments and base != segments[-1].last_index + 1:
            raise CorruptionError(
                path,
                0,
                f"segment starts at index {base} but the previous segment ends at"
                f" {segments[-1].last_index}",
            )
        segment = _Segment(base, path, os.open(path, os.O_RDWR | os.O_CLOEXEC))
        segments.append(segment)
        data = path.read_bytes()
        scan = scan_segment(data, base=base)
        if scan.damage is not None:
            newest = position == len(segment_files) - 1
            _cut_torn_tail(ops, segment, data, scan, snapshot, newest=newest)
        segment.offsets = scan.offsets
        segment.size = scan.valid_bytes
        for index, term in scan.term_changes:
            terms.add(index, term)

    if snapshot is None:
        if segments and segments[0].base != 1:
            raise CorruptionError(
                segments[0].path,
                0,
                f"log starts at index {segments[0].base} and no snapshot covers the entries"
                " before it",
            )
    elif segments:
        terms = _reconcile_with_snapshot(ops, dir_fd, snapshot, segments, terms)
    elif latest is not None and not latest.replaces_log:
        raise CorruptionError(
            snapshot_files[-1][1],
            0,
            f"no segment files, but the log that saved this snapshot kept its active segment:"
            f" the entries after index {latest.index} are missing",
        )
    if not segments:
        base = 1 if snapshot is None else snapshot.index + 1
        path = directory / segment_file_name(base)
        segments.append(_Segment(base, path, _create_file(path)))
        ops.fsync(dir_fd)
    return snapshot, terms


def _install_leftovers(latest: SnapshotContents, segment_files: list[tuple[int, Path]]) -> bool:
    """Whether ``segment_files`` are what an interrupted installation of ``latest`` left behind.

    Once an installed snapshot is in place every segment starts after its index, and while
    replaced segments remain the oldest of them, which starts at or below it, is among them.
    """
    return latest.replaces_log and bool(segment_files) and segment_files[0][0] <= latest.index


def _cut_torn_tail(
    ops: FileOps,
    segment: _Segment,
    data: bytes,
    scan: SegmentScan,
    snapshot: Snapshot | None,
    *,
    newest: bool,
) -> None:
    """Cut the damage ``scan`` found in ``segment`` if it is a torn final batch; otherwise raise
    :class:`CorruptionError`. Only the newest segment can end in a batch that was never
    durable: a roll seals (fsyncs) the segment before the next one is created."""
    damage = scan.damage
    if damage is None:
        return
    path = segment.path
    if not newest:
        raise CorruptionError(path, damage.offset, damage.reason)
    assessment = assess_damage(data, scan)
    if not assessment.torn_tail:
        raise CorruptionError(path, damage.offset, f"{damage.reason}; {assessment.why_not_torn()}")
    if snapshot is not None and snapshot.index > scan.last_index:
        raise CorruptionError(
            path,
            damage.offset,
            f"{damage.reason}; the snapshot at index {snapshot.index} shows that the entries"
            f" from {assessment.expected_index} on were durable, so this is not a torn write",
        )
    ops.ftruncate(segment.fd, scan.valid_bytes)
    ops.fsync(segment.fd)
    dropped = assessment.bytes_from_damage
    logger.warning(
        "log segment %s: cut a torn final batch at offset %d (%s): %d bytes, %d records;"
        " last good index %d",
        path,
        damage.offset,
        damage.reason,
        dropped,
        assessment.records_lost,
        scan.last_index,
        extra={
            "event": "storage.tail_truncated",
            "segment": str(path),
            "offset": damage.offset,
            "bytes_dropped": dropped,
            "records_dropped": assessment.records_lost,
            "last_good_index": scan.last_index,
            "reason": damage.reason,
        },
    )


def _reconcile_with_snapshot(
    ops: FileOps, dir_fd: int, snapshot: Snapshot, segments: list[_Segment], terms: _TermRuns
) -> _TermRuns:
    """Check the segments against the latest snapshot, and finish an interrupted compaction
    (sealed segments that lie entirely at or below the snapshot are deleted).

    Anything else that does not fit is corruption: the snapshot was saved from durable
    entries (or installed, see ``_install_leftovers``), so a log that ends below it, or holds
    its index with another term, has lost acknowledged entries.
    """
    first, last = segments[0].base, segments[-1].last_index
    if last < snapshot.index:
        raise CorruptionError(
            segments[-1].path,
            segments[-1].size,
            f"log ends at index {last} but the latest snapshot is at index {snapshot.index}:"
            f" entries {last + 1}..{snapshot.index} were durable and are missing",
        )
    if first > snapshot.index + 1:
        raise CorruptionError(
            segments[0].path,
            0,
            f"log starts at index {first} but the latest snapshot ends at {snapshot.index}",
        )
    if first <= snapshot.index and terms.term_at(snapshot.index) != snapshot.term:
        segment = segments[bisect.bisect_right(segments, snapshot.index, key=_segment_base) - 1]
        raise CorruptionError(
            segment.path,
            segment.offsets[snapshot.index - segment.base],
            f"entry {snapshot.index} has term {terms.term_at(snapshot.index)} but the latest"
            f" snapshot says term {snapshot.term}",
        )
    covered = 0
    while covered < len(segments) - 1 and segments[covered].last_index <= snapshot.index:
        segments[covered].path.unlink()
        _close_fd(segments[covered])
        covered += 1
    if covered:
        del segments[:covered]
        ops.fsync(dir_fd)
    terms.drop_before(snapshot.index + 1)
    return terms


def _list_log_files(
    directory: Path, *, remove_tmp: bool
) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """Segment and snapshot files, each sorted by index. Other files are left alone."""
    segment_files: list[tuple[int, Path]] = []
    snapshot_files: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        name = path.name
        if name.endswith(SEGMENT_SUFFIX):
            base = parse_segment_file_name(name)
            if base is not None:
                segment_files.append((base, path))
        elif name.endswith(SNAPSHOT_SUFFIX):
            index = parse_snapshot_file_name(name)
            if index is not None:
                snapshot_files.append((index, path))
        elif remove_tmp and name.endswith(SNAPSHOT_SUFFIX + TMP_SUFFIX):
            # A snapshot whose writing was interrupted: never renamed, so never adopted.
            path.unlink()
    segment_files.sort()
    snapshot_files.sort()
    return segment_files, snapshot_files


def _load_snapshot(path: Path) -> SnapshotContents:
    try:
        contents = decode_snapshot(path.read_bytes())
    except FrameError as exc:
        raise CorruptionError(path, exc.offset, exc.reason) from exc
    if parse_snapshot_file_name(path.name) != contents.index:
        raise CorruptionError(path, 0, f"file holds the snapshot at index {contents.index}")
    return contents


# -------------------------------------------------------------------- worker-thread I/O
#
# Everything below runs in worker threads (trio.to_thread.run_sync) or during the blocking
# ``open``; none of it touches the log object's state.


class _UndoFailedError(OSError):
    """A failed operation could not be undone: the directory's state is unknown."""


def _write_all(ops: FileOps, fd: int, data: bytes | bytearray, offset: int) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            count = ops.write(fd, view[written:], offset + written)
            if count <= 0:
                raise OSError(errno.EIO, "write made no progress")
            written += count


def _write_durably(
    ops: FileOps, fd: int, data: bytearray, offset: int
) -> tuple[OSError | None, OSError | None, float]:
    """Write ``data`` at ``offset`` and fdatasync; on failure cut the file back to ``offset``.

    Returns ``(error, rollback_error, fsync_seconds)``: both errors None on success, and the
    seconds the fdatasync took (0.0 if it was not reached).
    """
    fsync_seconds = 0.0
    try:
        _write_all(ops, fd, data, offset)
        synced_from = time.perf_counter()
        ops.fdatasync(fd)
        fsync_seconds = time.perf_counter() - synced_from
    except OSError as exc:
        try:
            ops.ftruncate(fd, offset)
            ops.fsync(fd)
        except OSError as rollback_exc:
            return exc, rollback_exc, fsync_seconds
        return exc, None, fsync_seconds
    return None, None, fsync_seconds


def _create_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _create_segment(ops: FileOps, sealed_fd: int, dir_fd: int, path: Path) -> int:
    """Seal the active segment (full fsync) and create the next one durably."""
    ops.fsync(sealed_fd)
    # O_TRUNC: a file of this name can only be left over from a roll that never became
    # durable, and it holds no entry (its base is past the last durable index).
    fd = _create_file(path)
    try:
        ops.fsync(dir_fd)
    except OSError as exc:
        os.close(fd)
        # The name must not come back after a crash while the old segment keeps growing
        # past its base: that would break index continuity.
        try:
            path.unlink()
            ops.fsync(dir_fd)
        except OSError as undo_exc:
            raise _UndoFailedError(
                undo_exc.errno, f"could not remove {path} after a failed roll: {undo_exc}"
            ) from exc
        raise
    return fd


def _truncate_files(
    ops: FileOps, dir_fd: int, newest_first: list[Path], target_fd: int, cut: int
) -> None:
    for path in newest_first:
        path.unlink()
    if newest_first:
        ops.fsync(dir_fd)
    ops.ftruncate(target_fd, cut)
    ops.fsync(target_fd)


def _remove_oldest_first(
    ops: FileOps, dir_fd: int, oldest_first: list[Path]
) -> tuple[int, OSError | None]:
    removed = 0
    error: OSError | None = None
    for path in oldest_first:
        try:
            path.unlink()
        except OSError as exc:
            error = exc
            break
        removed += 1
    if removed:
        try:
            ops.fsync(dir_fd)
        except OSError as exc:
            error = error or exc
    return removed, error


def _remove_replaced_segments(ops: FileOps, dir_fd: int, newest_first: list[Path]) -> None:
    """Remove the segments an installed snapshot replaces, the oldest one last and only once
    the others are durably gone: while any of them is left, the oldest is (see "Crash safety
    of multi-file changes")."""
    if not newest_first:
        return
    *newer, oldest = newest_first
    for path in newer:
        path.unlink()
    if newer:
        ops.fsync(dir_fd)
    oldest.unlink()
    ops.fsync(dir_fd)


def _replace_segments(ops: FileOps, dir_fd: int, newest_first: list[Path], path: Path) -> int:
    _remove_replaced_segments(ops, dir_fd, newest_first)
    fd = _create_file(path)
    try:
        ops.fsync(dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_snapshot_file(
    ops: FileOps, directory: Path, snapshot: Snapshot, *, replaces_log: bool = False
) -> None:
    """tmp file, fsync, rename, fsync directory; then drop all but the newest snapshots."""
    try:
        contents = encode_snapshot(
            snapshot.index, snapshot.term, snapshot.data, replaces_log=replaces_log
        )
    except ValueError as exc:
        raise LogWriteError(f"snapshot {snapshot.index} not saved: {exc}") from exc
    final = directory / snapshot_file_name(snapshot.index)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        fd = _create_file(tmp)
        try:
            _write_all(ops, fd, contents, 0)
            ops.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(final)
        _fsync_dir(ops, directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LogWriteError(f"{final}: snapshot not saved: {exc}") from exc
    try:
        _, snapshot_files = _list_log_files(directory, remove_tmp=False)
        for _, stale in snapshot_files[:-SNAPSHOTS_KEPT]:
            stale.unlink()
    except OSError as exc:
        # Not fatal: an extra old snapshot costs only space; the next open removes it.
        logger.warning(
            "could not delete old snapshots in %s: %s",
            directory,
            exc,
            extra={"event": "storage.snapshot_cleanup_failed", "path": str(directory)},
        )


def _fsync_dir(ops: FileOps, directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ops.fsync(fd)
    finally:
        os.close(fd)


def _close_fd(segment: _Segment) -> None:
    if segment.fd >= 0:
        os.close(segment.fd)
        segment.fd = -1


# -------------------------------------------------------------------- offline verification


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_log` checked and found.

    ``first_index``/``last_index`` are the entries physically present in the segment files
    (None without any segment file; ``last_index == first_index - 1`` when they are empty),
    which may start below the snapshot's index + 1 that an open log reports. ``problems`` is
    damage, a torn tail included; ``notes`` are states that opening the log finishes without
    losing anything (an interrupted snapshot installation).
    """

    directory: Path
    segments_checked: int
    records_checked: int
    first_index: int | None
    last_index: int | None
    snapshots_checked: int
    latest_snapshot_index: int | None
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_log(directory: Path) -> VerifyReport:
    """Check a log directory without changing it.

    Every frame of every segment, by the rules recovery applies: damage in a sealed segment,
    or in the newest one when whole records of a later batch follow it, is damage to
    acknowledged records; damage in the newest segment's final batch is a torn tail, which
    opening the log would cut (reported too: it is damage). Also index continuity across
    segments, every snapshot file, and that the latest snapshot fits the log: the log holds
    entries up to its index, ``snapshot.index >= first_index - 1`` and, if the log still
    holds the entry at ``snapshot.index``, its term matches. Each problem names the file and
    byte offset.
    """
    if not directory.is_dir():
        raise StorageError(f"{directory}: not a log directory")
    segment_files, snapshot_files = _list_log_files(directory, remove_tmp=False)
    problems: list[str] = []
    notes: list[str] = []

    latest: SnapshotContents | None = None
    for _, path in snapshot_files:
        try:
            latest = _load_snapshot(path)
        except CorruptionError as exc:
            problems.append(str(exc))
            latest = None
    if latest is not None and _install_leftovers(latest, segment_files):
        notes.append(
            f"{directory}: the installation of the snapshot at index {latest.index} was"
            f" interrupted; opening the log removes the {len(segment_files)} segment files it"
            " replaces (not checked)"
        )
        segment_files = []

    records = 0
    first: int | None = None
    last: int | None = None
    terms = _TermRuns()
    # Where the next segment must start; unknown after a damaged segment, whose true end
    # cannot be read (its damage is reported already).
    expected_base: int | None = None
    for position, (base, path) in enumerate(segment_files):
        if expected_base is not None and base != expected_base:
            problems.append(
                f"{path}: offset 0: segment starts at index {base}, expected {expected_base}"
            )
        data = path.read_bytes()
        scan = scan_segment(data, base=base)
        expected_base = scan.last_index + 1
        if scan.damage is not None:
            expected_base = None
            problems.append(
                _describe_damage(path, data, scan, newest=position == len(segment_files) - 1)
            )
        records += scan.count
        if first is None:
            first = base
        last = scan.last_index
        for index, term in scan.term_changes:
            terms.add(index, term)

    if latest is not None:
        path = snapshot_files[-1][1]
        if first is None or last is None:
            if not latest.replaces_log:
                problems.append(
                    f"{path}: offset 0: no segment files, but the log that saved this snapshot"
                    f" kept its active segment: the entries after index {latest.index} are"
                    " missing"
                )
        elif latest.index < first - 1:
            problems.append(
                f"{path}: offset 0: snapshot ends at index {latest.index} but the log only"
                f" starts at {first}: entries {latest.index + 1}..{first - 1} are missing"
            )
        elif latest.index > last:
            problems.append(
                f"{path}: offset 0: snapshot at index {latest.index} but the log ends at"
                f" {last}: entries {last + 1}..{latest.index} were durable and are missing"
            )
        elif first <= latest.index:
            term = terms.term_at(latest.index)
            if term != latest.term:
                problems.append(
                    f"{path}: offset 0: snapshot term {latest.term} at index {latest.index}"
                    f" but the log has term {term} there"
                )
    elif not snapshot_files and first is not None and first != 1:
        problems.append(
            f"{segment_files[0][1]}: offset 0: log starts at index {first} and no snapshot"
            " covers the entries before it"
        )
    return VerifyReport(
        directory=directory,
        segments_checked=len(segment_files),
        records_checked=records,
        first_index=first,
        last_index=last,
        snapshots_checked=len(snapshot_files),
        latest_snapshot_index=latest.index if latest is not None else None,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def _describe_damage(path: Path, data: bytes, scan: SegmentScan, *, newest: bool) -> str:
    damage = scan.damage
    if damage is None:
        raise ValueError("the scan found no damage")
    where = f"{path}: offset {damage.offset}: {damage.reason}"
    unreadable = f"{scan.total_bytes - scan.valid_bytes} bytes from there on unreadable"
    if not newest:
        return f"{where} ({unreadable})"
    assessment = assess_damage(data, scan)
    if assessment.torn_tail:
        return (
            f"{where}: torn final batch ({assessment.bytes_from_damage} bytes, about"
            f" {assessment.records_lost} records, never acknowledged); opening the log cuts it"
        )
    return f"{where}; {assessment.why_not_torn()} ({unreadable})"
