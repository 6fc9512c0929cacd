"""Log records: the msgpack schema every durable change is written in.

A record is a msgpack map, always with these six keys in this order::

    {"t": type, "v": schema version, "T": term, "i": index, "B": batch start, "b": body}

``term`` and ``index`` make the same log usable as a Raft log later: a single node writes term 0.
``batch start`` is the index of the first record of the group-commit batch the record was
written in (a record alone in its batch has ``B == i``). Recovery uses it to tell a torn final
batch, which it may cut, from damage followed by later batches, which were acknowledged after
the damaged one became durable (see :mod:`villaged.storage.log`). Every record carries it and
decoding requires it: no data directory in use predates it, and a record without it (from a
development build) passes its frame CRC but does not decode, which recovery reports as
corruption and never cuts.

The key order is fixed, so every encoded record starts with the same bytes,
:data:`RECORD_PREFIX` (a 6-entry fixmap, then the 1-character string ``"t"``). Recovery
searches for that prefix to find frames after a damaged one without trusting any frame
length on the way.

The body is a msgpack map whose shape belongs to the record type (see the modules that write
each type); sealed bodies carry their ciphertext envelope, never plaintext secrets. Every map
key in the body, at any depth, must be a ``str``: msgpack could write other keys, but the
decoder refuses them (``strict_map_key``), so :func:`encode_record` refuses them first and a
record that could not be read back is never written. For the same reason bodies may nest at
most :data:`MAX_BODY_DEPTH` levels. Tuples come back as lists and ``bytearray``/``memoryview``
as ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from villaged.storage.errors import StorageError

#: The first bytes of every encoded record: fixmap of 6 entries, fixstr "t".
RECORD_PREFIX: Final = b"\x86\xa1t"
#: How deep maps and lists may nest in a body (the body itself is depth 1). msgpack's own
#: limits are near 1024 and differ by one between packing and unpacking; this stays far below.
MAX_BODY_DEPTH: Final = 64


class RecordDecodeError(StorageError):
    """Bytes that passed the frame CRC do not decode as a record."""


class RecordEncodeError(StorageError, ValueError):
    """A record cannot be written because it could not be read back: nothing was written."""


@dataclass(frozen=True, slots=True)
class Record:
    """One log entry. ``index`` is assigned by the log on append (0 before that)."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    term: int = 0
    index: int = 0


def encode_record(record: Record, *, batch: int) -> bytes:
    """The record as msgpack, with ``batch`` (the first index of its batch) as its ``"B"``.

    Raises :class:`RecordEncodeError` for anything :func:`decode_record` would refuse.
    """
    if not isinstance(record.type, str) or not record.type:
        raise RecordEncodeError(f"record type {record.type!r} is not a non-empty string")
    if not isinstance(record.body, dict):
        raise RecordEncodeError(f"record body is a {type(record.body).__name__}, not a dict")
    for name, value in (
        ("version", record.version),
        ("term", record.term),
        ("index", record.index),
        ("batch", batch),
    ):
        if not _is_uint64(value):
            raise RecordEncodeError(f"record {name} {value!r} is not an integer in [0, 2**64)")
    if batch > record.index:
        raise RecordEncodeError(f"batch start {batch} is after the record's index {record.index}")
    problem = _body_problem(record.body, 1)
    if problem is not None:
        path, what = problem
        where = "".join(f"[{step!r}]" for step in path)
        raise RecordEncodeError(f"{record.type} record body{where} {what}")
    obj = {
        "t": record.type,
        "v": record.version,
        "T": record.term,
        "i": record.index,
        "B": batch,
        "b": record.body,
    }
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # Unsupported types, out-of-range integers, strings that are not valid Unicode.
        raise RecordEncodeError(f"{record.type} record body cannot be encoded: {exc}") from exc
    return packed


def decode_record(payload: bytes) -> Record:
    """The record in ``payload``; :class:`RecordDecodeError` if it is not one."""
    return decode_record_and_batch(payload)[0]


def decode_record_and_batch(payload: bytes) -> tuple[Record, int]:
    """The record in ``payload`` and the first index of the batch it was written in."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise RecordDecodeError(f"record does not decode as msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise RecordDecodeError("record is not a msgpack map")
    rtype, body = obj.get("t"), obj.get("b")
    if not isinstance(rtype, str) or not rtype:
        raise RecordDecodeError("record has no type tag")
    if not isinstance(body, dict):
        raise RecordDecodeError("record body is not a map")
    index = _non_negative(obj, "i")
    batch = _non_negative(obj, "B")
    if batch > index:
        raise RecordDecodeError(f"record {index} claims a batch starting after it, at {batch}")
    record = Record(
        type=rtype,
        body=body,
        version=_non_negative(obj, "v"),
        term=_non_negative(obj, "T"),
        index=index,
    )
    return record, batch


def _non_negative(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordDecodeError(f"record field {key!r} is not a non-negative integer")
    return value


def _is_uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


_CONTAINERS = (dict, list, tuple)


def _body_problem(value: Any, depth: int) -> tuple[list[Any], str] | None:
    """``(path, problem)`` for the first non-str map key or too deep nesting in ``value``.

    The path is built only on the way out of a failure, so the common case allocates nothing.
    """
    if depth > MAX_BODY_DEPTH:
        return [], f"nests maps and lists more than {MAX_BODY_DEPTH} deep"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return [], f"has the map key {key!r} ({type(key).__name__}), not a str"
            if isinstance(item, _CONTAINERS):
                found = _body_problem(item, depth + 1)
                if found is not None:
                    found[0].insert(0, key)
                    return found
    else:
        for position, item in enumerate(value):
            if isinstance(item, _CONTAINERS):
                found = _body_problem(item, depth + 1)
                if found is not None:
                    found[0].insert(0, position)
                    return found
    return None
