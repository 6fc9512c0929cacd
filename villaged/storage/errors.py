"""Errors raised by the storage layer.

Each error says what is wrong and where (file, offset, key), so that the CLI can print it
as a one-line reason and the daemon can log it without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class StorageError(Exception):
    """Base class: something about stored data or the data directory is wrong."""


class DataDirError(StorageError):
    """The data directory cannot be used: wrong format version, locked, not ours."""


class CorruptionError(StorageError):
    """Stored bytes fail their checks at a place that must be intact."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class LogWriteError(StorageError):
    """An append batch could not be made durable; none of its records were acknowledged."""


class RecordTooLargeError(StorageError):
    """A record exceeds the configured maximum record size."""


class KeyManagementError(StorageError):
    """Base for key-management failures."""


class DecryptError(KeyManagementError):
    """A sealed payload does not authenticate: tampered, or moved to another user/record."""


class ShreddedError(KeyManagementError):
    """The data key a payload was sealed under has been destroyed (crypto-shredding)."""


class KeyFileError(KeyManagementError):
    """A keyset or key-vault file or directory is missing, malformed, unwritable or too open.

    The message is complete and names the path; ``path`` is kept for callers that report it
    separately (``villaged check``).
    """

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


# The name is the one the log API was specified with; it reads as what it is, like IndexError.
class IndexOutOfRange(StorageError, IndexError):  # noqa: N818
    """A log index outside the entries the log holds (compacted away, or not yet written)."""
