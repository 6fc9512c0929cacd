"""TLS for server-to-server streams, where a certificate that fails to verify is information.

This module owns the TLS layer of federation (s2s) connections in both directions: the
pyOpenSSL contexts they use (``make_s2s_context``), a trio stream over a pyOpenSSL connection
in memory-BIO mode (``OpenSSLStream``), and what a peer's certificate proves
(``PeerCertificate``, ``certificate_domains``). It makes no policy decision: whether a peer
may use SASL EXTERNAL (XEP-0178) or must fall back to dialback (XEP-0220) is the federation
stream's call, made from ``PeerCertificate.covers``.

Why not ``ssl``
---------------

An s2s listener asks every peer for a certificate but must not abort the handshake when that
certificate does not verify: a peer with a self-signed or expired certificate may still
authenticate with dialback. Python 3.11's ``ssl`` cannot do that (``CERT_OPTIONAL`` aborts on
a certificate that fails, and there is no verify callback), nor does it expose the peer's
chain. pyOpenSSL can: the contexts made here install a verify callback that records every
error OpenSSL finds -- depth, code, text -- on the connection and then lets the handshake go
on. The stream reads the record afterwards: the chain verified only if a certificate was
presented, its leaf was checked, and nothing was recorded. Outbound connections work the
same way, so a server certificate that fails is reported rather than fatal, again for the
policy to decide.

Contexts
--------

The profiles, TLS 1.2 cipher lists and TLS 1.3 suites are those of ``villaged.net.tls``
(Mozilla v5.7 ``modern``, ``intermediate``, ``old``), as are compression and renegotiation
being off. Differences, each for a reason:

* Both sides present our certificate (the client side for SASL EXTERNAL) and verify the
  peer's against ``ca_file`` or, without one, the system's trust store.
* The server side requests a client certificate (``VERIFY_PEER`` without
  ``VERIFY_FAIL_IF_NO_PEER_CERT``) and sends no list of acceptable CAs, since with the system
  store that list would be hundreds of names.
* No session resumption at all (no session cache, no tickets): a resumed session skips
  certificate verification, so its peer would look unverified, and XMPP streams are long-lived.
  A TLS 1.3 server may still send (useless) NewSessionTicket messages; the stream reads past them.
* The key-exchange groups are OpenSSL's defaults: pyOpenSSL has no way to set a group list,
  and the OpenSSL bundled with ``cryptography`` defaults to modern groups.
* Certificate and key are loaded from the checked bytes (``villaged.net.tls`` reads and checks
  them), so a config error names the file; hostname checks are not OpenSSL's business here --
  ``PeerCertificate.covers`` matches names, following RFC 6125 and RFC 6120 §13.7.

The stream
----------

``OpenSSLStream`` drives a ``Connection`` created without a socket: OpenSSL reads ciphertext
from one memory BIO and writes to another, and the stream moves bytes between those and the
transport. Each OpenSSL call is retried until it stops asking for input; whatever OpenSSL wrote
is flushed to the transport after every call, success or failure (so alerts reach the peer).

The handshake is explicit: ``do_handshake()`` first (under the caller's ``trio.fail_after``),
then data. A send and a receive may run at the same time, as with ``trio.SSLStream``: writes to
the transport are serialized by one lock and reads from it by another, and a task that needs
input but finds another task already reading waits for it and retries rather than reading
itself. Two concurrent sends (or receives) are a ``trio.BusyResourceError``. A transport
failure, a TLS error or a cancelled send leaves the stream broken: every later call raises
``trio.BrokenResourceError``; only ``aclose()`` remains useful.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import operator
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ObjectIdentifier
from OpenSSL import SSL

from villaged.federation.stream import PeerCertificate
from villaged.net.tls import (
    _PROFILES,  # the Mozilla profiles are defined once, for the c2s contexts
    TLS13_CIPHERSUITES,
    TlsConfigError,
    _load_certificate_pair,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from OpenSSL import crypto

__all__ = [
    "ID_ON_XMPPADDR",
    "OpenSSLStream",
    "PeerCertificate",
    "S2STlsConfigError",
    "certificate_domains",
    "make_s2s_context",
]

#: id-on-xmppAddr (RFC 6120 §13.7.1.4): an otherName holding a JID as a UTF8String.
ID_ON_XMPPADDR: Final = ObjectIdentifier("1.3.6.1.5.5.7.8.5")

# Ciphertext moved per transport read and write, and plaintext per TLS write: bounds the
# memory one stream holds in its BIOs at a time.
_CHUNK: Final = 64 * 1024
# More verification errors than this on one connection are counted, not kept.
_MAX_RECORDED_ERRORS: Final = 32
_VERIFY_DEPTH: Final = 10
_SESSION_ID_CONTEXT: Final = b"villaged-s2s"
_UTF8_STRING_TAG: Final = 0x0C

_MINIMUM_VERSIONS: Final[Mapping[ssl.TLSVersion, int]] = {
    ssl.TLSVersion.TLSv1: SSL.TLS1_VERSION,
    ssl.TLSVersion.TLSv1_2: SSL.TLS1_2_VERSION,
    ssl.TLSVersion.TLSv1_3: SSL.TLS1_3_VERSION,
}
_ALWAYS_ON: Final = (
    SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET | SSL.OP_SINGLE_ECDH_USE
)
# X509_V_ERR_* codes by number, for readable messages (pyOpenSSL exposes the codes, not
# OpenSSL's error strings).
_VERIFY_CODE_NAMES: Final[Mapping[int, str]] = {
    code: name
    for name, code in vars(SSL.X509VerificationCodes).items()
    if name.startswith("ERR_") and isinstance(code, int)
}

_T = TypeVar("_T")


class S2STlsConfigError(TlsConfigError):
    """An s2s certificate, key, trust file or profile that cannot be used; names the file."""


# --- what a peer certificate proves ---------------------------------------------------------


def certificate_domains(cert: x509.Certificate) -> frozenset[str]:
    """The domains ``cert`` names for XMPP: its dNSNames and id-on-xmppAddr values.

    Names are lowercased and lose a trailing dot. xmppAddr values that are not bare domains
    (a ``*``, ``@`` or ``/`` in them) are left out: RFC 6120 allows no wildcards there, and a
    server certificate names domains, not accounts. A certificate without a (readable)
    subjectAltName names nothing; the subject's common name is not consulted (RFC 6125 §6.4.4
    allows that only as a legacy fallback).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    except ValueError:  # cryptography refuses malformed or duplicated extensions
        return frozenset()
    names = {_normalize_domain(name) for name in san.get_values_for_type(x509.DNSName)}
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id != ID_ON_XMPPADDR:
            continue
        address = _parse_der_utf8_string(other.value)
        if address is not None and not any(c in address for c in "*@/"):
            names.add(_normalize_domain(address))
    names.discard("")
    return frozenset(names)


