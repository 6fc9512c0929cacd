import base64
import re
from collections.abc import Mapping

import pytest

from tests.xmpp.scram_client import ScramClient
from villaged.xmpp.sasl import (
    FAKE_SALT_BYTES,
    MAX_CLIENT_FINAL_BYTES,
    MAX_CLIENT_FIRST_BYTES,
    MAX_PAYLOAD_CHARS,
    SASL_FAILURES,
    SaslChallenge,
    SaslError,
    SaslFailure,
    SaslServer,
    SaslSuccess,
    decode_sasl_payload,
    offered_mechanisms,
    server_nonce_from_entropy,
)
from villaged.xmpp.scram import (
    DEFAULT_ITERATIONS,
    MIN_ITERATIONS,
    ScramCredential,
    derive_credential,
)

DOMAIN = "example.org"
SECRET = b"unknown-user-secret-for-tests-01"
SERVER_NONCE = "sErVeRnOnCe+0123456789/"
PASSWORD = "pässw,=rd ✓"
SCRAMS = ("SCRAM-SHA-256", "SCRAM-SHA-1")
Accounts = Mapping[str, Mapping[str, ScramCredential]]


def _accounts(
    username: str, password: str = PASSWORD, *, mechanisms: tuple[str, ...] = SCRAMS
) -> Accounts:
    return {
        username: {
            m: derive_credential(
                m, password, f"salt-{m}-{username}".encode()[:16].ljust(16, b"."), MIN_ITERATIONS
            )
            for m in mechanisms
        }
    }


def _server(
    mechanism: str,
    accounts: Accounts,
    *,
    tls_active: bool = True,
    server_nonce: str = SERVER_NONCE,
    secret: bytes = SECRET,
) -> SaslServer:
    return SaslServer(
        mechanism,
        lookup=accounts.get,
        domain=DOMAIN,
        tls_active=tls_active,
        server_nonce=server_nonce,
        unknown_user_secret=secret,
    )


def _run_scram(
    server: SaslServer, client: ScramClient
) -> SaslChallenge | SaslSuccess | SaslFailure:
    challenge = server.step(client.client_first())
    assert isinstance(challenge, SaslChallenge)
    return server.step(client.client_final(challenge.data))


def _server_first(mechanism: str, accounts: Accounts, client_first: bytes) -> bytes:
    challenge = _server(mechanism, accounts).step(client_first)
    assert isinstance(challenge, SaslChallenge)
    return challenge.data


def _failure(result: object, condition: str) -> SaslFailure:
    assert isinstance(result, SaslFailure), result
    assert result.condition == condition, result
    return result


# RFC example exchanges, byte for byte


