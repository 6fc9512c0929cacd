"""The operator audit log: append-only records in an RFC 9162 Merkle tree, with signed checkpoints.

This module owns one audit directory (the node keeps it at ``<storage.dir>/audit/``)::

    audit.jsonl         the records, one per line                               0600
    checkpoints         signed checkpoints, one per line                        0644
    audit-signing.key   Ed25519 private key, PKCS#8 PEM, made on first open     0600
    audit-signing.pub   its public key (SubjectPublicKeyInfo PEM), for verifiers 0644

It is separate from the message log: its own file, its own tree, its own key.

Records
-------
A record is a JSON object with string and integer values. The caller gives the fields in
:data:`RECORD_FIELDS` — ``t`` (RFC 3339 UTC with milliseconds, ``2026-11-29T18:30:00.000Z``),
``kind`` (``login``, ``command``, ...), ``operator`` and ``result`` are required — and the log adds
two of its own: ``i``, the record's index (0, 1, 2, ...), and ``prev``, the hex root hash of the
tree of every record before it. Unknown fields are refused, each field's type and size are
checked, and a whole line is at most :data:`MAX_LINE_BYTES`. Content returned to an operator is
never recorded, only its SHA-256 (``data_sha256``).

A line is the record as canonical JSON: keys sorted, no spaces, UTF-8 (non-ASCII characters
unescaped), integers only, ending in ``\\n``. Reading a line back and encoding it again gives
the same bytes, which is how hand edits, duplicate keys and reformatting are caught.

The tree
--------
Leaf hash = SHA-256(0x00 || line without its newline); interior node = SHA-256(0x01 || left ||
right); the tree over n leaves splits at the largest power of two below n (RFC 9162 §2.1.1);
the empty tree's hash is SHA-256 of nothing. Inclusion and consistency proofs are generated and
verified as in RFC 9162 §2.1.3 and §2.1.4. An open log keeps only the frontier (the roots of the
perfect subtrees that make up the tree, at most one per bit of the size), so an append costs
O(log n) hashes; opening replays the file.

Checkpoints
-----------
A checkpoint is a signed statement of the tree at one size, a C2SP signed note with a
checkpoint body (the origin, the size, the base64 root hash, and one extension line with the
time it was signed)::

    villaged-audit/example.org
    42
    qE1fxEA8zX3TPlsSJ0KYR8x0yEiYt3rFTTq6Ff2V6Ps=
    time 2026-11-29T18:30:00.000Z

    — villaged-audit/example.org <base64 of key id (4 bytes) || Ed25519 signature (64 bytes)>

The signature covers the body (the lines before the blank line, each with its newline); the key
id is the first 4 bytes of SHA-256(key name || 0x0A || 0x01 || raw public key) and the key name
is the origin. ``checkpoints`` holds one checkpoint per line, each as a JSON string of the
note's text, so that a torn write is just an unfinished last line (as in the log) and
``villaged audit checkpoint`` prints the newest one verbatim for off-host retention.

Durability
----------
``append`` writes the line with ``pwrite`` and returns only after ``fdatasync``: a record is
durable before the caller acts on it (sends data, opens a grant). If the write or the sync
fails, the partial line is cut off (ftruncate + fsync) and :class:`AuditWriteError` is raised;
if even the cut fails, the log refuses every later append until it is reopened. Either way the
caller refuses the command: access fails closed. A record may therefore exist for a command
whose answer was never sent (a crash after the sync); never the reverse.

Opening replays the file. A crash mid-append can only leave the last line unfinished: bytes
after the last newline (at most one line's worth), or a last line containing NUL bytes (a file
system that extended the file before writing its pages; canonical JSON never contains NUL).
That line was never acknowledged and is cut off, with an ``audit.tail_truncated`` log event.
Anything else wrong — before the end, or a whole last line that does not check — is damage: the
log refuses to open and names the line. One process writes the log at a time (``flock`` on
``audit.jsonl``); checkpoint writers also lock ``checkpoints`` while they write, so that
``villaged audit checkpoint`` can sign one beside a running node.

Threat model
------------
``verify_log`` detects changes to the log made by someone who does not hold the signing key:

* Record numbers (``i``) and tree heads (``prev``) name the line where a naive edit, deletion
  or reordering shows.
* They are not secret, so a careful editor recomputes them. What such an editor cannot redo is
  a signed checkpoint: every stored checkpoint must match the tree of the log's first ``size``
  records, so any change to records a checkpoint covers — modified, deleted, reordered,
  truncated — is detected, and the message brackets the damage between the checkpoints that
  still match and the first one that does not. Records after the newest checkpoint are
  covered only by the chain until the next checkpoint (after every grant and on a timer).
* Deleting ``checkpoints`` as well leaves the chain alone to check. That is why checkpoints are
  exported off the host: a *retained* checkpoint (``--checkpoint FILE``) must be consistent
  with the current log (a consistency proof), so truncation and rewriting are detected however
  thorough they were.
* Whoever holds ``audit-signing.key`` (root on the host, the daemon's user) can rewrite
  everything and sign new checkpoints. Only checkpoints retained elsewhere, verified with a
  public key kept elsewhere (``--public-key FILE``), detect that.

Everything here is synchronous and does blocking file I/O; the node calls it through
``trio.to_thread.run_sync``, and :class:`AuditLog` takes a lock so that worker threads may call
it concurrently. No record content, key material or justification text ever appears in a log
line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import unicodedata
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from villaged.ops.tlsfiles import write_file_atomic, write_private_file
from villaged.storage.errors import StorageError
from villaged.xmpp.jid import JID, JIDError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "EMPTY_ROOT",
    "MAX_LINE_BYTES",
    "RECORDS_ABOUT_LIMIT",
    "RECORD_FIELDS",
    "REQUIRED_FIELDS",
    "RESULTS",
    "AuditCorruptError",
    "AuditError",
    "AuditInUseError",
    "AuditLog",
    "AuditRecordError",
    "AuditVerifyError",
    "AuditWriteError",
    "Checkpoint",
    "MerkleFrontier",
    "VerifyReport",
    "consistency_proof",
    "export_lines",
    "format_time",
    "inclusion_proof",
    "latest_checkpoint",
    "leaf_hash",
    "load_public_key",
    "node_hash",
    "origin_for",
    "parse_since",
    "read_checkpoint_file",
    "tree_hash",
    "validate_record",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
]

logger = logging.getLogger("villaged.admin.audit")

LOG_NAME: Final = "audit.jsonl"
CHECKPOINTS_NAME: Final = "checkpoints"
SIGNING_KEY_NAME: Final = "audit-signing.key"
PUBLIC_KEY_NAME: Final = "audit-signing.pub"

#: The longest line (one record, without its newline) the log writes or reads.
MAX_LINE_BYTES: Final = 16 * 1024
#: The longest signed checkpoint note; a checkpoints line holds one, JSON-escaped.
MAX_CHECKPOINT_BYTES: Final = 2048
_MAX_CHECKPOINT_LINE: Final = 4 * MAX_CHECKPOINT_BYTES
#: Key files and public keys are a few hundred bytes; anything near this is not one.
_MAX_KEY_FILE_BYTES: Final = 64 * 1024
#: ``records_about`` returns at most this many records (the newest).
RECORDS_ABOUT_LIMIT: Final = 10_000
#: Files are read in pieces of this size, so memory stays bounded whatever their length.
_READ_CHUNK: Final = 1 << 20
#: How long a checkpoint writer waits for another one to finish: attempts x pause.
_LOCK_ATTEMPTS: Final = 100
_LOCK_PAUSE_S: Final = 0.02

HASH_BYTES: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
#: A proof never has more elements than a tree has levels (sizes fit in 64 bits).
_MAX_PROOF_LENGTH: Final = 64
#: Signed-note signature lines start with an em dash and a space; 0x01 is the Ed25519 type.
_SIGNATURE_PREFIX: Final = "\u2014 "
_ED25519_TYPE: Final = b"\x01"
_KEY_ID_BYTES: Final = 4
_SIGNATURE_BYTES: Final = 64
_GROUP_OTHER_BITS: Final = 0o077


# --------------------------------------------------------------------------- errors


class AuditError(StorageError):
    """Base class: the audit log or its directory cannot be used as asked."""


class AuditRecordError(AuditError, ValueError):
    """A record was refused before anything was written (a field is missing, unknown, of the
    wrong type or too long). The caller must refuse the command, as for a write error."""


class AuditWriteError(AuditError):
    """A record or checkpoint could not be made durable; the caller refuses the command."""


class AuditCorruptError(AuditError):
    """The stored log is damaged at a place that must be intact (not a torn final line)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}: line {line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class AuditInUseError(AuditError):
    """Another process (the running node) has the log open for writing."""


class AuditVerifyError(AuditError):
    """``verify_log`` found the log, its checkpoints or a retained checkpoint not to match; the
    message says where and what."""


class _CheckError(Exception):
    """An internal check failed; callers turn ``reason`` into a located public error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- the Merkle tree


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || entry)."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two smaller than ``size`` (which is at least 2)."""
    return 1 << ((size - 1).bit_length() - 1)


class MerkleFrontier:
    """The right edge of a Merkle tree: enough to append leaves and compute the root.

    ``_hashes`` holds the roots of the perfect subtrees the tree decomposes into, largest
    first, one for each set bit of the size (a tree of 13 leaves: subtrees of 8, 4 and 1).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._hashes: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def push(self, leaf: bytes) -> None:
        """Append a leaf *hash*; merges equal-sized subtrees (at most one per bit of size)."""
        merged = leaf
        carry = self._size
        while carry & 1:
            merged = node_hash(self._hashes.pop(), merged)
            carry >>= 1
        self._hashes.append(merged)
        self._size += 1

    def root(self) -> bytes:
        """The tree hash: the subtrees folded right to left, as RFC 9162's split makes them."""
        if not self._hashes:
            return EMPTY_ROOT
        root = self._hashes[-1]
        for subtree in reversed(self._hashes[:-1]):
            root = node_hash(subtree, root)
        return root


def tree_hash(leaves: Sequence[bytes], start: int = 0, end: int | None = None) -> bytes:
    """RFC 9162 MTH of the leaf hashes ``leaves[start:end]``."""
    stop = len(leaves) if end is None else end
    frontier = MerkleFrontier()
    for position in range(start, stop):
        frontier.push(leaves[position])
    return frontier.root()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, D[n]) over the leaf hashes ``leaves``: the sibling
    subtree hashes from the leaf up to the root."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    path: list[bytes] = []
    low, high = 0, len(leaves)
    while high - low > 1:  # halves (at least) each time: at most 64 rounds
        k = _split(high - low)
        if index - low < k:
            path.append(tree_hash(leaves, low + k, high))
            high = low + k
        else:
            path.append(tree_hash(leaves, low, low + k))
            low += k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(old_size, D[n]) over the leaf hashes ``leaves`` (n is their
    number): what proves the tree of the first ``old_size`` leaves is a prefix of this one.
    Empty when ``old_size`` is 0 or n (nothing to prove)."""
    size = len(leaves)
    if not 0 <= old_size <= size:
        raise ValueError(f"a tree of {old_size} leaves is not a prefix of one of {size}")
    if old_size in (0, size):
        return []
    proof: list[bytes] = []
    remaining = old_size
    low, high = 0, size
    whole = True  # SUBPROOF's b: the old tree is a whole subtree on the path so far
    while True:  # the range halves (at least) each round: at most 64 rounds
        span = high - low
        if remaining == span:
            if not whole:
                proof.append(tree_hash(leaves, low, high))
            break
        k = _split(span)
        if remaining <= k:
            proof.append(tree_hash(leaves, low + k, high))
            high = low + k
        else:
            proof.append(tree_hash(leaves, low, low + k))
            low += k
            remaining -= k
            whole = False
    proof.reverse()
    return proof


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` in the tree of
    ``size`` leaves whose hash is ``root``?"""
    if not 0 <= index < size or not _proof_shape_ok(proof):
        return False
    fn, sn = index, size - 1
    result = leaf
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:  # fn loses a bit each round
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and result == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the tree (``old_size``, ``old_root``) is a prefix
    of (``new_size``, ``new_root``)? Equal sizes need equal roots and an empty proof; the empty
    tree is a prefix of every tree."""
    if not 0 <= old_size <= new_size or not _proof_shape_ok(proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:  # fn loses a bit each round
        fn >>= 1
        sn >>= 1
    first_root = second_root = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first_root = node_hash(sibling, first_root)
            second_root = node_hash(sibling, second_root)
            while not fn & 1 and fn != 0:  # fn loses a bit each round
                fn >>= 1
                sn >>= 1
        else:
            second_root = node_hash(second_root, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and first_root == old_root and second_root == new_root


def _proof_shape_ok(proof: Sequence[bytes]) -> bool:
    return len(proof) <= _MAX_PROOF_LENGTH and all(len(h) == HASH_BYTES for h in proof)


# --------------------------------------------------------------------------- records

_Check = Callable[[object], "str | None"]

_TIME_FORM = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_TIME_PARSE = "%Y-%m-%dT%H:%M:%S.%fZ"
_WORD_FORM = re.compile(r"[a-z][a-z0-9_.-]*")
_SHA256_HEX_FORM = re.compile(r"[0-9a-f]{64}")
# Characters that reorder how text is shown: a record read on a terminal must say what it holds.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_MAX_JID_CHARS = 3071  # RFC 7622: three parts of at most 1023 octets, plus '@' and '/'

#: What a command came to. ``pending``: accepted, waiting for a second operator's approval.
RESULTS: Final = frozenset({"ok", "refused", "pending", "error"})


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(max_chars: int, *, min_chars: int = 0, multiline: bool = False) -> _Check:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, not {_type_name(value)}"
        if not min_chars <= len(value) <= max_chars:
            return f"must be {min_chars} to {max_chars} characters long, not {len(value)}"
        for char in value:  # at most max_chars
            if multiline and char in "\n\t":
                continue
            if unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS:
                return f"must not contain the character U+{ord(char):04X}"
        return None

    return check


def _word(max_chars: int) -> _Check:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, not {_type_name(value)}"
        if len(value) > max_chars or not _WORD_FORM.fullmatch(value):
            return f"must be 1 to {max_chars} of a-z, 0-9, '_', '.', '-', starting with a letter"
        return None

    return check


def _integer(low: int, high: int) -> _Check:
    def check(value: object) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, not {_type_name(value)}"
        if not low <= value <= high:
            return f"must be from {low} to {high}"
        return None

    return check


def _choice(values: frozenset[str]) -> _Check:
    def check(value: object) -> str | None:
        if value not in values:
            return f"must be one of {', '.join(sorted(values))}"
        return None

    return check


def _check_time(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {_type_name(value)}"
    if _TIME_FORM.fullmatch(value) is None:
        return "must be an RFC 3339 UTC time with milliseconds, like 2026-11-29T18:30:00.000Z"
    try:
        datetime.strptime(value, _TIME_PARSE)
    except ValueError:
        return "is not a real date and time"
    return None


def _check_sha256_hex(value: object) -> str | None:
    if not isinstance(value, str) or _SHA256_HEX_FORM.fullmatch(value) is None:
        return "must be a SHA-256 digest as 64 lowercase hex digits"
    return None


def _check_jid(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {_type_name(value)}"
    if not 0 < len(value) <= _MAX_JID_CHARS:
        return f"must be 1 to {_MAX_JID_CHARS} characters long, not {len(value)}"
    try:
        canonical = str(JID.parse(value))
    except JIDError as exc:
        return f"is not a JID ({exc})"
    if canonical != value:
        return "must be a JID in canonical form (as the server prints it)"
    return None


#: Every field a record may have and its check. Required fields are :data:`REQUIRED_FIELDS`.
RECORD_FIELDS: Final[Mapping[str, _Check]] = {
    "t": _check_time,  # when it happened
    "kind": _word(32),  # login, command, ...
    "operator": _text(64),  # the enrolled operator; "" for an unknown uid
    "result": _choice(RESULTS),
    "uid": _integer(0, 2**32 - 1),  # the peer's uid and pid (SO_PEERCRED)
    "pid": _integer(0, 2**32 - 1),
    "command": _text(64),  # e.g. grant.request, inspect.messages
    "scope": _check_jid,  # whose data the command touches
    "reason": _text(64),  # reason code of a grant
    "justification": _text(2000, multiline=True),
    "ticket": _text(200),
    "grant": _text(64),  # grant id
    "approver": _text(64),  # the second operator (two-person rule)
    "expires": _check_time,  # when a grant ends
    "data_sha256": _check_sha256_hex,  # what was returned, hashed; never the data
    "node": _text(64),  # which cluster node handled it
    "error": _text(1000, multiline=True),  # why it was refused or failed
}
REQUIRED_FIELDS: Final = ("t", "kind", "operator", "result")
#: Fields the log adds itself: the record's index and the tree hash before it.
_LOG_FIELDS: Final = ("i", "prev")


def _record_problem(record: Mapping[str, Any]) -> str | None:
    """What is wrong with the caller's fields of ``record``, or None. Never quotes values."""
    for name in record:
        if name in _LOG_FIELDS:
            continue
        if not isinstance(name, str) or name not in RECORD_FIELDS:
            shown = repr(name)[:40] if isinstance(name, str) else _type_name(name)
            return f"unknown field {shown}"
    for name in REQUIRED_FIELDS:
        if name not in record:
            return f"missing field {name!r}"
    for name, value in record.items():
        check = RECORD_FIELDS.get(name)
        if check is not None and (problem := check(value)) is not None:
            return f"field {name!r} {problem}"
    return None


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A checked copy of a caller's record; :class:`AuditRecordError` says what is wrong."""
    if not isinstance(record, Mapping):
        raise AuditRecordError(f"an audit record must be a mapping, not {_type_name(record)}")
    for name in _LOG_FIELDS:
        if name in record:
            raise AuditRecordError(f"audit record refused: field {name!r} is set by the log")
    problem = _record_problem(record)
    if problem is not None:
        raise AuditRecordError(f"audit record refused: {problem}")
    return dict(record)


