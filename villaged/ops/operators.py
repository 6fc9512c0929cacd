"""Operator administration from the command line (``villaged operator …``).

These commands work on a stopped or a running node alike: they change
``<storage.dir>/admin/operators.json`` under its file lock with atomic replaces, and the node
reads that file afresh at every login (``villaged.admin.operators``). This module opens the
store for a configuration and turns its answers into the lines the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from villaged.admin import totp
from villaged.admin.operators import FILE_NAME, OperatorStore, check_owner
from villaged.storage.crypto import Keyset
from villaged.storage.store import prepare_data_directory

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from villaged.admin.operators import OperatorInfo
    from villaged.config import Config

__all__ = [
    "Enrollment",
    "enroll",
    "listing",
    "open_operators",
    "operators_directory",
    "rewrap_operator_secrets",
]


def operators_directory(config: Config) -> Path:
    return config.storage.dir / "admin"


def open_operators(config: Config) -> OperatorStore:
    """The node's operator store, with the keyset that seals the TOTP secrets."""
    keyset = Keyset.load(config.storage.keyset)
    check_owner(config.storage.dir, "data directory")
    # The operators file lives in the data directory; if this command is the first to use
    # the directory, it must still become one the node opens (FORMAT first).
    prepare_data_directory(config.storage.dir)
    return OperatorStore.open(operators_directory(config), keyset)


def rewrap_operator_secrets(config: Config, keyset: Keyset) -> int:
    """Re-wrap every operator's TOTP secret under ``keyset``'s primary key (``villaged keys
    rotate`` and ``retire``); 0 when no operator was ever enrolled."""
    if not (operators_directory(config) / FILE_NAME).exists():
        return 0
    return OperatorStore.open(operators_directory(config), keyset).rewrap_all()


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A new operator's one-time enrolment output. Holds the secret: show once, never log."""

    name: str
    uid: int
    secret: str = field(repr=False)
    uri: str = field(repr=False)

    def lines(self) -> list[str]:
        return [
            f"enrolled operator {self.name} (uid {self.uid})",
            "Add this TOTP secret to the operator's authenticator app now: scan the QR code or",
            "open the URI below. It is shown only this once and cannot be shown again",
            f"(to replace it: villaged operator remove {self.name}, then enroll again).",
            "",
            self.uri,
            "",
            *totp.qr_text(self.uri).splitlines(),
            "",
            f"For typing in by hand: key {self.secret}, time-based, {totp.DIGITS} digits,"
            f" {totp.STEP_SECONDS} s, SHA-1.",
        ]


def enroll(store: OperatorStore, config: Config, name: str, uid: int, now: float) -> Enrollment:
    secret, uri = store.enroll(name, uid, now, issuer=f"villaged {config.server.domain}")
    return Enrollment(name, uid, secret, uri)


def listing(operators: Sequence[OperatorInfo], now: float) -> list[str]:
    """A table of operators: name, uid, enabled, locked (until when)."""
    if not operators:
        return ["no operators are enrolled"]
    rows = [("NAME", "UID", "ENABLED", "LOCKED")]
    for info in operators:
        locked = "no"
        if info.locked_until is not None and info.locked(now):
            until = datetime.fromtimestamp(info.locked_until, UTC)
            locked = f"until {until:%Y-%m-%dT%H:%M:%SZ}"
        rows.append((info.name, str(info.uid), "yes" if info.enabled else "no", locked))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return [
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)), row[3]]
        )
        for row in rows
    ]
