"""The frame format and segment/snapshot scanning, fed bytes directly."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest

from villaged.storage.records import Record, encode_record
from villaged.storage.segment import (
    HEADER_SIZE,
    FrameError,
    decode_record_frame,
    decode_snapshot,
    encode_frame,
    encode_snapshot,
    parse_segment_file_name,
    parse_snapshot_file_name,
    read_frame,
    scan_segment,
    segment_file_name,
    snapshot_file_name,
)

MAX = 4096


def record_frame(index: int, term: int = 0, pad: int = 20) -> bytes:
    record = Record(type="test.entry", body={"n": index, "pad": b"p" * pad}, term=term, index=index)
    return encode_frame(encode_record(record))


def segment_bytes(base: int, count: int, term: int = 0) -> bytes:
    return b"".join(record_frame(index, term) for index in range(base, base + count))


def test_frame_layout_is_little_endian_length_then_crc() -> None:
    frame = encode_frame(b"hello")
    assert frame == struct.pack("<II", 5, zlib.crc32(b"hello")) + b"hello"
    assert read_frame(frame, 0, max_payload=MAX) == (b"hello", len(frame))


def test_read_frame_at_offset_returns_next_offset() -> None:
    data = encode_frame(b"one") + encode_frame(b"two")
    payload, next_offset = read_frame(data, 0, max_payload=MAX)
    assert payload == b"one"
    assert read_frame(data, next_offset, max_payload=MAX) == (b"two", len(data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x05\x00\x00", "short frame header"),
        (struct.pack("<II", MAX + 1, 0) + b"x" * 10, "exceeds the maximum"),
        (encode_frame(b"hello")[:-1], "short frame payload"),
        (encode_frame(b"hello")[:-1] + b"j", "CRC mismatch"),
    ],
)
def test_read_frame_rejects_damage(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason) as info:
        read_frame(data, 0, max_payload=MAX)
    assert info.value.offset == 0


def test_decode_record_frame_rejects_valid_crc_over_non_record() -> None:
    with pytest.raises(FrameError, match="not a msgpack map") as info:
        decode_record_frame(b"xx" + encode_frame(msgpack.packb([1, 2])), 2, max_payload=MAX)
    assert info.value.offset == 2


def test_file_names_round_trip() -> None:
    assert segment_file_name(1) == "00000000000000000001.seg"
    assert parse_segment_file_name(segment_file_name(12345)) == 12345
    assert parse_snapshot_file_name(snapshot_file_name(77)) == 77
    for name in ["1.seg", "0000000000000000000x.seg", "00000000000000000001.snap", "x"]:
        assert parse_segment_file_name(name) is None
    assert parse_snapshot_file_name("00000000000000000001.seg") is None


def test_scan_of_intact_segment() -> None:
    data = segment_bytes(10, 5)
    scan = scan_segment(data, base=10, max_record_bytes=MAX)
    assert scan.damage is None
    assert scan.count == 5
    assert scan.last_index == 14
    assert scan.valid_bytes == scan.total_bytes == len(data)
    frame_size = len(record_frame(10))
    assert list(scan.offsets) == [k * frame_size for k in range(5)]
    assert scan.term_changes == ((10, 0),)


def test_scan_of_empty_segment() -> None:
    scan = scan_segment(b"", base=7, max_record_bytes=MAX)
    assert (scan.count, scan.last_index, scan.valid_bytes, scan.damage) == (0, 6, 0, None)


def test_scan_records_term_changes_only() -> None:
    data = record_frame(1, 1) + record_frame(2, 1) + record_frame(3, 2) + record_frame(4, 5)
    scan = scan_segment(data, base=1, max_record_bytes=MAX)
    assert scan.term_changes == ((1, 1), (3, 2), (4, 5))


def test_every_torn_prefix_keeps_exactly_the_whole_frames() -> None:
    data = segment_bytes(1, 3)
    frame_size = len(record_frame(1))
    for cut in range(len(data)):
        scan = scan_segment(data[:cut], base=1, max_record_bytes=MAX)
        whole = cut // frame_size
        assert scan.count == whole
        assert scan.valid_bytes == whole * frame_size
        assert (scan.damage is None) == (cut == whole * frame_size)
        if scan.damage is not None:
            assert scan.damage.offset == scan.valid_bytes


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"\x00" * 64, "does not decode"),  # zero-filled tail: length 0 passes the empty CRC
        (b"\xff" * 64, "exceeds the maximum"),
        (struct.pack("<II", 3, 0) + b"abc", "CRC mismatch"),
    ],
)
def test_garbage_after_good_frames_is_damage_at_its_offset(tail: bytes, reason: str) -> None:
    good = segment_bytes(1, 4)
    scan = scan_segment(good + tail, base=1, max_record_bytes=MAX)
    assert scan.count == 4
    assert scan.damage is not None
    assert scan.damage.offset == len(good)
    assert reason in scan.damage.reason


def test_index_discontinuity_is_damage() -> None:
    data = segment_bytes(1, 2) + record_frame(5)
    scan = scan_segment(data, base=1, max_record_bytes=MAX)
    assert scan.count == 2
    assert scan.damage is not None
    assert "index 5 where index 3 was expected" in scan.damage.reason


def test_first_record_must_match_the_file_base() -> None:
    scan = scan_segment(segment_bytes(1, 2), base=2, max_record_bytes=MAX)
    assert scan.count == 0
    assert scan.damage is not None
    assert scan.damage.offset == 0


def test_flipped_bit_is_damage_at_the_frame_start() -> None:
    data = bytearray(segment_bytes(1, 4))
    frame_size = len(record_frame(1))
    data[2 * frame_size + HEADER_SIZE + 3] ^= 0x10
    scan = scan_segment(bytes(data), base=1, max_record_bytes=MAX)
    assert scan.count == 2
    assert scan.damage is not None
    assert scan.damage.offset == 2 * frame_size
    assert "CRC" in scan.damage.reason


def test_snapshot_round_trip() -> None:
    contents = encode_snapshot(42, 7, b"\x00state\xff")
    assert decode_snapshot(contents) == (42, 7, b"\x00state\xff")


def test_snapshot_larger_than_a_record_limit_is_fine() -> None:
    data = bytes(range(256)) * 20_000
    assert decode_snapshot(encode_snapshot(1, 1, data))[2] == data


@pytest.mark.parametrize(
    ("contents", "reason"),
    [
        (encode_snapshot(1, 1, b"abc")[:-1], "short frame payload"),
        (encode_snapshot(1, 1, b"abc") + b"\x00", "unexpected bytes"),
        (encode_frame(encode_record(Record(type="other", index=1))), "is not a snapshot"),
        (encode_frame(encode_record(Record(type="log.snapshot", body={"data": 1}))), "no data"),
    ],
)
def test_damaged_snapshot_is_rejected(contents: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_snapshot(contents)


def test_snapshot_bit_flip_is_rejected() -> None:
    contents = bytearray(encode_snapshot(3, 1, b"some state"))
    contents[-2] ^= 1
    with pytest.raises(FrameError, match="CRC"):
        decode_snapshot(bytes(contents))
