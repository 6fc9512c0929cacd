"""`villaged backup`: a backup of a live node while clients send holds every acknowledged
message, verifies, catches corrupted, missing, extra and tampered files and a forged manifest,
restores into a node that serves the archives, and is pruned by --keep."""

from __future__ import annotations

import json
import os
import shutil
import stat
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.e2e.test_durability import archived_bodies
from tests.net.rawclient import RawClient
from tests.nodes import add_users, start_node, write_node_config
from villaged.cli import main
from villaged.config import load_config
from villaged.ops import backup
from villaged.storage.store import StoreOptions, open_store

if TYPE_CHECKING:
    from pathlib import Path

    from tests.nodes import RunningNode
    from villaged.config import Config


async def login(node: RunningNode, user: str) -> RawClient:
    client = await RawClient.connect(node.c2s_tls, node.ca_file, direct_tls=True)
    await client.login(user, f"{user}-password", starttls=False)
    return client


async def send_acknowledged(alice: RawClient, first: int, count: int) -> list[str]:
    """Send ``count`` messages to bob, then a ping: answered means every one is durable."""
    bodies = [f"m{n}" for n in range(first, first + count)]
    for body in bodies:
        message = f"<message to='bob@localhost' type='chat' id='{body}'><body>{body}</body>"
        await alice.send(message.encode() + b"</message>")
    await alice.send(f"<iq type='get' id='p{first}'><ping xmlns='urn:xmpp:ping'/></iq>".encode())
    with trio.fail_after(20):
        while True:
            reply = await alice.element()
            assert reply.get("type") != "error", reply.get("id")
            if reply.get("id") == f"p{first}":
                return bodies


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, set[str]]:
    """A backup taken from a live node while alice keeps sending; the bodies acknowledged
    before it started."""
    tmp_path = tmp_path_factory.mktemp("backup")
    result: list[tuple[Path, set[str]]] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, tmp_path)
            alice = await login(node, "alice")
            acked: set[str] = set()
            for round_ in range(5):
                acked.update(await send_acknowledged(alice, round_ * 100, 20))
            stop = trio.Event()

            async def keep_sending() -> None:
                first = 10_000
                while not stop.is_set() and first < 20_000:
                    await send_acknowledged(alice, first, 5)
                    first += 5

            nursery.start_soon(keep_sending)
            await trio.sleep(0.05)
            made = await trio.to_thread.run_sync(
                lambda: backup.create_backup(node.config, tmp_path / "backups")
            )
            stop.set()
            await trio.sleep(0.2)
            await alice.aclose()
            result.append((made.directory, acked))
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    config = load_config(tmp_path / "node" / "villaged.toml")
    directory, acked = result[0]
    return config, directory, acked


@pytest.fixture
def copy(made: tuple[Config, Path, set[str]], tmp_path: Path) -> Path:
    shutil.copytree(made[1], tmp_path / made[1].name)
    return tmp_path / made[1].name


def test_a_backup_of_a_live_node_verifies(made: tuple[Config, Path, set[str]]) -> None:
    config, directory, acked = made
    result = backup.verify_backup(
        directory, public_key=config.storage.keyset.parent / backup.PUBLIC_KEY
    )
    assert result.public_key_checked
    assert result.users == 3
    assert result.archived_messages >= 2 * len(acked)  # each message is in alice's and bob's
    manifest = json.loads((directory / backup.MANIFEST).read_bytes())
    assert manifest["format"] == backup.FORMAT
    assert manifest["counts"]["users"] == 3
    assert any(f["path"].startswith("data/vault/") for f in manifest["files"])
    assert not any("keyset" in f["path"] for f in manifest["files"])  # kept separately
    assert stat.S_IMODE((config.storage.keyset.parent / backup.SIGNING_KEY).stat().st_mode) == 0o600
    for path in (directory / "data").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600)


