"""Structured logs: JSON lines on stdout or in a file that log rotation may rename (SIGHUP
reopens it), one whole line per record, the file created 0640."""

from __future__ import annotations

import io
import json
import logging
import signal
import stat
from typing import TYPE_CHECKING, Any

import trio

from tests.nodes import spawn_node, wait_ready, write_node_config
from villaged.config import load_config
from villaged.ops.logging import configure_logging, reopen_log_files

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

log = logging.getLogger("villaged.test")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def restore_stdout_logging() -> None:
    configure_logging("info", "n1", io.StringIO())


def test_json_lines_carry_the_standard_fields_and_the_event_fields() -> None:
    out = io.StringIO()
    configure_logging("info", "n1", out)
    log.info("hello", extra={"event": "test.hello", "peer": "192.0.2.1"})
    log.debug("not at info")
    (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
    assert {"ts", "level", "event", "node", "msg", "peer"} <= line.keys()
    assert (line["level"], line["event"], line["node"]) == ("info", "test.hello", "n1")


def test_a_rotated_file_is_reopened_and_no_line_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "villaged.log"
    configure_logging("info", "n1", file=path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        log.info("first", extra={"event": "test.first"})
        path.rename(tmp_path / "villaged.log.1")  # what logrotate does, then SIGHUP
        log.info("second", extra={"event": "test.second"})  # still the old file
        assert reopen_log_files() == []
        log.info("third", extra={"event": "test.third"})
        old = [line["event"] for line in lines(tmp_path / "villaged.log.1")]
        assert old == ["test.first", "test.second"]
        assert [line["event"] for line in lines(path)] == ["test.third"]
    finally:
        restore_stdout_logging()


def test_a_file_that_cannot_be_reopened_keeps_the_current_one(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "villaged.log"
    configure_logging("info", "n1", file=path)
    try:
        path.rename(tmp_path / "kept.log")
        directory.rmdir()
        (problem,) = reopen_log_files()
        assert problem.startswith(f"cannot reopen {path}: ")
        log.info("still written", extra={"event": "test.kept"})
        assert [line["event"] for line in lines(tmp_path / "kept.log")] == ["test.kept"]
    finally:
        restore_stdout_logging()


def test_without_a_file_there_is_nothing_to_reopen() -> None:
    restore_stdout_logging()
    assert reopen_log_files() == []


def events(path: Path) -> Iterator[str]:
    return (line["event"] for line in lines(path) if path.exists())


async def test_the_daemon_reopens_its_log_file_on_sighup(tmp_path: Path) -> None:
    log_file = tmp_path / "villaged.log"
    config_path = write_node_config(tmp_path / "node")
    text = config_path.read_text().replace(
        "[log]\n", f"[log]\nfile = {json.dumps(str(log_file))}\n"
    )
    config_path.write_text(text)
    config = load_config(config_path)
    assert config.log.file == log_file
    proc = await spawn_node(config_path, tmp_path / "stdout.log")
    try:
        await wait_ready(proc, config.listeners.http.bind[0].port)
        assert "node.ready" in events(log_file)
        log_file.rename(tmp_path / "villaged.log.1")
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while not log_file.exists() or "node.reload" not in events(log_file):  # noqa: ASYNC110
                await trio.sleep(0.02)  # a real process writes the file: no event to wait on
        assert "node.reload" not in events(tmp_path / "villaged.log.1")
        assert (tmp_path / "stdout.log").read_bytes() == b""  # the lines went to the file
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await proc.wait()
    assert proc.returncode == 0
    assert "node.stopped" in events(log_file)
