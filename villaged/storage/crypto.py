"""Encryption at rest: the key-encryption keyset, the per-user key vault, and sealing.

This module owns every key villaged holds for stored data and every use of those keys:

* ``Keyset`` — the key-encryption keys (KEKs): versioned AES-256 keys with exactly one
  primary, kept in a private JSON file (or a systemd credential). Rotation adds a new primary;
  older keys stay so that what they wrapped can still be unwrapped until
  ``UserKeyVault.rewrap_all`` has moved it to the new primary.
* ``UserKeyVault`` — each user's data keys (DEKs), wrapped by the keyset, in one small file per
  user *outside* the append-only log. Deleting that file is crypto-shredding: the log, its old
  segments and every copy of them hold only ciphertext under a key that no longer exists.
* ``seal`` / ``unseal`` — AES-256-GCM envelopes for record payloads. The associated data binds a
  ciphertext to (record type, user, record id, key id), so it cannot be moved to another place.

File formats (JSON, UTF-8, mode 0600, replaced atomically and fsynced with their directory):

* keyset: ``{"format": "villaged-keyset/1", "primary": 2, "keys": [{"id": 1, "created":
  "2026-11-29T15:00:00Z", "material": "<base64 of 32 bytes>"}, ...]}``
* vault file ``<vault dir>/<hex sha256 of the bare JID>``: ``{"format": "villaged-keyvault/1",
  "user": "alice@example.org", "keys": [{"id": 1804289383, "kek": 2, "wrapped": "<base64>"}]}``
  where the blob is ``Keyset.wrap`` output: ``version u8 = 1 | kek id u32 BE | nonce (12) |
  AES-GCM ciphertext + tag`` (``kek`` repeats the blob's KEK id for people reading the file).
  A user's DEK ids are sequential from a random start (see ``_first_data_key_id``).

Everything here is synchronous and does blocking file I/O; async callers use
``trio.to_thread.run_sync``, so ``UserKeyVault`` takes a lock and is safe across worker threads.
Key material never appears in a repr, an exception message or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import struct
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from villaged.storage.entropy import random_bytes, random_token
from villaged.storage.errors import (
    DecryptError,
    KeyFileError,
    KeyManagementError,
    ShreddedError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

KEYSET_FORMAT: Final = "villaged-keyset/1"
VAULT_FORMAT: Final = "villaged-keyvault/1"
KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # 96-bit random nonces, GCM's native size
TAG_BYTES: Final = 16
# A keyset or vault file is a few hundred bytes; anything near this bound is not one.
MAX_KEY_FILE_BYTES: Final = 1 << 20
# Key ids travel as u32 in wrapped blobs.
MAX_KEY_ID: Final = 2**32 - 1

_WRAP_VERSION = 1
_WRAP_HEADER = struct.Struct(">BI")
_WRAP_MIN_BYTES = _WRAP_HEADER.size + NONCE_BYTES + TAG_BYTES
_ENVELOPE_FIELDS = frozenset({"k", "n", "c"})
# Leaves 2**31 ids of room above the largest first id.
_FIRST_DATA_KEY_IDS = 2**31
# Files and directories that hold keys must not be readable by anyone but the owner.
_GROUP_OTHER_BITS = 0o077


# --------------------------------------------------------------------------- keyset


class _Kek:
    """One key-encryption key. Keeps the raw bytes only because ``Keyset.save`` writes them."""

    __slots__ = ("aead", "created", "key_id", "material")

    def __init__(self, key_id: int, created: datetime, material: bytes) -> None:
        self.key_id = key_id
        self.created = created
        self.material = material
        self.aead = AESGCM(material)


class Keyset:
    """The KEKs: versioned AES-256 keys, exactly one primary. Immutable; changes return copies.

    Build one with ``generate`` or ``load``. ``wrap`` always uses the primary; ``unwrap`` uses
    whichever key the blob names, so blobs wrapped before a rotation keep opening.
    """

    __slots__ = ("_keys", "_primary")

    def __init__(self, keys: Iterable[_Kek], primary_id: int) -> None:
        # Internal: every caller has already checked that primary_id is among the keys.
        self._keys = {kek.key_id: kek for kek in keys}
        self._primary = primary_id

    @classmethod
    def generate(cls, now: datetime) -> Keyset:
        """A new keyset holding one fresh key (id 1), which is primary."""
        return cls([_Kek(1, _utc_second(now), os.urandom(KEY_BYTES))], 1)

    @classmethod
    def load(cls, path: Path) -> Keyset:
        """Read a keyset file, refusing one that is malformed or open to group or others."""
        try:
            raw = _read_private_file(path, "keyset file")
        except FileNotFoundError:
            raise KeyFileError(path, f"keyset file {path} does not exist") from None
        return _parse_keyset(path, raw)

    def save(self, path: Path) -> None:
        """Write the keyset to ``path`` atomically, mode 0600, durable when this returns."""
        doc = {
            "format": KEYSET_FORMAT,
            "primary": self._primary,
            "keys": [
                {
                    "id": kek.key_id,
                    "created": _format_time(kek.created),
                    "material": base64.b64encode(kek.material).decode("ascii"),
                }
                for kek in sorted(self._keys.values(), key=lambda kek: kek.key_id)
            ],
        }
        _write_private_file(path, _json_bytes(doc), "keyset file")

    @property
    def primary_id(self) -> int:
        return self._primary

    @property
    def key_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def created(self, key_id: int) -> datetime:
        """When key ``key_id`` was made (for key-age checks)."""
        return self._kek(key_id).created

    def rotated(self, now: datetime) -> Keyset:
        """A copy with a fresh primary key; the old keys stay and still unwrap."""
        new_id = max(self._keys) + 1
        if new_id > MAX_KEY_ID:
            raise KeyManagementError(f"keyset key ids are exhausted (highest is {new_id - 1})")
        fresh = _Kek(new_id, _utc_second(now), os.urandom(KEY_BYTES))
        return Keyset([*self._keys.values(), fresh], new_id)

    def without(self, key_id: int) -> Keyset:
        """A copy without key ``key_id``: retire an old KEK once ``rewrap_all`` has finished."""
        self._kek(key_id)
        if key_id == self._primary:
            raise KeyManagementError(
                f"key {key_id} is the keyset's primary; rotate before removing"
            )
        return Keyset([k for k in self._keys.values() if k.key_id != key_id], self._primary)

    def wrap(self, plaintext: bytes, associated: bytes) -> bytes:
        """Encrypt ``plaintext`` under the primary key, bound to ``associated``."""
        kek = self._keys[self._primary]
        header = _WRAP_HEADER.pack(_WRAP_VERSION, kek.key_id)
        nonce = os.urandom(NONCE_BYTES)
        # The header is fixed-size, so header + associated is an unambiguous encoding, and
        # authenticating it stops a blob from being relabelled with another key id.
        return header + nonce + kek.aead.encrypt(nonce, plaintext, header + associated)

    def unwrap(self, blob: bytes, associated: bytes) -> bytes:
        """Decrypt a ``wrap`` blob. Raises DecryptError, or KeyManagementError for a lost KEK."""
        kek_id = _wrapped_kek_id(blob)
        if kek_id is None:
            raise DecryptError(f"wrapped key ({len(blob)} bytes) is not a villaged/1 wrapped key")
        kek = self._keys.get(kek_id)
        if kek is None:
            raise KeyManagementError(
                f"wrapped key names keyset key {kek_id}, which the keyset does not hold"
                f" (it holds {_id_list(self._keys)}); was that key removed before"
                " rewrap_all finished?"
            )
        header_end = _WRAP_HEADER.size
        nonce = blob[header_end : header_end + NONCE_BYTES]
        try:
            return kek.aead.decrypt(
                nonce, blob[header_end + NONCE_BYTES :], blob[:header_end] + associated
            )
        except InvalidTag:
            raise DecryptError(
                f"wrapped key does not authenticate under keyset key {kek_id}"
                " (tampered, or bound to another user or key id)"
            ) from None

    def _kek(self, key_id: int) -> _Kek:
        kek = self._keys.get(key_id)
        if kek is None:
            raise KeyManagementError(
                f"keyset has no key {key_id} (it holds {_id_list(self._keys)})"
            )
        return kek

    def __repr__(self) -> str:
        return f"Keyset(primary={self._primary}, keys=[{_id_list(self._keys)}])"


def _parse_keyset(path: Path, raw: bytes) -> Keyset:
    def bad(reason: str) -> KeyFileError:
        return KeyFileError(path, f"keyset file {path}: {reason}")

    # Messages never echo file content: a mangled file could hold key bytes anywhere.
    doc = _parse_json_object(raw, bad)
    if doc.get("format") != KEYSET_FORMAT:
        raise bad(f"format tag is not {KEYSET_FORMAT!r}")
    keks: dict[int, _Kek] = {}
    for key_id, entry in _key_entries(doc, bad, "key"):
        created = _parse_time(entry.get("created"))
        if created is None:
            raise bad(f"key {key_id}: 'created' is not an ISO 8601 time with a UTC offset")
        material = _parse_base64(entry.get("material"))
        if material is None:
            raise bad(f"key {key_id}: 'material' is not base64")
        if len(material) != KEY_BYTES:
            raise bad(f"key {key_id}: 'material' is {len(material)} bytes; AES-256 needs 32")
        keks[key_id] = _Kek(key_id, created, material)
    primary = doc.get("primary")
    if not _is_key_id(primary) or primary not in keks:
        raise bad(f"'primary' is not one of the key ids ({_id_list(keks)})")
    return Keyset(keks.values(), primary)


def _key_entries(
    doc: dict[str, Any], bad: Callable[[str], KeyFileError], what: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The ``keys`` list of a keyset or vault file: (id, entry) pairs, ids unique and valid."""
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise bad("'keys' is not a non-empty list")
    seen: set[int] = set()
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise bad(f"keys entry #{position} is not an object")
        key_id = entry.get("id")
        if not _is_key_id(key_id):
            raise bad(f"keys entry #{position}: 'id' is not an integer from 1 to {MAX_KEY_ID}")
        if key_id in seen:
            raise bad(f"{what} id {key_id} appears more than once")
        seen.add(key_id)
        yield key_id, entry


