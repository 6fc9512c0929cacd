"""Cluster nodes for tests: configs for N nodes on loopback (one keyset, one cluster CA), and
optionally a fault proxy (tests.cluster.proxy) in front of every node's cluster listener."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

from tests.ports import free_port_base
from villaged.cluster import pki
from villaged.ops.provision import KEYSET_NAME, init_dev

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path


@dataclass(frozen=True)
class NodeFiles:
    node_id: str
    zone: str
    directory: Path
    config: Path
    port_base: int

    @property
    def c2s(self) -> int:
        return self.port_base

    @property
    def http(self) -> int:
        return self.port_base + 3

    @property
    def cluster(self) -> int:
        return self.port_base + 6


def write_cluster(
    root: Path,
    zones: Sequence[str] = ("a", "b", "c"),
    *,
    dial: Callable[[str, str, int], int] | None = None,
    extra_toml: str = "",
    port_bases: Sequence[int] | None = None,
) -> list[NodeFiles]:
    """One node directory per zone entry (``n1``, ``n2``...). ``dial(from, to, port)`` is the
    port node ``from`` dials to reach node ``to`` (whose listener is on ``port``): a proxy's."""
    if port_bases is None:  # one free range for all: ranges picked one by one could overlap
        first = free_port_base(7 * len(zones))
        port_bases = [first + 7 * k for k in range(len(zones))]
    now = datetime.now(UTC)
    ca = pki.create_ca("test-cluster", now)
    nodes: list[NodeFiles] = []
    for number, zone in enumerate(zones, start=1):
        node_id = f"n{number}"
        directory = root / node_id
        base = port_bases[number - 1]
        result = init_dev(directory, port_base=base, now=now)
        nodes.append(NodeFiles(node_id, zone, directory, result.config, base))
    keyset = nodes[0].directory / KEYSET_NAME
    for node in nodes[1:]:
        shutil.copyfile(keyset, node.directory / KEYSET_NAME)

    def port(source: str, target: NodeFiles) -> int:
        return dial(source, target.node_id, target.cluster) if dial else target.cluster

    for node in nodes:
        members = "".join(
            f'\n[[cluster.nodes]]\nid = "{n.node_id}"\n'
            f'address = "127.0.0.1:{port(node.node_id, n)}"\nzone = "{n.zone}"\n'
            for n in nodes
        )
        credentials = pki.issue_node_certificate(ca, node.node_id, ["127.0.0.1"], now)
        (node.directory / "cluster").mkdir(mode=0o700, exist_ok=True)
        credentials.save(node.directory / "cluster/node.crt", node.directory / "cluster/node.key")
        (node.directory / "cluster/ca.crt").write_bytes(
            (root / "ca.crt").read_bytes() if (root / "ca.crt").exists() else _ca_pem(ca, root)
        )
        text = node.config.read_text()
        text = text.replace('node = "node1"', f'node = "{node.node_id}"', 1)
        text += (
            f'\n[cluster]\nenabled = true\nid = "test-cluster"\n'
            f"replicas = {min(3, len(nodes))}\n"
            f"tick_ms = 50\n{extra_toml}\n{members}"
        )
        node.config.write_text(text)
    return nodes


def _ca_pem(ca: pki.ClusterCa, root: Path) -> bytes:
    ca.save(root / "ca.crt", root / "ca.key")
    return (root / "ca.crt").read_bytes()


async def wait_until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll ``predicate`` (state changed by another task or process) until true."""
    deadline = trio.current_time() + within_s
    while not predicate():
        if trio.current_time() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s")
        await trio.sleep(0.02)
