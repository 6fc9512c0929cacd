"""The on-disk frame format and the pure scanning of segment and snapshot files.

This module owns the bytes: how one record payload is framed, how a segment file's contents
are checked frame by frame, and how a snapshot file is laid out. It does no I/O beyond what a
caller hands it (``bytes``), so recovery, ``verify_log`` and the tests share one parser.

Frame::

    length u32 | crc32 u32 | payload        (both integers little-endian)

``crc32`` is ``zlib.crc32(payload)``; ``payload`` is ``encode_record(record, batch=...)``. A
zero-filled tail (what some file systems leave after a crash) reads as ``length 0, crc 0`` which
passes the CRC of the empty payload but fails to decode as a record, so it is reported as
damage. A record frame is never longer than :data:`MAX_RECORD_PAYLOAD`, the format's hard cap:
reading checks lengths against it, never against the configured (lower, changeable) limit that
new appends obey, so lowering that setting cannot make existing records unreadable.

A segment file ``{base:020d}.seg`` holds records ``base, base+1, ...`` back to back with no file
header; the record's own ``index`` field must match its position. Batches never span segments,
so the first record's batch start is its own index, and each later record either belongs to the
batch of the record before it or starts a new batch (batch start == its index).

*Damage in the newest segment.* :func:`assess_damage` looks past the first bad frame for frames
that are still whole, without trusting any length on the way: every encoded record starts with
:data:`~villaged.storage.records.RECORD_PREFIX`, so candidates are found with ``bytes.find`` and
each is checked through the 8-byte header just before it (length, CRC, decode). A whole frame
whose batch starts after the damaged index was written by a later batch, and the writer only
writes a batch after every earlier one is durable: the damaged record was acknowledged. Without
such a frame the damage lies in the final batch, whose pages may have reached the disk in any
order (a torn write), and recovery may cut it. A damaged frame whose payload passes its CRC was
written whole (it is not torn): it is never cut either.

A snapshot file ``{index:020d}.snap`` holds exactly one frame whose payload is a record of type
``log.snapshot`` carrying the snapshot's index and term in the record envelope, the opaque
snapshot bytes as ``body["data"]`` and ``body["replaces_log"]``: True when the snapshot was
installed from elsewhere and replaces every segment (so segments it covers that are still on
disk are leftovers of an interrupted installation).
"""

from __future__ import annotations

