"""Inspection grants: the only way an operator reads a user's data.

A grant names exactly one user, one operator, a reason code from `REASON_CODES`, a written
justification of at least `MIN_JUSTIFICATION` characters and a ticket reference; it is
read-only and expires after ``[admin] grant_minutes``. Under the two-person rule it stays
*pending* until a different operator approves it (with their own fresh TOTP, checked by the
server before calling `approve`). Grants live in memory: they are short-lived, and every one of
them is in the audit log, which is what lasts. Time is passed in (seconds, the node's clock).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

#: The fixed list of reasons an operator may give (documented in the README).
REASON_CODES: Final = (
    "user-support-request",
    "abuse-investigation",
    "legal-request",
    "incident-response",
)
MIN_JUSTIFICATION: Final = 20
MAX_JUSTIFICATION: Final = 2000
MAX_TICKET: Final = 200
MAX_OPEN_GRANTS: Final = 1000


class GrantError(Exception):
    """A grant cannot be made, approved or used; ``code`` is stable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Grant:
    id: str
    operator: str
    user: str  # the bare JID in scope
    reason: str
    justification: str
    ticket: str
    created: float
    expires: float
    approved_by: str | None = None  # the second operator, under the two-person rule
    pending: bool = False

    def describe(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "operator": self.operator,
            "user": self.user,
            "reason": self.reason,
            "justification": self.justification,  # what a second operator approves
            "ticket": self.ticket,
            "pending": self.pending,
            "approved_by": self.approved_by,
            "expires_in_s": max(0, round(self.expires - now)),
        }


class GrantBook:
    def __init__(self, *, minutes: int, two_person_rule: bool) -> None:
        self.lifetime = minutes * 60.0
        self.two_person_rule = two_person_rule
        self._grants: dict[str, Grant] = {}

    def prepare(
        self,
        operator: str,
        user: str,
        *,
        reason: str,
        justification: str,
        ticket: str,
        now: float,
    ) -> Grant:
        """A new grant (pending under the two-person rule), not yet in effect: `add` it once
        its audit record is durable. GrantError says what is wrong with the request."""
        if reason not in REASON_CODES:
            raise GrantError(
                "bad-reason", f"unknown reason code {reason[:40]!r}; use one of {REASON_CODES}"
            )
        text = justification.strip()
        if len(text) < MIN_JUSTIFICATION:
            raise GrantError(
                "bad-justification",
                f"the justification must say why in at least {MIN_JUSTIFICATION} characters",
            )
        if len(text) > MAX_JUSTIFICATION:
            raise GrantError(
                "bad-justification", f"the justification is over {MAX_JUSTIFICATION} characters"
            )
        ticket = ticket.strip()
        if not ticket or len(ticket) > MAX_TICKET:
            raise GrantError("bad-ticket", f"a ticket reference of 1 to {MAX_TICKET} characters")
        self._expire(now)
        if len(self._grants) >= MAX_OPEN_GRANTS:
            raise GrantError("too-many-grants", "too many grants are open")
        return Grant(
            id=secrets.token_hex(8),
            operator=operator,
            user=user,
            reason=reason,
            justification=text,
            ticket=ticket,
            created=now,
            expires=now + self.lifetime,
            pending=self.two_person_rule,
        )

    def add(self, grant: Grant) -> None:
        self._grants[grant.id] = grant

    def check_approval(self, grant_id: str, approver: str, now: float) -> Grant:
        """The pending grant ``approver`` may approve (nothing changes until `approve`)."""
        grant = self._find(grant_id, now)
        if not grant.pending:
            raise GrantError("not-pending", f"grant {grant_id} needs no approval")
        if approver == grant.operator:
            raise GrantError(
                "self-approval", "the two-person rule needs a different operator to approve"
            )
        return grant

    def approve(self, grant_id: str, approver: str, now: float) -> Grant:
        grant = self.check_approval(grant_id, approver, now)
        grant.pending = False
        grant.approved_by = approver
        return grant

    def remove(self, grant_id: str) -> None:
        self._grants.pop(grant_id, None)

    def use(self, grant_id: str, operator: str, user: str, now: float) -> Grant:
        """The open grant that lets ``operator`` read ``user``'s data now."""
        grant = self._find(grant_id, now)
        if grant.operator != operator:
            raise GrantError("not-yours", f"grant {grant_id} was given to another operator")
        if grant.user != user:
            raise GrantError("out-of-scope", f"grant {grant_id} covers {grant.user}, not {user}")
        if grant.pending:
            raise GrantError("pending", f"grant {grant_id} awaits a second operator's approval")
        return grant

    def revoke(self, grant_id: str, operator: str, now: float) -> Grant:
        grant = self._find(grant_id, now)
        if grant.operator != operator:
            raise GrantError("not-yours", f"grant {grant_id} was given to another operator")
        del self._grants[grant_id]
        return grant

    def open_grants(self, now: float) -> list[Grant]:
        self._expire(now)
        return list(self._grants.values())

    def _find(self, grant_id: str, now: float) -> Grant:
        grant = self._grants.get(grant_id)
        if grant is None:
            raise GrantError("no-grant", f"no grant {grant_id[:40]!r} (never made, or revoked)")
        if now >= grant.expires:
            del self._grants[grant_id]
            raise GrantError("expired", f"grant {grant_id} has expired")
        return grant

    def _expire(self, now: float) -> None:
        for grant_id in [g.id for g in self._grants.values() if now >= g.expires]:
            del self._grants[grant_id]
