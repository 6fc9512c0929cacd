"""Time-based one-time passwords (RFC 6238) for operator logins, and how an authenticator app
is told the secret.

This module owns the TOTP parameters villaged uses and the rule for accepting a code:

* secrets are 160 bits (RFC 4226 §4 recommends at least that; the HMAC-SHA-1 block makes more
  pointless), drawn from the kernel CSPRNG and written in unpadded base32, as authenticator
  apps expect;
* HMAC-SHA-1, 6 digits, a 30-second step from the Unix epoch — the parameters every
  authenticator app supports (and the defaults an ``otpauth://`` URI implies);
* a code is accepted for the current step or one step either side (clocks drift, and a code
  typed at the end of its step arrives in the next), but only for a step later than the last
  one accepted from the same operator: each step opens at most one login or confirmation, so
  a code seen over a shoulder or in a terminal's scrollback is worth nothing once used.

The caller passes the time (Unix seconds) and the last accepted step, and stores the step that
``check`` returns; nothing here reads a clock or a file. The HMACs come from pyotp; the
comparison is ours and constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
from typing import Final

import pyotp
import segno

__all__ = [
    "DIGITS",
    "SECRET_BYTES",
    "STEP_SECONDS",
    "WINDOW_STEPS",
    "check",
    "matching_steps",
    "new_secret",
    "provisioning_uri",
    "qr_text",
    "time_step",
]

SECRET_BYTES: Final = 20  # 160 bits
DIGITS: Final = 6
STEP_SECONDS: Final = 30
WINDOW_STEPS: Final = 1  # steps accepted either side of the current one

_CODE = re.compile(r"[0-9]{6}")
_BASE32_SECRET = re.compile(r"(?:[A-Z2-7]{8}){4,}")  # whole 40-bit groups, 160 bits or more


def new_secret() -> str:
    """A fresh 160-bit secret in unpadded base32 (32 characters)."""
    return base64.b32encode(os.urandom(SECRET_BYTES)).decode("ascii")


def time_step(now: float) -> int:
    """The RFC 6238 time step (T0 = 0, X = 30 s) that the Unix time ``now`` falls in."""
    return int(now // STEP_SECONDS)


def matching_steps(secret: str, code: str, now: float) -> tuple[int, ...]:
    """The steps within the window around ``now`` whose code is ``code``, oldest first.

    Every step of the window is computed and compared, matching or not, so the time taken says
    nothing about which step (if any) matched. Anything but exactly six ASCII digits matches
    nothing.
    """
    otp = _otp(secret)
    if not _CODE.fullmatch(code):
        return ()
    current = time_step(now)
    steps = range(max(current - WINDOW_STEPS, 0), current + WINDOW_STEPS + 1)
    matched = [
        step
        for step in steps
        if hmac.compare_digest(otp.generate_otp(step).encode("ascii"), code.encode("ascii"))
    ]
    return tuple(matched)


def check(secret: str, code: str, now: float, last_step: int | None) -> int | None:
    """The step ``code`` is accepted for, or None.

    Accepted: the code of the current step or of one step either side, provided that step is
    later than ``last_step`` (the step last accepted from this operator; None if there was
    none). The caller must store the returned step as the new ``last_step`` before it acts on
    the code, so the same code (and any older one) is refused from then on.
    """
    later = [
        step for step in matching_steps(secret, code, now) if last_step is None or step > last_step
    ]
    return max(later) if later else None


def provisioning_uri(name: str, secret: str, issuer: str) -> str:
    """The ``otpauth://totp/`` URI an authenticator app reads (from a QR code) to add ``secret``
    under ``issuer: name``. It contains the secret: show it once, never log it."""
    if ":" in name or ":" in issuer:
        raise ValueError("a TOTP account name or issuer cannot contain ':' (the label separator)")
    return _otp(secret).provisioning_uri(name=name, issuer_name=issuer)


def qr_text(data: str) -> str:
    """``data`` as a QR code for a terminal: two modules per character with half-block
    characters, a quiet zone of four modules, light modules drawn (for a dark background)."""
    out = io.StringIO()
    segno.make(data, error="m", micro=False).terminal(out=out, compact=True)
    return out.getvalue()


def _otp(secret: str) -> pyotp.TOTP:
    if not _BASE32_SECRET.fullmatch(secret):
        # Never echo the value: it may be a real secret with a typo in it.
        raise ValueError(
            "a TOTP secret is unpadded base32 (A-Z, 2-7) of at least 160 bits,"
            " in groups of 8 characters"
        )
    return pyotp.TOTP(secret, digits=DIGITS, digest=hashlib.sha1, interval=STEP_SECONDS)
