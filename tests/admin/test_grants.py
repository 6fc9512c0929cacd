"""Inspection grants: scope, reasons, justification, expiry and the two-person rule."""

from __future__ import annotations

from typing import Any

import pytest

from villaged.admin.grants import REASON_CODES, Grant, GrantBook, GrantError

ALICE = "alice@example.org"
JUSTIFICATION = "user reported account takeover via ticket"


def _request(grants: GrantBook, *args: Any, **kwargs: Any) -> Grant:
    grant = grants.prepare(*args, **kwargs)
    grants.add(grant)
    return grant


def book(*, two_person: bool = False) -> GrantBook:
    return GrantBook(minutes=15, two_person_rule=two_person)


def refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(GrantError) as caught:
        call()
    return caught.value.code


def test_a_grant_is_for_one_user_one_operator_and_expires() -> None:
    grants = book()
    grant = _request(
        grants,
        "ops1",
        ALICE,
        reason="user-support-request",
        justification=JUSTIFICATION,
        ticket="T-1",
        now=100.0,
    )
    assert not grant.pending
    assert grants.use(grant.id, "ops1", ALICE, 100.0 + 14 * 60) is grant
    assert refusal(lambda: grants.use(grant.id, "ops1", "bob@example.org", 101.0)) == (
        "out-of-scope"
    )
    assert refusal(lambda: grants.use(grant.id, "ops2", ALICE, 101.0)) == "not-yours"
    assert refusal(lambda: grants.use(grant.id, "ops1", ALICE, 100.0 + 15 * 60)) == "expired"
    assert refusal(lambda: grants.use(grant.id, "ops1", ALICE, 100.0)) == "no-grant"
    assert refusal(lambda: grants.use("nope", "ops1", ALICE, 100.0)) == "no-grant"


@pytest.mark.parametrize(
    ("reason", "justification", "ticket", "code"),
    [
        ("curiosity", JUSTIFICATION, "T-1", "bad-reason"),
        ("legal-request", "", "T-1", "bad-justification"),
        ("legal-request", "too short, really", "T-1", "bad-justification"),
        ("legal-request", " " * 30 + "short" + " " * 30, "T-1", "bad-justification"),
        ("legal-request", "x" * 2001, "T-1", "bad-justification"),
        ("legal-request", JUSTIFICATION, "", "bad-ticket"),
    ],
)
def test_requests_need_a_listed_reason_a_real_justification_and_a_ticket(
    reason: str, justification: str, ticket: str, code: str
) -> None:
    grants = book()
    assert (
        refusal(
            lambda: _request(
                grants,
                "ops1",
                ALICE,
                reason=reason,
                justification=justification,
                ticket=ticket,
                now=0.0,
            )
        )
        == code
    )
    assert grants.open_grants(0.0) == []


def test_the_two_person_rule_needs_another_operator() -> None:
    grants = book(two_person=True)
    grant = _request(
        grants,
        "ops1",
        ALICE,
        reason=REASON_CODES[1],
        justification=JUSTIFICATION,
        ticket="T",
        now=0.0,
    )
    assert grant.pending
    assert refusal(lambda: grants.use(grant.id, "ops1", ALICE, 1.0)) == "pending"
    assert refusal(lambda: grants.approve(grant.id, "ops1", 1.0)) == "self-approval"
    approved = grants.approve(grant.id, "ops2", 2.0)
    assert approved.approved_by == "ops2"
    assert grants.use(grant.id, "ops1", ALICE, 3.0) is grant
    assert refusal(lambda: grants.approve(grant.id, "ops3", 4.0)) == "not-pending"


def test_revoke_and_listing() -> None:
    grants = book()
    grant = _request(
        grants,
        "ops1",
        ALICE,
        reason=REASON_CODES[0],
        justification=JUSTIFICATION,
        ticket="T",
        now=0.0,
    )
    assert [g.id for g in grants.open_grants(1.0)] == [grant.id]
    assert grant.describe(60.0)["expires_in_s"] == 15 * 60 - 60
    assert refusal(lambda: grants.revoke(grant.id, "ops2", 1.0)) == "not-yours"
    grants.revoke(grant.id, "ops1", 1.0)
    assert grants.open_grants(1.0) == []