@pytest.mark.parametrize(
    ("mechanism", "salt", "client_nonce", "server_nonce", "proof", "verifier"),
    [
        (  # RFC 5802 §5
            "SCRAM-SHA-1",
            "QSXCR+Q6sek8bf92",
            "fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        ),
        (  # RFC 7677 §3
            "SCRAM-SHA-256",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            "rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        ),
    ],
)
def test_rfc_example_exchange(
    mechanism: str, salt: str, client_nonce: str, server_nonce: str, proof: str, verifier: str
) -> None:
    credential = derive_credential(mechanism, "pencil", base64.b64decode(salt), 4096)
    server = _server(mechanism, {"user": {mechanism: credential}}, server_nonce=server_nonce)
    nonce = client_nonce + server_nonce

    server_first = server.step(f"n,,n=user,r={client_nonce}".encode())
    assert server_first == SaslChallenge(f"r={nonce},s={salt},i=4096".encode())
    assert server.username == "user"
    assert not server.finished

    server_final = server.step(f"c=biws,r={nonce},p={proof}".encode())
    assert server_final == SaslSuccess("user", f"v={verifier}".encode())
    assert server.finished


# Round trips with the independent client


@pytest.mark.parametrize("mechanism", SCRAMS)
def test_round_trip_with_non_ascii_password(mechanism: str) -> None:
    client = ScramClient(mechanism, "juliet", PASSWORD)
    server = _server(mechanism, _accounts("juliet"))
    result = _run_scram(server, client)
    assert isinstance(result, SaslSuccess)
    assert result.username == "juliet"
    assert client.server_final_is_genuine(result.additional_data)


@pytest.mark.parametrize("mechanism", SCRAMS)
def test_round_trip_without_initial_response(mechanism: str) -> None:
    server = _server(mechanism, _accounts("juliet"))
    assert server.step(None) == SaslChallenge(b"")
    result = _run_scram(server, ScramClient(mechanism, "juliet", PASSWORD))
    assert isinstance(result, SaslSuccess)


def test_username_escapes_are_decoded() -> None:
    client = ScramClient("SCRAM-SHA-256", "a,b=c", PASSWORD)
    assert b"n=a=2Cb=3Dc," in client.client_first()
    result = _run_scram(_server("SCRAM-SHA-256", _accounts("a,b=c")), client)
    assert isinstance(result, SaslSuccess)
    assert result.username == "a,b=c"


def test_escape_that_looks_like_an_escape_after_decoding() -> None:
    # "=3D2C" is "=" then "2C", not ",".
    server = _server("SCRAM-SHA-256", {})
    assert isinstance(server.step(b"n,,n=x=3D2C,r=abc"), SaslChallenge)
    assert server.username == "x=2c"


def test_username_is_case_mapped() -> None:
    client = ScramClient("SCRAM-SHA-256", "Juliet", PASSWORD)
    result = _run_scram(_server("SCRAM-SHA-256", _accounts("juliet")), client)
    assert isinstance(result, SaslSuccess)
    assert result.username == "juliet"


def test_unknown_optional_extensions_are_ignored() -> None:
    server = _server("SCRAM-SHA-256", _accounts("juliet"))
    challenge = server.step(b"n,,n=juliet,r=abcdef,x=first-extension")
    assert isinstance(challenge, SaslChallenge)
    client = ScramClient("SCRAM-SHA-256", "juliet", PASSWORD, "abcdef", final_extension=",x=y")
    client.first_bare = "n=juliet,r=abcdef,x=first-extension"
    result = server.step(client.client_final(challenge.data))
    assert isinstance(result, SaslSuccess)
    assert client.server_final_is_genuine(result.additional_data)


def test_gs2_y_flag_is_accepted_since_no_plus_is_offered() -> None:
    client = ScramClient("SCRAM-SHA-1", "juliet", PASSWORD, gs2_header="y,,")
    result = _run_scram(_server("SCRAM-SHA-1", _accounts("juliet")), client)
    assert isinstance(result, SaslSuccess)


@pytest.mark.parametrize(
    "authzid", ["juliet@example.org", "Juliet@Example.ORG", "juliet@example.org."]
)
def test_authzid_equal_to_own_bare_jid_is_accepted(authzid: str) -> None:
    client = ScramClient("SCRAM-SHA-256", "juliet", PASSWORD, gs2_header=f"n,a={authzid},")
    result = _run_scram(_server("SCRAM-SHA-256", _accounts("juliet")), client)
    assert isinstance(result, SaslSuccess)
    assert result.username == "juliet"


# Wrong passwords and unknown users


@pytest.mark.parametrize("mechanism", SCRAMS)
def test_wrong_password_is_not_authorized(mechanism: str) -> None:
    client = ScramClient(mechanism, "juliet", "wrong password")
    server = _server(mechanism, _accounts("juliet"))
    challenge = server.step(client.client_first())
    assert isinstance(challenge, SaslChallenge)
    client_final = client.client_final(challenge.data)
    failure = _failure(server.step(client_final), "not-authorized")
    proof = client_final.decode().rsplit("p=", 1)[1]
    assert "wrong password" not in failure.text
    assert proof not in failure.text
    assert "juliet" in failure.text
    assert server.finished


def _shape(server_first: bytes) -> tuple[str, int, int]:
    match = re.fullmatch(rb"r=([\x21-\x2b\x2d-\x7e]+),s=([A-Za-z0-9+/=]+),i=([0-9]+)", server_first)
    assert match is not None, server_first
    return match[1].decode(), len(base64.b64decode(match[2])), int(match[3])


@pytest.mark.parametrize("mechanism", SCRAMS)
def test_unknown_user_looks_like_a_wrong_password(mechanism: str) -> None:
    known = _accounts("juliet")["juliet"]
    real = {
        "juliet": {
            m: derive_credential(m, PASSWORD, c.salt, DEFAULT_ITERATIONS) for m, c in known.items()
        }
    }
    client_first = b"n,,n=romeo,r=abcdef"
    fake_first = _server_first(mechanism, real, client_first)
    real_first = _server_first(mechanism, real, b"n,,n=juliet,r=abcdef")
    assert _shape(fake_first) == ("abcdef" + SERVER_NONCE, FAKE_SALT_BYTES, DEFAULT_ITERATIONS)
    assert _shape(real_first) == _shape(fake_first)

    wrong_for_known = ScramClient(mechanism, "juliet", "guess", "abcdef")
    known_failure = _run_scram(_server(mechanism, real), wrong_for_known)
    unknown_failure = _run_scram(
        _server(mechanism, real), ScramClient(mechanism, "romeo", "guess", "abcdef")
    )
    _failure(known_failure, "not-authorized")
    _failure(unknown_failure, "not-authorized")
    assert isinstance(known_failure, SaslFailure)
    assert isinstance(unknown_failure, SaslFailure)
    assert unknown_failure.text == known_failure.text.replace("juliet", "romeo")


def test_fake_salt_is_stable_per_user_and_mechanism() -> None:
    def salt(mechanism: str, username: str, secret: bytes = SECRET) -> bytes:
        server = _server(mechanism, {}, secret=secret)
        challenge = server.step(f"n,,n={username},r=abc".encode())
        assert isinstance(challenge, SaslChallenge)
        return base64.b64decode(challenge.data.split(b",s=")[1].split(b",")[0])

    assert salt("SCRAM-SHA-256", "romeo") == salt("SCRAM-SHA-256", "romeo")
    assert salt("SCRAM-SHA-256", "romeo") == salt("SCRAM-SHA-256", "Romeo")  # same prepared user
    assert salt("SCRAM-SHA-256", "romeo") != salt("SCRAM-SHA-256", "mercutio")
    assert salt("SCRAM-SHA-256", "romeo") != salt("SCRAM-SHA-1", "romeo")
    assert salt("SCRAM-SHA-256", "romeo") != salt("SCRAM-SHA-256", "romeo", b"another secret, 16+")


def test_user_without_a_credential_for_the_mechanism_is_treated_as_unknown() -> None:
    accounts = _accounts("juliet", mechanisms=("SCRAM-SHA-256",))
    client = ScramClient("SCRAM-SHA-1", "juliet", PASSWORD)
    server = _server("SCRAM-SHA-1", accounts)
    challenge = server.step(client.client_first())
    assert isinstance(challenge, SaslChallenge)
    assert _shape(challenge.data)[1:] == (FAKE_SALT_BYTES, DEFAULT_ITERATIONS)
    _failure(server.step(client.client_final(challenge.data)), "not-authorized")


# Tampering with the client-final message


def _client_final_fields(mechanism: str = "SCRAM-SHA-256") -> tuple[SaslServer, dict[str, str]]:
    server = _server(mechanism, _accounts("juliet"))
    client = ScramClient(mechanism, "juliet", PASSWORD)
    challenge = server.step(client.client_first())
    assert isinstance(challenge, SaslChallenge)
    final = client.client_final(challenge.data).decode()
    return server, dict(item.split("=", 1) for item in final.split(","))


def test_tampered_nonce_is_not_authorized() -> None:
    server, fields = _client_final_fields()
    message = f"c={fields['c']},r={fields['r']}X,p={fields['p']}"
    failure = _failure(server.step(message.encode()), "not-authorized")
    assert "nonce" in failure.text


@pytest.mark.parametrize("binding", ["eSws", "biwx"])
def test_tampered_channel_binding_is_not_authorized(binding: str) -> None:
    server, fields = _client_final_fields()
    message = f"c={binding},r={fields['r']},p={fields['p']}"
    failure = _failure(server.step(message.encode()), "not-authorized")
    assert "channel binding" in failure.text


def test_tampered_proof_is_not_authorized() -> None:
    server, fields = _client_final_fields()
    proof = bytearray(base64.b64decode(fields["p"]))
    proof[0] ^= 1
    message = f"c={fields['c']},r={fields['r']},p={base64.b64encode(proof).decode()}"
    _failure(server.step(message.encode()), "not-authorized")


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("r={r},c={c},p={p}", "laid out"),
        ("c={c},r={r}", "laid out"),
        ("c={c},p={p}", "laid out"),
        ("c={c},r={r},p={p},x=late", "laid out"),
        ("c={c},r={r},x=1,x=2,p={p}", "repeated"),
        ("c={c},r={r},r={r},p={p}", "repeated"),
        ("c={c},r={r},p=!!!!", "base64"),
        ("c={c},r={r},p=AAAA", "wrong length"),
        ("c={c},r={r},,p={p}", "malformed attribute"),
        ("c={c},r={r},p={p}\x00", "NUL"),
        ("c={c},r={r},p={p},x=" + "y" * MAX_CLIENT_FINAL_BYTES, "longer than"),
    ],
)
def test_malformed_client_final(template: str, fragment: str) -> None:
    server, fields = _client_final_fields()
    message = template.format(c=fields["c"], r=fields["r"], p=fields["p"])
    failure = _failure(server.step(message.encode()), "malformed-request")
    assert fragment in failure.text


