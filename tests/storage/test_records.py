"""The record schema: what encode_record writes, decode_record reads back, and the rule that
keeps the two in agreement (anything encoded decodes; anything that would not is refused
before it is written)."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from villaged.storage.errors import StorageError
from villaged.storage.records import (
    MAX_BODY_DEPTH,
    RECORD_PREFIX,
    Record,
    RecordDecodeError,
    RecordEncodeError,
    decode_record,
    decode_record_and_batch,
    encode_record,
)


def packed(**fields: Any) -> bytes:
    """A record map with every field valid, then ``fields`` overriding (None removes one)."""
    obj: dict[str, Any] = {"t": "test.entry", "v": 1, "T": 2, "i": 9, "B": 7, "b": {}}
    for key, value in fields.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    result: bytes = msgpack.packb(obj, use_bin_type=True)
    return result


def nested(depth: int) -> dict[str, Any]:
    """A body in which maps nest ``depth`` deep (the body itself is depth 1)."""
    body: dict[str, Any] = {}
    inner = body
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return body


# ------------------------------------------------------------------------ round trip


def test_round_trip_with_batch_start() -> None:
    body = {
        "s": "text ✓",
        "b": b"\x00\xff",
        "n": -(2**63),
        "u": 2**64 - 1,
        "f": 1.5,
        "none": None,
        "yes": True,
        "list": [1, "two", {"three": [3]}],
        "map": {"k": {"": b""}},
    }
    record = Record(type="test.entry", body=body, version=3, term=4, index=12)
    payload = encode_record(record, batch=10)
    assert decode_record_and_batch(payload) == (record, 10)
    assert decode_record(payload) == record


def test_tuples_and_byte_buffers_come_back_as_lists_and_bytes() -> None:
    record = Record(type="t", body={"t": (1, 2), "ba": bytearray(b"ab"), "mv": memoryview(b"c")})
    decoded = decode_record(encode_record(record, batch=0))
    assert decoded.body == {"t": [1, 2], "ba": b"ab", "mv": b"c"}


def test_key_order_is_fixed_and_every_record_starts_with_the_prefix() -> None:
    for rtype in ("t", "account.create", "x" * 300):
        payload = encode_record(Record(type=rtype, index=2**40, term=2**33), batch=2**40)
        assert payload.startswith(RECORD_PREFIX)
        assert list(msgpack.unpackb(payload)) == ["t", "v", "T", "i", "B", "b"]


def test_defaults_of_a_new_record() -> None:
    record = Record(type="t")
    assert (record.body, record.version, record.term, record.index) == ({}, 1, 0, 0)
    assert decode_record_and_batch(encode_record(record, batch=0)) == (record, 0)


def test_every_body_encode_accepts_decodes_to_the_same_thing() -> None:
    """Random nested bodies with every kind of key: either refused at encode, or read back
    exactly (tuples as lists)."""
    rng = random.Random(20261129)
    refused = accepted = 0

    def value(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 5 else 4)
        if kind == 0:
            return rng.randrange(-(2**63), 2**64)
        if kind == 1:
            return rng.choice(["", "a", "ключ", "\x00"])
        if kind == 2:
            return rng.randbytes(rng.randrange(4))
        if kind == 3:
            return rng.choice([None, True, 0.25])
        if kind in (4, 5):
            keys = [rng.choice(["k", "é", 1, b"k", -1, 2.5, None]) for _ in range(3)]
            return {key: value(depth + 1) for key in keys}
        items = [value(depth + 1) for _ in range(rng.randrange(3))]
        return items if kind == 6 else tuple(items)

    def as_decoded(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {key: as_decoded(item) for key, item in obj.items()}
        if isinstance(obj, list | tuple):
            return [as_decoded(item) for item in obj]
        return obj

    for _ in range(500):
        body = {"x": value(1)}
        try:
            payload = encode_record(Record(type="t", body=body), batch=0)
        except RecordEncodeError:
            refused += 1
            continue
        accepted += 1
        assert decode_record(payload).body == as_decoded(body)
    assert refused > 50
    assert accepted > 50


# ------------------------------------------------------------------------ the key rule


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({7: "x"}, "body has the map key 7 (int)"),
        ({"groups": {7: "friends"}}, "body['groups'] has the map key 7 (int)"),
        ({"l": [1, {"ok": [{b"k": 1}]}]}, "body['l'][1]['ok'][0] has the map key b'k' (bytes)"),
        ({"t": ({None: 1},)}, "body['t'][0] has the map key None (NoneType)"),
        ({"f": {1.5: 1}}, "body['f'] has the map key 1.5 (float)"),
    ],
)
def test_map_keys_must_be_str_at_any_depth(body: dict[Any, Any], where: str) -> None:
    with pytest.raises(RecordEncodeError) as info:
        encode_record(Record(type="test.entry", body=body), batch=0)
    assert str(info.value) == f"test.entry record {where}, not a str"


def test_str_subclass_keys_are_str() -> None:
    class Name(str):
        __slots__ = ()

    payload = encode_record(Record(type="t", body={Name("k"): 1}), batch=0)
    assert decode_record(payload).body == {"k": 1}


def test_nesting_is_bounded() -> None:
    assert decode_record(encode_record(Record("t", nested(MAX_BODY_DEPTH)), batch=0)).body == (
        nested(MAX_BODY_DEPTH)
    )
    with pytest.raises(RecordEncodeError, match=f"more than {MAX_BODY_DEPTH} deep"):
        encode_record(Record("t", nested(MAX_BODY_DEPTH + 1)), batch=0)
    # Far beyond what msgpack itself would pack or unpack: refused the same way.
    with pytest.raises(RecordEncodeError, match="deep"):
        encode_record(Record("t", nested(5000)), batch=0)
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(RecordEncodeError, match="deep"):
        encode_record(Record("t", loop), batch=0)


# ------------------------------------------------------------------------ other encode errors


@pytest.mark.parametrize(
    ("record", "batch", "message"),
    [
        (Record(type=""), 0, "record type '' is not a non-empty string"),
        (Record(type=7), 0, "record type 7"),  # type: ignore[arg-type]
        (Record(type="t", body=[1]), 0, "record body is a list, not a dict"),  # type: ignore[arg-type]
        (Record(type="t", version=-1), 0, "record version -1"),
        (Record(type="t", term=True), 0, "record term True"),
        (Record(type="t", index=2**64), 0, "record index 18446744073709551616"),
        (Record(type="t", index=3), -1, "record batch -1"),
        (Record(type="t", index=3), 4, "batch start 4 is after the record's index 3"),
        (Record(type="t", body={"s": {1}}), 0, "can not serialize 'set' object"),
        (Record(type="t", body={"n": 2**64}), 0, "Integer value out of range"),
        (Record(type="t", body={"n": -(2**63) - 1}), 0, "Integer value out of range"),
        (Record(type="t", body={"s": "\ud800"}), 0, "surrogates not allowed"),
    ],
)
def test_encode_refuses_what_could_not_be_read_back(
    record: Record, batch: int, message: str
) -> None:
    with pytest.raises(RecordEncodeError) as info:
        encode_record(record, batch=batch)
    assert message in str(info.value)
    # Callers may catch it as a storage error or as a bad value.
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------ decode errors


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "does not decode as msgpack"),  # incomplete input
        (packed()[:-1], "does not decode as msgpack"),
        (packed() + b"\x00", "does not decode as msgpack"),  # extra data
        (b"\xc1", "does not decode as msgpack"),  # a reserved byte
        (b"\x91" * 2000 + b"\x90", "does not decode as msgpack"),  # nested too deep
        (b"\xa2\xff\xfe", "does not decode as msgpack"),  # a str that is not UTF-8
        (packed(b={1: 2}), "does not decode as msgpack"),  # an int map key
        (msgpack.packb([1, 2]), "record is not a msgpack map"),
        (packed(t=None), "record has no type tag"),
        (packed(t=""), "record has no type tag"),
        (packed(t=b"bytes"), "record has no type tag"),
        (packed(b=None), "record body is not a map"),
        (packed(b=[1]), "record body is not a map"),
        (packed(i=None), "record field 'i' is not a non-negative integer"),
        (packed(i=-1), "record field 'i' is not a non-negative integer"),
        (packed(B=None), "record field 'B' is not a non-negative integer"),
        (packed(B="7"), "record field 'B' is not a non-negative integer"),
        (packed(v=True), "record field 'v' is not a non-negative integer"),
        (packed(T=1.0), "record field 'T' is not a non-negative integer"),
        (packed(B=10), "record 9 claims a batch starting after it, at 10"),
    ],
)
def test_decode_errors(payload: bytes, message: str) -> None:
    with pytest.raises(RecordDecodeError) as info:
        decode_record(payload)
    assert message in str(info.value)


def test_decode_accepts_the_reference_map() -> None:
    assert decode_record_and_batch(packed()) == (
        Record(type="test.entry", body={}, version=1, term=2, index=9),
        7,
    )
