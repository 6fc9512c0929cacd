"""Materialized state: the in-memory views that applying the log in order produces.

The log is the truth; views are derived from it and rebuilt on start from the newest snapshot
plus the records after it. Applying is deterministic and never does I/O except through the
``Unseal`` callable (which may read a user's data key from the vault).

Views keep sealed payloads as they were in the log, so a snapshot holds ciphertext only and
crypto-shredding a user also makes their snapshot entries unreadable.

Record types owned here (body fields; ``s`` is a sealed envelope, see storage.crypto):

* ``account.create`` v1 — ``{"u": bare JID, "id": record id, "s": sealed account secrets}``
* ``account.password`` v1 — same body; replaces the credentials
* ``account.delete`` v1 — ``{"u": bare JID}``; the store then destroys the user's data key

Sealed account secrets are msgpack ``{"created": unix seconds, "scram": [[mechanism, salt,
iterations, StoredKey, ServerKey], ...]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from villaged.storage.errors import ShreddedError, StorageError
from villaged.xmpp.scram import MECHANISMS, MIN_ITERATIONS, ScramCredential

# (record type, user, record id, envelope) -> plaintext; raises ShreddedError / DecryptError.
Unseal = Callable[[str, str, str, Mapping[str, Any]], bytes]

ACCOUNT_CREATE: Final = "account.create"
ACCOUNT_PASSWORD: Final = "account.password"  # noqa: S105 (a record type, not a secret)
ACCOUNT_DELETE: Final = "account.delete"
SNAPSHOT_FORMAT: Final = 1


class StateError(StorageError):
    """A record cannot be applied: unknown type, newer schema, or a malformed body."""


@dataclass(frozen=True, slots=True)
class AccountSecrets:
    created: int
    credentials: Mapping[str, ScramCredential]


@dataclass(frozen=True, slots=True)
class Account:
    """An account as the log describes it. ``secrets`` is None when the data key that sealed
    them was destroyed (the account was deleted later in the log, or shredding is pending)."""

    jid: str
    sealed_type: str
    sealed_id: str
    sealed: Mapping[str, Any]
    secrets: AccountSecrets | None


def pack_account_secrets(secrets: AccountSecrets) -> bytes:
    scram = [
        [c.mechanism, c.salt, c.iterations, c.stored_key, c.server_key]
        for c in secrets.credentials.values()
    ]
    packed: bytes = msgpack.packb({"created": secrets.created, "scram": scram}, use_bin_type=True)
    return packed


def unpack_account_secrets(data: bytes) -> AccountSecrets:
    try:
        obj = msgpack.unpackb(data, raw=False)
        created = obj["created"]
        creds: dict[str, ScramCredential] = {}
        for mechanism, salt, iterations, stored, server in obj["scram"]:
            if mechanism not in MECHANISMS or iterations < MIN_ITERATIONS:
                raise StateError(f"account secrets name an unusable mechanism {mechanism!r}")
            creds[mechanism] = ScramCredential(mechanism, salt, iterations, stored, server)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"account secrets are malformed: {exc}") from exc
    if not isinstance(created, int):
        raise StateError("account secrets have no creation time")
    return AccountSecrets(created=created, credentials=creds)


class AccountsView:
    """Accounts by bare JID."""

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}

    def get(self, jid: str) -> Account | None:
        return self._accounts.get(jid)

    def __contains__(self, jid: object) -> bool:
        return jid in self._accounts

    def __len__(self) -> int:
        return len(self._accounts)

    def jids(self) -> list[str]:
        return sorted(self._accounts)

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        jid = _text(body, "u")
        if rtype == ACCOUNT_DELETE:
            self._accounts.pop(jid, None)
            return
        record_id = _text(body, "id")
        sealed = body.get("s")
        if not isinstance(sealed, dict):
            raise StateError(f"{rtype} for {jid} has no sealed secrets")
        if rtype == ACCOUNT_CREATE and jid in self._accounts:
            return  # the store refuses duplicates before appending; replay keeps the first
        if rtype == ACCOUNT_PASSWORD and jid not in self._accounts:
            return
        self._accounts[jid] = _load_account(jid, rtype, record_id, sealed, unseal)

    def to_snapshot(self) -> list[list[Any]]:
        return [
            [a.jid, a.sealed_type, a.sealed_id, dict(a.sealed)] for a in self._accounts.values()
        ]

    def restore(self, rows: list[list[Any]], unseal: Unseal) -> None:
        self._accounts.clear()
        for jid, rtype, record_id, sealed in rows:
            self._accounts[jid] = _load_account(jid, rtype, record_id, sealed, unseal)


def _load_account(
    jid: str, rtype: str, record_id: str, sealed: Mapping[str, Any], unseal: Unseal
) -> Account:
    try:
        secrets: AccountSecrets | None = unpack_account_secrets(
            unseal(rtype, jid, record_id, sealed)
        )
    except ShreddedError:
        secrets = None
    return Account(jid, rtype, record_id, sealed, secrets)


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise StateError(f"record body field {key!r} is missing or not text")
    return value


# record type -> newest schema version this code understands
_KNOWN_VERSIONS: Final = {ACCOUNT_CREATE: 1, ACCOUNT_PASSWORD: 1, ACCOUNT_DELETE: 1}


class State:
    """All views, and the index of the last record applied to them."""

    def __init__(self) -> None:
        self.accounts = AccountsView()
        self.applied_index = 0
        self.applied_term = 0

    def validate(self, rtype: str, version: int, body: Mapping[str, Any]) -> None:
        """Check a record's shape before it is appended, so a durable record always applies."""
        self._check_version(rtype, version)
        _text(body, "u")
        if rtype != ACCOUNT_DELETE:
            _text(body, "id")
            if not isinstance(body.get("s"), dict):
                raise StateError(f"{rtype} has no sealed secrets")

    def apply(self, rtype: str, version: int, body: Mapping[str, Any], unseal: Unseal) -> None:
        self._check_version(rtype, version)
        self.accounts.apply(rtype, body, unseal)

    @staticmethod
    def _check_version(rtype: str, version: int) -> None:
        newest = _KNOWN_VERSIONS.get(rtype)
        if newest is None:
            raise StateError(f"unknown record type {rtype!r}")
        if version > newest:
            raise StateError(
                f"record type {rtype!r} has schema version {version}; this villaged reads "
                f"up to {newest} (was the data written by a newer villaged?)"
            )

    def mark_applied(self, index: int, term: int) -> None:
        self.applied_index, self.applied_term = index, term

    def snapshot_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "format": SNAPSHOT_FORMAT,
                "applied": self.applied_index,
                "accounts": self.accounts.to_snapshot(),
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_snapshot(cls, data: bytes, index: int, term: int, unseal: Unseal) -> State:
        try:
            obj = msgpack.unpackb(data, raw=False)
            fmt, applied, rows = obj["format"], obj["applied"], obj["accounts"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"snapshot at index {index} is malformed: {exc}") from exc
        if fmt != SNAPSHOT_FORMAT:
            raise StateError(f"snapshot at index {index} has format {fmt}; expected 1")
        if applied != index:
            raise StateError(f"snapshot file says index {index} but its state says {applied}")
        state = cls()
        try:
            state.accounts.restore(rows, unseal)
        except (ValueError, TypeError) as exc:
            raise StateError(f"snapshot at index {index} is malformed: {exc}") from exc
        state.mark_applied(index, term)
        return state
