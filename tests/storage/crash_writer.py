"""Subprocess for test_log_crash.py: append to a log until killed, reporting every ack.

Usage: ``crash_writer.py DIRECTORY ROUND``. Opens the log (running recovery), writes
``start LAST_INDEX FIRST_INDEX`` and then, from 32 concurrent appenders (a few of them using
``append_many``), one line ``INDEX ROUND WORKER SEQ`` per acknowledged record, the lines of
one call written with a single ``os.write`` right after it returned (so every reported index
was durable first).
A side task saves a snapshot now and then so that compaction is also interrupted by kills.
Record bodies are a pure function of (round, worker, seq): the test recomputes them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import trio

from villaged.storage.log import SegmentLog, open_segment_log
from villaged.storage.records import Record

APPENDERS = 32
MANY_APPENDERS = 4  # of the APPENDERS, those that use append_many
MANY_MAX = 40  # records per append_many call, at most (about 12 KiB: a tenth of a segment)
SEGMENT_BYTES = 128 * 1024
SNAPSHOT_EVERY = 3000  # entries
RECORD_TYPE = "test.crash"


def make_body(round_number: int, worker: int, seq: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"{round_number}:{worker}:{seq}".encode()).digest()
    return {"r": round_number, "w": worker, "s": seq, "d": digest * 4}


def snapshot_data(index: int) -> bytes:
    return f"state@{index}".encode()


async def appender(log: SegmentLog, round_number: int, worker: int) -> None:
    seq = 0
    while True:
        record = Record(type=RECORD_TYPE, body=make_body(round_number, worker, seq))
        index = await log.append(record)
        os.write(1, f"{index} {round_number} {worker} {seq}\n".encode())
        seq += 1


async def many_appender(log: SegmentLog, round_number: int, worker: int) -> None:
    """Appends 1..MANY_MAX records per ``append_many`` call (one batch each, so some calls
    roll a segment first)."""
    seq = 0
    while True:
        count = seq % MANY_MAX + 1
        records = [
            Record(type=RECORD_TYPE, body=make_body(round_number, worker, seq + k))
            for k in range(count)
        ]
        indexes = await log.append_many(records)
        lines = "".join(
            f"{index} {round_number} {worker} {seq + k}\n" for k, index in enumerate(indexes)
        )
        os.write(1, lines.encode())
        seq += count


async def snapshotter(log: SegmentLog) -> None:
    while True:
        await trio.sleep(0.02)
        index = log.last_index - 100
        if index - (log.first_index - 1) >= SNAPSHOT_EVERY:
            await log.save_snapshot(index, log.term_at(index), snapshot_data(index))


async def main(directory: Path, round_number: int) -> None:
    async with open_segment_log(directory, segment_bytes=SEGMENT_BYTES) as log:
        os.write(1, f"start {log.last_index} {log.first_index}\n".encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshotter, log)
            for worker in range(APPENDERS):
                task = many_appender if worker < MANY_APPENDERS else appender
                nursery.start_soon(task, log, round_number, worker)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
