"""Subprocess for test_log.py: append under a low RLIMIT_FSIZE until writes fail with EFBIG.

Usage: ``fsize_writer.py DIRECTORY LIMIT_BYTES``. SIGXFSZ is ignored so the kernel reports
EFBIG instead of killing the process. Prints one JSON line: the acknowledged indexes, how many
appends failed and why, and the indexes acknowledged after the limit is lifted again.
Each record's body carries the index it is expected to get (appends are sequential).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import trio

from villaged.storage.errors import LogWriteError
from villaged.storage.log import SegmentLog, open_segment_log
from villaged.storage.records import Record


def record_for(index: int) -> Record:
    return Record(type="test.efbig", body={"k": index, "pad": b"e" * 500})


async def main(directory: Path, limit: int) -> dict[str, object]:
    acked: list[int] = []
    failed = 0
    error = ""
    async with open_segment_log(directory) as log:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with trio.fail_after(30):
            while True:
                try:
                    acked.append(await log.append(record_for(log.last_index + 1)))
                except LogWriteError as exc:
                    failed += 1
                    error = str(exc)
                    break
            failed += await fail_concurrently(log)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            after = [await log.append(record_for(log.last_index + 1)) for _ in range(5)]
    return {"acked": acked, "failed": failed, "error": error, "after": after}


async def fail_concurrently(log: SegmentLog) -> int:
    failures = 0

    async def one() -> None:
        nonlocal failures
        try:
            await log.append(record_for(-1))
        except LogWriteError:
            failures += 1

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    if failures != 10:
        raise SystemExit(f"expected 10 failed appends, got {failures}")
    return failures


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    result = trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps(result))
