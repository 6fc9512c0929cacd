"""Benchmark: durable appends per second and latency of the segment log under concurrency.

For each concurrency level, that many trio tasks append 300-byte-body records in a loop into a
fresh log in a temporary directory; every append waits for its batch's fdatasync, so each
measured append is durable. Progress goes to stderr; the last line on stdout is a JSON list
with one object per level::

    {"appenders": 256, "appends_per_s": ..., "p50_ms": ..., "p99_ms": ..., "fsyncs_per_append": ...,
     "filesystem": "ext4"}

``fsyncs_per_append`` counts every fdatasync and fsync the log makes (through its file-ops
hook) during the measured window. The temporary directories go under ``var/bench/`` in the
repository (gitignored) unless ``--dir`` says otherwise: not the system's temporary directory,
which may be a tmpfs where fdatasync costs nothing. ``filesystem`` is the type of the file
system they were on (from ``/proc/mounts``), so a result from tmpfs is recognisable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from villaged.storage.log import OsFileOps, open_segment_log
from villaged.storage.records import Record

if TYPE_CHECKING:
    from villaged.storage.log import SegmentLog

DEFAULT_LEVELS = (1, 16, 256)
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "var" / "bench"
_MOUNTS_ESCAPE = re.compile(r"\\([0-7]{3})")


class CountingFileOps(OsFileOps):
    """The real calls, counting syncs (only the writer's worker thread calls these)."""

    def __init__(self) -> None:
        self.syncs = 0

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self.syncs += 1
        super().fsync(fd)


def filesystem_type(path: Path) -> str:
    """Type of the file system holding ``path``: the longest mount point above it in
    ``/proc/mounts`` (the last one mounted there wins), or "unknown"."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "unknown"
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces and the like in mount points are written as octal escapes.
        point = _MOUNTS_ESCAPE.sub(lambda match: chr(int(match[1], 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    position = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[position]


async def _measure(
    directory: Path, appenders: int, seconds: float, warmup: float, body_bytes: int
) -> dict[str, float | str]:
    ops = CountingFileOps()
    record = Record(type="bench.message", body={"body": b"x" * body_bytes})
    latencies: list[float] = []
    measuring = False
    stopping = False

    async def appender(log: SegmentLog) -> None:
        clock = time.perf_counter
        while not stopping:
            started = clock()
            await log.append(record)
            if measuring:
                latencies.append(clock() - started)

    async with open_segment_log(directory, file_ops=ops) as log, trio.open_nursery() as nursery:
        for _ in range(appenders):
            nursery.start_soon(appender, log)
        await trio.sleep(warmup)
        syncs_before = ops.syncs
        measuring = True
        started = time.perf_counter()
        await trio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - started
        syncs = ops.syncs - syncs_before
        stopping = True
    latencies.sort()
    count = len(latencies)
    return {
        "appenders": appenders,
        "appends_per_s": round(count / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "fsyncs_per_append": round(syncs / count, 4) if count else 0.0,
        "filesystem": filesystem_type(directory),
    }


async def _main(args: argparse.Namespace) -> list[dict[str, float | str]]:
    results = []
    for appenders in args.levels:
        with tempfile.TemporaryDirectory(prefix="villaged-bench-", dir=args.dir) as tmp:
            print(f"storage_append: {appenders} appenders for {args.seconds}s ...", file=sys.stderr)
            result = await _measure(
                Path(tmp) / "log", appenders, args.seconds, args.warmup, args.body_bytes
            )
            print(f"storage_append: {json.dumps(result)}", file=sys.stderr)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per level")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured time per level")
    parser.add_argument(
        "--levels",
        type=lambda text: [int(part) for part in text.split(",")],
        default=list(DEFAULT_LEVELS),
        help="comma-separated appender counts (default 1,16,256)",
    )
    parser.add_argument("--body-bytes", type=int, default=300)
    parser.add_argument(
        "--dir",
        default=str(DEFAULT_DIR),
        help=f"where to make the temporary logs (default {DEFAULT_DIR})",
    )
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    filesystem = filesystem_type(Path(args.dir))
    print(f"storage_append: logs under {args.dir}, file system {filesystem}", file=sys.stderr)
    results = trio.run(_main, args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
