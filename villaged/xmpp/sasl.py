"""Server side of SASL for client streams (RFC 6120 §6).

This module owns which mechanisms are offered, one authentication exchange at a time for
SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, RFC 7677) and PLAIN (RFC 4616, over TLS only), the
mapping of every problem to an RFC 6120 §6.5 failure condition, and hiding whether an account
exists. It does not own credential storage (a lookup callable supplies credentials), rate limiting,
or the XML elements around the payloads. It is sans-I/O: the server nonce and the secret behind
fake salts are passed in, never drawn here.

No ``-PLUS`` mechanism is ever offered: Python's ``ssl`` has no TLS exporter, so there is no
channel binding to offer.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

from villaged.xmpp.jid import JID, JIDError, prepare_domainpart, prepare_localpart
from villaged.xmpp.scram import (
    DEFAULT_ITERATIONS,
    MAX_PASSWORD_BYTES,
    MECHANISMS,
    MIN_ITERATIONS,
    ScramCredential,
    password_matches,
)

# Theory of operation
#
# The stream layer makes one SaslServer per <auth/> element. It turns each <auth/> or <response/>
# payload into bytes with decode_sasl_payload (None when the element was empty), feeds them to
# step(), and sends back what step() returns: SaslChallenge → <challenge/>, SaslSuccess →
# <success/> carrying `additional_data`, SaslFailure → <failure/>. <abort/> maps to abort().
#
#   phase                 input          SCRAM                                PLAIN
#   INITIAL               None           empty challenge → EXPECT_FIRST       (same)
#   INITIAL/EXPECT_FIRST  message        server-first → _ExpectClientFinal    success/failure → DONE
#   EXPECT_FIRST          None           failure → DONE                       (same)
#   _ExpectClientFinal    client-final   success (v=ServerSignature)/failure → DONE
#   any but DONE         abort()           failure(aborted) → DONE
#   DONE                 anything          failure, stays DONE
#
# A mechanism that is not offered (or PLAIN without TLS) fails at the first step. Every remote
# problem inside a step is raised as SaslError and turned into a SaslFailure there, so a step
# always answers and an exchange that failed can only be finished.
#
# An unknown user goes through exactly the same steps and checks as a known one with a wrong
# password: SCRAM answers with a salt derived from the username under a server secret (stable,
# like a real account's) and the iteration count real accounts get, and PLAIN runs the same
# password hashing against a fake credential. Both end in the same not-authorized failure.

SASL_FAILURES: Final = frozenset(
    {
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    }
)

MAX_PAYLOAD_CHARS: Final = 8192  # base64 text of one <auth/> or <response/>
MAX_CLIENT_FIRST_BYTES: Final = 1024
MAX_CLIENT_FINAL_BYTES: Final = 2048  # c= (≤ 4/3 of a client-first) + r= + p= fit easily
MAX_CLIENT_NONCE_CHARS: Final = 256
MIN_SERVER_NONCE_CHARS: Final = 16
MAX_SERVER_NONCE_CHARS: Final = 256
MAX_USERNAME_BYTES: Final = 1023  # a localpart's bound (RFC 7622)
MAX_PLAIN_BYTES: Final = 4096  # authzid (a bare JID) + authcid + password + two NULs
MIN_UNKNOWN_USER_SECRET_BYTES: Final = 16
# Real accounts get 16 random salt bytes per mechanism (villaged.storage); fake ones look alike.
FAKE_SALT_BYTES: Final = 16

# Attribute names RFC 5802 gives a meaning; an extension may not reuse one.
_CORE_ATTRIBUTES: Final = frozenset("aceimnprsv")
_SASLNAME: Final = re.compile(r"(?:[^=,]|=2C|=3D)+")
_XML_WHITESPACE: Final = str.maketrans("", "", " \t\r\n")
_PLAIN_CREDENTIAL_ORDER: Final = ("SCRAM-SHA-256", "SCRAM-SHA-1")


CredentialLookup: TypeAlias = Callable[[str], Mapping[str, ScramCredential] | None]
"""Prepared username (localpart) → its credentials by mechanism name, or None if no such user."""


@dataclass(frozen=True, slots=True)
class SaslResult:
    """What one step of an exchange answers; the stream layer sends it as the matching element."""


@dataclass(frozen=True, slots=True)
class SaslChallenge(SaslResult):
    """Send as <challenge/>: ``data`` base64-encoded (empty data as "=")."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SaslSuccess(SaslResult):
    """Send as <success/>: the client is ``username`` (a prepared localpart) from now on."""

    username: str
    additional_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class SaslFailure(SaslResult):
    """Send as <failure/> with ``condition``; ``text`` says why, for logs (never a secret)."""

    condition: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.condition not in SASL_FAILURES:
            raise ValueError(f"not an RFC 6120 SASL failure condition: {self.condition!r}")


