"""A villaged node for end-to-end tests, built by app.run_node exactly as `villaged run` does,
on free loopback ports, with accounts ``<name>@localhost`` / ``<name>-password``."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import trio

from tests.ports import free_port_base
from villaged.app import run_node
from villaged.config import load_config
from villaged.ops.provision import init_dev
from villaged.storage.store import StoreOptions, open_store

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from villaged.app import Node
    from villaged.config import Config

USERS = ("alice", "bob", "carol")


@dataclass
class RunningNode:
    node: Node
    config: Config
    port_base: int

    @property
    def c2s(self) -> int:
        return self.port_base

    @property
    def c2s_tls(self) -> int:
        return self.port_base + 1

    @property
    def ca_file(self) -> Path:
        return self.config.tls.cert


def write_node_config(directory: Path, extra_toml: str = "") -> Path:
    """A dev node's directory on free ports; ``extra_toml`` is appended to its config."""
    result = init_dev(directory, port_base=free_port_base(), now=datetime.now(UTC))
    if extra_toml:
        result.config.write_text(result.config.read_text() + "\n" + extra_toml + "\n")
    return result.config


async def add_users(config: Config, users: Sequence[str] = USERS) -> None:
    async with open_store(StoreOptions.from_config(config.storage)) as store:
        for user in users:
            jid = f"{user}@localhost"
            if jid not in store.state.accounts:
                await store.add_user(jid, f"{user}-password")


async def start_node(
    nursery: trio.Nursery, tmp_path: Path, *, extra_toml: str = "", users: Sequence[str] = USERS
) -> RunningNode:
    config = load_config(write_node_config(tmp_path / "node", extra_toml))
    await add_users(config, users)
    node = await nursery.start(partial(run_node, config, handle_signals=False))
    return RunningNode(node, config, config.listeners.c2s.bind[0].port)


async def spawn_node(config_path: Path, log_path: Path) -> trio.Process:
    """`villaged run -c CONFIG` as a real process, its output appended to ``log_path``."""
    with log_path.open("ab") as log_file:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "villaged", "run", "-c", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def wait_ready(proc: trio.Process, http_port: int) -> bytes:
    """Poll /readyz until the node answers; the HTTP response (fails if the process exits)."""
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, "villaged exited before it was ready; see its log"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", http_port)
            except OSError:
                await trio.sleep(0.05)
                continue
            async with stream:
                await stream.send_all(
                    b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                response = b""
                while chunk := await stream.receive_some(4096):
                    response += chunk
            return response