def _wrapped_kek_id(blob: bytes) -> int | None:
    """The KEK id a wrapped blob names, or None if it is not a wrapped blob."""
    if len(blob) < _WRAP_MIN_BYTES:
        return None
    version, kek_id = _WRAP_HEADER.unpack_from(blob)
    if version != _WRAP_VERSION:
        return None
    result: int = kek_id
    return result


# --------------------------------------------------------------------------- vault


class DataKey:
    """One data key (DEK) of one user. Holds only the AES-GCM cipher; never shows the key."""

    __slots__ = ("_aead", "_key_id", "_user")

    def __init__(self, user: str, key_id: int, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes (AES-256)")
        self._user = user
        self._key_id = key_id
        self._aead = AESGCM(material)

    @property
    def user(self) -> str:
        return self._user

    @property
    def key_id(self) -> int:
        return self._key_id

    def __repr__(self) -> str:
        return f"DataKey(user={self._user!r}, key_id={self._key_id})"


class _UserKeys:
    """A user's vault file in memory: wrapped DEKs by id, and those unwrapped so far."""

    __slots__ = ("unwrapped", "wrapped")

    def __init__(self, wrapped: dict[int, bytes]) -> None:
        self.wrapped = wrapped
        self.unwrapped: dict[int, DataKey] = {}


class UserKeyVault:
    """Per-user DEKs, wrapped by a ``Keyset``, one file per user in a private directory.

    Build one with ``open``. It caches every DEK it has unwrapped, one small entry per user
    touched; that is unbounded for now and will want an LRU bound once user counts grow.
    It assumes it is the only writer of its directory (the data directory lock ensures that).
    """

    def __init__(self, directory: Path, keyset: Keyset) -> None:
        self._directory = directory
        self._keyset = keyset
        # Worker threads call in concurrently; one lock keeps "load, maybe create, cache"
        # atomic so that two first seals for one user cannot make two different DEKs.
        self._lock = threading.Lock()
        self._users: dict[str, _UserKeys] = {}

    @classmethod
    def open(cls, directory: Path, keyset: Keyset) -> UserKeyVault:
        """Open the vault at ``directory``, creating it (mode 0700) if it does not exist."""
        _ensure_private_directory(directory)
        _remove_stale_temporaries(directory)
        return cls(directory, keyset)

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def keyset(self) -> Keyset:
        return self._keyset

    def replace_keyset(self, keyset: Keyset) -> None:
        """Use ``keyset`` from now on (after a rotation); cached DEKs stay valid."""
        with self._lock:
            self._keyset = keyset

    def data_key(self, user: str) -> DataKey:
        """The user's current DEK, made and stored durably first if the user has none."""
        _check_user(user)
        with self._lock:
            keys = self._load(user)
            if keys is None:
                keys = self._create(user)
            return self._unwrapped(user, keys, max(keys.wrapped))

    def existing_data_key(self, user: str) -> DataKey | None:
        """The user's current DEK, or None if the user has none (never makes one). For a
        cluster node, where DEKs are made by the log (``new_wrapped`` + ``install``)."""
        _check_user(user)
        with self._lock:
            keys = self._load(user)
            if keys is None:
                return None
            return self._unwrapped(user, keys, max(keys.wrapped))

    def new_wrapped(self, user: str) -> dict[int, bytes]:
        """A fresh DEK for ``user``, wrapped under the keyset and NOT stored: for a cluster,
        where the wrapped key travels through the user's shard log and every replica stores
        it with ``install``."""
        _check_user(user)
        key_id = _first_data_key_id()
        material = os.urandom(KEY_BYTES)
        return {key_id: self._keyset.wrap(material, _dek_associated(user, key_id))}

    def install(self, user: str, wrapped: Mapping[int, bytes]) -> bool:
        """Store ``user``'s wrapped DEKs durably unless the user has some already (the first
        install wins). False if kept; KeyFileError if a blob is not a key wrapped under this
        keyset for this user (nothing is stored then)."""
        _check_user(user)
        with self._lock:
            if self._load(user) is not None:
                return False
            for key_id, blob in wrapped.items():
                self._unwrap(self._path(user), user, key_id, blob)  # checks before storing
            copy = dict(wrapped)
            _write_private_file(self._path(user), _vault_bytes(user, copy), "key vault file")
            self._users[user] = _UserKeys(copy)
            return True

    def export(self, user: str) -> dict[int, bytes] | None:
        """The user's wrapped DEKs as stored (for a cluster snapshot), or None."""
        _check_user(user)
        with self._lock:
            keys = self._load(user)
            return None if keys is None else dict(keys.wrapped)

    def cached_data_key(self, user: str) -> DataKey | None:
        """The user's current DEK if it is already in memory, else None; never touches a file
        and never waits for the lock (a worker thread holding it may be writing a file), so
        the event loop may call it. None means: ask ``data_key`` from a worker thread."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            keys = self._users.get(user)
            if keys is None:
                return None
            return keys.unwrapped.get(max(keys.wrapped))
        finally:
            self._lock.release()

    def get(self, user: str, key_id: int) -> DataKey:
        """The user's DEK ``key_id``; ShreddedError if it (or the user's vault file) is gone.

        A key id the user lacks may also come from an envelope moved over from another user;
        the two cannot be told apart without remembering destroyed users, which the vault
        deliberately does not.
        """
        _check_user(user)
        with self._lock:
            keys = self._load(user)
            if keys is None or key_id not in keys.wrapped:
                raise ShreddedError(
                    f"user {user} has no data key {key_id}"
                    " (destroyed by account deletion, or never made for this user)"
                )
            return self._unwrapped(user, keys, key_id)

    def has_user(self, user: str) -> bool:
        _check_user(user)
        with self._lock:
            return user in self._users or self._path(user).exists()

    def destroy(self, user: str) -> bool:
        """Crypto-shred: delete every DEK of ``user``, durably. True if there was any."""
        _check_user(user)
        with self._lock:
            self._users.pop(user, None)
            path = self._path(user)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            _fsync_directory(self._directory)
            return True

    def users(self) -> list[str]:
        """Every user with a vault file, sorted; reads (and checks) each file."""
        with self._lock:
            found = [self._read(path)[0] for path in self._vault_files()]
        return sorted(found)

    def rewrap_all(self) -> int:
        """Re-wrap every DEK not yet under the keyset's primary; return how many were.

        Safe to run while serving (each file is replaced atomically) and to re-run after a
        crash: DEKs already under the primary are skipped, so a second run returns 0.
        """
        with self._lock:
            primary = self._keyset.primary_id
            count = 0
            for path in self._vault_files():
                user, wrapped = self._read(path)
                stale = [
                    key_id for key_id, blob in wrapped.items() if _wrapped_kek_id(blob) != primary
                ]
                if not stale:
                    continue
                for key_id in stale:
                    material = self._unwrap(path, user, key_id, wrapped[key_id])
                    wrapped[key_id] = self._keyset.wrap(material, _dek_associated(user, key_id))
                _write_private_file(path, _vault_bytes(user, wrapped), "key vault file")
                cached = self._users.get(user)
                if cached is not None:
                    cached.wrapped = wrapped
                count += len(stale)
            return count

    def _path(self, user: str) -> Path:
        return self._directory / _vault_name(user)

    def _vault_files(self) -> list[Path]:
        return sorted(p for p in self._directory.iterdir() if _is_vault_name(p.name))

    def _load(self, user: str) -> _UserKeys | None:
        keys = self._users.get(user)
        if keys is None:
            try:
                _, wrapped = self._read(self._path(user))
            except FileNotFoundError:
                return None
            keys = self._users[user] = _UserKeys(wrapped)
        return keys

    def _read(self, path: Path) -> tuple[str, dict[int, bytes]]:
        return _parse_vault_file(path, _read_private_file(path, "key vault file"))

    def _create(self, user: str) -> _UserKeys:
        key_id = _first_data_key_id()
        material = os.urandom(KEY_BYTES)
        wrapped = {key_id: self._keyset.wrap(material, _dek_associated(user, key_id))}
        # Durable before anyone can seal under it: a DEK that could be lost in a crash
        # would take with it every record sealed under it.
        _write_private_file(self._path(user), _vault_bytes(user, wrapped), "key vault file")
        keys = self._users[user] = _UserKeys(wrapped)
        keys.unwrapped[key_id] = DataKey(user, key_id, material)
        return keys

    def _unwrapped(self, user: str, keys: _UserKeys, key_id: int) -> DataKey:
        key = keys.unwrapped.get(key_id)
        if key is None:
            material = self._unwrap(self._path(user), user, key_id, keys.wrapped[key_id])
            key = keys.unwrapped[key_id] = DataKey(user, key_id, material)
        return key

    def _unwrap(self, path: Path, user: str, key_id: int, blob: bytes) -> bytes:
        try:
            return self._keyset.unwrap(blob, _dek_associated(user, key_id))
        except DecryptError as exc:
            raise DecryptError(f"key vault file {path}, data key {key_id}: {exc}") from exc
        except KeyManagementError as exc:
            raise KeyManagementError(f"key vault file {path}, data key {key_id}: {exc}") from exc


def _parse_vault_file(path: Path, raw: bytes) -> tuple[str, dict[int, bytes]]:
    def bad(reason: str) -> KeyFileError:
        return KeyFileError(path, f"key vault file {path}: {reason}")

    doc = _parse_json_object(raw, bad)
    if doc.get("format") != VAULT_FORMAT:
        raise bad(f"format tag is not {VAULT_FORMAT!r}")
    user = doc.get("user")
    if not isinstance(user, str) or _vault_name(user) != path.name:
        # Also what a file copied or renamed from another user looks like.
        raise bad("'user' is not the user this file is named for")
    wrapped: dict[int, bytes] = {}
    for key_id, entry in _key_entries(doc, bad, "data key"):
        blob = _parse_base64(entry.get("wrapped"))
        if blob is None:
            raise bad(f"data key {key_id}: 'wrapped' is not base64")
        kek_id = _wrapped_kek_id(blob)
        if kek_id is None or entry.get("kek") != kek_id:
            raise bad(f"data key {key_id}: 'wrapped' is not a key wrapped under its 'kek'")
        wrapped[key_id] = blob
    return user, wrapped


def _vault_bytes(user: str, wrapped: dict[int, bytes]) -> bytes:
    doc = {
        "format": VAULT_FORMAT,
        "user": user,
        "keys": [
            {
                "id": key_id,
                "kek": _wrapped_kek_id(blob),
                "wrapped": base64.b64encode(blob).decode("ascii"),
            }
            for key_id, blob in sorted(wrapped.items())
        ],
    }
    return _json_bytes(doc)


def _first_data_key_id() -> int:
    # A user's DEK ids count up from a random start rather than from 1. The vault forgets a
    # destroyed user entirely, so if a re-created account started at 1 again, the old
    # account's envelopes (still in the log until compaction) would name a key id the new
    # account has, and fail as tampered (DecryptError) instead of as shredded. With a random
    # start they name an id the new account lacks: ShreddedError, except with odds 2**-31.
    return secrets.randbelow(_FIRST_DATA_KEY_IDS) + 1


def _vault_name(user: str) -> str:
    # Hashed so that a directory listing does not reveal who has an account.
    return hashlib.sha256(user.encode("utf-8")).hexdigest()


def _is_vault_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _dek_associated(user: str, key_id: int) -> bytes:
    # Binds a wrapped DEK to its owner and id: copied into another user's file, it fails.
    packed: bytes = msgpack.packb(["villaged-dek/1", user, key_id], use_bin_type=True)
    return packed


def _check_user(user: str) -> None:
    if not user or "/" in user:
        raise ValueError(f"expected a bare JID, got {user!r}")


# --------------------------------------------------------------------------- sealing


def new_record_id() -> str:
    """A fresh 128-bit random record id (22 characters of URL-safe base64)."""
    return random_token(16)


def seal(
    vault: UserKeyVault, record_type: str, user: str, record_id: str, plaintext: bytes
) -> dict[str, Any]:
    """Encrypt ``plaintext`` under ``user``'s current DEK into a msgpack-able envelope.

    The envelope is ``{"k": DEK id, "n": 12-byte nonce, "c": ciphertext + tag}``.
    """
    return seal_with(vault.data_key(user), record_type, record_id, plaintext)


def seal_with(key: DataKey, record_type: str, record_id: str, plaintext: bytes) -> dict[str, Any]:
    """``seal`` under a DEK already at hand (``UserKeyVault.cached_data_key``): pure CPU, a few
    microseconds for a chat message, so the event loop may call it. The associated data names
    the key's user, exactly as ``seal`` does."""
    _check_label("record type", record_type)
    _check_label("record id", record_id)
    # Random nonces are safe up to about 2**32 seals per DEK; a user would need billions of
    # sealed records to get near that, and DEK rotation (new id, same file) is the remedy.
    nonce = random_bytes(NONCE_BYTES)
    associated = _seal_associated(record_type, key.user, record_id, key.key_id)
    ciphertext = key._aead.encrypt(nonce, plaintext, associated)
    return {"k": key.key_id, "n": nonce, "c": ciphertext}


