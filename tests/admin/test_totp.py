"""TOTP (RFC 6238): the RFC's vectors, the ±1 step window, single use of a step, code format,
provisioning URIs and the terminal QR code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import urllib.parse

import pytest

from villaged.admin import totp

# RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890".
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode("ascii")

# (Unix time, the RFC's 8-digit SHA-1 TOTP): with 6 digits the code is the last six (the
# truncated value is taken modulo 10**digits).
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]

T = 1_234_567_890.0  # step 41152263, 0 s into the step
STEP = 41_152_263


def code_at(now: float, secret: str = RFC_SECRET) -> str:
    """The expected code, from the RFC algorithm by hand (not through the module)."""
    digest = hmac.new(
        base64.b32decode(secret), struct.pack(">Q", int(now // 30)), hashlib.sha1
    ).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


@pytest.mark.parametrize(("now", "rfc_code"), RFC_VECTORS)
def test_rfc_6238_sha1_vectors(now: int, rfc_code: str) -> None:
    code = rfc_code[-6:]
    assert code_at(now) == code
    assert totp.matching_steps(RFC_SECRET, code, now) == (now // 30,)
    assert totp.check(RFC_SECRET, code, now, None) == now // 30


def test_time_step_is_thirty_seconds_from_the_epoch() -> None:
    assert totp.time_step(0) == 0
    assert totp.time_step(29.999) == 0
    assert totp.time_step(30) == 1
    assert totp.time_step(T) == STEP
    assert totp.time_step(T + 29.9) == STEP


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_window_accepts_one_step_either_side(offset: int) -> None:
    code = code_at(T + 30 * offset)
    assert totp.check(RFC_SECRET, code, T, None) == STEP + offset
    assert totp.check(RFC_SECRET, code, T + 29, None) == STEP + offset


@pytest.mark.parametrize("offset", [-3, -2, 2, 3])
def test_window_refuses_two_steps_away(offset: int) -> None:
    code = code_at(T + 30 * offset)
    assert code not in {code_at(T - 30), code_at(T), code_at(T + 30)}  # the vectors differ
    assert totp.check(RFC_SECRET, code, T, None) is None
    assert totp.matching_steps(RFC_SECRET, code, T) == ()


def test_a_step_is_accepted_once() -> None:
    code = code_at(T)
    step = totp.check(RFC_SECRET, code, T, None)
    assert step == STEP
    # The same code again, in the same step or the next: a replay.
    assert totp.check(RFC_SECRET, code, T + 5, step) is None
    assert totp.check(RFC_SECRET, code, T + 30, step) is None
    # It still matches (so a caller can tell a replay from a wrong code), but is not accepted.
    assert totp.matching_steps(RFC_SECRET, code, T + 5) == (STEP,)
    # The next step's code is.
    assert totp.check(RFC_SECRET, code_at(T + 30), T + 30, step) == STEP + 1


def test_an_older_step_is_refused_after_a_newer_one() -> None:
    newer = totp.check(RFC_SECRET, code_at(T + 30), T, None)  # a fast clock's code, step +1
    assert newer == STEP + 1
    assert totp.check(RFC_SECRET, code_at(T), T, newer) is None
    assert totp.check(RFC_SECRET, code_at(T - 30), T, newer) is None


@pytest.mark.parametrize(
    "code",
    [
        "",
        "12345",
        "1234567",
        "12345a",
        " 123456",
        "123456 ",
        "123 456",
        "\uff11\uff12\uff13\uff14\uff15\uff16",  # fullwidth: str.isdigit() says yes
        "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic digits
        "+12345",
        "-12345",
        "0x1234",
    ],
)
def test_only_six_ascii_digits_are_a_code(code: str) -> None:
    assert totp.matching_steps(RFC_SECRET, code, T) == ()
    assert totp.check(RFC_SECRET, code, T, None) is None


def test_the_right_code_in_another_form_is_refused() -> None:
    code = code_at(T)
    assert totp.check(RFC_SECRET, "".join(chr(0xFF10 + int(c)) for c in code), T, None) is None
    assert totp.check(RFC_SECRET, f"{code[:3]} {code[3:]}", T, None) is None
    assert totp.check(RFC_SECRET, code + "\n", T, None) is None


def test_new_secrets_are_160_random_bits_in_base32() -> None:
    secrets = {totp.new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert len(secret) == 32
        assert len(base64.b32decode(secret)) == totp.SECRET_BYTES == 20


@pytest.mark.parametrize(
    "secret",
    ["", "GEZDGNBV", "gezdgnbvgy3tqojqgezdgnbvgy3tqojq", RFC_SECRET + "=", RFC_SECRET[:-1]],
)
def test_a_malformed_secret_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError, match="base32") as caught:
        totp.check(secret, "123456", T, None)
    if secret:
        assert secret not in str(caught.value)


def test_provisioning_uri_names_issuer_and_account() -> None:
    uri = totp.provisioning_uri("ann", RFC_SECRET, "villaged example.org")
    parsed = urllib.parse.urlsplit(uri)
    assert (parsed.scheme, parsed.netloc) == ("otpauth", "totp")
    assert urllib.parse.unquote(parsed.path) == "/villaged example.org:ann"
    query = urllib.parse.parse_qs(parsed.query)
    assert query["secret"] == [RFC_SECRET]
    assert query["issuer"] == ["villaged example.org"]
    # SHA-1, 6 digits and 30 s are what an URI without those parameters means.
    assert query.get("algorithm", ["SHA1"]) == ["SHA1"]
    assert query.get("digits", ["6"]) == ["6"]
    assert query.get("period", ["30"]) == ["30"]


@pytest.mark.parametrize(("name", "issuer"), [("a:b", "villaged"), ("ann", "villaged:x")])
def test_provisioning_uri_refuses_the_label_separator(name: str, issuer: str) -> None:
    with pytest.raises(ValueError, match="':'"):
        totp.provisioning_uri(name, RFC_SECRET, issuer)


def test_qr_text_is_half_blocks_with_a_quiet_zone() -> None:
    text = totp.qr_text(totp.provisioning_uri("ann", RFC_SECRET, "villaged example.org"))
    lines = text.splitlines()
    assert set(text) <= {" ", "\u2580", "\u2584", "\u2588", "\n"}
    assert len({len(line) for line in lines}) == 1  # a rectangle
    width = len(lines[0])
    # Two module rows per line: the matrix is square, so there are about half as many lines.
    assert len(lines) == (width + 1) // 2
    # The quiet zone (light, drawn as full blocks) surrounds the code: 4 modules = 2 lines.
    assert lines[0] == lines[1] == "\u2588" * width
    assert all(line.startswith("\u2588" * 4) and line.endswith("\u2588" * 4) for line in lines[:-1])
