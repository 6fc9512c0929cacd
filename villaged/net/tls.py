"""Server TLS contexts after Mozilla's Server Side TLS guidelines (v5.7), and certificate reload.

This module owns every ``ssl.SSLContext`` a villaged listener uses: how one is built for a
profile, and how the certificate behind it is swapped on SIGHUP. It does no I/O besides reading
the certificate and key, and does not import trio: the listeners wrap accepted streams with
``trio.SSLStream(stream, source.context, server_side=True)`` themselves, reading
``source.context`` (a ``TlsContextSource``) afresh for every accepted connection.

Profiles (Mozilla v5.7, https://ssl-config.mozilla.org/guidelines/5.7.json)
-----------------------------------------------------------------------------

``modern``
    TLS 1.3 only. TLS 1.3 suites TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384,
    TLS_CHACHA20_POLY1305_SHA256; the client's preference order wins.
``intermediate`` (default)
    TLS 1.2 and 1.3. For TLS 1.2: ECDHE with AES-GCM or CHACHA20-POLY1305 only; the client's
    order wins. Mozilla also lists three DHE-RSA suites, last (with the ffdhe2048 group). They
    are left out on purpose: they would need DH parameters configured, a DHE handshake costs
    the server far more than ECDHE, and they only matter for old TLS stacks (older Windows
    ones, as far as we know) paired with an RSA certificate -- with the ECDSA certificates
    villaged makes, such clients use ECDHE-ECDSA anyway. sslyze's Mozilla check accepts a
    server without them.
``old``
    TLS 1.0 to 1.3, Mozilla's "old" suite list (CBC modes, static RSA key exchange) in Mozilla's
    order, the server's order wins, again without the DHE suites. Two honest limits of the system
    OpenSSL (Debian's 3.0): it has no DES-CBC3-SHA (3DES) at all, so that last suite of Mozilla's
    list is silently unavailable; and at its default security level (2) it refuses TLS 1.0/1.1
    outright, because their handshake signatures use SHA-1/MD5. The old profile therefore
    appends ``@SECLEVEL=0`` to its cipher string. That is deliberate and limited to this profile:
    the level also governs key sizes, which here means the operator's own certificate key (any
    size is then accepted) -- the key-exchange groups are pinned below and DH is not used. The
    static-RSA and ECDHE-RSA suites need an RSA certificate; with the ECDSA certificates that
    ``villaged init`` makes, only the ECDHE-ECDSA suites of the list can be negotiated.

``modern`` and ``intermediate`` also pin ``@SECLEVEL=2`` so a distribution that lowered the
default cannot weaken them.

Common to every profile
-----------------------

* Key-exchange groups limited to X25519, P-256 and P-384, for TLS 1.3 key shares and TLS 1.2
  ECDHE alike (OpenSSL 3 would otherwise also accept X448, P-521 and the ffdhe groups).
* OP_NO_COMPRESSION (CRIME), OP_NO_RENEGOTIATION (TLS 1.2 and older; TLS 1.3 has none).
  OP_SINGLE_ECDH_USE / OP_SINGLE_DH_USE are set too, but since OpenSSL 1.1 they are 0: fresh
  ephemeral keys for every handshake are no longer optional.
* No session tickets: OP_NO_TICKET for TLS 1.2 and ``num_tickets = 0`` for TLS 1.3. Mozilla says
  "disable tickets or rotate their keys"; OpenSSL keeps the ticket key for the life of the
  context and Python offers no rotation hook, so a long-running server would keep one ticket key
  for months, which defeats forward secrecy. XMPP clients hold long connections and resume
  sessions at the XMPP layer (XEP-0198), so TLS resumption buys little here.
* ALPN: a context can announce ``xmpp-client`` / ``xmpp-server`` for XEP-0368 direct TLS. ALPN is
  part of the build parameters (``ServerTlsSpec``) rather than set afterwards, so a reload
  cannot lose it.

How the groups are limited (and why this way)
---------------------------------------------

Python 3.11's ``ssl`` has no way to set more than one group: ``SSLContext.set_ecdh_curve``
calls ``SSL_CTX_set1_groups`` with exactly one group, and a server offering only X25519 would
lock out clients that only do P-256. (CPython issue #136306 proposes ``SSLContext.set_groups``;
when a Python we support has it, this module should switch to it.) The options considered:

* ``OPENSSL_CONF`` pointing at a file with ``Groups = X25519:P-256:P-384`` in the
  ``system_default`` section. OpenSSL reads it once, when it is first initialised, which happens
  as soon as anything imports ``ssl`` (trio does, at import time). It would have to be set in
  the environment before the interpreter starts, it silently does nothing if set too late, it
  changes every context in the process (clients too) and a typo in it is not reported to us.
* Calling ``SSL_CTX_set1_groups_list`` from libssl through ``ctypes``, on the ``SSL_CTX`` that
  belongs to the Python context. Chosen. It is per context, explicit, and it fails loudly:
  OpenSSL returns 0 for an unknown group, and we raise.

The ctypes path is made as safe as it can be:

* The functions are looked up through ``dlopen`` of the ``_ssl`` extension module itself, so
  ``dlsym`` finds exactly the libssl that ``_ssl`` is linked against (or OpenSSL linked into
  ``_ssl``), never another copy that happens to be installed or loaded by some other extension.
* The ``SSL_CTX *`` is read from the C object: CPython's ``PySSLContext`` starts with the
  object header followed by ``SSL_CTX *ctx`` (so in every CPython 3 release we know of; this
  was run on 3.11, and the check below guards any other). The offset is
  ``object.__basicsize__`` (the header size of this very interpreter build). Before the pointer
  is used to change anything it is checked: ``SSL_CTX_get_options`` on it must return exactly
  ``context.options``. Anything unexpected (not CPython, symbols missing, the check failing)
  raises ``TlsConfigError`` rather than serving with the wrong groups.
* The same mechanism pins the TLS 1.3 suites with ``SSL_CTX_set_ciphersuites`` (Python has no
  API for them either), so a system-wide OpenSSL configuration cannot add others.

Caveat: this relies on a CPython implementation detail. The test suite checks the result with
real handshakes (clients offering only X448 or ffdhe2048 are refused; X25519, P-256 and P-384
succeed), so a Python that changes the layout fails those tests, not production silently.

Certificates and reload
-----------------------

The certificate chain and key are read once per (re)load, checked with ``cryptography``
(parseable PEM, unencrypted key, key matching the first certificate) so errors name the file at
fault, and the very bytes that were checked are handed to OpenSSL through an anonymous
in-memory file (``memfd`` via ``/proc/self/fd``): a renewal that rewrites the files while we
load cannot pair a certificate with a key it was not checked against, and every profile's
context gets the same certificate.

``TlsContextHolder`` keeps one context per ``ServerTlsSpec``. ``reload()`` builds all new
contexts first and swaps them in with one assignment; connections already accepted keep the
context (and certificate) they were created with, new connections get the new one. A failed
reload changes nothing and raises ``TlsConfigError`` for the caller (the SIGHUP handler) to log.
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

    from villaged.config import TlsProfile

__all__ = [
    "ALPN_XMPP_CLIENT",
    "ALPN_XMPP_SERVER",
    "KEY_EXCHANGE_GROUPS",
    "TLS13_CIPHERSUITES",
    "CertificateSummary",
    "ServerTlsSpec",
    "TlsConfigError",
    "TlsContextHolder",
    "TlsContextSource",
    "make_server_context",
    "set_key_exchange_groups",
]

ALPN_XMPP_CLIENT: Final = "xmpp-client"  # XEP-0368 direct TLS, client-to-server
ALPN_XMPP_SERVER: Final = "xmpp-server"  # XEP-0368 direct TLS, server-to-server

# OpenSSL names; "P-256" is prime256v1/secp256r1 and "P-384" is secp384r1.
KEY_EXCHANGE_GROUPS: Final = ("X25519", "P-256", "P-384")
TLS13_CIPHERSUITES: Final = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)

# Mozilla v5.7 "intermediate" (OpenSSL names, Mozilla's order) without the DHE-RSA suites.
_INTERMEDIATE_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
# Mozilla v5.7 "old", same source and order, again without DHE-RSA-*.
_OLD_CIPHERS: Final = (
    *_INTERMEDIATE_CIPHERS,
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA256",
    "AES256-SHA256",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",  # not provided by Debian's OpenSSL 3; kept to match Mozilla's list
)


@dataclass(frozen=True, slots=True)
class _Profile:
    minimum_version: ssl.TLSVersion
    ciphers: str  # TLS 1.2 and older; TLS 1.3 suites are TLS13_CIPHERSUITES for every profile
    server_preference: bool


_PROFILES: Final[Mapping[str, _Profile]] = {
    "modern": _Profile(
        ssl.TLSVersion.TLSv1_3, ":".join(_INTERMEDIATE_CIPHERS) + ":@SECLEVEL=2", False
    ),
    "intermediate": _Profile(
        ssl.TLSVersion.TLSv1_2, ":".join(_INTERMEDIATE_CIPHERS) + ":@SECLEVEL=2", False
    ),
    "old": _Profile(ssl.TLSVersion.TLSv1, ":".join(_OLD_CIPHERS) + ":@SECLEVEL=0", True),
}

_ALWAYS_ON: Final = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_NO_RENEGOTIATION
    | ssl.OP_SINGLE_ECDH_USE
    | ssl.OP_SINGLE_DH_USE
    | ssl.OP_NO_TICKET
)


class TlsConfigError(Exception):
    """A certificate, key or profile that cannot be served; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerTlsSpec:
    """What one kind of listener needs from its context: the profile and the ALPN protocols."""

    profile: TlsProfile = "intermediate"
    alpn_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CertificateSummary:
    """The certificate now being served, for logs and ``villaged check``."""

    cert_file: Path
    key_file: Path
    subject: str
    not_valid_after: dt.datetime
    sha256_fingerprint: str  # hex of the leaf certificate's DER


