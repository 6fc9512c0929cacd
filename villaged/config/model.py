"""The configuration schema: one frozen dataclass per TOML section.

This module owns what the settings *are*: their names, types, defaults, allowed ranges, the
one-line description of each expected form, and the rules that span several keys. It does not
read files; ``villaged.config.loader`` walks these dataclasses generically, so a new section is
a new dataclass here plus one field on ``Config``.

How a field is read is declared in its ``dataclasses.field(metadata=setting(...))``:

* ``int`` takes ``min``/``max``; ``bool`` is never an ``int`` and vice versa;
* ``str`` and other scalar types take ``parse`` (a function from the TOML string that raises
  ``ValueError`` with a short reason) and ``form`` (what the error message says is expected);
* ``pathlib.Path`` values are resolved against the config file's directory, defaults included;
* ``Literal[...]`` lists the allowed strings; ``X | None`` makes a key optional;
* ``tuple[X, ...]`` is a TOML array whose items are read as ``X`` (``item_form`` describes one);
* a nested dataclass is a TOML table (a section).

Rules across keys live in a section's ``validate(name)`` method, which the loader calls with a
function that turns a key of this section into its full dotted path, so messages name every key
involved wherever the section is mounted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TlsProfile = Literal["modern", "intermediate", "old"]
LogLevel = Literal["debug", "info", "warning", "error"]

_METADATA_KEY = "villaged.config"


@dataclass(frozen=True, slots=True)
class Setting:
    """How the loader reads one key: bounds, parser and the words used in error messages."""

    form: str | None = None
    item_form: str | None = None
    min: int | None = None
    max: int | None = None
    parse: Callable[[str], object] | None = None
    internal: bool = False


def setting(
    *,
    form: str | None = None,
    item_form: str | None = None,
    min: int | None = None,
    max: int | None = None,
    parse: Callable[[str], object] | None = None,
) -> Mapping[str, Setting]:
    """Field metadata for a configuration key (use as ``field(metadata=setting(...))``)."""
    return {_METADATA_KEY: Setting(form=form, item_form=item_form, min=min, max=max, parse=parse)}


def not_a_key() -> Mapping[str, Setting]:
    """Field metadata for dataclass fields the loader fills itself rather than from TOML."""
    return {_METADATA_KEY: Setting(internal=True)}


def setting_of(metadata: Mapping[str, Any]) -> Setting:
    """The ``Setting`` declared on a field, or the default one when none was declared."""
    found = metadata.get(_METADATA_KEY)
    return found if isinstance(found, Setting) else Setting()


class SettingError(ValueError):
    """A rule across keys is broken; raised by a section's ``validate``.

    ``key`` is the full dotted path of the key to blame; ``problem`` completes the sentence
    after it and names the other keys involved (also as full paths).
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# --- value parsers -------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NODE_NAME = re.compile(r"[a-z0-9-]{1,63}")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_domain(text: str) -> str:
    """Accept ``localhost`` or a lowercase DNS name of at least two labels (no IP literals)."""
    if text == "localhost":
        return text
    if len(text) > 253:
        raise ValueError("longer than 253 characters")
    labels = text.split(".")
    if len(labels) < 2:
        raise ValueError('needs at least two labels, like "example.org"')
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError("labels are 1 to 63 of a-z, 0-9 and inner '-'")
    if labels[-1].isdigit():
        raise ValueError("an IP address is not a domain")
    return text


def parse_node_name(text: str) -> str:
    if not _NODE_NAME.fullmatch(text):
        raise ValueError
    return text


def _is_host(text: str) -> bool:
    """An IPv4 literal or a hostname (a name whose last label is all digits must be IPv4)."""
    labels = text.split(".")
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return False
        return True
    return len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def parse_host(text: str) -> str:
    """A host name, an IPv4 address or an IPv6 address (without brackets)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        if not _is_host(text):
            raise ValueError("neither an IP address nor a host name") from None
    return text


class Endpoint(NamedTuple):
    """A listening address: ``host`` is an IP literal (IPv6 without brackets) or a hostname."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``"host:port"`` or ``"[v6]:port"`` into an ``Endpoint``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError("no port")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("brackets must hold an IPv6 address") from None
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets, like [::1]:5222")
    elif not _is_host(host):
        raise ValueError("host is neither an IP address nor a hostname")
    return Endpoint(host, int(port_text))


