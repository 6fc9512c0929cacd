"""Encryption at rest: keyset files, the per-user key vault, sealing, shredding, rotation."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import msgpack
import pytest

from villaged.storage import crypto
from villaged.storage.crypto import (
    KEYSET_FORMAT,
    MAX_KEY_FILE_BYTES,
    MAX_KEY_ID,
    VAULT_FORMAT,
    DataKey,
    Keyset,
    UserKeyVault,
    new_record_id,
    seal,
    unseal,
)
from villaged.storage.errors import (
    DecryptError,
    KeyFileError,
    KeyManagementError,
    ShreddedError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

NOW = datetime(2026, 11, 29, 15, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=90)
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"


@pytest.fixture
def keyset() -> Keyset:
    return Keyset.generate(NOW)


@pytest.fixture
def vault_dir(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def vault(vault_dir: Path, keyset: Keyset) -> UserKeyVault:
    return UserKeyVault.open(vault_dir, keyset)


@pytest.fixture
def first_key_id_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new user's first DEK gets id 1 (normally a random start), so ids can collide."""
    monkeypatch.setattr(crypto, "_first_data_key_id", lambda: 1)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def vault_file(directory: Path, user: str) -> Path:
    return directory / hashlib.sha256(user.encode()).hexdigest()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, doc: Any, mode: int = 0o600) -> None:
    path.write_text(json.dumps(doc))
    path.chmod(mode)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def through_msgpack(envelope: dict[str, Any]) -> Any:
    """What a reader of the log gets back: the envelope after a msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(envelope, use_bin_type=True), raw=False)


def keyset_doc(**changes: Any) -> dict[str, Any]:
    material = base64.b64encode(bytes(range(32))).decode()
    doc: dict[str, Any] = {
        "format": KEYSET_FORMAT,
        "primary": 1,
        "keys": [{"id": 1, "created": "2026-11-29T15:00:00Z", "material": material}],
    }
    doc.update(changes)
    return doc


def with_key(**changes: Any) -> dict[str, Any]:
    doc = keyset_doc()
    doc["keys"][0].update(changes)
    return doc


# --------------------------------------------------------------------------- sealing


def test_seal_round_trip_through_msgpack(vault: UserKeyVault) -> None:
    record_id = new_record_id()
    envelope = seal(vault, "message", ALICE, record_id, b"hello, village")

    assert set(envelope) == {"k", "n", "c"}
    assert envelope["k"] == vault.data_key(ALICE).key_id
    assert 1 <= envelope["k"] <= 2**31
    assert isinstance(envelope["n"], bytes)
    assert len(envelope["n"]) == 12
    assert b"hello" not in envelope["c"]
    restored = through_msgpack(envelope)
    assert unseal(vault, "message", ALICE, record_id, restored) == b"hello, village"


def test_a_cached_key_seals_on_the_spot_and_still_binds_the_associated_data(
    vault: UserKeyVault,
) -> None:
    assert vault.cached_data_key(ALICE) is None  # not made yet: that needs a file
    key = vault.data_key(ALICE)
    cached = vault.cached_data_key(ALICE)
    assert cached is key
    envelope = crypto.seal_with(cached, "message", "r1", b"quick")
    assert unseal(vault, "message", ALICE, "r1", envelope) == b"quick"
    assert envelope["k"] == key.key_id
    # Bound to the key's user, the record type and the record id, exactly as seal() is.
    vault.data_key(BOB)
    with pytest.raises(ShreddedError):  # Bob has no key of that id
        unseal(vault, "message", BOB, "r1", envelope)
    for rtype, record_id in (("roster", "r1"), ("message", "r2")):
        with pytest.raises(DecryptError):
            unseal(vault, rtype, ALICE, record_id, envelope)


def test_the_cached_key_is_never_waited_for(vault: UserKeyVault) -> None:
    vault.data_key(ALICE)
    with vault._lock:  # a worker thread is busy writing some vault file
        assert vault.cached_data_key(ALICE) is None
    assert vault.cached_data_key(ALICE) is not None
    vault.destroy(ALICE)
    assert vault.cached_data_key(ALICE) is None


def test_seal_empty_plaintext(vault: UserKeyVault) -> None:
    envelope = seal(vault, "roster", ALICE, "r1", b"")
    assert unseal(vault, "roster", ALICE, "r1", envelope) == b""


def test_each_seal_uses_a_fresh_nonce(vault: UserKeyVault) -> None:
    first = seal(vault, "message", ALICE, "r1", b"same")
    second = seal(vault, "message", ALICE, "r1", b"same")
    assert first["n"] != second["n"]
    assert first["c"] != second["c"]


def test_another_vault_on_the_same_directory_opens_what_this_one_sealed(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    envelope = seal(vault, "message", ALICE, "r1", b"durable")
    reopened = UserKeyVault.open(vault_dir, keyset)
    assert unseal(reopened, "message", ALICE, "r1", envelope) == b"durable"
    assert reopened.data_key(ALICE).key_id == envelope["k"]


@pytest.mark.usefixtures("first_key_id_1")
@pytest.mark.parametrize(
    ("record_type", "user", "record_id"),
    [
        ("message", BOB, "r1"),  # moved to another user (who has a DEK of the same id)
        ("message", ALICE, "r2"),  # moved to another record
        ("roster", ALICE, "r1"),  # moved to another record type
    ],
)
def test_ciphertext_moved_elsewhere_fails(
    vault: UserKeyVault, record_type: str, user: str, record_id: str
) -> None:
    seal(vault, "message", BOB, "other", b"bob has a data key 1 too")
    envelope = seal(vault, "message", ALICE, "r1", b"for alice's r1 only")
    assert envelope["k"] == vault.data_key(BOB).key_id == 1

    with pytest.raises(DecryptError, match="does not authenticate"):
        unseal(vault, record_type, user, record_id, envelope)


@pytest.mark.parametrize("field", ["n", "c"])
def test_tampered_envelope_fails(vault: UserKeyVault, field: str) -> None:
    envelope = seal(vault, "message", ALICE, "r1", b"integrity")
    damaged = bytearray(envelope[field])
    damaged[-1] ^= 0x01
    envelope[field] = bytes(damaged)

    with pytest.raises(DecryptError, match=f"does not authenticate under data key {envelope['k']}"):
        unseal(vault, "message", ALICE, "r1", envelope)


def test_ciphertext_moved_to_another_user_usually_names_a_key_they_lack(
    vault: UserKeyVault,
) -> None:
    seal(vault, "message", BOB, "other", b"bob has his own DEK, with another id")
    envelope = seal(vault, "message", ALICE, "r1", b"for alice's r1 only")
    assert vault.data_key(BOB).key_id != envelope["k"]  # odds of equal ids: 2**-31
    with pytest.raises(ShreddedError, match=f"user {BOB} has no data key {envelope['k']}"):
        unseal(vault, "message", BOB, "r1", envelope)


def test_envelope_naming_a_key_the_user_never_had_is_shredded(vault: UserKeyVault) -> None:
    envelope = seal(vault, "message", ALICE, "r1", b"x")
    envelope["k"] += 1
    with pytest.raises(ShreddedError, match=f"user {ALICE} has no data key {envelope['k']}"):
        unseal(vault, "message", ALICE, "r1", envelope)


def _good_envelope() -> dict[str, Any]:
    return {"k": 1, "n": bytes(12), "c": bytes(16)}


@pytest.mark.parametrize(
    ("envelope", "complaint"),
    [
        (b"not a map", "not a map with exactly the fields"),
        ({"k": 1, "n": bytes(12)}, "not a map with exactly the fields"),
        ({**_good_envelope(), "x": 1}, "not a map with exactly the fields"),
        ({**_good_envelope(), "k": 0}, "'k' is not a data key id"),
        ({**_good_envelope(), "k": True}, "'k' is not a data key id"),
        ({**_good_envelope(), "k": "1"}, "'k' is not a data key id"),
        ({**_good_envelope(), "n": bytes(11)}, "'n' is not a 12-byte nonce"),
        ({**_good_envelope(), "n": "0" * 12}, "'n' is not a 12-byte nonce"),
        ({**_good_envelope(), "c": bytes(15)}, "'c' is shorter than a 16-byte tag"),
        ({**_good_envelope(), "c": None}, "'c' is shorter than a 16-byte tag"),
    ],
)
def test_malformed_envelope_is_a_decrypt_error(
    vault: UserKeyVault, envelope: object, complaint: str
) -> None:
    seal(vault, "message", ALICE, "r1", b"x")
    with pytest.raises(DecryptError, match=complaint) as caught:
        unseal(vault, "message", ALICE, "r1", envelope)
    assert "sealed message record r1 of alice@example.org" in str(caught.value)


@pytest.mark.parametrize(
    ("record_type", "user", "record_id", "complaint"),
    [
        ("", ALICE, "r1", "record type must be a non-empty string"),
        ("message", ALICE, "", "record id must be a non-empty string"),
        ("message", "", "r1", "expected a bare JID"),
        ("message", "alice@example.org/phone", "r1", "expected a bare JID"),
    ],
)
def test_bad_labels_are_programming_errors(
    vault: UserKeyVault, record_type: str, user: str, record_id: str, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        seal(vault, record_type, user, record_id, b"x")
    with pytest.raises(ValueError, match=complaint):
        unseal(vault, record_type, user, record_id, _good_envelope())


def test_new_record_id_is_128_random_bits() -> None:
    ids = {new_record_id() for _ in range(100)}
    assert len(ids) == 100
    for record_id in ids:
        assert len(base64.urlsafe_b64decode(record_id + "==")) == 16


# --------------------------------------------------------------------------- shredding


def test_destroy_shreds_every_copy_of_the_ciphertext(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset, tmp_path: Path
) -> None:
    sealed = {f"r{n}": seal(vault, "message", ALICE, f"r{n}", b"secret %d" % n) for n in range(3)}
    bobs = seal(vault, "message", BOB, "b1", b"bob stays")
    # The log, its old segments and backups keep copies of the ciphertext.
    copies = {rid: msgpack.packb(env, use_bin_type=True) for rid, env in sealed.items()}

    assert vault.destroy(ALICE) is True

    assert not vault_file(vault_dir, ALICE).exists()
    assert vault.has_user(ALICE) is False
    assert vault.users() == [BOB]
    after = tmp_path / "vault-copy-after-destroy"
    shutil.copytree(vault_dir, after)
    for opener in (
        vault,
        UserKeyVault.open(vault_dir, keyset),
        UserKeyVault.open(after, keyset),
    ):
        for rid, packed in copies.items():
            with pytest.raises(ShreddedError, match=f"user {ALICE} has no data key "):
                unseal(opener, "message", ALICE, rid, msgpack.unpackb(packed))
        assert unseal(opener, "message", BOB, "b1", bobs) == b"bob stays"
    # Nothing of alice's is left in the directory, not even a temporary.
    assert sorted(p.name for p in vault_dir.iterdir()) == [vault_file(vault_dir, BOB).name]


def test_vault_copy_made_before_destroy_still_opens_so_vault_backups_must_expire(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset, tmp_path: Path
) -> None:
    envelope = seal(vault, "message", ALICE, "r1", b"in an old vault backup")
    before = tmp_path / "vault-copy-before-destroy"
    shutil.copytree(vault_dir, before)
    vault.destroy(ALICE)

    # Shredding is only as complete as the retention of vault copies (and of the keyset).
    old_backup = UserKeyVault.open(before, keyset)
    assert unseal(old_backup, "message", ALICE, "r1", envelope) == b"in an old vault backup"


def test_destroy_of_unknown_user_reports_nothing_destroyed(vault: UserKeyVault) -> None:
    assert vault.destroy(ALICE) is False
    seal(vault, "message", ALICE, "r1", b"x")
    assert vault.destroy(ALICE) is True
    assert vault.destroy(ALICE) is False


def test_recreated_user_gets_a_fresh_key_and_old_records_stay_unreadable(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    old = seal(vault, "message", ALICE, "r1", b"before deletion")
    vault.destroy(ALICE)

    new = seal(vault, "message", ALICE, "r2", b"after re-registration")

    assert unseal(vault, "message", ALICE, "r2", new) == b"after re-registration"
    assert new["k"] != old["k"]  # a random start; odds of equal ids: 2**-31
    for opener in (vault, UserKeyVault.open(vault_dir, keyset)):
        # Replaying the log meets the old account's records: they must read as shredded.
        with pytest.raises(ShreddedError, match=f"user {ALICE} has no data key {old['k']}"):
            unseal(opener, "message", ALICE, "r1", old)


@pytest.mark.usefixtures("first_key_id_1")
def test_recreated_user_whose_new_key_reuses_the_id_still_cannot_read_old_records(
    vault: UserKeyVault,
) -> None:
    old = seal(vault, "message", ALICE, "r1", b"before deletion")
    vault.destroy(ALICE)
    new = seal(vault, "message", ALICE, "r2", b"after re-registration")

    assert new["k"] == old["k"] == 1
    with pytest.raises(DecryptError, match="does not authenticate under data key 1"):
        unseal(vault, "message", ALICE, "r1", old)


def test_get_for_user_without_vault_file_is_shredded(vault: UserKeyVault) -> None:
    with pytest.raises(ShreddedError, match=f"user {BOB} has no data key 1"):
        vault.get(BOB, 1)
    assert vault.has_user(BOB) is False
    assert not any(vault.directory.iterdir())


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_records_open_and_wraps_new_keys_under_new_primary(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    before = seal(vault, "message", ALICE, "r1", b"sealed before rotation")
    rotated = keyset.rotated(LATER)
    assert (rotated.primary_id, rotated.key_ids) == (2, (1, 2))
    assert (keyset.primary_id, keyset.key_ids) == (1, (1,))  # the original is unchanged

    vault.replace_keyset(rotated)
    assert vault.keyset is rotated
    after = seal(vault, "message", CAROL, "c1", b"sealed after rotation")

    assert read_json(vault_file(vault_dir, ALICE))["keys"][0]["kek"] == 1
    assert read_json(vault_file(vault_dir, CAROL))["keys"][0]["kek"] == 2
    fresh = UserKeyVault.open(vault_dir, rotated)
    assert unseal(fresh, "message", ALICE, "r1", before) == b"sealed before rotation"
    assert unseal(fresh, "message", CAROL, "c1", after) == b"sealed after rotation"


@pytest.mark.parametrize("rewrap_in_a_fresh_vault", [False, True])
def test_rewrap_all_moves_every_key_to_the_new_primary(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset, rewrap_in_a_fresh_vault: bool
) -> None:
    envelopes = {user: seal(vault, "message", user, "r1", user.encode()) for user in (ALICE, BOB)}
    rotated = keyset.rotated(LATER)
    vault.replace_keyset(rotated)
    envelopes[CAROL] = seal(vault, "message", CAROL, "r1", CAROL.encode())
    rewrapper = UserKeyVault.open(vault_dir, rotated) if rewrap_in_a_fresh_vault else vault

    assert rewrapper.rewrap_all() == 2  # alice and bob; carol is already under key 2
    assert rewrapper.rewrap_all() == 0

    for user in (ALICE, BOB, CAROL):
        assert [entry["kek"] for entry in read_json(vault_file(vault_dir, user))["keys"]] == [2]
    retired = rotated.without(1)
    assert retired.key_ids == (2,)
    for opener in (rewrapper, UserKeyVault.open(vault_dir, retired)):
        assert unseal(opener, "message", ALICE, "r1", envelopes[ALICE]) == ALICE.encode()
        assert unseal(opener, "message", BOB, "r1", envelopes[BOB]) == BOB.encode()
        assert unseal(opener, "message", CAROL, "r1", envelopes[CAROL]) == CAROL.encode()


def test_removing_the_old_kek_before_rewrap_fails_clearly(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    envelope = seal(vault, "message", ALICE, "r1", b"wrapped under key 1")
    retired_too_early = keyset.rotated(LATER).without(1)
    fresh = UserKeyVault.open(vault_dir, retired_too_early)

    with pytest.raises(KeyManagementError) as caught:
        unseal(fresh, "message", ALICE, "r1", envelope)
    assert type(caught.value) is KeyManagementError
    message = str(caught.value)
    assert str(vault_file(vault_dir, ALICE)) in message
    assert "keyset key 1, which the keyset does not hold (it holds 2)" in message
    with pytest.raises(KeyManagementError, match="keyset key 1"):
        fresh.rewrap_all()


def test_keyset_cannot_lose_its_primary_or_a_key_it_lacks(keyset: Keyset) -> None:
    with pytest.raises(KeyManagementError, match="key 1 is the keyset's primary"):
        keyset.without(1)
    with pytest.raises(KeyManagementError, match=r"keyset has no key 7 \(it holds 1, 2\)"):
        keyset.rotated(LATER).without(7)
    with pytest.raises(KeyManagementError, match="keyset has no key 3"):
        keyset.created(3)


def test_rotation_stops_at_the_largest_key_id(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    write_json(path, with_key(id=MAX_KEY_ID) | {"primary": MAX_KEY_ID})
    with pytest.raises(KeyManagementError, match="key ids are exhausted"):
        Keyset.load(path).rotated(LATER)


def test_times_must_carry_a_timezone(keyset: Keyset) -> None:
    naive = datetime(2026, 11, 29, 15, 0, 0)  # naive on purpose
    with pytest.raises(ValueError, match="timezone-aware"):
        Keyset.generate(naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        keyset.rotated(naive)


def test_created_times_are_kept_in_utc_to_the_second(keyset: Keyset) -> None:
    east = timezone(timedelta(hours=2))
    rotated = keyset.rotated(datetime(2027, 1, 1, 12, 30, 15, 999, tzinfo=east))
    assert keyset.created(1) == NOW
    assert rotated.created(2) == datetime(2027, 1, 1, 10, 30, 15, tzinfo=UTC)


# --------------------------------------------------------------------------- wrapping


def test_wrap_round_trip_and_binding(keyset: Keyset) -> None:
    blob = keyset.wrap(b"k" * 32, b"bound-to")
    assert blob[:5] == b"\x01\x00\x00\x00\x01"  # version 1, kek id 1
    assert keyset.unwrap(blob, b"bound-to") == b"k" * 32
    with pytest.raises(DecryptError, match="does not authenticate under keyset key 1"):
        keyset.unwrap(blob, b"bound-elsewhere")


def test_unwrap_rejects_blobs_that_are_not_wrapped_keys(keyset: Keyset) -> None:
    blob = keyset.wrap(b"k" * 32, b"ad")
    with pytest.raises(DecryptError, match=r"wrapped key \(32 bytes\) is not"):
        keyset.unwrap(blob[:32], b"ad")
    with pytest.raises(DecryptError, match="is not a villaged/1 wrapped key"):
        keyset.unwrap(b"\x02" + blob[1:], b"ad")


def test_unwrap_names_an_unknown_kek(keyset: Keyset) -> None:
    blob = keyset.wrap(b"k" * 32, b"ad")
    relabelled = blob[:1] + (9).to_bytes(4, "big") + blob[5:]
    with pytest.raises(KeyManagementError, match="names keyset key 9"):
        keyset.unwrap(relabelled, b"ad")


def test_the_kek_id_in_a_wrapped_blob_is_authenticated(keyset: Keyset) -> None:
    rotated = keyset.rotated(LATER)
    blob = keyset.wrap(b"k" * 32, b"ad")
    relabelled = blob[:1] + (2).to_bytes(4, "big") + blob[5:]
    with pytest.raises(DecryptError, match="under keyset key 2"):
        rotated.unwrap(relabelled, b"ad")


# --------------------------------------------------------------------------- keyset file


def test_keyset_save_and_load_round_trip(keyset: Keyset, tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    rotated = keyset.rotated(LATER)
    keyset.save(path)
    rotated.save(path)  # replaces the earlier file

    doc = read_json(path)
    assert doc["format"] == KEYSET_FORMAT
    assert doc["primary"] == 2
    assert [(k["id"], k["created"]) for k in doc["keys"]] == [
        (1, "2026-11-29T15:00:00Z"),
        (2, "2027-02-27T15:00:00Z"),
    ]
    assert all(len(base64.b64decode(k["material"])) == 32 for k in doc["keys"])
    loaded = Keyset.load(path)
    assert (loaded.primary_id, loaded.key_ids) == (2, (1, 2))
    assert loaded.created(2) == LATER
    assert loaded.unwrap(keyset.wrap(b"old", b"ad"), b"ad") == b"old"
    assert rotated.unwrap(loaded.wrap(b"new", b"ad"), b"ad") == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["keyset.json"]


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_key_files_are_private_whatever_the_umask(
    keyset: Keyset, tmp_path: Path, mask: int
) -> None:
    with umask(mask):
        keyset.save(tmp_path / "keyset.json")
        vault = UserKeyVault.open(tmp_path / "vault", keyset)
        vault.data_key(ALICE)
        vault.replace_keyset(keyset.rotated(LATER))
        vault.rewrap_all()

    assert mode_of(tmp_path / "keyset.json") == 0o600
    assert mode_of(tmp_path / "vault") == 0o700
    assert mode_of(vault_file(tmp_path / "vault", ALICE)) == 0o600
    assert Keyset.load(tmp_path / "keyset.json").primary_id == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_loading_a_keyset_open_to_others_is_refused(
    keyset: Keyset, tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "keyset.json"
    keyset.save(path)
    path.chmod(mode)

    with pytest.raises(KeyFileError) as caught:
        Keyset.load(path)
    assert str(caught.value) == (
        f"keyset file {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})"
    )
    assert caught.value.path == path


def test_a_read_only_keyset_such_as_a_systemd_credential_loads(
    keyset: Keyset, tmp_path: Path
) -> None:
    path = tmp_path / "keyset.json"
    keyset.save(path)
    path.chmod(0o400)
    assert Keyset.load(path).key_ids == (1,)


def test_loading_a_missing_keyset_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(KeyFileError, match=f"^keyset file {re.escape(str(path))} does not exist$"):
        Keyset.load(path)


def test_loading_a_keyset_that_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # must not block waiting for a writer
    with pytest.raises(KeyFileError, match=re.escape(f"keyset file {fifo} is not a regular file")):
        Keyset.load(fifo)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        Keyset.load(tmp_path)


def test_loading_a_keyset_under_a_file_names_the_problem(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        KeyFileError, match=re.escape(f"keyset file {blocker}/k cannot be opened: Not a")
    ):
        Keyset.load(blocker / "k")


def test_loading_an_oversized_keyset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_bytes(b" " * (MAX_KEY_FILE_BYTES + 1))
    path.chmod(0o600)
    with pytest.raises(
        KeyFileError, match=re.escape(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    ):
        Keyset.load(path)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"{not json", "not JSON (line 1 column 2: "),
        (b"\xff\xfe\xfd", "not JSON (not UTF-8, or nested too deeply)"),
        (b"[" * 100_000, "not JSON (not UTF-8, or nested too deeply)"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps(keyset_doc(format="villaged-keyset/2")).encode(), "format tag is not"),
        (json.dumps(keyset_doc(keys=[])).encode(), "'keys' is not a non-empty list"),
        (json.dumps(keyset_doc(keys={"id": 1})).encode(), "'keys' is not a non-empty list"),
        (json.dumps(keyset_doc(keys=[1])).encode(), "keys entry #1 is not an object"),
        (json.dumps(with_key(id=0)).encode(), "keys entry #1: 'id' is not an integer"),
        (json.dumps(with_key(id="1")).encode(), "keys entry #1: 'id' is not an integer"),
        (json.dumps(with_key(id=True)).encode(), "keys entry #1: 'id' is not an integer"),
        (json.dumps(with_key(id=MAX_KEY_ID + 1)).encode(), "'id' is not an integer"),
        (json.dumps(with_key(created=None)).encode(), "key 1: 'created' is not an ISO 8601"),
        (json.dumps(with_key(created="yesterday")).encode(), "key 1: 'created' is not"),
        (json.dumps(with_key(created="2026-11-29T15:00:00")).encode(), "key 1: 'created'"),
        (json.dumps(with_key(material=None)).encode(), "key 1: 'material' is not base64"),
        (json.dumps(with_key(material="not*base64")).encode(), "'material' is not base64"),
        (json.dumps(with_key(material="ä" * 44)).encode(), "'material' is not base64"),
        (json.dumps(keyset_doc(primary=2)).encode(), "'primary' is not one of the key ids (1)"),
        (json.dumps(keyset_doc(primary=None)).encode(), "'primary' is not one of the key ids"),
    ],
)
def test_malformed_keyset_files_are_refused_with_the_reason(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    path = tmp_path / "keyset.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        Keyset.load(path)
    assert str(caught.value).startswith(f"keyset file {path}: ")
    assert complaint in str(caught.value)


def test_duplicate_key_ids_are_refused(tmp_path: Path) -> None:
    doc = keyset_doc()
    doc["keys"].append(dict(doc["keys"][0]))
    path = tmp_path / "keyset.json"
    write_json(path, doc)
    with pytest.raises(KeyFileError, match="key id 1 appears more than once"):
        Keyset.load(path)


@pytest.mark.parametrize("length", [16, 31, 33])
def test_a_key_of_the_wrong_length_is_refused_without_showing_it(
    tmp_path: Path, length: int
) -> None:
    material = base64.b64encode(b"\x5a" * length).decode()
    path = tmp_path / "keyset.json"
    write_json(path, with_key(material=material))
    with pytest.raises(KeyFileError) as caught:
        Keyset.load(path)
    message = str(caught.value)
    assert f"key 1: 'material' is {length} bytes; AES-256 needs 32" in message
    assert material not in message


def test_keyset_offsets_are_normalised_to_utc(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    write_json(path, with_key(created="2026-11-29T16:00:00+01:00"))
    assert Keyset.load(path).created(1) == NOW


def test_saving_a_keyset_where_it_cannot_go(keyset: Keyset, tmp_path: Path) -> None:
    missing_parent = tmp_path / "missing" / "keyset.json"
    with pytest.raises(
        KeyFileError, match=re.escape(f"cannot write keyset file {missing_parent}: No such")
    ):
        keyset.save(missing_parent)

    occupied = tmp_path / "occupied"
    (occupied / "child").mkdir(parents=True)
    with pytest.raises(KeyFileError, match=re.escape(f"cannot write keyset file {occupied}: ")):
        keyset.save(occupied)
    # The temporary is cleaned up: no key material is left lying around.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


# --------------------------------------------------------------------------- vault files


@pytest.mark.usefixtures("first_key_id_1")
def test_vault_file_format(vault: UserKeyVault, vault_dir: Path, keyset: Keyset) -> None:
    key = vault.data_key(ALICE)

    path = vault_file(vault_dir, ALICE)
    doc = read_json(path)
    assert doc["format"] == VAULT_FORMAT
    assert doc["user"] == ALICE
    [entry] = doc["keys"]
    assert (entry["id"], entry["kek"]) == (1, 1)
    wrapped = base64.b64decode(entry["wrapped"])
    assert len(wrapped) == 5 + 12 + 32 + 16
    assert keyset.unwrap(wrapped, msgpack.packb(["villaged-dek/1", ALICE, 1]))
    assert key.user == ALICE
    assert key.key_id == 1
    assert vault.data_key(ALICE) is key  # cached, not unwrapped again


@pytest.mark.usefixtures("first_key_id_1")
def test_a_wrapped_key_copied_into_another_users_file_fails(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    seal(vault, "message", ALICE, "r1", b"alice")
    bobs = seal(vault, "message", BOB, "r1", b"bob")
    alice_doc = read_json(vault_file(vault_dir, ALICE))
    bob_path = vault_file(vault_dir, BOB)
    bob_doc = read_json(bob_path)
    bob_doc["keys"] = alice_doc["keys"]
    write_json(bob_path, bob_doc)

    fresh = UserKeyVault.open(vault_dir, keyset)
    with pytest.raises(DecryptError) as caught:
        unseal(fresh, "message", BOB, "r1", bobs)
    assert f"key vault file {bob_path}, data key 1: wrapped key does not authenticate" in str(
        caught.value
    )


def test_a_wrapped_key_copied_under_another_id_fails(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    seal(vault, "message", ALICE, "r1", b"alice")
    bobs = seal(vault, "message", BOB, "r1", b"bob")
    bob_path = vault_file(vault_dir, BOB)
    bob_doc = read_json(bob_path)
    bob_doc["keys"][0]["wrapped"] = read_json(vault_file(vault_dir, ALICE))["keys"][0]["wrapped"]
    write_json(bob_path, bob_doc)

    with pytest.raises(DecryptError, match=f"data key {bobs['k']}: wrapped key does not auth"):
        unseal(UserKeyVault.open(vault_dir, keyset), "message", BOB, "r1", bobs)


@pytest.mark.usefixtures("first_key_id_1")
def test_a_whole_vault_file_copied_to_another_user_is_refused(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    vault.data_key(ALICE)
    bob_path = vault_file(vault_dir, BOB)
    shutil.copy(vault_file(vault_dir, ALICE), bob_path)

    fresh = UserKeyVault.open(vault_dir, keyset)
    with pytest.raises(KeyFileError, match="'user' is not the user this file is named for"):
        fresh.get(BOB, 1)
    with pytest.raises(KeyFileError, match="'user' is not the user this file is named for"):
        fresh.users()


def _break_entry(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        doc["keys"][0].update(changes)

    return apply


def _short_wrapped(doc: dict[str, Any]) -> None:
    doc["keys"][0]["wrapped"] = base64.b64encode(b"\x01" * 20).decode()


def _duplicate_entry(doc: dict[str, Any]) -> None:
    doc["keys"].append(dict(doc["keys"][0]))


@pytest.mark.usefixtures("first_key_id_1")
@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda doc: doc.update(format="villaged-keyvault/0"), "format tag is not"),
        (lambda doc: doc.update(user=None), "'user' is not the user this file is named for"),
        (lambda doc: doc.update(keys=[]), "'keys' is not a non-empty list"),
        (lambda doc: doc.update(keys=["x"]), "keys entry #1 is not an object"),
        (_break_entry(id=0), "keys entry #1: 'id' is not an integer"),
        (_duplicate_entry, "data key id 1 appears more than once"),
        (_break_entry(wrapped=17), "data key 1: 'wrapped' is not base64"),
        (_short_wrapped, "data key 1: 'wrapped' is not a key wrapped under its 'kek'"),
        (_break_entry(kek=2), "data key 1: 'wrapped' is not a key wrapped under its 'kek'"),
        (_break_entry(kek=None), "data key 1: 'wrapped' is not a key wrapped under its 'kek'"),
        (lambda doc: doc.clear(), "format tag is not"),
    ],
)
def test_malformed_vault_files_are_refused_with_the_reason(
    vault: UserKeyVault,
    vault_dir: Path,
    keyset: Keyset,
    damage: Callable[[dict[str, Any]], object],
    complaint: str,
) -> None:
    vault.data_key(ALICE)
    path = vault_file(vault_dir, ALICE)
    doc = read_json(path)
    damage(doc)
    write_json(path, doc)

    with pytest.raises(KeyFileError) as caught:
        UserKeyVault.open(vault_dir, keyset).get(ALICE, 1)
    assert str(caught.value).startswith(f"key vault file {path}: ")
    assert complaint in str(caught.value)


def test_a_vault_file_that_is_not_json_is_refused(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    vault.data_key(ALICE)
    path = vault_file(vault_dir, ALICE)
    path.write_bytes(b"\x00\x01")
    with pytest.raises(KeyFileError, match="not JSON"):
        UserKeyVault.open(vault_dir, keyset).data_key(ALICE)


def test_a_vault_file_open_to_others_is_refused(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    vault.data_key(ALICE)
    path = vault_file(vault_dir, ALICE)
    path.chmod(0o644)
    with pytest.raises(
        KeyFileError, match=re.escape(f"has mode 0644; it must be 0600 (chmod 600 {path})")
    ):
        UserKeyVault.open(vault_dir, keyset).data_key(ALICE)


def test_vault_directory_is_created_private(tmp_path: Path, keyset: Keyset) -> None:
    directory = tmp_path / "vault"
    with umask(0o000):
        vault = UserKeyVault.open(directory, keyset)
    assert vault.directory == directory
    assert vault.keyset is keyset
    assert mode_of(directory) == 0o700
    assert vault.users() == []


def test_an_existing_vault_directory_open_to_others_is_refused(
    tmp_path: Path, keyset: Keyset
) -> None:
    directory = tmp_path / "vault"
    directory.mkdir()
    directory.chmod(0o755)
    with pytest.raises(
        KeyFileError,
        match=re.escape(
            f"key vault directory {directory} has mode 0755; it must be 0700"
            f" (chmod 700 {directory})"
        ),
    ):
        UserKeyVault.open(directory, keyset)


def test_a_vault_path_that_is_not_a_directory_is_refused(tmp_path: Path, keyset: Keyset) -> None:
    path = tmp_path / "vault"
    path.write_text("")
    with pytest.raises(KeyFileError, match=re.escape(f"key vault path {path} is not a directory")):
        UserKeyVault.open(path, keyset)
    with pytest.raises(KeyFileError, match=r"cannot create key vault directory .*: No such file"):
        UserKeyVault.open(tmp_path / "missing" / "vault", keyset)


def test_opening_removes_temporaries_left_by_a_crash(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    vault.data_key(ALICE)
    name = vault_file(vault_dir, BOB).name
    leftover = vault_dir / f".{name}.tmp-0123456789abcdef"
    leftover.write_text("a wrapped key that destroy() would not know about")
    (vault_dir / ".hidden-but-not-ours").write_text("")

    UserKeyVault.open(vault_dir, keyset)

    assert not leftover.exists()
    assert (vault_dir / ".hidden-but-not-ours").exists()


def test_users_lists_vault_files_only(vault: UserKeyVault, vault_dir: Path) -> None:
    for user in (CAROL, ALICE, BOB):
        vault.data_key(user)
    (vault_dir / "README").write_text("not a vault file")
    (vault_dir / ("G" * 64)).write_text("not hex")
    assert vault.users() == [ALICE, BOB, CAROL]


def test_has_user(vault: UserKeyVault, vault_dir: Path, keyset: Keyset) -> None:
    assert vault.has_user(ALICE) is False
    vault.data_key(ALICE)
    assert vault.has_user(ALICE) is True
    assert UserKeyVault.open(vault_dir, keyset).has_user(ALICE) is True


def test_concurrent_first_seals_share_one_data_key(
    vault: UserKeyVault, vault_dir: Path, keyset: Keyset
) -> None:
    # Async callers reach the vault through worker threads; a second DEK made by a race
    # would silently orphan every record sealed under the first.
    start = threading.Barrier(8)
    envelopes: dict[str, dict[str, Any]] = {}

    def seal_one(record_id: str) -> None:
        start.wait()
        envelopes[record_id] = seal(vault, "message", ALICE, record_id, record_id.encode())

    threads = [threading.Thread(target=seal_one, args=(f"r{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    fresh = UserKeyVault.open(vault_dir, keyset)
    assert len(envelopes) == 8
    for record_id, envelope in envelopes.items():
        assert unseal(fresh, "message", ALICE, record_id, envelope) == record_id.encode()


# --------------------------------------------------------------------------- secrecy


def test_reprs_show_no_key_material(tmp_path: Path, keyset: Keyset) -> None:
    material = bytes(range(100, 132))
    key = DataKey(ALICE, 3, material)
    path = tmp_path / "keyset.json"
    keyset.rotated(LATER).save(path)
    loaded = Keyset.load(path)
    kek_texts = [k["material"] for k in read_json(path)["keys"]]

    assert repr(key) == "DataKey(user='alice@example.org', key_id=3)"
    assert repr(loaded) == "Keyset(primary=2, keys=[1, 2])"
    secret_texts = [material.hex(), repr(material), base64.b64encode(material).decode()]
    for text in (repr(key), repr(loaded)):
        for secret in [*secret_texts, *kek_texts]:
            assert secret not in text


def test_a_data_key_must_be_256_bits() -> None:
    with pytest.raises(ValueError, match="a data key is 32 bytes"):
        DataKey(ALICE, 1, b"short")
