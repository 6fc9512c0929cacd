"""Development provisioning: a working node, or cluster, in one directory (``villaged init --dev``).

This module owns the layout ``init_dev`` writes and the rule for re-running it: whatever exists
is kept (keys, certificate, config), so a dev server's data stays readable across runs, and
``force`` regenerates everything.

    DIR/villaged.toml        config for the domain, every listener on 127.0.0.1
    DIR/tls/cert.pem         self-signed certificate (ECDSA P-256)
    DIR/tls/key.pem          its key, 0600
    DIR/keys/keyset.json     the key-encryption keyset, 0600
    DIR/data/                created by the storage layer on first start
    DIR/admin.sock           the operators' admin socket, while the node runs

A dev cluster (``init_cluster``, ``villaged init --dev --cluster``) is one such node directory
per node, plus the cluster CA beside them:

    DIR/ca/ca.crt, ca.key    the cluster CA (key 0600), outside every node's directory
    DIR/nK/                  node nK as above, ports from port_base + 10*(K-1), and
    DIR/nK/cluster/          ca.crt, node.crt, node.key (0600): its certificate from the CA
    DIR/demo-accounts.txt    with demo users: names and passwords, created once it runs

Every node holds the same keyset bytes (each replica unwraps the same data keys); the cluster
id is chosen once and kept in the CA's name.

Files are written keyset first and config last: the config only appears once everything it
names exists, so an interrupted run is finished by running again.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from villaged.cluster.pki import ClusterCa, create_ca, issue_node_certificate, load_ca
from villaged.config.model import parse_domain, parse_zone
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file
from villaged.storage.crypto import Keyset

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence
    from pathlib import Path

__all__ = [
    "DEV_PORT_OFFSETS",
    "ClusterInitResult",
    "ClusterNode",
    "InitResult",
    "init_cluster",
    "init_dev",
    "read_demo_accounts",
]

# Listener → offset from the port base, with what it is for (becomes a comment in the config).
DEV_PORT_OFFSETS: dict[str, tuple[int, str]] = {
    "c2s": (0, "XMPP clients, STARTTLS (RFC 6120)"),
    "c2s_tls": (1, "XMPP clients, direct TLS (XEP-0368)"),
    "websocket": (2, "XMPP over WebSocket (RFC 7395)"),
    "http": (3, "metrics and health, plain HTTP, loopback only"),
    "s2s": (4, "federation, STARTTLS"),
    "s2s_tls": (5, "federation, direct TLS (XEP-0368)"),
    "cluster": (6, "links to other nodes of this cluster, mutual TLS"),
}
_HIGHEST_OFFSET = max(offset for offset, _ in DEV_PORT_OFFSETS.values())

CONFIG_NAME = "villaged.toml"
CERT_NAME = "tls/cert.pem"
KEY_NAME = "tls/key.pem"
KEYSET_NAME = "keys/keyset.json"


@dataclass(frozen=True, slots=True)
class InitResult:
    """What ``init_dev`` did: files it wrote (``created``) and files it left alone (``kept``)."""

    directory: Path
    config: Path
    created: tuple[Path, ...]
    kept: tuple[Path, ...]


def init_dev(
    directory: Path,
    *,
    domain: str = "localhost",
    port_base: int = 5222,
    force: bool = False,
    now: dt.datetime,
) -> InitResult:
    """Write a complete dev setup for ``domain`` into ``directory`` (created 0700 if absent).

    Listeners use ports ``port_base`` to ``port_base + 6`` on 127.0.0.1 (see
    ``DEV_PORT_OFFSETS``). Existing files are kept unless ``force``, which regenerates the
    keyset, certificate and config — data written under the old keyset becomes unreadable.
    Raises ``ValueError`` for a bad domain, port base or naive ``now`` before writing anything.
    """
    _check_dev_arguments(domain, port_base, now)
    files = _FileReport(force)
    _make_private_directory(directory)
    _ensure_keyset(directory / KEYSET_NAME, files, now)
    _ensure_tls(directory, domain, files, now)
    config_path = _ensure_config(directory, dev_config_text(domain, port_base), files)
    return InitResult(
        directory=directory,
        config=config_path,
        created=tuple(files.created),
        kept=tuple(files.kept),
    )


def _check_dev_arguments(domain: str, port_base: int, now: dt.datetime, top: int = 0) -> None:
    """Raise ``ValueError`` for a bad domain, a port base that leaves no room for the ports
    (up to ``port_base + top + 6``) or a naive ``now``."""
    try:
        parse_domain(domain)
    except ValueError as exc:
        raise ValueError(f"domain {domain!r} is not usable: {exc}") from None
    highest = top + _HIGHEST_OFFSET
    if port_base < 1 or port_base + highest > 65535:
        raise ValueError(
            f"port base {port_base} does not leave room for {highest + 1} ports: "
            f"it must be from 1 to {65535 - highest}"
        )
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


class _FileReport:
    """The created/kept bookkeeping of a run: whatever exists is kept, unless ``force``."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.created: list[Path] = []
        self.kept: list[Path] = []

    def needed(self, *paths: Path, renew: bool = False) -> bool:
        """True (and noted as created) if ``paths`` must be written; else noted as kept."""
        if self.force or renew or not all(os.path.lexists(path) for path in paths):
            self.created.extend(paths)
            return True
        self.kept.extend(paths)
        return False


def _ensure_keyset(
    path: Path, files: _FileReport, now: dt.datetime, *, copy_of: bytes | None = None
) -> None:
    """A keyset at ``path`` (0600): a new one, or the bytes ``copy_of`` (a cluster's keyset)."""
    _make_private_directory(path.parent)
    if files.needed(path):
        if copy_of is None:
            Keyset.generate(now).save(path)
        else:
            write_private_file(path, copy_of)


def _ensure_tls(directory: Path, domain: str, files: _FileReport, now: dt.datetime) -> None:
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    _make_private_directory(cert_path.parent)
    # A certificate is useless without its key and the other way round: both or neither.
    if files.needed(cert_path, key_path):
        cert_pem, key_pem = make_self_signed(domain, now)
        write_private_file(key_path, key_pem)
        write_file_atomic(cert_path, cert_pem, 0o644)


def _ensure_config(directory: Path, text: str, files: _FileReport) -> Path:
    """The config, written last: it only appears once everything it names exists."""
    config_path = directory / CONFIG_NAME
    if files.needed(config_path):
        write_file_atomic(config_path, text.encode(), 0o644)
    else:
        _add_missing_admin_section(config_path)
    return config_path


def _add_missing_admin_section(config_path: Path) -> None:
    """A dev config written before the admin socket existed gets its ``[admin]`` section (the
    default socket path needs root), so ``make run`` keeps working; nothing else changes."""
    text = config_path.read_text(encoding="utf-8")
    if "\n[admin]" in text or text.startswith("[admin]"):
        return
    write_file_atomic(config_path, (text.rstrip("\n") + "\n" + _DEV_ADMIN).encode(), 0o644)


