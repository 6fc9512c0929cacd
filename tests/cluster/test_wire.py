"""The cluster wire format: bytes in, frames out (no sockets)."""

from __future__ import annotations

import msgpack
import pytest

from villaged.cluster import raft
from villaged.cluster.wire import (
    CLOSED,
    HEADER,
    NEED_DATA,
    WIRE_VERSION,
    BadVersionError,
    Envelope,
    FrameDecoder,
    FrameTooLargeError,
    Hello,
    MalformedFrameError,
    TruncatedFrameError,
    encode_envelope,
    encode_frame,
    encode_hello,
)

APPEND = raft.AppendEntries(
    "g1",
    "n1",
    "n2",
    3,
    prev_index=4,
    prev_term=2,
    entries=(
        raft.Entry(5, 3, raft.EntryKind.DATA, b"x" * 10),
        raft.Entry(6, 3, raft.EntryKind.NOOP),
    ),
    commit=4,
)
SNAPSHOT = raft.InstallSnapshot(
    "g2", "n1", "n3", 7, raft.Snapshot(10, 6, frozenset({"n1", "n2", "n3"}), b"state")
)


def test_hello_and_envelopes_round_trip_byte_by_byte() -> None:
    data = encode_hello("n1", "village") + encode_envelope(APPEND) + encode_envelope(SNAPSHOT)
    decoder = FrameDecoder()
    frames: list[object] = []
    for byte in data:
        decoder.receive_data(bytes([byte]))
        while (frame := decoder.next_frame()) is not NEED_DATA:
            frames.append(frame)
    assert frames == [Hello("n1", "village"), Envelope("g1", APPEND), Envelope("g2", SNAPSHOT)]
    decoder.receive_data(b"")
    assert decoder.next_frame() is CLOSED
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_envelope(APPEND) * 3)
    assert [decoder.next_frame() for _ in range(4)] == [Envelope("g1", APPEND)] * 3 + [NEED_DATA]


def test_bad_version_is_refused_and_sticks() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytes([WIRE_VERSION + 1]) + encode_hello("n1", "c")[1:])
    with pytest.raises(BadVersionError):
        decoder.next_frame()
    with pytest.raises(BadVersionError):
        decoder.next_frame()


def test_oversize_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.receive_data(HEADER.pack(WIRE_VERSION, 101))
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()
    with pytest.raises(ValueError, match="max_frame_bytes"):
        encode_frame({"x": b"y" * 200}, max_frame_bytes=100)
    with pytest.raises(ValueError, match="at least 1"):
        FrameDecoder(max_frame_bytes=0)


def frame_of(payload: bytes) -> bytes:
    return HEADER.pack(WIRE_VERSION, len(payload)) + payload


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"hello": 5, "cluster": "c"}),
        msgpack.packb({"hello": "", "cluster": "c"}),
        msgpack.packb({"g": "g1"}),
        msgpack.packb({"g": "g1", "m": {"type": "Nope"}}),
        msgpack.packb({"g": "other", "m": raft.message_to_wire(APPEND)}),
        msgpack.packb({1: 2}),
        msgpack.packb({"a": 1}) + b"\x00",
    ],
)
def test_garbage_payloads_are_malformed(payload: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(frame_of(payload))
    with pytest.raises(MalformedFrameError):
        decoder.next_frame()


@pytest.mark.parametrize("cut", [2, HEADER.size + 3])
def test_end_of_input_inside_a_frame(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_hello("n1", "c")[:cut])
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(b"")
    decoder.receive_data(b"")  # repeated end of input is harmless
    with pytest.raises(TruncatedFrameError):
        decoder.next_frame()
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"more")


def test_a_frame_of_countless_tiny_items_is_refused() -> None:
    import msgpack

    from villaged.cluster.wire import MAX_ARRAY_LEN, MalformedFrameError, parse_payload

    payload = msgpack.packb({"g": "g1", "m": {"entries": [0] * (MAX_ARRAY_LEN + 1)}})
    with pytest.raises(MalformedFrameError):
        parse_payload(payload)
