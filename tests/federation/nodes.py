"""villaged nodes of their own domains, federating on loopback under a test CA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from tests.federation.pki import PemPair, issue, write_pem_pair
from tests.ports import free_port_base
from villaged.app import run_node
from villaged.config import load_config
from villaged.im.features import open_node_store
from villaged.ops.provision import DEV_PORT_OFFSETS, init_dev

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import trio

    from villaged.app import Node
    from villaged.config import Config

USERS = ("alice", "bob")


@dataclass(frozen=True)
class Route:
    """Where a peer domain listens (a ``[[federation.peers]]`` entry)."""

    port: int
    direct_tls: bool = False
    require_tls: bool = True


@dataclass
class FederatedNode:
    node: Node
    config: Config
    config_path: Path
    domain: str
    port_base: int

    @property
    def c2s(self) -> int:
        return self.port_base

    @property
    def s2s(self) -> int:
        return self.port_base + DEV_PORT_OFFSETS["s2s"][0]

    @property
    def s2s_tls(self) -> int:
        return self.port_base + DEV_PORT_OFFSETS["s2s_tls"][0]

    @property
    def ca_file(self) -> Path:
        assert self.config.federation.ca_file is not None
        return self.config.federation.ca_file

    def route(self, *, direct_tls: bool = False) -> Route:
        return Route(self.s2s_tls if direct_tls else self.s2s, direct_tls)


def write_federated_config(
    directory: Path,
    domain: str,
    ca: PemPair,
    *,
    routes: Mapping[str, Route] = {},
    certificate: PemPair | None = None,
    federation_toml: str = "",
    port_base: int | None = None,
) -> Path:
    """A dev node of ``domain`` whose certificate comes from ``ca`` (or is ``certificate``),
    trusting ``ca`` for peers, with static routes to its peers."""
    base = port_base if port_base is not None else free_port_base()
    result = init_dev(directory, domain=domain, port_base=base, now=datetime.now(UTC))
    cert_path, key_path = write_pem_pair(
        directory / "s2s", "server", certificate or issue(ca, domain)
    )
    ca_path = directory / "s2s" / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    text = result.config.read_text()
    text = text.replace('cert = "tls/cert.pem"', f"cert = {json.dumps(str(cert_path))}")
    text = text.replace('key = "tls/key.pem"', f"key = {json.dumps(str(key_path))}")
    text += (
        "\n[federation]\nenabled = true\n"
        f"ca_file = {json.dumps(str(ca_path))}\n"
        "retry_initial = 1\nretry_max = 2\n" + federation_toml + "\n"
    )
    for peer, route in routes.items():
        text += (
            f'\n[[federation.peers]]\ndomain = "{peer}"\nhost = "127.0.0.1"\n'
            f"port = {route.port}\ndirect_tls = {str(route.direct_tls).lower()}\n"
            f"require_tls = {str(route.require_tls).lower()}\n"
        )
    result.config.write_text(text)
    return result.config


async def add_users(config: Config, users: Sequence[str] = USERS) -> None:
    async with open_node_store(config) as store:
        for user in users:
            jid = f"{user}@{config.server.domain}"
            if jid not in store.state.accounts:
                await store.add_user(jid, f"{user}-password")


async def start_federated_node(
    nursery: trio.Nursery, config_path: Path, *, users: Sequence[str] = USERS
) -> FederatedNode:
    config = load_config(config_path)
    await add_users(config, users)
    node = await nursery.start(partial(run_node, config, handle_signals=False))
    base = config.listeners.c2s.bind[0].port
    return FederatedNode(node, config, config_path, config.server.domain, base)
