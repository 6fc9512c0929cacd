"""The operator audit log: RFC 9162 tree hashes and proofs, records, durability and failing
closed, signed checkpoints, tamper detection by ``verify_log``, and ``villaged audit``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from villaged.admin import audit
from villaged.admin.audit import (
    EMPTY_ROOT,
    MAX_LINE_BYTES,
    AuditCorruptError,
    AuditError,
    AuditInUseError,
    AuditLog,
    AuditRecordError,
    AuditVerifyError,
    AuditWriteError,
    MerkleFrontier,
    consistency_proof,
    format_time,
    inclusion_proof,
    leaf_hash,
    tree_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
    verify_log,
)
from villaged.cli import main

if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).parent
ORIGIN = "villaged-audit/example.org"
T0 = datetime(2026, 11, 29, 18, 30, tzinfo=UTC)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------------------- RFC 9162 tree

# The reference entries and hashes of the Certificate Transparency test suite (RFC 6962 and
# RFC 9162 hash trees the same way).
CT_ENTRIES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
H_96A2 = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
H_5F08 = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
H_6B47 = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
H_BC1A = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
H_CA85 = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
H_0EBC = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"
#: (leaf index, tree size, audit path)
CT_INCLUSION = [
    (0, 1, []),
    (0, 8, [H_96A2, H_5F08, H_6B47]),
    (5, 8, [H_BC1A, H_CA85, CT_ROOTS[3]]),
    (2, 3, [CT_ROOTS[1]]),
    (1, 5, [CT_ROOTS[0], H_5F08, H_BC1A]),
]
#: (old size, new size, consistency proof)
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, [H_96A2, H_5F08, H_6B47]),
    (6, 8, [H_0EBC, H_CA85, CT_ROOTS[3]]),
    (2, 5, [H_5F08, H_BC1A]),
]


def ref_mth(entries: list[bytes]) -> bytes:
    """MTH as RFC 9162 §2.1.1 defines it, recursively over the entries themselves."""
    if not entries:
        return sha256(b"")
    if len(entries) == 1:
        return sha256(b"\x00" + entries[0])
    k = 1
    while k * 2 < len(entries):
        k *= 2
    return sha256(b"\x01" + ref_mth(entries[:k]) + ref_mth(entries[k:]))


def ref_path(m: int, entries: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 9162 §2.1.3.1."""
    if len(entries) == 1:
        return []
    k = 1
    while k * 2 < len(entries):
        k *= 2
    if m < k:
        return [*ref_path(m, entries[:k]), ref_mth(entries[k:])]
    return [*ref_path(m - k, entries[k:]), ref_mth(entries[:k])]