import struct
import zlib
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from villaged.storage.records import (
    RECORD_PREFIX,
    Record,
    RecordDecodeError,
    decode_record_and_batch,
    encode_record,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

FRAME_HEADER = struct.Struct("<II")
HEADER_SIZE = FRAME_HEADER.size
#: The frame length field is a u32; snapshots may be larger than records but not than this.
MAX_FRAME_PAYLOAD = 2**32 - 1
#: The format's hard cap on a record frame's payload (the largest ``storage.max_record_bytes``
#: the configuration allows). Scans, reads and recovery check lengths against this.
MAX_RECORD_PAYLOAD = 64 * 2**20

SEGMENT_SUFFIX = ".seg"
SNAPSHOT_SUFFIX = ".snap"
TMP_SUFFIX = ".tmp"
SNAPSHOT_RECORD_TYPE = "log.snapshot"

_NAME_DIGITS = 20


class FrameError(Exception):
    """A frame fails its checks at ``offset`` (relative to the buffer it was read from).

    Callers turn it into a :class:`~villaged.storage.errors.CorruptionError` naming the file,
    or decide that it is a torn tail they may cut.
    """

    def __init__(self, offset: int, reason: str, *, written_whole: bool = False) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason
        #: The frame is not empty and its payload passes the CRC: it reached the disk exactly
        #: as written, so it is not a torn write (it fails for another reason).
        self.written_whole = written_whole


def segment_file_name(base: int) -> str:
    return f"{base:0{_NAME_DIGITS}d}{SEGMENT_SUFFIX}"


def snapshot_file_name(index: int) -> str:
    return f"{index:0{_NAME_DIGITS}d}{SNAPSHOT_SUFFIX}"


def parse_segment_file_name(name: str) -> int | None:
    """The base index encoded in a segment file name, or None if ``name`` is not one."""
    return _parse_name(name, SEGMENT_SUFFIX)


def parse_snapshot_file_name(name: str) -> int | None:
    """The index encoded in a snapshot file name, or None if ``name`` is not one."""
    return _parse_name(name, SNAPSHOT_SUFFIX)


def _parse_name(name: str, suffix: str) -> int | None:
    stem = name.removesuffix(suffix)
    if stem == name or len(stem) != _NAME_DIGITS or not stem.isascii() or not stem.isdigit():
        return None
    return int(stem)


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds the u32 length field")
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frame(data: bytes, offset: int, *, max_payload: int) -> tuple[bytes, int]:
    """Check the frame starting at ``offset``: return its payload and the next frame's offset.

    Raises :class:`FrameError` at ``offset`` for a short header, a length above
    ``max_payload``, a short payload or a CRC mismatch.
    """
    remaining = len(data) - offset
    if remaining < HEADER_SIZE:
        raise FrameError(offset, f"short frame header ({remaining} of {HEADER_SIZE} bytes)")
    length, crc = FRAME_HEADER.unpack_from(data, offset)
    if length > max_payload:
        raise FrameError(offset, f"frame length {length} exceeds the maximum of {max_payload}")
    start = offset + HEADER_SIZE
    end = start + length
    if end > len(data):
        raise FrameError(offset, f"short frame payload ({len(data) - start} of {length} bytes)")
    payload = data[start:end]
    if zlib.crc32(payload) != crc:
        raise FrameError(offset, "frame CRC mismatch")
    return payload, end


def decode_record_frame(data: bytes, offset: int, *, max_payload: int) -> tuple[Record, int]:
    """:func:`read_frame`, then decode the payload as a record; decode failures are damage."""
    record, _, end = decode_batch_frame(data, offset, max_payload=max_payload)
    return record, end


def decode_batch_frame(data: bytes, offset: int, *, max_payload: int) -> tuple[Record, int, int]:
    """:func:`decode_record_frame`, also returning the record's batch start:
    ``(record, batch, end)``."""
    payload, end = read_frame(data, offset, max_payload=max_payload)
    try:
        record, batch = decode_record_and_batch(payload)
    except RecordDecodeError as exc:
        raise FrameError(offset, str(exc), written_whole=bool(payload)) from exc
    return record, batch, end


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """What a segment file's bytes hold, up to the first damaged frame.

    ``offsets[i]`` is where the frame of record ``base + i`` starts; ``term_changes`` lists
    ``(index, term)`` for the first record and every record whose term differs from the one
    before it (terms change rarely, so this is much smaller than one term per record).
    ``damage`` is the first bad frame, which starts at ``valid_bytes``; everything from there on
    is unusable because frame boundaries after a bad length cannot be trusted.
    """

    base: int
    offsets: array[int]
    term_changes: tuple[tuple[int, int], ...]
    valid_bytes: int
    total_bytes: int
    damage: FrameError | None

    @property
    def count(self) -> int:
        return len(self.offsets)

    @property
    def last_index(self) -> int:
        """Index of the last good record (``base - 1`` when there is none)."""
        return self.base + len(self.offsets) - 1


def scan_segment(data: bytes, *, base: int) -> SegmentScan:
    """Check every frame of a segment whose file name says it starts at ``base``.

    Stops at the first frame that is torn, fails its CRC, does not decode as a record, whose
    record index is not the next one expected, or whose batch start does not fit the batches
    before it; that frame is reported as ``damage``.
    """
    offsets: array[int] = array("Q")
    term_changes: list[tuple[int, int]] = []
    offset = 0
    expected = base
    batch_start = -1  # no batch yet: the first record must start one
    last_term: int | None = None
    damage: FrameError | None = None
    while offset < len(data):
        try:
            record, batch, end = decode_batch_frame(data, offset, max_payload=MAX_RECORD_PAYLOAD)
        except FrameError as exc:
            damage = exc
            break
        if record.index != expected:
            damage = FrameError(
                offset,
                f"record index {record.index} where index {expected} was expected",
                written_whole=True,
            )
            break
        if batch not in (batch_start, expected):
            damage = FrameError(
                offset,
                f"record {expected} claims batch start {batch}, but it neither continues the"
                f" batch before it nor starts one",
                written_whole=True,
            )
            break
        batch_start = batch
        if record.term != last_term:
            term_changes.append((expected, record.term))
            last_term = record.term
        offsets.append(offset)
        expected += 1
        offset = end
    return SegmentScan(
        base=base,
        offsets=offsets,
        term_changes=tuple(term_changes),
        valid_bytes=offset,
        total_bytes=len(data),
        damage=damage,
    )


@dataclass(frozen=True, slots=True)
class LaterFrame:
    """A whole frame found after damage: where it starts, its record's index and batch start."""

    offset: int
    index: int
    batch: int


@dataclass(frozen=True, slots=True)
class DamageAssessment:
    """What lies after the first damaged frame of a segment (see the module docstring).

    ``whole_frames_after`` counts the whole frames found after the damage (with indexes past
    the last good one) up to ``later_batch``, the first of them written by a later batch than
    the damaged record's; the search stops there.
    """

    offset: int
    reason: str
    expected_index: int
    bytes_from_damage: int
    damaged_frame_whole: bool
    whole_frames_after: int
    later_batch: LaterFrame | None

    @property
    def torn_tail(self) -> bool:
        """The damage can only be a torn final batch: cutting it loses nothing acknowledged."""
        return self.later_batch is None and not self.damaged_frame_whole

    @property
    def records_lost(self) -> int:
        """Records a cut at the damage loses: the whole frames after it plus the damaged one."""
        return self.whole_frames_after + 1

    def why_not_torn(self) -> str:
        """Why the damage cannot be cut (only meaningful when not :attr:`torn_tail`)."""
        later = self.later_batch
        if later is not None:
            return (
                f"acknowledged records follow the damage: record {later.index} at offset"
                f" {later.offset} was written by a later batch (starting at index {later.batch})"
                f" after the batch holding index {self.expected_index} was durable"
            )
        return "the damaged frame was written whole (its CRC matches), so it is not a torn write"


def assess_damage(data: bytes, scan: SegmentScan) -> DamageAssessment:
    """Look past ``scan.damage`` in ``data`` (the segment's bytes) for whole frames."""
    damage = scan.damage
    if damage is None:
        raise ValueError("the scan found no damage")
    expected = scan.last_index + 1
    whole = 0
    later: LaterFrame | None = None
    for frame in _whole_frames_from(data, damage.offset, after_index=scan.last_index):
        if frame.batch > expected:
            later = frame
            break
        whole += 1
    return DamageAssessment(
        offset=damage.offset,
        reason=damage.reason,
        expected_index=expected,
        bytes_from_damage=len(data) - damage.offset,
        damaged_frame_whole=damage.written_whole,
        whole_frames_after=whole,
        later_batch=later,
    )


def _whole_frames_from(data: bytes, start: int, *, after_index: int) -> Iterator[LaterFrame]:
    """Whole record frames starting at or after ``start`` whose index is above
    ``after_index``, found by their payload's fixed prefix rather than by frame lengths."""
    find = data.find
    position = start + HEADER_SIZE
    while (found := find(RECORD_PREFIX, position)) >= 0:
        frame_start = found - HEADER_SIZE
        try:
            record, batch, end = decode_batch_frame(
                data, frame_start, max_payload=MAX_RECORD_PAYLOAD
            )
        except FrameError:
            position = found + 1
            continue
        if record.index <= after_index:
            position = found + 1
            continue
        yield LaterFrame(frame_start, record.index, batch)
        # A whole frame's payload holds no frame boundary: go on after it.
        position = end + HEADER_SIZE


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    """What a snapshot file holds (see the module docstring)."""

    index: int
    term: int
    data: bytes
    replaces_log: bool


def encode_snapshot(index: int, term: int, data: bytes, *, replaces_log: bool = False) -> bytes:
    """The whole contents of a snapshot file."""
    record = Record(
        type=SNAPSHOT_RECORD_TYPE,
        body={"data": data, "replaces_log": replaces_log},
        term=term,
        index=index,
    )
    return encode_frame(encode_record(record, batch=index))


def decode_snapshot(contents: bytes) -> SnapshotContents:
    """A snapshot file's contents; :class:`FrameError` if damaged."""
    record, end = decode_record_frame(contents, 0, max_payload=MAX_FRAME_PAYLOAD)
    if end != len(contents):
        raise FrameError(end, f"{len(contents) - end} unexpected bytes after the snapshot frame")
    if record.type != SNAPSHOT_RECORD_TYPE:
        raise FrameError(0, f"record type {record.type!r} is not a snapshot")
    data = record.body.get("data")
    if not isinstance(data, bytes):
        raise FrameError(0, "snapshot record carries no data bytes")
    replaces_log = record.body.get("replaces_log")
    if not isinstance(replaces_log, bool):
        raise FrameError(0, "snapshot record does not say whether it replaces the log")
    return SnapshotContents(record.index, record.term, data, replaces_log)