def _encode_line(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8. UnicodeEncodeError for lone surrogates."""
    text = json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def format_time(moment: datetime) -> str:
    """``moment`` as a record time: RFC 3339, UTC, milliseconds, ``Z``."""
    if moment.utcoffset() is None:
        raise ValueError("expected a timezone-aware datetime")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _parse_record_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_PARSE).replace(tzinfo=UTC)


def parse_since(text: str) -> datetime:
    """A ``--since`` argument: an ISO 8601 / RFC 3339 date or time; without an offset, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not a time: use RFC 3339, like 2026-11-29T18:30:00Z or 2026-11-29"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment


def _check_line(line: bytes, index: int, prev_root: bytes) -> dict[str, Any]:
    """The record a stored line holds, if it is record ``index`` written after a tree whose
    hash is ``prev_root``; :class:`_CheckError` otherwise."""
    if not line:
        raise _CheckError("an empty line where a record was expected")
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _CheckError("not UTF-8") from None
    except (ValueError, RecursionError):
        raise _CheckError("not a JSON object (the line is not JSON)") from None
    if not isinstance(value, dict):
        raise _CheckError("not a JSON object")
    number = value.get("i")
    if not isinstance(number, int) or isinstance(number, bool):
        raise _CheckError(f"no record number ('i') where record {index} was expected")
    if number != index:
        raise _CheckError(
            f"holds record {number} where record {index} was expected:"
            " a record was removed or inserted, or the records were reordered"
        )
    if value.get("prev") != prev_root.hex():
        if index == 0:
            raise _CheckError("record 0 does not start from the empty tree ('prev')")
        raise _CheckError(
            f"the records before record {index} no longer hash to the tree head it was written"
            f" after ('prev'): record {index - 1} (line {index}) was changed, or the log was"
            " rewritten up to it"
        )
    problem = _record_problem(value)
    if problem is not None:
        raise _CheckError(f"record {index}: {problem}")
    try:
        canonical = _encode_line(value)
    except UnicodeEncodeError:  # pragma: no cover - surrogates fail the field checks first
        raise _CheckError(f"record {index} holds text that is not valid Unicode") from None
    if canonical != line:
        raise _CheckError(
            f"record {index} is not in canonical form (sorted keys, no spaces, UTF-8)"
        )
    return value


# --------------------------------------------------------------------------- checkpoints

_ORIGIN_FORBIDDEN = frozenset("+")
_SIZE_FORM = re.compile(r"0|[1-9][0-9]{0,18}")


def origin_for(domain: str) -> str:
    """The audit log origin of a node serving ``domain``."""
    return f"villaged-audit/{domain}"


def _origin_problem(origin: str) -> str | None:
    if not 0 < len(origin) <= 255:
        return "must be 1 to 255 characters long"
    for char in origin:  # at most 255
        if char in _ORIGIN_FORBIDDEN or char.isspace() or unicodedata.category(char)[0] in "CZ":
            return "must not contain spaces, '+' or control characters"
    return None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the log ``origin`` had ``size`` records with tree hash
    ``root_hash`` at ``time`` (RFC 3339). ``text`` is the whole signed note."""

    origin: str
    size: int
    root_hash: bytes
    time: str
    text: str


def _key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ED25519_TYPE + raw).digest()[
        :_KEY_ID_BYTES
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sign_checkpoint(
    key: Ed25519PrivateKey, origin: str, size: int, root: bytes, moment: str
) -> str:
    body = f"{origin}\n{size}\n{_b64(root)}\ntime {moment}\n"
    signature = key.sign(body.encode("utf-8"))
    blob = _key_id(origin, key.public_key()) + signature
    return f"{body}\n{_SIGNATURE_PREFIX}{origin} {_b64(blob)}\n"


def _decode_b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _parse_checkpoint(text: str) -> tuple[Checkpoint, str, list[tuple[str, bytes]]]:
    """The checkpoint, its signed body and its signatures ``(key name, key id || signature)``;
    :class:`_CheckError` for anything malformed. Checks no signature."""
    if len(text) > MAX_CHECKPOINT_BYTES:
        raise _CheckError(f"longer than {MAX_CHECKPOINT_BYTES} characters: not a checkpoint")
    for char in text:  # at most MAX_CHECKPOINT_BYTES
        if char != "\n" and unicodedata.category(char) in ("Cc", "Cs"):
            raise _CheckError(f"contains the control character U+{ord(char):04X}")
    body, blank, signatures = text.partition("\n\n")
    if not blank:
        raise _CheckError("no blank line between the checkpoint and its signatures")
    body += "\n"
    if not signatures.endswith("\n"):
        raise _CheckError("the signature lines do not end with a newline")
    found: list[tuple[str, bytes]] = []
    for line in signatures[:-1].split("\n"):  # bounded by the text's length
        parts = line.removeprefix(_SIGNATURE_PREFIX).split(" ")
        if not line.startswith(_SIGNATURE_PREFIX) or len(parts) != 2 or not parts[0]:
            raise _CheckError("a signature line is not '— <key name> <base64 signature>'")
        blob = _decode_b64(parts[1])
        if blob is None or len(blob) <= _KEY_ID_BYTES:
            raise _CheckError(
                f"the signature by {parts[0]!r} is not base64 of a key id and signature"
            )
        found.append((parts[0], blob))
    lines = body[:-1].split("\n")
    if len(lines) != 4:
        raise _CheckError(
            f"the checkpoint has {len(lines)} lines; expected 4 (origin, tree size, root hash,"
            " time)"
        )
    origin, size_text, root_text, time_line = lines
    problem = _origin_problem(origin)
    if problem is not None:
        raise _CheckError(f"the origin line {problem}")
    if _SIZE_FORM.fullmatch(size_text) is None:
        raise _CheckError("the tree size line is not a decimal number")
    root = _decode_b64(root_text)
    if root is None or len(root) != HASH_BYTES:
        raise _CheckError("the root hash line is not base64 of 32 bytes")
    moment = time_line.removeprefix("time ")
    if moment == time_line or _check_time(moment) is not None:
        raise _CheckError("the fourth line is not 'time <RFC 3339 UTC time with milliseconds>'")
    return Checkpoint(origin, int(size_text), root, moment, text), body, found


def verify_checkpoint(text: str, public_key: Ed25519PublicKey) -> Checkpoint:
    """The checkpoint ``text`` states, if ``public_key`` signed it under the origin's name;
    :class:`AuditVerifyError` otherwise (malformed, altered, or signed by another key)."""
    try:
        return _verify_checkpoint(text, public_key)
    except _CheckError as exc:
        raise AuditVerifyError(exc.reason) from None


def _verify_checkpoint(text: str, public_key: Ed25519PublicKey) -> Checkpoint:
    checkpoint, body, signatures = _parse_checkpoint(text)
    wanted = _key_id(checkpoint.origin, public_key)
    for name, blob in signatures:
        if name != checkpoint.origin or blob[:_KEY_ID_BYTES] != wanted:
            continue
        if len(blob) != _KEY_ID_BYTES + _SIGNATURE_BYTES:
            raise _CheckError("the signature by the audit signing key is not 64 bytes")
        try:
            public_key.verify(blob[_KEY_ID_BYTES:], body.encode("utf-8"))
        except InvalidSignature:
            raise _CheckError(
                "the signature does not verify: the checkpoint was altered after it was"
                " signed, or forged"
            ) from None
        return checkpoint
    signers = ", ".join(
        f"{name} (key id {blob[:_KEY_ID_BYTES].hex()})" for name, blob in signatures
    )
    raise _CheckError(
        f"not signed by the audit signing key {checkpoint.origin} (key id {wanted.hex()});"
        f" signed by {signers or 'nobody'}"
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; :class:`AuditVerifyError` naming ``path``."""
    try:
        raw = _read_bounded(path, _MAX_KEY_FILE_BYTES)
    except OSError as exc:
        raise AuditVerifyError(
            f"cannot read the public key {path}: {exc.strerror or exc}"
        ) from None
    if raw is None:
        raise AuditVerifyError(f"{path} is larger than {_MAX_KEY_FILE_BYTES} bytes: not a key")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError):
        raise AuditVerifyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditVerifyError(f"{path} is not an Ed25519 public key")
    return key


