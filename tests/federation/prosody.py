"""A real Prosody (Debian's package) on loopback, as a federation peer for interop tests.

`ProsodyServer` describes one instance: its domain, accounts, certificate, how it authenticates
s2s peers, and where it sends s2s traffic; `ProsodyServer.running()` writes everything into the
instance's own directory, starts ``prosody -F`` and stops it again. Nothing outside that directory
is read or written (apart from Prosody's own code), and nothing listens anywhere but 127.0.0.1.

Files in the directory: ``prosody.cfg.lua``, ``certs/`` (its certificate and the CA it trusts),
``data/`` (accounts, rosters: Prosody's ``internal`` storage), ``plugins/`` (see below),
``prosody.log`` (everything at debug level) and ``prosody.pid``.

Static s2s routing
------------------
Prosody finds a peer through DNS (SRV ``_xmpps-server``/``_xmpp-server``, then A/AAAA on 5269);
the tests must not depend on DNS, and peers listen on random loopback ports. The community module
for this, mod_s2soutinjection (and its successor mod_s2sout_override), is not in Debian 12's
prosody-modules package, and its current versions need Prosody 0.12.4 while Debian 12 ships
0.12.3. So the harness writes its own small global plugin, ``mod_static_s2s_routes``, into the
instance's ``plugins/``: mod_s2s builds every outgoing connection's resolver with
``net.resolvers.service.new(domain, "xmpp-server" | "xmpps-server", ...)`` at call time, and the
plugin wraps that function so that a domain listed in the ``static_s2s_routes`` option resolves
to a fixed IP and port (STARTTLS, or direct TLS when the route says so) without any DNS query,
and any other domain resolves to nothing (the stanza bounces): a test can never make Prosody
query DNS or connect off-host. It restores the original on unload.

Root
----
CI runs the tests as root. Prosody (mod_posix) refuses to run as root, and prosodyctl switches to
the ``prosody`` user, which could not read the test's private temp directory; so when the tests
run as root the config sets ``run_as_root = true`` and both stay root.

Authentication modes
--------------------
``auth_mode="certs"``: ``s2s_secure_auth = true`` and no mod_dialback, so a peer must present a
certificate that verifies against the test CA and names its domain (SASL EXTERNAL, XEP-0178).
``auth_mode="dialback"``: ``s2s_secure_auth = false`` and mod_dialback (XEP-0220), so a peer whose
certificate does not verify (another CA, self-signed) is still accepted; give the instance such a
``certificate`` to make sure dialback, not EXTERNAL, is what happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import trio

from tests.federation.pki import PemPair, issue, write_pem_pair
from tests.federation.processes import LOOPBACK, accepts, stop
from tests.ports import free_port_base

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

__all__ = [
    "PROSODY",
    "PROSODYCTL",
    "AuthMode",
    "ProsodyError",
    "ProsodyServer",
    "StaticRoute",
    "prosody_available",
]

#: The binaries from Debian's ``prosody`` package (installed by .ci/system-deps).
PROSODY: Final = "prosody"
PROSODYCTL: Final = "prosodyctl"

AuthMode = Literal["certs", "dialback"]

# How often start() looks for open ports; the caller bounds the whole wait with trio.fail_after.
_POLL_INTERVAL_S: Final = 0.05
# On exit: SIGTERM, then this long for a clean shutdown, then SIGKILL.
# How much of the log an error message carries (the whole file stays in the directory).
_LOG_TAIL_CHARS: Final = 8000

_ROUTES_PLUGIN: Final = """\
-- Written by tests/federation/prosody.py: s2s to the domains in static_s2s_routes goes to a fixed
-- address instead of the DNS SRV/A result, and s2s to any other domain fails without a DNS query.
-- Wraps net.resolvers.service.new, which mod_s2s calls for every new outgoing connection, once
-- for _xmpps-server (direct TLS) and once for _xmpp-server (STARTTLS).
module:set_global();

local basic = require "net.resolvers.basic";
local service = require "net.resolvers.service";

local routes = module:get_option("static_s2s_routes", {});
local original_new = service.new;

local no_targets_mt = { __index = { next = function (_, cb) cb(nil); end } };

service.new = function (hostname, srv_name, conn_type, extra)
\tlocal route = routes[hostname];
\tif not route then
\t\tmodule:log("warn", "no static s2s route for %s (%s): not connecting", hostname, srv_name);
\t\treturn setmetatable({}, no_targets_mt);
\tend
\tlocal ip, port, direct_tls = route[1], route[2], route[3] == "direct-tls";
\tif (srv_name == "xmpps-server") == direct_tls then
\t\tmodule:log("info", "static s2s route for %s via %s: %s port %d", hostname, srv_name, ip, port);
\t\treturn basic.new(ip, port, conn_type, extra);
\tend
\treturn setmetatable({}, no_targets_mt);
end

