"""The host audit behind ``villaged check -c FILE``: is this machine set up the way the config
and the systemd unit intend?

This module owns the list of things audited and what counts as an error (the node would be
unsafe or would not start), a warning (worth a look) or ok. It only reads: file modes and owners
(``os.stat``), the certificate, the keyset and the group database; it never changes a file.
The clock and the user the files must belong to are passed in, so the verdicts are testable.

What is audited:

* private files (keyset, TLS key, audit and backup signing keys, operators file): a regular
  file, mode 0600, owned by the user that runs villaged; a file others can read is an error;
* the data directory and its ``log``, ``vault``, ``admin`` and ``audit`` subdirectories: mode
  0700, same owner (absent is fine: the node makes them on first start);
* the config file: a world-writable one is an error (it holds no secrets, but it names the
  alert command the node runs);
* the certificate: parses and matches the key (``check_config_files``), names
  ``[server] domain``, is valid now and for more than ``EXPIRY_WARNING`` still;
* TLS profiles: ``old`` is a warning;
* listeners: where each binds; HTTP (metrics, health) off loopback without ``allow_public`` is
  an error, with it a warning;
* the admin socket's directory (nobody else may write there; the operators' group must be able
  to reach the socket) and ``[admin] group`` exists;
* ``[monitor] alert_command``: the program exists, is executable and not world-writable.
"""

from __future__ import annotations

import datetime as dt
import grp
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from cryptography import x509

from villaged.admin.audit import SIGNING_KEY_NAME as AUDIT_SIGNING_KEY
from villaged.admin.operators import FILE_NAME as OPERATORS_FILE
from villaged.config import ConfigError, check_config_files
from villaged.ops.backup import SIGNING_KEY as BACKUP_SIGNING_KEY
from villaged.storage.crypto import Keyset
from villaged.storage.errors import StorageError

if TYPE_CHECKING:
    from pathlib import Path

    from villaged.config import Config

__all__ = ["DATA_SUBDIRECTORIES", "EXPIRY_WARNING", "Finding", "Severity", "audit_host"]

Severity = Literal["ok", "warning", "error"]

EXPIRY_WARNING: Final = dt.timedelta(days=30)
DATA_SUBDIRECTORIES: Final = ("log", "vault", "admin", "audit")
# A certificate is small; the bound keeps a path pointing at something huge harmless.
_MAX_CERT_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    """One verdict: ``subject`` is the file or config key concerned, ``message`` one line."""

    severity: Severity
    subject: str
    message: str

    def __str__(self) -> str:
        prefix = "ok" if self.severity == "ok" else f"{self.severity}:"
        return f"{prefix} {self.subject}: {self.message}"