def test_client_final_that_is_not_utf8() -> None:
    server, _ = _client_final_fields()
    _failure(server.step(b"c=biws,r=\xff,p=AAAA"), "malformed-request")


def test_empty_client_final() -> None:
    server, _ = _client_final_fields()
    _failure(server.step(None), "malformed-request")


# Malformed or refused client-first messages


@pytest.mark.parametrize(
    ("message", "condition", "fragment"),
    [
        (b"", "malformed-request", "GS2 header"),
        (b"n,,", "malformed-request", "malformed attribute"),
        (b"n,n=juliet,r=abc", "malformed-request", "GS2 header"),
        (b"p=tls-unique,,n=juliet,r=abc", "malformed-request", "channel binding"),
        (b"x,,n=juliet,r=abc", "malformed-request", "flag"),
        (b"n,b=juliet,n=juliet,r=abc", "malformed-request", "a= authzid"),
        (b"n,a=,n=juliet,r=abc", "malformed-request", "authzid has a bad"),
        (b"n,a=juliet=40example.org,n=juliet,r=abc", "malformed-request", "authzid has a bad"),
        (b"n,,r=abc,n=juliet", "malformed-request", "laid out"),
        (b"n,,n=juliet", "malformed-request", "laid out"),
        (b"n,,n=juliet,r=abc,n=again", "malformed-request", "repeated"),
        (b"n,,n=juliet,r=abc,x=1,x=2", "malformed-request", "repeated"),
        (b"n,,n=juliet,r=abc,m=late", "malformed-request", "repeated"),
        (b"n,,n=juliet,r=abc,x", "malformed-request", "malformed attribute"),
        (b"n,,n=juliet,r=abc,1=x", "malformed-request", "malformed attribute"),
        (b"n,,n=juliet,r=", "malformed-request", "malformed attribute"),
        (b"n,,n=ju=41liet,r=abc", "malformed-request", "username has a bad"),
        (b"n,,n=ju=2cliet,r=abc", "malformed-request", "username has a bad"),
        (b"n,,m=ext,n=juliet,r=abc", "malformed-request", "mandatory"),
        (b"n,,n=juliet,r=ab\x7fc", "malformed-request", "printable"),
        (b"n,,n=juliet,r=ab c", "malformed-request", "printable"),
        (b"n,,n=juliet,r=" + b"x" * 257, "malformed-request", "nonce is longer"),
        (b"n,,n=\xffjuliet,r=abc", "malformed-request", "UTF-8"),
        (b"n,,n=jul\x00iet,r=abc", "malformed-request", "NUL"),
        (b"n,,n=juliet,r=abc,x=" + b"y" * MAX_CLIENT_FIRST_BYTES, "malformed-request", "longer"),
        (b"n,,n=jul iet,r=abc", "not-authorized", "localpart"),
        (b"n,,n=juliet@example.org,r=abc", "not-authorized", "localpart"),
        (b"n,a=romeo@example.org,n=juliet,r=abc", "invalid-authzid", "may not act"),
        (b"n,a=juliet@example.org/balcony,n=juliet,r=abc", "invalid-authzid", "may not act"),
        (b"n,a=juliet@example.com,n=juliet,r=abc", "invalid-authzid", "may not act"),
        (b"n,a=juliet@,n=juliet,r=abc", "invalid-authzid", "not a JID"),
    ],
)
def test_bad_client_first(message: bytes, condition: str, fragment: str) -> None:
    server = _server("SCRAM-SHA-256", _accounts("juliet"))
    failure = _failure(server.step(message), condition)
    assert fragment in failure.text
    assert server.finished
    _failure(server.step(b"n,,n=juliet,r=abc"), "malformed-request")