def _normalize_domain(name: str) -> str:
    return name.strip().lower().removesuffix(".")


def _parse_der_utf8_string(der: bytes) -> str | None:
    """The text of a DER UTF8String, or None for anything else."""
    if len(der) < 2 or der[0] != _UTF8_STRING_TAG:
        return None
    if der[1] < 0x80:
        start, length = 2, der[1]
    else:
        size = der[1] & 0x7F
        if size == 0 or size > 4:
            return None
        start, length = 2 + size, int.from_bytes(der[2 : 2 + size], "big")
    if start + length != len(der):
        return None
    try:
        return der[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- contexts -------------------------------------------------------------------------------


def make_s2s_context(
    cert_file: Path,
    key_file: Path,
    *,
    ca_file: Path | None,
    server_side: bool,
    profile: str = "intermediate",
) -> SSL.Context:
    """A pyOpenSSL context for s2s streams on one side, presenting our chain and key.

    Peers' certificates are verified against ``ca_file`` (PEM, one or more CA certificates) or,
    if it is None, the system trust store; verification failures are recorded for
    ``OpenSSLStream``, never fatal. The context is only meant for ``OpenSSLStream``: a
    connection made from it some other way gets OpenSSL's ordinary, fatal verification.

    Raises ``S2STlsConfigError`` naming the file for a missing, unreadable or malformed file, a
    key that does not belong to the certificate, or an unknown profile.
    """
    settings = _PROFILES.get(profile)
    if settings is None:
        expected = ", ".join(_PROFILES)
        raise S2STlsConfigError(f"unknown TLS profile {profile!r} (expected one of {expected})")
    try:
        pair = _load_certificate_pair(cert_file, key_file)
    except TlsConfigError as exc:
        raise S2STlsConfigError(str(exc)) from exc
    chain = x509.load_pem_x509_certificates(pair.chain_pem)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)

    context = SSL.Context(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(_MINIMUM_VERSIONS[settings.minimum_version])
    context.set_options(_ALWAYS_ON)
    if settings.server_preference:
        context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    try:
        context.set_cipher_list(settings.ciphers.encode("ascii"))
        context.set_tls13_ciphersuites(":".join(TLS13_CIPHERSUITES).encode("ascii"))
    except SSL.Error as exc:
        raise S2STlsConfigError(
            f"OpenSSL refused the cipher suites of the TLS profile {profile!r}: "
            f"{_openssl_reason(exc)}"
        ) from exc
    try:
        context.use_certificate(chain[0])
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(intermediate)
        # The loader only returns key types that X.509 certificates use.
        context.use_privatekey(key)  # type: ignore[arg-type]
        context.check_privatekey()
    except SSL.Error as exc:
        raise S2STlsConfigError(
            f"OpenSSL cannot use the certificate {cert_file} with the key {key_file}: "
            f"{_openssl_reason(exc)}"
        ) from exc
    if ca_file is None:
        context.set_default_verify_paths()
    else:
        _load_trust(context, ca_file)
    context.set_verify(SSL.VERIFY_PEER, _record_verification)
    context.set_verify_depth(_VERIFY_DEPTH)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if server_side:
        context.set_session_id(_SESSION_ID_CONTEXT)
    return context


def _load_trust(context: SSL.Context, ca_file: Path) -> None:
    try:
        pem = ca_file.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise S2STlsConfigError(f"TLS CA file {ca_file}: cannot read it ({reason})") from exc
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise S2STlsConfigError(
            f"TLS CA file {ca_file}: no readable PEM certificate ({exc})"
        ) from exc
    try:
        context.load_verify_locations(str(ca_file))
    except SSL.Error as exc:
        raise S2STlsConfigError(
            f"TLS CA file {ca_file}: OpenSSL cannot load it ({_openssl_reason(exc)})"
        ) from exc


@dataclass(slots=True)
class _VerificationLog:
    """What OpenSSL's certificate verification found on one connection (its app data)."""

    #: Verifying a client's certificate (we are the server): a missing clientAuth usage is
    #: forgiven there, never for a server's certificate (which must have serverAuth).
    checking_client: bool = False
    leaf_checked: bool = False
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def record(self, depth: int, code: int, ok: bool) -> None:
        if depth == 0:
            self.leaf_checked = True
        if ok and code == 0:
            return
        if depth == 0 and code == _X509_V_ERR_INVALID_PURPOSE and self.checking_client:
            # A server certificate used as a client certificate: public CAs have stopped
            # putting clientAuth in them, yet it is the same server's identity (Prosody and
            # ejabberd accept it too). The chain and the name are still checked.
            return
        self.error_count += 1
        if len(self.errors) < _MAX_RECORDED_ERRORS:
            self.errors.append(_describe_verify_error(depth, code))


#: OpenSSL's X509_V_ERR_INVALID_PURPOSE: the leaf's extended key usage lacks the purpose.
_X509_V_ERR_INVALID_PURPOSE: Final = 26


def _record_verification(
    connection: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verify callback: note the outcome, let the handshake continue."""
    log = connection.get_app_data()
    if not isinstance(log, _VerificationLog):
        return bool(ok)  # not an OpenSSLStream: nobody would read the record, so fail closed
    log.record(depth, code, bool(ok))
    return True


def _describe_verify_error(depth: int, code: int) -> str:
    name = _VERIFY_CODE_NAMES.get(code)
    if name is None:
        return f"depth {depth}: certificate verification error {code}"
    text = name.removeprefix("ERR_").lower().replace("_", " ")
    return f"depth {depth}: {text} (X509_V_{name}, {code})"


def _openssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL error (its args hold (lib, func, reason))."""
    if exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        reasons = [str(entry[-1]) for entry in exc.args[0] if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


# --- the stream -----------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = enum.auto()  # handshake not (yet) completed
    OPEN = enum.auto()
    BROKEN = enum.auto()
    CLOSED = enum.auto()


class _PeerEndedError(Exception):
    """The peer closed the transport without close_notify (OpenSSL calls it a syscall error)."""


class OpenSSLStream(trio.abc.Stream):
    """A TLS stream over ``transport`` using a context from ``make_s2s_context``.

    Call ``do_handshake()`` first; data calls before it completes raise ``RuntimeError``.
    ``server_hostname`` is sent as SNI by a client; it does not make the handshake check the
    server's name -- ``peer_certificate().covers(domain)`` does that.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self._verification = _VerificationLog(checking_client=server_side)
        self._connection = SSL.Connection(context, None)
        self._connection.set_app_data(self._verification)
        if server_side:
            self._connection.set_accept_state()
        else:
            self._connection.set_connect_state()
            if server_hostname:
                self._connection.set_tlsext_host_name(server_hostname.rstrip(".").encode("idna"))
        self._state = _State.NEW
        self._handshake_done = False
        self._transport_send_lock = trio.StrictFIFOLock()
        self._transport_receive_lock = trio.StrictFIFOLock()
        self._outgoing = bytearray()  # ciphertext from OpenSSL not yet sent (see _flush)
        self._bytes_fed = 0  # how many transport reads went into OpenSSL (see _feed)
        self._transport_eof = False
        self._peer_ended = False
        self._handshaking = False
        self._sending = False
        self._receiving = False

    # --- trio.abc.Stream --------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the TLS handshake; returns at once if it already has.

        Raises ``trio.BrokenResourceError`` (with OpenSSL's reason) if the handshake fails or
        the peer goes away during it. A certificate that does not verify is not a failure:
        see ``peer_certificate()``.
        """
        if self._handshake_done:
            self._check_usable()
            return
        self._check_usable()
        if self._handshaking:
            raise trio.BusyResourceError("another task is already doing the TLS handshake")
        self._handshaking = True
        try:
            await self._drive(self._connection.do_handshake, sending=True)
        except _PeerEndedError:
            self._set_broken()
            raise trio.BrokenResourceError(
                "the peer closed the connection during the TLS handshake"
            ) from None
        except BaseException:
            self._set_broken()  # cancelled or failed mid-handshake: the state is unknowable
            raise
        finally:
            self._handshaking = False
        self._handshake_done = True
        self._state = _State.OPEN

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_data_allowed()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            for offset in range(0, len(view), _CHUNK):
                chunk = view[offset : offset + _CHUNK]
                while chunk:
                    written = await self._drive(
                        functools.partial(self._connection.send, chunk), sending=True
                    )
                    chunk = chunk[written:]
        except _PeerEndedError:
            self._set_broken()
            raise trio.BrokenResourceError("the peer closed the connection") from None
        except BaseException:
            # Part of the data may have been encrypted and not sent: the stream cannot go on.
            self._set_broken()
            raise
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_data_allowed()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            async with self._transport_send_lock:
                await self.transport.wait_send_all_might_not_block()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._transport_failure(exc) from exc
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (at most 64 KiB) of plaintext; ``b""`` once the peer has closed.

        The peer closing the transport without TLS close_notify is reported as end of stream
        too: XMPP ends its streams in XML, so a truncation is visible one layer up.
        """
        if max_bytes is None:
            max_bytes = _CHUNK
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            max_bytes = min(max_bytes, _CHUNK)
        self._check_data_allowed()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._peer_ended:
            return b""
        self._receiving = True
        try:
            return await self._drive(functools.partial(self._connection.recv, max_bytes))
        except (SSL.ZeroReturnError, _PeerEndedError):
            self._peer_ended = True
            return b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except trio.Cancelled:
            raise  # nothing is lost: ciphertext already read stays in OpenSSL's buffer
        except BaseException:
            self._set_broken()
            raise
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Send close_notify if the stream is open and idle, then close the transport."""
        if self._state is _State.CLOSED:
            return
        say_goodbye = self._state is _State.OPEN and not self._transport_send_lock.locked()
        self._state = _State.CLOSED
        try:
            if say_goodbye:
                try:
                    self._connection.shutdown()
                except SSL.Error:
                    pass  # e.g. the peer already broke the TLS layer: just close the transport
                else:
                    await self._flush(wait=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # best effort: the peer may be gone
        finally:
            await self.transport.aclose()

    # --- what the handshake established ----------------------------------------------------

    def peer_certificate(self) -> PeerCertificate | None:
        """The peer's certificate (None if it sent none); only meaningful after the handshake.

        ``chain_valid`` is True only if a certificate was presented, OpenSSL checked it and
        recorded no verification error at any depth of the chain.
        """
        self._require_handshake()
        leaf = self._connection.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return None
        verified = self._verification.leaf_checked and self._verification.error_count == 0
        return PeerCertificate(chain_valid=verified, domains=certificate_domains(leaf))

    def peer_chain(self) -> list[x509.Certificate]:
        """The certificates the peer sent, leaf first (empty if it sent none)."""
        self._require_handshake()
        leaf = self._connection.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        chain = self._connection.get_peer_cert_chain(as_cryptography=True) or []
        # OpenSSL leaves the leaf out of the chain on the server side, not on the client side.
        if not chain or chain[0] != leaf:
            chain.insert(0, leaf)
        return chain

    @property
    def verify_errors(self) -> list[str]:
        """Every verification error OpenSSL reported for the peer's chain, in order."""
        hidden = self._verification.error_count - len(self._verification.errors)
        more = [f"... and {hidden} more verification errors"] if hidden else []
        return [*self._verification.errors, *more]

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol version (``"TLSv1.3"``), or None before the handshake."""
        return self._connection.get_protocol_version_name() if self._handshake_done else None

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite (OpenSSL's name), or None before the handshake."""
        return self._connection.get_cipher_name() if self._handshake_done else None

    # --- moving bytes between OpenSSL and the transport -------------------------------------

    async def _drive(self, operation: Callable[[], _T], *, sending: bool = False) -> _T:
        """Run one OpenSSL call until it completes, feeding it from the transport as it asks.

        ``sending`` says the caller's output must be on the transport before this returns (a
        send's backpressure); other callers leave their output to a task already sending.
        Raises ``_PeerEndedError`` when the transport ended without close_notify,
        ``SSL.ZeroReturnError`` after the peer's close_notify, and ``trio.BrokenResourceError``
        for a TLS or transport failure.
        """
        while True:
            fed_before = self._bytes_fed
            try:
                result = operation()
            except SSL.WantReadError:
                await self._flush(wait=False)
                await self._feed(fed_before)
                continue
            except SSL.WantWriteError:  # cannot happen with memory BIOs; flushing is the answer
                await self._flush(wait=True)
                continue
            except SSL.ZeroReturnError:
                await self._flush(wait=False)
                raise
            except SSL.SysCallError as exc:
                # With memory BIOs, this only means the input BIO reached its end.
                await self._flush_quietly()
                raise _PeerEndedError from exc
            except SSL.Error as exc:
                self._set_broken()
                await self._flush_quietly()  # the alert OpenSSL queued, if any
                raise trio.BrokenResourceError(f"TLS failure: {_openssl_reason(exc)}") from exc
            await self._flush(wait=sending)
            return result

    async def _flush(self, *, wait: bool) -> None:
        """Send everything OpenSSL has written, in order, to the transport.

        OpenSSL's output is moved to ``_outgoing`` at once, so bytes keep the order in which
        OpenSSL produced them whichever task sends them. Only the holder of the send lock
        takes bytes from ``_outgoing``, and it keeps sending until that is empty; so with
        ``wait=False`` a task whose bytes a lock holder will send goes on without waiting.
        That matters when a receive needs input while a send is blocked on a slow peer.
        """
        self._collect_output()
        if not self._outgoing or (not wait and self._transport_send_lock.locked()):
            return
        async with self._transport_send_lock:
            while self._outgoing:
                data = bytes(self._outgoing)
                self._outgoing.clear()
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._transport_failure(exc) from exc
                except BaseException:
                    self._set_broken()  # ciphertext was taken out of OpenSSL and may be lost
                    raise

    def _collect_output(self) -> None:
        while True:
            try:
                self._outgoing += self._connection.bio_read(_CHUNK)
            except SSL.WantReadError:
                return  # OpenSSL's outgoing BIO is empty

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush(wait=False)

    async def _feed(self, fed_before: int) -> None:
        """Give OpenSSL the next bytes from the transport, unless another task just did."""
        async with self._transport_receive_lock:
            if self._bytes_fed != fed_before:
                return  # a concurrent task fed OpenSSL meanwhile: retry before reading more
            if self._transport_eof:
                raise _PeerEndedError
            try:
                data = await self.transport.receive_some(_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._transport_failure(exc) from exc
            if data:
                self._connection.bio_write(data)
            else:
                self._transport_eof = True
                self._connection.bio_shutdown()
            self._bytes_fed += 1

    # --- state ------------------------------------------------------------------------------

    def _set_broken(self) -> None:
        if self._state is not _State.CLOSED:
            self._state = _State.BROKEN

    def _transport_failure(
        self, exc: BaseException
    ) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._state is _State.CLOSED:
            return trio.ClosedResourceError("the stream was closed")
        self._set_broken()
        return trio.BrokenResourceError(f"the transport failed: {exc!r}")

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the stream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")

    def _check_data_allowed(self) -> None:
        self._check_usable()
        self._require_handshake()

    def _require_handshake(self) -> None:
        if not self._handshake_done:
            raise RuntimeError("call do_handshake() on the OpenSSLStream first")
