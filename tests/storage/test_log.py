"""SegmentLog on real files: appends, group commit, reads, truncation, snapshots, recovery,
write failures (injected through the file-ops hook, and a real EFBIG in a subprocess) and
the offline checker."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import pytest
import trio
import trio.testing

from villaged.storage.errors import (
    CorruptionError,
    IndexOutOfRange,
    LogWriteError,
    RecordTooLargeError,
    StorageError,
)
from villaged.storage.log import (
    OsFileOps,
    SegmentLog,
    Snapshot,
    open_segment_log,
    verify_log,
)
from villaged.storage.records import Record, RecordEncodeError
from villaged.storage.segment import (
    HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    decode_batch_frame,
    decode_snapshot,
    encode_frame,
    encode_snapshot,
    snapshot_file_name,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

HERE = Path(__file__).parent
WAIT = 10  # seconds: generous bound for waits on real threads and disks


def entry(n: int, *, term: int = 0, pad: int = 40) -> Record:
    return Record(type="test.entry", body={"n": n, "pad": bytes([n % 251]) * pad}, term=term)


def assert_entry(record: Record, n: int, *, index: int, term: int = 0) -> None:
    assert record == Record(
        type="test.entry",
        body={"n": n, "pad": bytes([n % 251]) * 40},
        term=term,
        index=index,
    )


def batches_on_disk(path: Path) -> list[tuple[int, int]]:
    """``(index, batch start)`` of every record in the segment file ``path``."""
    data = path.read_bytes()
    found = []
    offset = 0
    while offset < len(data):
        record, batch, offset = decode_batch_frame(data, offset, max_payload=len(data))
        found.append((record.index, batch))
    return found


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def snapshot_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.snap"))


def directory_listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


class ScriptedOps(OsFileOps):
    """The real calls, counted; each can be made to fail, and fdatasync can be held."""

    def __init__(self) -> None:
        self.writes: list[int] = []
        self.fdatasyncs = 0
        self.fsyncs = 0
        self.write_errno: int | None = None
        self.partial_write_before_error = False
        self.fdatasync_errno: int | None = None
        self.fsync_errno: int | None = None
        # One entry per coming directory fsync: True makes it fail (EIO). Then all succeed.
        self.dir_fsync_script: list[bool] = []
        self.ftruncate_errno: int | None = None
        self.hold: threading.Event | None = None
        self.held = threading.Event()

    def write(self, fd: int, data: memoryview, offset: int) -> int:
        if self.write_errno is not None:
            if self.partial_write_before_error and len(data) > 1:
                self.partial_write_before_error = False
                return super().write(fd, data[: len(data) // 2], offset)
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        self.writes.append(len(data))
        return super().write(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if self.hold is not None:
            self.held.set()
            assert self.hold.wait(WAIT)
        if self.fdatasync_errno is not None:
            raise OSError(self.fdatasync_errno, os.strerror(self.fdatasync_errno))
        self.fdatasyncs += 1
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if self.fsync_errno is not None:
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_dir and self.dir_fsync_script and self.dir_fsync_script.pop(0):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.fsyncs += 1
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self.ftruncate_errno is not None:
            raise OSError(self.ftruncate_errno, os.strerror(self.ftruncate_errno))
        super().ftruncate(fd, length)

    async def wait_held(self) -> None:
        with trio.fail_after(WAIT):
            await trio.to_thread.run_sync(self.held.wait, WAIT)


async def append_concurrently(log: SegmentLog, ns: Sequence[int]) -> dict[int, int]:
    """Append ``entry(n)`` for each n from its own task; return {n: index}."""
    indexes: dict[int, int] = {}

    async def one(n: int) -> None:
        indexes[n] = await log.append(entry(n))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for n in ns:
                nursery.start_soon(one, n)
    return indexes


async def gather_outcomes(
    log: SegmentLog, ns: Sequence[int], nursery: trio.Nursery
) -> dict[int, int | Exception]:
    """Start appends of ``entry(n)`` in ``nursery``; the dict fills in as they finish."""
    outcomes: dict[int, int | Exception] = {}

    async def one(n: int) -> None:
        try:
            outcomes[n] = await log.append(entry(n))
        except LogWriteError as exc:
            outcomes[n] = exc

    for n in ns:
        nursery.start_soon(one, n)
    return outcomes


def acked(outcomes: dict[int, int | Exception]) -> list[int]:
    """The indexes the appends in ``outcomes`` got, sorted; fails if any of them raised."""
    indexes = [outcome for outcome in outcomes.values() if isinstance(outcome, int)]
    assert len(indexes) == len(outcomes), outcomes
    return sorted(indexes)


async def append_each(log: SegmentLog, records: Sequence[Record]) -> list[int]:
    """Append one record at a time, each in a batch of its own (so segments can roll between
    any two of them, which they never do inside one ``append_many``)."""
    with trio.fail_after(WAIT):
        return [await log.append(record) for record in records]


def reopen(directory: Path, *, segment_bytes: int = 64 * 2**20) -> SegmentLog:
    """Open (and so recover) without starting the writer: for looking at what is on disk."""
    return SegmentLog.open(directory, segment_bytes=segment_bytes)


# ------------------------------------------------------------------------ basics


async def test_fresh_log_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "log"
    async with open_segment_log(directory) as log:
        assert (log.first_index, log.last_index, log.term_at(0)) == (1, 0, 0)
        assert log.latest_snapshot() is None
        with trio.fail_after(WAIT):
            assert await log.append(entry(1, term=3)) == 1
            assert await log.append(entry(2, term=3)) == 2
        assert log.last_index == 2
        assert_entry(log.read(1), 1, index=1, term=3)
        assert log.term_at(2) == 3
    assert segment_files(directory) == [directory / "00000000000000000001.seg"]
    log = reopen(directory)
    try:
        assert (log.first_index, log.last_index) == (1, 2)
        assert_entry(log.read(2), 2, index=2, term=3)
        assert [r.body["n"] for r in log.scan(1)] == [1, 2]
    finally:
        log.close()


async def test_record_index_given_by_caller_is_ignored(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            index = await log.append(Record(type="test.entry", index=999))
        assert index == 1
        assert log.read(1).index == 1


async def test_append_returns_only_once_durable(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    async with open_segment_log(tmp_path, file_ops=ops) as log, trio.open_nursery() as nursery:
        outcomes = await gather_outcomes(log, [1], nursery)
        await ops.wait_held()
        # Written but not yet synced: neither acknowledged nor readable.
        assert outcomes == {}
        assert log.last_index == 0
        with pytest.raises(IndexOutOfRange):
            log.read(1)
        # Appends made while a batch is being synced go into the next batch.
        more = await gather_outcomes(log, [2, 3, 4], nursery)
        await trio.testing.wait_all_tasks_blocked()
        ops.hold.set()
    assert outcomes == {1: 1}
    assert acked(more) == [2, 3, 4]
    assert log.batches_written == 2
    assert ops.fdatasyncs == 2


async def test_concurrent_appends_get_consecutive_indexes_in_file_order(tmp_path: Path) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        indexes = await append_concurrently(log, range(300))
        assert sorted(indexes.values()) == list(range(1, 301))
        # The index each caller got is where its own record is.
        for n, index in indexes.items():
            assert log.read(index).body["n"] == n
        assert ops.fdatasyncs < 300
        assert log.batches_written == ops.fdatasyncs
        assert log.records_written == 300


async def test_append_many_is_consecutive_and_one_batch(tmp_path: Path) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            assert await log.append_many([]) == []
            assert await log.append(entry(0)) == 1
            assert await log.append_many([entry(n) for n in range(1, 11)]) == list(range(2, 12))
        assert ops.fdatasyncs == 2
        assert [r.body["n"] for r in log.scan(1)] == list(range(11))


async def test_too_large_record_is_refused_and_nothing_written(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path, max_record_bytes=200) as log:
        with trio.fail_after(WAIT):
            with pytest.raises(RecordTooLargeError):
                await log.append(Record(type="test.entry", body={"pad": b"x" * 300}))
            with pytest.raises(RecordTooLargeError):
                await log.append_many([entry(1), Record(type="t", body={"pad": b"x" * 300})])
            assert log.last_index == 0
            assert await log.append(entry(1)) == 1
    assert segment_files(tmp_path)[0].stat().st_size == log_frame_size(entry(1), 1)


async def test_lowering_max_record_bytes_keeps_written_records(tmp_path: Path) -> None:
    big = Record(type="test.big", body={"pad": b"b" * 20_000})
    async with open_segment_log(tmp_path, max_record_bytes=2**20) as log:
        await append_each(log, [entry(0), big, *(entry(n) for n in range(2, 12))])
    # The operator lowers storage.max_record_bytes below a record already written.
    log = SegmentLog.open(tmp_path, max_record_bytes=8192)
    try:
        assert log.last_index == 12
        assert log.read(2) == Record(type="test.big", body={"pad": b"b" * 20_000}, index=2)
        assert [r.index for r in log.scan(1)] == list(range(1, 13))
    finally:
        log.close()
    assert verify_log(tmp_path).ok
    async with open_segment_log(tmp_path, max_record_bytes=8192) as log:
        with trio.fail_after(WAIT), pytest.raises(RecordTooLargeError):
            await log.append(big)  # the lower limit applies to new appends
        assert log.read(2).body == big.body


async def test_record_that_could_not_be_read_back_is_refused(tmp_path: Path) -> None:
    unreadable = Record(type="test.entry", body={"groups": {7: "friends"}})
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            assert await log.append(entry(0)) == 1
            with pytest.raises(RecordEncodeError, match=r"body\['groups'\] has the map key 7"):
                await log.append(unreadable)
            with pytest.raises(RecordEncodeError):
                await log.append_many([entry(1), unreadable, entry(2)])
            with pytest.raises(ValueError, match="set"):  # RecordEncodeError is a ValueError
                await log.append(Record(type="test.entry", body={"s": {1, 2}}))
            # Nothing was written and no index was used up.
            assert log.last_index == 1
            assert await log.append(entry(3)) == 2
    [path] = segment_files(tmp_path)
    assert path.stat().st_size == 2 * log_frame_size(entry(0), 1)
    log = reopen(tmp_path)
    try:
        assert [r.body["n"] for r in log.scan(1)] == [0, 3]
    finally:
        log.close()


def log_frame_size(record: Record, index: int) -> int:
    from villaged.storage.records import encode_record

    payload = encode_record(
        Record(record.type, record.body, record.version, record.term, index), batch=index
    )
    return HEADER_SIZE + len(payload)


async def test_read_and_scan_bounds(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
        for bad in (0, 6, -1):
            with pytest.raises(IndexOutOfRange):
                log.read(bad)
        with pytest.raises(IndexError):  # IndexOutOfRange is also an IndexError
            log.read(6)
        assert [r.index for r in log.scan(2, 4)] == [2, 3, 4]
        assert [r.index for r in log.scan(5)] == [5]
        assert list(log.scan(6)) == []  # empty range just past the end
        assert list(log.scan(3, 2)) == []
        for start, stop in [(0, 3), (2, 6), (7, None), (4, 1)]:
            with pytest.raises(IndexOutOfRange):
                log.scan(start, stop)
        with pytest.raises(IndexOutOfRange):
            log.term_at(6)


async def test_errors_in_the_body_are_not_wrapped_in_a_group(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_segment_log(tmp_path):
            raise KeyError("mine")


async def test_close_fails_queued_appends_and_later_calls(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path, file_ops=ops) as log:
            async with trio.open_nursery() as nursery:
                first = await gather_outcomes(log, [1], nursery)
                await ops.wait_held()
                queued = await gather_outcomes(log, [2, 3], nursery)
                truncation: list[Exception] = []
                nursery.start_soon(capture, truncation, log.truncate_after(0))
                await trio.testing.wait_all_tasks_blocked()
                log.close()
                log.close()  # idempotent
                ops.hold.set()
            # The batch already being synced completes; those queued behind it fail.
            assert first == {1: 1}
            assert all(isinstance(outcome, LogWriteError) for outcome in queued.values())
            assert [type(error) for error in truncation] == [LogWriteError]
            with pytest.raises(LogWriteError):
                await log.append(entry(4))
            with pytest.raises(StorageError):
                log.read(1)
    log = reopen(tmp_path)
    try:
        assert log.last_index == 1
    finally:
        log.close()


async def capture(errors: list[Exception], operation: Awaitable[object]) -> None:
    try:
        await operation
    except Exception as exc:  # the test looks at what was raised
        errors.append(exc)


async def test_writer_runs_once(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path) as log:
            with pytest.raises(RuntimeError, match="already running"):
                await log.run()
        with pytest.raises(LogWriteError, match="closed"):
            await log.run()


def test_open_rejects_nonsense_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        SegmentLog.open(tmp_path, segment_bytes=0)
    with pytest.raises(ValueError, match="must be > 0"):
        SegmentLog.open(tmp_path, max_pending_bytes=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        SegmentLog.open(tmp_path, max_record_bytes=MAX_RECORD_PAYLOAD + 1)
    SegmentLog.open(tmp_path, max_record_bytes=MAX_RECORD_PAYLOAD).close()  # the config maximum


async def test_bit_rot_after_open_is_caught_by_reads(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(4)])
        [path] = segment_files(tmp_path)
        frame = log_frame_size(entry(0), 1)
        with path.open("r+b") as file:
            file.seek(2 * frame + HEADER_SIZE + 5)
            file.write(b"\x00")
        assert_entry(log.read(2), 1, index=2)
        with pytest.raises(CorruptionError, match="CRC") as info:
            log.read(3)
        assert (info.value.path, info.value.offset) == (path, 2 * frame)
        with pytest.raises(CorruptionError):
            list(log.scan(1))


async def test_cancelling_the_writer_closes_the_log(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            assert await log.append(entry(1)) == 1
            nursery.cancel_scope.cancel()
        with pytest.raises(LogWriteError):
            await log.append(entry(2))
        with pytest.raises(LogWriteError):
            await log.truncate_after(0)


async def test_appends_in_flight_fail_when_the_writer_dies(tmp_path: Path) -> None:
    class BrokenOps(OsFileOps):
        def fdatasync(self, fd: int) -> None:
            raise RuntimeError("a bug in the I/O path")

    log = SegmentLog.open(tmp_path, file_ops=BrokenOps())
    errors: list[Exception] = []
    with trio.fail_after(WAIT), pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="bug")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, errors, log.append(entry(1)))
            await nursery.start(log.run)
    assert [str(error) for error in errors] == [f"{tmp_path}: the log writer stopped"]


async def test_control_operations_need_the_writer(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    try:
        with trio.fail_after(WAIT), pytest.raises(LogWriteError, match="not running"):
            await log.truncate_after(0)
    finally:
        log.close()


# ------------------------------------------------------------------------ segments


async def test_roll_over_across_many_small_segments(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    segment_bytes = 3 * frame + 1  # a segment is rolled once it holds 4 frames
    async with open_segment_log(tmp_path, segment_bytes=segment_bytes) as log:
        # Up to index 127 every frame has the same size (msgpack fixints).
        await append_each(log, [entry(n) for n in range(100)])
        indexes = await append_concurrently(log, range(100, 120))
        assert sorted(indexes.values()) == list(range(101, 121))
        files = segment_files(tmp_path)
        assert len(files) == 30
        assert [int(path.stem) for path in files] == list(range(1, 121, 4))
        for path in files[:-1]:
            assert path.stat().st_size >= segment_bytes
        # Reads and scans cross segment boundaries.
        assert [r.body["n"] for r in log.scan(1, 100)] == list(range(100))
        assert [r.index for r in log.scan(3, 11)] == list(range(3, 12))
        for index in (1, 4, 5, 8, 9, 100):
            assert_entry(log.read(index), index - 1, index=index)
    log = reopen(tmp_path, segment_bytes=segment_bytes)
    try:
        assert log.last_index == 120
        assert [r.index for r in log.scan(1)] == list(range(1, 121))
    finally:
        log.close()


async def test_a_segment_sealed_on_request_goes_with_the_next_compaction(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        log.roll_at_next_append()  # an empty active segment: nothing to seal
        await append_each(log, [entry(n) for n in range(3)])
        assert log.oldest_on_disk == 1
        log.roll_at_next_append()
        await log.append_many([entry(3), entry(4)])
        assert [int(path.stem) for path in segment_files(tmp_path)] == [1, 4]
        # A snapshot through 3 deletes the sealed segment; records 4 and 5 stay.
        await log.save_snapshot(3, 0, b"state")
        assert log.oldest_on_disk == 4
        assert [int(path.stem) for path in segment_files(tmp_path)] == [4]
        assert [r.index for r in log.scan(4)] == [4, 5]


async def test_append_many_rolls_before_its_batch_never_inside_it(tmp_path: Path) -> None:
    ops = ScriptedOps()
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=4 * frame, file_ops=ops) as log:
        await append_each(log, [entry(0), entry(1)])
        with trio.fail_after(WAIT):
            # Five frames do not fit beside two in a four-frame segment: roll first.
            assert await log.append_many([entry(n) for n in range(2, 7)]) == [3, 4, 5, 6, 7]
            # A batch larger than a segment stays whole, and the segment grows to hold it.
            assert await log.append_many([entry(n) for n in range(7, 13)]) == list(range(8, 14))
            assert await log.append(entry(13)) == 14
        assert log.batches_written == ops.fdatasyncs == 5
    files = segment_files(tmp_path)
    assert [int(path.stem) for path in files] == [1, 3, 8, 14]
    assert batches_on_disk(files[1]) == [(index, 3) for index in range(3, 8)]
    assert batches_on_disk(files[2]) == [(index, 8) for index in range(8, 14)]
    assert files[2].stat().st_size == 6 * frame > 4 * frame
    assert verify_log(tmp_path).ok


async def test_append_many_joins_the_open_batch_when_it_fits(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path, file_ops=ops) as log:
            async with trio.open_nursery() as nursery:
                first = await gather_outcomes(log, [0], nursery)
                await ops.wait_held()
                single = await gather_outcomes(log, [1], nursery)
                await trio.testing.wait_all_tasks_blocked()
                many: list[list[int]] = []

                async def append_many() -> None:
                    many.append(await log.append_many([entry(n) for n in range(2, 5)]))

                nursery.start_soon(append_many)
                await trio.testing.wait_all_tasks_blocked()
                ops.hold.set()
            assert (first, single, many) == ({0: 1}, {1: 2}, [[3, 4, 5]])
            assert ops.fdatasyncs == 2
    [path] = segment_files(tmp_path)
    assert batches_on_disk(path) == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2)]


async def test_failed_roll_fails_the_whole_append_many(tmp_path: Path) -> None:
    ops = ScriptedOps()
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=4 * frame, file_ops=ops) as log:
        await append_each(log, [entry(0), entry(1)])
        ops.dir_fsync_script = [True]  # creating the next segment fails (and is undone)
        with trio.fail_after(WAIT):
            with pytest.raises(LogWriteError, match="new segment"):
                await log.append_many([entry(n) for n in range(2, 5)])
            # None of the three is in the log, not even those that fitted the old segment.
            assert log.last_index == 2
            assert [path.name for path in segment_files(tmp_path)] == ["00000000000000000001.seg"]
            assert segment_files(tmp_path)[0].stat().st_size == 2 * frame
            assert await log.append_many([entry(n) for n in range(2, 5)]) == [3, 4, 5]
    log = reopen(tmp_path)
    try:
        assert [r.body["n"] for r in log.scan(1)] == [0, 1, 2, 3, 4]
    finally:
        log.close()


async def test_scan_reads_in_bounded_chunks(tmp_path: Path) -> None:
    # Records of ~100 KiB: a 1 MiB scan chunk holds only a few of them.
    big = [Record(type="test.big", body={"n": n, "pad": b"z" * 100_000}) for n in range(25)]
    async with open_segment_log(tmp_path, segment_bytes=2**30) as log:
        with trio.fail_after(WAIT):
            await log.append_many(big)
        assert [r.body["n"] for r in log.scan(1)] == list(range(25))
        assert [r.body["n"] for r in log.scan(7, 20)] == list(range(6, 20))


async def test_scan_notices_truncation_under_it(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=2 * frame) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(10)])
            records = log.scan(1)
            assert next(records).index == 1  # entry 2 is already read into memory
            await log.truncate_after(1)
        with pytest.raises(IndexOutOfRange, match="removed while"):
            next(records)


# ------------------------------------------------------------------------ truncate_after


async def test_truncate_after_within_a_segment_then_append(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(10)])
            await log.truncate_after(6)
            assert log.last_index == 6
            with pytest.raises(IndexOutOfRange):
                log.read(7)
            assert await log.append(entry(100, term=2)) == 7
            await log.truncate_after(50)  # beyond the end: nothing to do
        assert log.last_index == 7
        assert (log.term_at(6), log.term_at(7)) == (1, 2)
    log = reopen(tmp_path)
    try:
        assert [r.body["n"] for r in log.scan(1)] == [0, 1, 2, 3, 4, 5, 100]
        assert log.term_at(7) == 2
    finally:
        log.close()


@pytest.mark.parametrize("keep", [0, 3, 4, 5, 9])
async def test_truncate_after_across_segments(tmp_path: Path, keep: int) -> None:
    frame = log_frame_size(entry(0), 1)
    segment_bytes = 4 * frame  # 4 frames per segment: bases 1, 5, 9, 13, ...
    async with open_segment_log(tmp_path, segment_bytes=segment_bytes) as log:
        await append_each(log, [entry(n) for n in range(20)])
        with trio.fail_after(WAIT):
            assert len(segment_files(tmp_path)) == 5
            await log.truncate_after(keep)
            assert log.last_index == keep
            # Only segments holding entries <= keep remain (plus the one that receives keep+1).
            bases = [int(path.stem) for path in segment_files(tmp_path)]
            assert bases == [base for base in (1, 5, 9, 13, 17) if base <= keep + 1]
            assert await log.append(entry(1000)) == keep + 1
            assert await log.append_many([entry(n) for n in range(1001, 1010)])
        assert [r.body["n"] for r in log.scan(1)] == [*range(keep), *range(1000, 1010)]
    log = reopen(tmp_path, segment_bytes=segment_bytes)
    try:
        assert [r.body["n"] for r in log.scan(1)] == [*range(keep), *range(1000, 1010)]
    finally:
        log.close()
    assert verify_log(tmp_path).ok


async def test_truncate_waits_for_earlier_appends_and_holds_later_ones(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path, file_ops=ops) as log:
            async with trio.open_nursery() as nursery:
                before = await gather_outcomes(log, [1, 2, 3], nursery)
                await ops.wait_held()
                nursery.start_soon(log.truncate_after, 1)
                await trio.testing.wait_all_tasks_blocked()
                after = await gather_outcomes(log, [4], nursery)
                await trio.testing.wait_all_tasks_blocked()
                ops.hold.set()
            # Made before the truncation: acknowledged, then dropped by it. Made after: index 2.
            assert acked(before) == [1, 2, 3]
            assert after == {4: 2}
            kept = next(n for n, index in before.items() if index == 1)
            assert [r.body["n"] for r in log.scan(1)] == [kept, 4]


# ------------------------------------------------------------------------ snapshots


async def test_snapshot_compacts_and_survives_reopen(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    segment_bytes = 10 * frame  # bases 1, 11, 21, ...
    async with open_segment_log(tmp_path, segment_bytes=segment_bytes) as log:
        await append_each(log, [entry(n, term=1) for n in range(50)])
        await append_each(log, [entry(n, term=2) for n in range(50, 100)])
        with trio.fail_after(WAIT):
            await log.save_snapshot(65, 2, b"state@65")
        assert (log.first_index, log.last_index) == (66, 100)
        assert log.latest_snapshot() == Snapshot(65, 2, b"state@65")
        # Segments 1..60 are entirely covered; 61..70 holds 66 and stays.
        assert [int(path.stem) for path in segment_files(tmp_path)] == [61, 71, 81, 91]
        with pytest.raises(IndexOutOfRange):
            log.read(65)
        with pytest.raises(IndexOutOfRange):
            log.scan(60)
        assert log.term_at(65) == 2
        with pytest.raises(IndexOutOfRange):
            log.term_at(64)
        assert_entry(log.read(66), 65, index=66, term=2)
        with trio.fail_after(WAIT):
            assert await log.append(entry(100, term=2)) == 101
    log = reopen(tmp_path, segment_bytes=segment_bytes)
    try:
        assert (log.first_index, log.last_index) == (66, 101)
        assert log.latest_snapshot() == Snapshot(65, 2, b"state@65")
        assert [r.body["n"] for r in log.scan(66)] == list(range(65, 101))
        assert log.term_at(65) == 2
    finally:
        log.close()
    assert verify_log(tmp_path).ok


async def test_only_the_two_newest_snapshots_are_kept(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path, segment_bytes=200) as log:
        await append_each(log, [entry(n) for n in range(40)])
        assert len(segment_files(tmp_path)) > 10
        with trio.fail_after(WAIT):
            for index in (10, 20, 30, 30, 40):
                await log.save_snapshot(index, 0, b"at %d" % index)
        assert [path.name for path in snapshot_files(tmp_path)] == [
            snapshot_file_name(30),
            snapshot_file_name(40),
        ]
        assert (log.first_index, log.last_index) == (41, 40)
        # Every segment but the active one is covered; the active one holds entry 40.
        assert len(segment_files(tmp_path)) == 1
        with trio.fail_after(WAIT):
            assert await log.append(entry(40)) == 41
    log = reopen(tmp_path)
    try:
        assert log.latest_snapshot() == Snapshot(40, 0, b"at 40")
        assert [r.index for r in log.scan(41)] == [41]
    finally:
        log.close()


async def test_save_snapshot_checks_index_and_term(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=4) for n in range(5)])
            with pytest.raises(IndexOutOfRange):
                await log.save_snapshot(6, 4, b"")
            with pytest.raises(ValueError, match="does not match"):
                await log.save_snapshot(3, 5, b"")
            await log.save_snapshot(3, 4, b"ok")
            with pytest.raises(IndexOutOfRange):
                await log.save_snapshot(2, 4, b"older than the current one")
            with pytest.raises(IndexOutOfRange):
                await log.truncate_after(2)
            await log.truncate_after(3)  # down to the snapshot is fine
        assert (log.first_index, log.last_index) == (4, 3)
        assert snapshot_files(tmp_path) == [tmp_path / snapshot_file_name(3)]


async def test_install_snapshot_beyond_the_log_resets_it(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path, segment_bytes=300) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(20)])
            await log.install_snapshot(500, 7, b"leader state")
        assert (log.first_index, log.last_index) == (501, 500)
        assert log.term_at(500) == 7
        assert log.latest_snapshot() == Snapshot(500, 7, b"leader state")
        assert [path.name for path in segment_files(tmp_path)] == ["00000000000000000501.seg"]
        with trio.fail_after(WAIT):
            assert await log.append(entry(1, term=7)) == 501
            await log.install_snapshot(400, 6, b"stale")  # older than ours: ignored
        assert log.latest_snapshot() == Snapshot(500, 7, b"leader state")
    log = reopen(tmp_path)
    try:
        assert (log.first_index, log.last_index) == (501, 501)
        assert_entry(log.read(501), 1, index=501, term=7)
    finally:
        log.close()
    assert verify_log(tmp_path).ok


async def test_install_snapshot_matching_an_entry_keeps_the_suffix(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(10)])
            await log.install_snapshot(6, 1, b"s")
        assert (log.first_index, log.last_index) == (7, 10)
        assert [r.body["n"] for r in log.scan(7)] == [6, 7, 8, 9]


async def test_install_snapshot_conflicting_with_an_entry_replaces_the_log(
    tmp_path: Path,
) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(10)])
            await log.install_snapshot(6, 2, b"s")
            assert (log.first_index, log.last_index) == (7, 6)
            assert await log.append(entry(0, term=2)) == 7


async def test_recovery_finishes_an_interrupted_snapshot_install(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(10)])
    # The snapshot file became durable; the crash came before the old segments were dropped.
    (tmp_path / snapshot_file_name(30)).write_bytes(encode_snapshot(30, 3, b"x", replaces_log=True))
    (tmp_path / (snapshot_file_name(31) + ".tmp")).write_bytes(b"half a snapshot")
    log = reopen(tmp_path)
    try:
        assert (log.first_index, log.last_index) == (31, 30)
        assert [path.name for path in segment_files(tmp_path)] == ["00000000000000000031.seg"]
        assert not any(path.suffix == ".tmp" for path in directory_listing(tmp_path))
    finally:
        log.close()


async def test_installed_snapshot_says_whether_it_replaces_the_log(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n, term=1) for n in range(10)])
            await log.install_snapshot(6, 1, b"matching")  # keeps the suffix
            await log.install_snapshot(8, 2, b"conflicting")  # replaces the log
    assert not decode_snapshot((tmp_path / snapshot_file_name(6)).read_bytes()).replaces_log
    assert decode_snapshot((tmp_path / snapshot_file_name(8)).read_bytes()).replaces_log


async def test_interrupted_install_removes_the_oldest_replaced_segment_last(
    tmp_path: Path,
) -> None:
    ops = ScriptedOps()
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=2 * frame, file_ops=ops) as log:
        await append_each(log, [entry(n, term=1) for n in range(6)])
        assert len(segment_files(tmp_path)) == 3
        # The snapshot file becomes durable; syncing the removal of the newer segments fails.
        ops.dir_fsync_script = [False, True]
        with trio.fail_after(WAIT), pytest.raises(LogWriteError, match="installing snapshot"):
            await log.install_snapshot(4, 2, b"state")
    # Whatever else went, the oldest replaced segment is still there, starting at or below
    # the snapshot: that is how recovery knows the installation was interrupted.
    assert segment_files(tmp_path) == [tmp_path / "00000000000000000001.seg"]
    log = reopen(tmp_path)
    try:
        assert (log.first_index, log.last_index, log.term_at(4)) == (5, 4, 2)
        assert [path.name for path in segment_files(tmp_path)] == ["00000000000000000005.seg"]
    finally:
        log.close()
    assert verify_log(tmp_path).ok


@pytest.mark.parametrize(
    ("snapshot", "reason"),
    [
        ((30, 0), "log ends at index 5 but the latest snapshot is at index 30"),
        ((3, 9), "entry 3 has term 0 but the latest snapshot says term 9"),
    ],
)
async def test_saved_snapshot_that_does_not_fit_the_log_is_corruption(
    tmp_path: Path, snapshot: tuple[int, int], reason: str
) -> None:
    await write_entries(tmp_path, 5)
    index, term = snapshot
    (tmp_path / snapshot_file_name(index)).write_bytes(encode_snapshot(index, term, b"x"))
    before = {path: path.read_bytes() for path in directory_listing(tmp_path)}
    # Not an installation (the file does not say it replaces the log): nothing is deleted.
    with pytest.raises(CorruptionError, match=reason):
        reopen(tmp_path)
    assert {path: path.read_bytes() for path in directory_listing(tmp_path)} == before
    assert not verify_log(tmp_path).ok


async def test_saved_snapshot_without_any_segment_is_corruption(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
            await log.save_snapshot(5, 0, b"five")
    [path] = segment_files(tmp_path)
    path.unlink()
    with pytest.raises(CorruptionError, match="entries after index 5 are missing"):
        reopen(tmp_path)
    assert segment_files(tmp_path) == []
    assert [problem.split(": offset")[0] for problem in verify_log(tmp_path).problems] == [
        str(tmp_path / snapshot_file_name(5))
    ]


async def test_recovery_finishes_an_interrupted_compaction(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path, segment_bytes=300) as log:
        await append_each(log, [entry(n) for n in range(30)])
        before = {path: path.read_bytes() for path in segment_files(tmp_path)}
        with trio.fail_after(WAIT):
            await log.save_snapshot(25, 0, b"s")
    after = segment_files(tmp_path)
    deleted = sorted(set(before) - set(after))
    assert deleted
    # As if the crash came after the snapshot but before the oldest covered segment went.
    for path in deleted[1:]:
        path.write_bytes(before[path])
    log = reopen(tmp_path, segment_bytes=300)
    try:
        assert segment_files(tmp_path) == after
        assert (log.first_index, log.last_index) == (26, 30)
    finally:
        log.close()


async def test_log_starting_after_one_without_a_snapshot_is_corrupt(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path, segment_bytes=300) as log:
        await append_each(log, [entry(n) for n in range(30)])
    first = segment_files(tmp_path)[0]
    first.unlink()
    with pytest.raises(CorruptionError, match="no snapshot covers") as info:
        reopen(tmp_path)
    assert info.value.path == segment_files(tmp_path)[0]
    assert not verify_log(tmp_path).ok


# ------------------------------------------------------------------------ recovery


async def write_entries(directory: Path, count: int, **kwargs: int) -> None:
    """``entry(0)`` .. ``entry(count - 1)`` at indexes 1..count, each in its own batch."""
    async with open_segment_log(directory, **kwargs) as log:
        await append_each(log, [entry(n) for n in range(count)])


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 30])
async def test_torn_tail_loses_only_the_damaged_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: int
) -> None:
    await write_entries(tmp_path, 20)
    [path] = segment_files(tmp_path)
    frame = log_frame_size(entry(0), 1)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size - cut)  # cut inside the last frame (header or payload)
    assert verify_log(tmp_path).problems  # reported, and verify does not repair
    assert path.stat().st_size == size - cut
    with caplog.at_level(logging.WARNING, logger="villaged.storage"):
        log = reopen(tmp_path)
    try:
        assert log.last_index == 19
        assert path.stat().st_size == 19 * frame
        [warning] = [r for r in caplog.records if getattr(r, "event", None)]
        fields = warning.__dict__
        assert fields["event"] == "storage.tail_truncated"
        assert fields["bytes_dropped"] == frame - cut
        assert fields["records_dropped"] == 1
        assert fields["last_good_index"] == 19
        assert warning.levelno == logging.WARNING
    finally:
        log.close()
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            assert await log.append(entry(99)) == 20
        assert [r.body["n"] for r in log.scan(1)] == [*range(19), 99]


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"\xff" * 3, os.urandom(500)])
async def test_garbage_after_the_last_frame_is_cut(tmp_path: Path, garbage: bytes) -> None:
    await write_entries(tmp_path, 10)
    [path] = segment_files(tmp_path)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(garbage)
    log = reopen(tmp_path)
    try:
        assert log.last_index == 10
        assert path.stat().st_size == size
    finally:
        log.close()


async def test_garbage_over_the_tail_loses_from_the_first_bad_frame(tmp_path: Path) -> None:
    await write_entries(tmp_path, 10)
    [path] = segment_files(tmp_path)
    frame = log_frame_size(entry(0), 1)
    with path.open("r+b") as file:
        file.seek(7 * frame + 3)
        file.write(b"\xa5" * (2 * frame))
    log = reopen(tmp_path)
    try:
        assert log.last_index == 7
        assert [r.body["n"] for r in log.scan(1)] == list(range(7))
    finally:
        log.close()


async def write_batches(directory: Path) -> int:
    """Indexes 1, 2, 3 each in a batch of its own, then 4..8 as one batch; the frame size."""
    async with open_segment_log(directory) as log:
        await append_each(log, [entry(n) for n in range(3)])
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(3, 8)])
    return log_frame_size(entry(0), 1)


@pytest.mark.parametrize("damaged", [1, 3])
async def test_damage_followed_by_a_later_batch_is_corruption(tmp_path: Path, damaged: int) -> None:
    frame = await write_batches(tmp_path)
    [path] = segment_files(tmp_path)
    overwrite(path, (damaged - 1) * frame + HEADER_SIZE + 9, b"\xee")
    data = path.read_bytes()
    with pytest.raises(CorruptionError, match="acknowledged records follow the damage") as info:
        reopen(tmp_path)
    assert (info.value.path, info.value.offset) == (path, (damaged - 1) * frame)
    assert f"record {damaged + 1} at offset {damaged * frame}" in info.value.reason
    assert path.read_bytes() == data  # nothing cut
    [problem] = verify_log(tmp_path).problems
    assert problem.startswith(f"{path}: offset {(damaged - 1) * frame}: frame CRC mismatch;")
    assert "acknowledged records follow the damage" in problem


@pytest.mark.parametrize("damaged", [4, 6, 8])
async def test_damage_inside_the_final_batch_is_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damaged: int
) -> None:
    frame = await write_batches(tmp_path)
    [path] = segment_files(tmp_path)
    # One page of the last write never reached the disk; the pages after it did.
    offset = (damaged - 1) * frame
    overwrite(path, offset + 4, bytes(frame - 4))
    [problem] = verify_log(tmp_path).problems
    lost = 8 - damaged + 1
    assert problem == (
        f"{path}: offset {offset}: frame CRC mismatch: torn final batch ({8 * frame - offset}"
        f" bytes, about {lost} records, never acknowledged); opening the log cuts it"
    )
    with caplog.at_level(logging.WARNING, logger="villaged.storage"):
        log = reopen(tmp_path)
    try:
        assert log.last_index == damaged - 1
    finally:
        log.close()
    [warning] = [r for r in caplog.records if getattr(r, "event", None)]
    assert warning.__dict__["event"] == "storage.tail_truncated"
    assert warning.__dict__["bytes_dropped"] == 8 * frame - offset
    assert warning.__dict__["records_dropped"] == lost
    assert path.stat().st_size == offset
    assert verify_log(tmp_path).ok


async def test_frame_written_whole_that_does_not_decode_is_never_cut(tmp_path: Path) -> None:
    await write_entries(tmp_path, 3)
    [path] = segment_files(tmp_path)
    # A record as an older encoder wrote it (no batch start): its CRC matches, so it is not
    # torn, and cutting it would drop a record that was acknowledged.
    old_style = msgpack.packb({"t": "test.entry", "v": 1, "T": 0, "i": 4, "b": {}})
    with path.open("ab") as file:
        file.write(encode_frame(old_style))
    data = path.read_bytes()
    with pytest.raises(CorruptionError, match="written whole") as info:
        reopen(tmp_path)
    assert info.value.offset == 3 * log_frame_size(entry(0), 1)
    assert path.read_bytes() == data
    [problem] = verify_log(tmp_path).problems
    assert "'B' is not a non-negative integer" in problem
    assert "written whole" in problem


async def test_torn_batch_below_the_snapshot_is_corruption(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(10)])
            await log.save_snapshot(8, 0, b"state@8")
    [path] = segment_files(tmp_path)
    frame = log_frame_size(entry(0), 1)
    overwrite(path, 4 * frame + HEADER_SIZE + 9, b"\xee")  # entry 5, in the only batch
    before = {p: p.read_bytes() for p in directory_listing(tmp_path)}
    # The snapshot at 8 was taken from durable entries: the batch was acknowledged.
    with pytest.raises(CorruptionError, match="snapshot at index 8 shows") as info:
        reopen(tmp_path)
    assert (info.value.path, info.value.offset) == (path, 4 * frame)
    assert {p: p.read_bytes() for p in directory_listing(tmp_path)} == before
    problems = verify_log(tmp_path).problems
    assert len(problems) == 2
    assert "torn final batch" in problems[0]
    assert "entries 5..8 were durable and are missing" in problems[1]


async def test_flipped_bit_in_a_sealed_segment_is_corruption(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    await write_entries(tmp_path, 12, segment_bytes=4 * frame)
    sealed = segment_files(tmp_path)[1]  # entries 5..8
    data = bytearray(sealed.read_bytes())
    data[2 * frame + HEADER_SIZE + 10] ^= 0x04  # inside entry 7's payload
    sealed.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as info:
        reopen(tmp_path)
    assert info.value.path == sealed
    assert info.value.offset == 2 * frame
    assert str(sealed) in str(info.value)
    assert sealed.stat().st_size == len(data)  # nothing cut
    report = verify_log(tmp_path)
    assert not report.ok
    assert report.problems == (
        f"{sealed}: offset {2 * frame}: frame CRC mismatch"
        f" ({len(data) - 2 * frame} bytes from there on unreadable)",
    )


async def test_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    await write_entries(tmp_path, 12, segment_bytes=4 * frame)
    middle = segment_files(tmp_path)[1]
    middle.unlink()
    with pytest.raises(CorruptionError, match="previous segment ends at 4") as info:
        reopen(tmp_path)
    assert info.value.path == segment_files(tmp_path)[1]
    assert info.value.offset == 0
    assert any("expected 5" in problem for problem in verify_log(tmp_path).problems)


async def test_empty_newest_segment_from_an_interrupted_roll_is_used(tmp_path: Path) -> None:
    await write_entries(tmp_path, 3)
    (tmp_path / "00000000000000000004.seg").touch()
    log = reopen(tmp_path)
    try:
        assert log.last_index == 3
    finally:
        log.close()
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            assert await log.append(entry(3)) == 4
    assert (tmp_path / "00000000000000000004.seg").stat().st_size > 0


async def test_corrupt_snapshot_file_is_corruption(tmp_path: Path) -> None:
    async with open_segment_log(tmp_path) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
            await log.save_snapshot(4, 0, b"snapshot data")
    [snap] = snapshot_files(tmp_path)
    data = bytearray(snap.read_bytes())
    data[-3] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match="CRC") as info:
        reopen(tmp_path)
    assert info.value.path == snap
    assert verify_log(tmp_path).problems == (f"{snap}: offset 0: frame CRC mismatch",)


async def test_verify_log_of_a_healthy_log(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=5 * frame) as log:
        await append_each(log, [entry(n, term=1) for n in range(23)])
        with trio.fail_after(WAIT):
            await log.save_snapshot(12, 1, b"s")
    report = verify_log(tmp_path)
    assert report.ok
    assert report.problems == ()
    assert (report.segments_checked, report.records_checked) == (3, 13)
    assert (report.first_index, report.last_index) == (11, 23)
    assert (report.snapshots_checked, report.latest_snapshot_index) == (1, 12)


async def test_verify_log_reports_a_snapshot_that_contradicts_the_log(tmp_path: Path) -> None:
    await write_entries(tmp_path, 5)
    snap = tmp_path / snapshot_file_name(3)
    snap.write_bytes(encode_snapshot(3, 9, b"x"))
    assert verify_log(tmp_path).problems == (
        f"{snap}: offset 0: snapshot term 9 at index 3 but the log has term 0 there",
    )


async def test_snapshot_that_does_not_reach_the_log_is_corruption(tmp_path: Path) -> None:
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=4 * frame) as log:
        await append_each(log, [entry(n) for n in range(20)])
        with trio.fail_after(WAIT):
            await log.save_snapshot(5, 0, b"five")
            await log.save_snapshot(14, 0, b"fourteen")
    assert [int(path.stem) for path in segment_files(tmp_path)] == [13, 17]
    newest = tmp_path / snapshot_file_name(14)
    newest.unlink()  # the snapshot at 5 no longer covers up to where the log starts
    with pytest.raises(CorruptionError, match="latest snapshot ends at 5") as info:
        reopen(tmp_path)
    assert info.value.path == tmp_path / "00000000000000000013.seg"
    assert verify_log(tmp_path).problems == (
        f"{tmp_path / snapshot_file_name(5)}: offset 0: snapshot ends at index 5 but the log"
        " only starts at 13: entries 6..12 are missing",
    )


async def test_snapshot_file_must_hold_the_index_in_its_name(tmp_path: Path) -> None:
    await write_entries(tmp_path, 5)
    (tmp_path / snapshot_file_name(4)).write_bytes(encode_snapshot(3, 0, b""))
    with pytest.raises(CorruptionError, match="holds the snapshot at index 3"):
        reopen(tmp_path)


def test_verify_log_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        verify_log(tmp_path / "nope")


# ------------------------------------------------------------------------ write failures


@pytest.mark.parametrize("where", ["write", "partial write", "fdatasync"])
async def test_failed_batch_is_rolled_back_and_the_log_recovers(tmp_path: Path, where: str) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
        [path] = segment_files(tmp_path)
        durable_size = path.stat().st_size
        if where == "fdatasync":
            ops.fdatasync_errno = errno.EIO
        else:
            ops.write_errno = errno.ENOSPC
            ops.partial_write_before_error = where == "partial write"
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                outcomes = await gather_outcomes(log, range(100, 120), nursery)
            with pytest.raises(LogWriteError):
                await log.append_many([entry(n) for n in range(200, 203)])
        assert len(outcomes) == 20
        assert all(isinstance(outcome, LogWriteError) for outcome in outcomes.values())
        assert path.stat().st_size == durable_size
        assert log.last_index == 5
        ops.write_errno = ops.fdatasync_errno = None  # the condition clears
        with trio.fail_after(WAIT):
            assert await log.append(entry(5)) == 6
            assert sorted((await append_concurrently(log, range(6, 10))).values()) == [7, 8, 9, 10]
    log = reopen(tmp_path)
    try:
        assert log.last_index == 10
        assert {r.body["n"] for r in log.scan(1)} == set(range(10))
    finally:
        log.close()


async def test_failure_fails_the_batches_queued_behind(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    ops.fdatasync_errno = errno.EIO
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path, file_ops=ops) as log:
            async with trio.open_nursery() as nursery:
                first = await gather_outcomes(log, [1, 2], nursery)
                await ops.wait_held()
                behind = await gather_outcomes(log, [3, 4, 5], nursery)
                await trio.testing.wait_all_tasks_blocked()
                ops.hold.set()
            assert ops.writes == [ops.writes[0]]  # the batch behind was never written
            outcomes = {**first, **behind}
            assert all(isinstance(outcome, LogWriteError) for outcome in outcomes.values())
            ops.hold = None
            ops.fdatasync_errno = None
            assert await log.append(entry(6)) == 1


async def test_failed_rollback_puts_the_log_in_the_failed_state(tmp_path: Path) -> None:
    ops = ScriptedOps()
    with trio.fail_after(WAIT):
        async with open_segment_log(tmp_path, file_ops=ops) as log:
            await log.append_many([entry(n) for n in range(3)])
            ops.write_errno = errno.EFBIG
            ops.partial_write_before_error = True
            ops.ftruncate_errno = errno.EIO
            with pytest.raises(LogWriteError):
                await log.append(entry(3))
            ops.write_errno = ops.ftruncate_errno = None
            with pytest.raises(LogWriteError, match="failed state"):
                await log.append(entry(4))
            with pytest.raises(LogWriteError, match="failed state"):
                await log.append_many([entry(4)])
            with pytest.raises(LogWriteError, match="failed state"):
                await log.truncate_after(1)
            assert [r.body["n"] for r in log.scan(1)] == [0, 1, 2]  # durable data still reads
    # The half-written frame left behind is a torn tail to recovery.
    log = reopen(tmp_path)
    try:
        assert log.last_index == 3
    finally:
        log.close()


async def test_failed_roll_fails_the_batch_and_is_retried(tmp_path: Path) -> None:
    ops = ScriptedOps()
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=2 * frame, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(0), entry(1)])
            ops.fsync_errno = errno.EIO  # sealing the full segment fails
            with pytest.raises(LogWriteError, match="new segment"):
                await log.append(entry(2))
            assert len(segment_files(tmp_path)) == 1
            ops.fsync_errno = None
            assert await log.append(entry(2)) == 3
        assert [int(path.stem) for path in segment_files(tmp_path)] == [1, 3]


async def test_failed_directory_sync_on_roll_is_undone(tmp_path: Path) -> None:
    ops = ScriptedOps()
    frame = log_frame_size(entry(0), 1)
    async with open_segment_log(tmp_path, segment_bytes=2 * frame, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(0), entry(1)])
            ops.dir_fsync_script = [True]
            with pytest.raises(LogWriteError, match="new segment"):
                await log.append(entry(2))
            # The new file was removed again, so the old segment is still the last one.
            assert len(segment_files(tmp_path)) == 1
            assert await log.append(entry(2)) == 3
            ops.dir_fsync_script = [True, True]  # the sync fails, and so does the undo
            await log.append(entry(3))
            with pytest.raises(LogWriteError, match="new segment"):
                await log.append(entry(4))
            with pytest.raises(LogWriteError, match="failed state"):
                await log.append(entry(4))


async def test_failed_snapshot_write_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
            ops.write_errno = errno.ENOSPC
            with pytest.raises(LogWriteError, match="snapshot not saved"):
                await log.save_snapshot(3, 0, b"state")
            with pytest.raises(LogWriteError, match="snapshot not saved"):
                await log.install_snapshot(30, 1, b"state")
            assert directory_listing(tmp_path) == segment_files(tmp_path)  # no tmp left
            assert (log.first_index, log.last_index, log.latest_snapshot()) == (1, 5, None)
            ops.write_errno = None
            await log.save_snapshot(3, 0, b"state")
            assert await log.append(entry(5)) == 6


async def test_failed_truncation_puts_the_log_in_the_failed_state(tmp_path: Path) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
            ops.ftruncate_errno = errno.EIO
            with pytest.raises(LogWriteError, match="truncating after index 2 failed"):
                await log.truncate_after(2)
            ops.ftruncate_errno = None
            with pytest.raises(LogWriteError, match="failed state"):
                await log.append(entry(5))
            with pytest.raises(LogWriteError, match="failed state"):
                await log.install_snapshot(10, 1, b"")


async def test_failed_snapshot_installation_is_finished_by_recovery(tmp_path: Path) -> None:
    ops = ScriptedOps()
    async with open_segment_log(tmp_path, file_ops=ops) as log:
        with trio.fail_after(WAIT):
            await log.append_many([entry(n) for n in range(5)])
            # The snapshot file becomes durable; replacing the segments then fails.
            ops.dir_fsync_script = [False, True]
            with pytest.raises(LogWriteError, match="installing snapshot 30 failed"):
                await log.install_snapshot(30, 1, b"state")
            with pytest.raises(LogWriteError, match="failed state"):
                await log.append(entry(5))
    log = reopen(tmp_path)
    try:
        assert (log.first_index, log.last_index) == (31, 30)
        assert log.latest_snapshot() == Snapshot(30, 1, b"state")
    finally:
        log.close()


async def test_pending_bytes_are_bounded(tmp_path: Path) -> None:
    ops = ScriptedOps()
    ops.hold = threading.Event()
    frame = log_frame_size(entry(0), 1)
    with trio.fail_after(WAIT):
        async with (
            open_segment_log(tmp_path, file_ops=ops, max_pending_bytes=3 * frame) as log,
            trio.open_nursery() as nursery,
        ):
            first = await gather_outcomes(log, [0], nursery)
            await ops.wait_held()
            rest = await gather_outcomes(log, range(1, 10), nursery)
            await trio.testing.wait_all_tasks_blocked()
            ops.hold.set()
        assert acked({**first, **rest}) == list(range(1, 11))
        # While the first frame was being synced only two more could queue behind it.
        assert ops.writes[:2] == [frame, 2 * frame]
        assert all(size <= 3 * frame for size in ops.writes)


# ------------------------------------------------------------------------ real EFBIG


def test_real_efbig_from_rlimit_fsize(tmp_path: Path) -> None:
    """A subprocess with a low RLIMIT_FSIZE (SIGXFSZ ignored) gets real EFBIG from pwrite."""
    directory = tmp_path / "log"
    limit = 20_000
    done = subprocess.run(
        [sys.executable, str(HERE / "fsize_writer.py"), str(directory), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    acked: list[int] = result["acked"]
    assert result["failed"] > 0
    assert "File too large" in result["error"]
    assert acked == list(range(1, len(acked) + 1))
    # Once the limit is lifted the same log goes on from the last durable index.
    assert result["after"] == list(range(len(acked) + 1, len(acked) + 6))
    log = reopen(directory)
    try:
        assert log.last_index == len(acked) + 5
        # Each record carries the index it was written for: nothing from a failed batch
        # survived, nothing shifted.
        assert [record.body["k"] for record in log.scan(1)] == list(range(1, len(acked) + 6))
    finally:
        log.close()
