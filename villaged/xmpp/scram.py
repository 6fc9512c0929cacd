"""SCRAM credentials (RFC 5802, RFC 7677): what an account stores instead of a password.

Only the salted keys are ever stored: (salt, iterations, StoredKey, ServerKey) per mechanism.
Passwords are prepared with the PRECIS OpaqueString profile (RFC 8265) before hashing, so the same
password typed on different clients hashes the same. The salt is passed in: this module is
sans-I/O and never draws randomness itself.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from precis_i18n import get_profile

MIN_ITERATIONS: Final = 4096
DEFAULT_ITERATIONS: Final = 10_000
MAX_PASSWORD_BYTES: Final = 1024
# Mechanism name → hashlib name. No -PLUS variants: Python's ssl has no TLS exporter.
MECHANISMS: Final = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}

_OPAQUE = get_profile("OpaqueString")


class PasswordError(ValueError):
    """The password cannot be used (empty, too long, or disallowed characters)."""


@dataclass(frozen=True, slots=True)
class ScramCredential:
    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        # Salted keys are password-equivalent for offline guessing: keep them out of logs.
        return f"ScramCredential({self.mechanism}, iterations={self.iterations})"


def prepare_password(password: str) -> str:
    if not password:
        raise PasswordError("the password is empty")
    try:
        prepared = _OPAQUE.enforce(password)
    except UnicodeError as exc:
        reason = getattr(exc, "reason", "disallowed character")
        raise PasswordError(f"the password contains a character not allowed ({reason})") from exc
    if len(prepared.encode()) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    return prepared


def derive_credential(
    mechanism: str, password: str, salt: bytes, iterations: int = DEFAULT_ITERATIONS
) -> ScramCredential:
    """SaltedPassword = Hi(password, salt, i); StoredKey = H(HMAC(SP, "Client Key"));
    ServerKey = HMAC(SP, "Server Key")."""
    digest = MECHANISMS.get(mechanism)
    if digest is None:
        raise ValueError(f"unknown SCRAM mechanism {mechanism!r}")
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"SCRAM iterations must be at least {MIN_ITERATIONS}")
    if len(salt) < 12:  # RFC 5802's own example uses 12 bytes; villaged generates 16
        raise ValueError("SCRAM salt must be at least 12 bytes")
    prepared = prepare_password(password).encode()
    salted = hashlib.pbkdf2_hmac(digest, prepared, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", digest)
    return ScramCredential(
        mechanism=mechanism,
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.new(digest, client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", digest),
    )


def password_matches(credential: ScramCredential, password: str) -> bool:
    """For PLAIN over TLS: recompute keys from the offered password; compare in constant time."""
    try:
        offered = derive_credential(
            credential.mechanism, password, credential.salt, credential.iterations
        )
    except PasswordError:
        return False
    return hmac.compare_digest(offered.stored_key, credential.stored_key)
