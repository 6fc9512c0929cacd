"""Log records: the msgpack schema every durable change is written in.

A record is a msgpack map ``{"t": type, "v": schema version, "T": term, "i": index, "b": body}``.
``term`` and ``index`` make the same log usable as a Raft log later: a single node writes term 0.
The body is a msgpack map whose shape belongs to the record type (see the modules that write
each type); sealed bodies carry their ciphertext envelope, never plaintext secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from villaged.storage.errors import StorageError


class RecordDecodeError(StorageError):
    """Bytes that passed the frame CRC do not decode as a record."""


@dataclass(frozen=True, slots=True)
class Record:
    """One log entry. ``index`` is assigned by the log on append (0 before that)."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    term: int = 0
    index: int = 0


def encode_record(record: Record) -> bytes:
    obj = {"t": record.type, "v": record.version, "T": record.term, "i": record.index}
    obj["b"] = record.body
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def decode_record(payload: bytes) -> Record:
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
    return Record(
        type=rtype,
        body=body,
        version=_non_negative(obj, "v"),
        term=_non_negative(obj, "T"),
        index=_non_negative(obj, "i"),
    )


def _non_negative(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordDecodeError(f"record field {key!r} is not a non-negative integer")
    return value
