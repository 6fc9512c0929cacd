"""Files that must never be seen half-written or by other users: atomic writes, self-signed certs.

This module owns two things other parts reuse:

* ``write_file_atomic`` / ``write_private_file``: a file appears complete, with its final mode,
  or not at all (temporary file in the same directory, fsync, rename, fsync of the directory).
  A private file is created 0600 from its first byte, never loosened then tightened.
* ``make_self_signed``: a development certificate and key for a domain.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["CERT_VALIDITY", "make_self_signed", "write_file_atomic", "write_private_file"]

CERT_VALIDITY = dt.timedelta(days=365)
# Backdating tolerates a client whose clock runs a little behind the machine that made the cert.
_CLOCK_SKEW = dt.timedelta(hours=1)


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically; the file has exactly ``mode`` (umask ignored).

    The temporary file is created with ``mode`` already (so a 0600 file is never readable by
    others, even for an instant) and only then set to exactly ``mode`` in case the umask
    removed bits. The parent directory must exist.
    """
    directory = path.parent
    temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temporary, flags, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def write_private_file(path: Path, data: bytes) -> None:
    """``write_file_atomic`` with mode 0600: keys, keysets, secrets."""
    write_file_atomic(path, data, 0o600)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_self_signed(domain: str, now: dt.datetime) -> tuple[bytes, bytes]:
    """A self-signed server certificate for ``domain`` and its key, both PEM: ``(cert, key)``.

    ECDSA P-256 with SHA-256, valid for a year from ``now`` (which must be timezone-aware).
    Names: the domain, ``*.domain`` (unless it is ``localhost``), ``localhost``, 127.0.0.1 and
    ::1, so that the same certificate serves a dev server however a client reaches it. It is
    an end-entity certificate for both TLS server and client use (s2s and cluster links
    authenticate in both directions).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, domain),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "villaged development"),
        ]
    )
    dns_names = [domain] if domain == "localhost" else [domain, f"*.{domain}", "localhost"]
    alt_names: list[x509.GeneralName] = [x509.DNSName(dns_name) for dns_name in dns_names]
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Self-signed, so the authority is this key too; strict path checkers want the AKI.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem
