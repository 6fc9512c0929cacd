"""An external TLS scanner (sslyze) checks a live direct-TLS listener against Mozilla's profiles.

sslyze lives in ``.venv-sslyze/`` (made by ``tests/net/sslyze_env.sh``) because it pins its own
``cryptography``. The listener is the real thing: trio, ``trio.SSLStream`` over TCP on
127.0.0.1, contexts from ``TlsContextHolder`` as the c2s direct-TLS listener (XEP-0368) uses
them. The STARTTLS variant (``--starttls=xmpp``) needs the XMPP stream and comes with it.

The certificate is issued by a throwaway CA that sslyze is told to trust: Mozilla's checks
include certificate path validation, which a self-signed leaf cannot pass with sslyze's strict
verifier (it also requires the Authority Key Identifier extension), and Mozilla's limits on
certificate type, curve, signature and lifespan (90 days for ``modern``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from villaged.net.tls import ALPN_XMPP_CLIENT, ServerTlsSpec, TlsContextHolder

if TYPE_CHECKING:
    from villaged.config import TlsProfile
    from villaged.net.tls import TlsContextSource

SSLYZE = Path(__file__).resolve().parents[2] / ".venv-sslyze" / "bin" / "sslyze"
SCAN_TIMEOUT_S = 180
CONNECTION_TIMEOUT_S = 10

# `make test` builds sslyze's environment, so under CI a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not SSLYZE.exists() and not os.environ.get("CI"),
    reason="sslyze's environment is absent: run `bash tests/net/sslyze_env.sh`",
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key(kind: str) -> PrivateKey:
    if kind == "rsa":  # Mozilla's "old" profile asks for RSA 2048 certificates
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def write_ca_and_leaf(directory: Path, kind: str) -> tuple[Path, Path, Path]:
    """A CA and a 90-day ``localhost`` server certificate it issued: (ca, cert, key) files."""
    now = dt.datetime.now(dt.UTC)
    ca_key, leaf_key = _new_key(kind), _new_key(kind)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "villaged test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=89))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
    )
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


async def _serve_direct_tls(stream: trio.SocketStream, *, source: TlsContextSource) -> None:
    """Handshake, then read until the scanner goes away; every scanner probe ends here."""
    tls = trio.SSLStream(stream, source.context, server_side=True)
    try:
        with trio.fail_after(CONNECTION_TIMEOUT_S):
            await tls.do_handshake()
            while await tls.receive_some():
                pass
    except (trio.BrokenResourceError, trio.TooSlowError):
        pass  # refused probes are the point of a scan
    finally:
        await trio.aclose_forcefully(tls)


@pytest.mark.parametrize(
    ("profile", "key_kind"),
    [("intermediate", "ecdsa"), ("modern", "ecdsa"), ("old", "rsa")],
)
async def test_sslyze_finds_listener_compliant(
    tmp_path: Path, profile: TlsProfile, key_kind: str
) -> None:
    ca_file, cert_file, key_file = write_ca_and_leaf(tmp_path, key_kind)
    spec = ServerTlsSpec(profile, (ALPN_XMPP_CLIENT,))
    source = TlsContextHolder(cert_file, key_file, [spec]).source(spec)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_direct_tls(stream, source=source)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        # "localhost:PORT{127.0.0.1}": connect to 127.0.0.1, validate the name localhost.
        command = [
            str(SSLYZE),
            f"--mozilla_config={profile}",
            f"--certinfo_ca_file={ca_file}",
            f"localhost:{port}{{127.0.0.1}}",
        ]
        with trio.fail_after(SCAN_TIMEOUT_S):
            scan = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
        nursery.cancel_scope.cancel()
    report = scan.stdout.decode(errors="replace")
    verdict = report[report.find("COMPLIANCE AGAINST") :]
    assert scan.returncode == 0, verdict or report + scan.stderr.decode(errors="replace")
    assert f'Mozilla\'s "{profile}" configuration' in verdict, report
    assert f"localhost:{port}: OK - Compliant." in verdict, report