def ref_subproof(m: int, entries: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b), RFC 9162 §2.1.4.1."""
    if m == len(entries):
        return [] if whole else [ref_mth(entries)]
    k = 1
    while k * 2 < len(entries):
        k *= 2
    if m <= k:
        return [*ref_subproof(m, entries[:k], whole), ref_mth(entries[k:])]
    return [*ref_subproof(m - k, entries[k:], False), ref_mth(entries[:k])]


def entries_of(count: int) -> list[bytes]:
    return [f"entry {n}".encode() * (n % 3 + 1) for n in range(count)]


def test_empty_tree_hash_is_sha256_of_nothing() -> None:
    expected = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert EMPTY_ROOT.hex() == expected
    assert tree_hash([]).hex() == expected
    assert MerkleFrontier().root().hex() == expected


def test_tree_hashes_match_the_certificate_transparency_vectors() -> None:
    leaves = [leaf_hash(entry) for entry in CT_ENTRIES]
    frontier = MerkleFrontier()
    for size, (leaf, root) in enumerate(zip(leaves, CT_ROOTS, strict=True), 1):
        frontier.push(leaf)
        assert tree_hash(leaves[:size]).hex() == root
        assert frontier.root().hex() == root
        assert frontier.size == size


def test_tree_hashes_match_the_rfc_definition_for_every_size() -> None:
    entries = entries_of(70)
    leaves = [leaf_hash(entry) for entry in entries]
    frontier = MerkleFrontier()
    assert frontier.root() == ref_mth([])
    for size in range(1, len(entries) + 1):
        frontier.push(leaves[size - 1])
        expected = ref_mth(entries[:size])
        assert frontier.root() == expected
        assert tree_hash(leaves, 0, size) == expected
    assert tree_hash(leaves, 5, 17) == ref_mth(entries[5:17])


def test_proofs_match_the_certificate_transparency_vectors() -> None:
    leaves = [leaf_hash(entry) for entry in CT_ENTRIES]
    for index, size, expected in CT_INCLUSION:
        proof = inclusion_proof(leaves[:size], index)
        assert [h.hex() for h in proof] == expected
        root = bytes.fromhex(CT_ROOTS[size - 1])
        assert verify_inclusion(leaves[index], index, size, proof, root)
    for old, new, expected in CT_CONSISTENCY:
        proof = consistency_proof(leaves[:new], old)
        assert [h.hex() for h in proof] == expected
        old_root, new_root = (bytes.fromhex(CT_ROOTS[s - 1]) for s in (old, new))
        assert verify_consistency(old, new, old_root, new_root, proof)


def altered(proof: list[bytes], position: int) -> list[bytes]:
    changed = list(proof)
    changed[position] = bytes([changed[position][0] ^ 1]) + changed[position][1:]
    return changed


def test_inclusion_proofs_for_every_size_up_to_20() -> None:
    entries = entries_of(20)
    leaves = [leaf_hash(entry) for entry in entries]
    for size in range(1, 21):
        root = ref_mth(entries[:size])
        for index in range(size):
            proof = inclusion_proof(leaves[:size], index)
            assert proof == ref_path(index, entries[:size])
            leaf = leaves[index]
            assert verify_inclusion(leaf, index, size, proof, root)
            assert not verify_inclusion(leaf, index, size, proof, sha256(b"another root"))
            assert not verify_inclusion(leaf_hash(b"other"), index, size, proof, root)
            assert not verify_inclusion(leaf, index, size, [*proof, leaf], root)
            assert not verify_inclusion(leaf, size, size, proof, root)
            assert not verify_inclusion(leaf, -1, size, proof, root)
            for position in range(len(proof)):
                assert not verify_inclusion(leaf, index, size, altered(proof, position), root)
            if proof:
                assert not verify_inclusion(leaf, index, size, proof[:-1], root)
            if size > 1:
                other = (index + 1) % size
                assert not verify_inclusion(leaf, other, size, proof, root)
        with pytest.raises(ValueError, match="not in a tree"):
            inclusion_proof(leaves[:size], size)


def test_consistency_proofs_for_every_size_up_to_20() -> None:
    entries = entries_of(20)
    leaves = [leaf_hash(entry) for entry in entries]
    for new in range(21):
        new_root = ref_mth(entries[:new])
        for old in range(new + 1):
            old_root = ref_mth(entries[:old])
            proof = consistency_proof(leaves[:new], old)
            expected = ref_subproof(old, entries[:new], True) if 0 < old < new else []
            assert proof == expected
            assert verify_consistency(old, new, old_root, new_root, proof)
            if old == 0:
                continue  # the empty tree is a prefix of every tree: nothing else to get wrong
            # An older tree whose last record differs: not a prefix.
            forged_old = ref_mth([*entries[: old - 1], b"changed"])
            assert not verify_consistency(old, new, forged_old, new_root, proof)
            assert not verify_consistency(old, new, old_root, sha256(b"other"), proof)
            assert not verify_consistency(new + 1, new, old_root, new_root, proof)
            for position in range(len(proof)):
                assert not verify_consistency(
                    old, new, old_root, new_root, altered(proof, position)
                )
            if proof:
                assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
                assert not verify_consistency(old, new, old_root, new_root, [*proof, old_root])
                assert not verify_consistency(old, new, old_root, new_root, [])
            if old < new:
                assert not verify_consistency(old, new, old_root, old_root, proof)
        with pytest.raises(ValueError, match="not a prefix"):
            consistency_proof(leaves[:new], new + 1)


def test_malformed_proofs_are_refused() -> None:
    leaves = [leaf_hash(entry) for entry in entries_of(8)]
    root = tree_hash(leaves)
    proof = inclusion_proof(leaves, 3)
    assert not verify_inclusion(leaves[3], 3, 8, [proof[0][:31], *proof[1:]], root)
    assert not verify_inclusion(leaves[3], 3, 8, proof * 30, root)
    assert not verify_consistency(0, 8, sha256(b"not empty"), root, [])
    assert not verify_consistency(0, 8, EMPTY_ROOT, root, proof)


# --------------------------------------------------------------------------- records


def record(n: int = 0, **fields: Any) -> dict[str, Any]:
    return {
        "t": format_time(T0 + timedelta(seconds=n)),
        "kind": "command",
        "operator": "ops1",
        "uid": 1001,
        "pid": 4242,
        "result": "ok",
        "command": "inspect.messages",
        "scope": "alice@example.org",
        "grant": f"g{n}",
        "reason": "abuse-investigation",
        "ticket": "T-42",
        "data_sha256": hashlib.sha256(f"answer {n}".encode()).hexdigest(),
        **fields,
    }


SECRET_TEXT = "the user's password is hunter2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"i": 3}, "field 'i' is set by the log"),
        ({"prev": "00"}, "field 'prev' is set by the log"),
        ({"colour": SECRET_TEXT}, "unknown field 'colour'"),
        ({"t": None}, "missing field 't'"),
        ({"operator": None}, "missing field 'operator'"),
        ({"t": "2026-11-29T18:30:00Z"}, "field 't' must be an RFC 3339 UTC time"),
        ({"t": "2026-02-30T18:30:00.000Z"}, "field 't' is not a real date and time"),
        ({"kind": "Login"}, "field 'kind' must be 1 to 32 of a-z"),
        ({"result": "maybe"}, "field 'result' must be one of error, ok, pending, refused"),
        ({"uid": "1001"}, "field 'uid' must be an integer, not str"),
        ({"uid": True}, "field 'uid' must be an integer, not bool"),
        ({"pid": -1}, "field 'pid' must be from 0 to 4294967295"),
        ({"justification": SECRET_TEXT * 100}, "field 'justification' must be 0 to 2000"),
        ({"operator": "ops\x1b[31m"}, "field 'operator' must not contain the character U+001B"),
        ({"ticket": "T-1\u202e"}, "field 'ticket' must not contain the character U+202E"),
        ({"error": "bad \ud800"}, "field 'error' must not contain the character U+D800"),
        ({"reason": "line\nbreak"}, "field 'reason' must not contain the character U+000A"),
        ({"command": "x" * 65}, "field 'command' must be 0 to 64 characters long, not 65"),
        ({"scope": "Alice@Example.org"}, "field 'scope' must be a JID in canonical form"),
        ({"scope": "@example.org"}, "field 'scope' is not a JID"),
        ({"data_sha256": SECRET_TEXT}, "field 'data_sha256' must be a SHA-256 digest"),
        ({"expires": 17}, "field 'expires' must be a string, not int"),
    ],
)
def test_records_are_checked_and_nothing_is_written(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    bad = record(0)
    for name, value in change.items():
        if value is None:
            del bad[name]
        else:
            bad[name] = value
    with AuditLog.open(tmp_path / "audit", ORIGIN) as log:
        log.append(record(0))
        before = (tmp_path / "audit" / "audit.jsonl").read_bytes()
        with pytest.raises(AuditRecordError) as caught:
            log.append(bad)
        assert message in str(caught.value)
        assert "hunter2" not in str(caught.value)  # values are never quoted
        assert log.size == 1
        assert (tmp_path / "audit" / "audit.jsonl").read_bytes() == before
        assert log.append(record(1)) == 1


def test_a_record_must_be_a_mapping(tmp_path: Path) -> None:
    with (
        AuditLog.open(tmp_path / "audit", ORIGIN) as log,
        pytest.raises(AuditRecordError, match="must be a mapping, not list"),
    ):
        log.append([("t", "x")])  # type: ignore[arg-type]


def test_the_largest_fields_fit_and_a_record_is_bounded_as_a_whole(tmp_path: Path) -> None:
    emoji = "\U0001f600"  # four bytes in UTF-8
    big = record(
        0,
        justification=(emoji * 1999) + "\n",
        error=emoji * 1000,
        operator=emoji * 64,
        command=emoji * 64,
        reason=emoji * 64,
        grant=emoji * 64,
        approver=emoji * 64,
        node=emoji * 64,
        ticket=emoji * 200,
    )
    with AuditLog.open(tmp_path / "audit", ORIGIN) as log:
        log.append(big)  # about 15 KiB: every field at its limit still fits
        scope = f"{'a' * 1000}@example.org/{'r' * 1000}"
        with pytest.raises(AuditRecordError, match=f"the most is {MAX_LINE_BYTES}"):
            log.append({**big, "scope": scope})
        assert log.size == 1
        [stored] = list(log.records())
        assert stored["justification"] == big["justification"]


def test_lines_are_canonical_json_and_the_leaves_of_the_tree(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, ORIGIN) as log:
        log.append(record(0, operator="Zoë"))
        log.append(record(1, justification="two\nlines"))
        root = log.root_hash
    lines = (directory / "audit.jsonl").read_bytes().splitlines()
    assert "Zoë".encode() in lines[0]  # UTF-8, not \u escapes
    for line in lines:
        parsed = json.loads(line)
        assert (
            line
            == json.dumps(
                parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        )
        assert b", " not in line
        assert b'": ' not in line
    assert json.loads(lines[0])["prev"] == EMPTY_ROOT.hex()
    assert json.loads(lines[1])["prev"] == tree_hash([leaf_hash(lines[0])]).hex()
    assert root == ref_mth(lines)


# --------------------------------------------------------------------------- the log


def fill(directory: Path, count: int, *, checkpoint_every: int = 0, **fields: Any) -> list[str]:
    """Append ``record(n, **fields)`` for the next ``count`` indexes; a checkpoint after every
    ``checkpoint_every`` records. Returns the checkpoints' texts."""
    checkpoints: list[str] = []
    with AuditLog.open(directory, ORIGIN) as log:
        start = log.size
        for n in range(start, start + count):
            assert log.append(record(n, **fields)) == n
            if checkpoint_every and (n + 1) % checkpoint_every == 0:
                checkpoints.append(log.checkpoint(T0 + timedelta(seconds=n)))
    return checkpoints