def unseal(
    vault: UserKeyVault, record_type: str, user: str, record_id: str, envelope: object
) -> bytes:
    """Decrypt a ``seal`` envelope for exactly this (record type, user, record id).

    Raises DecryptError if the envelope is malformed, tampered with or belongs elsewhere,
    and ShreddedError if the DEK it names has been destroyed.
    """
    _check_label("record type", record_type)
    _check_label("record id", record_id)
    where = f"sealed {record_type} record {record_id} of {user}"
    if not isinstance(envelope, Mapping) or set(envelope) != _ENVELOPE_FIELDS:
        raise DecryptError(f"{where}: envelope is not a map with exactly the fields c, k, n")
    key_id, nonce, ciphertext = envelope["k"], envelope["n"], envelope["c"]
    if not _is_key_id(key_id):
        raise DecryptError(f"{where}: envelope 'k' is not a data key id")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise DecryptError(f"{where}: envelope 'n' is not a {NONCE_BYTES}-byte nonce")
    if not isinstance(ciphertext, bytes) or len(ciphertext) < TAG_BYTES:
        raise DecryptError(f"{where}: envelope 'c' is shorter than a {TAG_BYTES}-byte tag")
    key = vault.get(user, key_id)
    associated = _seal_associated(record_type, user, record_id, key_id)
    try:
        return key._aead.decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise DecryptError(
            f"{where} does not authenticate under data key {key_id}: tampered, moved from"
            " another user, record or record type, or sealed under a destroyed key that a"
            " re-created account reused the id of"
        ) from None


