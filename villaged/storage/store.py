"""The store: one data directory, its log, its data keys and the state they produce.

This is the only place that opens a data directory. It owns the layout::

    DIR/FORMAT     "villaged-storage 1" — refuses directories of another format
    DIR/LOCK       flock'ed while open, holds the owner's pid (one process per directory)
    DIR/log/       the segment log and its snapshots (storage.log)
    DIR/vault/     per-user data keys wrapped by the keyset (storage.crypto)

Writes go log-first: a change is sealed, appended, and applied to the views only after the
append is durable, in index order. ``add_user`` returning means the account is on disk.
Deleting a user appends ``account.delete`` and then destroys the user's data key; if the
process dies in between, opening the store finishes the shredding.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from villaged.background import running_in_background
from villaged.storage import crypto
from villaged.storage.errors import DataDirError, LogWriteError, StorageError
from villaged.storage.log import Appended, SegmentLog
from villaged.storage.records import Record
from villaged.storage.state import (
    ACCOUNT_CREATE,
    ACCOUNT_DELETE,
    ACCOUNT_PASSWORD,
    AccountSecrets,
    State,
    View,
    pack_account_secrets,
)
from villaged.xmpp.jid import JID, JIDError
from villaged.xmpp.scram import MECHANISMS, ScramCredential, derive_credential

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from pathlib import Path

    from villaged.cluster.replicated import Replicator
    from villaged.config.model import StorageConfig

FORMAT: Final = "villaged-storage 1"
SALT_BYTES: Final = 16
log = logging.getLogger("villaged.storage")


class UserExistsError(StorageError):
    pass


class NoSuchUserError(StorageError):
    pass


@dataclass(frozen=True, slots=True)
class StoreOptions:
    directory: Path
    keyset: Path
    segment_bytes: int = 64 * 2**20
    max_record_bytes: int = 2**20
    snapshot_every: int = 100_000
    #: A cluster node: records go through the shards' Raft logs (villaged.cluster.replicated),
    #: the views are rebuilt from those, and data keys come from the log, never made here.
    replicated: bool = False

    @classmethod
    def from_config(cls, config: StorageConfig, *, replicated: bool = False) -> StoreOptions:
        return cls(
            directory=config.dir,
            keyset=config.keyset,
            segment_bytes=config.segment_bytes,
            max_record_bytes=config.max_record_bytes,
            snapshot_every=config.snapshot_every,
            replicated=replicated,
        )


#: Plaintexts of sealed bodies kept until their record is applied (``Store._unseal``); more
#: than the records in flight at once, fewer than would matter for memory.
_SEALED_MEMO_LIMIT: Final = 4096


class StoreFailedError(StorageError):
    """A durable record could not be applied to the views; the store stops taking writes."""


class Store:
    """The open data directory. ``log`` is for reading; every write goes through ``commit``,
    which is what keeps the views equal to the log."""

    def __init__(
        self,
        options: StoreOptions,
        lock_fd: int,
        segment_log: SegmentLog,
        vault: crypto.UserKeyVault,
        state: State,
    ) -> None:
        self.options = options
        self.log = segment_log
        self.vault = vault
        self.state = state
        self._lock_fd = lock_fd
        # Records appended but not yet applied, by index: applied strictly in index order.
        self._unapplied: dict[int, Record] = {}
        snapshot = segment_log.latest_snapshot()
        self._snapshot_index = snapshot.index if snapshot is not None else 0
        self._snapshot_wanted = trio.Event()
        self._failure: StoreFailedError | None = None
        self._account_lock = trio.Lock()
        self._applied_progress = trio.Event()
        # Payloads sealed here and not yet applied (see ``_unseal``), oldest first.
        self._sealed_here: dict[str, tuple[Mapping[str, Any], bytes]] = {}
        # The log's writer applies each batch as it becomes durable (see ``submit``).
        segment_log.on_durable = self._on_durable
        #: A cluster node's path into the shards (set by the node before it serves).
        self.replicator: Replicator | None = None

    # ----- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, options: StoreOptions, views: Sequence[View] = ()) -> Store:
        """Open (creating if new) the data directory; recover the log; rebuild the views
        (accounts, plus the feature ``views`` the node passes in)."""
        directory = options.directory
        _prepare_directory(directory)
        lock_fd = lock_directory(directory)
        try:
            keyset = crypto.Keyset.load(options.keyset)
            vault = crypto.UserKeyVault.open(directory / "vault", keyset)
            segment_log = SegmentLog.open(
                directory / "log",
                segment_bytes=options.segment_bytes,
                max_record_bytes=options.max_record_bytes,
            )
            try:
                state = _rebuild_state(segment_log, vault, views)
            except BaseException:
                segment_log.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(options, lock_fd, segment_log, vault, state)
        if not options.replicated:  # a cluster node's accounts come from the shards, later
            store._finish_pending_shredding()
            store._report_unreadable_accounts()
        return store

    def close(self) -> None:
        self.log.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background work: the log's group-commit writer and snapshots.
        Returns once ``log.close()`` has been called and the writer has finished."""
        async with trio.open_nursery() as nursery:

            async def write_log(*, task_status: trio.TaskStatus[None]) -> None:
                await self.log.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # the log was closed: snapshots end with it

            await nursery.start(write_log)
            nursery.start_soon(self._take_snapshots)
            task_status.started()

    def _unseal(self, rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        # Applying a record this process just sealed needs no decryption: the plaintext is
        # remembered for exactly that envelope object, and used only while the user's key is
        # still the one it was sealed under (a deleted user's entries must still fail as
        # ShreddedError, as they would when the log is replayed).
        memo = self._sealed_here.pop(record_id, None)
        if memo is not None and memo[0] is envelope:
            key = self.vault.cached_data_key(user)
            if key is not None and key.key_id == envelope["k"]:
                return memo[1]
        return crypto.unseal(self.vault, rtype, user, record_id, envelope)

    async def sealed_body(self, rtype: str, user: str, plaintext: bytes) -> dict[str, Any]:
        """A record body ``{"u": user, "id": new record id, "s": envelope}`` whose payload is
        sealed under ``user``'s data key.

        With the key in memory (every message after a user's first) this seals right here on
        the event loop: AES-GCM of a stanza takes microseconds, far less than a thread hop.
        Loading or making the key reads or writes a vault file, so that goes to a worker."""
        record_id = crypto.new_record_id()
        key = self.vault.cached_data_key(user)
        if key is None:
            if self.replicator is not None:
                key = await self.replicator.ensure_key(user)
            else:
                key = await trio.to_thread.run_sync(self.vault.data_key, user)
        else:
            await trio.lowlevel.checkpoint()
        envelope = crypto.seal_with(key, rtype, record_id, plaintext)
        memos = self._sealed_here
        if len(memos) >= _SEALED_MEMO_LIMIT:  # bodies sealed and then never submitted
            del memos[next(iter(memos))]
        memos[record_id] = (envelope, plaintext)
        return {"u": user, "id": record_id, "s": envelope}

    def unseal_body(self, rtype: str, body: Mapping[str, Any]) -> bytes:
        """The plaintext of a body made by ``sealed_body`` (ShreddedError if its user's key
        was destroyed)."""
        return crypto.unseal(self.vault, rtype, body["u"], body["id"], body["s"])

    def _finish_pending_shredding(self) -> None:
        for user in self.vault.users():
            if user not in self.state.accounts:
                # Deleted in the log but the process died before the key was destroyed, or
                # the key was made for an account whose create record never became durable.
                self.vault.destroy(user)
                log.info("data key destroyed", extra={"event": "storage.key_shredded"})

    def _report_unreadable_accounts(self) -> None:
        # A live account whose secrets do not open means its data key is missing from the
        # vault (a bad restore, a deleted file): say so loudly; the account cannot log in.
        for jid in self.state.accounts.jids():
            account = self.state.accounts.get(jid)
            if account is not None and account.secrets is None:
                log.error(
                    "account secrets unreadable: the user's data key is missing from the vault",
                    extra={
                        "event": "storage.account_key_missing",
                        "security": True,
                        "user": jid,
                        "vault": str(self.vault.directory),
                    },
                )

    # ----- writing -------------------------------------------------------------------------

    async def commit(self, record: Record) -> int:
        """Append durably, then apply to the views in index order; returns the index.

        Raises before anything is written if the record is malformed, and StoreFailedError
        once a durable record could not be applied (the store then refuses all writes).
        """
        pending = await self.submit(record)
        return await pending.wait()

    async def submit(self, record: Record) -> Pending:
        """The first half of ``commit``: validate ``record`` and hand it to the log, which
        gives it the next index; ``PendingCommit.wait`` is the second half.

        Records submitted one after another get increasing indexes and are applied in that
        order. Once this returns, the record is applied as soon as it is durable — by the
        log's writer, whether or not anyone waits — so a caller may submit several records
        and only then wait, letting them share one fdatasync. Raises before anything is
        written if the record is malformed or too large.
        """
        self._check_usable()
        self.state.validate(record.type, record.version, record.body)
        if self.replicator is not None:
            await trio.lowlevel.checkpoint()
            return self.replicator.submit(record)
        appended = await self.log.submit(record)
        # No checkpoint since the log framed it: the writer cannot have written it yet.
        self._unapplied[appended.index] = record
        return PendingCommit(self, appended, record)

    def in_touch(self, user: str) -> bool:
        """On a cluster node: whether this node hears the leader of ``user``'s shard (its copy
        of the account is current). Single node: always."""
        return self.replicator is None or self.replicator.in_touch(user)

    async def catch_up(self, *users: str) -> None:
        """On a cluster node: wait until this node has applied whatever the users' shards had
        committed (a write made on another node is visible here after this). Single node:
        everything committed is applied already."""
        if self.replicator is not None:
            await self.replicator.catch_up(users)

    def _on_durable(self, last_index: int) -> None:
        # The log's writer calls this with each newly durable batch (see SegmentLog).
        del last_index  # every record in _unapplied up to it is what the batch held
        with contextlib.suppress(StoreFailedError):  # recorded and logged; waiters raise it
            self._apply_ready()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _apply_ready(self) -> None:
        advanced = False
        durable = self.log.last_index
        try:
            while self.state.applied_index < durable and (
                (record := self._unapplied.pop(self.state.applied_index + 1, None)) is not None
            ):
                index = self.state.applied_index + 1
                try:
                    self.state.apply(record.type, record.version, record.body, self._unseal)
                except Exception as exc:  # a bug in a view too: never in the log writer
                    self._failure = StoreFailedError(
                        f"log index {index} is durable but cannot be applied: {exc}"
                    )
                    log.critical(
                        "store failed",
                        extra={"event": "storage.apply_failed", "index": index, "error": str(exc)},
                    )
                    raise self._failure from exc
                self.state.mark_applied(index, record.term)
                advanced = True
        finally:
            if advanced or self._failure is not None:
                self._applied_progress.set()
                self._applied_progress = trio.Event()

    def snapshot_due(self) -> bool:
        return self.state.applied_index - self._snapshot_index >= self.options.snapshot_every

    async def _take_snapshots(self) -> None:
        while True:
            await self._snapshot_wanted.wait()
            self._snapshot_wanted = trio.Event()
            await self.snapshot_logging_failure()

    async def snapshot_logging_failure(self) -> None:
        """Snapshot now; a failure is logged (the log still has everything) and retried later."""
        try:
            await self.snapshot()
        except (StorageError, OSError) as exc:
            log.warning(
                "snapshot failed; will retry",
                extra={"event": "storage.snapshot_failed", "error": str(exc)},
            )

    async def snapshot(self) -> None:
        """Write the views as a snapshot now; the log compacts segments it covers."""
        index, term = self.state.applied_index, self.state.applied_term
        data = self.state.snapshot_bytes()
        await self.log.save_snapshot(index, term, data)
        self._snapshot_index = index

    def node_secret(self, name: str) -> bytes:
        """A random 32-byte secret kept in DIR/secrets/NAME (mode 0600), made on first use and
        stable across restarts (e.g. the key behind SASL's fake salts for unknown users)."""
        if not name.isidentifier():
            raise ValueError(f"bad secret name {name!r}")
        directory = self.options.directory / "secrets"
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / name
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            tmp = directory / f"{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(path)
            _fsync_dir(directory)
            secret = path.read_bytes()
        if len(secret) != 32:
            raise DataDirError(f"{path} is damaged: expected 32 bytes, found {len(secret)}")
        return secret

    # ----- accounts ------------------------------------------------------------------------

    def local_user(self, jid: str, domain: str) -> str:
        """Validate ``jid`` as a bare JID of ``domain``; return its canonical form."""
        try:
            parsed = JID.parse(jid)
        except JIDError as exc:
            raise NoSuchUserError(f"{jid!r} is not a valid JID: {exc}") from exc
        if not parsed.local or parsed.resource:
            raise NoSuchUserError(f"{jid!r} is not a bare user JID (user@domain)")
        if parsed.domain != domain:
            raise NoSuchUserError(f"{jid!r} is not in this server's domain {domain}")
        return str(parsed)

    async def add_user(self, jid: str, password: str) -> None:
        async with self._account_lock:
            if jid in self.state.accounts:
                raise UserExistsError(f"user {jid} already exists")
            record_id = await self._write_credentials(ACCOUNT_CREATE, jid, password)
            account = self.state.accounts.get(jid)
            if account is None or account.sealed_id != record_id:
                # In a cluster another node created it meanwhile; its create came first.
                raise UserExistsError(f"user {jid} already exists")

    async def set_password(self, jid: str, password: str) -> None:
        async with self._account_lock:
            if jid not in self.state.accounts:
                raise NoSuchUserError(f"no such user {jid}")
            await self._write_credentials(ACCOUNT_PASSWORD, jid, password)

    async def delete_user(self, jid: str) -> None:
        async with self._account_lock:
            if jid not in self.state.accounts:
                raise NoSuchUserError(f"no such user {jid}")
            await self.commit(Record(ACCOUNT_DELETE, {"u": jid}))
            await trio.to_thread.run_sync(self.vault.destroy, jid)

    def users(self) -> list[str]:
        return self.state.accounts.jids()

    def credentials(self, jid: str) -> Mapping[str, ScramCredential] | None:
        account = self.state.accounts.get(jid)
        if account is None or account.secrets is None:
            return None
        return account.secrets.credentials

    async def _write_credentials(self, rtype: str, jid: str, password: str) -> str:
        secrets = await trio.to_thread.run_sync(_derive_secrets, password)
        account = self.state.accounts.get(jid)
        if rtype == ACCOUNT_PASSWORD and account is not None and account.secrets is not None:
            # ``created`` is when the account was made, whatever its password changes: its
            # access-transparency listing starts there (a former holder of the JID's does not
            # show through).
            secrets = AccountSecrets(account.secrets.created, secrets.credentials)
        body = await self.sealed_body(rtype, jid, pack_account_secrets(secrets))
        await self.commit(Record(rtype, body))
        return str(body["id"])


class Pending(Protocol):
    """A record on its way into the log (a local one, or a cluster's shards)."""

    @property
    def index(self) -> int: ...
    @property
    def durable(self) -> bool: ...
    async def wait(self) -> int: ...


class PendingCommit:
    """A record ``Store.submit`` handed to the log."""

    __slots__ = ("_appended", "_record", "_store")

    def __init__(self, store: Store, appended: Appended, record: Record) -> None:
        self._store = store
        self._appended = appended
        self._record = record

    @property
    def index(self) -> int:
        return self._appended.index

    @property
    def durable(self) -> bool:
        """Whether ``wait`` would return (or raise) without waiting for the disk."""
        return self._appended.durable

    async def wait(self) -> int:
        """Return the record's index once it is durable and applied to the views.

        Raises LogWriteError if its batch failed (nothing of it is in the log), and
        StoreFailedError once a durable record could not be applied.
        """
        store = self._store
        # Shielded: the record is in the log's queue and will become durable (or fail with
        # its batch); whoever handed it over learns which, even if it was cancelled meanwhile.
        with trio.CancelScope(shield=True):
            try:
                index = await self._appended.wait()
            except LogWriteError:
                # Its index is handed out again after a failed batch: forget only our record.
                if store._unapplied.get(self._appended.index) is self._record:
                    del store._unapplied[self._appended.index]
                raise
        # The writer applied it before waking us, unless an apply failed (or, defensively, a
        # record reached the log without going through the store and left a gap).
        while store.state.applied_index < index:
            store._check_usable()
            await store._applied_progress.wait()
        if store.state.applied_index - store._snapshot_index >= store.options.snapshot_every:
            store._snapshot_wanted.set()
        return index


def _derive_secrets(password: str) -> AccountSecrets:
    creds = {
        mechanism: derive_credential(mechanism, password, os.urandom(SALT_BYTES))
        for mechanism in MECHANISMS
    }
    return AccountSecrets(created=int(time.time()), credentials=creds)


def _rebuild_state(
    segment_log: SegmentLog, vault: crypto.UserKeyVault, views: Sequence[View]
) -> State:
    def unseal(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        return crypto.unseal(vault, rtype, user, record_id, envelope)

    state = State(views)
    snapshot = segment_log.latest_snapshot()
    if snapshot is not None:
        state.restore(snapshot.data, snapshot.index, snapshot.term, unseal)
    else:
        if segment_log.first_index > 1:
            raise StorageError(
                f"log starts at index {segment_log.first_index} but there is no snapshot "
                "covering the entries before it"
            )
    for record in segment_log.scan(state.applied_index + 1):
        try:
            state.apply(record.type, record.version, record.body, unseal)
        except StorageError as exc:
            raise StorageError(f"log index {record.index}: {exc}") from exc
        state.mark_applied(record.index, record.term)
    return state


def prepare_data_directory(directory: Path) -> None:
    """Create the data directory (0700, with its FORMAT file) if it is new, or check its
    format; takes no lock. For commands that keep files in it beside a running node (the
    operators file), so that a directory they create first is still one the store opens."""
    _prepare_directory(directory)


def _prepare_directory(directory: Path) -> None:
    format_file = directory / "FORMAT"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = format_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise DataDirError(f"data directory {directory}: {exc.strerror}") from exc
    if found is None:
        if any(directory.iterdir()):
            raise DataDirError(
                f"data directory {directory} is not empty and has no FORMAT file; "
                "it is not a villaged data directory"
            )
        tmp = directory / "FORMAT.tmp"
        tmp.write_text(FORMAT + "\n", encoding="utf-8")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(format_file)
        _fsync_dir(directory)
    elif found != FORMAT:
        raise DataDirError(
            f"data directory {directory} has format {found!r}; this villaged reads {FORMAT!r}"
        )


def lock_directory(directory: Path) -> int:
    """Take the data directory's lock (one process at a time: DataDirError names the holder's
    pid); closing the returned descriptor releases it."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirError(
            f"data directory {directory} is in use by another villaged process (pid {holder}); "
            "stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def open_store(options: StoreOptions, views: Sequence[View] = ()) -> AsyncIterator[Store]:
    """Open the store with its writer running; close it on exit (for the CLI and tests)."""
    store = await trio.to_thread.run_sync(Store.open, options, views)
    try:
        async with running_in_background(store.run, store.log.close):
            yield store
            if store.snapshot_due():  # short-lived processes (the CLI) compact too
                await store.snapshot_logging_failure()
    finally:
        store.close()