def log_lines(directory: Path) -> list[bytes]:
    return (directory / "audit.jsonl").read_bytes().splitlines()


def write_lines(directory: Path, lines: list[bytes]) -> None:
    (directory / "audit.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def rechained(lines: list[bytes]) -> list[bytes]:
    """What a careful editor without the key does after a change: renumber the records and
    recompute every tree head, so that the chain checks out again."""
    frontier = MerkleFrontier()
    result = []
    for index, line in enumerate(lines):
        fields = json.loads(line)
        fields["i"] = index
        fields["prev"] = frontier.root().hex()
        encoded = json.dumps(
            fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        frontier.push(leaf_hash(encoded))
        result.append(encoded)
    return result


def test_append_reopen_and_read_back(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    fill(directory, 7)
    with AuditLog.open(directory, ORIGIN) as log:
        assert log.size == 7
        assert log.root_hash == tree_hash([leaf_hash(line) for line in log_lines(directory)])
        assert log.append(record(7)) == 7
        assert [r["i"] for r in log.records(5)] == [5, 6, 7]
        assert list(log.records(8)) == []
        first = next(log.records())
        assert {k: v for k, v in first.items() if k not in ("i", "prev")} == record(0)
        with pytest.raises(ValueError, match="negative"):
            list(log.records(-1))
        assert log.origin == ORIGIN
        assert log.directory == directory
    with pytest.raises(AuditError, match="closed"):
        list(log.records())
    with pytest.raises(AuditWriteError, match="closed"):
        log.append(record(8))
    log.close()  # idempotent
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert modes == {"audit.jsonl": 0o600, "audit-signing.key": 0o600, "audit-signing.pub": 0o644}
    assert directory.stat().st_mode & 0o777 == 0o700


def test_records_about_one_user(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, ORIGIN) as log:
        log.append(record(0, scope="alice@example.org"))
        log.append(record(1, scope="bob@example.org"))
        log.append(record(2, scope="alice@example.org/phone"))
        log.append({k: v for k, v in record(3).items() if k != "scope"})
        log.append(record(4, scope="alice@example.org"))
        assert [r["i"] for r in log.records_about("Alice@Example.org")] == [0, 2, 4]
        assert [r["i"] for r in log.records_about("alice@example.org/laptop")] == [0, 2, 4]
        assert [r["i"] for r in log.records_about("alice@example.org", limit=2)] == [2, 4]
        assert [r["i"] for r in log.records_about("bob@example.org")] == [1]
        assert log.records_about("carol@example.org") == []
        with pytest.raises(AuditRecordError, match="not a JID"):
            log.records_about("@example.org")


def audit_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "event", "") for r in caplog.records if r.name == "villaged.admin.audit"]


@pytest.mark.parametrize(
    "tail",
    [
        b'{"command":"inspect.mess',  # the write stopped part way
        b"\x00" * 300,  # the file grew but the page never reached the disk
        b'{"command":"inspect' + b"\x00" * 100 + b"\n",  # a page in the middle is missing
    ],
)
def test_a_torn_final_line_is_cut_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes
) -> None:
    directory = tmp_path / "audit"
    fill(directory, 3)
    good = (directory / "audit.jsonl").read_bytes()
    with (directory / "audit.jsonl").open("ab") as file:
        file.write(tail)
    report = verify_log(directory)  # read-only: reports it, leaves it
    assert report.size == 3
    assert any("a torn write the node cuts" in note for note in report.notes)
    with caplog.at_level(logging.INFO, logger="villaged.admin.audit"):
        log = AuditLog.open(directory, ORIGIN)
    with log:
        assert log.size == 3
        assert (directory / "audit.jsonl").read_bytes() == good
        assert log.append(record(3)) == 3
    [warning] = [r for r in caplog.records if getattr(r, "event", "") == "audit.tail_truncated"]
    assert warning.levelno == logging.WARNING
    assert warning.__dict__["bytes"] == len(tail)
    assert warning.__dict__["records"] == 3
    assert verify_log(directory).size == 4