def read_checkpoint_file(path: Path) -> str:
    """A retained checkpoint's text from ``path`` (as ``villaged audit checkpoint`` printed it)."""
    try:
        raw = _read_bounded(path, MAX_CHECKPOINT_BYTES * 4)
    except OSError as exc:
        raise AuditVerifyError(
            f"cannot read the checkpoint {path}: {exc.strerror or exc}"
        ) from None
    if raw is None:
        raise AuditVerifyError(f"{path} is too large to be a checkpoint")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditVerifyError(f"{path} is not UTF-8 text: not a checkpoint") from None


# --------------------------------------------------------------------------- file helpers


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path``, or None if it holds more than ``limit``."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    return None if len(data) > limit else data


def _complete_lines(fd: int, start: int, end: int, max_line: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for each newline-terminated line in ``[start, end)`` of ``fd``, the
    newline removed. Stops before a line longer than ``max_line``, so the caller sees it (and
    everything after it) as unread bytes."""
    pending = b""
    pending_offset = start
    position = start
    while position < end:  # position grows by a chunk each round
        chunk = os.pread(fd, min(_READ_CHUNK, end - position), position)
        if not chunk:
            return  # the file is shorter than it was: the caller sees the rest as unread
        position += len(chunk)
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if len(line) > max_line:
                return
            yield pending_offset, line
            pending_offset += len(line) + 1
        if len(pending) > max_line:
            return


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    written = 0
    while written < len(data):  # each round writes at least one byte or raises
        count = os.pwrite(fd, view[written:], offset + written)
        if count <= 0:
            raise OSError(errno.EIO, "the write made no progress")
        written += count


def _lock_exclusive_bounded(fd: int, path: Path) -> None:
    """flock ``fd`` exclusively, waiting a bounded time for another writer to finish."""
    for _ in range(_LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(_LOCK_PAUSE_S)
        else:
            return
    raise AuditWriteError(
        f"{path} stayed locked by another process for {_LOCK_ATTEMPTS * _LOCK_PAUSE_S:.0f} s"
    )


# --------------------------------------------------------------------------- replaying a log


class _Replay:
    """Checks a log's lines in order and folds them into the tree.

    ``tail_offset``/``tail_bytes`` describe what follows the last good line once the lines have
    been read: nothing, an unfinished line, or a last line with NUL bytes (both torn writes).
    """

    __slots__ = (
        "_wanted",
        "frontier",
        "leaves",
        "offsets",
        "root",
        "roots_at",
        "tail_bytes",
        "tail_offset",
        "tail_reason",
    )

    def __init__(
        self,
        *,
        leaves: list[bytes] | None = None,
        offsets: array[int] | None = None,
        roots_at: frozenset[int] = frozenset(),
    ) -> None:
        self.frontier = MerkleFrontier()
        self.root = EMPTY_ROOT
        self.leaves = leaves
        self.offsets = offsets
        self._wanted = roots_at
        self.roots_at: dict[int, bytes] = {0: EMPTY_ROOT} if 0 in roots_at else {}
        self.tail_offset = 0
        self.tail_bytes = 0
        self.tail_reason = ""

    @property
    def size(self) -> int:
        return self.frontier.size

    def lines(self, fd: int, path: Path, end: int) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Each good line of ``fd`` up to ``end`` and its record. Raises
        :class:`AuditCorruptError` for damage that is not a torn final line."""
        valid_end = 0
        line_number = 0
        for offset, line in _complete_lines(fd, 0, end, MAX_LINE_BYTES):
            line_number += 1
            try:
                record = _check_line(line, self.size, self.root)
            except _CheckError as exc:
                if offset + len(line) + 1 == end and b"\x00" in line:
                    self._torn(offset, end, f"a last line with zero bytes ({exc.reason})")
                    return
                raise AuditCorruptError(path, line_number, exc.reason) from None
            self._add(offset, line)
            valid_end = offset + len(line) + 1
            yield line, record
        if end - valid_end > MAX_LINE_BYTES:
            raise AuditCorruptError(
                path,
                line_number + 1,
                f"no line end within {MAX_LINE_BYTES} bytes: a line longer than any record",
            )
        if end > valid_end:
            self._torn(valid_end, end, "an unfinished last line")

    def _add(self, offset: int, line: bytes) -> None:
        leaf = leaf_hash(line)
        self.frontier.push(leaf)
        self.root = self.frontier.root()
        if self.leaves is not None:
            self.leaves.append(leaf)
        if self.offsets is not None:
            self.offsets.append(offset)
        if self.size in self._wanted:
            self.roots_at[self.size] = self.root

    def _torn(self, offset: int, end: int, reason: str) -> None:
        self.tail_offset = offset
        self.tail_bytes = end - offset
        self.tail_reason = reason


def _replay_all(replay: _Replay, fd: int, path: Path, end: int) -> None:
    for _ in replay.lines(fd, path, end):
        pass


def _open_for_reading(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------- the signing key


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in ``path``, refusing a file others may read. FileNotFoundError passes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)  # on the open descriptor: the file cannot change in between
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"the audit signing key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & _GROUP_OTHER_BITS:
            raise AuditError(
                f"the audit signing key {path} has mode {mode:04o}; it must be 0600"
                f" (chmod 600 {path})"
            )
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise AuditError(f"the audit signing key {path} is too large to be a key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise AuditError(f"the audit signing key {path} is not an unencrypted PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"the audit signing key {path} is not an Ed25519 key")
    return key


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_or_create_signing_key(directory: Path) -> Ed25519PrivateKey:
    key_path = directory / SIGNING_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    try:
        key = _read_private_key(key_path)
    except FileNotFoundError:
        checkpoints = directory / CHECKPOINTS_NAME
        if public_path.exists() or (checkpoints.exists() and checkpoints.stat().st_size > 0):
            raise AuditError(
                f"the audit signing key {key_path} is missing, but checkpoints signed by it"
                " exist; restore it from a backup (a new key would leave them unverifiable)"
            ) from None
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_private_file(key_path, pem)
        except OSError as exc:
            raise AuditWriteError(
                f"cannot write the audit signing key {key_path}: {exc.strerror or exc}"
            ) from None
        logger.info(
            "created the audit signing key %s",
            key_path,
            extra={"event": "audit.signing_key_created", "path": str(key_path)},
        )
    except OSError as exc:
        raise AuditError(
            f"cannot read the audit signing key {key_path}: {exc.strerror or exc}"
        ) from None
    public_pem = _public_pem(key)
    try:
        existing = _read_bounded(public_path, _MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        existing = None
        try:
            write_file_atomic(public_path, public_pem, 0o644)
        except OSError as exc:
            raise AuditWriteError(
                f"cannot write the audit public key {public_path}: {exc.strerror or exc}"
            ) from None
    except OSError as exc:
        raise AuditError(f"cannot read {public_path}: {exc.strerror or exc}") from None
    else:
        if existing != public_pem:
            raise AuditError(
                f"{public_path} does not match the audit signing key {key_path}: one of them"
                " was replaced"
            )
    return key


# --------------------------------------------------------------------------- checkpoints file


class _CheckpointsFile:
    """``checkpoints`` opened for appending, exclusively locked, its torn tail (if any) cut."""

    __slots__ = ("_created", "fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                self._created = True
            except FileExistsError:
                self.fd = os.open(path, flags)
                self._created = False
        except OSError as exc:
            raise AuditWriteError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            if self._created:
                os.fchmod(self.fd, 0o644)
                _fsync_directory(path.parent)
            _lock_exclusive_bounded(self.fd, path)
            self._cut_torn_tail()
        except OSError as exc:
            os.close(self.fd)
            raise AuditWriteError(f"cannot prepare {path}: {exc.strerror or exc}") from None
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> _CheckpointsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)  # releases the lock

    def last(self) -> str | None:
        """The newest stored checkpoint's text, or None."""
        last_line: bytes | None = None
        end = os.fstat(self.fd).st_size
        for _, line in _complete_lines(self.fd, 0, end, _MAX_CHECKPOINT_LINE):
            last_line = line
        return None if last_line is None else _checkpoint_from_line(last_line)

    def append(self, text: str) -> None:
        data = (json.dumps(text, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            _write_all_appending(self.fd, data)
            os.fdatasync(self.fd)
        except OSError as exc:
            # A partial line left here is cut by the next writer (_cut_torn_tail).
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise AuditWriteError(
                f"cannot write a checkpoint to {self.path}: {exc.strerror or exc}"
            ) from None

    def _cut_torn_tail(self) -> None:
        size = os.fstat(self.fd).st_size
        if size == 0 or os.pread(self.fd, 1, size - 1) == b"\n":
            return
        window = min(size, _MAX_CHECKPOINT_LINE + 1)
        tail = os.pread(self.fd, window, size - window)
        newline = tail.rfind(b"\n")
        if newline < 0 and window < size:
            raise AuditWriteError(
                f"{self.path} ends in {window} or more bytes without a line end: it is"
                " damaged (villaged audit verify says where)"
            )
        keep = size - window + newline + 1
        os.ftruncate(self.fd, keep)
        os.fsync(self.fd)
        logger.warning(
            "audit checkpoints %s: cut an unfinished last line of %d bytes",
            self.path,
            size - keep,
            extra={
                "event": "audit.checkpoint_tail_truncated",
                "path": str(self.path),
                "bytes": size - keep,
            },
        )


def _write_all_appending(fd: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    while written < len(data):  # each round writes at least one byte or raises
        count = os.write(fd, view[written:])
        if count <= 0:
            raise OSError(errno.EIO, "the write made no progress")
        written += count


def _checkpoint_from_line(line: bytes) -> str:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _CheckError("not a JSON string") from None
    if not isinstance(value, str):
        raise _CheckError("not a JSON string")
    return value


# --------------------------------------------------------------------------- the log


class AuditLog:
    """One audit directory, open for appending. Build it with :meth:`open`.

    Thread-safe: ``append``, ``checkpoint`` and ``close`` take an internal lock, so worker
    threads may call them concurrently; records are numbered in the order appends take it.
    """

    __slots__ = (
        "_closed",
        "_directory",
        "_end",
        "_failed",
        "_fd",
        "_frontier",
        "_key",
        "_lock",
        "_offsets",
        "_origin",
        "_path",
        "_root",
    )

    def __init__(
        self,
        *,
        directory: Path,
        origin: str,
        fd: int,
        key: Ed25519PrivateKey,
        frontier: MerkleFrontier,
        offsets: array[int],
        end: int,
    ) -> None:
        # Internal: callers use ``open``.
        self._directory = directory
        self._origin = origin
        self._path = directory / LOG_NAME
        self._fd = fd
        self._key = key
        self._frontier = frontier
        self._root = frontier.root()
        self._offsets = offsets
        self._end = end
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._closed = False

    @classmethod
    def open(cls, directory: Path, origin: str) -> AuditLog:
        """Open (or create) the audit log in ``directory`` for the log ``origin`` (e.g.
        ``villaged-audit/example.org``).

        Creates the directory (0700; its parent must exist), the signing key and the log file
        on first use; replays the log, cutting a torn final line. Raises
        :class:`AuditInUseError` if another process has it open,
        :class:`AuditCorruptError` for damage, :class:`AuditWriteError` if it cannot create
        what it needs, :class:`AuditError` for anything else wrong.
        """
        problem = _origin_problem(origin)
        if problem is not None:
            raise AuditError(f"audit log origin {origin!r} {problem}")
        _ensure_directory(directory)
        path = directory / LOG_NAME
        fd = _open_log_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditInUseError(
                    f"the audit log {path} is open in another process (a running villaged)"
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AuditError(f"{path} is not a regular file")
            # Under the writer's lock, so that two first opens cannot make two keys.
            key = _load_or_create_signing_key(directory)
            end = os.fstat(fd).st_size
            offsets: array[int] = array("Q")
            replay = _Replay(offsets=offsets)
            _replay_all(replay, fd, path, end)
            if replay.tail_bytes:
                _cut_torn_tail(fd, path, replay)
                end = replay.tail_offset
            _check_stored_origin(directory, origin)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            directory=directory,
            origin=origin,
            fd=fd,
            key=key,
            frontier=replay.frontier,
            offsets=offsets,
            end=end,
        )

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def size(self) -> int:
        """How many records the log holds (all durable)."""
        return self._frontier.size

    @property
    def root_hash(self) -> bytes:
        """The RFC 9162 tree hash over every record."""
        return self._root

    def append(self, record: Mapping[str, Any]) -> int:
        """Write ``record`` durably and return its index; only then may the caller act.

        :class:`AuditRecordError` if the record is invalid (nothing written),
        :class:`AuditWriteError` if it could not be made durable (nothing kept). In both cases
        the caller refuses the command.
        """
        fields = validate_record(record)
        with self._lock:
            self._check_writable()
            index = self._frontier.size
            fields["i"] = index
            fields["prev"] = self._root.hex()
            try:
                line = _encode_line(fields)
            except UnicodeEncodeError:  # pragma: no cover - the field checks refuse surrogates
                raise AuditRecordError("audit record refused: text is not valid Unicode") from None
            if len(line) > MAX_LINE_BYTES:
                raise AuditRecordError(
                    f"audit record refused: it is {len(line)} bytes as JSON; the most is"
                    f" {MAX_LINE_BYTES}"
                )
            offset = self._end
            try:
                _write_all(self._fd, line + b"\n", offset)
                os.fdatasync(self._fd)
            except OSError as exc:
                self._undo_append(offset, index, exc)
            leaf = leaf_hash(line)
            self._frontier.push(leaf)
            self._root = self._frontier.root()
            self._offsets.append(offset)
            self._end = offset + len(line) + 1
            return index

    def checkpoint(self, now: datetime | None = None) -> str:
        """Sign the current tree, append the checkpoint to ``checkpoints`` durably, and
        return its text. :class:`AuditWriteError` if it could not be stored."""
        moment = format_time(now if now is not None else datetime.now(UTC))
        with self._lock:
            self._check_writable()
            text = _sign_checkpoint(self._key, self._origin, self.size, self._root, moment)
            with _CheckpointsFile(self._directory / CHECKPOINTS_NAME) as checkpoints:
                checkpoints.append(text)
        logger.info(
            "audit checkpoint at %d records",
            self.size,
            extra={"event": "audit.checkpoint", "size": self.size},
        )
        return text

    def records(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """The records from index ``start`` on, as stored (with ``i`` and ``prev``), up to the
        size the log had when iteration began."""
        if start < 0:
            raise ValueError(f"record index {start} is negative")
        with self._lock:
            if self._closed:
                raise AuditError(f"the audit log {self._path} is closed")
            if start >= self._frontier.size:
                return
            begin, end = self._offsets[start], self._end
        # Durable bytes are never rewritten, so reading them needs no lock; a descriptor of
        # our own stays valid whatever close() does meanwhile.
        fd = _open_for_reading(self._path)
        try:
            index = start
            for _, line in _complete_lines(fd, begin, end, MAX_LINE_BYTES):
                try:
                    record = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    record = None
                if not isinstance(record, dict) or record.get("i") != index:
                    raise AuditCorruptError(self._path, index + 1, "changed while the log was open")
                yield record
                index += 1
        finally:
            os.close(fd)

    def records_about(self, jid: str, *, limit: int = RECORDS_ABOUT_LIMIT) -> list[dict[str, Any]]:
        """The newest ``limit`` records whose scope is ``jid``'s account (any resource), oldest
        first. ``ValueError`` if ``jid`` is not a JID."""
        try:
            target = str(JID.parse(jid).bare)
        except JIDError as exc:
            raise AuditRecordError(f"not a JID: {exc}") from None
        found: deque[dict[str, Any]] = deque(maxlen=max(limit, 0))
        for record in self.records():
            scope = record.get("scope")
            if isinstance(scope, str) and scope.partition("/")[0] == target:
                found.append(record)
        return list(found)

    def close(self) -> None:
        """Close the file (and release the writer's lock). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def _check_writable(self) -> None:
        if self._closed:
            raise AuditWriteError(f"the audit log {self._path} is closed")
        if self._failed is not None:
            raise AuditWriteError(self._failed)

    def _undo_append(self, offset: int, index: int, error: OSError) -> NoReturn:
        """Cut a failed append's bytes off; always raises :class:`AuditWriteError`."""
        reason = error.strerror or str(error)
        try:
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        except OSError as cut_error:
            self._failed = (
                f"the audit log {self._path} refuses appends: writing record {index} failed"
                f" ({reason}) and the partial line could not be cut"
                f" ({cut_error.strerror or cut_error}); reopen it to repair the end"
            )
            logger.critical(
                "audit log %s: record %d failed and its partial line could not be cut",
                self._path,
                index,
                extra={
                    "event": "audit.log_failed",
                    "path": str(self._path),
                    "index": index,
                    "error": reason,
                    "security": True,
                },
            )
            raise AuditWriteError(self._failed) from error
        logger.error(
            "audit log %s: record %d could not be written: %s",
            self._path,
            index,
            reason,
            extra={
                "event": "audit.write_failed",
                "path": str(self._path),
                "index": index,
                "error": reason,
                "security": True,
            },
        )
        raise AuditWriteError(
            f"cannot write audit record {index} to {self._path}: {reason}"
        ) from error


def _ensure_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        if not directory.is_dir():
            raise AuditError(f"{directory} exists and is not a directory") from None
        return
    except FileNotFoundError:
        raise AuditWriteError(
            f"cannot create the audit directory {directory}: {directory.parent} does not exist"
        ) from None
    except OSError as exc:
        raise AuditWriteError(
            f"cannot create the audit directory {directory}: {exc.strerror or exc}"
        ) from None
    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    _fsync_directory(directory.parent)


def _open_log_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return os.open(path, flags | os.O_NONBLOCK)
        try:
            os.fchmod(fd, 0o600)
            _fsync_directory(path.parent)
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as exc:
        raise AuditWriteError(f"cannot open the audit log {path}: {exc.strerror or exc}") from None


def _cut_torn_tail(fd: int, path: Path, replay: _Replay) -> None:
    try:
        os.ftruncate(fd, replay.tail_offset)
        os.fsync(fd)
    except OSError as exc:
        raise AuditWriteError(
            f"cannot cut the torn last line of {path}: {exc.strerror or exc}"
        ) from None
    logger.warning(
        "audit log %s: cut %s (%d bytes, never acknowledged) after record %d",
        path,
        replay.tail_reason,
        replay.tail_bytes,
        replay.size - 1,
        extra={
            "event": "audit.tail_truncated",
            "path": str(path),
            "offset": replay.tail_offset,
            "bytes": replay.tail_bytes,
            "records": replay.size,
        },
    )


def _check_stored_origin(directory: Path, origin: str) -> None:
    """Refuse to append to a log whose newest checkpoint names another origin."""
    path = directory / CHECKPOINTS_NAME
    try:
        fd = _open_for_reading(path)
    except FileNotFoundError:
        return
    try:
        last: tuple[int, bytes] | None = None
        end = os.fstat(fd).st_size
        for number, (_, line) in enumerate(_complete_lines(fd, 0, end, _MAX_CHECKPOINT_LINE), 1):
            last = (number, line)
    finally:
        os.close(fd)
    if last is None:
        return
    try:
        stored = _parse_checkpoint(_checkpoint_from_line(last[1]))[0].origin
    except _CheckError as exc:
        raise AuditCorruptError(path, last[0], exc.reason) from None
    if stored != origin:
        raise AuditError(
            f"the audit log in {directory} belongs to {stored!r}, not {origin!r} (did the"
            " server's domain change?)"
        )


# --------------------------------------------------------------------------- reading beside a node


def latest_checkpoint(directory: Path, origin: str, *, now: datetime | None = None) -> str:
    """The newest stored checkpoint's text, after checking its signature; if there is none,
    sign one of the log as it is now and store it first. Works beside a running node (which
    holds the log open): it then reads the log without writing it."""
    if not directory.is_dir():
        raise AuditError(f"no audit log: {directory} does not exist (has the node run?)")
    stored = _newest_stored(directory)
    if stored is not None:
        return _checked(stored, load_public_key(directory / PUBLIC_KEY_NAME), origin)
    try:
        log = AuditLog.open(directory, origin)
    except AuditInUseError:
        return _checkpoint_beside_writer(directory, origin, now)
    with log:
        return log.checkpoint(now)


def _newest_stored(directory: Path) -> str | None:
    path = directory / CHECKPOINTS_NAME
    try:
        fd = _open_for_reading(path)
    except FileNotFoundError:
        return None
    try:
        last: bytes | None = None
        end = os.fstat(fd).st_size
        for _, line in _complete_lines(fd, 0, end, _MAX_CHECKPOINT_LINE):
            last = line
    finally:
        os.close(fd)
    if last is None:
        return None
    try:
        return _checkpoint_from_line(last)
    except _CheckError as exc:
        raise AuditVerifyError(f"{path}: the last line is {exc.reason}") from None


def _checked(text: str, public_key: Ed25519PublicKey, origin: str) -> str:
    try:
        checkpoint = _verify_checkpoint(text, public_key)
    except _CheckError as exc:
        raise AuditVerifyError(
            f"the newest stored checkpoint does not verify: {exc.reason}"
        ) from None
    if checkpoint.origin != origin:
        raise AuditVerifyError(
            f"the newest stored checkpoint is for {checkpoint.origin!r}, not {origin!r}"
        )
    return text


def _checkpoint_beside_writer(directory: Path, origin: str, now: datetime | None) -> str:
    key = _read_private_key(directory / SIGNING_KEY_NAME)
    path = directory / LOG_NAME
    fd = _open_for_reading(path)
    try:
        replay = _Replay()
        _replay_all(replay, fd, path, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    moment = format_time(now if now is not None else datetime.now(UTC))
    with _CheckpointsFile(directory / CHECKPOINTS_NAME) as checkpoints:
        # The node may have stored one since we looked: it covers at least as much.
        try:
            newer = checkpoints.last()
        except _CheckError as exc:
            raise AuditVerifyError(f"{checkpoints.path}: the last line is {exc.reason}") from None
        if newer is not None:
            return newer
        text = _sign_checkpoint(key, origin, replay.size, replay.root, moment)
        checkpoints.append(text)
    return text


def export_lines(directory: Path, *, since: datetime | None = None) -> Iterator[bytes]:
    """The log's lines (canonical JSON, no newline) whose time is ``since`` or later, each
    checked as it is read; an unfinished last line (a write in progress) is left out."""
    path = directory / LOG_NAME
    try:
        fd = _open_for_reading(path)
    except FileNotFoundError:
        raise AuditError(f"no audit log: {path} does not exist") from None
    try:
        replay = _Replay()
        for line, record in replay.lines(fd, path, os.fstat(fd).st_size):
            if since is None or _parse_record_time(record["t"]) >= since:
                yield line
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify_log`` checked: the log's size and tree hash, the stored checkpoints (all
    of which match it), the retained checkpoint (consistent with it), and notes."""

    directory: Path
    size: int
    root_hash: bytes
    checkpoints_checked: int
    latest_checkpoint: Checkpoint | None
    retained: Checkpoint | None
    key_id: str | None
    notes: tuple[str, ...]

    def summary(self) -> str:
        """One line for the terminal."""
        parts = [f"audit log {self.directory}: {self.size} records, root {_b64(self.root_hash)}"]
        latest = self.latest_checkpoint
        if latest is None:
            parts.append("no signed checkpoints stored")
        else:
            count = self.checkpoints_checked
            parts.append(
                f"{count} signed checkpoint{'s match' if count > 1 else ' matches'} it (newest:"
                f" {latest.size} records at {latest.time})"
            )
        if self.retained is not None:
            parts.append(
                f"consistent with the retained checkpoint ({self.retained.size} records at"
                f" {self.retained.time})"
            )
        parts.extend(f"note: {note}" for note in self.notes)
        return "; ".join(parts)


def verify_log(
    directory: Path,
    *,
    public_key_file: Path | None = None,
    retained_checkpoint: str | None = None,
    origin: str | None = None,
) -> VerifyReport:
    """Check the audit log in ``directory`` against its stored checkpoints and, if given, a
    checkpoint retained elsewhere; :class:`AuditVerifyError` says what does not match and where.

    Checkpoint signatures are checked with ``public_key_file`` if given (a copy kept off the
    host), else with ``audit-signing.pub`` in the directory. ``origin``, if given, is the one
    every checkpoint must name. Read-only: safe beside a running node.
    """
    if not directory.is_dir():
        raise AuditVerifyError(f"no audit log: {directory} is not a directory")
    log_path = directory / LOG_NAME
    checkpoints_path = directory / CHECKPOINTS_NAME
    notes: list[str] = []
    key_path = public_key_file if public_key_file is not None else directory / PUBLIC_KEY_NAME
    public_key = (
        load_public_key(key_path) if public_key_file is not None or key_path.exists() else None
    )
    retained: Checkpoint | None = None
    if retained_checkpoint is not None:
        if public_key is None:
            raise AuditVerifyError(f"no public key to check the retained checkpoint: {key_path}")
        try:
            retained = _verify_checkpoint(retained_checkpoint, public_key)
        except _CheckError as exc:
            raise AuditVerifyError(f"the retained checkpoint: {exc.reason}") from None
    # Checkpoints before the log: one is stored only after the records it covers are durable,
    # so every checkpoint read here is covered by the log read after it, even beside a node.
    stored = _read_stored_checkpoints(checkpoints_path, public_key, notes)
    expected = origin or (retained.origin if retained else None)
    expected = expected or (stored[0][1].origin if stored else None)
    for line_number, checkpoint in stored:
        if checkpoint.origin != expected:
            raise AuditVerifyError(
                f"{checkpoints_path}: line {line_number}: the checkpoint is for"
                f" {checkpoint.origin!r}, not {expected!r}"
            )
    if retained is not None and retained.origin != expected:
        raise AuditVerifyError(
            f"the retained checkpoint is for {retained.origin!r}, not {expected!r}"
        )

    leaves: list[bytes] = []
    replay = _Replay(
        leaves=leaves if retained is not None else None,
        roots_at=frozenset(checkpoint.size for _, checkpoint in stored),
    )
    try:
        fd = _open_for_reading(log_path)
    except FileNotFoundError:
        if stored or retained is not None:
            raise AuditVerifyError(
                f"the log is gone: {log_path} does not exist, but there are checkpoints of it"
            ) from None
        raise AuditVerifyError(f"no audit log: {log_path} does not exist") from None
    try:
        _replay_all(replay, fd, log_path, os.fstat(fd).st_size)
    except AuditCorruptError as exc:
        raise AuditVerifyError(str(exc)) from None
    finally:
        os.close(fd)
    if replay.tail_bytes:
        notes.append(
            f"{log_path} ends in {replay.tail_reason} of {replay.tail_bytes} bytes (a write in"
            " progress, or a torn write the node cuts when it next opens the log)"
        )

    _check_stored_against_log(log_path, checkpoints_path, stored, replay)
    if retained is not None:
        _check_retained_against_log(log_path, retained, leaves, replay.root)
    latest = max((c for _, c in stored), key=lambda c: c.size, default=None)
    if latest is None:
        if replay.size:
            notes.append("no signed checkpoints are stored: only the record chain was checked")
    elif latest.size < replay.size:
        notes.append(
            f"records {latest.size}..{replay.size - 1} are not covered by a signed checkpoint yet"
        )
    return VerifyReport(
        directory=directory,
        size=replay.size,
        root_hash=replay.root,
        checkpoints_checked=len(stored),
        latest_checkpoint=latest,
        retained=retained,
        key_id=None
        if public_key is None or expected is None
        else _key_id(expected, public_key).hex(),
        notes=tuple(notes),
    )


def _read_stored_checkpoints(
    path: Path, public_key: Ed25519PublicKey | None, notes: list[str]
) -> list[tuple[int, Checkpoint]]:
    try:
        fd = _open_for_reading(path)
    except FileNotFoundError:
        return []
    stored: list[tuple[int, Checkpoint]] = []
    try:
        end = os.fstat(fd).st_size
        valid_end = 0
        for offset, line in _complete_lines(fd, 0, end, _MAX_CHECKPOINT_LINE):
            line_number = len(stored) + 1
            if public_key is None:
                raise AuditVerifyError(
                    f"no public key to check {path}: {path.parent / PUBLIC_KEY_NAME} is missing"
                    " (pass --public-key)"
                )
            try:
                checkpoint = _verify_checkpoint(_checkpoint_from_line(line), public_key)
            except _CheckError as exc:
                raise AuditVerifyError(f"{path}: line {line_number}: {exc.reason}") from None
            stored.append((line_number, checkpoint))
            valid_end = offset + len(line) + 1
    finally:
        os.close(fd)
    tail = end - valid_end
    if tail > _MAX_CHECKPOINT_LINE:
        raise AuditVerifyError(
            f"{path}: line {len(stored) + 1}: no line end within {_MAX_CHECKPOINT_LINE} bytes"
        )
    if tail:
        notes.append(f"{path} ends in an unfinished line of {tail} bytes (a torn write)")
    return stored


def _check_stored_against_log(
    log_path: Path, checkpoints_path: Path, stored: list[tuple[int, Checkpoint]], replay: _Replay
) -> None:
    """Every stored checkpoint must be the tree of a prefix of the log. A checkpoint that does
    not match is reported before one the log is too short for: it says more about where."""
    matching = [c.size for _, c in stored if replay.roots_at.get(c.size) == c.root_hash]
    for line_number, checkpoint in sorted(stored, key=lambda item: item[1].size):
        if checkpoint.size > replay.size or checkpoint.size in matching:
            continue
        good = max((size for size in matching if size < checkpoint.size), default=0)
        raise AuditVerifyError(
            f"{log_path} does not match {checkpoints_path} line {line_number} (signed"
            f" {checkpoint.time}, {checkpoint.size} records): one of records"
            f" {good}..{checkpoint.size - 1} (lines {good + 1}..{checkpoint.size}) was changed,"
            " removed or reordered after it was signed"
        )
    for line_number, checkpoint in stored:
        if checkpoint.size > replay.size:
            raise AuditVerifyError(
                f"the log is truncated: {checkpoints_path} line {line_number} (signed"
                f" {checkpoint.time}) covers {checkpoint.size} records, but {log_path} holds"
                f" only {replay.size}"
            )


def _check_retained_against_log(
    log_path: Path, retained: Checkpoint, leaves: list[bytes], root: bytes
) -> None:
    """A consistency proof from the retained checkpoint to the log's current tree."""
    if retained.size > len(leaves):
        raise AuditVerifyError(
            f"the log is truncated: the retained checkpoint (signed {retained.time}) covers"
            f" {retained.size} records, but {log_path} holds only {len(leaves)}"
        )
    proof = consistency_proof(leaves, retained.size)
    if not verify_consistency(retained.size, len(leaves), retained.root_hash, root, proof):
        now = tree_hash(leaves, 0, retained.size)
        raise AuditVerifyError(
            f"{log_path} is not consistent with the retained checkpoint (signed"
            f" {retained.time}, {retained.size} records): its first {retained.size} records"
            f" hash to {_b64(now)}, the checkpoint says {_b64(retained.root_hash)}; records"
            " were changed, removed or reordered after it was signed"
        )
