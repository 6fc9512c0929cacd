"""The TOML loader: every error names the file, the key path and the expected form."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from villaged.config import (
    Config,
    ConfigError,
    Endpoint,
    HttpListenerConfig,
    ListenerConfig,
    ListenersConfig,
    LogConfig,
    ServerConfig,
    StorageConfig,
    TlsConfig,
    load_config,
    read_section,
)
from villaged.config.loader import MAX_CONFIG_BYTES
from villaged.config.model import ClusterConfig, not_a_key, parse_endpoint, setting

MINIMAL = """\
[server]
domain = "example.org"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"""


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    """The message of the ConfigError that loading ``text`` raises (checked to be one line)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


# --- valid configurations --------------------------------------------------------------------


def test_minimal_config_takes_every_default(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert config == Config(
        server=ServerConfig(domain="example.org", node="node1"),
        tls=TlsConfig(
            cert=tmp_path / "tls/cert.pem", key=tmp_path / "tls/key.pem", profile="intermediate"
        ),
        storage=StorageConfig(
            dir=tmp_path / "data",
            keyset=tmp_path / "keys/keyset.json",
            segment_bytes=64 * 1024 * 1024,
            max_record_bytes=1024 * 1024,
            snapshot_every=100_000,
        ),
        listeners=ListenersConfig(),
        log=LogConfig(level="info"),
        cluster=ClusterConfig(
            ca_file=tmp_path / "cluster/ca.crt",
            cert_file=tmp_path / "cluster/node.crt",
            key_file=tmp_path / "cluster/node.key",
        ),
        source=tmp_path / "x.toml",
    )
    assert not any(listener.enabled for listener in config.listeners.by_name().values())


def test_defaults_written_out_load_the_same(tmp_path: Path) -> None:
    listeners = "".join(
        f"[listeners.{name}]\nbind = []\n"
        for name in ("c2s", "c2s_tls", "websocket", "s2s", "s2s_tls", "cluster")
    )
    explicit = f"""\
[server]
domain = "example.org"
node = "node1"

[storage]
dir = "data"
keyset = "keys/keyset.json"
segment_bytes = 67108864
max_record_bytes = 1048576
snapshot_every = 100000

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
profile = "intermediate"

{listeners}
[listeners.http]
bind = []
allow_public = false

[log]
level = "info"
"""
    assert load(tmp_path, explicit) == load(tmp_path, MINIMAL)


def test_every_key_can_be_set(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
[server]
domain = "chat.example.org"
node = "zone-a-2"

[storage]
dir = "/var/lib/villaged/data"
keyset = "/etc/villaged/keyset.json"
segment_bytes = 1048576
max_record_bytes = 4096
snapshot_every = 1000

[tls]
cert = "/etc/villaged/tls/fullchain.pem"
key = "/etc/villaged/tls/privkey.pem"
profile = "modern"

[listeners.c2s]
bind = ["0.0.0.0:5222", "[::]:5222"]
tls_profile = "old"

[listeners.http]
bind = ["10.0.0.1:9100"]
allow_public = true

[log]
level = "debug"
""",
    )
    assert config.server == ServerConfig(domain="chat.example.org", node="zone-a-2")
    assert config.storage == StorageConfig(
        dir=Path("/var/lib/villaged/data"),
        keyset=Path("/etc/villaged/keyset.json"),
        segment_bytes=1024 * 1024,
        max_record_bytes=4096,
        snapshot_every=1000,
    )
    assert config.tls.profile == "modern"
    assert config.listeners.c2s == ListenerConfig(
        bind=(Endpoint("0.0.0.0", 5222), Endpoint("::", 5222)),  # noqa: S104
        tls_profile="old",
    )
    assert config.listeners.c2s.profile(config.tls.profile) == "old"
    assert config.listeners.c2s_tls.profile(config.tls.profile) == "modern"
    assert config.listeners.http == HttpListenerConfig(
        bind=(Endpoint("10.0.0.1", 9100),), allow_public=True
    )
    assert config.log.level == "debug"


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write(
        tmp_path / "etc",
        MINIMAL.replace('"tls/key.pem"', '"../secret/key.pem"')
        + '[storage]\nkeyset = "/abs/keyset.json"\n',
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/x.toml"))
    assert config.source == Path("etc/x.toml")
    assert config.tls.cert == tmp_path / "etc/tls/cert.pem"
    assert config.tls.key == tmp_path / "secret/key.pem"
    assert config.storage.keyset == Path("/abs/keyset.json")
    assert config.storage.dir == tmp_path / "etc/data"  # a default, resolved the same way


def test_load_config_does_not_touch_referenced_files(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert not config.tls.cert.exists()
    assert not config.storage.dir.exists()


# --- the file itself ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read config file: No such file or directory"
    assert caught.value.file == path
    assert caught.value.key is None


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": cannot read config file: Is a directory$"):
        load_config(tmp_path)


def test_oversized_file(tmp_path: Path) -> None:
    path = write(tmp_path, "#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=r": config file is larger than 1048576 bytes$"):
        load_config(path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_bytes(b'[server]\ndomain = "caf\xe9.org"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: line 2: invalid TOML: not UTF-8 text"


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = error(tmp_path, '[server]\ndomain = "example.org"\nnode = node1\n')
    assert message == "line 3: invalid TOML: Invalid value (column 8)"


def test_toml_duplicate_table(tmp_path: Path) -> None:
    message = error(tmp_path, MINIMAL + "[server]\n")
    assert message.startswith("line 7: invalid TOML: ")


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    message = error(tmp_path, "[server]\ndomain = ")
    assert message.startswith("line 2: invalid TOML: ")
    assert message.endswith("(at end of file)")


def test_empty_file_says_what_is_missing(tmp_path: Path) -> None:
    assert error(tmp_path, "") == (
        'server.domain: missing; expected a lowercase DNS name such as "example.org", '
        'or "localhost"'
    )


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "colour = 1\n" + MINIMAL,
            'unknown key "colour" (known: server, tls, storage, listeners, c2s, websocket, log,'
            " admin, monitor, backup, federation, cluster)",
        ),
        (
            "source = 'x.toml'\n" + MINIMAL,
            'unknown key "source" (known: server, tls, storage, listeners, c2s, websocket, log,'
            " admin, monitor, backup, federation, cluster)",
        ),
        (
            MINIMAL + "[storage]\nsegment_size = 1\n",
            'unknown key "storage.segment_size" (known: dir, keyset, segment_bytes, '
            "max_record_bytes, snapshot_every)",
        ),
        (
            MINIMAL + "[listeners.c2ss]\nbind = []\n",
            'unknown key "listeners.c2ss" (known: c2s, c2s_tls, websocket, http, s2s, '
            "s2s_tls, cluster)",
        ),
        (
            MINIMAL + "[listeners.c2s]\nbind = []\nallow_public = true\n",
            'unknown key "listeners.c2s.allow_public" (known: bind, tls_profile)',
        ),
    ],
)
def test_unknown_keys_at_any_level(tmp_path: Path, text: str, expected: str) -> None:
    assert error(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[tls]\ncert = "c"\nkey = "k"\n',
            "server.domain: missing; expected",
        ),
        (
            '[server]\ndomain = "example.org"\n',
            "tls.cert: missing; expected a path (relative to the config file's directory)",
        ),
        (
            '[server]\ndomain = "example.org"\n[tls]\ncert = "c"\n',
            "tls.key: missing; expected a path",
        ),
    ],
)
def test_missing_required_keys(tmp_path: Path, text: str, expected: str) -> None:
    assert error(tmp_path, text).startswith(expected)


# --- types and ranges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            'segment_bytes = "big"',
            'storage.segment_bytes: expected an integer from 1048576 to 4294967296, got "big"',
        ),
        (
            "segment_bytes = true",
            "storage.segment_bytes: expected an integer from 1048576 to 4294967296, got true",
        ),
        (
            "segment_bytes = 1.5e9",
            "storage.segment_bytes: expected an integer from 1048576 to 4294967296, "
            "got 1500000000.0",
        ),
        (
            "segment_bytes = 1048575",
            "storage.segment_bytes: expected an integer from 1048576 to 4294967296, got 1048575",
        ),
        (
            "segment_bytes = 4294967297",
            "storage.segment_bytes: expected an integer from 1048576 to 4294967296, got 4294967297",
        ),
        (
            "max_record_bytes = 4095",
            "storage.max_record_bytes: expected an integer from 4096 to 67108864, got 4095",
        ),
        (
            "max_record_bytes = 67108865",
            "storage.max_record_bytes: expected an integer from 4096 to 67108864, got 67108865",
        ),
        (
            "snapshot_every = 999",
            "storage.snapshot_every: expected an integer from 1000 to 10000000, got 999",
        ),
        (
            "snapshot_every = 10000001",
            "storage.snapshot_every: expected an integer from 1000 to 10000000, got 10000001",
        ),
        (
            "dir = 5",
            "storage.dir: expected a path (relative to the config file's directory), got 5",
        ),
        (
            'dir = ""',
            'storage.dir: expected a path (relative to the config file\'s directory), got ""',
        ),
        (
            'dir = "a\\u0000b"',
            "storage.dir: expected a path (relative to the config file's directory), "
            'got "a\\u0000b"',
        ),
    ],
)
def test_storage_types_and_ranges(tmp_path: Path, setting: str, expected: str) -> None:
    assert error(tmp_path, f"{MINIMAL}[storage]\n{setting}\n") == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("true", "true"),
        ("false", "false"),
        ("42", "42"),
        ("1.5", "1.5"),
        ("[1, 2]", "an array"),
        ("{ a = 1 }", "a table"),
        ("1979-05-27T07:32:00Z", "a date-time"),
        ("1979-05-27", "a date"),
        ("07:32:00", "a time"),
        ('"Example.ORG"', '"Example.ORG"'),
        ('"line\\nbreak"', '"line\\nbreak"'),
        ('"' + "a" * 100 + '"', '"' + "a" * 61 + '..."'),
    ],
)
def test_values_are_shown_briefly_on_one_line(tmp_path: Path, value: str, shown: str) -> None:
    message = error(tmp_path, MINIMAL.replace('"example.org"', value))
    assert message.startswith('server.domain: expected a lowercase DNS name such as "example.org"')
    assert f"got {shown}" in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert error(tmp_path, 'log = "debug"\n' + MINIMAL) == 'log: expected a table, got "debug"'


def test_bool_is_not_an_int_and_int_is_not_a_bool(tmp_path: Path) -> None:
    assert error(tmp_path, MINIMAL + "[listeners.http]\nallow_public = 1\n") == (
        "listeners.http.allow_public: expected true or false, got 1"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + 'profile = "strict"\n',
            'tls.profile: expected one of "modern", "intermediate", "old", got "strict"',
        ),
        (
            MINIMAL + "profile = 1\n",
            'tls.profile: expected one of "modern", "intermediate", "old", got 1',
        ),
        (
            MINIMAL + '[listeners.s2s]\ntls_profile = "ancient"\n',
            'listeners.s2s.tls_profile: expected one of "modern", "intermediate", "old", '
            'got "ancient"',
        ),
        (
            MINIMAL + '[log]\nlevel = "trace"\n',
            'log.level: expected one of "debug", "info", "warning", "error", got "trace"',
        ),
    ],
)
def test_choices(tmp_path: Path, text: str, expected: str) -> None:
    assert error(tmp_path, text) == expected


# --- server ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain", ["localhost", "example.org", "chat.example.org", "xn--caf-dma.example", "a-1.b2"]
)
def test_plausible_domains(tmp_path: Path, domain: str) -> None:
    assert load(tmp_path, MINIMAL.replace("example.org", domain)).server.domain == domain


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("Example.org", "labels are 1 to 63 of a-z, 0-9 and inner '-'"),
        ("example", 'needs at least two labels, like "example.org"'),
        ("example.org.", "labels are 1 to 63 of a-z, 0-9 and inner '-'"),
        ("-x.example.org", "labels are 1 to 63 of a-z, 0-9 and inner '-'"),
        ("x_y.example.org", "labels are 1 to 63 of a-z, 0-9 and inner '-'"),
        ("a" * 64 + ".org", "labels are 1 to 63 of a-z, 0-9 and inner '-'"),
        (".".join(["abcdefghi"] * 26), "longer than 253 characters"),
        ("127.0.0.1", "an IP address is not a domain"),
        ("", 'needs at least two labels, like "example.org"'),
    ],
)
def test_implausible_domains(tmp_path: Path, domain: str, reason: str) -> None:
    message = error(tmp_path, MINIMAL.replace("example.org", domain))
    assert message.startswith('server.domain: expected a lowercase DNS name such as "example.org"')
    assert message.endswith(f"({reason})")


@pytest.mark.parametrize("node", ["n", "node-2", "zone-a-3", "x" * 63])
def test_node_names(tmp_path: Path, node: str) -> None:
    config = load(tmp_path, MINIMAL.replace("[tls]", f'node = "{node}"\n[tls]'))
    assert config.server.node == node


@pytest.mark.parametrize("node", ["", "Node1", "node_1", "x" * 64, "nöde"])
def test_bad_node_names(tmp_path: Path, node: str) -> None:
    message = error(tmp_path, MINIMAL.replace("[tls]", f'node = "{node}"\n[tls]'))
    assert message == (
        'server.node: expected a node name of 1 to 63 characters from a-z, 0-9 and "-", '
        f'got "{node}"'
    )


# --- listeners ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:5222", Endpoint("127.0.0.1", 5222)),
        ("0.0.0.0:1", Endpoint("0.0.0.0", 1)),  # noqa: S104
        ("[::1]:5222", Endpoint("::1", 5222)),
        ("[::]:65535", Endpoint("::", 65535)),
        ("[fe80::1%eth0]:5222", Endpoint("fe80::1%eth0", 5222)),
        ("xmpp.example.org:5269", Endpoint("xmpp.example.org", 5269)),
        ("localhost:5280", Endpoint("localhost", 5280)),
        ("Host-1:5280", Endpoint("Host-1", 5280)),
    ],
)
def test_endpoints(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert str(endpoint) == text
    host, port = endpoint  # stored as a (host, port) tuple
    assert (host, port) == (endpoint.host, endpoint.port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port must be from 1 to 65535"),
        ("127.0.0.1:0", "port must be from 1 to 65535"),
        ("127.0.0.1:65536", "port must be from 1 to 65535"),
        ("127.0.0.1:+80", "port must be from 1 to 65535"),
        ("127.0.0.1:123456", "port must be from 1 to 65535"),
        ("::1:5222", "an IPv6 address needs brackets, like [::1]:5222"),
        ("[127.0.0.1]:5222", "brackets must hold an IPv6 address"),
        ("[::g]:5222", "brackets must hold an IPv6 address"),
        (":5222", "host is neither an IP address nor a hostname"),
        ("300.1.1.1:5222", "host is neither an IP address nor a hostname"),
        ("bad_host:5222", "host is neither an IP address nor a hostname"),
        ("a..b:5222", "host is neither an IP address nor a hostname"),
    ],
)
def test_bad_endpoints(tmp_path: Path, text: str, reason: str) -> None:
    message = error(tmp_path, f'{MINIMAL}[listeners.c2s]\nbind = ["[::1]:5222", "{text}"]\n')
    assert message == (
        'listeners.c2s.bind[1]: expected "host:port" with a port from 1 to 65535 '
        f'("[::1]:5222" for IPv6), got "{text}" ({reason})'
    )


def test_bind_must_be_an_array_of_strings(tmp_path: Path) -> None:
    form = 'an array of "host:port" strings, e.g. ["127.0.0.1:5222", "[::1]:5222"]'
    assert error(tmp_path, f'{MINIMAL}[listeners.s2s]\nbind = "0.0.0.0:5269"\n') == (
        f'listeners.s2s.bind: expected {form}, got "0.0.0.0:5269"'
    )
    assert error(tmp_path, f"{MINIMAL}[listeners.s2s]\nbind = [5269]\n") == (
        'listeners.s2s.bind[0]: expected "host:port" with a port from 1 to 65535 '
        '("[::1]:5222" for IPv6), got 5269'
    )


def test_empty_bind_disables_a_listener(tmp_path: Path) -> None:
    config = load(tmp_path, f'{MINIMAL}[listeners.cluster]\nbind = []\ntls_profile = "modern"\n')
    assert config.listeners.cluster == ListenerConfig(bind=(), tls_profile="modern")
    assert not config.listeners.cluster.enabled


@pytest.mark.parametrize("bind", ["127.0.0.1:5280", "127.3.2.1:5280", "[::1]:5280", "localhost:1"])
def test_http_listener_on_loopback(tmp_path: Path, bind: str) -> None:
    config = load(tmp_path, f'{MINIMAL}[listeners.http]\nbind = ["{bind}"]\n')
    assert config.listeners.http.bind == (parse_endpoint(bind),)
    assert config.listeners.http.enabled


@pytest.mark.parametrize("bind", ["0.0.0.0:5280", "[::]:5280", "metrics.example.org:5280"])
def test_http_listener_off_loopback_needs_allow_public(tmp_path: Path, bind: str) -> None:
    text = f'{MINIMAL}[listeners.http]\nbind = ["127.0.0.1:5280", "{bind}"]\n'
    assert error(tmp_path, text) == (
        f'listeners.http.bind: "{bind}" is not a loopback address; metrics and health stay on '
        "loopback unless listeners.http.allow_public = true"
    )
    config = load(tmp_path, text + "allow_public = true\n")
    assert config.listeners.http.bind[1] == parse_endpoint(bind)


def test_one_address_cannot_serve_two_listeners(tmp_path: Path) -> None:
    text = (
        f'{MINIMAL}[listeners.c2s]\nbind = ["0.0.0.0:5222"]\n'
        '[listeners.s2s]\nbind = ["[::]:5269", "0.0.0.0:5222"]\n'
    )
    assert error(tmp_path, text) == (
        'listeners.s2s.bind: "0.0.0.0:5222" is also bound by listeners.c2s.bind'
    )


def test_one_listener_cannot_name_an_address_twice(tmp_path: Path) -> None:
    text = f'{MINIMAL}[listeners.c2s]\nbind = ["[::]:5222", "[::]:5222"]\n'
    assert error(tmp_path, text) == ('listeners.c2s.bind: "[::]:5222" is listed twice')


# --- rules across keys -------------------------------------------------------------------------


def test_max_record_must_be_below_segment_size(tmp_path: Path) -> None:
    text = f"{MINIMAL}[storage]\nsegment_bytes = 1048576\nmax_record_bytes = 1048576\n"
    assert error(tmp_path, text) == (
        "storage.max_record_bytes: must be less than storage.segment_bytes (1048576), got 1048576"
    )
    text = f"{MINIMAL}[storage]\nsegment_bytes = 2097152\nmax_record_bytes = 2097151\n"
    assert load(tmp_path, text).storage.max_record_bytes == 2097151


def test_default_record_limit_is_checked_against_a_small_segment(tmp_path: Path) -> None:
    text = f"{MINIMAL}[storage]\nsegment_bytes = 1048576\n"
    assert error(tmp_path, text).startswith("storage.max_record_bytes: must be less than")


# --- the generic reader, on sections the product does not have (yet) -------------------------


@dataclass(frozen=True)
class _Limits:
    at_least: int = field(default=1, metadata=setting(min=1))
    at_most: int = field(default=1, metadata=setting(max=9))
    any_int: int = 0
    ports: tuple[int, ...] = field(default=(), metadata=setting(item_form="a port number", min=1))
    weights: tuple[int, ...] = field(default=(), metadata=setting(max=5))
    label: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    origin: str = field(default="config", metadata=not_a_key())


@dataclass(frozen=True)
class _Outer:
    limits: _Limits
    name: str = "outer"


@dataclass(frozen=True)
class _RequiredOptional:
    count: int | None = field(metadata=setting(min=0))


@dataclass(frozen=True)
class _Unreadable:
    ratio: float = 0.5


def read(table: dict[str, object]) -> _Outer:
    return read_section(_Outer, table, file=Path("t.toml"), base_dir=Path("/"))


def read_error(table: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        read(table)
    return str(caught.value)


def test_generic_defaults_and_optional_values() -> None:
    assert read({}) == _Outer(limits=_Limits(), name="outer")
    outer = read({"limits": {"label": "x", "ports": [5, 6], "aliases": ["a"]}, "name": "n"})
    assert outer == _Outer(limits=_Limits(label="x", ports=(5, 6), aliases=("a",)), name="n")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"at_least": 0}, "t.toml: limits.at_least: expected an integer of at least 1, got 0"),
        ({"at_most": 10}, "t.toml: limits.at_most: expected an integer of at most 9, got 10"),
        ({"any_int": "1"}, 't.toml: limits.any_int: expected an integer, got "1"'),
        ({"ports": [1, 0]}, "t.toml: limits.ports[1]: expected a port number, got 0"),
        ({"ports": 1}, "t.toml: limits.ports: expected an array of a port number, got 1"),
        (
            {"weights": 1},
            "t.toml: limits.weights: expected an array of an integer of at most 5, got 1",
        ),
        ({"weights": [6]}, "t.toml: limits.weights[0]: expected an integer of at most 5, got 6"),
        ({"label": 1}, "t.toml: limits.label: expected a string, got 1"),
        (
            {"origin": "x"},
            't.toml: unknown key "limits.origin" '
            "(known: at_least, at_most, any_int, ports, weights, label, aliases)",
        ),
    ],
)
def test_generic_forms(table: dict[str, object], expected: str) -> None:
    assert read_error({"limits": table}) == expected


def test_generic_missing_section_is_read_as_empty() -> None:
    assert read_error({"name": "x", "limits": "none"}) == (
        't.toml: limits: expected a table, got "none"'
    )


def test_a_required_optional_key_names_its_form() -> None:
    with pytest.raises(ConfigError) as caught:
        read_section(_RequiredOptional, {}, file=Path("t.toml"), base_dir=Path("/"))
    assert str(caught.value) == "t.toml: count: missing; expected an integer of at least 0"


def test_a_type_the_reader_cannot_read_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no way to read"):
        read_section(_Unreadable, {"ratio": "1"}, file=Path("t.toml"), base_dir=Path("/"))


def test_config_error_is_always_one_line() -> None:
    err = ConfigError(Path("x.toml"), "bad\r\nvalue", key="a.b")
    assert str(err) == "x.toml: a.b: bad\\r\\nvalue"
    assert (err.file, err.key, err.problem) == (Path("x.toml"), "a.b", "bad\r\nvalue")


def test_errors_name_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("conf")
    write(tmp_path / "conf", MINIMAL + '[storage]\nsegment_bytes = "big"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(Path("conf/x.toml"))
    assert str(caught.value) == (
        "conf/x.toml: storage.segment_bytes: expected an integer from 1048576 to 4294967296, "
        'got "big"'
    )