# XMPP over WebSocket: the path served, the browser origins let in, the URL advertised.

_WEBSOCKET_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,254}")
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[^\]]*\]|[^/:\[\]]+)"
    r"(?::(?P<port>[0-9]{1,5}|\*))?"
)
_WSS_URL = re.compile(
    r"wss://(?P<host>\[[^\]]*\]|[^/:?#\[\]]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_websocket_path(text: str) -> str:
    """An absolute URL path other than ``/.well-known/...`` (where host-meta is served)."""
    if not _WEBSOCKET_PATH.fullmatch(text):
        raise ValueError("an absolute path of URL characters, at most 255 long")
    if text == "/.well-known" or text.startswith("/.well-known/"):
        raise ValueError("/.well-known/ is reserved for host-meta")
    return text


def parse_origin(text: str, *, patterns: bool = True) -> str:
    """A web origin (RFC 6454) as ``scheme://host:port``: lowercase, default port written out,
    so that equal origins compare equal. With ``patterns`` (configuration, not a request
    header), ``scheme://host:*`` (any port) and ``*`` (any origin) are accepted too."""
    if patterns and text == "*":
        return text
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise ValueError('not an origin such as "https://example.org"')
    scheme = match["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("the scheme must be https or http")
    host = _url_host(match["host"])
    port = match["port"]
    if port is None:
        port = str(_DEFAULT_PORTS[scheme])
    elif port == "*":
        if not patterns:
            raise ValueError("a port pattern is not an origin")
    elif not 1 <= int(port) <= 65535:
        raise ValueError("port must be from 1 to 65535")
    else:
        port = str(int(port))
    return f"{scheme}://{host}:{port}"


def parse_public_websocket_url(text: str) -> str:
    """A ``wss://host[:port]/path`` URL, as clients are to be told (XEP-0156)."""
    match = _WSS_URL.fullmatch(text)
    if match is None:
        raise ValueError('not a URL such as "wss://example.org:5443/xmpp-websocket"')
    _url_host(match["host"])
    if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
        raise ValueError("port must be from 1 to 65535")
    return text


def _url_host(text: str) -> str:
    if text.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"
        except ValueError:
            raise ValueError("brackets must hold an IPv6 address") from None
    host = text.lower()
    if not _is_host(host):
        raise ValueError("host is neither an IP address nor a hostname")
    return host


# --- sections ------------------------------------------------------------------------------

_DOMAIN_FORM = 'a lowercase DNS name such as "example.org", or "localhost"'
_NODE_FORM = 'a node name of 1 to 63 characters from a-z, 0-9 and "-"'
_BIND_FORM = 'an array of "host:port" strings, e.g. ["127.0.0.1:5222", "[::1]:5222"]'
_ENDPOINT_FORM = '"host:port" with a port from 1 to 65535 ("[::1]:5222" for IPv6)'
_WEBSOCKET_PATH_FORM = 'an absolute URL path such as "/xmpp-websocket"'
_ORIGIN_FORM = (
    'an origin such as "https://example.org", "https://example.org:8443", '
    '"http://localhost:*" (any port) or "*" (any origin)'
)
_ORIGINS_FORM = f"an array of strings, each {_ORIGIN_FORM}"
_PUBLIC_URL_FORM = 'a URL such as "wss://example.org:5443/xmpp-websocket"'


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: who this server is."""

    domain: str = field(metadata=setting(form=_DOMAIN_FORM, parse=parse_domain))
    node: str = field(default="node1", metadata=setting(form=_NODE_FORM, parse=parse_node_name))


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where durable state lives and how the log is cut."""

    dir: Path = Path("data")
    keyset: Path = Path("keys/keyset.json")
    segment_bytes: int = field(default=64 * MiB, metadata=setting(min=1 * MiB, max=4 * GiB))
    max_record_bytes: int = field(default=1 * MiB, metadata=setting(min=4 * KiB, max=64 * MiB))
    snapshot_every: int = field(default=100_000, metadata=setting(min=1000, max=10_000_000))

    def validate(self, name: Callable[[str], str]) -> None:
        if self.max_record_bytes >= self.segment_bytes:
            raise SettingError(
                name("max_record_bytes"),
                f"must be less than {name('segment_bytes')} ({self.segment_bytes}), "
                f"got {self.max_record_bytes}",
            )


@dataclass(frozen=True, slots=True)
class C2SConfig:
    """``[c2s]``: limits for client connections (STARTTLS and direct TLS alike)."""

    max_stanza_bytes: int = field(default=256 * KiB, metadata=setting(min=10 * KiB, max=16 * MiB))
    max_depth: int = field(default=32, metadata=setting(min=4, max=256))
    max_attributes: int = field(default=64, metadata=setting(min=8, max=1024))
    handshake_timeout: int = field(default=10, metadata=setting(min=1, max=300))
    negotiation_timeout: int = field(default=60, metadata=setting(min=5, max=600))
    idle_timeout: int = field(default=300, metadata=setting(min=10, max=86_400))
    bytes_per_second: int = field(default=64 * KiB, metadata=setting(min=1 * KiB, max=1 * GiB))
    burst_bytes: int = field(default=512 * KiB, metadata=setting(min=16 * KiB, max=1 * GiB))
    max_connections_per_ip: int = field(default=100, metadata=setting(min=1, max=1_000_000))
    send_queue: int = field(default=512, metadata=setting(min=16, max=100_000))
    # XEP-0198: how long a dropped stream may be resumed (the most a client may ask for), and
    # how many stanzas a client may leave unacknowledged before the stream is ended.
    sm_resume_timeout: int = field(default=300, metadata=setting(min=1, max=86_400))
    sm_max_unacked: int = field(default=1000, metadata=setting(min=16, max=100_000))

    def validate(self, name: Callable[[str], str]) -> None:
        if self.burst_bytes < self.max_stanza_bytes:
            raise SettingError(
                name("burst_bytes"),
                f"must be at least {name('max_stanza_bytes')} ({self.max_stanza_bytes}) so "
                f"a stanza of the largest allowed size can arrive, got {self.burst_bytes}",
            )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: the certificate every TLS listener presents, and the default profile."""

    cert: Path
    key: Path
    profile: TlsProfile = "intermediate"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """``[listeners.NAME]``: where one kind of listener accepts connections."""

    bind: tuple[Endpoint, ...] = field(
        default=(),
        metadata=setting(form=_BIND_FORM, item_form=_ENDPOINT_FORM, parse=parse_endpoint),
    )
    tls_profile: TlsProfile | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.bind)

    def profile(self, default: TlsProfile) -> TlsProfile:
        """This listener's TLS profile: its own ``tls_profile``, else ``[tls].profile``."""
        return self.tls_profile if self.tls_profile is not None else default


@dataclass(frozen=True, slots=True)
class HttpListenerConfig(ListenerConfig):
    """``[listeners.http]``: metrics and health; loopback only unless ``allow_public``."""

    allow_public: bool = False

    def validate(self, name: Callable[[str], str]) -> None:
        if self.allow_public:
            return
        for endpoint in self.bind:
            if not endpoint.is_loopback:
                raise SettingError(
                    name("bind"),
                    f'"{endpoint}" is not a loopback address; metrics and health stay on '
                    f"loopback unless {name('allow_public')} = true",
                )


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    """``[listeners]``: one table per listener kind; an empty ``bind`` (the default) disables it."""

    c2s: ListenerConfig = field(default_factory=ListenerConfig)
    c2s_tls: ListenerConfig = field(default_factory=ListenerConfig)
    websocket: ListenerConfig = field(default_factory=ListenerConfig)
    http: HttpListenerConfig = field(default_factory=HttpListenerConfig)
    s2s: ListenerConfig = field(default_factory=ListenerConfig)
    s2s_tls: ListenerConfig = field(default_factory=ListenerConfig)
    cluster: ListenerConfig = field(default_factory=ListenerConfig)

    def by_name(self) -> dict[str, ListenerConfig]:
        """Every listener under its key name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, name: Callable[[str], str]) -> None:
        claimed: dict[Endpoint, str] = {}
        for listener_name, listener in self.by_name().items():
            here = name(f"{listener_name}.bind")
            for endpoint in listener.bind:
                if endpoint in claimed:
                    other = claimed[endpoint]
                    problem = "is listed twice" if other == here else f"is also bound by {other}"
                    raise SettingError(here, f'"{endpoint}" {problem}')
                claimed[endpoint] = here


def parse_network(text: str) -> str:
    """An IP network (``10.0.0.0/8``) or a single address (``127.0.0.1``, a /32 or /128), in
    its canonical spelling (villaged.net.proxy reads it back)."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IP address or network ({exc})") from None
    if network.prefixlen == 0:
        raise ValueError("that is every address: anyone could then claim any client address")
    return str(network)


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """``[websocket]``: XMPP over WebSocket (RFC 7395), served on ``[listeners.websocket]``.

    ``allowed_origins`` absent means the site's own origins only: ``https://<domain>`` and the
    origin of the public URL. A request without an ``Origin`` header (not a browser) is let in
    either way: the check protects browsers' users from pages of other sites.
    """

    path: str = field(
        default="/xmpp-websocket",
        metadata=setting(form=_WEBSOCKET_PATH_FORM, parse=parse_websocket_path),
    )
    allowed_origins: tuple[str, ...] | None = field(
        default=None,
        metadata=setting(form=_ORIGINS_FORM, item_form=_ORIGIN_FORM, parse=parse_origin),
    )
    public_url: str | None = field(
        default=None, metadata=setting(form=_PUBLIC_URL_FORM, parse=parse_public_websocket_url)
    )
    ping_interval: int = field(default=30, metadata=setting(min=1, max=3600))
    ping_timeout: int = field(default=15, metadata=setting(min=1, max=600))
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            form='an array of addresses or networks, e.g. ["127.0.0.1", "10.0.0.0/8"]',
            item_form="an IP address or network such as 10.0.0.0/8",
            parse=parse_network,
        ),
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: how much the daemon says, and where (stdout, or a file)."""

    level: LogLevel = "info"
    file: Path | None = None


_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def parse_group_name(text: str) -> str:
    """A Unix group name, or "" (the daemon's own group)."""
    if text and not _GROUP_NAME.fullmatch(text):
        raise ValueError("1 to 32 of A-Z, a-z, 0-9, '_', '.' and '-', not starting with - or .")
    return text


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the operators' admin socket, their TOTP login, inspection grants, audit."""

    socket: Path = Path("/run/villaged/admin.sock")
    group: str = field(
        default="",
        metadata=setting(
            form='a Unix group name, or "" for the daemon\'s own group', parse=parse_group_name
        ),
    )
    max_login_failures: int = field(default=5, metadata=setting(min=1, max=100))
    lockout_seconds: int = field(default=900, metadata=setting(min=1, max=86_400))
    grant_minutes: int = field(default=15, metadata=setting(min=1, max=240))
    two_person_rule: bool = False
    checkpoint_interval: int = field(default=3600, metadata=setting(min=60, max=86_400))
    notify_users: bool = True


def parse_argument(text: str) -> str:
    """One argument of a command line (no NUL, which no argv entry can hold)."""
    if not text or "\0" in text:
        raise ValueError("a non-empty string without NUL")
    return text


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """``[monitor]``: the security monitor's thresholds (counts within sliding windows) and
    the command that is told about each alert (villaged.ops.monitor)."""

    auth_failures_per_ip: int = field(default=10, metadata=setting(min=1, max=100_000))
    auth_failures_per_account: int = field(default=20, metadata=setting(min=1, max=100_000))
    auth_window: int = field(default=300, metadata=setting(min=1, max=86_400))
    block_seconds: int = field(default=900, metadata=setting(min=0, max=7 * 86_400))
    totp_failures: int = field(default=5, metadata=setting(min=1, max=10_000))
    totp_window: int = field(default=600, metadata=setting(min=1, max=86_400))
    grants_per_hour: int = field(default=10, metadata=setting(min=1, max=10_000))
    tls_failures_per_minute: int = field(default=200, metadata=setting(min=1, max=1_000_000))
    max_tracked_keys: int = field(default=10_000, metadata=setting(min=16, max=1_000_000))
    alert_command: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            form='an array of strings, e.g. ["/usr/local/bin/villaged-alert", "--page"]',
            item_form="a non-empty string",
            parse=parse_argument,
        ),
    )
    alert_timeout: int = field(default=10, metadata=setting(min=1, max=300))
    max_alert_commands: int = field(default=4, metadata=setting(min=1, max=64))
    max_alerts_per_minute: int = field(default=30, metadata=setting(min=1, max=10_000))
    ipv6_prefix: int = field(default=64, metadata=setting(min=32, max=128))

    def validate(self, name: Callable[[str], str]) -> None:
        if self.alert_command and not self.alert_command[0].startswith("/"):
            raise SettingError(
                name("alert_command"),
                f"the program must be an absolute path (no shell, no PATH search), got "
                f"{self.alert_command[0]!r}",
            )


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """``[[federation.peers]]``: where a remote domain's server is, instead of DNS (private
    federations, tests)."""

    domain: str = field(metadata=setting(form=_DOMAIN_FORM, parse=parse_domain))
    host: str = field(metadata=setting(form="a host name or IP address", parse=parse_host))
    port: int = field(default=5269, metadata=setting(min=1, max=65535))
    direct_tls: bool = False
    #: Only for closed test networks: allow this peer without TLS.
    require_tls: bool = True


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """``[federation]``: server-to-server links with other XMPP domains (villaged.federation).
    Inbound streams arrive on ``[listeners.s2s]`` / ``[listeners.s2s_tls]``."""

    enabled: bool = False
    ca_file: Path | None = None
    dialback: bool = True
    allow: tuple[str, ...] = field(
        default=(), metadata=setting(item_form=_DOMAIN_FORM, parse=parse_domain)
    )
    deny: tuple[str, ...] = field(
        default=(), metadata=setting(item_form=_DOMAIN_FORM, parse=parse_domain)
    )
    peers: tuple[PeerConfig, ...] = ()
    queue_deadline: int = field(default=86_400, metadata=setting(min=10, max=30 * 86_400))
    max_queued_per_domain: int = field(default=10_000, metadata=setting(min=10, max=1_000_000))
    retry_initial: int = field(default=5, metadata=setting(min=1, max=3600))
    retry_max: int = field(default=600, metadata=setting(min=1, max=86_400))
    connect_timeout: int = field(default=30, metadata=setting(min=1, max=600))
    negotiation_timeout: int = field(default=60, metadata=setting(min=5, max=600))
    idle_timeout: int = field(default=600, metadata=setting(min=10, max=86_400))
    max_stanza_bytes: int = field(default=512 * KiB, metadata=setting(min=10 * KiB, max=16 * MiB))
    bytes_per_second: int = field(default=1 * MiB, metadata=setting(min=1 * KiB, max=1 * GiB))
    burst_bytes: int = field(default=4 * MiB, metadata=setting(min=16 * KiB, max=1 * GiB))
    max_inbound_streams: int = field(default=1000, metadata=setting(min=1, max=1_000_000))

    def validate(self, name: Callable[[str], str]) -> None:
        if self.retry_max < self.retry_initial:
            raise SettingError(
                name("retry_max"), f"must be at least retry_initial ({self.retry_initial})"
            )
        if self.burst_bytes < self.max_stanza_bytes:
            raise SettingError(
                name("burst_bytes"), f"must be at least max_stanza_bytes ({self.max_stanza_bytes})"
            )
        seen: set[str] = set()
        for index, peer in enumerate(self.peers):
            if peer.domain in seen:
                raise SettingError(
                    name(f"peers[{index}].domain"), f'"{peer.domain}" is listed twice'
                )
            seen.add(peer.domain)
        both = set(self.allow) & set(self.deny)
        if both:
            raise SettingError(name("deny"), f'"{sorted(both)[0]}" is also in allow')

    def permits(self, domain: str) -> bool:
        """Whether federation with ``domain`` is allowed by the allow/deny lists."""
        if domain in self.deny:
            return False
        return not self.allow or domain in self.allow


