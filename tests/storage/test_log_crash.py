"""Crash durability with real processes: SIGKILL a busy writer at random moments, many times
over on the same directory, and check that every acknowledged append survived intact and that
the next run goes on right after the last durable index."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.storage.crash_writer import (
    RECORD_TYPE,
    SEGMENT_BYTES,
    make_body,
    snapshot_data,
)
from villaged.storage.log import SegmentLog, verify_log

WRITER = Path(__file__).with_name("crash_writer.py")
ROUNDS = 20
START_DEADLINE = 20.0  # seconds for a writer to start acknowledging (a slow CI box)

Ack = tuple[int, int, int]  # (round, worker, seq)


def run_until_killed(directory: Path, round_number: int, out: Path, delay: float) -> list[str]:
    """Start a writer, let it ack for ``delay`` seconds, SIGKILL it; return its output lines."""
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(round_number)],
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + START_DEADLINE
        # Real waiting on a real process: poll its output until the first ack line is there.
        while out.read_bytes().count(b"\n") < 2:
            assert writer.poll() is None, out.with_suffix(".err").read_text()
            assert time.monotonic() < deadline, "writer never acknowledged an append"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL, out.with_suffix(".err").read_text()
    text = out.read_text()
    # A line cut by the kill has no newline yet: it was not fully reported, so it is ignored.
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    context = f"(seed {seed})"
    directory = tmp_path / "log"
    acked: dict[int, Ack] = {}
    last_index = 0
    first_index = 1
    for round_number in range(ROUNDS):
        delay = rng.uniform(0.05, 0.4)
        lines = run_until_killed(directory, round_number, tmp_path / f"{round_number}.out", delay)
        start = lines[0].split()
        assert start[0] == "start", context
        # The writer recovered exactly the state the previous check saw.
        assert (int(start[1]), int(start[2])) == (last_index, first_index), context
        this_round: dict[int, Ack] = {}
        for line in lines[1:]:
            index, round_seen, worker, seq = map(int, line.split())
            assert round_seen == round_number, context
            assert index > last_index, f"index {index} reused after a crash {context}"
            assert index not in this_round, context
            this_round[index] = (round_number, worker, seq)
        assert this_round, f"round {round_number} acknowledged nothing {context}"
        acked.update(this_round)

        log = SegmentLog.open(directory, segment_bytes=SEGMENT_BYTES)
        try:
            assert log.last_index >= max(this_round), context
            for index, (r, worker, seq) in this_round.items():
                if index < log.first_index:
                    continue  # compacted into a snapshot after it was acknowledged
                record = log.read(index)
                assert record.type == RECORD_TYPE, context
                assert record.body == make_body(r, worker, seq), f"index {index} {context}"
            snapshot = log.latest_snapshot()
            if snapshot is not None:
                assert snapshot.data == snapshot_data(snapshot.index), context
            last_index, first_index = log.last_index, log.first_index
        finally:
            log.close()
        assert verify_log(directory).ok, context

    # Finally, everything acknowledged in any round and not compacted is still in place.
    log = SegmentLog.open(directory, segment_bytes=SEGMENT_BYTES)
    try:
        seen = 0
        for record in log.scan(log.first_index):
            expected = acked.get(record.index)
            if expected is not None:
                assert record.body == make_body(*expected), f"index {record.index} {context}"
                seen += 1
        assert seen == sum(1 for index in acked if index >= log.first_index), context
    finally:
        log.close()
