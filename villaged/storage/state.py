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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

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


class View(Protocol):
    """One materialized view: owns some record types, applies them, and snapshots itself.

    Feature modules (roster, offline, archive, …) define their views; the node hands them to
    the store, which applies every record to the view that owns its type, in log order.
    A view may also define ``forget_user(jid: str) -> None``: it is called, in log order, when
    an ``account.delete`` record is applied, so the view drops everything of that user.
    """

    name: str  # its key in snapshots; stable forever
    record_types: Mapping[str, int]  # record type -> newest schema version understood

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        """Raise StateError if ``body`` could not be applied (checked before appending)."""

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None: ...

    def to_snapshot(self) -> Any: ...

    def restore(self, data: Any, unseal: Unseal) -> None: ...


class AccountsView:
    """Accounts by bare JID."""

    name = "accounts"
    record_types: Mapping[str, int] = {ACCOUNT_CREATE: 1, ACCOUNT_PASSWORD: 1, ACCOUNT_DELETE: 1}

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        text(body, "u")
        if rtype != ACCOUNT_DELETE:
            text(body, "id")
            if not isinstance(body.get("s"), dict):
                raise StateError(f"{rtype} has no sealed secrets")

    def get(self, jid: str) -> Account | None:
        return self._accounts.get(jid)

    def __contains__(self, jid: object) -> bool:
        return jid in self._accounts

    def __len__(self) -> int:
        return len(self._accounts)

    def jids(self) -> list[str]:
        return sorted(self._accounts)

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        jid = text(body, "u")
        if rtype == ACCOUNT_DELETE:
            self._accounts.pop(jid, None)
            return
        record_id = text(body, "id")
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

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._accounts.clear()
        for jid, rtype, record_id, sealed in data or ():
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


def text(body: Mapping[str, Any], key: str) -> str:
    """``body[key]`` as non-empty text, else StateError naming the field."""
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise StateError(f"record body field {key!r} is missing or not text")
    return value


class State:
    """All views, and the index of the last record applied to them."""

    def __init__(self, extra_views: Sequence[View] = ()) -> None:
        self.accounts = AccountsView()
        self.views: tuple[View, ...] = (self.accounts, *extra_views)
        self._owner: dict[str, View] = {}
        for view in self.views:
            for rtype in view.record_types:
                if rtype in self._owner:
                    raise ValueError(f"record type {rtype!r} is owned by two views")
                self._owner[rtype] = view
        if len({v.name for v in self.views}) != len(self.views):
            raise ValueError("two views share a name")
        self.applied_index = 0
        self.applied_term = 0

    def view(self, name: str) -> View:
        for view in self.views:
            if view.name == name:
                return view
        raise KeyError(name)

    def validate(self, rtype: str, version: int, body: Mapping[str, Any]) -> None:
        """Check a record's shape before it is appended, so a durable record always applies."""
        self._owner_of(rtype, version).validate(rtype, body)

    def apply(self, rtype: str, version: int, body: Mapping[str, Any], unseal: Unseal) -> None:
        self._owner_of(rtype, version).apply(rtype, body, unseal)
        if rtype == ACCOUNT_DELETE:
            jid = text(body, "u")
            for view in self.views:
                forget = getattr(view, "forget_user", None)
                if forget is not None:
                    forget(jid)

    def _owner_of(self, rtype: str, version: int) -> View:
        view = self._owner.get(rtype)
        if view is None:
            raise StateError(f"unknown record type {rtype!r}")
        newest = view.record_types[rtype]
        if version > newest:
            raise StateError(
                f"record type {rtype!r} has schema version {version}; this villaged reads "
                f"up to {newest} (was the data written by a newer villaged?)"
            )
        return view

    def mark_applied(self, index: int, term: int) -> None:
        self.applied_index, self.applied_term = index, term

    def snapshot_bytes(self) -> bytes:
        views = {view.name: view.to_snapshot() for view in self.views}
        packed: bytes = msgpack.packb(
            {"format": SNAPSHOT_FORMAT, "applied": self.applied_index, "views": views},
            use_bin_type=True,
        )
        return packed

    def restore(self, data: bytes, index: int, term: int, unseal: Unseal) -> None:
        """Replace every view's contents with the snapshot taken at ``index``."""
        try:
            obj = msgpack.unpackb(data, raw=False)
            fmt, applied, views = obj["format"], obj["applied"], obj["views"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"snapshot at index {index} is malformed: {exc}") from exc
        if fmt != SNAPSHOT_FORMAT:
            raise StateError(f"snapshot at index {index} has format {fmt}; expected 1")
        if applied != index:
            raise StateError(f"snapshot file says index {index} but its state says {applied}")
        for view in self.views:
            try:
                view.restore(views.get(view.name), unseal)
            except (ValueError, TypeError, KeyError) as exc:
                raise StateError(
                    f"snapshot at index {index}: view {view.name!r} is malformed: {exc}"
                ) from exc
        self.mark_applied(index, term)