function module.unload()
\tservice.new = original_new;
end
"""


class ProsodyError(Exception):
    """Prosody or prosodyctl failed; the message ends with the tail of its log or output."""


@dataclass(frozen=True)
class StaticRoute:
    """Where this instance connects for one remote domain (an IP literal, never a name)."""

    host: str
    port: int
    direct_tls: bool = False


def prosody_available() -> bool:
    """Whether Debian's prosody package is installed (it brings both binaries)."""
    return shutil.which(PROSODY) is not None and shutil.which(PROSODYCTL) is not None


class ProsodyServer:
    """One Prosody serving ``domain`` from ``directory`` on three free loopback ports: c2s
    (STARTTLS), s2s (STARTTLS) and s2s direct TLS (XEP-0368).

    ``ca`` is the CA whose certificates it trusts (peers' and its own by default: unless
    ``certificate`` is given, it gets one for ``domain`` issued by ``ca``). ``users`` maps
    local parts to passwords. Add s2s routes with `route` or `route_to` before `running`.
    """

    def __init__(
        self,
        directory: Path,
        domain: str,
        ca: PemPair,
        *,
        auth_mode: AuthMode = "certs",
        require_encryption: bool = True,
        certificate: PemPair | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.domain = domain
        self.ca = ca
        self.auth_mode: AuthMode = auth_mode
        self.require_encryption = require_encryption
        self.certificate = certificate or issue(ca, domain)
        self.users = dict(users if users is not None else {"alice": "alice-password"})
        port_base = free_port_base(3)
        self.c2s_port = port_base
        self.s2s_port = port_base + 1
        self.s2s_direct_tls_port = port_base + 2
        self.routes: dict[str, StaticRoute] = {}

    # --- paths --------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / "prosody.cfg.lua"

    @property
    def log_path(self) -> Path:
        return self.directory / "prosody.log"

    @property
    def ca_file(self) -> Path:
        """The CA certificate this instance trusts (also what a client should verify it with)."""
        return self.directory / "certs" / "ca.crt"

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    # --- s2s routes ---------------------------------------------------------------------------

    def route(
        self, domain: str, port: int, *, host: str = LOOPBACK, direct_tls: bool = False
    ) -> None:
        """Send s2s traffic for ``domain`` to ``host:port`` (loopback) instead of asking DNS."""
        if not host.startswith("127."):
            raise ValueError(f"static route for {domain}: {host} is not a loopback IPv4 address")
        self.routes[domain] = StaticRoute(host, port, direct_tls)

    def route_to(self, peer: ProsodyServer, *, direct_tls: bool = False) -> None:
        """Route ``peer``'s domain to its s2s port, STARTTLS or direct TLS (XEP-0368)."""
        port = peer.s2s_direct_tls_port if direct_tls else peer.s2s_port
        self.route(peer.domain, port, direct_tls=direct_tls)

    # --- config -------------------------------------------------------------------------------

    def render_config(self) -> str:
        """The Prosody config: Lua, every path absolute, every value from this object."""
        d = self.directory
        certs = d / "certs"
        routes = "".join(
            f"\t[{_lua(domain)}] = {{ {_lua(r.host)}, {r.port}, "
            f"{_lua('direct-tls' if r.direct_tls else 'starttls')} }};\n"
            for domain, r in sorted(self.routes.items())
        )
        modules = ["roster", "saslauth", "tls", "disco", "ping", "static_s2s_routes"]
        if self.auth_mode == "dialback":
            modules.append("dialback")
        secure_auth = self.auth_mode == "certs"
        ssl = (
            f"{{ certificate = {_lua(certs / f'{self.domain}.crt')}; "
            f"key = {_lua(certs / f'{self.domain}.key')}; cafile = {_lua(self.ca_file)} }}"
        )
        root = "run_as_root = true\n" if os.geteuid() == 0 else ""
        return f"""\
-- Written by tests/federation/prosody.py for one test; not a template for real deployments.
{root}pidfile = {_lua(d / "prosody.pid")}
data_path = {_lua(d / "data")}
admin_socket = {_lua(d / "data" / "prosody.sock")}
plugin_paths = {{ {_lua(d / "plugins")} }}
certificates = {_lua(certs)}
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = {_lua(self.log_path)} }} }}

interfaces = {{ {_lua(LOOPBACK)} }}
local_interfaces = {{ {_lua(LOOPBACK)} }}
c2s_interfaces = {{ {_lua(LOOPBACK)} }}
s2s_interfaces = {{ {_lua(LOOPBACK)} }}
c2s_ports = {{ {self.c2s_port} }}
s2s_ports = {{ {self.s2s_port} }}
c2s_direct_tls_ports = {{ }}
s2s_direct_tls_ports = {{ {self.s2s_direct_tls_port} }}
legacy_ssl_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}

modules_enabled = {{ {"; ".join(_lua(m) for m in modules)} }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = {_lua_bool(self.require_encryption)}
s2s_require_encryption = {_lua_bool(self.require_encryption)}
s2s_secure_auth = {_lua_bool(secure_auth)}
use_dane = false
ssl = {ssl}

static_s2s_routes = {{
{routes}}}

VirtualHost {_lua(self.domain)}
\tssl = {ssl}
"""

    def write_files(self) -> None:
        """Config, certificates and the routing plugin (done by `running`; public for tests)."""
        certs = self.directory / "certs"
        write_pem_pair(certs, self.domain, self.certificate)
        self.ca_file.write_bytes(self.ca.cert_pem)
        plugins = self.directory / "plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "mod_static_s2s_routes.lua").write_text(_ROUTES_PLUGIN)
        (self.directory / "data").mkdir(mode=0o700, exist_ok=True)
        self.config_path.write_text(self.render_config())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- running ------------------------------------------------------------------------------

    async def register_users(self) -> None:
        for user, password in self.users.items():
            await self._prosodyctl("register", user, self.domain, password)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ProsodyServer]:
        """Write the files, register the users, start Prosody and wait until its ports accept.

        Bound the start with ``trio.fail_after`` at the call site. On exit Prosody gets SIGTERM,
        then SIGKILL; if it died early, or the body raised, its log goes to stderr (pytest shows
        it with the failure).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write_files()
        await self.register_users()
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self.directory / "prosody.stdout").open("ab") as output:
            process = await trio.lowlevel.open_process(
                [PROSODY, "--config", str(self.config_path), "-F"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        try:
            try:
                await self._wait_listening(process, since=log_size)
            except BaseException:
                self._show_log(f"Prosody {self.domain} did not start", since=log_size)
                raise
            try:
                yield self
            except BaseException:
                self._show_log(f"Prosody {self.domain} (test failed)", since=log_size)
                raise
        finally:
            with trio.CancelScope(shield=True):
                await stop(process)

    async def _wait_listening(self, process: trio.Process, *, since: int) -> None:
        """Until all three ports accept. Prosody keeps running after failing to bind a port or
        to load its certificate, so an ``error`` line in its log fails the start too."""
        for port in (self.c2s_port, self.s2s_port, self.s2s_direct_tls_port):
            while True:
                if process.poll() is not None:
                    raise ProsodyError(
                        f"prosody for {self.domain} exited with {process.returncode} before "
                        f"listening on {LOOPBACK}:{port}\n{self._tail(since)}"
                    )
                self._raise_on_logged_errors(since)
                if await accepts(port):
                    break
                await trio.sleep(_POLL_INTERVAL_S)
        self._raise_on_logged_errors(since)

    def _raise_on_logged_errors(self, since: int) -> None:
        errors = [line for line in self.log_text()[since:].splitlines() if "\terror\t" in line]
        if errors:
            raise ProsodyError(
                f"prosody for {self.domain} logged errors while starting:\n" + "\n".join(errors)
            )

    async def _prosodyctl(self, *args: str) -> None:
        result = await trio.run_process(
            [PROSODYCTL, "--config", str(self.config_path), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ProsodyError(
                f"prosodyctl {args[0]} for {self.domain} failed ({result.returncode}):\n{output}"
            )

    def _tail(self, since: int = 0) -> str:
        text = self.log_text()[since:]
        stdout = self.directory / "prosody.stdout"
        if stdout.exists():
            text += "\n--- stdout/stderr ---\n" + stdout.read_text(errors="replace")
        return text[-_LOG_TAIL_CHARS:]

    def _show_log(self, headline: str, *, since: int) -> None:
        print(f"===== {headline}: {self.log_path} =====\n{self._tail(since)}", file=sys.stderr)


def _lua(value: object) -> str:
    """A Lua string literal (paths and domains in tests never need more than these escapes)."""
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _lua_bool(value: bool) -> str:
    return "true" if value else "false"