@dataclass(frozen=True, slots=True)
class _CertificatePair:
    """A certificate chain and its key, checked, as the exact bytes OpenSSL will load."""

    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    summary: CertificateSummary


def make_server_context(
    profile: str,
    cert_file: Path,
    key_file: Path,
    *,
    alpn_protocols: Sequence[str] = (),
) -> ssl.SSLContext:
    """A server context for ``profile`` presenting the certificate chain and key in these files.

    Raises ``TlsConfigError`` naming the file for a missing, unreadable, malformed or encrypted
    file, or a key that does not belong to the certificate.
    """
    pair = _load_certificate_pair(cert_file, key_file)
    return _build_context(profile, pair, tuple(alpn_protocols))


def set_key_exchange_groups(
    context: ssl.SSLContext, groups: Sequence[str] = KEY_EXCHANGE_GROUPS
) -> None:
    """Limit ``context`` (server or client) to these key-exchange groups, in preference order.

    Group names are OpenSSL's (``X25519``, ``P-256``, ``ffdhe2048``, ...). Raises
    ``TlsConfigError`` if OpenSSL rejects the list or the context cannot be reached.
    """
    native = _native()
    handle = native.ssl_ctx(context)
    if native.ctx_ctrl(handle, _SSL_CTRL_SET_GROUPS_LIST, 0, ":".join(groups).encode()) != 1:
        raise TlsConfigError(f"OpenSSL refused the key-exchange groups {':'.join(groups)}")