def test_damage_before_the_end_is_an_error_naming_the_line(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    fill(directory, 4)
    lines = log_lines(directory)
    write_lines(directory, [lines[0], b"not json at all", *lines[2:]])
    with pytest.raises(AuditCorruptError, match=r"audit\.jsonl: line 2: not a JSON object"):
        AuditLog.open(directory, ORIGIN)
    # A whole last line that does not check was written whole: not a torn write, not cut.
    write_lines(directory, [*lines[:3], b'{"i":3}'])
    with pytest.raises(AuditCorruptError, match=r"line 4: .*'prev'"):
        AuditLog.open(directory, ORIGIN)
    assert log_lines(directory)[-1] == b'{"i":3}'
    # More unfinished bytes than one record can hold is no torn write either.
    write_lines(directory, lines)
    with (directory / "audit.jsonl").open("ab") as file:
        file.write(b"x" * (MAX_LINE_BYTES + 10))
    with pytest.raises(AuditCorruptError, match="line 5: no line end within 16384 bytes"):
        AuditLog.open(directory, ORIGIN)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda line: line.replace(b'"i":1', b'"i":"1"'), "no record number ('i')"),
        (lambda line: b"[1,2]", "not a JSON object"),
        (lambda line: b"\xff\xfe", "not UTF-8"),
        (lambda line: line.replace(b'"kind"', b'"kind":"x","kind"'), "not in canonical form"),
        (lambda line: line.replace(b'"uid":1001', b'"uid":1001.0'), "field 'uid' must be an int"),
        (lambda line: line[:-1] + b',"extra":1}', "unknown field 'extra'"),
        (lambda line: line.replace(b",", b", "), "not in canonical form"),
        (lambda line: b"", "an empty line"),
    ],
)
def test_each_line_is_checked_on_open(
    tmp_path: Path, edit: Callable[[bytes], bytes], message: str
) -> None:
    directory = tmp_path / "audit"
    fill(directory, 3)
    lines = log_lines(directory)
    write_lines(directory, [lines[0], edit(lines[1]), lines[2]])
    with pytest.raises(AuditCorruptError) as caught:
        AuditLog.open(directory, ORIGIN)
    assert caught.value.line == 2
    assert message in str(caught.value)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with AuditLog.open(directory, ORIGIN) as log:
        log.append(record(0))
        with pytest.raises(AuditInUseError, match="open in another process"):
            AuditLog.open(directory, ORIGIN)
    with AuditLog.open(directory, ORIGIN) as log:
        assert log.size == 1


