"""The frame format and segment/snapshot scanning, fed bytes directly."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest

from villaged.storage.records import RECORD_PREFIX, Record, encode_record
from villaged.storage.segment import (
    HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    FrameError,
    LaterFrame,
    SnapshotContents,
    assess_damage,
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


def record_frame(index: int, term: int = 0, pad: int = 20, *, batch: int | None = None) -> bytes:
    """The frame of entry ``index``, alone in its batch unless ``batch`` says otherwise."""
    record = Record(type="test.entry", body={"n": index, "pad": b"p" * pad}, term=term, index=index)
    return encode_frame(encode_record(record, batch=index if batch is None else batch))


def segment_bytes(base: int, count: int, term: int = 0) -> bytes:
    """``count`` entries from ``base``, written as one batch."""
    return b"".join(record_frame(index, term, batch=base) for index in range(base, base + count))


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
    scan = scan_segment(data, base=10)
    assert scan.damage is None
    assert scan.count == 5
    assert scan.last_index == 14
    assert scan.valid_bytes == scan.total_bytes == len(data)
    frame_size = len(record_frame(10))
    assert list(scan.offsets) == [k * frame_size for k in range(5)]
    assert scan.term_changes == ((10, 0),)


def test_scan_of_empty_segment() -> None:
    scan = scan_segment(b"", base=7)
    assert (scan.count, scan.last_index, scan.valid_bytes, scan.damage) == (0, 6, 0, None)


def test_scan_records_term_changes_only() -> None:
    data = record_frame(1, 1) + record_frame(2, 1) + record_frame(3, 2) + record_frame(4, 5)
    scan = scan_segment(data, base=1)
    assert scan.term_changes == ((1, 1), (3, 2), (4, 5))


def test_every_torn_prefix_keeps_exactly_the_whole_frames() -> None:
    data = segment_bytes(1, 3)
    frame_size = len(record_frame(1))
    for cut in range(len(data)):
        scan = scan_segment(data[:cut], base=1)
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
    scan = scan_segment(good + tail, base=1)
    assert scan.count == 4
    assert scan.damage is not None
    assert scan.damage.offset == len(good)
    assert reason in scan.damage.reason


def test_index_discontinuity_is_damage() -> None:
    data = segment_bytes(1, 2) + record_frame(5)
    scan = scan_segment(data, base=1)
    assert scan.count == 2
    assert scan.damage is not None
    assert "index 5 where index 3 was expected" in scan.damage.reason


def test_first_record_must_match_the_file_base() -> None:
    scan = scan_segment(segment_bytes(1, 2), base=2)
    assert scan.count == 0
    assert scan.damage is not None
    assert scan.damage.offset == 0


def test_flipped_bit_is_damage_at_the_frame_start() -> None:
    data = bytearray(segment_bytes(1, 4))
    frame_size = len(record_frame(1))
    data[2 * frame_size + HEADER_SIZE + 3] ^= 0x10
    scan = scan_segment(bytes(data), base=1)
    assert scan.count == 2
    assert scan.damage is not None
    assert scan.damage.offset == 2 * frame_size
    assert "CRC" in scan.damage.reason


def test_snapshot_round_trip() -> None:
    contents = encode_snapshot(42, 7, b"\x00state\xff")
    assert decode_snapshot(contents) == SnapshotContents(42, 7, b"\x00state\xff", False)
    installed = encode_snapshot(42, 7, b"s", replaces_log=True)
    assert decode_snapshot(installed) == SnapshotContents(42, 7, b"s", True)


def test_snapshot_larger_than_a_record_limit_is_fine() -> None:
    data = bytes(range(256)) * 20_000
    assert decode_snapshot(encode_snapshot(1, 1, data)).data == data


def snapshot_with_body(body: dict[str, object]) -> bytes:
    return encode_frame(encode_record(Record(type="log.snapshot", body=body), batch=0))


@pytest.mark.parametrize(
    ("contents", "reason"),
    [
        (encode_snapshot(1, 1, b"abc")[:-1], "short frame payload"),
        (encode_snapshot(1, 1, b"abc") + b"\x00", "unexpected bytes"),
        (encode_frame(encode_record(Record(type="other", index=1), batch=1)), "is not a snapshot"),
        (snapshot_with_body({"data": 1, "replaces_log": False}), "no data"),
        (snapshot_with_body({"data": b""}), "whether it replaces the log"),
        (snapshot_with_body({"data": b"", "replaces_log": 1}), "whether it replaces the log"),
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


def test_frame_lengths_are_checked_against_the_format_cap_not_a_setting() -> None:
    big = record_frame(1, pad=100_000)
    scan = scan_segment(big + record_frame(2), base=1)
    assert (scan.count, scan.damage) == (2, None)
    over = struct.pack("<II", MAX_RECORD_PAYLOAD + 1, 0) + b"x" * 16
    scan = scan_segment(record_frame(1) + over, base=1)
    assert scan.damage is not None
    assert f"exceeds the maximum of {MAX_RECORD_PAYLOAD}" in scan.damage.reason


@pytest.mark.parametrize(
    ("batches", "bad_index"),
    [
        ([1, 1, 2], 3),  # joins a batch that is not the one before it
        ([1, 1, 1, 2], 4),  # starts a batch somewhere else
        ([0, 1], 1),  # the first record of a segment starts its own batch
    ],
)
def test_batch_starts_must_continue_or_start_a_batch(batches: list[int], bad_index: int) -> None:
    data = b"".join(
        record_frame(index, batch=batch) for index, batch in enumerate(batches, start=1)
    )
    scan = scan_segment(data, base=1)
    assert scan.last_index == bad_index - 1
    assert scan.damage is not None
    assert f"record {bad_index} claims batch start" in scan.damage.reason
    assert scan.damage.written_whole


def batches(*sizes: int) -> tuple[bytes, list[int]]:
    """A segment from index 1 of consecutive batches of ``sizes`` records, and the offset of
    every frame."""
    data = b""
    offsets = []
    index = 1
    for size in sizes:
        start = index
        for _ in range(size):
            offsets.append(len(data))
            data += record_frame(index, batch=start)
            index += 1
    return data, offsets


def flip(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0x40
    return bytes(damaged)


def test_damage_followed_by_a_later_batch_is_not_a_torn_tail() -> None:
    data, offsets = batches(2, 3, 1)
    damaged = flip(data, offsets[1] + HEADER_SIZE + 10)  # index 2, end of the first batch
    scan = scan_segment(damaged, base=1)
    assessment = assess_damage(damaged, scan)
    assert not assessment.torn_tail
    assert assessment.later_batch == LaterFrame(offsets[2], 3, 3)
    assert (assessment.offset, assessment.expected_index) == (offsets[1], 2)
    assert assessment.whole_frames_after == 0
    assert "acknowledged records follow the damage: record 3 at offset" in (
        assessment.why_not_torn()
    )


def test_damage_with_only_its_own_batch_after_it_is_a_torn_tail() -> None:
    data, offsets = batches(2, 4)
    # A damaged length field: frame boundaries after it cannot come from lengths.
    damaged = data[: offsets[3]] + b"\xff\xff\x00\x00" + data[offsets[3] + 4 :]
    scan = scan_segment(damaged, base=1)
    assessment = assess_damage(damaged, scan)
    assert assessment.torn_tail
    assert assessment.later_batch is None
    assert (assessment.whole_frames_after, assessment.records_lost) == (2, 3)
    assert assessment.bytes_from_damage == len(data) - offsets[3]


def test_zero_filled_tail_is_torn() -> None:
    data, _ = batches(3)
    damaged = data + bytes(4096)
    assessment = assess_damage(damaged, scan_segment(damaged, base=1))
    assert assessment.torn_tail
    assert assessment.records_lost == 1
    assert not assessment.damaged_frame_whole


@pytest.mark.parametrize(
    "tail",
    [
        encode_frame(msgpack.packb({"t": "x", "v": 1, "T": 0, "i": 3, "b": {}})),  # no "B"
        record_frame(7, batch=3),  # whole, but not the index expected
    ],
)
def test_damaged_frame_written_whole_is_not_torn(tail: bytes) -> None:
    data, _ = batches(2)
    assessment = assess_damage(data + tail, scan_segment(data + tail, base=1))
    assert assessment.damaged_frame_whole
    assert not assessment.torn_tail
    assert "written whole" in assessment.why_not_torn()


def test_frames_inside_whole_payloads_are_skipped() -> None:
    fake = record_frame(50, batch=50)  # a whole frame from a "later batch", as body bytes
    carrier = Record(type="test.entry", body={"blob": RECORD_PREFIX * 3 + fake}, index=4)
    data, offsets = batches(2)
    final = [
        Record(type="test.entry", index=3),
        carrier,
        Record(type="test.entry", index=5),
    ]
    for record in final:  # the final batch: 3..5
        offsets.append(len(data))
        data += encode_frame(encode_record(record, batch=3))
    damaged = flip(data, offsets[2] + HEADER_SIZE + 3)  # record 3
    assessment = assess_damage(damaged, scan_segment(damaged, base=1))
    # The search goes on after each whole frame, so the fake inside record 4 is not seen.
    assert assessment.torn_tail
    assert assessment.whole_frames_after == 2
    # Inside a damaged frame it is seen: bytes can fake a later batch only where they are
    # damaged themselves, and then recovery refuses to open rather than cut.
    damaged = flip(data, offsets[3] + HEADER_SIZE + 3)  # record 4, not the fake in it
    assessment = assess_damage(damaged, scan_segment(damaged, base=1))
    assert assessment.later_batch is not None
    assert assessment.later_batch.index == 50


def test_assess_damage_needs_damage() -> None:
    data, _ = batches(2)
    with pytest.raises(ValueError, match="no damage"):
        assess_damage(data, scan_segment(data, base=1))