class TlsContextSource:
    """One listener's view of a holder: read ``context`` for every connection accepted."""

    __slots__ = ("_holder", "spec")

    def __init__(self, holder: TlsContextHolder, spec: ServerTlsSpec) -> None:
        self._holder = holder
        self.spec = spec

    @property
    def context(self) -> ssl.SSLContext:
        """The context new connections must use now (it changes when the holder reloads)."""
        return self._holder.context(self.spec)


@dataclass(frozen=True, slots=True)
class _Generation:
    certificate: CertificateSummary
    contexts: Mapping[ServerTlsSpec, ssl.SSLContext]


class TlsContextHolder:
    """The current server contexts, one per ``ServerTlsSpec``, all from one certificate and key.

    Built at startup (raising ``TlsConfigError`` if the files cannot be served); ``reload()``
    is what SIGHUP calls.
    """

    def __init__(self, cert_file: Path, key_file: Path, specs: Iterable[ServerTlsSpec]) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._specs = tuple(dict.fromkeys(specs))
        if not self._specs:
            raise ValueError("a TlsContextHolder needs at least one ServerTlsSpec")
        self._generation = self._build()

    @property
    def certificate(self) -> CertificateSummary:
        """The certificate new connections are given."""
        return self._generation.certificate

    def context(self, spec: ServerTlsSpec) -> ssl.SSLContext:
        """The current context for ``spec``, which must be one the holder was built with."""
        try:
            return self._generation.contexts[spec]
        except KeyError:
            raise KeyError(f"no TLS context was built for {spec}") from None

    def source(self, spec: ServerTlsSpec) -> TlsContextSource:
        """A handle for one listener, whose ``context`` always follows the latest reload."""
        self.context(spec)  # fail now, not at the first connection
        return TlsContextSource(self, spec)

    def reload(self) -> CertificateSummary:
        """Re-read the certificate and key and rebuild every context, for new connections only.

        On failure nothing changes (the previous certificate keeps being served) and
        ``TlsConfigError`` says what is wrong.
        """
        generation = self._build()
        self._generation = generation  # one assignment: no connection sees a mix
        return generation.certificate

    def _build(self) -> _Generation:
        pair = _load_certificate_pair(self._cert_file, self._key_file)
        contexts = {
            spec: _build_context(spec.profile, pair, spec.alpn_protocols) for spec in self._specs
        }
        return _Generation(pair.summary, contexts)