def test_empty_response_after_empty_challenge() -> None:
    server = _server("SCRAM-SHA-256", _accounts("juliet"))
    assert server.step(None) == SaslChallenge(b"")
    _failure(server.step(None), "malformed-request")


# PLAIN


def _plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return authzid + b"\0" + authcid + b"\0" + password


@pytest.mark.parametrize("mechanisms", [SCRAMS, ("SCRAM-SHA-1",)])
def test_plain_over_tls(mechanisms: tuple[str, ...]) -> None:
    server = _server("PLAIN", _accounts("juliet", mechanisms=mechanisms))
    result = server.step(_plain(b"", b"Juliet", PASSWORD.encode()))
    assert result == SaslSuccess("juliet")
    assert server.finished


def test_plain_without_initial_response_and_with_authzid() -> None:
    server = _server("PLAIN", _accounts("juliet"))
    assert server.step(None) == SaslChallenge(b"")
    result = server.step(_plain(b"juliet@example.org", b"juliet", PASSWORD.encode()))
    assert result == SaslSuccess("juliet")


def test_plain_without_tls_requires_encryption() -> None:
    server = _server("PLAIN", _accounts("juliet"), tls_active=False)
    _failure(server.step(_plain(b"", b"juliet", PASSWORD.encode())), "encryption-required")
    assert server.finished


