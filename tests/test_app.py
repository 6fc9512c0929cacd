"""The node as a real process: `villaged run` opens its storage, reports ready over HTTP,
logs JSON lines, holds the data directory lock, and exits cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

from tests.nodes import spawn_node, wait_ready
from tests.ports import free_port_base
from villaged.ops.provision import init_dev

if TYPE_CHECKING:
    from pathlib import Path


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    return data


async def test_run_ready_lock_and_sigterm(tmp_path: Path) -> None:
    port_base = free_port_base()
    result = init_dev(tmp_path / "n", port_base=port_base, now=datetime.now(UTC))
    http_port = port_base + 3
    log_path = tmp_path / "node.log"
    proc = await spawn_node(result.config, log_path)
    try:
        response = await wait_ready(proc, http_port)
        assert response.startswith(b"HTTP/1.1 200")
        assert (await _get(http_port, "/healthz")).endswith(b"ok\n")
        assert (await _get(http_port, "/nope")).startswith(b"HTTP/1.1 404")

        # The running node holds the data directory: offline tools refuse politely.
        with trio.fail_after(30):
            busy = await trio.run_process(
                [sys.executable, "-m", "villaged", "user", "list", "-c", str(result.config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert busy.returncode == 1
        assert b"in use by another villaged process" in busy.stderr

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert events.index("node.ready") < events.index("node.stopping") < events.index("node.stopped")
    for line in out.splitlines():
        entry = json.loads(line)
        assert {"ts", "level", "event", "node", "msg"} <= entry.keys()


async def test_port_in_use_is_one_line_naming_the_key(tmp_path: Path) -> None:
    port_base = free_port_base()
    result = init_dev(tmp_path / "n", port_base=port_base, now=datetime.now(UTC))
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port_base + 3))
        blocker.listen()
        with trio.fail_after(30):
            proc = await trio.run_process(
                [sys.executable, "-m", "villaged", "run", "-c", str(result.config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    assert "listeners.http.bind: cannot listen on 127.0.0.1:" in err
    assert "Address already in use" in err


async def test_sighup_reloads_the_certificate_and_sigterm_tells_clients(tmp_path: Path) -> None:
    from tests.net.rawclient import RawClient
    from tests.nodes import add_users
    from villaged.config import load_config
    from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file

    port_base = free_port_base()
    result = init_dev(tmp_path / "n", port_base=port_base, now=datetime.now(UTC))
    config = load_config(result.config)
    await add_users(config, ["alice"])
    ca_before = tmp_path / "ca-before.pem"
    ca_before.write_bytes(config.tls.cert.read_bytes())
    log_path = tmp_path / "node.log"
    proc = await spawn_node(result.config, log_path)
    try:
        await wait_ready(proc, port_base + 3)
        alice = await RawClient.connect(port_base + 1, ca_before, direct_tls=True)
        await alice.login("alice", "alice-password", starttls=False)

        # New certificate files, then SIGHUP: new connections get the new certificate.
        cert, key = make_self_signed("localhost", datetime.now(UTC))
        write_private_file(config.tls.key, key)
        write_file_atomic(config.tls.cert, cert, 0o644)
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):  # the node is another process: poll its log
            while b'"event": "node.reload"' not in log_path.read_bytes():  # noqa: ASYNC110
                await trio.sleep(0.05)
        fresh = await RawClient.connect(port_base + 1, config.tls.cert, direct_tls=True)
        await fresh.aclose()
        with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
            stale = await RawClient.connect(port_base + 1, ca_before, direct_tls=True)
            await stale.aclose()
            raise AssertionError("the old certificate is still served to new connections")

        # The connection made before the reload still works; SIGTERM ends it properly.
        await alice.send(b"<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert (await alice.element()).get("type") == "result"
        proc.send_signal(signal.SIGTERM)
        assert await alice.stream_error() == "system-shutdown"
        await alice.aclose()
        with trio.fail_after(20):
            await proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