# --- building a context ---------------------------------------------------------------------


def _build_context(
    profile_name: str, pair: _CertificatePair, alpn_protocols: tuple[str, ...]
) -> ssl.SSLContext:
    profile = _PROFILES.get(profile_name)
    if profile is None:
        expected = ", ".join(_PROFILES)
        raise TlsConfigError(f"unknown TLS profile {profile_name!r} (expected one of {expected})")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # Python deprecates TLSVersion.TLSv1 and TLSv1_1; the old profile needs them by design.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = profile.minimum_version
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(profile.ciphers)
    context.options |= _ALWAYS_ON
    if profile.server_preference:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.num_tickets = 0
    set_key_exchange_groups(context)
    _set_tls13_ciphersuites(context)
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    _load_into(context, pair)
    return context


def _set_tls13_ciphersuites(context: ssl.SSLContext) -> None:
    native = _native()
    if native.set_ciphersuites(native.ssl_ctx(context), ":".join(TLS13_CIPHERSUITES).encode()) != 1:
        raise TlsConfigError("OpenSSL refused the TLS 1.3 cipher suites")


def _load_into(context: ssl.SSLContext, pair: _CertificatePair) -> None:
    """Load exactly the checked bytes, through a memfd, never the files again."""
    summary = pair.summary
    fd = os.memfd_create("villaged-tls", os.MFD_CLOEXEC)
    staged = f"/proc/self/fd/{fd}"
    try:
        data = pair.chain_pem + b"\n" + pair.key_pem
        if os.write(fd, data) != len(data):
            raise TlsConfigError("could not stage the TLS certificate in memory (short write)")
        context.load_cert_chain(staged, password=_refuse_password)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"OpenSSL cannot use the certificate {summary.cert_file} with the key"
            f" {summary.key_file}: {exc}"
        ) from exc
    except OSError as exc:  # after SSLError, which is a subclass
        raise TlsConfigError(
            f"could not hand the TLS certificate to OpenSSL through {staged} ({exc});"
            " villaged needs /proc/self/fd"
        ) from exc
    finally:
        os.close(fd)


