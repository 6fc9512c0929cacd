"""s2s TLS: real handshakes between OpenSSLStreams, and against Python's ssl, with a test CA.

Most pairs run over ``trio.testing.memory_stream_pair``; one runs over loopback TCP. The point
of the layer is checked from the side that verifies: a certificate that fails verification
(unknown CA, expired, wrong purpose) lets the handshake complete and shows up as
``chain_valid=False`` with the reason recorded, not as a failed connection.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from tests.federation.pki import (
    ID_ON_XMPPADDR,
    PemPair,
    issue,
    issue_expired,
    make_ca,
    write_pem_pair,
)
from villaged.net.s2s_tls import (
    OpenSSLStream,
    PeerCertificate,
    S2STlsConfigError,
    certificate_domains,
    make_s2s_context,
)
from villaged.net.tls import TlsConfigError, make_server_context

if TYPE_CHECKING:
    from pathlib import Path

MiB = 1024 * 1024
# Real handshakes on memory streams take milliseconds; this only stops a broken test hanging.
HANDSHAKE_LIMIT = 10

CertPaths = tuple["Path", "Path"]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA everyone trusts
    rogue_ca: Path  # a CA nobody trusts
    a: CertPaths  # a.test from the CA: our server
    b: CertPaths  # b.test from the CA: a peer
    b_rogue: CertPaths  # b.test from the rogue CA
    b_expired: CertPaths
    b_server_auth_only: CertPaths  # b.test without clientAuth in its extended key usage


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("s2s-pki")
    ca = make_ca("Village Test CA")
    rogue = make_ca("Rogue CA")

    def write(name: str, pair: PemPair) -> CertPaths:
        return write_pem_pair(directory, name, pair)

    return Pki(
        ca=write("ca", ca)[0],
        rogue_ca=write("rogue-ca", rogue)[0],
        a=write("a", issue(ca, "a.test")),
        b=write("b", issue(ca, "b.test")),
        b_rogue=write("b-rogue", issue(rogue, "b.test")),
        b_expired=write("b-expired", issue_expired(ca, "b.test")),
        b_server_auth_only=write("b-server-only", _server_auth_only(ca, "b.test")),
    )


def server_context(pki: Pki, pair: CertPaths | None = None) -> SSL.Context:
    return make_s2s_context(*(pair or pki.a), ca_file=pki.ca, server_side=True)


def client_context(pki: Pki, pair: CertPaths | None = None) -> SSL.Context:
    return make_s2s_context(*(pair or pki.b), ca_file=pki.ca, server_side=False)


async def connect(
    client_context: SSL.Context, server_context: SSL.Context
) -> tuple[OpenSSLStream, OpenSSLStream]:
    """An OpenSSLStream client and server with the handshake done, over memory streams."""
    left, right = trio.testing.memory_stream_pair()
    client = OpenSSLStream(left, client_context, server_side=False, server_hostname="a.test")
    server = OpenSSLStream(right, server_context, server_side=True)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    return client, server


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await stream.receive_some()
        assert chunk, f"end of stream after {len(received)} of {size} bytes"
        received += chunk
    return bytes(received)


async def exchange(one: trio.abc.Stream, other: trio.abc.Stream, size: int = 1000) -> None:
    """Send ``size`` bytes each way at the same time and check both arrive intact."""
    outbound = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    inbound = outbound[::-1]
    results: dict[str, bytes] = {}

    async def receive(name: str, stream: trio.abc.Stream) -> None:
        results[name] = await receive_exactly(stream, size)

    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, "at other", other)
            nursery.start_soon(receive, "at one", one)
            nursery.start_soon(one.send_all, outbound)
            nursery.start_soon(other.send_all, inbound)
    assert results == {"at other": outbound, "at one": inbound}


# --- handshakes between OpenSSLStreams ------------------------------------------------------


async def test_trusted_peers_verify_each_other_and_exchange_data(pki: Pki) -> None:
    client, server = await connect(client_context(pki), server_context(pki))

    assert client.peer_certificate() == PeerCertificate(True, frozenset({"a.test"}))
    assert server.peer_certificate() == PeerCertificate(True, frozenset({"b.test"}))
    client_view, server_view = client.peer_certificate(), server.peer_certificate()
    assert client_view is not None
    assert client_view.covers("a.test")
    assert server_view is not None
    assert server_view.covers("b.test")
    assert client.verify_errors == server.verify_errors == []
    assert client.tls_version == server.tls_version == "TLSv1.3"
    assert client.cipher == server.cipher
    assert client.cipher in {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}
    # Leaf first on both sides (OpenSSL's own chain leaves it out on the server side). Each
    # side sends its CA too: OpenSSL completes a lone leaf from the trust store it was given.
    ca = "CN=Village Test CA"
    assert [c.subject.rfc4514_string() for c in server.peer_chain()] == ["CN=b.test", ca]
    assert [c.subject.rfc4514_string() for c in client.peer_chain()] == ["CN=a.test", ca]

    await exchange(client, server, 1000)
    await exchange(client, server, MiB)  # more than one chunk, records and transport reads

    await client.aclose()
    with trio.fail_after(HANDSHAKE_LIMIT):
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""  # and stays at end of stream
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"late")
    await client.aclose()  # twice is fine


async def test_an_untrusted_client_certificate_does_not_stop_the_handshake(pki: Pki) -> None:
    client, server = await connect(client_context(pki, pki.b_rogue), server_context(pki))

    seen = server.peer_certificate()
    assert seen == PeerCertificate(False, frozenset({"b.test"}))
    assert seen is not None
    assert not seen.covers("b.test")
    assert any("ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY" in e for e in server.verify_errors)
    assert all(e.startswith("depth 0: ") for e in server.verify_errors)
    assert client.peer_certificate() == PeerCertificate(True, frozenset({"a.test"}))
    await exchange(client, server)  # dialback would run over this very stream


async def test_an_expired_client_certificate_is_not_valid(pki: Pki) -> None:
    _, server = await connect(client_context(pki, pki.b_expired), server_context(pki))

    assert server.peer_certificate() == PeerCertificate(False, frozenset({"b.test"}))
    assert any("ERR_CERT_HAS_EXPIRED" in e for e in server.verify_errors)


async def test_a_server_certificate_without_client_auth_usage_proves_the_peer(pki: Pki) -> None:
    # Certificates from public CAs no longer carry clientAuth; a server presenting its
    # serverAuth-only certificate as a client is still that server (Prosody agrees).
    _, server = await connect(client_context(pki, pki.b_server_auth_only), server_context(pki))

    assert server.peer_certificate() == PeerCertificate(True, frozenset({"b.test"}))
    assert server.verify_errors == []


async def test_a_valid_certificate_for_another_name_does_not_cover_this_one(pki: Pki) -> None:
    _, server = await connect(client_context(pki), server_context(pki))

    seen = server.peer_certificate()
    assert seen is not None
    assert seen.chain_valid
    assert not seen.covers("other.test")


async def test_an_untrusted_server_certificate_does_not_stop_an_outbound_handshake(
    pki: Pki,
) -> None:
    client, server = await connect(client_context(pki), server_context(pki, pki.b_rogue))

    assert client.peer_certificate() == PeerCertificate(False, frozenset({"b.test"}))
    assert client.verify_errors
    assert server.peer_certificate() == PeerCertificate(True, frozenset({"b.test"}))
    await exchange(client, server)


async def test_the_system_trust_store_does_not_trust_the_test_ca(pki: Pki) -> None:
    no_ca_file = make_s2s_context(*pki.b, ca_file=None, server_side=False)
    client, _ = await connect(no_ca_file, server_context(pki))

    assert client.peer_certificate() == PeerCertificate(False, frozenset({"a.test"}))


async def test_a_modern_server_and_an_intermediate_client_agree_on_tls_1_3(pki: Pki) -> None:
    modern = make_s2s_context(*pki.a, ca_file=pki.ca, server_side=True, profile="modern")
    client, server = await connect(client_context(pki), modern)

    assert server.tls_version == "TLSv1.3"
    await exchange(client, server)


async def test_tls_1_2_works_too(pki: Pki) -> None:
    server = server_context(pki)
    server.set_max_proto_version(0x0303)  # TLS 1.2: no tickets, other message flow
    client, server_stream = await connect(client_context(pki), server)

    assert server_stream.tls_version == "TLSv1.2"
    assert server_stream.peer_certificate() == PeerCertificate(True, frozenset({"b.test"}))
    await exchange(client, server_stream, MiB)


# --- interoperability with Python's ssl -----------------------------------------------------


async def test_a_stdlib_client_with_a_certificate_against_an_openssl_server(pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(*pki.b)
    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(left, context, server_hostname="a.test")
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)

    assert server.peer_certificate() == PeerCertificate(True, frozenset({"b.test"}))
    await exchange(client, server, MiB)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)  # waits for nothing, but reads our close_notify
            assert await server.receive_some() == b""
            await server.aclose()


async def test_a_stdlib_client_without_a_certificate_is_accepted(pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(left, context, server_hostname="a.test")
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)

    assert server.peer_certificate() is None
    assert server.peer_chain() == []
    assert server.verify_errors == []
    await exchange(client, server)


MemoryStream = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]


async def stdlib_server_pair(
    pki: Pki, *, trusted_ca: Path
) -> tuple[OpenSSLStream, trio.SSLStream[MemoryStream], list[str | None]]:
    """An OpenSSLStream client (b.test) and a villaged c2s-style stdlib server (a.test)."""
    context = make_server_context("intermediate", *pki.a)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(trusted_ca))
    server_names: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: server_names.append(name)
    left, right = trio.testing.memory_stream_pair()
    client = OpenSSLStream(left, client_context(pki), server_side=False, server_hostname="a.test")
    server = trio.SSLStream(right, context, server_side=True)
    return client, server, server_names


async def test_an_openssl_client_against_a_stdlib_server(pki: Pki) -> None:
    client, server, server_names = await stdlib_server_pair(pki, trusted_ca=pki.ca)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)

    assert server_names == ["a.test"]  # SNI
    assert client.peer_certificate() == PeerCertificate(True, frozenset({"a.test"}))
    peer = server.getpeercert()
    assert peer is not None
    assert ("DNS", "b.test") in peer["subjectAltName"]
    await exchange(client, server, MiB)


async def test_a_server_refusing_our_certificate_breaks_the_stream(pki: Pki) -> None:
    # A peer with ordinary, fatal verification that does not trust our CA. With TLS 1.3 the
    # client's handshake is over before the server has judged the client certificate; the
    # refusal arrives as an alert on the first read.
    strict = make_s2s_context(*pki.a, ca_file=pki.rogue_ca, server_side=True)
    strict.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    left, right = trio.testing.memory_stream_pair()
    client = OpenSSLStream(left, client_context(pki), server_side=False)
    server = OpenSSLStream(right, strict, server_side=True)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            with pytest.raises(trio.BrokenResourceError, match="certificate verify failed"):
                await server.do_handshake()
        with pytest.raises(trio.BrokenResourceError, match=r"TLS failure: .*unknown ca"):
            await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"after the alert")
    await client.aclose()


# --- over real sockets ----------------------------------------------------------------------


async def test_over_loopback_tcp(pki: Pki) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    seen: list[PeerCertificate | None] = []

    async def serve_one() -> None:
        server = OpenSSLStream(await listener.accept(), server_context(pki), server_side=True)
        await server.do_handshake()
        seen.append(server.peer_certificate())
        while data := await server.receive_some():
            await server.send_all(data)
        await server.aclose()

    with trio.fail_after(HANDSHAKE_LIMIT):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            client = OpenSSLStream(
                transport, client_context(pki), server_side=False, server_hostname="a.test"
            )
            await client.do_handshake()
            payload = b"<stream:stream>" * 70000  # about 1 MiB, echoed back
            async with trio.open_nursery() as echo:
                echo.start_soon(client.send_all, payload)
                assert await receive_exactly(client, len(payload)) == payload
            await client.aclose()
    assert seen == [PeerCertificate(True, frozenset({"b.test"}))]


# --- failures -------------------------------------------------------------------------------


async def test_a_peer_speaking_something_else_breaks_the_handshake(pki: Pki) -> None:
    left, right = trio.testing.memory_stream_pair()
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    await left.send_all(b"<?xml version='1.0'?><stream:stream to='a.test'>\r\n" * 4)

    with trio.fail_after(HANDSHAKE_LIMIT), pytest.raises(trio.BrokenResourceError) as caught:
        await server.do_handshake()
    assert str(caught.value).startswith("TLS failure: ")
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()


async def test_a_server_answering_garbage_breaks_an_outbound_handshake(pki: Pki) -> None:
    left, right = trio.testing.memory_stream_pair()
    client = OpenSSLStream(left, client_context(pki), server_side=False, server_hostname="a.test")

    async def answer_garbage() -> None:
        await right.receive_some()
        await right.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_garbage)
            with pytest.raises(trio.BrokenResourceError, match="TLS failure"):
                await client.do_handshake()


async def test_the_peer_leaving_during_the_handshake_breaks_it(pki: Pki) -> None:
    left, right = trio.testing.memory_stream_pair()
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    await left.aclose()

    with trio.fail_after(HANDSHAKE_LIMIT), pytest.raises(trio.BrokenResourceError, match="closed"):
        await server.do_handshake()


async def test_the_handshake_is_bounded_by_the_callers_deadline(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    _, right = trio.testing.memory_stream_pair()
    server = OpenSSLStream(right, server_context(pki), server_side=True)

    with pytest.raises(trio.TooSlowError), trio.fail_after(30):
        await server.do_handshake()  # the peer never says anything
    assert trio.current_time() == pytest.approx(30)
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()


async def test_transport_end_without_close_notify_reads_as_end_of_stream(pki: Pki) -> None:
    client, server = await connect(client_context(pki), server_context(pki))
    await client.transport.aclose()

    with trio.fail_after(HANDSHAKE_LIMIT):
        assert await server.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"to nobody")


# --- stream discipline ----------------------------------------------------------------------


async def test_data_before_the_handshake_is_a_programming_error(pki: Pki) -> None:
    left, _ = trio.testing.memory_stream_pair()
    stream = OpenSSLStream(left, client_context(pki), server_side=False)

    with pytest.raises(RuntimeError, match="do_handshake"):
        await stream.send_all(b"early")
    with pytest.raises(RuntimeError, match="do_handshake"):
        await stream.receive_some()
    with pytest.raises(RuntimeError, match="do_handshake"):
        stream.peer_certificate()
    assert stream.tls_version is None
    assert stream.cipher is None
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.do_handshake()


async def test_concurrent_sends_conflict_but_a_send_and_a_receive_do_not(pki: Pki) -> None:
    left, right = trio.testing.lockstep_stream_pair()  # send_all waits for the reader
    client = OpenSSLStream(left, client_context(pki), server_side=False)
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    received: list[bytes] = []

    async def receive() -> None:
        received.append(await client.receive_some())

    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            # The TLS 1.3 server finishes its handshake by sending session tickets, which
            # only a read on the client side takes off this transport.
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
            nursery.start_soon(receive)  # reads past the tickets, then waits for data
            nursery.start_soon(client.send_all, b"a" * 100_000)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.send_all(b"b")
            with pytest.raises(trio.BusyResourceError):
                await client.receive_some()
            with pytest.raises(trio.BusyResourceError):
                await client.wait_send_all_might_not_block()
            assert await receive_exactly(server, 100_000) == b"a" * 100_000
            await server.send_all(b"wake the receiver")
    assert received == [b"wake the receiver"]


async def test_the_handshake_runs_once(pki: Pki) -> None:
    _, right = trio.testing.memory_stream_pair()
    lonely = OpenSSLStream(right, server_context(pki), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lonely.do_handshake)  # waits for a ClientHello that never comes
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await lonely.do_handshake()
        nursery.cancel_scope.cancel()

    client, server = await connect(client_context(pki), server_context(pki))
    await client.do_handshake()  # already done: returns at once
    await server.do_handshake()
    await exchange(client, server)


async def test_a_cancelled_receive_leaves_the_stream_usable(pki: Pki) -> None:
    client, server = await connect(client_context(pki), server_context(pki))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    await exchange(client, server)


async def test_a_cancelled_send_breaks_the_stream(pki: Pki) -> None:
    left, right = trio.testing.lockstep_stream_pair()
    client = OpenSSLStream(left, client_context(pki), server_side=False)
    server = OpenSSLStream(right, server_context(pki), server_side=True)
    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
            nursery.start_soon(client.receive_some)  # takes the session tickets
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"never read")
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")


async def test_closing_the_stream_under_a_waiting_receiver_says_closed(pki: Pki) -> None:
    client, _ = await connect(client_context(pki), server_context(pki))

    async def receive() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()

    with trio.fail_after(HANDSHAKE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()


async def test_a_failing_transport_breaks_the_stream(pki: Pki) -> None:
    client, _ = await connect(client_context(pki), server_context(pki))
    await client.transport.aclose()  # under the stream, which is not closed itself

    with pytest.raises(trio.BrokenResourceError, match="transport failed"):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await client.wait_send_all_might_not_block()
    await client.aclose()


def test_a_context_used_without_openssl_stream_verifies_fatally(pki: Pki) -> None:
    # The recording callback only lets failures through for an OpenSSLStream, which reads
    # the record; any other use of the context gets OpenSSL's ordinary verification.
    client = SSL.Connection(make_s2s_context(*pki.b, ca_file=pki.rogue_ca, server_side=False))
    server = SSL.Connection(server_context(pki))
    client.set_connect_state()
    server.set_accept_state()
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        _handshake_in_memory(client, server)


def _handshake_in_memory(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                one.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(one.bio_read(_BIO_READ_SIZE))


_BIO_READ_SIZE = 64 * 1024


async def test_receive_some_honours_max_bytes(pki: Pki) -> None:
    client, server = await connect(client_context(pki), server_context(pki))
    await client.wait_send_all_might_not_block()
    await client.send_all(b"0123456789")

    with trio.fail_after(HANDSHAKE_LIMIT):
        assert await server.receive_some(4) == b"0123"
        assert await receive_exactly(server, 6) == b"456789"
    with pytest.raises(ValueError, match="max_bytes"):
        await server.receive_some(0)


# --- what a certificate covers --------------------------------------------------------------

TABLE_DOMAINS = frozenset({"example.org", "*.wild.test", "a*.partial.test", "*", "xmpp.only"})


@pytest.mark.parametrize(
    ("domain", "covered"),
    [
        ("example.org", True),
        ("EXAMPLE.Org", True),
        ("example.org.", True),
        ("xmpp.only", True),
        ("a.wild.test", True),
        ("A.Wild.Test.", True),
        ("wild.test", False),  # the wildcard needs a label of its own
        ("a.b.wild.test", False),  # and matches exactly one
        ("ab.partial.test", False),  # no partial-label wildcards
        ("a.partial.test", False),
        ("localhost", False),  # a lone "*" matches nothing
        ("*.wild.test", False),  # a name asked about is never a pattern
        ("", False),
        (".", False),
        ("other.org", False),
    ],
)
def test_covers(domain: str, covered: bool) -> None:
    assert PeerCertificate(True, TABLE_DOMAINS).covers(domain) is covered


def test_a_wildcard_under_a_single_label_covers_one_label() -> None:
    wildcard = PeerCertificate(True, frozenset({"*.test"}))
    assert wildcard.covers("a.test")
    assert not wildcard.covers("a.b.test")
    assert not wildcard.covers("test")


def test_nothing_is_covered_by_an_unverified_chain() -> None:
    assert not PeerCertificate(False, frozenset({"example.org"})).covers("example.org")


def test_certificate_domains_reads_dns_names_and_xmpp_addresses() -> None:
    cert = _self_signed(
        [
            x509.DNSName("Mixed.Case.Test."),
            x509.DNSName("*.Wild.Test"),
            x509.OtherName(ID_ON_XMPPADDR, _utf8_string("XMPP.Only.Test")),
            x509.OtherName(ID_ON_XMPPADDR, _utf8_string("*.star.test")),  # no wildcards here
            x509.OtherName(ID_ON_XMPPADDR, _utf8_string("user@account.test")),  # not a domain
            x509.OtherName(ID_ON_XMPPADDR, b"\x16\x08ia5.test"),  # IA5String, not UTF8String
            x509.OtherName(ID_ON_XMPPADDR, b"\x0c\x02\xff\xfe"),  # not UTF-8
            x509.OtherName(x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7"), _utf8_string("_x.test")),
        ]
    )

    assert certificate_domains(cert) == frozenset(
        {"mixed.case.test", "*.wild.test", "xmpp.only.test"}
    )
    assert PeerCertificate(True, certificate_domains(cert)).covers("a.wild.test")
    assert not PeerCertificate(True, certificate_domains(cert)).covers("a.star.test")


def test_a_certificate_without_alternative_names_names_nothing() -> None:
    assert certificate_domains(_self_signed(None)) == frozenset()


def test_long_form_der_lengths_are_read() -> None:
    long_name = "a" * 60 + "." + "b" * 60 + ".test"  # 126 bytes: a long-form length
    cert = _self_signed([x509.OtherName(ID_ON_XMPPADDR, _utf8_string(long_name))])
    assert certificate_domains(cert) == frozenset({long_name})


# --- configuration errors -------------------------------------------------------------------


def test_a_missing_certificate_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(
        S2STlsConfigError, match=re.escape(f"certificate file {missing}: cannot read")
    ):
        make_s2s_context(missing, pki.a[1], ca_file=pki.ca, server_side=True)


def test_a_key_that_does_not_match_names_the_key_file(pki: Pki) -> None:
    with pytest.raises(
        S2STlsConfigError, match=re.escape(f"key file {pki.b[1]} does not belong")
    ) as caught:
        make_s2s_context(pki.a[0], pki.b[1], ca_file=pki.ca, server_side=False)
    assert isinstance(caught.value, TlsConfigError)  # one except clause catches both kinds


def test_a_missing_or_bad_ca_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(S2STlsConfigError, match=re.escape(f"CA file {missing}: cannot read")):
        make_s2s_context(*pki.a, ca_file=missing, server_side=True)
    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(S2STlsConfigError, match=re.escape(f"CA file {garbage}: no readable PEM")):
        make_s2s_context(*pki.a, ca_file=garbage, server_side=True)


def test_an_unknown_profile_is_refused(pki: Pki) -> None:
    with pytest.raises(S2STlsConfigError, match="unknown TLS profile 'paranoid'"):
        make_s2s_context(*pki.a, ca_file=pki.ca, server_side=True, profile="paranoid")


@pytest.mark.parametrize("profile", ["modern", "intermediate", "old"])
@pytest.mark.parametrize("server_side", [True, False])
def test_every_profile_builds(pki: Pki, profile: str, server_side: bool) -> None:
    make_s2s_context(*pki.a, ca_file=pki.ca, server_side=server_side, profile=profile)


# --- certificates the test CA does not make -------------------------------------------------


def _server_auth_only(ca: PemPair, domain: str) -> PemPair:
    """Like ``pki.issue`` but with serverAuth alone, as some public CAs now issue."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _self_signed(names: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "names.test")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def _utf8_string(text: str) -> bytes:
    body = text.encode()
    length = bytes([len(body)]) if len(body) < 0x80 else bytes([0x81, len(body)])
    return b"\x0c" + length + body