def test_the_signing_key_is_private_and_must_match_its_public_key(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    fill(directory, 1, checkpoint_every=1)
    key = directory / "audit-signing.key"
    public = directory / "audit-signing.pub"
    key.chmod(0o640)
    with pytest.raises(AuditError, match=r"has mode 0640; it must be 0600 \(chmod 600 "):
        AuditLog.open(directory, ORIGIN)
    key.chmod(0o600)
    saved = public.read_bytes()
    other = Ed25519PrivateKey.generate().public_key()
    public.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(AuditError, match="does not match the audit signing key"):
        AuditLog.open(directory, ORIGIN)
    public.write_bytes(saved)
    key_bytes = key.read_bytes()
    key.unlink()
    with pytest.raises(AuditError, match="is missing, but checkpoints signed by it exist"):
        AuditLog.open(directory, ORIGIN)
    key.write_bytes(b"not a key")
    key.chmod(0o600)
    with pytest.raises(AuditError, match="is not an unencrypted PEM key"):
        AuditLog.open(directory, ORIGIN)
    key.write_bytes(key_bytes)
    public.unlink()  # a lost public key is written again from the private one
    with AuditLog.open(directory, ORIGIN) as log:
        assert log.size == 1
    assert public.read_bytes() == saved
    assert public.stat().st_mode & 0o777 == 0o644


def test_the_origin_is_checked(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with pytest.raises(AuditError, match="must not contain spaces"):
        AuditLog.open(directory, "villaged audit")
    fill(directory, 2, checkpoint_every=2)
    with pytest.raises(AuditError, match=r"belongs to 'villaged-audit/example\.org'"):
        AuditLog.open(directory, "villaged-audit/example.net")
    with (directory / "checkpoints").open("a") as file:
        file.write('"not a checkpoint"\n')
    with pytest.raises(AuditCorruptError, match=r"checkpoints: line 2: no blank line"):
        AuditLog.open(directory, ORIGIN)


# --------------------------------------------------------------------------- failing closed


def running_as_root() -> bool:
    return os.geteuid() == 0


def test_open_fails_closed_when_files_cannot_be_created(tmp_path: Path) -> None:
    with pytest.raises(AuditWriteError, match="does not exist"):
        AuditLog.open(tmp_path / "missing" / "audit", ORIGIN)
    # Something that is not a file where the log belongs: refused for root too.
    directory = tmp_path / "audit"
    fill(directory, 1)
    (directory / "audit.jsonl").unlink()
    (directory / "audit.jsonl").mkdir()
    with pytest.raises(AuditWriteError, match=r"cannot open the audit log .*Is a directory"):
        AuditLog.open(directory, ORIGIN)
    if not running_as_root():  # permission bits do not stop root
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o500)
        try:
            with pytest.raises(AuditWriteError, match="Permission denied"):
                AuditLog.open(readonly / "audit", ORIGIN)
        finally:
            readonly.chmod(0o700)


def test_append_fails_closed_on_a_real_efbig(tmp_path: Path) -> None:
    """A subprocess with a low RLIMIT_FSIZE gets real EFBIG from the kernel (root too)."""
    directory = tmp_path / "audit"
    done = subprocess.run(
        [sys.executable, str(HERE / "audit_fsize_writer.py"), str(directory), "6000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    acked: list[int] = result["acked"]
    assert 5 <= len(acked) < 20
    assert acked == list(range(len(acked)))
    assert "File too large" in result["error"]
    assert f"cannot write audit record {len(acked)}" in result["error"]
    assert "File too large" in result["second"]
    # The partial line was cut: the file holds exactly the acknowledged records.
    assert result["lines_after_failure"] == len(acked)
    assert result["ends_with_newline"]
    assert result["bytes_after_failure"] <= 6000
    # Once the limit is lifted the same log goes on, numbering after the last durable record.
    assert result["after"] == [len(acked), len(acked) + 1, len(acked) + 2]
    assert result["reopened_size"] == len(acked) + 3
    assert verify_log(directory).size == len(acked) + 3


def failing(name: str) -> Callable[..., None]:
    def fail(*args: object) -> None:
        raise OSError(5, f"Input/output error ({name})")

    return fail


def test_append_fails_closed_when_fdatasync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "audit"
    fill(directory, 2)
    before = (directory / "audit.jsonl").read_bytes()
    with AuditLog.open(directory, ORIGIN) as log:
        root = log.root_hash
        with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, "villaged.admin"):
            patch.setattr(os, "fdatasync", failing("fdatasync"))
            with pytest.raises(
                AuditWriteError, match=r"cannot write audit record 2 to .*Input/output error"
            ):
                log.append(record(2, justification=SECRET_TEXT))
        assert (log.size, log.root_hash) == (2, root)
        assert (directory / "audit.jsonl").read_bytes() == before  # the line was cut off
        assert log.append(record(2)) == 2
    assert "audit.write_failed" in audit_events(caplog)
    assert "hunter2" not in caplog.text  # record content never reaches the log
    assert verify_log(directory).size == 3


def test_a_log_that_cannot_cut_a_failed_line_refuses_every_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "audit"
    fill(directory, 2)
    log = AuditLog.open(directory, ORIGIN)
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, "villaged.admin"):
        patch.setattr(os, "fdatasync", failing("fdatasync"))
        patch.setattr(os, "ftruncate", failing("ftruncate"))
        with pytest.raises(AuditWriteError, match="could not be cut"):
            log.append(record(2))
    assert "audit.log_failed" in audit_events(caplog)
    # The file system works again, but the end of the file is unknown: still refused.
    with pytest.raises(AuditWriteError, match="refuses appends"):
        log.append(record(3))
    with pytest.raises(AuditWriteError, match="refuses appends"):
        log.checkpoint()
    log.close()
    with AuditLog.open(directory, ORIGIN) as reopened:
        # The line was written whole, only its sync failed: a record of an unanswered command.
        assert reopened.size == 3
        assert reopened.append(record(3)) == 3


def test_a_checkpoint_that_cannot_be_stored_fails_closed(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    fill(directory, 1)
    with AuditLog.open(directory, ORIGIN) as log:
        (directory / "checkpoints").mkdir()
        with pytest.raises(AuditWriteError, match="checkpoints"):
            log.checkpoint()
        assert log.append(record(1)) == 1


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_is_a_signed_note(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    fill(directory, 5)
    with AuditLog.open(directory, ORIGIN) as log:
        text = log.checkpoint(T0)
        root = log.root_hash
    body, signatures = text.split("\n\n")
    assert body.split("\n") == [
        ORIGIN,
        "5",
        base64.b64encode(root).decode(),
        f"time {format_time(T0)}",
    ]
    assert format_time(T0) == "2026-11-29T18:30:00.000Z"
    [signature_line] = signatures.removesuffix("\n").split("\n")
    dash, name, blob_text = signature_line.split(" ")
    assert (dash, name) == ("\u2014", ORIGIN)
    blob = base64.b64decode(blob_text)
    public_key = serialization.load_pem_public_key((directory / "audit-signing.pub").read_bytes())
    assert isinstance(public_key, Ed25519PublicKey)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == sha256(ORIGIN.encode() + b"\n\x01" + raw)[:4]
    public_key.verify(blob[4:], (body + "\n").encode())  # raises if it does not verify
    parsed = verify_checkpoint(text, audit.load_public_key(directory / "audit-signing.pub"))
    assert (parsed.origin, parsed.size, parsed.root_hash, parsed.time) == (
        ORIGIN,
        5,
        root,
        "2026-11-29T18:30:00.000Z",
    )
    stored = (directory / "checkpoints").read_bytes().splitlines()
    assert [json.loads(line) for line in stored] == [text]
    assert (directory / "checkpoints").stat().st_mode & 0o777 == 0o644


def test_an_unfinished_checkpoint_line_is_cut_by_the_next_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "audit"
    [first] = fill(directory, 2, checkpoint_every=2)
    with (directory / "checkpoints").open("ab") as file:
        file.write(b'"villaged-audit/exa')
    report = verify_log(directory)
    assert report.checkpoints_checked == 1
    assert any("unfinished line of 19 bytes" in note for note in report.notes)
    with (
        caplog.at_level(logging.INFO, logger="villaged.admin.audit"),
        AuditLog.open(directory, ORIGIN) as log,
    ):
        second = log.checkpoint()
    assert "audit.checkpoint_tail_truncated" in audit_events(caplog)
    stored = (directory / "checkpoints").read_bytes().splitlines()
    assert [json.loads(line) for line in stored] == [first, second]
    assert verify_log(directory).checkpoints_checked == 2


def signed_text(directory: Path) -> tuple[str, Any]:
    [text] = fill(directory, 3, checkpoint_every=3)
    return text, audit.load_public_key(directory / "audit-signing.pub")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("\n\n", "\n"), "no blank line"),
        (lambda t: t.replace("\ntime ", "\nextra\ntime "), "has 5 lines; expected 4"),
        (lambda t: t.replace("\n3\n", "\n03\n"), "tree size line is not a decimal"),
        (lambda t: t.replace("=\ntime", "\ntime"), "root hash line is not base64 of 32 bytes"),
        (lambda t: t.replace("time 2026", "at 2026"), "not 'time <RFC 3339"),
        (lambda t: t.replace("\u2014 ", "- "), "signature line is not"),
        (lambda t: t.removesuffix("\n"), "do not end with a newline"),
        (lambda t: t.replace("villaged-audit/example.org\n3", "villaged audit\n3"), "origin"),
        (lambda t: t + "\u2014 x !!!\n", "is not base64 of a key id"),
        (lambda t: t.replace("\n3\n", "\n\x07\n"), "control character U+0007"),
        (lambda t: t + "x" * 3000, "longer than 2048"),
    ],
)
def test_malformed_checkpoints_are_refused(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    text, public_key = signed_text(tmp_path / "audit")
    assert verify_checkpoint(text, public_key).size == 3
    with pytest.raises(AuditVerifyError) as caught:
        verify_checkpoint(edit(text), public_key)
    assert message in str(caught.value)


def test_other_signatures_are_ignored(tmp_path: Path) -> None:
    """A signed note may carry cosignatures; only the audit key's one counts."""
    text, public_key = signed_text(tmp_path / "audit")
    cosigned = text + "\u2014 witness.example " + base64.b64encode(bytes(68)).decode() + "\n"
    assert verify_checkpoint(cosigned, public_key).size == 3


# --------------------------------------------------------------------------- verify


def test_verify_a_clean_log(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    checkpoints = fill(directory, 10, checkpoint_every=4)
    report = verify_log(directory, retained_checkpoint=checkpoints[0], origin=ORIGIN)
    with AuditLog.open(directory, ORIGIN) as log:
        assert (report.size, report.root_hash) == (log.size, log.root_hash)
    assert report.checkpoints_checked == 2
    assert report.latest_checkpoint is not None
    assert report.latest_checkpoint.size == 8
    assert report.retained is not None
    assert report.retained.size == 4
    assert report.notes == ("records 8..9 are not covered by a signed checkpoint yet",)
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith(f"audit log {directory}: 10 records, root ")
    assert (
        "2 signed checkpoints match it (newest: 8 records at 2026-11-29T18:30:07.000Z)" in summary
    )
    assert "consistent with the retained checkpoint (4 records at" in summary


def test_verify_an_empty_or_missing_log(tmp_path: Path) -> None:
    with pytest.raises(AuditVerifyError, match="no audit log"):
        verify_log(tmp_path / "nothing")
    directory = tmp_path / "audit"
    AuditLog.open(directory, ORIGIN).close()
    report = verify_log(directory)
    assert (report.size, report.root_hash, report.notes) == (0, EMPTY_ROOT, ())
    assert "no signed checkpoints stored" in report.summary()
    fill(directory, 2)
    assert verify_log(directory).notes == (
        "no signed checkpoints are stored: only the record chain was checked",
    )
    [checkpoint] = fill(directory, 1, checkpoint_every=3)
    (directory / "audit.jsonl").unlink()
    with pytest.raises(AuditVerifyError, match="the log is gone"):
        verify_log(directory, retained_checkpoint=checkpoint)


def tampered(directory: Path, count: int = 8, every: int = 2) -> list[str]:
    return fill(directory, count, checkpoint_every=every)


def verify_error(directory: Path, **kwargs: Any) -> str:
    with pytest.raises(AuditVerifyError) as caught:
        verify_log(directory, **kwargs)
    return str(caught.value)


def test_a_modified_record_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory)
    lines = log_lines(directory)
    lines[2] = lines[2].replace(b'"operator":"ops1"', b'"operator":"ops2"')
    write_lines(directory, lines)
    message = verify_error(directory)
    assert "audit.jsonl: line 4: " in message
    assert "record 2 (line 3) was changed" in message
    # With the chain recomputed only a signed checkpoint can tell, and it does.
    write_lines(directory, rechained(lines))
    message = verify_error(directory)
    assert "does not match" in message
    assert "checkpoints line 2 (signed 2026-11-29T18:30:03.000Z, 4 records)" in message
    assert "one of records 2..3 (lines 3..4) was changed, removed or reordered" in message


def test_a_modified_last_record_is_caught_by_the_checkpoint_covering_it(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory)
    lines = log_lines(directory)
    lines[7] = lines[7].replace(b'"result":"ok"', b'"result":"refused"')
    write_lines(directory, lines)
    message = verify_error(directory)
    assert "checkpoints line 4 (signed 2026-11-29T18:30:07.000Z, 8 records)" in message
    assert "one of records 6..7 (lines 7..8)" in message


def test_a_deleted_record_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory)
    lines = log_lines(directory)
    del lines[3]
    write_lines(directory, lines)
    message = verify_error(directory)
    assert "line 4: holds record 4 where record 3 was expected" in message
    write_lines(directory, rechained(lines))
    message = verify_error(directory)
    assert "checkpoints line 2 " in message
    assert "one of records 2..3" in message