def _refuse_password() -> bytes:
    # Keys are checked to be unencrypted first; without this callback OpenSSL would prompt on
    # the terminal if one ever were not.
    raise TlsConfigError("encrypted TLS keys are not supported")


# --- reading and checking the files ---------------------------------------------------------


def _load_certificate_pair(cert_file: Path, key_file: Path) -> _CertificatePair:
    chain_pem = _read(cert_file, "certificate")
    key_pem = _read(key_file, "key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise TlsConfigError(
            f"TLS certificate file {cert_file}: no readable PEM certificate ({exc})"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:  # cryptography's signal for "this key is encrypted"
        raise TlsConfigError(
            f"TLS key file {key_file}: the key is encrypted; villaged needs it unencrypted"
            " (protect it with file permissions instead)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsConfigError(f"TLS key file {key_file}: no readable PEM private key") from exc
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsConfigError(
            f"TLS key file {key_file} does not belong to the certificate in {cert_file}"
        )
    summary = CertificateSummary(
        cert_file=cert_file,
        key_file=key_file,
        subject=leaf.subject.rfc4514_string(),
        not_valid_after=leaf.not_valid_after_utc,
        sha256_fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )
    return _CertificatePair(chain_pem, key_pem, summary)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TlsConfigError(f"TLS {what} file {path}: cannot read it ({reason})") from exc


# --- the part of OpenSSL that Python's ssl module does not expose ---------------------------

_SSL_CTRL_SET_GROUPS_LIST: Final = 92  # from openssl/ssl.h; SSL_CTX_set1_groups_list is a macro


@dataclass(frozen=True, slots=True)
class _Native:
    """libssl functions, resolved through ``_ssl``'s own link map."""

    ctx_ctrl: ctypes._NamedFuncPointer
    set_ciphersuites: ctypes._NamedFuncPointer
    get_options: ctypes._NamedFuncPointer

    def ssl_ctx(self, context: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` inside ``context``, checked before anyone writes through it."""
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"expected an ssl.SSLContext, got {type(context).__name__}")
        address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not address or self.get_options(address) != int(context.options):
            raise TlsConfigError(
                "cannot reach the OpenSSL context behind Python's ssl.SSLContext on this"
                " interpreter, so the key-exchange groups cannot be limited"
            )
        return address


@functools.cache
def _native() -> _Native:
    import _ssl

    if sys.implementation.name != "cpython":
        raise TlsConfigError(
            f"limiting TLS key-exchange groups needs CPython, not {sys.implementation.name}"
        )
    # dlsym through _ssl's handle searches _ssl and then its own dependencies: exactly the
    # libssl that Python's ssl module uses. Without a file, _ssl is built into the interpreter.
    library = ctypes.CDLL(getattr(_ssl, "__file__", None))
    try:
        ctx_ctrl = library.SSL_CTX_ctrl
        set_ciphersuites = library.SSL_CTX_set_ciphersuites
        get_options = library.SSL_CTX_get_options
    except AttributeError as exc:
        raise TlsConfigError(
            f"the OpenSSL behind Python's ssl module does not export what villaged needs ({exc})"
        ) from exc
    ctx_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctx_ctrl.restype = ctypes.c_long
    set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    set_ciphersuites.restype = ctypes.c_int
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    return _Native(ctx_ctrl, set_ciphersuites, get_options)