@dataclass(frozen=True, slots=True)
class BackupConfig:
    """``[backup]``: where this node's backups go (``villaged backup create`` without ``--to``
    writes there, and the node reports their age as metrics)."""

    dir: Path | None = None
    #: The recovery public key (``villaged backup keygen``) the keyset is wrapped for in each
    #: backup (villaged.ops.backupkeys); unset: backups carry no keyset at all.
    keyset_recipient: Path | None = None


_ZONE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ZONE_FORM = 'a zone name of 1 to 63 characters from a-z, 0-9 and "-"'
_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def parse_zone(text: str) -> str:
    if not _ZONE.fullmatch(text):
        raise ValueError("not a zone name")
    return text


def parse_cluster_id(text: str) -> str:
    if not _CLUSTER_ID.fullmatch(text):
        raise ValueError("not a cluster id")
    return text


@dataclass(frozen=True, slots=True)
class ClusterNodeConfig:
    """``[[cluster.nodes]]``: one member of the cluster, the same list on every node."""

    id: str = field(metadata=setting(form=_NODE_FORM, parse=parse_node_name))
    #: Where the node's cluster listener is reached by the other nodes.
    address: Endpoint = field(metadata=setting(form=_ENDPOINT_FORM, parse=parse_endpoint))
    zone: str = field(metadata=setting(form=_ZONE_FORM, parse=parse_zone))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: this node as one member of a cluster serving the domain
    (villaged.cluster). This node is the member whose id is ``[server] node``."""

    enabled: bool = False
    #: Sent in every link's hello: nodes of two clusters never link by mistake.
    id: str = field(
        default="villaged",
        metadata=setting(
            form="1 to 63 characters from A-Z, a-z, 0-9, ., _ and -", parse=parse_cluster_id
        ),
    )
    ca_file: Path = Path("cluster/ca.crt")
    cert_file: Path = Path("cluster/node.crt")
    key_file: Path = Path("cluster/node.key")
    shards: int = field(default=16, metadata=setting(min=1, max=256))
    replicas: int = field(default=3, metadata=setting(min=1, max=7))
    tick_ms: int = field(default=50, metadata=setting(min=5, max=1000))
    election_ticks: int = field(default=10, metadata=setting(min=3, max=100))
    #: Compact a shard's log after this many applied entries (its state becomes a snapshot).
    snapshot_every: int = field(default=10_000, metadata=setting(min=100, max=10_000_000))
    #: How long a write may wait for its shard to commit it (through a leader election).
    commit_timeout: int = field(default=10, metadata=setting(min=1, max=300))
    nodes: tuple[ClusterNodeConfig, ...] = ()

    def validate(self, name: Callable[[str], str]) -> None:
        if not self.enabled:
            return
        if not self.nodes:
            raise SettingError(name("nodes"), "a cluster needs its [[cluster.nodes]] listed")
        seen: set[str] = set()
        for index, node in enumerate(self.nodes):
            if node.id in seen:
                raise SettingError(name(f"nodes[{index}].id"), f'"{node.id}" is listed twice')
            seen.add(node.id)
        if self.replicas > len(self.nodes):
            raise SettingError(
                name("replicas"),
                f"is {self.replicas} but only {len(self.nodes)} nodes are listed",
            )

    def member(self, node_id: str) -> ClusterNodeConfig | None:
        return next((n for n in self.nodes if n.id == node_id), None)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: one field per section, plus the file it came from."""

    server: ServerConfig
    tls: TlsConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    listeners: ListenersConfig = field(default_factory=ListenersConfig)
    c2s: C2SConfig = field(default_factory=C2SConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path = field(default=Path("villaged.toml"), metadata=not_a_key())
