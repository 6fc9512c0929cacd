"""villaged federating with a real ejabberd (Debian's 23.01) on loopback: a villaged user and an
ejabberd user complete a subscription handshake, see each other's presence and chat both ways —
started from either side, once with certificates (SASL EXTERNAL) and once with dialback."""

from __future__ import annotations

import logging
import re
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Literal

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.xmpp_client import TrioXmppClient, open_xmpp_client
from tests.federation.ejabberd import AuthMode, EjabberdServer, ejabberd_available
from tests.federation.interop import Inbox, inbound_methods, subscribe_see_and_chat
from tests.federation.nodes import Route, start_federated_node, write_federated_config
from tests.federation.pki import PemPair, issue, make_ca, write_pem_pair
from tests.federation.processes import LOOPBACK
from tests.federation.test_villaged_federation import client
from tests.ports import free_port_base

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not ejabberd_available(),
    reason="ejabberd is not installed (Debian's `ejabberd`, which `bash .ci/system-deps` installs)",
)

STEP_S = 20.0
VERA, EJ = "vera@v.test", "ed@ejabberd.test"


def without_xmpp_addr(ca: PemPair, pair: PemPair) -> PemPair:
    """``pair`` re-signed by ``ca`` with dNSNames only in its subjectAltName.

    ejabberd 23.01 (its p1_xmpp 1.6.1, xmpp_stream_pkix:get_domains_from_san/1) crashes the
    s2s stream when a verified peer certificate carries an id-on-xmppAddr otherName: the
    otherName branch of a ``lists:flatmap`` returns a binary instead of a list (``badarg`` in
    ``++``), so SASL EXTERNAL from villaged would never succeed. A certificate naming the domain
    as a dNSName only (enough for RFC 6125 and XEP-0178) sidesteps it.
    """
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in value.get_values_for_type(x509.DNSName)]
            )
        builder = builder.add_extension(value, critical=extension.critical)
    signed = builder.sign(ca_key, hashes.SHA256())
    return PemPair(signed.public_bytes(serialization.Encoding.PEM), pair.key_pem)


def accepted(direction: str, mechanism: str) -> re.Pattern[str]:
    """ejabberd's info line for an authenticated s2s stream between v.test and ejabberd.test."""
    local, remote = "ejabberd\\.test", "v\\.test"
    first, second = (remote, local) if direction == "inbound" else (local, remote)
    return re.compile(
        rf"Accepted {direction} s2s {mechanism} authentication {first} -> {second}", re.I
    )


@asynccontextmanager
async def ejabberd_user(server: EjabberdServer, ca_file: Path) -> AsyncIterator[TrioXmppClient]:
    async with open_xmpp_client(EJ) as ed:
        with trio.fail_after(STEP_S):
            await ed.connect(
                LOOPBACK,
                server.c2s_port,
                direct_tls=False,
                ca_file=ca_file,
                jid=server.jid("ed"),
                password=server.users["ed"],
            )
        yield ed


@pytest.mark.parametrize("auth_mode", ["certs", "dialback"])
@pytest.mark.parametrize("initiator", ["villaged", "ejabberd"])
async def test_subscription_presence_and_chat_with_ejabberd(
    tmp_path: Path,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    auth_mode: AuthMode,
    initiator: Literal["villaged", "ejabberd"],
) -> None:
    caplog.set_level(logging.INFO, "villaged.federation")
    ca = make_ca("federation test CA")
    client_ca = ca
    if auth_mode == "dialback":
        # Certificates neither server can verify: EXTERNAL is impossible, dialback must carry it.
        client_ca = make_ca("trusted by the clients only")
    # The certificate ejabberd checks names v.test as a dNSName only (see without_xmpp_addr).
    certificates = {
        "v.test": without_xmpp_addr(client_ca, issue(client_ca, "v.test")),
        "ejabberd.test": issue(client_ca, "ejabberd.test"),
    }
    client_ca_file, _ = write_pem_pair(tmp_path / "clients", "ca", client_ca)
    ejabberd = EjabberdServer(
        tmp_path / "ejabberd",
        "ejabberd.test",
        ca,
        auth_mode=auth_mode,
        certificate=certificates["ejabberd.test"],
        users={"ed": "ed-password"},
    )
    base = free_port_base()
    config = write_federated_config(
        tmp_path / "villaged",
        "v.test",
        ca,
        certificate=certificates["v.test"],
        routes={"ejabberd.test": Route(ejabberd.s2s_port)},
        federation_toml="" if auth_mode == "dialback" else "dialback = false\n",
        port_base=base,
    )
    ejabberd.route("v.test", base + 4)
    async with AsyncExitStack() as stack:
        with trio.fail_after(STEP_S):
            await stack.enter_async_context(ejabberd.running())
        node = await start_federated_node(nursery, config, users=("vera",))
        vera = await client(node, "vera", available=False, ca_file=client_ca_file)
        inbox = Inbox(vera)
        ed = await stack.enter_async_context(ejabberd_user(ejabberd, client_ca_file))
        with trio.fail_after(STEP_S):
            await ed.send_presence()

        await subscribe_see_and_chat(
            vera, inbox, VERA, ed, EJ, villaged_starts=initiator == "villaged"
        )

        # Each side authenticated the other the way the mode says: ejabberd logs its streams
        # in both directions, villaged its inbound ones.
        methods = inbound_methods(caplog)
        mechanism = "EXTERNAL" if auth_mode == "certs" else "dialback"
        await ejabberd.wait_logged(accepted("inbound", mechanism))
        await ejabberd.wait_logged(accepted("outbound", mechanism))
        assert methods == {"sasl-external" if auth_mode == "certs" else "dialback"}
        await vera.aclose()
    nursery.cancel_scope.cancel()