def test_the_cli_verifies_the_newest_backup_of_a_directory(
    made: tuple[Config, Path, set[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup", "verify", str(made[1].parent)]) == 0
    assert "ok:" in capsys.readouterr().out


def segment(directory: Path) -> Path:
    return sorted((directory / "data" / "log").glob("*.seg"))[0]


def expect_failure(
    directory: Path, naming: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["backup", "verify", str(directory), *extra])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("villaged: error: ")
    assert naming in err, err


def test_a_corrupted_segment_is_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = segment(copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    expect_failure(copy, path.name, capsys)


def test_a_missing_file_is_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = sorted((copy / "data" / "vault").iterdir())[0]
    victim.unlink()
    expect_failure(copy, f"{victim.name}: missing", capsys)


def test_an_extra_file_is_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "data" / "log" / "stray.seg").write_bytes(b"x")
    expect_failure(copy, "stray.seg: not listed", capsys)


def test_a_modified_manifest_fails_its_signature(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((copy / backup.MANIFEST).read_bytes())
    manifest["counts"]["archived_messages"] += 1
    (copy / backup.MANIFEST).write_bytes(json.dumps(manifest).encode())
    expect_failure(copy, "manifest.json: signature does not verify", capsys)


def test_a_forged_manifest_is_caught_with_the_public_key_kept_elsewhere(
    made: tuple[Config, Path, set[str]], copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The forger edits a file, rewrites its digest and re-signs with a key of their own,
    # replacing the public key in the backup too: only the key kept elsewhere catches it.
    path = segment(copy)
    path.write_bytes(path.read_bytes()[:-1])
    manifest = json.loads((copy / backup.MANIFEST).read_bytes())
    for entry in manifest["files"]:
        if entry["path"] == f"data/log/{path.name}":
            entry["size"] -= 1
            entry["sha256"] = backup._sha256_file(path)
    body = backup._canonical(manifest)
    forger = Ed25519PrivateKey.generate()
    (copy / backup.MANIFEST).write_bytes(body)
    import base64

    (copy / backup.SIGNATURE).write_bytes(base64.b64encode(forger.sign(body)))
    (copy / backup.PUBLIC_KEY).write_bytes(
        forger.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    kept = made[0].storage.keyset.parent / backup.PUBLIC_KEY
    expect_failure(copy, "signature does not verify with", capsys, "--public-key", str(kept))
    # With the node's config, its own public key (beside the keyset) is used by default.
    expect_failure(copy, "signature does not verify with", capsys, "-c", str(made[0].source))


def test_a_restored_node_serves_the_users_and_their_archives(
    made: tuple[Config, Path, set[str]], tmp_path: Path
) -> None:
    config, directory, acked = made
    restored_path = write_node_config(tmp_path / "restored")
    restored = load_config(restored_path)
    shutil.copyfile(config.storage.keyset, restored.storage.keyset)  # the keyset kept aside
    assert main(["backup", "restore", str(directory), "-c", str(restored_path)]) == 0
    with pytest.raises(SystemExit):  # a second restore refuses the now non-empty directory
        main(["backup", "restore", str(directory), "-c", str(restored_path)])
    assert stat.S_IMODE(restored.storage.dir.stat().st_mode) == 0o700
    # Private keys never travel in a backup: the audit signing key is restored from where it
    # is kept, like the keyset; the node secret is made afresh.
    key = config.storage.dir / "audit" / "audit-signing.key"
    assert not list(directory.rglob("audit-signing.key"))
    assert not list(directory.rglob("sasl_unknown_user"))
    shutil.copyfile(key, restored.storage.dir / "audit" / "audit-signing.key")
    (restored.storage.dir / "audit" / "audit-signing.key").chmod(0o600)

    async def check() -> None:
        from functools import partial

        from villaged.app import run_node

        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_node, restored, handle_signals=False))
            port = restored.listeners.c2s_tls.bind[0].port
            for user in ("alice", "bob"):
                client = await RawClient.connect(port, restored.tls.cert, direct_tls=True)
                await client.login(user, f"{user}-password", starttls=False)
                with trio.fail_after(60):
                    bodies = set(await archived_bodies(client))
                assert acked <= bodies, sorted(acked - bodies)[:5]
                await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(check)


def test_keep_prunes_the_oldest_backups_only(
    made: tuple[Config, Path, set[str]], tmp_path: Path
) -> None:
    config = made[0]
    target = tmp_path / "kept"
    target.mkdir()
    (target / "unrelated").mkdir()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    names = []
    for day in range(4):
        result = backup.create_backup(config, target, keep=2, now=start + timedelta(days=day))
        names.append(result.directory.name)
    assert sorted(p.name for p in target.iterdir()) == sorted([*names[-2:], "unrelated"])
    with pytest.raises(backup.BackupError):
        backup.create_backup(config, target, keep=0)
    assert not any(p.name.startswith(".") for p in target.iterdir())
    assert os.listdir(target / names[-1])


def test_a_restore_cut_short_leaves_the_old_data_directory_as_it_was(
    made: tuple[Config, Path, set[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, directory, _ = made
    target_path = write_node_config(tmp_path / "target")
    target = load_config(target_path)
    shutil.copyfile(config.storage.keyset, target.storage.keyset)
    target.storage.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (target.storage.dir / "old-data").write_bytes(b"what was here before")
    copied: list[Path] = []
    real_copy = backup._copy_file

    def fail_on_the_third(source: Path, destination: Path) -> None:
        copied.append(destination)
        if len(copied) == 3:
            raise OSError(28, "No space left on device")
        real_copy(source, destination)

    monkeypatch.setattr(backup, "_copy_file", fail_on_the_third)
    with pytest.raises(backup.BackupError, match="No space left on device"):
        backup.restore_backup(directory, target, force=True)
    assert sorted(p.name for p in target.storage.dir.iterdir()) == ["old-data"]
    assert [p.name for p in target.storage.dir.parent.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(backup, "_copy_file", real_copy)
    backup.restore_backup(directory, target, force=True)  # and then it works, replacing it
    assert not (target.storage.dir / "old-data").exists()
    assert (target.storage.dir / "FORMAT").is_file()


def test_create_needs_a_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_node_config(tmp_path / "node")
    with pytest.raises(SystemExit) as exit_:
        main(["backup", "create", "-c", str(config)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("villaged: error: where to? pass --to DIR or set [backup] dir in ")
    assert err.count("\n") == 1


def test_the_backup_status_ignores_a_damaged_or_stale_note(tmp_path: Path) -> None:
    assert backup.read_backup_status(tmp_path / "absent") == backup.BackupStatus(None, None, 0)
    kept = tmp_path / "villaged-backup-20261129T101500000000Z"
    kept.mkdir()
    (tmp_path / "villaged-backup-20261399T000000000000Z").mkdir()  # no such day: not a backup
    status = tmp_path / backup.VERIFIED_STATUS
    status.write_text("{not json")
    read = backup.read_backup_status(tmp_path)
    assert (read.newest_verified, read.count) == (None, 1)
    assert read.newest_created == datetime(2026, 11, 29, 10, 15, tzinfo=UTC).timestamp()
    status.write_text('{"backup": "villaged-backup-20200101T000000000000Z", "verified": 5}')
    assert backup.read_backup_status(tmp_path).newest_verified is None  # pruned since
    status.write_text(f'{{"backup": "{kept.name}", "verified": 7}}')
    assert backup.read_backup_status(tmp_path).newest_verified == 7.0


def test_an_account_deleted_while_the_backup_copies_keeps_the_backup_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletion destroys the user's data key after the log records it; a backup whose log cut
    comes before the deletion and whose vault copy comes after holds the account without its
    key. That backup still verifies and restores: the account is there, shredded (it cannot
    log in and its sealed data stays unreadable), as the deletion asked."""
    from villaged.storage import crypto

    config = load_config(write_node_config(tmp_path / "node"))
    trio.run(add_users, config)
    copy_log = backup._copy_log

    def delete_bob_meanwhile(source: Path, destination: Path) -> dict[str, int]:
        info = copy_log(source, destination)
        keyset = crypto.Keyset.load(config.storage.keyset)
        assert crypto.UserKeyVault.open(config.storage.dir / "vault", keyset).destroy(
            "bob@localhost"
        )
        return info

    monkeypatch.setattr(backup, "_copy_log", delete_bob_meanwhile)
    made = backup.create_backup(config, tmp_path / "backups")
    checked = backup.verify_backup(made.directory, keyset=config.storage.keyset)
    assert checked.users == 3
    restored = load_config(write_node_config(tmp_path / "restored"))
    shutil.rmtree(restored.storage.dir, ignore_errors=True)
    shutil.copy(config.storage.keyset, restored.storage.keyset)
    backup.restore_backup(made.directory, restored)

    async def logins() -> dict[str, bool]:
        async with open_store(StoreOptions.from_config(restored.storage)) as store:
            return {user: store.credentials(user) is not None for user in store.users()}

    assert trio.run(logins) == {
        "alice@localhost": True,
        "bob@localhost": False,
        "carol@localhost": True,
    }


def test_verify_replays_beside_the_backups_not_in_tmp(
    copy: Path, made: tuple[Config, Path, set[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from villaged.storage.verify import verify_store as check

    seen: list[Path] = []

    def spy(directory: Path) -> object:
        seen.append(directory)
        return check(directory)

    monkeypatch.setattr(backup, "verify_store", spy)
    backup.verify_backup(copy, keyset=made[0].storage.keyset)
    (scratch,) = seen
    assert scratch.parent.parent == copy.parent
    assert scratch.parent.name.startswith(".villaged-backup-replay-")
    assert not scratch.exists()  # removed afterwards
    assert backup.list_backups(copy.parent) == [copy]


def test_the_keyset_wrapped_for_a_recovery_key_restores_a_new_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recovery = tmp_path / "offline" / "recovery.key"
    recovery.parent.mkdir()
    assert main(["backup", "keygen", "--out", str(recovery)]) == 0
    assert stat.S_IMODE(recovery.stat().st_mode) == 0o600
    public = recovery.with_name("recovery.key.pub")
    assert public.is_file()
    with pytest.raises(SystemExit):  # never overwrites a recovery key
        main(["backup", "keygen", "--out", str(recovery)])
    assert "already exists" in capsys.readouterr().err

    config_path = write_node_config(tmp_path / "node", f'[backup]\nkeyset_recipient = "{public}"')
    config = load_config(config_path)
    trio.run(add_users, config)
    made = backup.create_backup(config, tmp_path / "backups")
    wrapped = made.directory / "keyset.wrapped"
    assert stat.S_IMODE(wrapped.stat().st_mode) == 0o600
    keyset_bytes = config.storage.keyset.read_bytes()
    assert keyset_bytes not in wrapped.read_bytes()
    manifest = json.loads((made.directory / backup.MANIFEST).read_bytes())
    assert manifest["keyset"]["wrapped"] is True
    assert "keyset.wrapped" in [f["path"] for f in manifest["files"]]  # signed like the rest

    # The host is lost with its keyset: a new one restores from the backup, the recovery key and
    # the backup signing key the operators kept off the host.
    signer = tmp_path / "offline" / "backup-signing.pub"
    shutil.copy(config.storage.keyset.parent / backup.PUBLIC_KEY, signer)
    new = load_config(write_node_config(tmp_path / "new"))
    shutil.rmtree(new.storage.dir, ignore_errors=True)
    new.storage.keyset.unlink()
    keys = ["--recovery-key", str(recovery), "--public-key", str(signer)]
    assert main(["backup", "verify", str(made.directory), *keys]) == 0
    with pytest.raises(SystemExit):  # without a trusted signing key: refused
        main(["backup", "verify", str(made.directory), "--recovery-key", str(recovery)])
    assert "needs --public-key" in capsys.readouterr().err
    restore = ["backup", "restore", str(made.directory), "-c", str(new.source)]
    assert main([*restore, *keys]) == 0
    assert new.storage.keyset.read_bytes() == keyset_bytes
    assert stat.S_IMODE(new.storage.keyset.stat().st_mode) == 0o600

    async def can_log_in() -> list[str]:
        async with open_store(StoreOptions.from_config(new.storage)) as store:
            return [user for user in store.users() if store.credentials(user) is not None]

    assert len(trio.run(can_log_in)) == 3


def test_a_wrong_recovery_key_or_a_damaged_wrapping_is_named(tmp_path: Path) -> None:
    from villaged.ops import backupkeys

    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    public = backupkeys.generate_recovery_key(right)
    backupkeys.generate_recovery_key(wrong)
    wrapped = tmp_path / "keyset.wrapped"
    wrapped.write_bytes(backupkeys.wrap_keyset(b'{"keys": []}', public, "example.org"))
    assert backupkeys.unwrap_keyset(wrapped, right, "example.org") == b'{"keys": []}'
    with pytest.raises(backupkeys.RecoveryKeyError, match="not the recovery key"):
        backupkeys.unwrap_keyset(wrapped, wrong, "example.org")
    with pytest.raises(backupkeys.RecoveryKeyError, match="another domain"):
        backupkeys.unwrap_keyset(wrapped, right, "example.net")
    document = json.loads(wrapped.read_bytes())
    document["ciphertext"] = document["ciphertext"][:-8] + "AAAAAAA="
    wrapped.write_text(json.dumps(document))
    with pytest.raises(backupkeys.RecoveryKeyError, match="does not open"):
        backupkeys.unwrap_keyset(wrapped, right, "example.org")
    wrapped.write_text("not json")
    with pytest.raises(backupkeys.RecoveryKeyError, match="not a wrapped keyset"):
        backupkeys.unwrap_keyset(wrapped, right, "example.org")
    with pytest.raises(backupkeys.RecoveryKeyError, match="missing"):
        backupkeys.unwrap_keyset(tmp_path / "absent", right, "example.org")
    with pytest.raises(backupkeys.RecoveryKeyError, match="not a PEM public key"):
        backupkeys.wrap_keyset(b"", right, "example.org")  # a private key where a public one goes


def test_a_planted_backup_cannot_install_its_keyset(tmp_path: Path) -> None:
    """Someone who can write the backup directory makes a backup of their own node (same
    domain, their keyset wrapped to our public recovery key, signed by their own key): a
    restore with our trusted signing key refuses it, and installs no keyset."""
    from villaged.ops import backupkeys

    recovery = tmp_path / "recovery.key"
    public = backupkeys.generate_recovery_key(recovery)
    ours = load_config(
        write_node_config(tmp_path / "ours", f'[backup]\nkeyset_recipient = "{public}"')
    )
    trio.run(add_users, ours)
    backup.create_backup(ours, tmp_path / "ours-backups")
    trusted = tmp_path / "trusted.pub"
    shutil.copy(ours.storage.keyset.parent / backup.PUBLIC_KEY, trusted)

    theirs = load_config(
        write_node_config(tmp_path / "theirs", f'[backup]\nkeyset_recipient = "{public}"')
    )
    trio.run(add_users, theirs)
    planted = backup.create_backup(theirs, tmp_path / "planted")
    new = load_config(write_node_config(tmp_path / "new"))
    shutil.rmtree(new.storage.dir, ignore_errors=True)
    new.storage.keyset.unlink()
    with pytest.raises(backup.BackupError, match="signature does not verify"):
        backup.restore_backup(planted.directory, new, public_key=trusted, recovery_key=recovery)
    assert not new.storage.keyset.exists()

    # A wrapped keyset swapped into a genuine backup is not the file the manifest lists.
    genuine = backup.find_backup(tmp_path / "ours-backups")
    shutil.copy(planted.directory / "keyset.wrapped", genuine / "keyset.wrapped")
    with pytest.raises(backup.BackupError, match="not the file the signed manifest lists"):
        backup.restore_backup(genuine, new, public_key=trusted, recovery_key=recovery)
    assert not new.storage.keyset.exists()


def test_keygen_never_replaces_a_public_recovery_key(tmp_path: Path) -> None:
    from villaged.ops import backupkeys

    private = tmp_path / "recovery.key"
    public = backupkeys.generate_recovery_key(private)
    before = public.read_bytes()
    private.unlink()  # taken offline; the .pub stays where keyset_recipient names it
    with pytest.raises(backupkeys.RecoveryKeyError, match=r"recovery\.key\.pub already exists"):
        backupkeys.generate_recovery_key(private)
    assert public.read_bytes() == before
    assert not private.exists()


def test_stale_scratch_copies_are_pruned(tmp_path: Path) -> None:
    old = tmp_path / ".villaged-backup-replay-abc"
    young = tmp_path / ".villaged-backup-replay-def"
    partial = tmp_path / ".villaged-backup-20261129T101500000000Z.partial"
    other = tmp_path / ".something-else"
    for path in (old, young, partial, other):
        (path / "data").mkdir(parents=True)
    day_ago = datetime.now(UTC).timestamp() - backup.STALE_SCRATCH_S - 10
    for path in (old, partial, other):
        os.utime(path, (day_ago, day_ago))
    backup.prune_backups(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".something-else", young.name]
