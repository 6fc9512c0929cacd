"""Enrolled operators and their two-factor login, kept in ``<storage.dir>/admin/operators.json``.

This module owns who the operators are (a name, the Unix uid their admin-socket connections
come from, an enabled flag), each one's TOTP secret, and the state that makes a TOTP code
single-use and guessing it pointless: the last accepted time step, the count of consecutive
failed logins, and a lockout.

File format (JSON, UTF-8; mode 0600 in a 0700 directory, both owned by the daemon's user;
replaced atomically, the file and its directory fsynced)::

    {"format": "villaged-operators/1",
     "operators": [{"name": "ann", "uid": 1001, "enabled": true,
                    "created": "2026-11-29T15:00:00Z",
                    "totp": "<base64 of the Keyset.wrap blob of the 20-byte secret>",
                    "last_step": 59000123, "failures": 0, "locked_until": null}]}

``totp`` is sealed with the keyset (AES-256-GCM), bound to the operator's name as associated
data (``b"villaged operator totp " + name``): the file alone reveals no secret, and a blob
copied to another operator's entry does not open. ``last_step`` is the RFC 6238 step of the
last code accepted (null before the first login); ``locked_until`` is null or a UTC time.

Every change reads the file, changes it and writes it back under two locks: a
``threading.Lock`` (worker threads of the node) and an ``flock`` on ``operators.lock`` (the
node and ``villaged operator …`` commands run beside each other). Nothing is cached: the node
reads the file at each login, so an operator disabled or removed on the command line is refused
at their next login. A login is reported successful only after its step is on disk, so no crash
can make a used code usable again.

Everything here is synchronous and does blocking file I/O; the node calls it through
``trio.to_thread.run_sync``. Secrets never appear in a repr, an exception or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import json
import math
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from villaged.admin import totp
from villaged.ops.tlsfiles import write_private_file
from villaged.storage.errors import KeyManagementError

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from villaged.storage.crypto import Keyset

__all__ = [
    "FILE_NAME",
    "FORMAT",
    "LOCK_NAME",
    "MAX_FILE_BYTES",
    "MAX_OPERATORS",
    "LoginResult",
    "NoSuchOperatorError",
    "OperatorError",
    "OperatorExistsError",
    "OperatorFileError",
    "OperatorInfo",
    "OperatorStore",
    "check_name",
    "check_owner",
    "check_uid",
]

FORMAT: Final = "villaged-operators/1"
FILE_NAME: Final = "operators.json"
LOCK_NAME: Final = "operators.lock"
MAX_OPERATORS: Final = 1000
# One operator entry is about 300 bytes; a file near this bound is not ours.
MAX_FILE_BYTES: Final = 1 << 20
MAX_UID: Final = 2**32 - 2  # uid_t, without (uid_t)-1, which means "no uid"

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_FIELDS = frozenset(
    {"name", "uid", "enabled", "created", "totp", "last_step", "failures", "locked_until"}
)
_GROUP_OTHER_BITS = 0o077
# Holders of the file lock only read and rewrite a small file: 2 s of waiting means trouble.
_LOCK_ATTEMPTS = 200
_LOCK_PAUSE_S = 0.01


class OperatorError(Exception):
    """An operator command cannot be carried out; ``str()`` is the one-line reason."""


class OperatorExistsError(OperatorError):
    """The name, or the uid, is already enrolled."""


class NoSuchOperatorError(OperatorError):
    """No operator of that name is enrolled."""


class OperatorFileError(OperatorError):
    """The operators file or its directory is unusable: malformed, too open, not ours."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class LoginResult(enum.StrEnum):
    """How a login (or a fresh-code confirmation) ended. Only ``OK`` lets the operator in."""

    OK = "ok"
    WRONG_CODE = "wrong_code"  # no code of the window matches: counts as a failure
    REPLAYED = "replayed"  # the code of a step already used (or older): counts as a failure
    LOCKED = "locked"  # too many failures lately; not checked, not counted
    DISABLED = "disabled"  # not checked, not counted
    UNKNOWN = "unknown"  # no such operator

    @property
    def ok(self) -> bool:
        return self is LoginResult.OK


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    """An enrolled operator as shown to commands: everything but the secret.

    Times are Unix seconds; ``locked_until`` may lie in the past (a lockout that has run out
    and that the next login clears), so ask ``locked(now)``.
    """

    name: str
    uid: int
    enabled: bool
    created: float
    last_step: int | None
    failures: int
    locked_until: float | None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and now < self.locked_until


