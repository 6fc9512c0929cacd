"""A real ejabberd (Debian's package, 23.01) on loopback, as a federation peer for interop tests.

`EjabberdServer` describes one instance: its domain, accounts, certificate, how it authenticates
s2s peers, and where it sends s2s traffic; `EjabberdServer.running()` writes everything into the
instance's own directory, starts ejabberd in the foreground and stops it again. Nothing outside
that directory is written (apart from Erlang's and ejabberd's own code, nothing is read either),
and nothing listens anywhere but 127.0.0.1.

Files in the directory: ``ejabberd.yml`` (the config; JSON, which YAML reads as flow style),
``inetrc`` (Erlang's resolver configuration), ``startup.terms`` (accounts and s2s routes, read by
the boot code below), ``certs/`` (its certificate + key in one PEM file, and the CA it trusts),
``spool/`` (Mnesia: accounts, rosters), ``logs/ejabberd.log`` (debug level) and ``error.log``,
``ejabberd.stdout`` (the console log) and ``ready`` (written once accounts exist).

Starting
--------
``ejabberdctl foreground`` is not used: run as root it re-executes itself as the ``ejabberd``
user (``su``), which cannot read the test's private temp directory, and it always sets up Erlang
distribution (a node name, a cookie, epmd). The harness runs ``erl`` directly the way
ejabberdctl would (``ERL_LIBS``, ``EJABBERD_CONFIG_PATH``, ``EJABBERD_LOG_PATH``,
``-mnesia dir``, ``-s ejabberd``) but without ``-sname``: the node is not distributed, so there
is no node name to collide between tests, no cookie, no epmd to start or stop, and no
ejabberdctl either. Accounts are created by the boot code instead
(``ejabberd_auth:try_register/3`` in an ``-eval`` after ``-s ejabberd``, which returns once the
application has started), and it then writes ``ready``; SIGTERM stops the node cleanly
(Erlang/OTP turns it into ``init:stop()``).

Static s2s routing
------------------
ejabberd (xmpp_stream_out) finds a peer with ``inet_res:getbyname(Name, srv)`` for
``_xmpps-server._tcp.<domain>`` and ``_xmpp-server._tcp.<domain>``, then ``net:getaddrinfo`` on
each SRV target (or on the domain itself, port ``outgoing_s2s_port``, when there is no SRV
record). ``inet_res:getbyname`` answers from inet_db's resolver cache before asking any name
server, so the boot code, before ejabberd starts, puts one SRV record per route into that cache
(``inet_db:add_rr``, TTL one day) whose target is the IP literal ``127.0.0.1`` and whose port is
the peer's s2s (STARTTLS) port; getaddrinfo parses a literal without any lookup. The ``inetrc``
(``ERL_INETRC``) empties the resolver's name server list (``{resolv_conf, ""}``), so any other
SRV query fails at once without network traffic, and ``s2s_access`` only allows the routed
domains: ejabberd never opens an s2s connection (nor resolves) a domain without a route.

Root
----
CI runs the tests as root; ejabberd itself does not mind (only ejabberdctl switches users).
``HOME`` points at the instance directory so nothing lands in root's home.

Authentication modes
--------------------
``auth_mode="certs"``: no mod_s2s_dialback, so the only way in or out is SASL EXTERNAL with a
certificate that verifies against ``ca_file`` (XEP-0178). ``auth_mode="dialback"``: with
mod_s2s_dialback (XEP-0220); give the instance a ``certificate`` the peer cannot verify to make
sure dialback, not EXTERNAL, is what happens. ``s2s_use_starttls: required`` either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, Literal

import trio

from tests.federation.pki import PemPair, issue
from tests.federation.processes import LOOPBACK, accepts, stop
from tests.ports import free_port_base

if TYPE_CHECKING:
    import re
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

__all__ = [
    "EJABBERDCTL",
    "ERL",
    "AuthMode",
    "EjabberdError",
    "EjabberdServer",
    "ejabberd_available",
]

#: Debian's ``ejabberd`` package (installed by .ci/system-deps): ejabberdctl is only looked for
#: to tell whether the package is there; the harness runs ``erl`` with ejabberd's code path.
EJABBERDCTL: Final = "ejabberdctl"
ERL: Final = "erl"
#: Where Debian installs ejabberd's own application (``ejabberd-<version>/ebin``); its
#: dependencies (p1_xmpp, fast_tls, ...) are in Erlang's library directory.
EJABBERD_LIBS: Final = "/usr/lib/x86_64-linux-gnu"

AuthMode = Literal["certs", "dialback"]

_POLL_INTERVAL_S: Final = 0.05
_LOG_TAIL_CHARS: Final = 8000
_SRV_TTL_S: Final = 86400

# Run before ``-s ejabberd``: the s2s routes as SRV records in the resolver cache.
_BOOT_ROUTES: Final = """\
{ok, Terms} = file:consult(%(terms)s),
[ok = inet_db:add_rr(Name, in, srv, %(ttl)d, {0, 0, Port, Target})
 || {srv, Name, Target, Port} <- Terms],
