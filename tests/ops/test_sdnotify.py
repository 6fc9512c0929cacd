"""systemd readiness: the node says READY=1 only once it serves, and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from tests.nodes import add_users, write_node_config
from villaged.config import load_config
from villaged.ops.sdnotify import notify

if TYPE_CHECKING:
    from pathlib import Path


def test_without_a_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True])
def test_notifications_reach_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"villaged-test-{os.getpid()}"
            server.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = tmp_path / "notify"
            server.bind(str(path))
            monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert server.recv(64) == b"READY=1"


async def test_ready_only_once_listening_and_stopping_on_sigterm(tmp_path: Path) -> None:
    config_path = write_node_config(tmp_path / "node")
    config = load_config(config_path)
    await add_users(config)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    log = (tmp_path / "node.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "villaged", "run", "-c", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
    )
    try:
        with trio.fail_after(30):
            assert await sock.recv(64) == b"READY=1"
        # Ready means serving: every listener accepts at once.
        for endpoint in (config.listeners.c2s.bind[0], config.listeners.c2s_tls.bind[0]):
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            await stream.aclose()
        assert config.admin.socket.exists()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await sock.recv(64) == b"STOPPING=1"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        sock.close()
