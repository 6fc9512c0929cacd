"""Structured logs: one JSON object per line on stdout (journald keeps each line as one entry).

Every line has ``ts``, ``level``, ``event`` (a stable dotted name), ``node`` and ``msg``, plus the
fields a call passes in ``extra``. Callers never pass secrets: no passwords, TOTP codes, keys or
message bodies are ever put in ``extra``.

With ``[log] file`` the lines go to that file instead (appended, created 0640). Log rotation
renames the file and sends SIGHUP (``systemctl reload villaged``); `reopen_log_files` then opens
the path afresh, so no line is lost to the renamed file or written to a deleted one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:
    from pathlib import Path

#: A log file is created with this mode: the service's group may read it (log shippers).
LOG_FILE_MODE: Final = 0o640

# Attributes every LogRecord has; anything else came from `extra=` and is an event field.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonLinesFormatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.name),
            "node": self.node,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str, ensure_ascii=False)


class ReopeningFileHandler(logging.StreamHandler[TextIO]):
    """JSON lines appended to a file that log rotation may rename: `reopen` opens the path
    again (the handler's lock keeps every line whole, in the old file or the new one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(_open_log_file(path))
        self.path = path

    def reopen(self) -> None:
        """Open ``path`` afresh; on failure (OSError) the current file stays in use."""
        old = self.setStream(_open_log_file(self.path))
        if old is not None:
            old.close()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


def _open_log_file(path: Path) -> TextIO:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, LOG_FILE_MODE)
    # Line buffered: each record reaches the file when it is written, as on stdout.
    return open(fd, "a", encoding="utf-8", buffering=1)


def reopen_log_files() -> list[str]:
    """Reopen the log file, if there is one (SIGHUP); why each one failed (none: [])."""
    problems = []
    for handler in logging.getLogger("villaged").handlers:
        if isinstance(handler, ReopeningFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                problems.append(f"cannot reopen {handler.path}: {exc.strerror or exc}")
    return problems


def configure_logging(
    level: str, node: str, stream: TextIO = sys.stdout, file: Path | None = None
) -> None:
    """JSON lines on ``stream``, or appended to ``file`` (OSError if it cannot be opened)."""
    handler = logging.StreamHandler(stream) if file is None else ReopeningFileHandler(file)
    handler.setFormatter(JsonLinesFormatter(node))
    root = logging.getLogger("villaged")
    previous, root.handlers[:] = list(root.handlers), [handler]  # swap first, then close
    root.setLevel(level.upper())
    root.propagate = False
    for old in previous:
        if isinstance(old, ReopeningFileHandler):
            old.close()
