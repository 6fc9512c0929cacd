import base64
import hashlib
import hmac

import pytest

from villaged.xmpp.scram import (
    MECHANISMS,
    MIN_ITERATIONS,
    PasswordError,
    derive_credential,
    password_matches,
    prepare_password,
)


def _check_exchange(
    mechanism: str, salt_b64: str, auth_message: bytes, proof_b64: str, server_sig_b64: str
) -> None:
    """Recompute an RFC example exchange from the stored keys, exactly as a SCRAM server does."""
    digest = MECHANISMS[mechanism]
    cred = derive_credential(mechanism, "pencil", base64.b64decode(salt_b64), 4096)
    signature = hmac.digest(cred.stored_key, auth_message, digest)
    proof = base64.b64decode(proof_b64)
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    assert hashlib.new(digest, client_key).digest() == cred.stored_key
    server_sig = hmac.digest(cred.server_key, auth_message, digest)
    assert base64.b64encode(server_sig).decode() == server_sig_b64
    assert password_matches(cred, "pencil")
    assert not password_matches(cred, "pencil2")


def test_rfc5802_example_exchange() -> None:
    _check_exchange(
        "SCRAM-SHA-1",
        "QSXCR+Q6sek8bf92",
        b"n=user,r=fyko+d2lbbFgONRv9qkxdawL,"
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096,"
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
        "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    )


def test_rfc7677_example_exchange() -> None:
    nonce = b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    _check_exchange(
        "SCRAM-SHA-256",
        "W22ZaJ0SNY7soEsUEjb6gQ==",
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=" + nonce + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        b"c=biws,r=" + nonce,
        "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    )


def test_password_is_precis_prepared() -> None:
    salt = b"s" * 16
    # OpaqueString maps non-ASCII spaces to ASCII space before hashing.
    a = derive_credential("SCRAM-SHA-256", "pass\u00a0word", salt, MIN_ITERATIONS)
    b = derive_credential("SCRAM-SHA-256", "pass word", salt, MIN_ITERATIONS)
    assert a.stored_key == b.stored_key
    assert prepare_password("x") == "x"


@pytest.mark.parametrize(
    ("password", "fragment"),
    [("", "empty"), ("bad\u0007", "not allowed"), ("x" * 1025, "longer than")],
)
def test_bad_passwords(password: str, fragment: str) -> None:
    with pytest.raises(PasswordError, match=fragment):
        prepare_password(password)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="unknown SCRAM"):
        derive_credential("SCRAM-MD5", "x", b"s" * 16)
    with pytest.raises(ValueError, match="iterations"):
        derive_credential("SCRAM-SHA-1", "x", b"s" * 16, 100)
    with pytest.raises(ValueError, match="salt"):
        derive_credential("SCRAM-SHA-1", "x", b"s", 4096)


def test_repr_hides_keys() -> None:
    cred = derive_credential("SCRAM-SHA-1", "pencil", b"s" * 16, 4096)
    assert cred.stored_key.hex() not in repr(cred)
    assert not password_matches(cred, "")
