"""The cluster's trust: its private CA, each node's certificate, and the TLS contexts of links.

This module owns what "this peer is node X of our cluster" means: a certificate chaining to the
cluster CA -- the *only* trust anchor of a cluster link, never the system store -- that names the
node in a URI subject alternative name ``urn:villaged:node:<id>`` (:func:`node_uri`). The node's
address is in the certificate too (an IP or DNS SAN) for tools that look, but links check the
URI, since nodes address each other by id.

Keys are EC P-256, certificates SHA-256; the CA may sign node certificates only (path length 0).
Private keys are written 0600 from their first byte (:func:`villaged.ops.tlsfiles
.write_private_file`). The contexts are TLS 1.3 only (both ends are villaged), require a
certificate in both directions, and leave host name checking off because the identity checked
is the node id (:func:`peer_node_id`), compared by the links with the node they meant to reach.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from villaged.ops.tlsfiles import write_file_atomic, write_private_file

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

__all__ = [
    "NODE_URI_PREFIX",
    "ClusterCa",
    "NodeCredentials",
    "client_context",
    "create_ca",
    "issue_node_certificate",
    "load_ca",
    "node_uri",
    "peer_node_id",
    "server_context",
]

NODE_URI_PREFIX: Final = "urn:villaged:node:"
CA_VALIDITY: Final = dt.timedelta(days=3650)
NODE_VALIDITY: Final = dt.timedelta(days=825)
_CLOCK_SKEW: Final = dt.timedelta(hours=1)


def node_uri(node_id: str) -> str:
    return NODE_URI_PREFIX + node_id


@dataclass(frozen=True, slots=True)
class ClusterCa:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_file_atomic(
            cert_path, self.certificate.public_bytes(serialization.Encoding.PEM), 0o644
        )
        write_private_file(key_path, _key_pem(self.key))


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    node_id: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_file_atomic(
            cert_path, self.certificate.public_bytes(serialization.Encoding.PEM), 0o644
        )
        write_private_file(key_path, _key_pem(self.key))


def create_ca(cluster_id: str, now: dt.datetime) -> ClusterCa:
    """A new cluster CA (``now`` must be timezone-aware)."""
    _check_aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"villaged cluster CA {cluster_id}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "villaged"),
        ]
    )
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return ClusterCa(certificate, key)


def load_ca(cert_path: Path, key_path: Path) -> ClusterCa:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: the cluster CA key must be an EC key")
    return ClusterCa(certificate, key)


def issue_node_certificate(
    ca: ClusterCa, node_id: str, addresses: Iterable[str], now: dt.datetime
) -> NodeCredentials:
    """A certificate for ``node_id``, valid as TLS server and client, naming its addresses
    (IP literals become IP SANs, anything else a DNS SAN)."""
    _check_aware(now)
    if not node_id or any(c.isspace() or c in ",/:" for c in node_id):
        raise ValueError(f"bad node id {node_id!r}")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_uri(node_id))]
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    public_key = key.public_key()
    ca_public = ca.key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"villaged node {node_id}")])
        )
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + NODE_VALIDITY, ca.certificate.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return NodeCredentials(node_id, certificate, key)


def server_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """For accepting peers: our certificate, and a client certificate from the CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, ca_file, cert_file, key_file)
    return context


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """For connecting to peers: the server's certificate must chain to the CA; the node id in it
    is checked by the caller (:func:`peer_node_id`), not the host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    _configure(context, ca_file, cert_file, key_file)
    return context


def peer_node_id(peer_certificate: dict[str, Any] | None) -> str | None:
    """The node id in a verified peer certificate (``SSLObject.getpeercert()``), if exactly one
    node URI is there."""
    if not peer_certificate:
        return None
    uris = [
        value
        for kind, value in peer_certificate.get("subjectAltName", ())
        if kind == "URI" and isinstance(value, str) and value.startswith(NODE_URI_PREFIX)
    ]
    if len(uris) != 1:
        return None
    return uris[0][len(NODE_URI_PREFIX) :] or None


def _configure(context: ssl.SSLContext, ca_file: Path, cert_file: Path, key_file: Path) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    if context.protocol is ssl.PROTOCOL_TLS_SERVER:
        context.num_tickets = 0


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_aware(now: dt.datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
