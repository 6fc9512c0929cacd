"""A villaged node for end-to-end tests, built by app.run_node exactly as `villaged run` does,
on free loopback ports, with accounts ``<name>@localhost`` / ``<name>-password``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from tests.ports import free_port_base
from villaged.app import run_node
from villaged.config import load_config
from villaged.ops.provision import init_dev
from villaged.storage.store import StoreOptions, open_store

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import trio

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