@dataclass(frozen=True, slots=True)
class _Operator:
    info: OperatorInfo
    wrapped_secret: bytes = field(repr=False)


def check_name(name: str) -> str:
    """``name`` if it is an operator name (a-z first, then up to 31 of a-z, 0-9, _ and -)."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"operator name {name[:40]!r} is not 1 to 32 characters of a-z, 0-9, '_' and '-'"
            " starting with a letter"
        )
    return name


def check_uid(uid: int) -> int:
    if not _is_int(uid) or not 0 <= uid <= MAX_UID:
        raise ValueError(f"uid {uid!r} is not a Unix user id (0 to {MAX_UID})")
    return uid


class OperatorStore:
    """The operators file of one data directory. Build it with ``open``; safe to share between
    threads, and to use beside other processes doing the same."""

    def __init__(self, directory: Path, keyset: Keyset) -> None:
        self._directory = directory
        self._path = directory / FILE_NAME
        self._keyset = keyset
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, keyset: Keyset) -> OperatorStore:
        """Use ``directory`` (normally ``<storage.dir>/admin``), creating it 0700 if absent.

        Its parent must exist. Refuses a directory open to group or others, or owned by
        another user (a file written by root would lock the daemon out of it).
        """
        _ensure_private_directory(directory)
        store = cls(directory, keyset)
        with store._locked():
            _remove_stale_temporaries(directory)
        return store

    @property
    def path(self) -> Path:
        return self._path

    # ----- reading ---------------------------------------------------------------------------

    def list(self) -> builtins.list[OperatorInfo]:
        """Every enrolled operator, by name."""
        return [op.info for op in self._read().values()]

    def get(self, name: str) -> OperatorInfo | None:
        return op.info if (op := self._read().get(name)) is not None else None

    def by_uid(self, uid: int) -> OperatorInfo | None:
        """The operator whose connections come from ``uid`` (enabled or not), or None."""
        return next((op.info for op in self._read().values() if op.info.uid == uid), None)

    # ----- changing --------------------------------------------------------------------------

    def enroll(
        self, name: str, uid: int, now: float, *, issuer: str = "villaged"
    ) -> tuple[str, str]:
        """Enrol ``name`` for connections from ``uid``, with a new TOTP secret.

        Returns ``(secret in base32, otpauth:// URI)`` for the operator's authenticator app:
        the only time the secret leaves this store in the clear. Raises OperatorExistsError
        when the name or the uid is taken, ValueError for a bad name or uid.
        """
        check_name(name)
        check_uid(uid)
        secret = totp.new_secret()
        uri = totp.provisioning_uri(name, secret, issuer)
        with self._locked():
            operators = self._read()
            if name in operators:
                raise OperatorExistsError(f"operator {name} is already enrolled")
            holder = next((op for op in operators.values() if op.info.uid == uid), None)
            if holder is not None:
                raise OperatorExistsError(
                    f"uid {uid} is already enrolled, as operator {holder.info.name}"
                )
            if len(operators) >= MAX_OPERATORS:
                raise OperatorError(f"{MAX_OPERATORS} operators are enrolled; that is the limit")
            wrapped = self._keyset.wrap(base64.b32decode(secret), _associated(name))
            info = OperatorInfo(name, uid, True, float(int(now)), None, 0, None)
            operators[name] = _Operator(info, wrapped)
            self._write(operators)
        return secret, uri

    def disable(self, name: str) -> None:
        """Refuse ``name``'s logins until ``enable``; takes effect at their next login."""
        self._change(name, lambda info: replace(info, enabled=False))

    def enable(self, name: str) -> None:
        """Let ``name`` log in again; also ends a lockout and forgets past failures."""
        self._change(name, lambda info: replace(info, enabled=True, failures=0, locked_until=None))

    def remove(self, name: str) -> None:
        """Forget ``name`` and destroy their secret (enrolling again makes a new one)."""
        with self._locked():
            operators = self._read()
            if operators.pop(name, None) is None:
                raise NoSuchOperatorError(f"no operator {name} is enrolled")
            self._write(operators)

    def rewrap_all(self) -> int:
        """Wrap every secret again under the keyset's primary key: run after a rotation and
        before old keys are retired, or the secrets they wrapped stop opening. Returns how many
        secrets were re-wrapped."""
        with self._locked():
            operators = self._read()
            for name, op in operators.items():
                plain = self._keyset.unwrap(op.wrapped_secret, _associated(name))
                operators[name] = replace(
                    op, wrapped_secret=self._keyset.wrap(plain, _associated(name))
                )
            if operators:
                self._write(operators)
        return len(operators)

    # ----- logging in ------------------------------------------------------------------------

    def login(
        self, name: str, code: str, now: float, *, max_failures: int, lockout_seconds: int
    ) -> LoginResult:
        """Check ``name``'s TOTP ``code`` at Unix time ``now``.

        A code is accepted for the current 30-second step or one either side, if that step is
        later than the last one accepted: the step is then stored durably before this returns
        ``OK``. A wrong or replayed code is a failure, stored durably too; ``max_failures`` in a
        row lock the operator out for ``lockout_seconds`` (attempts while locked or disabled
        are neither checked nor counted). A lockout that has run out is cleared, with the
        failure count, by the next attempt.

        Raises KeyManagementError (or DecryptError) if the keyset cannot open the secret, and
        OperatorFileError or OSError if the file cannot be read or written: those are the
        node's faults, never an answer to the operator.
        """
        if max_failures < 1 or lockout_seconds < 1:
            raise ValueError("max_failures and lockout_seconds must be at least 1")
        if not _NAME.fullmatch(name):
            return LoginResult.UNKNOWN
        with self._locked():
            operators = self._read()
            op = operators.get(name)
            if op is None:
                return LoginResult.UNKNOWN
            info = op.info
            if not info.enabled:
                return LoginResult.DISABLED
            if info.locked(now):
                return LoginResult.LOCKED
            if info.locked_until is not None:  # the lockout has run out: start afresh
                info = replace(info, failures=0, locked_until=None)
            secret = self._secret(op)
            step = totp.check(secret, code, now, info.last_step)
            if step is not None:
                info = replace(info, last_step=step, failures=0)
                result = LoginResult.OK
            else:
                result = (
                    LoginResult.REPLAYED
                    if totp.matching_steps(secret, code, now)
                    else LoginResult.WRONG_CODE
                )
                failures = info.failures + 1
                locked_until = (
                    float(math.ceil(now + lockout_seconds)) if failures >= max_failures else None
                )
                info = replace(info, failures=failures, locked_until=locked_until)
            operators[name] = replace(op, info=info)
            self._write(operators)
            return result

    def verify_code(
        self, name: str, code: str, now: float, *, max_failures: int, lockout_seconds: int
    ) -> LoginResult:
        """A fresh TOTP confirmation from a logged-in operator (opening or approving a grant).

        The same check, with the same records, as ``login``: the code must be of a step later
        than any used before — including the one the operator logged in with, so a
        confirmation right after logging in needs the authenticator's next code — and
        failures here count towards the same lockout.
        """
        return self.login(
            name, code, now, max_failures=max_failures, lockout_seconds=lockout_seconds
        )

    # ----- internals -------------------------------------------------------------------------

    def _change(self, name: str, change: Callable[[OperatorInfo], OperatorInfo]) -> None:
        with self._locked():
            operators = self._read()
            op = operators.get(name)
            if op is None:
                raise NoSuchOperatorError(f"no operator {name} is enrolled")
            operators[name] = replace(op, info=change(op.info))
            self._write(operators)

    def _secret(self, op: _Operator) -> str:
        secret = self._keyset.unwrap(op.wrapped_secret, _associated(op.info.name))
        if len(secret) != totp.SECRET_BYTES:
            raise KeyManagementError(
                f"operator {op.info.name}'s TOTP secret in {self._path} is not"
                f" {totp.SECRET_BYTES} bytes"
            )
        return base64.b32encode(secret).decode("ascii")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread lock and the file lock (for a read-change-write of the file)."""
        with self._lock:
            lock_path = self._directory / LOCK_NAME
            try:
                fd = os.open(
                    lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
                )
            except OSError as exc:
                raise OperatorFileError(
                    lock_path, f"cannot open lock file {lock_path}: {exc.strerror}"
                ) from None
            try:
                for _ in range(_LOCK_ATTEMPTS):
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(_LOCK_PAUSE_S)
                else:
                    raise OperatorFileError(
                        lock_path,
                        f"{lock_path} stayed locked by another process for"
                        f" {_LOCK_ATTEMPTS * _LOCK_PAUSE_S:.0f} s; try again",
                    )
                yield
            finally:
                os.close(fd)  # releases the flock

    def _read(self) -> dict[str, _Operator]:
        raw = _read_private_file(self._path)
        if raw is None:
            return {}
        return _parse(self._path, raw)

    def _write(self, operators: dict[str, _Operator]) -> None:
        doc = {
            "format": FORMAT,
            "operators": [_entry(operators[name]) for name in sorted(operators)],
        }
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        try:
            write_private_file(self._path, data)
        except OSError as exc:
            raise OperatorFileError(
                self._path, f"cannot write {self._path}: {exc.strerror or exc}"
            ) from None


def _associated(name: str) -> bytes:
    return b"villaged operator totp " + name.encode("ascii")


# --------------------------------------------------------------------------- the file


def _entry(op: _Operator) -> dict[str, Any]:
    info = op.info
    return {
        "name": info.name,
        "uid": info.uid,
        "enabled": info.enabled,
        "created": _format_time(info.created),
        "totp": base64.b64encode(op.wrapped_secret).decode("ascii"),
        "last_step": info.last_step,
        "failures": info.failures,
        "locked_until": None if info.locked_until is None else _format_time(info.locked_until),
    }


def _parse(path: Path, raw: bytes) -> dict[str, _Operator]:
    def bad(reason: str) -> OperatorFileError:
        return OperatorFileError(path, f"operators file {path}: {reason}")

    # Messages never echo values: the file holds wrapped secrets.
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (UnicodeDecodeError, RecursionError):
        raise bad("not JSON (not UTF-8, or nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not an object with the format tag {FORMAT!r}")
    entries = doc.get("operators")
    if not isinstance(entries, list) or len(entries) > MAX_OPERATORS:
        raise bad(f"'operators' is not a list of at most {MAX_OPERATORS} entries")
    operators: dict[str, _Operator] = {}
    uids: set[int] = set()
    for position, entry in enumerate(entries, start=1):
        where = f"operators entry #{position}"
        if not isinstance(entry, dict) or set(entry) != _FIELDS:
            raise bad(
                f"{where} is not an object with exactly the fields {', '.join(sorted(_FIELDS))}"
            )
        op = _parse_entry(entry, where, bad)
        if op.info.name in operators:
            raise bad(f"operator {op.info.name} appears more than once")
        if op.info.uid in uids:
            raise bad(f"uid {op.info.uid} belongs to more than one operator")
        operators[op.info.name] = op
        uids.add(op.info.uid)
    return operators


def _parse_entry(
    entry: dict[str, Any], where: str, fail: Callable[[str], OperatorFileError]
) -> _Operator:
    def bad(reason: str) -> OperatorFileError:
        return fail(f"{where}: {reason}")

    name, uid, enabled = entry["name"], entry["uid"], entry["enabled"]
    last_step, failures = entry["last_step"], entry["failures"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("'name' is not an operator name")
    if not _is_int(uid) or not 0 <= uid <= MAX_UID:
        raise bad("'uid' is not a Unix user id")
    if not isinstance(enabled, bool):
        raise bad("'enabled' is not true or false")
    created = _parse_time(entry["created"])
    if created is None:
        raise bad("'created' is not a UTC time like 2026-11-29T15:00:00Z")
    try:
        wrapped = base64.b64decode(entry["totp"], validate=True)
    except (TypeError, ValueError):
        raise bad("'totp' is not base64") from None
    if last_step is not None and (not _is_int(last_step) or last_step < 0):
        raise bad("'last_step' is neither null nor a time step")
    if not _is_int(failures) or failures < 0:
        raise bad("'failures' is not a count")
    locked_until = None
    if entry["locked_until"] is not None:
        locked_until = _parse_time(entry["locked_until"])
        if locked_until is None:
            raise bad("'locked_until' is neither null nor a UTC time like 2026-11-29T15:00:00Z")
    info = OperatorInfo(name, uid, enabled, created, last_step, failures, locked_until)
    return _Operator(info, wrapped)


def _read_private_file(path: Path) -> bytes | None:
    """The file's bytes, or None if it does not exist; refuses one that is not a regular
    file of ours, mode 0600 or stricter."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang a login.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OperatorFileError(
            path, f"cannot open operators file {path}: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)  # of the open file: no swap between check and read
        if not stat.S_ISREG(info.st_mode):
            raise OperatorFileError(path, f"operators file {path} is not a regular file")
        _check_private(path, info, "operators file", "600")
        with open(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise OperatorFileError(
            path, f"operators file {path} is larger than {MAX_FILE_BYTES} bytes"
        )
    return data


def check_owner(path: Path, what: str) -> None:
    """Refuse to work in ``path`` unless this process's user owns it: a file root wrote into
    the daemon's directory would lock the daemon out of it."""
    try:
        owner = os.stat(path).st_uid
    except FileNotFoundError:
        return
    if owner != os.geteuid():
        raise OperatorFileError(
            path,
            f"{what} {path} belongs to uid {owner}; run this as that user (the daemon's),"
            f" not as uid {os.geteuid()}",
        )


def _ensure_private_directory(directory: Path) -> None:
    check_owner(directory.parent, "directory")
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OperatorFileError(
            directory, f"cannot create operators directory {directory}: {exc.strerror}"
        ) from None
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        _fsync_directory(directory.parent)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise OperatorFileError(directory, f"operators directory {directory} is not a directory")
    _check_private(directory, info, "operators directory", "700")


def _check_private(path: Path, info: os.stat_result, what: str, wanted: str) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if mode & _GROUP_OTHER_BITS:
        raise OperatorFileError(
            path, f"{what} {path} has mode {mode:04o}; it must be {wanted} (chmod {wanted} {path})"
        )
    if info.st_uid != os.geteuid():
        raise OperatorFileError(
            path,
            f"{what} {path} belongs to uid {info.st_uid}; run this as that user (the daemon's),"
            f" not as uid {os.geteuid()}",
        )


def _remove_stale_temporaries(directory: Path) -> None:
    # What a crash between writing a temporary and renaming it leaves (write_file_atomic's
    # names); the caller holds the file lock, so no live write's temporary is among them.
    prefix = f".{FILE_NAME}."
    stale = [
        p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str) or not value.endswith("Z"):
        return None
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return parsed.timestamp()


def _format_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