@pytest.mark.parametrize(
    ("message", "condition", "fragment"),
    [
        (_plain(b"", b"juliet", b"wrong"), "not-authorized", "authentication as 'juliet'"),
        (_plain(b"", b"romeo", PASSWORD.encode()), "not-authorized", "authentication as 'romeo'"),
        (_plain(b"", b"juliet", b"\x07bell"), "not-authorized", "authentication as"),
        (_plain(b"romeo@example.org", b"juliet", PASSWORD.encode()), "invalid-authzid", "act as"),
        (_plain(b"@@", b"juliet", PASSWORD.encode()), "invalid-authzid", "not a JID"),
        (b"juliet" + PASSWORD.encode(), "malformed-request", "NUL"),
        (b"\0juliet" + PASSWORD.encode(), "malformed-request", "NUL"),
        (_plain(b"", b"juliet", PASSWORD.encode()) + b"\0", "malformed-request", "NUL"),
        (_plain(b"", b"", PASSWORD.encode()), "malformed-request", "empty"),
        (_plain(b"", b"juliet", b""), "malformed-request", "empty"),
        (_plain(b"", b"jul\xffiet", PASSWORD.encode()), "malformed-request", "UTF-8"),
        (_plain(b"", b"juliet", b"p" * 1025), "malformed-request", "password is longer"),
        (_plain(b"", b"j" * 1024, b"pw"), "malformed-request", "username is longer"),
        (_plain(b"x" * 4096, b"juliet", b"pw"), "malformed-request", "PLAIN message is longer"),
        (_plain(b"", b"jul iet", b"pw"), "not-authorized", "localpart"),
    ],
)
def test_bad_plain(message: bytes, condition: str, fragment: str) -> None:
    server = _server("PLAIN", _accounts("juliet"))
    failure = _failure(server.step(message), condition)
    assert fragment in failure.text
    assert PASSWORD not in failure.text
    assert "wrong" not in failure.text


def test_plain_unknown_and_wrong_password_fail_alike() -> None:
    def text(message: bytes) -> str:
        return _failure(_server("PLAIN", _accounts("juliet")).step(message), "not-authorized").text

    assert text(_plain(b"", b"juliet", b"guess")) == text(_plain(b"", b"romeo", b"guess")).replace(
        "romeo", "juliet"
    )


# Mechanisms, abort, completion


