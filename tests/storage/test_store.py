"""The store: data directory layout and locking, log-first account writes, rebuild on open,
snapshots, and crypto-shredding of deleted users."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from villaged.storage import crypto
from villaged.storage import store as store_module
from villaged.storage.errors import (
    DataDirError,
    KeyManagementError,
    LogWriteError,
    ShreddedError,
    StorageError,
)
from villaged.storage.log import SegmentLog
from villaged.storage.records import Record
from villaged.storage.state import ACCOUNT_CREATE, ACCOUNT_DELETE, ACCOUNT_PASSWORD, StateError
from villaged.storage.store import (
    NoSuchUserError,
    Store,
    StoreFailedError,
    StoreOptions,
    UserExistsError,
    open_store,
)
from villaged.xmpp.scram import password_matches

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path


@pytest.fixture
def options(tmp_path: Path) -> StoreOptions:
    keyset = tmp_path / "keyset.json"
    crypto.Keyset.generate(datetime(2026, 11, 29, tzinfo=UTC)).save(keyset)
    return StoreOptions(directory=tmp_path / "data", keyset=keyset, snapshot_every=1_000_000)


def _password_ok(store: Store, jid: str, password: str) -> bool:
    creds = store.credentials(jid)
    assert creds is not None
    assert set(creds) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    return all(password_matches(c, password) for c in creds.values())


async def test_accounts_survive_reopen(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "correct horse")
        await store.add_user("bob@example.org", "battery staple")
        await store.set_password("bob@example.org", "new staple")
        assert store.users() == ["alice@example.org", "bob@example.org"]
    async with open_store(options) as store:
        assert store.users() == ["alice@example.org", "bob@example.org"]
        assert _password_ok(store, "alice@example.org", "correct horse")
        assert _password_ok(store, "bob@example.org", "new staple")
        assert not _password_ok(store, "bob@example.org", "battery staple")
        for c in (store.credentials("alice@example.org") or {}).values():
            assert c.iterations >= 4096
            assert len(c.salt) >= 16


async def test_no_password_or_key_in_the_data_directory(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "Sup3rSecretPassw0rd")
        creds = store.credentials("alice@example.org")
        assert creds is not None
        stored_keys = [c.stored_key for c in creds.values()]
    for path in options.directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"Sup3rSecretPassw0rd" not in data
            for key in stored_keys:
                assert key not in data, f"{path} holds a StoredKey in the clear"


async def test_duplicate_and_missing_users(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "pw-one")
        with pytest.raises(UserExistsError, match="already exists"):
            await store.add_user("alice@example.org", "pw-two")
        with pytest.raises(NoSuchUserError, match="no such user"):
            await store.set_password("carol@example.org", "pw")
        with pytest.raises(NoSuchUserError, match="no such user"):
            await store.delete_user("carol@example.org")
        assert _password_ok(store, "alice@example.org", "pw-one")


def test_local_user_validation(options: StoreOptions) -> None:
    store = Store.open(options)
    try:
        assert store.local_user("Alice@Example.org", "example.org") == "alice@example.org"
        with pytest.raises(NoSuchUserError, match="not a valid JID"):
            store.local_user("a b@example.org", "example.org")
        with pytest.raises(NoSuchUserError, match="bare user JID"):
            store.local_user("example.org", "example.org")
        with pytest.raises(NoSuchUserError, match="bare user JID"):
            store.local_user("a@example.org/r", "example.org")
        with pytest.raises(NoSuchUserError, match="domain"):
            store.local_user("a@other.org", "example.org")
    finally:
        store.close()


async def test_concurrent_writes_apply_in_index_order(options: StoreOptions) -> None:
    async with open_store(options) as store:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(store.add_user, f"user{i}@example.org", f"password-{i}")
        assert len(store.users()) == 40
        assert store.state.applied_index == store.log.last_index == 40
    async with open_store(options) as store:
        assert len(store.users()) == 40


async def test_cancelled_writer_still_reaches_the_views(options: StoreOptions) -> None:
    async with open_store(options) as store:
        with trio.move_on_after(0):
            await store.commit(
                Record(ACCOUNT_DELETE, {"u": "ghost@example.org"})
            )  # shielded: finishes despite the expired deadline
        assert store.state.applied_index == store.log.last_index == 1


async def test_submitted_records_share_a_batch_and_apply_in_order(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
        batches = store.log.batches_written
        pending = [
            await store.submit(Record(ACCOUNT_DELETE, {"u": f"ghost{i}@example.org"}))
            for i in range(5)
        ]
        assert [p.index for p in pending] == [2, 3, 4, 5, 6]
        assert not any(p.durable for p in pending)
        # Waiting for the last one is enough: the writer applies whole batches, in order.
        assert await pending[-1].wait() == 6
        assert store.state.applied_index == 6
        assert all(p.durable for p in pending)
        assert [await p.wait() for p in pending] == [2, 3, 4, 5, 6]
        assert store.log.batches_written == batches + 1


async def test_a_submitted_record_is_applied_with_nobody_waiting(options: StoreOptions) -> None:
    async with open_store(options) as store:
        progress = store._applied_progress
        await store.submit(Record(ACCOUNT_DELETE, {"u": "ghost@example.org"}))
        with trio.fail_after(5):
            await progress.wait()  # set by the log's writer as it applies the batch
        assert store.state.applied_index == store.log.last_index == 1


def _unseal_all(log_dir: Path, vault: crypto.UserKeyVault, user: str) -> list[bytes]:
    """Open every sealed record of ``user`` in the log at ``log_dir`` with ``vault``."""
    old_log = SegmentLog.open(log_dir)
    try:
        sealed = [r for r in old_log.scan(1) if r.body.get("u") == user and "s" in r.body]
        assert sealed
        return [crypto.unseal(vault, r.type, user, r.body["id"], r.body["s"]) for r in sealed]
    finally:
        old_log.close()


async def test_delete_shreds_old_records(options: StoreOptions, tmp_path: Path) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
        await store.add_user("bob@example.org", "bob password")
    copy = tmp_path / "copy-before-delete"
    shutil.copytree(options.directory, copy)
    async with open_store(options) as store:
        await store.delete_user("alice@example.org")
        assert store.users() == ["bob@example.org"]
        assert not store.vault.has_user("alice@example.org")
    # Old segments copied before the delete still hold alice's sealed records, but her data
    # key is gone from the live vault: those ciphertexts can no longer be opened.
    keyset = crypto.Keyset.load(options.keyset)
    live_vault = crypto.UserKeyVault.open(options.directory / "vault", keyset)
    with pytest.raises(ShreddedError):
        _unseal_all(copy / "log", live_vault, "alice@example.org")
    # Re-creating the user gives a fresh key; the old incarnation stays unreadable.
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "second life")
    async with open_store(options) as store:
        assert _password_ok(store, "alice@example.org", "second life")


async def test_old_vault_copies_die_with_their_keyset_key(
    options: StoreOptions, tmp_path: Path
) -> None:
    """A copy of the vault taken before a delete is a key backup: it still opens the deleted
    user's records while the key that wrapped it exists. Rotating and retiring old keys
    (`villaged keys rotate`, `villaged keys retire`) ends that."""
    from villaged.config import load_config
    from villaged.ops.keys import retire_old_keys, rotate_keys

    config_file = tmp_path / "villaged.toml"
    config_file.write_text(
        f'[server]\ndomain = "example.org"\n[storage]\ndir = "{options.directory}"\n'
        f'keyset = "{options.keyset}"\n[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
    )
    config = load_config(config_file)
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
    copy = tmp_path / "copy-before-delete"
    shutil.copytree(options.directory, copy)
    async with open_store(options) as store:
        await store.delete_user("alice@example.org")

    keyset = crypto.Keyset.load(options.keyset)
    copied_vault = crypto.UserKeyVault.open(copy / "vault", keyset)
    assert _unseal_all(copy / "log", copied_vault, "alice@example.org")  # the honest limit

    await rotate_keys(config)
    result = await retire_old_keys(config)
    assert result.retired == (1,)
    keyset = crypto.Keyset.load(options.keyset)
    assert keyset.key_ids == (2,)
    copied_vault = crypto.UserKeyVault.open(copy / "vault", keyset)
    with pytest.raises(KeyManagementError, match="1"):
        _unseal_all(copy / "log", copied_vault, "alice@example.org")


async def test_open_finishes_an_interrupted_delete(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
        # The delete record is durable but the process "dies" before destroying the key.
        await store.commit(Record(ACCOUNT_DELETE, {"u": "alice@example.org"}))
        assert store.vault.has_user("alice@example.org")
    async with open_store(options) as store:
        assert store.users() == []
        assert not store.vault.has_user("alice@example.org")


async def test_snapshot_rebuild_and_compaction(options: StoreOptions) -> None:
    small = StoreOptions(
        directory=options.directory,
        keyset=options.keyset,
        segment_bytes=4096,
        max_record_bytes=2048,
        snapshot_every=5,
    )
    async with open_store(small) as store:
        for i in range(12):
            await store.add_user(f"u{i}@example.org", f"password {i}")
        await store.delete_user("u3@example.org")
        snap = store.log.latest_snapshot()
        assert snap is not None
        assert snap.index >= 10
        assert store.log.first_index > 1, "segments covered by the snapshot were compacted"
        expected = store.users()
    async with open_store(small) as store:
        assert store.users() == expected
        assert _password_ok(store, "u11@example.org", "password 11")
        assert "u3@example.org" not in store.users()


def test_format_and_lock_errors(options: StoreOptions, tmp_path: Path) -> None:
    store = Store.open(options)
    with pytest.raises(DataDirError, match="in use by another villaged process"):
        Store.open(options)
    store.close()
    Store.open(options).close()  # the lock is released on close

    (options.directory / "FORMAT").write_text("villaged-storage 99\n")
    with pytest.raises(DataDirError, match="villaged-storage 99"):
        Store.open(options)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").write_text("not ours")
    with pytest.raises(DataDirError, match="no FORMAT file"):
        Store.open(StoreOptions(directory=foreign, keyset=options.keyset))
    assert (foreign / "something").read_text() == "not ours"


async def test_unknown_record_type_is_refused_with_its_index(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "pw pw pw")
        await store.log.append(Record("future.thing", {"x": 1}))
    with pytest.raises(StorageError, match=r"log index 2: unknown record type 'future.thing'"):
        Store.open(options)


async def test_newer_schema_version_is_refused(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.log.append(Record(ACCOUNT_CREATE, {"u": "a@example.org"}, version=7))
    with pytest.raises(StorageError, match="schema version 7"):
        Store.open(options)


async def test_malformed_record_is_refused_before_anything_is_written(
    options: StoreOptions,
) -> None:
    async with open_store(options) as store:
        with pytest.raises(StateError, match="'u' is missing"):
            await store.commit(Record(ACCOUNT_CREATE, {"id": "r1", "s": {}}))
        with pytest.raises(StateError, match="no sealed secrets"):
            await store.commit(Record(ACCOUNT_CREATE, {"u": "a@example.org", "id": "r1"}))
        with pytest.raises(StateError, match="unknown record type"):
            await store.commit(Record("no.such.type", {"u": "a@example.org"}))
        assert store.log.last_index == 0


async def test_a_durable_record_that_cannot_apply_fails_the_store_loudly(
    options: StoreOptions,
) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
        account = store.state.accounts.get("alice@example.org")
        assert account is not None
        junk = {"k": account.sealed["k"], "n": b"\0" * 12, "c": b"\0" * 40}
        with pytest.raises(StoreFailedError, match="log index 2 is durable but cannot be applied"):
            await store.commit(
                Record(ACCOUNT_PASSWORD, {"u": "alice@example.org", "id": "r2", "s": junk})
            )
        with trio.fail_after(5), pytest.raises(StoreFailedError):
            await store.add_user("bob@example.org", "bob password")
    # The bad record is durable; opening again names it instead of starting half-applied.
    with pytest.raises(StorageError, match="log index 2"):
        Store.open(options)


async def test_a_failing_snapshot_does_not_fail_commits(
    options: StoreOptions, caplog: pytest.LogCaptureFixture
) -> None:
    small = StoreOptions(directory=options.directory, keyset=options.keyset, snapshot_every=2)
    async with open_store(small) as store:

        async def broken(index: int, term: int, data: bytes) -> None:
            raise LogWriteError("disk full (simulated)")

        store.log.save_snapshot = broken  # type: ignore[method-assign]
        for i in range(6):
            await store.add_user(f"u{i}@example.org", f"password {i}")
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.users()) == 6
    assert any(getattr(r, "event", "") == "storage.snapshot_failed" for r in caplog.records)


async def test_short_lived_processes_still_snapshot(options: StoreOptions) -> None:
    small = StoreOptions(directory=options.directory, keyset=options.keyset, snapshot_every=5)
    for session in range(4):
        async with open_store(small) as store:
            for i in range(3):
                await store.add_user(f"s{session}u{i}@example.org", "password")
    async with open_store(small) as store:
        snapshot = store.log.latest_snapshot()
        assert snapshot is not None
        assert snapshot.index >= 5
        assert len(store.users()) == 12


async def test_missing_data_key_is_reported(
    options: StoreOptions, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
    for path in (options.directory / "vault").iterdir():
        path.unlink()
    store = Store.open(options)
    try:
        assert store.users() == ["alice@example.org"]
        assert store.credentials("alice@example.org") is None  # cannot log in
    finally:
        store.close()
    events = [r for r in caplog.records if getattr(r, "event", "") == "storage.account_key_missing"]
    assert events
    assert getattr(events[0], "user", None) == "alice@example.org"
    assert getattr(events[0], "security", None) is True


def test_node_secret_is_made_once_and_kept(options: StoreOptions) -> None:
    store = Store.open(options)
    try:
        first = store.node_secret("sasl_unknown_user")
        assert len(first) == 32
        assert store.node_secret("sasl_unknown_user") == first
        path = options.directory / "secrets" / "sasl_unknown_user"
        assert path.stat().st_mode & 0o777 == 0o600
        path.write_bytes(b"short")
        with pytest.raises(DataDirError, match="damaged"):
            store.node_secret("sasl_unknown_user")
        with pytest.raises(ValueError, match="bad secret name"):
            store.node_secret("../x")
    finally:
        store.close()


class _NotesView:
    """A view of sealed notes, to watch how the store opens what it applies."""

    name = "notes"
    record_types: Mapping[str, int] = {"note": 1}

    def __init__(self) -> None:
        self.notes: list[bytes] = []

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        pass

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Any) -> None:
        try:
            self.notes.append(unseal(rtype, body["u"], body["id"], body["s"]))
        except ShreddedError:
            self.notes.append(b"<shredded>")

    def to_snapshot(self) -> Any:
        return None

    def restore(self, data: Any, unseal: Any) -> None:
        pass


async def test_a_record_sealed_here_applies_without_decrypting_unless_its_key_is_gone(
    options: StoreOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    decrypted: list[str] = []
    real_unseal = crypto.unseal

    def counting_unseal(*args: Any) -> bytes:
        decrypted.append(args[3])
        return real_unseal(*args)

    monkeypatch.setattr(crypto, "unseal", counting_unseal)
    view = _NotesView()
    async with open_store(options, [view]) as store:
        await store.add_user("alice@example.org", "alice password")
        decrypted.clear()
        body = await store.sealed_body("note", "alice@example.org", b"first")
        await store.commit(Record("note", body))
        assert view.notes == [b"first"]
        assert decrypted == []  # the plaintext sealed here was used as it was
        # A body whose user's key was destroyed before it applied is shredded, exactly as
        # replaying the log would find it.
        body = await store.sealed_body("note", "alice@example.org", b"second")
        store.vault.destroy("alice@example.org")
        await store.commit(Record("note", body))
        assert view.notes == [b"first", b"<shredded>"]
        assert decrypted == [body["id"]]
    view = _NotesView()
    async with open_store(options, [view]):
        assert view.notes == [b"<shredded>", b"<shredded>"]  # replay: every note decrypted


async def test_sealed_but_never_submitted_plaintexts_are_bounded(options: StoreOptions) -> None:
    async with open_store(options) as store:
        await store.add_user("alice@example.org", "alice password")
        for _ in range(store_module._SEALED_MEMO_LIMIT + 10):
            await store.sealed_body("note", "alice@example.org", b"abandoned")
        assert len(store._sealed_here) == store_module._SEALED_MEMO_LIMIT
