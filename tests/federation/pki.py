"""A throwaway certificate authority for federation tests.

Issues XMPP server certificates as RFC 6120 §13.7.1.4 describes them: the domain as a
subjectAltName dNSName and as an id-on-xmppAddr otherName (UTF8String), with both serverAuth and
clientAuth in the extended key usage, because an s2s certificate is presented in both directions
(as the TLS server when a peer connects to us, as the TLS client for SASL EXTERNAL, XEP-0178).
Keys are ECDSA P-256: quick to make, and accepted by Prosody's lua-sec and by Python's ssl.
Everything is PEM bytes, so a test can hand the same pair to Prosody (files) and to villaged.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

__all__ = [
    "ID_ON_XMPPADDR",
    "PemPair",
    "issue",
    "issue_expired",
    "make_ca",
    "read_xmpp_addrs",
    "write_pem_pair",
]

#: id-on-xmppAddr (RFC 6120 §13.7.1.4): the otherName type carrying a JID as a UTF8String.
ID_ON_XMPPADDR: Final = ObjectIdentifier("1.3.6.1.5.5.7.8.5")

_CA_LIFETIME: Final = timedelta(days=2)
_LEAF_LIFETIME: Final = timedelta(days=1)
# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
_BACKDATE: Final = timedelta(minutes=5)
_UTF8_STRING_TAG: Final = 0x0C


class PemPair(NamedTuple):
    """A certificate and its private key (PKCS#8, unencrypted), both PEM."""

    cert_pem: bytes
    key_pem: bytes


def make_ca(common_name: str, *, now: datetime | None = None) -> PemPair:
    """A self-signed CA certificate that may sign server certificates (but no further CAs)."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: PemPair,
    domain: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_dns: Iterable[str] = (),
) -> PemPair:
    """A server certificate for ``domain`` signed by ``ca``.

    The domain (and each of ``extra_dns``) appears as a dNSName and as an id-on-xmppAddr. The
    validity defaults to a day from a few minutes ago; pass both bounds to test expiry.
    """
    now = datetime.now(UTC)
    not_before = not_before or now - _BACKDATE
    not_after = not_after or now + _LEAF_LIFETIME
    if not_after <= not_before:
        raise ValueError(f"certificate for {domain}: not_after must be later than not_before")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an EC key made by make_ca()")
    domains = [domain, *extra_dns]
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in domains]
    names += [x509.OtherName(ID_ON_XMPPADDR, _der_utf8_string(d)) for d in domains]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
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
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_expired(ca: PemPair, domain: str) -> PemPair:
    """A certificate for ``domain`` that was valid for a day and expired an hour ago."""
    now = datetime.now(UTC)
    return issue(ca, domain, not_before=now - timedelta(days=1), not_after=now - timedelta(hours=1))


def write_pem_pair(directory: Path, name: str, pair: PemPair) -> tuple[Path, Path]:
    """Write ``NAME.crt`` (0644) and ``NAME.key`` (0600) into ``directory``; return both paths.

    The key file is created with mode 0600 from the start, never readable by others in between.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(pair.cert_pem)
    cert_path.chmod(0o644)
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(pair.key_pem)
    return cert_path, key_path


def read_xmpp_addrs(cert_pem: bytes) -> list[str]:
    """The id-on-xmppAddr values of a certificate (to check what `issue` wrote)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [
        _parse_der_utf8_string(name.value)
        for name in san.get_values_for_type(x509.OtherName)
        if name.type_id == ID_ON_XMPPADDR
    ]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der_utf8_string(text: str) -> bytes:
    """DER of an ASN.1 UTF8String (cryptography wants otherName values already encoded)."""
    body = text.encode("utf-8")
    return bytes([_UTF8_STRING_TAG]) + _der_length(len(body)) + body


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _parse_der_utf8_string(der: bytes) -> str:
    if len(der) < 2 or der[0] != _UTF8_STRING_TAG:
        raise ValueError("id-on-xmppAddr value is not a UTF8String")
    if der[1] < 0x80:
        start, length = 2, der[1]
    else:
        size = der[1] & 0x7F
        start, length = 2 + size, int.from_bytes(der[2 : 2 + size], "big")
    if start + length != len(der):
        raise ValueError("id-on-xmppAddr value has a bad length")
    return der[start:].decode("utf-8")