def _make_private_directory(directory: Path) -> None:
    """Create ``directory`` 0700 (missing parents get default modes); leave an existing one."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory") from None
        return
    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


_DEV_ADMIN: Final = """[admin]
# The operators' admin socket, in this directory (no root needed); see `villaged operator`.
socket = "admin.sock"
"""


def dev_config_text(domain: str, port_base: int, *, node: str = "node1", extra: str = "") -> str:
    """The ``villaged.toml`` that ``init_dev`` writes (paths relative to its directory);
    ``extra`` is appended (a cluster node's ``[cluster]`` section)."""
    listeners = "".join(
        f'\n# {purpose}\n[listeners.{name}]\nbind = ["127.0.0.1:{port_base + offset}"]\n'
        for name, (offset, purpose) in DEV_PORT_OFFSETS.items()
    )
    origins = ", ".join(f'"{origin}"' for origin in dev_websocket_origins(domain))
    websocket_url = f"wss://{domain}:{port_base + DEV_PORT_OFFSETS['websocket'][0]}/xmpp-websocket"
    return f"""\
# villaged development configuration, written by `villaged init --dev`.
# Every listener on loopback; relative paths start at this file's directory.
# conf/villaged.toml in the source tree documents every key.

[server]
domain = "{domain}"
node = "{node}"

[storage]
dir = "data"
keyset = "{KEYSET_NAME}"

[tls]
# Self-signed: clients must be told to accept it (or trust tls/cert.pem).
cert = "{CERT_NAME}"
key = "{KEY_NAME}"
profile = "intermediate"
{listeners}
[websocket]
# XMPP over WebSocket: {websocket_url}
# Web clients served from this machine (on any port: a web client's dev server) may connect.
# A production config leaves allowed_origins out, which admits https://<domain> and the
# public URL's own origin only.
allowed_origins = [{origins}]

{_DEV_ADMIN}
[log]
level = "debug"
{extra}"""


def dev_websocket_origins(domain: str) -> list[str]:
    """The web origins a development node lets open a WebSocket: loopback pages (and pages of
    the dev domain), http or https, any port."""
    hosts = dict.fromkeys((domain, "localhost", "127.0.0.1"))
    return [f"{scheme}://{host}:*" for host in hosts for scheme in ("https", "http")]


# --- a development cluster -----------------------------------------------------------------

CA_CERT_NAME = "ca/ca.crt"
CA_KEY_NAME = "ca/ca.key"
CLUSTER_CA_NAME = "cluster/ca.crt"
CLUSTER_CERT_NAME = "cluster/node.crt"
CLUSTER_KEY_NAME = "cluster/node.key"
DEMO_ACCOUNTS_NAME = "demo-accounts.txt"
#: A dev cluster's size (each shard has min(3, nodes) voters, the other nodes follow it).
MAX_CLUSTER_NODES: Final = 7
#: Each node's ports start this far after the previous node's.
NODE_PORT_STRIDE: Final = 10
DEFAULT_ZONES: Final = ("a", "b", "c")
_CA_NAME_PREFIX: Final = "villaged cluster CA "


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node of a dev cluster as ``init_cluster`` lays it out."""

    id: str
    zone: str
    port_base: int
    directory: Path

    @property
    def cluster_port(self) -> int:
        return self.port_base + DEV_PORT_OFFSETS["cluster"][0]

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_NAME


@dataclass(frozen=True, slots=True)
class ClusterInitResult:
    """What ``init_cluster`` did, over the CA and every node directory."""

    directory: Path
    cluster_id: str
    nodes: tuple[ClusterNode, ...]
    created: tuple[Path, ...]
    kept: tuple[Path, ...]


def cluster_layout(
    directory: Path, nodes: int, zones: Sequence[str], port_base: int
) -> tuple[ClusterNode, ...]:
    """Node ``nK`` in ``directory/nK``, zones given round-robin, ports ``port_base + 10*(K-1)``."""
    return tuple(
        ClusterNode(
            id=f"n{k}",
            zone=zones[(k - 1) % len(zones)],
            port_base=port_base + NODE_PORT_STRIDE * (k - 1),
            directory=directory / f"n{k}",
        )
        for k in range(1, nodes + 1)
    )


def init_cluster(
    directory: Path,
    *,
    nodes: int = 3,
    zones: Sequence[str] = DEFAULT_ZONES,
    domain: str = "localhost",
    port_base: int = 5222,
    demo_users: bool = False,
    force: bool = False,
    now: dt.datetime,
) -> ClusterInitResult:
    """Write a dev cluster of ``nodes`` nodes serving ``domain`` into ``directory``.

    ``directory/ca`` holds the cluster CA (outside every node's directory); ``directory/nK``
    is a complete node like ``init_dev`` makes, plus its cluster certificate and a
    ``[cluster]`` section listing every node. All nodes hold the same keyset: each replica must
    unwrap the same data keys. With ``demo_users``, demo account names and passwords go to
    ``directory/demo-accounts.txt`` (0600), for ``villaged cluster run-local`` to create once
    the cluster runs. Existing files are kept unless ``force``. Raises ``ValueError`` for bad
    arguments before writing anything.
    """
    if not 1 <= nodes <= MAX_CLUSTER_NODES:
        raise ValueError(f"a dev cluster has 1 to {MAX_CLUSTER_NODES} nodes, not {nodes}")
    if not zones:
        raise ValueError("at least one zone is needed")
    for zone in zones:
        try:
            parse_zone(zone)
        except ValueError:
            raise ValueError(
                f"zone {zone[:70]!r} is not a zone name: 1 to 63 of a-z, 0-9 and -"
            ) from None
    _check_dev_arguments(domain, port_base, now, top=NODE_PORT_STRIDE * (nodes - 1))
    layout = cluster_layout(directory, nodes, zones, port_base)

    files = _FileReport(force)
    _make_private_directory(directory)
    ca, cluster_id, new_ca = _ensure_ca(directory, files, now)
    keyset = _shared_keyset(layout, force)
    for node in layout:
        _make_private_directory(node.directory)
        keyset_path = node.directory / KEYSET_NAME
        _ensure_keyset(keyset_path, files, now, copy_of=keyset)
        if keyset is None:  # the first node made it; the others get a copy
            keyset = keyset_path.read_bytes()
        _ensure_tls(node.directory, domain, files, now)
        _ensure_node_credentials(node, ca, files, now, renew=new_ca)
        cluster_section = cluster_config_text(cluster_id, node, layout)
        _ensure_config(
            node.directory,
            dev_config_text(domain, node.port_base, node=node.id, extra=cluster_section),
            files,
        )
    if demo_users:
        _ensure_demo_passwords(directory / DEMO_ACCOUNTS_NAME, domain, files)
    return ClusterInitResult(
        directory=directory,
        cluster_id=cluster_id,
        nodes=layout,
        created=tuple(files.created),
        kept=tuple(files.kept),
    )


def _ensure_ca(
    directory: Path, files: _FileReport, now: dt.datetime
) -> tuple[ClusterCa, str, bool]:
    """The cluster CA, its cluster id (kept in the CA's name) and whether it is new."""
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    _make_private_directory(cert_path.parent)
    if files.needed(cert_path, key_path):
        cluster_id = f"dev-{secrets.token_hex(6)}"
        ca = create_ca(cluster_id, now)
        ca.save(cert_path, key_path)
        return ca, cluster_id, True
    ca = load_ca(cert_path, key_path)
    names = ca.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if not common_name.startswith(_CA_NAME_PREFIX):
        raise ValueError(f"{cert_path} is not a villaged cluster CA; --force makes a new one")
    return ca, common_name.removeprefix(_CA_NAME_PREFIX), False


def _shared_keyset(layout: Sequence[ClusterNode], force: bool) -> bytes | None:
    """The cluster's one keyset, if a node has it already (None: make a new one)."""
    existing = (
        {}
        if force
        else {
            node.id: path.read_bytes()
            for node in layout
            if (path := node.directory / KEYSET_NAME).is_file()
        }
    )
    if len(set(existing.values())) > 1:
        raise ValueError(
            f"the nodes' keysets differ ({', '.join(sorted(existing))}): a cluster needs one"
            " keyset on every node; --force starts over"
        )
    return next(iter(existing.values()), None)


def _ensure_node_credentials(
    node: ClusterNode, ca: ClusterCa, files: _FileReport, now: dt.datetime, *, renew: bool
) -> None:
    """``cluster/ca.crt``, ``node.crt`` and ``node.key`` (0600); ``renew`` (a new CA) rewrites
    them."""
    ca_path = node.directory / CLUSTER_CA_NAME
    cert_path, key_path = node.directory / CLUSTER_CERT_NAME, node.directory / CLUSTER_KEY_NAME
    _make_private_directory(ca_path.parent)
    if files.needed(ca_path, renew=renew):
        write_file_atomic(ca_path, ca.certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    if files.needed(cert_path, key_path, renew=renew):
        issue_node_certificate(ca, node.id, ["127.0.0.1"], now).save(cert_path, key_path)


def _ensure_demo_passwords(path: Path, domain: str, files: _FileReport) -> None:
    """Demo account names and random passwords, one ``jid password`` a line (0600): a cluster's
    accounts cannot be written offline, so ``villaged cluster run-local`` creates them."""
    from villaged.ops.demo import DEMO_USERS

    if not files.needed(path):
        return
    lines = [f"{local}@{domain} {secrets.token_urlsafe(12)}\n" for local in DEMO_USERS]
    write_private_file(path, "".join(lines).encode())


def read_demo_accounts(path: Path) -> list[tuple[str, str]]:
    """The ``(jid, password)`` pairs of a demo accounts file."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        jid, _, password = line.strip().partition(" ")
        if jid and password:
            pairs.append((jid, password))
    return pairs


def cluster_config_text(cluster_id: str, node: ClusterNode, layout: Sequence[ClusterNode]) -> str:
    """The ``[cluster]`` section of ``node``'s config (conf/cluster documents every key)."""
    members = "".join(
        f'\n[[cluster.nodes]]\nid = "{member.id}"\n'
        f'address = "127.0.0.1:{member.cluster_port}"\nzone = "{member.zone}"\n'
        for member in layout
    )
    return f"""
[cluster]
# This node ("{node.id}", [server] node) in a dev cluster on loopback, written by
# `villaged init --dev --cluster`; conf/cluster/ documents every key. Every node has the same
# keyset (keys/keyset.json) and a certificate from the cluster CA (kept in ../ca/).
enabled = true
id = "{cluster_id}"
# The cluster listener is [listeners.cluster] above; peers dial the address listed below.
ca_file = "{CLUSTER_CA_NAME}"
cert_file = "{CLUSTER_CERT_NAME}"
key_file = "{CLUSTER_KEY_NAME}"
replicas = {min(3, len(layout))}
{members}"""
