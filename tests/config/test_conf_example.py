"""conf/villaged.toml, the documented default, loads and documents every key."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from villaged.config import Config, Endpoint, load_config
from villaged.config.model import setting_of

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "villaged.toml"
#: Keys the packaged config leaves unset on purpose (logs go to journald; the recovery key
#: is the operators' to make).
OPTIONAL_KEYS = frozenset({"log.file", "backup.keyset_recipient", "federation.ca_file"})


def test_example_config_loads_without_its_files() -> None:
    config = load_config(EXAMPLE)
    assert config.server.domain == "example.org"
    assert config.tls.cert == Path("/etc/villaged/tls/fullchain.pem")
    assert config.tls.key == Path("/etc/villaged/tls/privkey.pem")
    assert config.storage.dir == Path("/var/lib/villaged/data")
    assert config.storage.keyset == Path("/etc/villaged/keyset.json")
    assert config.backup.dir == Path("/var/backups/villaged")  # where the backup unit writes
    assert config.log.file is None


def test_example_serves_metrics_on_loopback_only() -> None:
    config = load_config(EXAMPLE)
    assert config.listeners.http.bind == (Endpoint("127.0.0.1", 5280),)
    assert not config.listeners.http.allow_public
    assert not config.listeners.cluster.enabled
    assert config.listeners.c2s.bind == (Endpoint("0.0.0.0", 5222), Endpoint("::", 5222))  # noqa: S104


def _key_paths(cls: Any, prefix: str = "") -> list[str]:
    paths = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        if setting_of(f.metadata).internal:
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            paths += _key_paths(hint, f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def test_example_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for path in _key_paths(Config):
        section, _, name = path.rpartition(".")
        if section.startswith("listeners."):
            # Listener keys are documented once for all listeners.
            assert re.search(rf"^(#\s+)?{name}\b", text, re.MULTILINE), path
        else:
            assert re.search(rf"^\[{re.escape(section)}\]$", text, re.MULTILINE), path
            # A key that is off unless set (default None) may be shown commented out.
            optional = "(# )?" if path in OPTIONAL_KEYS else ""
            assert re.search(rf"^{optional}{name} = ", text, re.MULTILINE), path