SaslStep: TypeAlias = SaslChallenge | SaslSuccess | SaslFailure
_Ending = TypeVar("_Ending", SaslSuccess, SaslFailure)


class SaslError(Exception):
    """The exchange must fail with ``failure``; it is the client's fault."""

    def __init__(self, condition: str, text: str = "") -> None:
        self.failure = SaslFailure(condition, text)
        super().__init__(f"{condition}: {text}" if text else condition)


def offered_mechanisms(*, tls_active: bool) -> list[str]:
    """Mechanisms for <mechanisms/>, strongest first; PLAIN only once the stream is encrypted."""
    return [*MECHANISMS, "PLAIN"] if tls_active else [*MECHANISMS]


def decode_sasl_payload(text: str) -> bytes | None:
    """The data in an <auth/> or <response/> element: None if it has none, b"" for "=".

    XML whitespace is ignored (some clients wrap or indent the text); anything else that is not
    strict base64 raises SaslError(incorrect-encoding).
    """
    if len(text) > MAX_PAYLOAD_CHARS:
        raise SaslError(
            "malformed-request", f"payload is longer than {MAX_PAYLOAD_CHARS} characters"
        )
    compact = text.translate(_XML_WHITESPACE)
    if not compact:
        return None
    if compact == "=":
        return b""
    try:
        return base64.b64decode(compact, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise SaslError("incorrect-encoding", "payload is not valid base64") from exc


def server_nonce_from_entropy(entropy: bytes) -> str:
    """The printable server nonce part for SaslServer, from at least 16 random bytes."""
    if len(entropy) < 16:
        raise ValueError("a server nonce needs at least 16 random bytes")
    return base64.b64encode(entropy).decode().rstrip("=")


class _Phase(enum.Enum):
    INITIAL = "initial"  # nothing received; an absent initial response earns an empty challenge
    EXPECT_FIRST = "expect-first"  # the empty challenge went out; the first message is due
    DONE = "done"


@dataclass(frozen=True, slots=True)
class _ExpectClientFinal:
    """SCRAM after server-first: everything the client-final message is checked against."""

    username: str
    known_user: bool
    credential: ScramCredential
    client_first_bare: str
    server_first: str
    channel_binding: str  # base64 of the GS2 header, as client-final must repeat it
    nonce: str


class SaslServer:
    """One SASL exchange on the receiving side of a client stream."""

    def __init__(
        self,
        mechanism: str,
        *,
        lookup: CredentialLookup,
        domain: str,
        tls_active: bool,
        server_nonce: str,
        unknown_user_secret: bytes,
        unknown_user_iterations: int = DEFAULT_ITERATIONS,
    ) -> None:
        """``mechanism`` is the client's choice, unchecked. ``domain`` is the stream's domain
        (authzids must be ``username@domain``). ``server_nonce`` is this exchange's fresh,
        printable part of the SCRAM nonce (see server_nonce_from_entropy). ``unknown_user_secret``
        keys the fake salts for unknown users: keep it stable, or an unknown user's salt changes
        when a real one would not. ``unknown_user_iterations`` must be what real accounts use.
        """
        _check_server_nonce(server_nonce)
        if len(unknown_user_secret) < MIN_UNKNOWN_USER_SECRET_BYTES:
            raise ValueError(
                f"unknown_user_secret needs at least {MIN_UNKNOWN_USER_SECRET_BYTES} bytes"
            )
        if unknown_user_iterations < MIN_ITERATIONS:
            raise ValueError(f"unknown_user_iterations must be at least {MIN_ITERATIONS}")
        self.mechanism = mechanism
        self._lookup = lookup
        self._domain = prepare_domainpart(domain)
        self._server_nonce = server_nonce
        self._unknown_user_secret = unknown_user_secret
        self._unknown_user_iterations = unknown_user_iterations
        self._refusal = _refusal(mechanism, tls_active=tls_active)
        self._phase: _Phase | _ExpectClientFinal = _Phase.INITIAL
        self._username: str | None = None

    @property
    def username(self) -> str | None:
        """The prepared username the client claims, once a message named it (for rate limits
        and logs; it is authenticated only if the exchange ends in SaslSuccess)."""
        return self._username

    @property
    def finished(self) -> bool:
        return self._phase is _Phase.DONE

    def step(self, response: bytes | None) -> SaslStep:
        """Feed the client's decoded data (None if its element had none) and get the answer."""
        if self._phase is _Phase.DONE:
            return SaslFailure("malformed-request", "the SASL exchange is already finished")
        if self._refusal is not None:
            return self._finish(self._refusal)
        try:
            if isinstance(self._phase, _ExpectClientFinal):
                return self._finish(self._scram_client_final(self._phase, response))
            if response is None:
                if self._phase is _Phase.INITIAL:
                    self._phase = _Phase.EXPECT_FIRST
                    return SaslChallenge(b"")
                raise SaslError("malformed-request", "the response after the challenge is empty")
            if self.mechanism == "PLAIN":
                return self._finish(self._plain(response))
            self._phase = self._scram_client_first(response)
            return SaslChallenge(self._phase.server_first.encode())
        except SaslError as exc:
            return self._finish(exc.failure)

    def abort(self) -> SaslFailure:
        """The client sent <abort/>."""
        return self._finish(SaslFailure("aborted", "the client aborted the exchange"))

    def _finish(self, result: _Ending) -> _Ending:
        self._phase = _Phase.DONE
        return result

    # SCRAM (RFC 5802 §5, §7)

    def _scram_client_first(self, message: bytes) -> _ExpectClientFinal:
        text = _utf8(message, MAX_CLIENT_FIRST_BYTES, "client-first message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise SaslError("malformed-request", "client-first message has no GS2 header")
        flag, authzid_field, bare = parts
        if flag.startswith("p="):
            # Only -PLUS mechanisms may bind, and none is offered.
            raise SaslError("malformed-request", "the client requires channel binding")
        if flag not in ("n", "y"):  # "y": the client could bind but sees no -PLUS; true.
            raise SaslError("malformed-request", "GS2 channel binding flag is not n, y or p=")
        authzid = None
        if authzid_field:
            if not authzid_field.startswith("a="):
                raise SaslError("malformed-request", "GS2 header has no a= authzid")
            authzid = _decode_saslname(authzid_field[2:], "authzid")
        attributes = _attributes(bare, "client-first message")
        if attributes[0][0] == "m":
            raise SaslError("malformed-request", "mandatory SCRAM extensions are not supported")
        _check_layout(attributes, ("n", "r"), (), "client-first message")
        username = self._prepare_username(_decode_saslname(attributes[0][1], "username"))
        client_nonce = attributes[1][1]
        if len(client_nonce) > MAX_CLIENT_NONCE_CHARS:
            raise SaslError(
                "malformed-request", f"client nonce is longer than {MAX_CLIENT_NONCE_CHARS}"
            )
        if not _printable(client_nonce):
            raise SaslError("malformed-request", "client nonce has a character not printable")
        if authzid is not None:
            self._check_authzid(authzid, username)

        credentials = self._lookup(username)
        credential = credentials.get(self.mechanism) if credentials is not None else None
        known_user = credential is not None
        if credential is None:
            credential = self._fake_credential(self.mechanism, username)
        nonce = client_nonce + self._server_nonce
        salt = base64.b64encode(credential.salt).decode()
        gs2_header = text[: len(text) - len(bare)]
        return _ExpectClientFinal(
            username=username,
            known_user=known_user,
            credential=credential,
            client_first_bare=bare,
            server_first=f"r={nonce},s={salt},i={credential.iterations}",
            channel_binding=base64.b64encode(gs2_header.encode()).decode(),
            nonce=nonce,
        )

    def _scram_client_final(
        self, expected: _ExpectClientFinal, message: bytes | None
    ) -> SaslSuccess:
        if message is None:
            raise SaslError("malformed-request", "the client-final message is empty")
        text = _utf8(message, MAX_CLIENT_FINAL_BYTES, "client-final message")
        attributes = _attributes(text, "client-final message")
        _check_layout(attributes, ("c", "r"), ("p",), "client-final message")
        channel_binding, nonce, proof_text = attributes[0][1], attributes[1][1], attributes[-1][1]
        digest = MECHANISMS[self.mechanism]
        try:
            proof = base64.b64decode(proof_text, validate=True)
        except ValueError as exc:
            raise SaslError("malformed-request", "client proof is not valid base64") from exc
        if len(proof) != hashlib.new(digest).digest_size:
            raise SaslError("malformed-request", "client proof has the wrong length")
        if channel_binding != expected.channel_binding:
            raise SaslError("not-authorized", "channel binding data does not repeat the GS2 header")
        if nonce != expected.nonce:
            raise SaslError("not-authorized", "client-final nonce does not match")

        without_proof = text[: len(text) - len(",p=") - len(proof_text)]
        auth_message = f"{expected.client_first_bare},{expected.server_first},{without_proof}"
        credential = expected.credential
        client_signature = hmac.digest(credential.stored_key, auth_message.encode(), digest)
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        proof_matches = hmac.compare_digest(
            hashlib.new(digest, client_key).digest(), credential.stored_key
        )
        if not (proof_matches and expected.known_user):
            raise _not_authorized(expected.username)
        server_signature = hmac.digest(credential.server_key, auth_message.encode(), digest)
        return SaslSuccess(expected.username, b"v=" + base64.b64encode(server_signature))

    # PLAIN (RFC 4616)

    def _plain(self, message: bytes) -> SaslSuccess:
        if len(message) > MAX_PLAIN_BYTES:
            raise SaslError("malformed-request", f"PLAIN message is longer than {MAX_PLAIN_BYTES}")
        parts = message.split(b"\0")
        if len(parts) != 3:
            raise SaslError("malformed-request", "PLAIN message is not authzid NUL authcid NUL pw")
        if not parts[1] or not parts[2]:
            raise SaslError("malformed-request", "PLAIN authcid or password is empty")
        if len(parts[2]) > MAX_PASSWORD_BYTES:
            raise SaslError("malformed-request", f"password is longer than {MAX_PASSWORD_BYTES}")
        try:
            authzid, authcid, password = (part.decode() for part in parts)
        except UnicodeDecodeError as exc:
            raise SaslError("malformed-request", "PLAIN message is not UTF-8") from exc
        username = self._prepare_username(authcid)
        if authzid:
            self._check_authzid(authzid, username)

        credentials = self._lookup(username) or {}
        credential = next(
            (credentials[m] for m in _PLAIN_CREDENTIAL_ORDER if m in credentials), None
        )
        known_user = credential is not None
        if credential is None:
            # Hash the offered password all the same, so timing does not tell.
            credential = self._fake_credential(_PLAIN_CREDENTIAL_ORDER[0], username)
        if not (password_matches(credential, password) and known_user):
            raise _not_authorized(username)
        return SaslSuccess(username)

    # Shared checks

    def _prepare_username(self, raw: str) -> str:
        if len(raw.encode()) > MAX_USERNAME_BYTES:
            raise SaslError("malformed-request", f"username is longer than {MAX_USERNAME_BYTES}")
        try:
            username = prepare_localpart(raw)
        except JIDError as exc:
            raise SaslError("not-authorized", f"username cannot be a localpart: {exc}") from exc
        self._username = username
        return username

    def _check_authzid(self, authzid: str, username: str) -> None:
        """Nobody may act for anybody else: an authzid must be the user's own bare JID."""
        try:
            claimed = JID.parse(authzid)
        except JIDError as exc:
            raise SaslError("invalid-authzid", f"authzid is not a JID: {exc}") from exc
        if claimed != JID(username, self._domain):
            raise SaslError("invalid-authzid", f"{username!r} may not act as {str(claimed)!r}")

    def _fake_credential(self, mechanism: str, username: str) -> ScramCredential:
        """A stand-in credential for a user without one, stable per (mechanism, username)."""

        def derive(label: str) -> bytes:
            data = f"{label}\0{mechanism}\0{username}".encode()
            return hmac.digest(self._unknown_user_secret, data, "sha256")

        key_size = hashlib.new(MECHANISMS[mechanism]).digest_size
        return ScramCredential(
            mechanism=mechanism,
            salt=derive("salt")[:FAKE_SALT_BYTES],
            iterations=self._unknown_user_iterations,
            stored_key=derive("stored-key")[:key_size],
            server_key=derive("server-key")[:key_size],
        )


def _refusal(mechanism: str, *, tls_active: bool) -> SaslFailure | None:
    if mechanism in MECHANISMS:
        return None
    if mechanism == "PLAIN":
        if tls_active:
            return None
        return SaslFailure("encryption-required", "PLAIN is offered only over TLS")
    return SaslFailure("invalid-mechanism", f"mechanism {mechanism[:32]!r} is not offered")


def _not_authorized(username: str) -> SaslError:
    # The same words whether the user is unknown or the password wrong.
    return SaslError("not-authorized", f"authentication as {username!r} failed")


def _utf8(message: bytes, limit: int, what: str) -> str:
    if len(message) > limit:
        raise SaslError("malformed-request", f"{what} is longer than {limit} bytes")
    try:
        text = message.decode()
    except UnicodeDecodeError as exc:
        raise SaslError("malformed-request", f"{what} is not UTF-8") from exc
    if "\0" in text:
        raise SaslError("malformed-request", f"{what} contains NUL")
    return text


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split ``a=value,b=value`` (RFC 5802 §7 attr-val); every value is at least one character."""
    attributes = []
    for item in text.split(","):
        name, equals, value = item[:1], item[1:2], item[2:]
        if not (name.isascii() and name.isalpha() and equals == "=" and value):
            raise SaslError("malformed-request", f"{what} has a malformed attribute")
        attributes.append((name, value))
    return attributes


def _check_layout(
    attributes: list[tuple[str, str]],
    leading: tuple[str, ...],
    trailing: tuple[str, ...],
    what: str,
) -> None:
    """Exactly ``leading``, then optional extensions (each once, none reusing a core name),
    then exactly ``trailing``."""
    names = [name for name, _ in attributes]
    end = len(names) - len(trailing)
    if end < len(leading) or names[: len(leading)] != [*leading] or names[end:] != [*trailing]:
        layout = ",".join(f"{name}=" for name in (*leading, "…", *trailing))
        raise SaslError("malformed-request", f"{what} is not laid out as {layout}")
    extensions = names[len(leading) : end]
    if len(set(extensions)) != len(extensions) or _CORE_ATTRIBUTES.intersection(extensions):
        raise SaslError("malformed-request", f"{what} has a repeated or misplaced attribute")


def _decode_saslname(value: str, what: str) -> str:
    """Undo RFC 5802's escapes: "=2C" is ",", "=3D" is "=", any other "=" is an error."""
    if not _SASLNAME.fullmatch(value):
        raise SaslError("malformed-request", f"{what} has a bad '=' escape")
    # "=2C" first: once validated, every "=" starts an escape, so no replacement can create one.
    return value.replace("=2C", ",").replace("=3D", "=")


def _printable(text: str) -> bool:
    """RFC 5802 ``printable``: %x21-7E except ","."""
    return all("\x21" <= char <= "\x7e" and char != "," for char in text)


def _check_server_nonce(server_nonce: str) -> None:
    if not MIN_SERVER_NONCE_CHARS <= len(server_nonce) <= MAX_SERVER_NONCE_CHARS:
        raise ValueError(
            f"server_nonce must have {MIN_SERVER_NONCE_CHARS} to {MAX_SERVER_NONCE_CHARS} chars"
        )
    if not _printable(server_nonce):
        raise ValueError("server_nonce must be printable ASCII without ','")
