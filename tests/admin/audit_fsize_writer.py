"""Subprocess for test_audit.py: append audit records under a low RLIMIT_FSIZE until the kernel
refuses a write with EFBIG (a real write failure, even for root).

Usage: ``audit_fsize_writer.py DIRECTORY LIMIT_BYTES``. SIGXFSZ is ignored so the kernel reports
EFBIG instead of killing the process. Prints one JSON line: the acknowledged indexes, the
error, the log file's size and whether it ended in a newline right after the failure, a second
failed append, the indexes acknowledged once the limit is lifted, and the size on reopening.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from villaged.admin.audit import AuditLog, AuditWriteError

ORIGIN = "villaged-audit/example.org"


def record(n: int) -> dict[str, Any]:
    return {
        "t": f"2026-11-29T18:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
        "kind": "command",
        "operator": "ops1",
        "result": "ok",
        "command": "inspect.messages",
        "scope": "alice@example.org",
        "justification": f"record {n} " + "x" * 300,
    }


def main(directory: Path, limit: int) -> dict[str, Any]:
    log = AuditLog.open(directory, ORIGIN)  # key and files exist before the limit applies
    path = directory / "audit.jsonl"
    acked: list[int] = []
    error = ""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        for n in range(10_000):
            try:
                acked.append(log.append(record(n)))
            except AuditWriteError as exc:
                error = str(exc)
                break
        data = path.read_bytes()
        second = ""
        try:
            log.append(record(len(acked)))
        except AuditWriteError as exc:
            second = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = [log.append(record(len(acked) + k)) for k in range(3)]
    log.close()
    with AuditLog.open(directory, ORIGIN) as reopened:
        reopened_size = reopened.size
    return {
        "acked": acked,
        "error": error,
        "second": second,
        "bytes_after_failure": len(data),
        "lines_after_failure": data.count(b"\n"),
        "ends_with_newline": data.endswith(b"\n"),
        "after": after,
        "reopened_size": reopened_size,
    }


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]))))