def _seal_associated(record_type: str, user: str, record_id: str, key_id: int) -> bytes:
    # A msgpack array is length-prefixed field by field, so no two tuples encode alike.
    packed: bytes = msgpack.packb(
        ["villaged-seal/1", record_type, user, record_id, key_id], use_bin_type=True
    )
    return packed


def _check_label(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


# --------------------------------------------------------------------------- files


def _read_private_file(path: Path, what: str) -> bytes:
    """A key file's bytes, refusing group/other access; FileNotFoundError passes through."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang startup; no effect on files.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeyFileError(path, f"{what} {path} cannot be opened: {exc.strerror}") from exc
    try:
        # Checked on the open descriptor, so the file cannot be swapped between check and read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(path, f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & _GROUP_OTHER_BITS:
            raise KeyFileError(
                path,
                f"{what} {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})",
            )
        chunks: list[bytes] = []
        remaining = MAX_KEY_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    if remaining <= 0:
        raise KeyFileError(path, f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    return b"".join(chunks)


def _write_private_file(path: Path, data: bytes, what: str) -> None:
    """Replace ``path`` with ``data``: mode 0600, atomic, durable (file and directory)."""
    directory = path.parent
    temporary = directory / f".{path.name}.tmp-{secrets.token_hex(8)}"
    try:
        # Created 0600 from the start, so the key bytes are never readable by others,
        # not even for a moment, whatever the umask.
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise KeyFileError(path, f"cannot write {what} {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            # A restrictive umask may have narrowed 0600 further; the owner must keep rw.
            os.fchmod(file.fileno(), 0o600)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise KeyFileError(path, f"cannot write {what} {path}: {exc.strerror}") from exc


def _fsync_directory(directory: Path) -> None:
    # Makes a create, rename or unlink in ``directory`` durable.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_private_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(
            directory, f"cannot create key vault directory {directory}: {exc.strerror}"
        ) from exc
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        _fsync_directory(directory.parent)
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(directory, f"key vault path {directory} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _GROUP_OTHER_BITS:
        raise KeyFileError(
            directory,
            f"key vault directory {directory} has mode {mode:04o}; it must be 0700"
            f" (chmod 700 {directory})",
        )


def _remove_stale_temporaries(directory: Path) -> None:
    # A crash between creating a temporary and renaming it leaves a wrapped DEK behind that
    # ``destroy`` would not know about; removing them keeps crypto-shredding complete.
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        _fsync_directory(directory)


# --------------------------------------------------------------------------- helpers


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _parse_json_object(raw: bytes, bad: Callable[[str], KeyFileError]) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (UnicodeDecodeError, RecursionError):
        raise bad("not JSON (not UTF-8, or nested too deeply)") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    return doc


def _parse_base64(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error is a ValueError, as is non-ASCII input
        return None


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.utcoffset() is None:
        return None
    return _utc_second(parsed)


def _utc_second(now: datetime) -> datetime:
    if now.utcoffset() is None:
        raise ValueError("expected a timezone-aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


def _format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_key_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_KEY_ID


def _id_list(keys: Iterable[int]) -> str:
    return ", ".join(str(key_id) for key_id in sorted(keys))