def test_reordered_records_are_detected(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory)
    lines = log_lines(directory)
    lines[4], lines[5] = lines[5], lines[4]
    write_lines(directory, lines)
    message = verify_error(directory)
    assert "line 5: holds record 5 where record 4 was expected" in message
    assert "reordered" in message
    write_lines(directory, rechained(lines))
    message = verify_error(directory)
    assert "checkpoints line 3 " in message
    assert "one of records 4..5 (lines 5..6)" in message


def test_a_truncated_log_is_detected_by_the_stored_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory)
    write_lines(directory, log_lines(directory)[:5])
    message = verify_error(directory)
    assert "the log is truncated" in message
    assert "checkpoints line 3 (signed 2026-11-29T18:30:05.000Z) covers 6 records" in message
    assert "holds only 5" in message


def test_a_truncated_log_is_detected_by_a_retained_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    retained = tampered(directory)[-1]  # exported off the host: 8 records
    write_lines(directory, log_lines(directory)[:5])
    (directory / "checkpoints").unlink()  # what could betray the cut is gone too
    assert verify_log(directory).size == 5  # the chain alone cannot know
    message = verify_error(directory, retained_checkpoint=retained)
    assert "the log is truncated: the retained checkpoint" in message
    assert "covers 8 records" in message
    assert "holds only 5" in message


