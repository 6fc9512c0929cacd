"""The on-disk frame format and the pure scanning of segment and snapshot files.

This module owns the bytes: how one record payload is framed, how a segment file's contents
are checked frame by frame, and how a snapshot file is laid out. It does no I/O beyond what a
caller hands it (``bytes``), so recovery, ``verify_log`` and the tests share one parser.

Frame::

    length u32 | crc32 u32 | payload        (both integers little-endian)

``crc32`` is ``zlib.crc32(payload)``; ``payload`` is ``encode_record(record)``. A zero-filled
tail (what some file systems leave after a crash) reads as ``length 0, crc 0`` which passes the
CRC of the empty payload but fails to decode as a record, so it is reported as damage.

A segment file ``{base:020d}.seg`` holds records ``base, base+1, ...`` back to back with no file
header; the record's own ``index`` field must match its position. A snapshot file
``{index:020d}.snap`` holds exactly one frame whose payload is a record of type
``log.snapshot`` carrying the snapshot's index and term in the record envelope and the opaque
snapshot bytes as ``body["data"]``.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from dataclasses import dataclass

from villaged.storage.records import Record, RecordDecodeError, decode_record, encode_record

FRAME_HEADER = struct.Struct("<II")
HEADER_SIZE = FRAME_HEADER.size
#: The frame length field is a u32; snapshots may be larger than records but not than this.
MAX_FRAME_PAYLOAD = 2**32 - 1

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

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


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
    payload, end = read_frame(data, offset, max_payload=max_payload)
    try:
        return decode_record(payload), end
    except RecordDecodeError as exc:
        raise FrameError(offset, str(exc)) from exc


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


def scan_segment(data: bytes, *, base: int, max_record_bytes: int) -> SegmentScan:
    """Check every frame of a segment whose file name says it starts at ``base``.

    Stops at the first frame that is torn, fails its CRC, does not decode as a record, or whose
    record index is not the next one expected; that frame is reported as ``damage``.
    """
    offsets: array[int] = array("Q")
    term_changes: list[tuple[int, int]] = []
    offset = 0
    expected = base
    last_term: int | None = None
    damage: FrameError | None = None
    while offset < len(data):
        try:
            record, end = decode_record_frame(data, offset, max_payload=max_record_bytes)
        except FrameError as exc:
            damage = exc
            break
        if record.index != expected:
            damage = FrameError(
                offset, f"record index {record.index} where index {expected} was expected"
            )
            break
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


def encode_snapshot(index: int, term: int, data: bytes) -> bytes:
    """The whole contents of a snapshot file."""
    record = Record(type=SNAPSHOT_RECORD_TYPE, body={"data": data}, term=term, index=index)
    return encode_frame(encode_record(record))


def decode_snapshot(contents: bytes) -> tuple[int, int, bytes]:
    """``(index, term, data)`` from a snapshot file's contents; :class:`FrameError` if damaged."""
    record, end = decode_record_frame(contents, 0, max_payload=MAX_FRAME_PAYLOAD)
    if end != len(contents):
        raise FrameError(end, f"{len(contents) - end} unexpected bytes after the snapshot frame")
    if record.type != SNAPSHOT_RECORD_TYPE:
        raise FrameError(0, f"record type {record.type!r} is not a snapshot")
    data = record.body.get("data")
    if not isinstance(data, bytes):
        raise FrameError(0, "snapshot record carries no data bytes")
    return record.index, record.term, data
