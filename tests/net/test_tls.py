"""Server TLS contexts over real loopback handshakes: profiles, groups, options, reload, errors.

Both ends are ``trio.SSLStream`` over TCP on 127.0.0.1, as in the listeners. A refused
handshake is checked by the reason the *server* gives (the client only sees the connection
drop), so a test cannot pass because of some unrelated failure such as certificate trust.
"""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from villaged.net.tls import (
    ALPN_XMPP_CLIENT,
    TLS13_CIPHERSUITES,
    ServerTlsSpec,
    TlsConfigError,
    TlsContextHolder,
    make_server_context,
    set_key_exchange_groups,
)
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

HANDSHAKE_TIMEOUT_S = 10
TLS1, TLS1_1, TLS1_2 = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2
PROFILES = ("modern", "intermediate", "old")
needs_openssl_cli = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command (Debian package openssl)"
)


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes

    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER
        )


def write_new_pair(cert: Path, key: Path) -> CertFiles:
    """A fresh self-signed certificate and key, written over ``cert`` and ``key``."""
    cert_pem, key_pem = make_self_signed("localhost", dt.datetime.now(dt.UTC))
    write_file_atomic(cert, cert_pem, 0o644)
    write_private_file(key, key_pem)
    return CertFiles(cert, key, cert_pem, key_pem)


@pytest.fixture
def files(tmp_path: Path) -> CertFiles:
    return write_new_pair(tmp_path / "cert.pem", tmp_path / "key.pem")


# --- a loopback TLS echo server and clients -------------------------------------------------


@dataclass
class Server:
    port: int
    outcomes: trio.MemoryReceiveChannel[str]

    async def next_outcome(self) -> str:
        """``"ok"``, or the OpenSSL reason the server's handshake failed with."""
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            return await self.outcomes.receive()


async def _serve_connection(
    stream: trio.SocketStream,
    *,
    context_for: Callable[[], ssl.SSLContext],
    outcomes: trio.MemorySendChannel[str],
) -> None:
    tls = trio.SSLStream(stream, context_for(), server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        outcomes.send_nowait(str(getattr(exc.__cause__, "reason", repr(exc.__cause__))))
        await trio.aclose_forcefully(tls)
        return
    outcomes.send_nowait("ok")
    try:
        async for chunk in tls:
            await tls.send_all(chunk)
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(tls)


@asynccontextmanager
async def tls_server(context_for: Callable[[], ssl.SSLContext]) -> AsyncIterator[Server]:
    """Serve on 127.0.0.1, calling ``context_for`` per accepted connection, as listeners do."""
    # Each test opens a handful of connections; 16 outcomes never fill up.
    send, receive = trio.open_memory_channel[str](16)
    handler = partial(_serve_connection, context_for=context_for, outcomes=send)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield Server(listeners[0].socket.getsockname()[1], receive)
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class Client:
    """What a test client allows; ``None``/empty means the ssl module's defaults."""

    minimum: ssl.TLSVersion | None = None
    maximum: ssl.TLSVersion | None = None
    ciphers: str | None = None
    groups: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()

    def context(self, trusted: CertFiles) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=trusted.cert_pem.decode())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 clients on purpose
            if self.minimum is not None:
                context.minimum_version = self.minimum
            if self.maximum is not None:
                context.maximum_version = self.maximum
        if self.ciphers is not None:
            context.set_ciphers(self.ciphers)
        if self.groups:
            set_key_exchange_groups(context, self.groups)
        if self.alpn:
            context.set_alpn_protocols(list(self.alpn))
        return context