def test_a_rewritten_log_is_inconsistent_with_a_retained_checkpoint(tmp_path: Path) -> None:
    """Someone with the signing key cuts the log, writes new records and signs new checkpoints:
    everything on the host checks out; the checkpoint kept elsewhere does not."""
    directory = tmp_path / "audit"
    retained = tampered(directory)[1]  # 4 records
    write_lines(directory, log_lines(directory)[:3])
    (directory / "checkpoints").unlink()
    fill(directory, 5, checkpoint_every=4, operator="ops2")
    assert verify_log(directory).size == 8
    message = verify_error(directory, retained_checkpoint=retained)
    assert "is not consistent with the retained checkpoint" in message
    assert "its first 4 records hash to" in message


def test_a_forged_checkpoint_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    checkpoints = tampered(directory, 4, 2)
    with AuditLog.open(directory, ORIGIN) as log:
        size, root = log.size, log.root_hash
    forged = audit._sign_checkpoint(
        Ed25519PrivateKey.generate(), ORIGIN, size, root, "2026-11-29T19:00:00.000Z"
    )
    message = verify_error(directory, retained_checkpoint=forged)
    assert "the retained checkpoint: not signed by the audit signing key" in message
    with (directory / "checkpoints").open("a") as file:
        file.write(json.dumps(forged, ensure_ascii=False) + "\n")
    message = verify_error(directory)
    assert "checkpoints: line 3: not signed by the audit signing key" in message
    # An altered root hash breaks the real key's signature.
    real = checkpoints[-1]
    other_root = base64.b64encode(sha256(b"other")).decode()
    altered_text = real.replace(base64.b64encode(root).decode(), other_root)
    assert altered_text != real
    message = verify_error(directory, retained_checkpoint=altered_text)
    assert "the retained checkpoint: the signature does not verify" in message
    lines = (directory / "checkpoints").read_text().splitlines()
    lines[2] = json.dumps(altered_text, ensure_ascii=False)
    (directory / "checkpoints").write_text("\n".join(lines) + "\n")
    assert "checkpoints: line 3: the signature does not verify" in verify_error(directory)


