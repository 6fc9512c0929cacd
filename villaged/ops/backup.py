"""Verified backups of a node's data directory: ``villaged backup create | verify | restore``.

This module owns a backup directory and the steps that make, check and restore one.

Layout (one directory per backup, ``villaged-backup-<UTC yyyymmddThhmmssffffffZ>``)::

    data/...               the copied data directory, same relative paths       0600 / 0700
    manifest.json          what was copied, canonical JSON (below)               0600
    manifest.sig           base64 Ed25519 signature over manifest.json's bytes    0600
    backup-signing.pub     the signer's public key (SubjectPublicKeyInfo PEM)    0644

Consistency without the lock
----------------------------
A live node holds an exclusive lock on its data directory, so ``create`` never opens the
store: it reads files. The log is append-only with CRC-framed records, which makes a consistent
cut cheap. The log directory is listed first (that moment is "when the backup started"); sealed
segments and snapshot files are copied whole; the newest segment (the active one) is read to
its end and cut back to the end of its last whole, CRC-valid record frame, using the same
scanner recovery uses (:func:`~villaged.storage.segment.scan_segment`). Every record
acknowledged before the listing was ``fdatasync``-ed before it was acknowledged, so it lies in
the bytes read; a final frame still being written (torn) is never copied, and damage that is
not a torn tail (:func:`~villaged.storage.segment.assess_damage`) fails the backup instead of
being cut. Records written but not yet acknowledged may be included whole, exactly as crash
recovery would keep them. If a listed file disappears while it is copied (compaction removed a
segment covered by a newer snapshot), the whole copy starts again, at most
:data:`COPY_ATTEMPTS` times.

The rest of the data directory (``FORMAT``, ``vault/`` with the per-user data keys, ``audit/``,
``admin/`` with the operators file, ``secrets/``, and anything a later feature adds) is copied
after the log, as is: a user created after the cut may bring a vault file the log copy does not
need, never the other way round (a data key is stored before the first record sealed with it).
``LOCK``, temporary files (``*.tmp``, ``.*.tmp-*``) and anything not a regular file are skipped;
``*.jsonl`` files (the audit log, appended live) are cut after their last newline.

The keyset is NOT in the backup
-------------------------------
Every user data key in ``vault/`` is wrapped by the keyset; a backup that held the keyset next to
them would hand everything to whoever reads the backup. So the keyset is deliberately left out,
and it must be kept separately (it changes only on ``keys rotate`` / ``keys retire``). The
manifest records its path and key ids (not key material); ``verify`` and ``restore`` need a
keyset holding those ids: the one named by ``-c FILE``, else the path in the manifest. After
``keys retire`` an older backup needs the keyset as it was before the retirement.

manifest.json
-------------
Canonical JSON (sorted keys, no spaces, UTF-8)::

    {"format": "villaged-backup 1", "domain": ..., "node": ..., "created": RFC 3339 UTC,
     "log": {"last_index": N, "segments": n, "snapshots": n},
     "keyset": {"path": "...", "key_ids": [1, 2]},
     "files": [{"path": "data/log/....seg", "size": n, "sha256": hex}, ...],
     "users": {"alice@example.org": hex, ...},
     "counts": {"users": n, "archived_messages": n}}

``files`` lists every file of the backup except the three metadata files, sorted by path.
``users`` holds, per account, SHA-256 over canonical JSON lines made by replaying the copy (the
store opened with every feature view): the account, each archived message (archive id, stamp,
record id, SHA-256 of its stored row), the roster version and entries, and the offline queue
length. Replaying a restored copy must give the same digests.

Signing
-------
The node's backup signing key is ``backup-signing.key`` (Ed25519, PKCS#8 PEM, 0600) next to
the keyset file, with ``backup-signing.pub`` beside it; ``create`` makes both on first use (the
hardened backup unit cannot write there: run ``villaged backup create`` once by hand first).
``verify`` checks the signature with the ``.pub`` stored in the backup, and with ``--public-key
FILE`` when given. A signature checked only with a key the backup itself carries proves
nothing against someone who rewrites the backup: they re-sign with their own key. Keep a copy of
the public key off the backup host and pass it as ``--public-key``.

verify, restore, retention
--------------------------
``verify DIR`` checks the signature, then every listed file's size and digest (naming the file
on a mismatch, a missing file or an unlisted extra file), copies ``data/`` into a scratch
directory, runs :func:`~villaged.storage.verify.verify_store` on it, opens it with every feature
view (a full replay) and compares the per-user digests. ``DIR`` may also be a directory of
backups (what ``--to`` names): then its newest backup is verified. ``restore DIR -c FILE``
verifies first, refuses a non-empty data directory unless ``--force``, and copies ``data/`` into
place (files 0600, directories 0700). ``create --keep N`` then deletes the oldest backups in the
target directory beyond the newest N; only directories named like ours are touched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from villaged.im.features import FeatureViews
from villaged.ops.backupkeys import WRAPPED_KEYSET, RecoveryKeyError, unwrap_keyset, wrap_keyset
from villaged.ops.tlsfiles import write_file_atomic, write_private_file
from villaged.storage.crypto import Keyset
from villaged.storage.errors import KeyManagementError
from villaged.storage.segment import (
    assess_damage,
    parse_segment_file_name,
    parse_snapshot_file_name,
    scan_segment,
)
from villaged.storage.store import Store, StoreOptions
from villaged.storage.verify import verify_store

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from villaged.config import Config

FORMAT: Final = "villaged-backup 1"
PREFIX: Final = "villaged-backup-"
_BACKUP_NAME: Final = re.compile(r"villaged-backup-\d{8}T\d{12}Z")
#: Files in the data directory that are never copied: private keys and node secrets. Like the
#: keyset, they are kept apart from backups (a backup must not be able to forge audit
#: checkpoints); a restored node makes a new node secret, and needs the audit signing key
#: restored from where it is kept.
_SECRET_NAMES: Final = frozenset({"audit-signing.key", "backup-signing.key"})
_SECRET_DIRECTORIES: Final = frozenset({"secrets"})
MANIFEST: Final = "manifest.json"
SIGNATURE: Final = "manifest.sig"
PUBLIC_KEY: Final = "backup-signing.pub"
SIGNING_KEY: Final = "backup-signing.key"
DATA: Final = "data"
#: Beside the backups: which backup last passed ``verify``, and when.
VERIFIED_STATUS: Final = "last-verified.json"
_METADATA: Final = frozenset({MANIFEST, SIGNATURE, PUBLIC_KEY})
#: Whole copies attempted when files vanish under the copy (compaction running meanwhile).
COPY_ATTEMPTS: Final = 3
#: Files and directories a backup may hold, and the manifest's size: bounds on what is read.
MAX_FILES: Final = 1_000_000
MAX_MANIFEST_BYTES: Final = 256 * 2**20
_CHUNK: Final = 2**20


class BackupError(Exception):
    """A backup could not be made, verified or restored; the message names the file."""


@dataclass(frozen=True, slots=True)
class CreateResult:
    directory: Path
    last_index: int
    users: int
    archived_messages: int
    pruned: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    directory: Path
    files: int
    last_index: int
    users: int
    archived_messages: int
    public_key_checked: bool


# ----- create --------------------------------------------------------------------------------


def create_backup(
    config: Config, target: Path, *, keep: int | None = None, now: datetime | None = None
) -> CreateResult:
    """Copy the (possibly live) data directory into a new backup under ``target``."""
    if keep is not None and keep < 1:
        raise BackupError(f"--keep {keep}: keep at least one backup")
    moment = now or datetime.now(UTC)
    source = config.storage.dir
    if not (source / "FORMAT").is_file():
        raise BackupError(f"{source} is not a villaged data directory (no FORMAT)")
    key = _load_or_create_signing_key(config.storage.keyset.parent)
    keyset = Keyset.load(config.storage.keyset)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = PREFIX + moment.strftime("%Y%m%dT%H%M%S%fZ")
    final = target / name
    if final.exists():
        raise BackupError(f"{final} already exists")
    staging = target / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        log_info = _copy_data_directory(source, staging / DATA, _secret_check(config))
        recipient = config.backup.keyset_recipient
        if recipient is not None:
            wrapped = _wrapped_keyset(config, recipient)
            write_private_file(staging / WRAPPED_KEYSET, wrapped)
        files = _file_entries(staging)
        users, counts = _replay_digests(staging / DATA, config.storage.keyset)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "domain": config.server.domain,
            "node": config.server.node,
            "created": moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "log": log_info,
            "keyset": {
                "path": str(config.storage.keyset),
                "key_ids": list(keyset.key_ids),
                "wrapped": recipient is not None,
            },
            "files": files,
            "users": users,
            "counts": counts,
        }
        body = _canonical(manifest)
        write_private_file(staging / MANIFEST, body)
        write_private_file(staging / SIGNATURE, base64.b64encode(key.sign(body)) + b"\n")
        write_file_atomic(staging / PUBLIC_KEY, _public_pem(key.public_key()), 0o644)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pruned = prune_backups(target, keep, protect=final) if keep is not None else ()
    return CreateResult(
        final, int(log_info["last_index"]), counts["users"], counts["archived_messages"], pruned
    )


def _wrapped_keyset(config: Config, recipient: Path) -> bytes:
    try:
        return wrap_keyset(config.storage.keyset.read_bytes(), recipient, config.server.domain)
    except RecoveryKeyError as exc:
        raise BackupError(f"{exc} ([backup] keyset_recipient)") from None


def _secret_check(config: Config) -> Callable[[Path], bool]:
    """Whether a file of the data directory is a secret that stays out of backups."""
    keyset = config.storage.keyset.resolve()
    data = config.storage.dir.resolve()

    def secret(path: Path) -> bool:
        resolved = path.resolve()
        if resolved == keyset or path.name in _SECRET_NAMES:
            return True
        try:
            relative = resolved.relative_to(data)
        except ValueError:
            return False
        return relative.parts[0] in _SECRET_DIRECTORIES

    return secret


def _copy_data_directory(
    source: Path, destination: Path, secret: Callable[[Path], bool]
) -> dict[str, int]:
    for _ in range(COPY_ATTEMPTS):
        shutil.rmtree(destination, ignore_errors=True)
        destination.mkdir(mode=0o700)
        try:
            info = _copy_log(source / "log", destination / "log")
            _copy_tree(source, destination, skip_top=frozenset({"LOCK", "log"}), secret=secret)
        except FileNotFoundError:
            continue  # compaction removed a listed file: start the copy again
        return info
    raise BackupError(
        f"files in {source} kept disappearing during {COPY_ATTEMPTS} copies; try again"
    )


def _copy_log(source: Path, destination: Path) -> dict[str, int]:
    destination.mkdir(mode=0o700)
    names = sorted(p.name for p in source.iterdir()) if source.is_dir() else []
    segments = sorted(b for n in names if (b := parse_segment_file_name(n)) is not None)
    snapshots = [n for n in names if parse_snapshot_file_name(n) is not None]
    last_index = max((parse_snapshot_file_name(n) or 0 for n in snapshots), default=0)
    for name in snapshots:
        _copy_file(source / name, destination / name)
    for base in segments[:-1]:
        name = _segment_name(names, base)
        _copy_file(source / name, destination / name)
        last_index = max(last_index, base)
    if segments:
        base = segments[-1]
        name = _segment_name(names, base)
        data = (source / name).read_bytes()
        scan = scan_segment(data, base=base)
        if scan.damage is not None:
            damage = assess_damage(data, scan)
            if not damage.torn_tail:
                raise BackupError(
                    f"{source / name}: damaged at offset {damage.offset} ({damage.reason}); "
                    "run `villaged storage verify` on the stopped node"
                )
        _write_private(destination / name, data[: scan.valid_bytes])
        last_index = max(last_index, scan.last_index)
    return {"last_index": last_index, "segments": len(segments), "snapshots": len(snapshots)}


def _segment_name(names: list[str], base: int) -> str:
    return next(n for n in names if parse_segment_file_name(n) == base)


def _copy_tree(
    source: Path,
    destination: Path,
    *,
    skip_top: frozenset[str],
    secret: Callable[[Path], bool],
) -> None:
    count = 0
    for directory, subdirs, filenames in os.walk(source):
        here = Path(directory)
        relative = here.relative_to(source)
        if relative == Path("."):
            subdirs[:] = [d for d in subdirs if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        subdirs.sort()
        for sub in subdirs:
            (destination / relative / sub).mkdir(mode=0o700, exist_ok=True)
        # Signed audit checkpoints before the audit log they cover: a checkpoint copied after
        # the log could cover records the copy does not have.
        for filename in sorted(filenames, key=lambda name: (name != "checkpoints", name)):
            count += 1
            if count > MAX_FILES:
                raise BackupError(f"{source} holds more than {MAX_FILES} files")
            path = here / filename
            if _is_temporary(filename) or not path.is_file() or path.is_symlink():
                continue
            if secret(path):
                continue  # private keys and node secrets never leave the host in a backup
            if filename.endswith(".jsonl") or filename == "checkpoints":  # appended live
                data = path.read_bytes()
                _write_private(destination / relative / filename, data[: data.rfind(b"\n") + 1])
            else:
                _copy_file(path, destination / relative / filename)


def _is_temporary(name: str) -> bool:
    return name.endswith(".tmp") or (name.startswith(".") and ".tmp-" in name)


def _copy_file(source: Path, destination: Path) -> None:
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(source, "rb") as reader, os.fdopen(fd, "wb") as writer:
        shutil.copyfileobj(reader, writer, _CHUNK)
        writer.flush()
        os.fsync(writer.fileno())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())


def _file_entries(root: Path) -> list[dict[str, Any]]:
    return [
        {"path": relative, "size": path.stat().st_size, "sha256": _sha256_file(path)}
        for relative, path in _backup_files(root)
    ]


def _backup_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` but the metadata files, as (posix path, path)."""
    found: list[tuple[str, Path]] = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs.sort()
        for filename in filenames:
            path = Path(directory) / filename
            relative = path.relative_to(root).as_posix()
            if relative in _METADATA:
                continue
            found.append((relative, path))
            if len(found) > MAX_FILES:
                raise BackupError(f"{root} holds more than {MAX_FILES} files")
    return sorted(found)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ----- replay --------------------------------------------------------------------------------