def audit_host(config: Config, *, now: dt.datetime, uid: int | None = None) -> list[Finding]:
    """Every finding about the host ``config`` would run on, in a stable order.

    ``uid`` is the user that must own the private files and data directories (default: the
    effective uid, so run it as the service user: ``runuser -u villaged -- villaged check``).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    owner = os.geteuid() if uid is None else uid
    findings: list[Finding] = []
    findings += _config_file(config.source)
    findings += _tls_material(config, owner)
    findings += _certificate(config, now)
    findings += _private_files(config, owner)
    findings += _data_directories(config, owner)
    findings += _tls_profiles(config)
    findings += _listeners(config)
    findings += _admin(config)
    findings += _alert_command(config)
    findings += _federation(config)
    return findings


# --- files --------------------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _config_file(path: Path) -> list[Finding]:
    status = _stat(path)
    if status is None:  # pragma: no cover - it was just loaded
        return [Finding("error", str(path), "the config file does not exist")]
    mode = stat.S_IMODE(status.st_mode)
    if mode & stat.S_IWOTH:
        # An error: whoever rewrites it chooses, for one, the alert command the node runs.
        return [Finding("error", str(path), f"mode {mode:04o}: anyone may rewrite the config")]
    return [Finding("ok", str(path), f"config file, mode {mode:04o}")]


def _private_file(path: Path, what: str, owner: int, *, required: bool) -> Finding:
    """A key or secret: a regular file, 0600, owned by ``owner``."""
    status = _stat(path)
    if status is None:
        if required:
            return Finding("error", str(path), f"{what} does not exist")
        return Finding("ok", str(path), f"{what} not made yet (made on first use)")
    if not stat.S_ISREG(status.st_mode):
        return Finding("error", str(path), f"{what} is not a regular file")
    mode = stat.S_IMODE(status.st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return Finding(
            "error", str(path), f"{what} has mode {mode:04o}: others can read it; make it 0600"
        )
    if status.st_uid != owner:
        return Finding("error", str(path), f"{what} is owned by uid {status.st_uid}, not {owner}")
    if mode != 0o600:
        return Finding("warning", str(path), f"{what} has mode {mode:04o}; it should be 0600")
    return Finding("ok", str(path), f"{what}, mode 0600, owned by uid {owner}")


def _tls_material(config: Config, owner: int) -> list[Finding]:
    """The TLS key and the keyset as private files, then their contents (key matches the
    certificate, keyset loads) unless a file problem already explains why they would not."""
    findings = [
        _private_file(config.tls.key, "TLS key (tls.key)", owner, required=True),
        _private_file(config.storage.keyset, "keyset (storage.keyset)", owner, required=True),
    ]
    if any(finding.severity == "error" for finding in findings):
        return findings  # check_config_files would stop at the same problem
    try:
        check_config_files(config)
    except ConfigError as exc:
        findings.append(Finding("error", exc.key or str(exc.file), exc.problem))
        return findings
    findings.append(Finding("ok", "tls.key", "is the key of the certificate"))
    try:
        keyset = Keyset.load(config.storage.keyset)
    except StorageError as exc:
        findings.append(Finding("error", "storage.keyset", str(exc)))
    else:
        findings.append(
            Finding(
                "ok",
                "storage.keyset",
                f"loads ({len(keyset.key_ids)} key{'s' if len(keyset.key_ids) != 1 else ''})",
            )
        )
    return findings


def _private_files(config: Config, owner: int) -> list[Finding]:
    keyset_dir = config.storage.keyset.parent
    data = config.storage.dir
    return [
        _private_file(
            data / "audit" / AUDIT_SIGNING_KEY, "audit signing key", owner, required=False
        ),
        _private_file(keyset_dir / BACKUP_SIGNING_KEY, "backup signing key", owner, required=False),
        _private_file(data / "admin" / OPERATORS_FILE, "operators file", owner, required=False),
    ]


def _data_directories(config: Config, owner: int) -> list[Finding]:
    root = config.storage.dir
    findings: list[Finding] = []
    for directory in (root, *(root / name for name in DATA_SUBDIRECTORIES)):
        what = "data directory (storage.dir)" if directory == root else "data directory"
        status = _stat(directory)
        if status is None:
            findings.append(Finding("ok", str(directory), f"{what} not made yet (first start)"))
            if directory == root:
                break
            continue
        mode = stat.S_IMODE(status.st_mode)
        if not stat.S_ISDIR(status.st_mode):
            findings.append(Finding("error", str(directory), f"{what} is not a directory"))
        elif mode & 0o077:
            findings.append(
                Finding("error", str(directory), f"{what} has mode {mode:04o}; it must be 0700")
            )
        elif status.st_uid != owner:
            findings.append(
                Finding(
                    "error", str(directory), f"{what} is owned by uid {status.st_uid}, not {owner}"
                )
            )
        else:
            findings.append(Finding("ok", str(directory), f"{what}, mode {mode:04o}"))
    return findings


# --- the certificate ------------------------------------------------------------------------


def _certificate(config: Config, now: dt.datetime) -> list[Finding]:
    """Names and validity period; whether it parses and matches the key is ``_tls_material``'s."""
    subject = str(config.tls.cert)
    try:
        with open(config.tls.cert, "rb") as stream:
            pem = stream.read(_MAX_CERT_BYTES)
        certificate = x509.load_pem_x509_certificates(pem)[0]
    except (OSError, ValueError):
        return []  # reported by check_config_files, naming tls.cert
    return [_validity(subject, certificate, now), _names(subject, certificate, config)]


def _validity(subject: str, certificate: x509.Certificate, now: dt.datetime) -> Finding:
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now < start:
        return Finding(
            "error", subject, f"certificate is not valid before {start:%Y-%m-%d %H:%M} UTC"
        )
    if end <= now:
        return Finding("error", subject, f"certificate expired on {end:%Y-%m-%d %H:%M} UTC")
    left = end - now
    if left < EXPIRY_WARNING:
        return Finding(
            "warning",
            subject,
            f"certificate expires on {end:%Y-%m-%d %H:%M} UTC, in {left.days} days",
        )
    return Finding("ok", subject, f"certificate valid until {end:%Y-%m-%d} ({left.days} days)")


def _names(subject: str, certificate: x509.Certificate, config: Config) -> Finding:
    domain = config.server.domain
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return Finding("error", subject, "certificate has no subjectAltName; clients reject it")
    names = extension.value.get_values_for_type(x509.DNSName)
    if any(_name_matches(name, domain) for name in names):
        return Finding("ok", subject, f"certificate names {domain} (server.domain)")
    listed = ", ".join(names) or "no DNS names"
    return Finding(
        "error", subject, f"certificate does not name {domain} (server.domain); it names {listed}"
    )


