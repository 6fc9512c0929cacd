"""Offline integrity scan of a data directory (`villaged storage verify`).

Read-only: it checks the FORMAT file and runs the log verifier (every frame's CRC, index
continuity across segments, snapshot consistency) without truncating, repairing or creating
anything, so it also works on a read-only mount (a backup). It takes a shared lock on
``DIR/LOCK``, so it refuses to run beside a live node (whose active segment is still being
written) instead of reporting a half-written tail as damage. Without a LOCK file no node has
ever opened the directory, and there is nothing to lock against.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from villaged.storage.errors import DataDirError
from villaged.storage.log import VerifyReport, verify_log
from villaged.storage.store import FORMAT

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True, slots=True)
class StoreVerifyReport:
    directory: Path
    log: VerifyReport | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_lines(self) -> list[str]:
        lines = [f"data directory {self.directory}"]
        if self.log is not None:
            log = self.log
            span = "empty" if not log.records_checked else f"{log.first_index}..{log.last_index}"
            lines.append(
                f"log: {log.segments_checked} segments, {log.records_checked} records ({span}), "
                f"{log.snapshots_checked} snapshots (latest at {log.latest_snapshot_index})"
            )
        if self.log is not None:
            lines.extend(f"note: {note}" for note in self.log.notes)
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.append("ok" if self.ok else f"{len(self.problems)} problem(s)")
        return lines


def verify_store(directory: Path, *, max_record_bytes: int | None = None) -> StoreVerifyReport:
    """Check the data directory ``directory``; :class:`DataDirError` if it is not one or a
    running node holds it.

    ``max_record_bytes`` is accepted for callers that pass the configured limit, and unused:
    frame lengths are checked against the format's hard cap, since records written under a
    higher setting are still valid.
    """
    format_file = directory / "FORMAT"
    try:
        found = format_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DataDirError(f"{directory} is not a villaged data directory (no FORMAT)") from None
    if found != FORMAT:
        problem = f"{format_file}: format {found!r}; this villaged reads {FORMAT!r}"
        return StoreVerifyReport(directory, None, (problem,))
    try:
        fd = os.open(directory / "LOCK", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _verify_log(directory)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirError(
                f"data directory {directory} is in use by a running villaged; stop it first"
            ) from None
        return _verify_log(directory)
    finally:
        os.close(fd)


def _verify_log(directory: Path) -> StoreVerifyReport:
    report = verify_log(directory / "log")
    return StoreVerifyReport(directory, report, report.problems)