ok."""

# Run after ``-s ejabberd``: the accounts, then the ready marker. A failing match stops the boot.
_BOOT_USERS: Final = """\
{ok, Terms} = file:consult(%(terms)s),
[ok = ejabberd_auth:try_register(User, Host, Password) || {user, User, Host, Password} <- Terms],
ok = file:write_file(%(ready)s, <<"ready">>)."""


class EjabberdError(Exception):
    """ejabberd failed; the message ends with the tail of its log or output."""


def ejabberd_available() -> bool:
    """Whether Debian's ejabberd package (and so Erlang) is installed."""
    return (
        shutil.which(EJABBERDCTL) is not None
        and shutil.which(ERL) is not None
        and any(p.startswith("ejabberd-") for p in _listdir(EJABBERD_LIBS))
    )


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class EjabberdServer:
    """One ejabberd serving ``domain`` from ``directory`` on two free loopback ports: c2s and
    s2s (both STARTTLS).

    ``ca`` is the CA whose certificates it trusts (unless ``certificate`` is given, it gets one
    for ``domain`` issued by ``ca``). ``users`` maps local parts to passwords. Add s2s routes
    with `route` before `running`.
    """

    def __init__(
        self,
        directory: Path,
        domain: str,
        ca: PemPair,
        *,
        auth_mode: AuthMode = "certs",
        certificate: PemPair | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.domain = domain
        self.ca = ca
        self.auth_mode: AuthMode = auth_mode
        self.certificate = certificate or issue(ca, domain)
        self.users = dict(users if users is not None else {"alice": "alice-password"})
        port_base = free_port_base(2)
        self.c2s_port = port_base
        self.s2s_port = port_base + 1
        self.routes: dict[str, int] = {}

    # --- paths --------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / "ejabberd.yml"

    @property
    def log_path(self) -> Path:
        return self.directory / "logs" / "ejabberd.log"

    @property
    def ready_path(self) -> Path:
        return self.directory / "ready"

    @property
    def ca_file(self) -> Path:
        return self.directory / "certs" / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "certs" / f"{self.domain}.pem"

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    # --- s2s routes ---------------------------------------------------------------------------

    def route(self, domain: str, port: int) -> None:
        """Send s2s traffic for ``domain`` to 127.0.0.1:``port`` (STARTTLS) instead of DNS."""
        self.routes[domain] = port

    # --- files --------------------------------------------------------------------------------

    def render_config(self) -> str:
        """The ejabberd config as JSON (a YAML document); every path absolute."""
        modules: dict[str, dict[str, object]] = {
            "mod_roster": {},
            "mod_disco": {},
            "mod_ping": {},
        }
        if self.auth_mode == "dialback":
            modules["mod_s2s_dialback"] = {}
        listener = {"ip": LOOPBACK, "max_stanza_size": 262144}
        config: dict[str, object] = {
            "hosts": [self.domain],
            "loglevel": "debug",
            "hide_sensitive_log_data": False,
            "certfiles": [str(self.cert_file)],
            "ca_file": str(self.ca_file),
            "listen": [
                {
                    **listener,
                    "port": self.c2s_port,
                    "module": "ejabberd_c2s",
                    "starttls_required": True,
                },
                {**listener, "port": self.s2s_port, "module": "ejabberd_s2s_in"},
            ],
            "s2s_use_starttls": "required",
            "outgoing_s2s_families": ["ipv4"],
            "s2s_dns_timeout": 2,
            "s2s_dns_retries": 1,
            "auth_method": "internal",
            "auth_password_format": "scram",
            "default_db": "mnesia",
            "acl": {"s2s_peers": {"server": sorted(self.routes)}} if self.routes else {},
            "access_rules": {
                "s2s": {"allow": "s2s_peers"} if self.routes else {"deny": "all"},
                "local": {"allow": "all"},
            },
            "s2s_access": "s2s",
            "modules": modules,
        }
        return (
            "# Written by tests/federation/ejabberd.py for one test (JSON is YAML).\n"
            + json.dumps(config, indent=2)
            + "\n"
        )

    def render_inetrc(self) -> str:
        """Erlang resolver config: no name servers, no hosts file, DNS (cache) only."""
        return '{resolv_conf, ""}.\n{hosts_file, ""}.\n{lookup, [dns]}.\n'

    def render_startup_terms(self) -> str:
        lines = [
            f"{{srv, {_erl_str(f'_xmpp-server._tcp.{domain}')}, {_erl_str(LOOPBACK)}, {port}}}.\n"
            for domain, port in sorted(self.routes.items())
        ]
        lines += [
            f"{{user, {_erl_bin(user)}, {_erl_bin(self.domain)}, {_erl_bin(password)}}}.\n"
            for user, password in sorted(self.users.items())
        ]
        return "".join(lines)

    def write_files(self) -> None:
        """Config, certificates, resolver config and boot terms (done by `running`)."""
        certs = self.directory / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        self.cert_file.write_bytes(self.certificate.cert_pem + self.certificate.key_pem)
        self.cert_file.chmod(0o600)
        self.ca_file.write_bytes(self.ca.cert_pem)
        for sub in ("spool", "logs"):
            (self.directory / sub).mkdir(mode=0o700, exist_ok=True)
        self.config_path.write_text(self.render_config())
        (self.directory / "inetrc").write_text(self.render_inetrc())
        (self.directory / "startup.terms").write_text(self.render_startup_terms())
        self.ready_path.unlink(missing_ok=True)

    def command(self) -> list[str]:
        terms = _erl_str(str(self.directory / "startup.terms"))
        return [
            ERL,
            "-noinput",
            "+K",
            "true",
            "-env",
            "ERL_CRASH_DUMP_BYTES",
            "0",
            "-mnesia",
            "dir",
            _erl_str(str(self.directory / "spool")),
            "-eval",
            _BOOT_ROUTES % {"terms": terms, "ttl": _SRV_TTL_S},
            "-s",
            "ejabberd",
            "-eval",
            _BOOT_USERS % {"terms": terms, "ready": _erl_str(str(self.ready_path))},
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "EJABBERD_"))}
        env.update(
            HOME=str(self.directory),
            ERL_LIBS=EJABBERD_LIBS,
            ERL_INETRC=str(self.directory / "inetrc"),
            ERL_CRASH_DUMP=str(self.directory / "logs" / "erl_crash.dump"),
            EJABBERD_CONFIG_PATH=str(self.config_path),
            EJABBERD_LOG_PATH=str(self.log_path),
            CONTRIB_MODULES_PATH=str(self.directory / "contrib"),
        )
        return env

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_logged(self, pattern: re.Pattern[str], within_s: float = 10.0) -> str:
        """The first log line matching ``pattern``, waiting for it: ejabberd's file log handler
        writes asynchronously, so a line about something that already happened may lag."""
        with trio.move_on_after(within_s):
            while True:
                for line in self.log_text().splitlines():
                    if pattern.search(line):
                        return line
                await trio.sleep(_POLL_INTERVAL_S)
        raise EjabberdError(
            f"ejabberd for {self.domain} did not log {pattern.pattern!r} within {within_s} s"
        )

    # --- running ------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[EjabberdServer]:
        """Write the files, start ejabberd, wait until the accounts exist and both ports accept.

        Bound the start with ``trio.fail_after`` at the call site. On exit ejabberd gets SIGTERM,
        then SIGKILL; if it died early, or the body raised, its log goes to stderr.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write_files()
        with (self.directory / "ejabberd.stdout").open("ab") as output:
            process = await trio.lowlevel.open_process(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=self.environment(),
                cwd=self.directory,
            )
        try:
            try:
                await self._wait_ready(process)
            except BaseException:
                self._show_log(f"ejabberd {self.domain} did not start")
                raise
            try:
                yield self
            except BaseException:
                self._show_log(f"ejabberd {self.domain} (test failed)")
                raise
        finally:
            with trio.CancelScope(shield=True):
                await stop(process)

    async def _wait_ready(self, process: trio.Process) -> None:
        while not self.ready_path.exists():
            if process.poll() is not None:
                raise EjabberdError(
                    f"ejabberd for {self.domain} exited with {process.returncode} before it "
                    f"was ready\n{self._tail()}"
                )
            await trio.sleep(_POLL_INTERVAL_S)
        for port in (self.c2s_port, self.s2s_port):
            while not await accepts(port):
                if process.poll() is not None:
                    raise EjabberdError(
                        f"ejabberd for {self.domain} exited with {process.returncode} before "
                        f"listening on {LOOPBACK}:{port}\n{self._tail()}"
                    )
                await trio.sleep(_POLL_INTERVAL_S)

    def _tail(self) -> str:
        text = self.log_text()
        stdout = self.directory / "ejabberd.stdout"
        if stdout.exists():
            text += "\n--- stdout/stderr ---\n" + stdout.read_text(errors="replace")
        return text[-_LOG_TAIL_CHARS:]

    def _show_log(self, headline: str) -> None:
        print(f"===== {headline}: {self.log_path} =====\n{self._tail()}", file=sys.stderr)


def _erl_str(value: str) -> str:
    """An Erlang string literal (test paths, domains and passwords are plain ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _erl_bin(value: str) -> str:
    return f"<<{_erl_str(value)}>>"