def _name_matches(pattern: str, domain: str) -> bool:
    """RFC 6125: an exact name, or ``*.`` standing for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        _, dot, parent = domain.partition(".")
        return bool(dot) and parent == pattern[2:]
    return pattern == domain


# --- settings --------------------------------------------------------------------------------


def _tls_profiles(config: Config) -> list[Finding]:
    findings = [
        Finding("warning", "tls.profile", "old allows TLS 1.0 and 1.1 and weak ciphers")
        if config.tls.profile == "old"
        else Finding("ok", "tls.profile", config.tls.profile)
    ]
    for name, listener in config.listeners.by_name().items():
        if listener.enabled and listener.tls_profile == "old":
            findings.append(
                Finding(
                    "warning",
                    f"listeners.{name}.tls_profile",
                    "old allows TLS 1.0 and 1.1 and weak ciphers",
                )
            )
    return findings


def _listeners(config: Config) -> list[Finding]:
    findings: list[Finding] = []
    for name, listener in config.listeners.by_name().items():
        key = f"listeners.{name}.bind"
        if not listener.enabled:
            findings.append(Finding("ok", key, "disabled"))
            continue
        where = ", ".join(map(str, listener.bind))
        public = [endpoint for endpoint in listener.bind if not endpoint.is_loopback]
        if name != "http" or not public:
            scope = "reachable from the network" if public else "loopback only"
            findings.append(Finding("ok", key, f"{where} ({scope})"))
        elif config.listeners.http.allow_public:
            findings.append(
                Finding("warning", key, f"{where}: metrics and health reachable from the network")
            )
        else:
            findings.append(
                Finding(
                    "error",
                    key,
                    f"{where}: metrics and health must stay on loopback unless "
                    "listeners.http.allow_public = true",
                )
            )
    return findings


def _admin(config: Config) -> list[Finding]:
    group = config.admin.group
    findings: list[Finding] = []
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            findings.append(Finding("error", "admin.group", f"group {group} does not exist"))
        else:
            findings.append(Finding("ok", "admin.group", f"group {group} exists"))
    directory = config.admin.socket.parent
    status = _stat(directory)
    if status is None:
        findings.append(
            Finding(
                "warning",
                str(directory),
                "admin socket directory does not exist (systemd makes /run/villaged at start)",
            )
        )
        return findings
    mode = stat.S_IMODE(status.st_mode)
    if not stat.S_ISDIR(status.st_mode):
        findings.append(Finding("error", str(directory), "admin socket directory is not one"))
    elif mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        findings.append(
            Finding(
                "error",
                str(directory),
                f"admin socket directory has mode {mode:04o}: anyone may replace the socket",
            )
        )
    elif group and not mode & (stat.S_IXGRP | stat.S_IXOTH):
        findings.append(
            Finding(
                "warning",
                str(directory),
                f"admin socket directory has mode {mode:04o}: group {group} cannot reach the "
                "socket (0711 lets it)",
            )
        )
    else:
        findings.append(Finding("ok", str(directory), f"admin socket directory, mode {mode:04o}"))
    return findings


def _alert_command(config: Config) -> list[Finding]:
    if not config.monitor.alert_command:
        return []
    program = config.monitor.alert_command[0]
    key = "monitor.alert_command"
    try:
        status = os.stat(program)
    except OSError as exc:
        return [Finding("error", key, f"{program}: {exc.strerror or exc}")]
    mode = stat.S_IMODE(status.st_mode)
    if not stat.S_ISREG(status.st_mode):
        return [Finding("error", key, f"{program} is not a regular file")]
    if not mode & 0o111:
        return [Finding("error", key, f"{program} is not executable (mode {mode:04o})")]
    if mode & stat.S_IWOTH:
        return [Finding("error", key, f"{program} has mode {mode:04o}: anyone may rewrite it")]
    return [Finding("ok", key, f"{program}, mode {mode:04o}")]


def _federation(config: Config) -> list[Finding]:
    """With federation on: the s2s listeners, the trust store for peers' certificates (a CA
    bundle that loads), and the policy that decides peers without a verifiable certificate."""
    federation = config.federation
    if not federation.enabled:
        return [Finding("ok", "federation.enabled", "off (other domains are refused)")]
    findings: list[Finding] = []
    if not (config.listeners.s2s.enabled or config.listeners.s2s_tls.enabled):
        findings.append(
            Finding(
                "warning",
                "listeners.s2s",
                "federation is on but no s2s listener is bound: other servers cannot reach us",
            )
        )
    if federation.ca_file is None:
        findings.append(Finding("ok", "federation.ca_file", "the system trust store"))
    else:
        try:
            bundle = federation.ca_file.read_bytes()
            count = len(x509.load_pem_x509_certificates(bundle))
        except OSError as exc:
            findings.append(
                Finding("error", "federation.ca_file", f"{federation.ca_file}: {exc.strerror}")
            )
        except ValueError:
            findings.append(
                Finding(
                    "error", "federation.ca_file", f"{federation.ca_file}: not PEM certificates"
                )
            )
        else:
            findings.append(
                Finding("ok", "federation.ca_file", f"{federation.ca_file}: {count} certificates")
            )
    if federation.dialback:
        findings.append(
            Finding(
                "ok",
                "federation.dialback",
                "peers without a verifiable certificate may prove their domain by dialback (DNS)",
            )
        )
    for peer in federation.peers:
        if not peer.require_tls:
            findings.append(
                Finding(
                    "warning",
                    f"federation.peers[{peer.domain}]",
                    "may be reached without TLS (closed test networks only)",
                )
            )
    return findings
