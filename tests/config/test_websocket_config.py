"""``[websocket]``: its defaults, every key, and errors that name the file and the key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from villaged.config import ConfigError, Endpoint, WebSocketConfig, load_config
from villaged.config.model import parse_origin
from villaged.ops.provision import init_dev

if TYPE_CHECKING:
    from pathlib import Path

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
    config = load_config(write(tmp_path, ""))
    assert config.websocket == WebSocketConfig(
        path="/xmpp-websocket",
        allowed_origins=None,
        public_url=None,
        ping_interval=30,
        ping_timeout=15,
    )
    assert not config.listeners.websocket.enabled


def test_every_key(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[websocket]
path = "/ws/xmpp"
allowed_origins = ["HTTPS://Chat.Example.org", "https://example.org:8443", "http://[::1]:*", "*"]
public_url = "wss://chat.example.org/ws/xmpp"
ping_interval = 3600
ping_timeout = 1
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "2001:DB8::/32"]
""",
        )
    )
    assert config.websocket == WebSocketConfig(
        path="/ws/xmpp",
        allowed_origins=(
            "https://chat.example.org:443",
            "https://example.org:8443",
            "http://[::1]:*",
            "*",
        ),
        public_url="wss://chat.example.org/ws/xmpp",
        ping_interval=3600,
        ping_timeout=1,
        trusted_proxies=("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"),
    )


def test_an_empty_origin_list_is_kept_empty(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[websocket]\nallowed_origins = []\n"))
    assert config.websocket.allowed_origins == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'path = "xmpp"',
            'websocket.path: expected an absolute URL path such as "/xmpp-websocket", got "xmpp"'
            " (an absolute path of URL characters, at most 255 long)",
        ),
        (
            'path = "/.well-known/xmpp"',
            'websocket.path: expected an absolute URL path such as "/xmpp-websocket", got'
            ' "/.well-known/xmpp" (/.well-known/ is reserved for host-meta)',
        ),
        ('path = "/a b"', "websocket.path: expected an absolute URL path"),
        (
            'allowed_origins = ["https://example.org/"]',
            'websocket.allowed_origins[0]: expected an origin such as "https://example.org",'
            ' "https://example.org:8443", "http://localhost:*" (any port) or "*" (any origin),'
            ' got "https://example.org/" (not an origin such as "https://example.org")',
        ),
        (
            'allowed_origins = ["https://example.org", "ftp://example.org"]',
            "websocket.allowed_origins[1]: expected an origin such as",
        ),
        ('allowed_origins = ["https://exa mple.org"]', "(host is neither an IP address"),
        ('allowed_origins = ["https://[nope]"]', "(brackets must hold an IPv6 address)"),
        ('allowed_origins = ["https://example.org:70000"]', "(port must be from 1 to 65535)"),
        ('allowed_origins = "https://example.org"', "websocket.allowed_origins: expected an array"),
        (
            'public_url = "https://example.org/xmpp-websocket"',
            'websocket.public_url: expected a URL such as "wss://example.org:5443/xmpp-websocket",'
            ' got "https://example.org/xmpp-websocket"',
        ),
        ('public_url = "wss://example.org"', "websocket.public_url: expected a URL"),
        ('public_url = "wss://example.org:0/x"', "(port must be from 1 to 65535)"),
        ("ping_interval = 0", "websocket.ping_interval: expected an integer from 1 to 3600, got 0"),
        (
            "ping_timeout = 601",
            "websocket.ping_timeout: expected an integer from 1 to 600, got 601",
        ),
        (
            'trusted_proxies = ["10.0.0.1/8"]',
            "websocket.trusted_proxies[0]: expected an IP address or network such as 10.0.0.0/8,"
            ' got "10.0.0.1/8" (not an IP address or network (10.0.0.1/8 has host bits set))',
        ),
        ('trusted_proxies = ["proxy.local"]', "websocket.trusted_proxies[0]: expected an IP"),
        ('trusted_proxies = ["::/0"]', "(that is every address"),
        ("pings = 1", 'unknown key "websocket.pings" (known: path, allowed_origins, public_url'),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, f"[websocket]\n{text}\n")
    key = text.split(" ", 1)[0]
    assert message.startswith((f"websocket.{key}", f'unknown key "websocket.{key}"')), message
    assert expected in message


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("https://example.org", "https://example.org:443"),
        ("http://example.org", "http://example.org:80"),
        ("https://example.org:0443", "https://example.org:443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://[0:0::1]:8443", "https://[::1]:8443"),
    ],
)
def test_origins_are_normalized(text: str, normalized: str) -> None:
    assert parse_origin(text) == normalized
    assert parse_origin(text, patterns=False) == normalized


@pytest.mark.parametrize("text", ["*", "https://example.org:*"])
def test_patterns_are_no_origin_of_a_request(text: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        parse_origin(text, patterns=False)


def test_dev_config_serves_websocket_to_local_pages(tmp_path: Path) -> None:
    config = load_config(init_dev(tmp_path / "dev", port_base=15222, now=datetime.now(UTC)).config)
    assert config.listeners.websocket.bind == (Endpoint("127.0.0.1", 15224),)
    assert config.websocket.allowed_origins == (
        "https://localhost:*",
        "http://localhost:*",
        "https://127.0.0.1:*",
        "http://127.0.0.1:*",
    )
    other = init_dev(tmp_path / "other", domain="example.org", now=datetime.now(UTC))
    origins = load_config(other.config).websocket.allowed_origins
    assert origins is not None
    assert origins[:2] == ("https://example.org:*", "http://example.org:*")