async def connect(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def echo(stream: trio.SSLStream[trio.SocketStream], data: bytes) -> bytes:
    await stream.send_all(data)
    received = b""
    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        while len(received) < len(data):
            received += await stream.receive_some()
    return received


async def handshake(server_context: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """Connect once; ``(server outcome, "version cipher")`` with the client's view of a success."""
    async with tls_server(lambda: server_context) as server:
        try:
            stream = await connect(server.port, client)
        except trio.BrokenResourceError:
            return await server.next_outcome(), ""
        async with stream:
            negotiated = f"{stream.version()} {stream.cipher()[0]}"
            assert await echo(stream, b"ping") == b"ping"
        return await server.next_outcome(), negotiated


def legacy(version: ssl.TLSVersion, ciphers: str = "ECDHE-ECDSA-AES128-SHA") -> Client:
    """A client pinned to TLS 1.0 or 1.1 (its own OpenSSL needs security level 0 for that)."""
    return Client(minimum=version, maximum=version, ciphers=f"{ciphers}:@SECLEVEL=0")


# --- profiles -------------------------------------------------------------------------------

ACCEPTED = [
    ("modern", Client(), "TLSv1.3 TLS_AES_256_GCM_SHA384"),
    ("intermediate", Client(), "TLSv1.3 TLS_AES_256_GCM_SHA384"),
    (
        "intermediate",
        Client(maximum=TLS1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"),
        "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256",
    ),
    (
        "intermediate",
        Client(maximum=TLS1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"),
        "TLSv1.2 ECDHE-ECDSA-CHACHA20-POLY1305",
    ),
    ("old", Client(), "TLSv1.3 TLS_AES_128_GCM_SHA256"),  # the server's (Mozilla's) first
    (
        "old",
        Client(maximum=TLS1_2, ciphers="ECDHE-ECDSA-AES128-SHA"),
        "TLSv1.2 ECDHE-ECDSA-AES128-SHA",
    ),
    (
        "old",
        Client(maximum=TLS1_2, ciphers="ECDHE-ECDSA-AES256-SHA384"),
        "TLSv1.2 ECDHE-ECDSA-AES256-SHA384",
    ),
    ("old", legacy(TLS1_1), "TLSv1.1 ECDHE-ECDSA-AES128-SHA"),
    ("old", legacy(TLS1, "ECDHE-ECDSA-AES256-SHA"), "TLSv1 ECDHE-ECDSA-AES256-SHA"),
]

CBC_ONLY = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-ECDSA-AES256-SHA"
)
REFUSED = [
    ("modern", Client(maximum=TLS1_2), "UNSUPPORTED_PROTOCOL"),
    ("intermediate", legacy(TLS1_1), "UNSUPPORTED_PROTOCOL"),
    ("intermediate", legacy(TLS1), "UNSUPPORTED_PROTOCOL"),
    ("intermediate", Client(maximum=TLS1_2, ciphers=CBC_ONLY), "NO_SHARED_CIPHER"),
    # DHE is deliberately not configured (see the module docstring).
    (
        "intermediate",
        Client(maximum=TLS1_2, ciphers="DHE-RSA-AES128-GCM-SHA256"),
        "NO_SHARED_CIPHER",
    ),
    ("old", Client(maximum=TLS1_2, ciphers="DHE-RSA-AES128-GCM-SHA256"), "NO_SHARED_CIPHER"),
]


@pytest.mark.parametrize(("profile", "client", "negotiated"), ACCEPTED)
async def test_profile_accepts(
    files: CertFiles, profile: str, client: Client, negotiated: str
) -> None:
    server_context = make_server_context(profile, files.cert, files.key)
    assert await handshake(server_context, client.context(files)) == ("ok", negotiated)


@pytest.mark.parametrize(("profile", "client", "reason"), REFUSED)
async def test_profile_refuses(files: CertFiles, profile: str, client: Client, reason: str) -> None:
    server_context = make_server_context(profile, files.cert, files.key)
    assert await handshake(server_context, client.context(files)) == (reason, "")


@pytest.mark.parametrize(
    ("profile", "chosen"),
    [
        ("intermediate", "ECDHE-ECDSA-CHACHA20-POLY1305"),  # Mozilla: the client chooses
        ("old", "ECDHE-ECDSA-AES128-GCM-SHA256"),  # Mozilla: the server chooses
    ],
)
async def test_cipher_preference(files: CertFiles, profile: str, chosen: str) -> None:
    client = Client(
        maximum=TLS1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    server_context = make_server_context(profile, files.cert, files.key)
    assert await handshake(server_context, client.context(files)) == ("ok", f"TLSv1.2 {chosen}")


@pytest.mark.parametrize("profile", PROFILES)
def test_context_options(files: CertFiles, profile: str) -> None:
    context = make_server_context(profile, files.cert, files.key)
    for flag in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET):
        assert context.options & flag, flag
    assert bool(context.options & ssl.OP_CIPHER_SERVER_PREFERENCE) == (profile == "old")
    assert context.num_tickets == 0
    tls13 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert tls13 == list(TLS13_CIPHERSUITES)
    assert all("DHE-" not in c["name"] or "ECDHE-" in c["name"] for c in context.get_ciphers())


TLS12_CLIENT = Client(maximum=TLS1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")


@pytest.mark.parametrize(
    ("profile", "client"),
    [(profile, Client()) for profile in PROFILES]
    + [("intermediate", TLS12_CLIENT), ("old", TLS12_CLIENT)],
)
async def test_no_compression_and_no_session_tickets(
    files: CertFiles, profile: str, client: Client
) -> None:
    context = make_server_context(profile, files.cert, files.key)
    async with (
        tls_server(lambda: context) as server,
        await connect(server.port, client.context(files)) as stream,
    ):
        # TLS 1.3 tickets arrive after the handshake; a round trip makes sure they were read.
        assert await echo(stream, b"ping") == b"ping"
        assert stream.compression() is None
        assert stream.session is not None
        assert not stream.session.has_ticket
        assert await server.next_outcome() == "ok"


async def test_tickets_control(files: CertFiles) -> None:
    """A default Python server context does issue tickets: the check above can see them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    async with (
        tls_server(lambda: context) as server,
        await connect(server.port, Client().context(files)) as stream,
    ):
        assert await echo(stream, b"ping") == b"ping"
        assert stream.session is not None
        assert stream.session.has_ticket


# --- key-exchange groups --------------------------------------------------------------------


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
@pytest.mark.parametrize("profile", PROFILES)
async def test_allowed_groups(files: CertFiles, profile: str, group: str) -> None:
    server_context = make_server_context(profile, files.cert, files.key)
    outcome, _ = await handshake(server_context, Client(groups=(group,)).context(files))
    assert outcome == "ok"


@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048", "ffdhe3072"])
@pytest.mark.parametrize("profile", PROFILES)
async def test_other_groups_refused(files: CertFiles, profile: str, group: str) -> None:
    server_context = make_server_context(profile, files.cert, files.key)
    assert await handshake(server_context, Client(groups=(group,)).context(files)) == (
        "NO_SUITABLE_KEY_SHARE",
        "",
    )


@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
async def test_groups_control(files: CertFiles, group: str) -> None:
    """Unrestricted OpenSSL accepts these groups, so the refusals above are villaged's doing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    outcome, _ = await handshake(context, Client(groups=(group,)).context(files))
    assert outcome == "ok"


async def s_client(port: int, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``openssl s_client`` against 127.0.0.1:port; (exit status, stdout + stderr)."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args]
    with trio.fail_after(30):
        done = await trio.run_process(
            command, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


@needs_openssl_cli
@pytest.mark.parametrize(
    ("offered", "temp_key"),
    [
        (["-groups", "X25519"], "Server Temp Key: X25519"),
        (["-groups", "P-256"], "Server Temp Key: ECDH, prime256v1"),
        (["-groups", "P-384"], "Server Temp Key: ECDH, secp384r1"),
        # TLS 1.2 ECDHE: the client prefers X448 then P-521, and the intermediate profile
        # follows the client's order, so only the group limit explains the server taking P-256.
        (["-tls1_2", "-groups", "X448:P-521:P-256"], "Server Temp Key: ECDH, prime256v1"),
        (["-tls1_2", "-groups", "X448:P-521:X25519:P-256"], "Server Temp Key: X25519"),
    ],
)
async def test_groups_seen_by_openssl_s_client(
    files: CertFiles, offered: list[str], temp_key: str
) -> None:
    context = make_server_context("intermediate", files.cert, files.key)
    async with tls_server(lambda: context) as server:
        status, output = await s_client(server.port, "-brief", *offered)
        assert await server.next_outcome() == "ok"
    assert status == 0, output
    assert temp_key in output, output


@needs_openssl_cli
async def test_groups_control_seen_by_openssl_s_client(files: CertFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(files.cert, files.key)
    async with tls_server(lambda: context) as server:
        status, output = await s_client(server.port, "-brief", "-tls1_2", "-groups", "X448:P-256")
    assert status == 0, output
    assert "Server Temp Key: X448" in output, output


@needs_openssl_cli
@pytest.mark.parametrize("profile", ["intermediate", "old"])
async def test_client_renegotiation_refused(files: CertFiles, profile: str) -> None:
    context = make_server_context(profile, files.cert, files.key)
    async with tls_server(lambda: context) as server:
        # "R" on s_client's input asks for a renegotiation (TLS 1.2; 1.3 has none).
        status, output = await s_client(server.port, "-tls1_2", stdin=b"R\n")
        assert await server.next_outcome() == "ok"
    assert "RENEGOTIATING" in output, output
    assert "no renegotiation" in output, output
    assert status != 0


def test_group_names_are_checked() -> None:
    with pytest.raises(TlsConfigError, match="refused the key-exchange groups X25519:P-999"):
        set_key_exchange_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ["X25519", "P-999"])


# --- ALPN and reload ------------------------------------------------------------------------


async def test_alpn_survives_reload(files: CertFiles) -> None:
    spec = ServerTlsSpec("intermediate", (ALPN_XMPP_CLIENT,))
    holder = TlsContextHolder(files.cert, files.key, [spec])
    renewed = write_new_pair(files.cert, files.key)
    holder.reload()
    source = holder.source(spec)
    async with tls_server(lambda: source.context) as server:
        client = Client(alpn=(ALPN_XMPP_CLIENT,)).context(renewed)
        async with await connect(server.port, client) as stream:
            assert stream.selected_alpn_protocol() == ALPN_XMPP_CLIENT
            assert stream.getpeercert(binary_form=True) == renewed.der()
        assert await server.next_outcome() == "ok"


async def test_reload_swaps_certificate_for_new_connections_only(files: CertFiles) -> None:
    spec = ServerTlsSpec("intermediate")
    holder = TlsContextHolder(files.cert, files.key, [spec, ServerTlsSpec("modern")])
    source = holder.source(spec)
    first = holder.certificate
    async with tls_server(lambda: source.context) as server:
        async with await connect(server.port, Client().context(files)) as before:
            assert before.getpeercert(binary_form=True) == files.der()
            renewed = write_new_pair(files.cert, files.key)
            summary = holder.reload()
            assert summary == holder.certificate
            assert summary.sha256_fingerprint != first.sha256_fingerprint
            assert summary.sha256_fingerprint == hashes_of(renewed)
            # Trusting only the new certificate: both have the same subject, and OpenSSL would
            # look up the issuer by name and may pick the wrong one of two.
            async with await connect(server.port, Client().context(renewed)) as after:
                assert after.getpeercert(binary_form=True) == renewed.der()
                assert await echo(after, b"new") == b"new"
            # The connection made before the reload keeps its context and still works.
            assert await echo(before, b"old") == b"old"
            assert before.getpeercert(binary_form=True) == files.der()
        assert [await server.next_outcome() for _ in range(2)] == ["ok", "ok"]


def hashes_of(pair: CertFiles) -> str:
    return x509.load_pem_x509_certificate(pair.cert_pem).fingerprint(hashes.SHA256()).hex()


async def test_failed_reload_keeps_serving_the_old_certificate(
    files: CertFiles, tmp_path: Path
) -> None:
    spec = ServerTlsSpec("intermediate")
    holder = TlsContextHolder(files.cert, files.key, [spec])
    context_before, certificate_before = holder.context(spec), holder.certificate
    stranger = write_new_pair(tmp_path / "other-cert.pem", tmp_path / "other-key.pem")
    write_private_file(files.key, stranger.key_pem)  # a renewal that went wrong

    with pytest.raises(TlsConfigError) as failure:
        holder.reload()
    assert str(failure.value) == (
        f"TLS key file {files.key} does not belong to the certificate in {files.cert}"
    )
    assert holder.context(spec) is context_before
    assert holder.certificate == certificate_before
    source = holder.source(spec)
    async with tls_server(lambda: source.context) as server:
        async with await connect(server.port, Client().context(files)) as stream:
            assert stream.getpeercert(binary_form=True) == files.der()
        assert await server.next_outcome() == "ok"

    write_private_file(files.key, files.key_pem)  # repaired: the next reload works again
    assert holder.reload() == certificate_before
    assert holder.context(spec) is not context_before


def test_holder_knows_only_its_specs(files: CertFiles) -> None:
    holder = TlsContextHolder(files.cert, files.key, [ServerTlsSpec("modern")] * 2)
    with pytest.raises(KeyError, match="intermediate"):
        holder.source(ServerTlsSpec("intermediate"))
    with pytest.raises(ValueError, match="at least one"):
        TlsContextHolder(files.cert, files.key, [])


# --- errors name the file -------------------------------------------------------------------


def test_missing_certificate(files: CertFiles, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsConfigError) as failure:
        make_server_context("intermediate", missing, files.key)
    assert str(failure.value) == (
        f"TLS certificate file {missing}: cannot read it (No such file or directory)"
    )


def test_missing_key(files: CertFiles, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(TlsConfigError) as failure:
        make_server_context("intermediate", files.cert, missing)
    assert (
        str(failure.value) == f"TLS key file {missing}: cannot read it (No such file or directory)"
    )


def test_mismatched_key(files: CertFiles, tmp_path: Path) -> None:
    stranger = write_new_pair(tmp_path / "other-cert.pem", tmp_path / "other-key.pem")
    with pytest.raises(TlsConfigError) as failure:
        make_server_context("intermediate", files.cert, stranger.key)
    assert str(failure.value) == (
        f"TLS key file {stranger.key} does not belong to the certificate in {files.cert}"
    )


def test_garbage_files(files: CertFiles, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN NOTHING-----\nAAAA\n-----END NOTHING-----\n")
    with pytest.raises(TlsConfigError, match=rf"^TLS certificate file {garbage}: no readable PEM"):
        make_server_context("intermediate", garbage, files.key)
    with pytest.raises(TlsConfigError, match=rf"^TLS key file {garbage}: no readable PEM private"):
        make_server_context("intermediate", files.cert, garbage)
    # A certificate file given as the key is not a key either.
    with pytest.raises(TlsConfigError, match=rf"^TLS key file {files.cert}: no readable PEM"):
        make_server_context("intermediate", files.cert, files.cert)


def test_encrypted_key(files: CertFiles, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(files.key_pem, password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError, match=rf"^TLS key file {encrypted}: the key is encrypted"):
        make_server_context("intermediate", files.cert, encrypted)


def test_key_openssl_refuses_names_both_files(tmp_path: Path) -> None:
    """A 1024-bit RSA key parses fine but is below the intermediate profile's security level."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (on purpose)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "weak.pem", tmp_path / "weak.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TlsConfigError) as failure:
        make_server_context("intermediate", cert_file, key_file)
    message = str(failure.value)
    assert message.startswith(
        f"OpenSSL cannot use the certificate {cert_file} with the key {key_file}: "
    )
    assert "too small" in message


def test_unknown_profile(files: CertFiles) -> None:
    with pytest.raises(TlsConfigError, match="unknown TLS profile 'ancient'"):
        make_server_context("ancient", files.cert, files.key)
