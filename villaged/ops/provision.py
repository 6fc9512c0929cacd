"""Development provisioning: a working single-node setup in one directory (``villaged init --dev``).

This module owns the layout ``init_dev`` writes and the rule for re-running it: whatever exists
is kept (keys, certificate, config), so a dev server's data stays readable across runs, and
``force`` regenerates everything.

    DIR/villaged.toml        config for the domain, every listener on 127.0.0.1
    DIR/tls/cert.pem         self-signed certificate (ECDSA P-256)
    DIR/tls/key.pem          its key, 0600
    DIR/keys/keyset.json     the key-encryption keyset, 0600
    DIR/data/                created by the storage layer on first start
    DIR/admin.sock           the operators' admin socket, while the node runs

Files are written keyset first and config last: the config only appears once everything it
names exists, so an interrupted run is finished by running again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from villaged.config.model import parse_domain
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file
from villaged.storage.crypto import Keyset

if TYPE_CHECKING:
    import datetime as dt
    from pathlib import Path

__all__ = ["DEV_PORT_OFFSETS", "InitResult", "init_dev"]

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
    try:
        parse_domain(domain)
    except ValueError as exc:
        raise ValueError(f"domain {domain!r} is not usable: {exc}") from None
    if port_base < 1 or port_base + _HIGHEST_OFFSET > 65535:
        raise ValueError(
            f"port base {port_base} does not leave room for {_HIGHEST_OFFSET + 1} ports: "
            f"it must be from 1 to {65535 - _HIGHEST_OFFSET}"
        )
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")

    created: list[Path] = []
    kept: list[Path] = []

    def needed(*paths: Path) -> bool:
        if force or not all(os.path.lexists(path) for path in paths):
            created.extend(paths)
            return True
        kept.extend(paths)
        return False

    _make_private_directory(directory)
    keyset_path = directory / KEYSET_NAME
    _make_private_directory(keyset_path.parent)
    if needed(keyset_path):
        Keyset.generate(now).save(keyset_path)

    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    _make_private_directory(cert_path.parent)
    # A certificate is useless without its key and the other way round: both or neither.
    if needed(cert_path, key_path):
        cert_pem, key_pem = make_self_signed(domain, now)
        write_private_file(key_path, key_pem)
        write_file_atomic(cert_path, cert_pem, 0o644)

    config_path = directory / CONFIG_NAME
    if needed(config_path):
        write_file_atomic(config_path, dev_config_text(domain, port_base).encode(), 0o644)
    else:
        _add_missing_admin_section(config_path)

    return InitResult(
        directory=directory, config=config_path, created=tuple(created), kept=tuple(kept)
    )


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


def dev_config_text(domain: str, port_base: int) -> str:
    """The ``villaged.toml`` that ``init_dev`` writes (paths relative to its directory)."""
    listeners = "".join(
        f'\n# {purpose}\n[listeners.{name}]\nbind = ["127.0.0.1:{port_base + offset}"]\n'
        for name, (offset, purpose) in DEV_PORT_OFFSETS.items()
    )
    origins = ", ".join(f'"{origin}"' for origin in dev_websocket_origins(domain))
    websocket_url = f"wss://{domain}:{port_base + DEV_PORT_OFFSETS['websocket'][0]}/xmpp-websocket"
    return f"""\
# villaged development configuration, written by `villaged init --dev`.
# One node, every listener on loopback; relative paths start at this file's directory.
# conf/villaged.toml in the source tree documents every key.

[server]
domain = "{domain}"
node = "node1"

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
"""


def dev_websocket_origins(domain: str) -> list[str]:
    """The web origins a development node lets open a WebSocket: loopback pages (and pages of
    the dev domain), http or https, any port."""
    hosts = dict.fromkeys((domain, "localhost", "127.0.0.1"))
    return [f"{scheme}://{host}:*" for host in hosts for scheme in ("https", "http")]
