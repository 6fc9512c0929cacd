"""The Prosody interop harness works: a real client talks to it, and two Prosody instances
federate through the static loopback routes, with SASL EXTERNAL or with dialback as configured
(each proven from the receiving server's log), and certificate mode really refuses a peer whose
certificate does not verify. Also the test CA's certificates say what they should."""

from __future__ import annotations

import re
import ssl
import stat
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509

from tests.e2e.xmpp_client import ReceivedMessage, TrioXmppClient, open_xmpp_client
from tests.federation.pki import (
    PemPair,
    issue,
    issue_expired,
    make_ca,
    read_xmpp_addrs,
    write_pem_pair,
)
from tests.federation.processes import LOOPBACK
from tests.federation.prosody import (
    AuthMode,
    ProsodyError,
    ProsodyServer,
    prosody_available,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

requires_prosody = pytest.mark.skipif(
    not prosody_available(),
    reason="prosody is not installed (Debian's `prosody`, which `bash .ci/system-deps` installs)",
)

START_S = 15.0
STEP_S = 10.0

# What the receiving Prosody 0.12 logs for each s2s authentication method.
SASL_EXTERNAL_ACCEPTED = "Accepting SASL EXTERNAL identity from {peer}"
DIALBACK_VERIFY_ASKED = re.compile(r"asking {peer} if key \S+ belongs to them")


# --- the test CA ----------------------------------------------------------------------------------


def test_issued_certificate_names_the_domain_both_ways_and_verifies(tmp_path: Path) -> None:
    ca = make_ca("villaged test CA")
    server = issue(ca, "a.test", extra_dns=["conference.a.test"])
    cert = x509.load_pem_x509_certificate(server.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "conference.a.test"]
    assert read_xmpp_addrs(server.cert_pem) == ["a.test", "conference.a.test"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    }

    cert_path, key_path = write_pem_pair(tmp_path, "a.test", server)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    ca_path, _ = write_pem_pair(tmp_path, "ca", ca)
    # Python's ssl (what villaged uses) accepts the pair and trusts the chain for the domain.
    context = ssl.create_default_context(cafile=str(ca_path))
    context.load_cert_chain(cert_path, key_path)


def test_expired_certificate_is_in_the_past() -> None:
    expired = x509.load_pem_x509_certificate(issue_expired(make_ca("ca"), "old.test").cert_pem)
    assert expired.not_valid_after_utc < datetime.now(UTC)
    with pytest.raises(ValueError, match="not_after"):
        issue(
            make_ca("ca"),
            "x.test",
            not_before=datetime.now(UTC),
            not_after=datetime(2000, 1, 1, tzinfo=UTC),
        )


def test_config_routes_peers_statically_and_stays_on_loopback(tmp_path: Path) -> None:
    ca = make_ca("ca")
    a = ProsodyServer(tmp_path / "a", "a.test", ca, auth_mode="dialback")
    a.route("b.test", 25269)
    a.route("c.test", 25270, direct_tls=True)
    with pytest.raises(ValueError, match="loopback"):
        a.route("d.test", 5269, host="192.0.2.1")
    config = a.render_config()
    assert '["b.test"] = { "127.0.0.1", 25269, "starttls" };' in config
    assert '["c.test"] = { "127.0.0.1", 25270, "direct-tls" };' in config
    assert f"c2s_ports = {{ {a.c2s_port} }}" in config
    assert f"s2s_ports = {{ {a.s2s_port} }}" in config
    assert f"s2s_direct_tls_ports = {{ {a.s2s_direct_tls_port} }}" in config
    assert "s2s_secure_auth = false" in config
    assert '"dialback"' in config
    assert re.findall(r"interfaces = \{ \"([^\"]+)\" \}", config) == [LOOPBACK] * 4


# --- one Prosody and a client ---------------------------------------------------------------------


@requires_prosody
async def test_client_logs_in_keeps_a_roster_and_messages_itself(tmp_path: Path) -> None:
    ca = make_ca("villaged test CA")
    server = ProsodyServer(tmp_path / "prosody", "prosody.test", ca)
    async with AsyncExitStack() as stack:
        with trio.fail_after(START_S):
            await stack.enter_async_context(server.running())
        async with _client(server, "alice") as alice:
            with trio.fail_after(STEP_S):
                assert await alice.get_roster() == {}
                await alice.set_roster_item("bob@prosody.test", name="Bob", groups=("Friends",))
                roster = await alice.get_roster()
                assert roster["bob@prosody.test"].name == "Bob"
                assert roster["bob@prosody.test"].groups == frozenset({"Friends"})

                await alice.send_presence()
                await alice.send_message("alice@prosody.test", "note to self")
                message = await alice.wait_message(lambda m: m.body is not None)
            assert message.body == "note to self"
            assert message.from_.startswith("alice@prosody.test/")

            # A domain without a static route bounces at once: no DNS, no connection attempt.
            with trio.fail_after(STEP_S):
                await alice.send_message("bob@unrouted.test", "nowhere to go", id_="unrouted-1")
                bounce = await alice.wait_message(lambda m: m.id == "unrouted-1")
            assert bounce.type == "error"
        assert "no static s2s route for unrouted.test" in server.log_text()


@requires_prosody
async def test_a_prosody_that_cannot_load_its_key_fails_to_start_and_is_stopped(
    tmp_path: Path,
) -> None:
    broken = PemPair(issue(make_ca("ca"), "broken.test").cert_pem, b"not a key")
    server = ProsodyServer(tmp_path / "broken", "broken.test", make_ca("ca"), certificate=broken)
    with trio.fail_after(START_S), pytest.raises(ProsodyError, match="Failed to load"):
        async with server.running():
            pytest.fail("Prosody started without its key")
    with pytest.raises(OSError, match="attempts to connect"):  # stopped: its port is closed
        await trio.open_tcp_stream(LOOPBACK, server.c2s_port)


# --- two Prosody instances federating -------------------------------------------------------------


@requires_prosody
@pytest.mark.parametrize("auth_mode", ["certs", "dialback"])
async def test_two_prosodies_federate_over_static_routes(
    tmp_path: Path, auth_mode: AuthMode
) -> None:
    ca = make_ca("villaged test CA")
    certificates: dict[str, PemPair | None] = {"a.test": None, "b.test": None}
    client_ca_file = None
    if auth_mode == "dialback":
        # Certificates the peers cannot verify, so EXTERNAL is impossible and dialback must work.
        # (The clients are told to trust their issuer.)
        untrusted = make_ca("trusted by clients, not by the servers")
        certificates = {d: issue(untrusted, d) for d in certificates}
        client_ca_file, _ = write_pem_pair(tmp_path / "client", "ca", untrusted)
    a, b = (
        ProsodyServer(
            tmp_path / domain,
            domain,
            ca,
            auth_mode=auth_mode,
            certificate=certificates[domain],
            users={user: f"{user}-password"},
        )
        for domain, user in (("a.test", "alice"), ("b.test", "bob"))
    )
    a.route_to(b)
    b.route_to(a)  # dialback's verification connects back; the reply may use it too

    async with AsyncExitStack() as stack:
        with trio.fail_after(START_S):
            await stack.enter_async_context(a.running())
            await stack.enter_async_context(b.running())
        async with (
            _client(b, "bob", client_ca_file) as bob,
            _client(a, "alice", client_ca_file) as alice,
        ):
            with trio.fail_after(STEP_S):
                await bob.send_presence()
                await alice.send_presence()
                await alice.send_message("bob@b.test", f"hello over {auth_mode}")
                message: ReceivedMessage = await bob.wait_message(lambda m: m.body is not None)
            assert message.body == f"hello over {auth_mode}"
            assert message.from_.startswith("alice@a.test/")
            assert message.type == "chat"

        receiving_log = b.log_text()
        assert "Incoming s2s connection a.test->b.test complete" in receiving_log
        external = SASL_EXTERNAL_ACCEPTED.format(peer="a.test") in receiving_log
        dialback = re.search(DIALBACK_VERIFY_ASKED.pattern.format(peer=r"a\.test"), receiving_log)
        if auth_mode == "certs":
            assert external
            assert dialback is None
        else:
            assert dialback is not None
            assert not external


@requires_prosody
async def test_static_route_can_use_direct_tls(tmp_path: Path) -> None:
    ca = make_ca("villaged test CA")
    a = ProsodyServer(tmp_path / "a.test", "a.test", ca)
    b = ProsodyServer(tmp_path / "b.test", "b.test", ca, users={"bob": "bob-password"})
    a.route_to(b, direct_tls=True)
    async with AsyncExitStack() as stack:
        with trio.fail_after(START_S):
            await stack.enter_async_context(a.running())
            await stack.enter_async_context(b.running())
        async with _client(b, "bob") as bob, _client(a, "alice") as alice:
            with trio.fail_after(STEP_S):
                await bob.send_presence()
                await alice.send_message("bob@b.test", "straight into TLS")
                message = await bob.wait_message(lambda m: m.body is not None)
        assert message.body == "straight into TLS"
        route = (
            f"static s2s route for b.test via xmpps-server: {LOOPBACK} port {b.s2s_direct_tls_port}"
        )
        assert route in a.log_text()
        assert "Incoming s2s connection a.test->b.test complete" in b.log_text()
        assert SASL_EXTERNAL_ACCEPTED.format(peer="a.test") in b.log_text()


@requires_prosody
async def test_certificate_mode_refuses_a_peer_it_cannot_verify(tmp_path: Path) -> None:
    ca = make_ca("villaged test CA")
    someone_else = make_ca("someone else")
    impostor = issue(someone_else, "a.test")
    client_ca_file, _ = write_pem_pair(tmp_path / "client", "ca", someone_else)
    a = ProsodyServer(tmp_path / "a.test", "a.test", ca, certificate=impostor)
    b = ProsodyServer(tmp_path / "b.test", "b.test", ca, users={"bob": "bob-password"})
    a.route_to(b)
    b.route_to(a)
    async with AsyncExitStack() as stack:
        with trio.fail_after(START_S):
            await stack.enter_async_context(a.running())
            await stack.enter_async_context(b.running())
        async with _client(a, "alice", client_ca_file) as alice:
            with trio.fail_after(STEP_S):
                await alice.send_presence()
                await alice.send_message("bob@b.test", "should not arrive", id_="refused-1")
                bounce = await alice.wait_message(lambda m: m.id == "refused-1")
        assert bounce.type == "error"
        assert bounce.from_ == "bob@b.test"
        assert "not-authorized (Your server's certificate is not trusted)" in a.log_text()
        assert "Incoming s2s connection a.test->b.test complete" not in b.log_text()
        assert SASL_EXTERNAL_ACCEPTED.format(peer="a.test") not in b.log_text()


# --- helpers --------------------------------------------------------------------------------------


@asynccontextmanager
async def _client(
    server: ProsodyServer, user: str, ca_file: Path | None = None
) -> AsyncIterator[TrioXmppClient]:
    """``user`` logged in to ``server`` over STARTTLS, verifying it against ``ca_file`` (by
    default the test CA)."""
    async with open_xmpp_client(f"{user}@{server.domain}") as client:
        with trio.fail_after(STEP_S):
            await client.connect(
                LOOPBACK,
                server.c2s_port,
                direct_tls=False,
                ca_file=ca_file or server.ca_file,
                jid=server.jid(user),
                password=server.users[user],
            )
        yield client