def _replay_digests(data: Path, keyset: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Per-user digests from a full replay of a scratch copy of ``data`` (never ``data``
    itself: opening a store writes LOCK and may cut a torn tail).

    The scratch copy goes beside the backups when that directory is writable: it is as large
    as the backup, which a small (tmpfs) /tmp could not hold; else into $TMPDIR."""
    beside = data.parent.parent
    scratch_parent = beside if os.access(beside, os.W_OK | os.X_OK) else None
    with tempfile.TemporaryDirectory(
        prefix=".villaged-backup-replay-", dir=scratch_parent
    ) as scratch:
        copy = Path(scratch) / "data"
        shutil.copytree(data, copy)
        report = verify_store(copy)
        if not report.ok:
            raise BackupError(f"the copied data directory is damaged: {report.problems[0]}")
        views = FeatureViews()
        store = Store.open(StoreOptions(directory=copy, keyset=keyset), views.all())
        try:
            return _user_digests(store, views)
        finally:
            store.close()


def _user_digests(store: Store, views: FeatureViews) -> tuple[dict[str, str], dict[str, int]]:
    digests: dict[str, str] = {}
    archived = 0
    for jid in store.state.accounts.jids():
        digest = hashlib.sha256(_canonical(["account", jid]) + b"\n")
        archive = views.messages.archives.of(jid)
        for entry in archive.entries if archive is not None else ():
            archived += 1
            row = hashlib.sha256(entry.row).hexdigest()
            line = ["archive", entry.id, entry.stamp, entry.record_id, row]
            digest.update(_canonical(line) + b"\n")
        contacts = sorted(
            [str(e.jid), e.listed, e.name, list(e.groups)] for e in views.roster.entries(jid)
        )
        digest.update(_canonical(["roster", views.roster.version(jid), contacts]) + b"\n")
        offline = views.messages.offline.count(jid)
        digest.update(_canonical(["offline", offline]) + b"\n")
        digests[jid] = digest.hexdigest()
    return digests, {"users": len(digests), "archived_messages": archived}


# ----- verify --------------------------------------------------------------------------------


def find_backup(directory: Path) -> Path:
    """``directory`` if it is a backup, else the newest backup in it."""
    if (directory / MANIFEST).exists() or not directory.is_dir():
        return directory
    backups = list_backups(directory)
    if not backups:
        raise BackupError(f"{directory} is neither a backup nor holds any ({PREFIX}*)")
    return backups[-1]


def list_backups(directory: Path) -> list[Path]:
    """Backups in ``directory``, oldest first (their names sort by time)."""
    return sorted(
        p
        for p in directory.iterdir()
        if _BACKUP_NAME.fullmatch(p.name)
        and _backup_time_or_none(p) is not None  # (20261399T…: the right shape, no time)
        and not p.is_symlink()
        and p.is_dir()
    )


def backup_time(backup: Path) -> datetime:
    """When a backup was taken, by its name."""
    stamp = backup.name.removeprefix(PREFIX)
    return datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)


def _backup_time_or_none(backup: Path) -> datetime | None:
    try:
        return backup_time(backup)
    except ValueError:  # a name of the right shape that is no time (20261399T…): not ours
        return None


def record_verified(result: VerifyResult, now: datetime | None = None) -> Path:
    """Note beside the backups that ``result``'s backup passed ``verify`` (for the node's
    ``villaged_backup_last_verified_timestamp_seconds``); the status file written."""
    status = result.directory.parent / VERIFIED_STATUS
    document = {
        "backup": result.directory.name,
        "verified": (now or datetime.now(UTC)).timestamp(),
        "last_index": result.last_index,
    }
    write_file_atomic(status, json.dumps(document).encode() + b"\n", 0o644)
    return status


@dataclass(frozen=True, slots=True)
class BackupStatus:
    """What a node reports of its backup directory (Unix times; None: none yet)."""

    newest_created: float | None
    newest_verified: float | None
    count: int


def read_backup_status(directory: Path) -> BackupStatus:
    """The newest backup's time and the newest verification of a backup still present."""
    try:
        backups = list_backups(directory)
    except OSError:
        return BackupStatus(None, None, 0)
    created = backup_time(backups[-1]).timestamp() if backups else None
    verified = None
    try:
        raw = (directory / VERIFIED_STATUS).read_bytes()[:4096]
        document = json.loads(raw)
        if (directory / str(document["backup"])) in backups:
            verified = float(document["verified"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no verification noted (or a damaged note): reported as none
    return BackupStatus(created, verified, len(backups))


def verify_backup(
    directory: Path,
    *,
    public_key: Path | None = None,
    keyset: Path | None = None,
    recovery_key: Path | None = None,
) -> VerifyResult:
    """Check a backup completely (see the module docstring); :class:`BackupError` naming the
    first file that fails. With ``recovery_key`` the replay uses the keyset wrapped in the
    backup (villaged.ops.backupkeys), opened with that key."""
    if recovery_key is None:
        return _verify(directory, public_key, keyset)
    backup = find_backup(directory)
    with _unwrapped_keyset(backup, recovery_key, public_key) as unwrapped:
        return _verify(backup, public_key, unwrapped)


@contextlib.contextmanager
def _unwrapped_keyset(backup: Path, recovery_key: Path, public_key: Path | None) -> Iterator[Path]:
    """The keyset a backup carries, opened with the recovery key, as a 0600 file in a private
    temporary directory (never beside the backups, which must not be able to read it),
    removed afterwards."""
    keyset_bytes = unwrap_backup_keyset(backup, recovery_key, public_key)
    wanted = set(_checked_manifest(backup, public_key)["keyset"]["key_ids"])
    with tempfile.TemporaryDirectory(prefix="villaged-keyset-") as scratch:
        unwrapped = Path(scratch) / "keyset.json"
        write_private_file(unwrapped, keyset_bytes)
        try:
            held = set(Keyset.load(unwrapped).key_ids)
        except (OSError, ValueError, KeyManagementError) as exc:
            raise BackupError(f"{backup / WRAPPED_KEYSET}: not a keyset ({exc})") from None
        if not wanted <= held:
            raise BackupError(
                f"{backup / WRAPPED_KEYSET}: holds key ids {sorted(held)}, the manifest names "
                f"{sorted(wanted)}"
            )
        yield unwrapped


def unwrap_backup_keyset(backup: Path, recovery_key: Path, public_key: Path | None) -> bytes:
    """The keyset a backup carries, opened with the recovery key.

    Only a backup signed by a key the operator trusts may hand over a keyset: anyone who can
    write the backup directory could otherwise plant a backup of their own, with their own
    keyset wrapped to the (public) recovery key. So ``public_key`` — the backup signing key
    kept off the host — is required; the wrapped file must be the one the signed manifest
    lists, and the keyset must hold the key ids the manifest names."""
    if public_key is None:
        raise BackupError(
            f"{backup}: opening the keyset with a recovery key needs --public-key (the backup "
            "signing key kept off the host), so that a planted backup cannot install its keyset"
        )
    manifest = _checked_manifest(backup, public_key)
    wrapped = backup / WRAPPED_KEYSET
    listed = {entry["path"]: entry for entry in manifest["files"]}.get(WRAPPED_KEYSET)
    if listed is None:
        raise BackupError(f"{wrapped}: the manifest lists no wrapped keyset")
    if not wrapped.is_file() or _sha256_file(wrapped) != listed["sha256"]:
        raise BackupError(f"{wrapped}: missing or not the file the signed manifest lists")
    try:
        return unwrap_keyset(wrapped, recovery_key, str(manifest["domain"]))
    except RecoveryKeyError as exc:
        raise BackupError(str(exc)) from None


def _verify(directory: Path, public_key: Path | None, keyset: Path | None) -> VerifyResult:
    backup = find_backup(directory)
    manifest = _checked_manifest(backup, public_key)
    listed = {entry["path"]: entry for entry in manifest["files"]}
    present = dict(_backup_files(backup))
    for relative in sorted(listed):
        entry = listed[relative]
        path = present.get(relative)
        if path is None:
            raise BackupError(f"{backup / relative}: missing from the backup")
        if path.stat().st_size != entry["size"]:
            raise BackupError(
                f"{path}: size {path.stat().st_size}, the manifest says {entry['size']}"
            )
        if _sha256_file(path) != entry["sha256"]:
            raise BackupError(f"{path}: SHA-256 does not match the manifest")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise BackupError(f"{backup / extra[0]}: not listed in the manifest")
    keyset_path = keyset or Path(manifest["keyset"]["path"])
    users, counts = _replay_digests(backup / DATA, keyset_path)
    for jid in sorted(set(users) | set(manifest["users"])):
        if users.get(jid) != manifest["users"].get(jid):
            raise BackupError(f"{backup / DATA}: replayed state of {jid} does not match")
    if counts != manifest["counts"]:
        raise BackupError(f"{backup / DATA}: replayed counts {counts} != {manifest['counts']}")
    return VerifyResult(
        backup,
        len(listed),
        int(manifest["log"]["last_index"]),
        counts["users"],
        counts["archived_messages"],
        public_key is not None,
    )


def _checked_manifest(backup: Path, public_key: Path | None) -> dict[str, Any]:
    manifest_path = backup / MANIFEST
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BackupError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
        body = manifest_path.read_bytes()
        signature = base64.b64decode((backup / SIGNATURE).read_bytes().strip(), validate=True)
    except FileNotFoundError as exc:
        raise BackupError(f"{exc.filename}: missing from the backup") from None
    except ValueError:
        raise BackupError(f"{backup / SIGNATURE}: not a base64 signature") from None
    keys = [(backup / PUBLIC_KEY, _load_public_key(backup / PUBLIC_KEY))]
    if public_key is not None:
        keys.append((public_key, _load_public_key(public_key)))
    for path, key in keys:
        try:
            key.verify(signature, body)
        except InvalidSignature:
            raise BackupError(f"{manifest_path}: signature does not verify with {path}") from None
    try:
        manifest = json.loads(body)
        if manifest.get("format") != FORMAT:
            raise BackupError(
                f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}"
            )
        for entry in manifest["files"]:
            if not isinstance(entry["path"], str) or not isinstance(entry["size"], int):
                raise BackupError(f"{manifest_path}: malformed file entry")
        _ = (manifest["keyset"]["path"], manifest["users"], manifest["counts"], manifest["log"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackupError(f"{manifest_path}: malformed manifest") from None
    if not isinstance(manifest, dict):  # pragma: no cover - format check above
        raise BackupError(f"{manifest_path}: malformed manifest")
    return manifest


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise BackupError(f"{path}: missing") from None
    except ValueError:
        raise BackupError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BackupError(f"{path}: not an Ed25519 public key")
    return key


# ----- restore -------------------------------------------------------------------------------


def restore_backup(
    directory: Path,
    config: Config,
    *,
    force: bool = False,
    public_key: Path | None = None,
    recovery_key: Path | None = None,
) -> VerifyResult:
    """Verify the backup, then rebuild the (stopped, empty) data directory from it. With
    ``recovery_key`` and no keyset at the configured path (a new host), the keyset wrapped in
    the backup is opened and written there first (0600)."""
    keyset = config.storage.keyset
    if recovery_key is not None and not keyset.exists():
        # A new host: the backup's keyset is verified with the whole backup first, and only
        # then installed (atomically, 0600) where the config expects it.
        backup = find_backup(directory)
        with _unwrapped_keyset(backup, recovery_key, public_key) as unwrapped:
            _verify(backup, public_key, unwrapped)
            keyset.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_file(keyset, unwrapped.read_bytes())
    result = verify_backup(directory, public_key=public_key, keyset=keyset)
    destination = config.storage.dir
    if destination.exists() and any(destination.iterdir()):
        if not force:
            raise BackupError(f"{destination} is not empty; pass --force to replace it")
        lock = destination / "LOCK"
        if lock.exists():
            _refuse_if_locked(lock)
    # Built beside the target and swapped in by renames: until the last rename the old data
    # directory is untouched, and a restore cut short leaves no half-filled directory that a
    # node would start on.
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{destination.name}.restore-partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(mode=0o700)
        os.chmod(staging, 0o700)
        source = result.directory / DATA
        for directory_name, subdirs, filenames in os.walk(source):
            here = Path(directory_name)
            relative = here.relative_to(source)
            for sub in sorted(subdirs):
                if (here / sub).is_symlink():
                    raise BackupError(f"{here / sub}: a symbolic link in a backup")
                (staging / relative / sub).mkdir(mode=0o700)
            for filename in sorted(filenames):
                if not (here / filename).is_file() or (here / filename).is_symlink():
                    raise BackupError(f"{here / filename}: not a regular file")
                _copy_file(here / filename, staging / relative / filename)
        for directory_name, _, _ in os.walk(staging, topdown=False):
            _fsync_path(Path(directory_name))
        replaced = parent / f".{destination.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        if destination.exists():
            destination.rename(replaced)
        staging.rename(destination)
        _fsync_path(parent)
        shutil.rmtree(replaced, ignore_errors=True)
    except OSError as exc:
        raise BackupError(f"restoring into {destination}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_if_locked(lock: Path) -> None:
    import fcntl

    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BackupError(f"{lock.parent} is in use by a running villaged; stop it first") from None
    finally:
        os.close(fd)


# ----- retention -----------------------------------------------------------------------------


def prune_backups(target: Path, keep: int, *, protect: Path | None = None) -> tuple[Path, ...]:
    """Delete the oldest backups in ``target`` beyond the newest ``keep`` (never ``protect``,
    the one just made, even if a clock step made its name sort first)."""
    backups = [p for p in list_backups(target) if p != protect]
    doomed = tuple(backups[: max(0, len(backups) - (keep - (protect is not None)))])
    for path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise BackupError(f"{path}: cannot remove an old backup ({exc.strerror})") from None
    _remove_stale_scratch(target)
    return doomed


#: Scratch copies a verify left behind when it was killed are removed after this long.
STALE_SCRATCH_S: Final = 24 * 3600


def _remove_stale_scratch(target: Path, now: float | None = None) -> None:
    """Replay copies (``.villaged-backup-replay-*``) and cut-short backups (``.*.partial``)
    older than `STALE_SCRATCH_S`: each is as large as a backup, and only a killed run leaves
    one (a younger one may belong to a verify running right now)."""
    limit = (time.time() if now is None else now) - STALE_SCRATCH_S
    for path in target.iterdir():
        name = path.name
        stale_kind = name.startswith(".villaged-backup-replay-") or (
            name.startswith(f".{PREFIX}") and name.endswith(".partial")
        )
        try:
            if (
                stale_kind
                and path.is_dir()
                and not path.is_symlink()
                and path.lstat().st_mtime < limit
            ):
                shutil.rmtree(path)
        except OSError:
            continue  # best effort: the next run tries again


# ----- the signing key -----------------------------------------------------------------------


def _load_or_create_signing_key(directory: Path) -> Ed25519PrivateKey:
    path = directory / SIGNING_KEY
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, pem)
        write_file_atomic(directory / PUBLIC_KEY, _public_pem(key.public_key()), 0o644)
        return key
    try:
        loaded = serialization.load_pem_private_key(raw, password=None)
    except ValueError:
        raise BackupError(f"{path}: not a PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise BackupError(f"{path}: not an Ed25519 private key")
    return loaded


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