def test_a_validly_signed_checkpoint_that_does_not_match_the_log_is_detected(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "audit"
    tampered(directory, 4, 2)
    key = audit._read_private_key(directory / "audit-signing.key")
    stray = audit._sign_checkpoint(key, ORIGIN, 3, sha256(b"x"), "2026-11-29T19:00:00.000Z")
    with (directory / "checkpoints").open("a") as file:
        file.write(json.dumps(stray, ensure_ascii=False) + "\n")
    message = verify_error(directory)
    assert "checkpoints line 3 (signed 2026-11-29T19:00:00.000Z, 3 records)" in message
    assert "one of records 2..2 (lines 3..3)" in message


def test_a_replaced_key_pair_is_caught_by_a_public_key_kept_elsewhere(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory, 4, 2)
    kept = tmp_path / "kept.pub"
    shutil.copy(directory / "audit-signing.pub", kept)
    assert verify_log(directory, public_key_file=kept).checkpoints_checked == 2
    # Replace the key pair, rewrite the log and sign it all again.
    lines = log_lines(directory)
    for name in ("audit-signing.key", "audit-signing.pub", "checkpoints"):
        (directory / name).unlink()
    write_lines(directory, rechained(lines[:1] + lines[2:]))
    with AuditLog.open(directory, ORIGIN) as log:
        log.checkpoint()
    assert verify_log(directory).size == 3
    message = verify_error(directory, public_key_file=kept)
    assert "checkpoints: line 1: not signed by the audit signing key" in message


def test_verify_checks_origins_and_key_files(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    tampered(directory, 2, 2)
    message = verify_error(directory, origin="villaged-audit/example.net")
    assert "is for 'villaged-audit/example.org', not 'villaged-audit/example.net'" in message
    missing = tmp_path / "none.pub"
    assert "cannot read the public key" in verify_error(directory, public_key_file=missing)
    bad = tmp_path / "bad.pub"
    bad.write_text("hello")
    assert "is not a PEM public key" in verify_error(directory, public_key_file=bad)
    (directory / "audit-signing.pub").unlink()
    assert "no public key to check" in verify_error(directory)


# --------------------------------------------------------------------------- villaged audit


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(""))
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    from villaged.ops.provision import init_dev

    init_dev(tmp_path / "n", domain="example.org", now=T0)
    config = tmp_path / "n" / "villaged.toml"
    code, _, err = run(["user", "list", "-c", str(config)], capsys)  # creates the data directory
    assert code == 0, err
    return config


def node_audit_dir(config: Path) -> Path:
    return config.parent / "data" / "audit"


def test_cli_checkpoint_verify_and_export(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["-c", str(node)]
    directory = node_audit_dir(node)
    fill(directory, 3)
    code, text, err = run(["audit", "checkpoint", *c], capsys)
    assert code == 0, err
    assert text.startswith(f"{ORIGIN}\n3\n")
    assert run(["audit", "checkpoint", *c], capsys)[1] == text  # the stored one, not a new one
    assert len((directory / "checkpoints").read_bytes().splitlines()) == 1
    retained = tmp_path / "retained.txt"
    retained.write_text(text)

    code, out, err = run(["audit", "verify", *c, "--checkpoint", str(retained)], capsys)
    assert code == 0, err
    assert out.count("\n") == 1
    assert "3 records" in out
    assert "consistent with the retained checkpoint (3 records" in out

    code, out, _ = run(["audit", "export", *c], capsys)
    assert code == 0
    exported = [json.loads(line) for line in out.splitlines()]
    assert [r["i"] for r in exported] == [0, 1, 2]
    assert out.encode().splitlines() == log_lines(directory)
    code, out, _ = run(["audit", "export", *c, "--since", "2026-11-29T18:30:01Z"], capsys)
    assert [json.loads(line)["i"] for line in out.splitlines()] == [1, 2]
    code, out, _ = run(["audit", "export", *c, "--since", "2026-11-30"], capsys)
    assert (code, out) == (0, "")
    code, _, err = run(["audit", "export", *c, "--since", "yesterday"], capsys)
    assert code == 1
    assert err.startswith("villaged: error: --since 'yesterday' is not a time")

    lines = log_lines(directory)
    lines[1] = lines[1].replace(b"ops1", b"ops9")
    write_lines(directory, rechained(lines))
    code, out, err = run(["audit", "verify", *c], capsys)
    assert code == 1
    assert err.startswith("villaged: error: ")
    assert err.count("\n") == 1
    assert "checkpoints line 1" in err
    code, _, err = run(["audit", "verify", *c, "--checkpoint", str(retained)], capsys)
    assert code == 1
    assert "checkpoints line 1" in err or "retained" in err


def test_cli_checkpoint_beside_a_running_node(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["-c", str(node)]
    directory = node_audit_dir(node)
    with AuditLog.open(directory, ORIGIN) as log:  # the node holds the log open
        for n in range(4):
            log.append(record(n))
        code, text, err = run(["audit", "checkpoint", *c], capsys)
        assert code == 0, err
        assert text.startswith(f"{ORIGIN}\n4\n{base64.b64encode(log.root_hash).decode()}\n")
        log.append(record(4))
        later = log.checkpoint()
        code, out, err = run(["audit", "verify", *c], capsys)
        assert code == 0, err
        assert "2 signed checkpoints match it (newest: 5 records" in out
        assert run(["audit", "checkpoint", *c], capsys)[1] == later


def test_cli_errors_are_one_line(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["-c", str(node)]
    for argv in (["audit", "verify", *c], ["audit", "checkpoint", *c], ["audit", "export", *c]):
        code, _, err = run(argv, capsys)
        assert code == 1
        assert err.startswith("villaged: error: no audit log")
        assert err.count("\n") == 1
    fill(node_audit_dir(node), 2, checkpoint_every=2)
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    code, _, err = run(["audit", "verify", *c, "--public-key", str(other)], capsys)
    assert code == 1
    assert "not signed by the audit signing key" in err
    code, _, err = run(["audit", "verify", *c, "--checkpoint", str(tmp_path / "no.txt")], capsys)
    assert code == 1
    assert "cannot read the checkpoint" in err
    checkpoints = node_audit_dir(node) / "checkpoints"
    checkpoints.write_text(checkpoints.read_text().replace("\\n2\\n", "\\n1\\n"))
    code, _, err = run(["audit", "checkpoint", *c], capsys)
    assert code == 1
    assert "the newest stored checkpoint does not verify: the signature does not verify" in err
    code, out, _ = run(["audit", "--help"], capsys)
    assert code == 0
    for action in ("verify", "checkpoint", "export"):
        assert action in out
