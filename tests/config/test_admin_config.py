"""``[admin]``: its defaults, every key, relative socket paths, and errors that name the key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from villaged.config import AdminConfig, ConfigError, load_config
from villaged.ops.provision import init_dev

MINIMAL = """\
[server]
domain = "example.org"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(MINIMAL + text, encoding="utf-8")
    return path


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).admin == AdminConfig(
        socket=Path("/run/villaged/admin.sock"),
        group="",
        max_login_failures=5,
        lockout_seconds=900,
        grant_minutes=15,
        two_person_rule=False,
        checkpoint_interval=3600,
        notify_users=True,
    )


def test_every_key(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[admin]
socket = "/run/villaged/ops.sock"
group = "villaged-ops"
max_login_failures = 100
lockout_seconds = 86400
grant_minutes = 240
two_person_rule = true
checkpoint_interval = 60
notify_users = false
""",
        )
    )
    assert config.admin == AdminConfig(
        socket=Path("/run/villaged/ops.sock"),
        group="villaged-ops",
        max_login_failures=100,
        lockout_seconds=86400,
        grant_minutes=240,
        two_person_rule=True,
        checkpoint_interval=60,
        notify_users=False,
    )


def test_a_relative_socket_is_next_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[admin]\nsocket = "run/admin.sock"\n'))
    assert config.admin.socket == tmp_path.absolute() / "run" / "admin.sock"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('socket = ""', "admin.socket: expected a path (relative to the config file's directory)"),
        ("socket = 1", "admin.socket: expected a path"),
        (
            'group = "ops team"',
            'admin.group: expected a Unix group name, or "" for the daemon\'s own group,'
            ' got "ops team"',
        ),
        ('group = "-ops"', "admin.group: expected a Unix group name"),
        ("group = 1000", "admin.group: expected a Unix group name"),
        (
            "max_login_failures = 0",
            "admin.max_login_failures: expected an integer from 1 to 100, got 0",
        ),
        ("max_login_failures = 101", "expected an integer from 1 to 100, got 101"),
        ("lockout_seconds = 0", "admin.lockout_seconds: expected an integer from 1 to 86400"),
        ("lockout_seconds = 86401", "admin.lockout_seconds: expected an integer from 1 to 86400"),
        ("grant_minutes = 0", "admin.grant_minutes: expected an integer from 1 to 240, got 0"),
        ("grant_minutes = 241", "admin.grant_minutes: expected an integer from 1 to 240"),
        ("two_person_rule = 1", "admin.two_person_rule: expected true or false, got 1"),
        ("checkpoint_interval = 59", "admin.checkpoint_interval: expected an integer from 60"),
        ("checkpoint_interval = 86401", "expected an integer from 60 to 86400, got 86401"),
        ('notify_users = "yes"', 'admin.notify_users: expected true or false, got "yes"'),
        (
            "lockout = 60",
            'unknown key "admin.lockout" (known: socket, group, max_login_failures,'
            " lockout_seconds, grant_minutes, two_person_rule, checkpoint_interval,"
            " notify_users)",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, f"[admin]\n{text}\n")
    key = text.split(" ", 1)[0]
    assert message.startswith((f"admin.{key}", f'unknown key "admin.{key}"')), message
    assert expected in message


def test_dev_config_puts_the_socket_in_the_node_directory(tmp_path: Path) -> None:
    config = load_config(init_dev(tmp_path / "dev", now=datetime.now(UTC)).config)
    assert config.admin.socket == (tmp_path / "dev").absolute() / "admin.sock"
    assert config.admin == AdminConfig(socket=config.admin.socket)