def test_offered_mechanisms() -> None:
    assert offered_mechanisms(tls_active=False) == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert offered_mechanisms(tls_active=True) == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    assert not any(m.endswith("-PLUS") for m in offered_mechanisms(tls_active=True))


@pytest.mark.parametrize(
    "mechanism", ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "DIGEST-MD5", "scram-sha-256", ""]
)
def test_mechanism_not_offered(mechanism: str) -> None:
    server = _server(mechanism, _accounts("juliet"))
    failure = _failure(server.step(b"n,,n=juliet,r=abc"), "invalid-mechanism")
    assert "not offered" in failure.text
    assert server.finished
    assert server.username is None


def test_abort_mid_exchange() -> None:
    server = _server("SCRAM-SHA-256", _accounts("juliet"))
    assert isinstance(server.step(b"n,,n=juliet,r=abc"), SaslChallenge)
    assert server.abort().condition == "aborted"
    assert server.finished
    failure = _failure(server.step(b"c=biws,r=abc,p=AAAA"), "malformed-request")
    assert "already finished" in failure.text


def test_steps_after_success() -> None:
    server = _server("SCRAM-SHA-256", _accounts("juliet"))
    assert isinstance(
        _run_scram(server, ScramClient("SCRAM-SHA-256", "juliet", PASSWORD)), SaslSuccess
    )
    _failure(server.step(b"anything"), "malformed-request")
    _failure(server.step(None), "malformed-request")


# Payload decoding


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("=", b""),
        ("", None),
        (" \r\n\t", None),
        ("dXNlcg==", b"user"),
        ("  dXNl\n  cg==\n", b"user"),
        (" = ", b""),
    ],
)
def test_decode_sasl_payload(text: str, data: bytes | None) -> None:
    assert decode_sasl_payload(text) == data


@pytest.mark.parametrize(
    ("text", "condition"),
    [
        ("dXNlcg=", "incorrect-encoding"),
        ("dX*lcg==", "incorrect-encoding"),
        ("==", "incorrect-encoding"),
        ("dXNl\u00e9cg==", "incorrect-encoding"),
        ("dXNl\u00a0cg==", "incorrect-encoding"),
        ("A" * (MAX_PAYLOAD_CHARS + 4), "malformed-request"),
    ],
)
def test_decode_sasl_payload_rejects(text: str, condition: str) -> None:
    with pytest.raises(SaslError) as caught:
        decode_sasl_payload(text)
    assert caught.value.failure.condition == condition
    assert condition in str(caught.value)


def test_sasl_error_without_text() -> None:
    error = SaslError("aborted")
    assert str(error) == "aborted"
    assert error.failure == SaslFailure("aborted")


def test_failure_conditions_are_rfc6120s() -> None:
    assert len(SASL_FAILURES) == 11
    with pytest.raises(ValueError, match="not an RFC 6120"):
        SaslFailure("bad-password")


# Local (caller) errors


def test_server_nonce_from_entropy() -> None:
    nonce = server_nonce_from_entropy(bytes(range(250, 256)) * 3)
    assert nonce == base64.b64encode(bytes(range(250, 256)) * 3).decode().rstrip("=")
    assert "," not in nonce
    assert len(server_nonce_from_entropy(b"\xff" * 16)) == 22
    with pytest.raises(ValueError, match="16 random bytes"):
        server_nonce_from_entropy(b"\x00" * 15)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"server_nonce": "short"}, "16 to 256 chars"),
        ({"server_nonce": "x" * 257}, "16 to 256 chars"),
        ({"server_nonce": "0123456789,abcdef"}, "printable"),
        ({"server_nonce": "0123456789 abcdef"}, "printable"),
        ({"unknown_user_secret": b"short"}, "unknown_user_secret"),
        ({"unknown_user_iterations": 100}, "unknown_user_iterations"),
        ({"domain": "bad domain"}, "domainpart"),
    ],
)
def test_bad_server_parameters(changes: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {
        "lookup": {}.get,
        "domain": DOMAIN,
        "tls_active": True,
        "server_nonce": SERVER_NONCE,
        "unknown_user_secret": SECRET,
        **changes,
    }
    with pytest.raises(ValueError, match=fragment):
        SaslServer("SCRAM-SHA-256", **arguments)  # type: ignore[arg-type]
