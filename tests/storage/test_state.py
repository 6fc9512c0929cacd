"""The view registry: record types dispatch to the view that owns them; snapshots carry every
view; unknown types and newer schemas are refused."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from villaged.storage.state import State, StateError, text

if TYPE_CHECKING:
    from collections.abc import Mapping

    from villaged.storage.state import Unseal


class NotesView:
    name = "notes"
    record_types: Mapping[str, int] = {"note.add": 2}

    def __init__(self) -> None:
        self.notes: list[str] = []

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        text(body, "n")

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        self.notes.append(body["n"])

    def to_snapshot(self) -> Any:
        return list(self.notes)

    def restore(self, data: Any, unseal: Unseal) -> None:
        self.notes = list(data or [])


def no_unseal(rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
    raise AssertionError("nothing sealed here")


def test_dispatch_snapshot_and_restore() -> None:
    state = State([NotesView()])
    state.validate("note.add", 2, {"n": "hello"})
    state.apply("note.add", 1, {"n": "hello"}, no_unseal)
    state.mark_applied(1, 0)
    assert state.view("notes").to_snapshot() == ["hello"]

    copy = State([NotesView()])
    copy.restore(state.snapshot_bytes(), 1, 0, no_unseal)
    assert copy.view("notes").to_snapshot() == ["hello"]
    assert copy.applied_index == 1
    assert len(copy.accounts) == 0
    with pytest.raises(KeyError):
        copy.view("nope")


def test_refusals() -> None:
    state = State([NotesView()])
    with pytest.raises(StateError, match="unknown record type 'x'"):
        state.validate("x", 1, {})
    with pytest.raises(StateError, match="schema version 3"):
        state.apply("note.add", 3, {"n": "x"}, no_unseal)
    with pytest.raises(StateError, match="'n' is missing"):
        state.validate("note.add", 1, {})
    with pytest.raises(ValueError, match="owned by two views"):
        State([NotesView(), NotesView()])
    with pytest.raises(StateError, match="malformed"):
        state.restore(b"\xc1", 1, 0, no_unseal)
    other = State([NotesView()])
    other.mark_applied(5, 0)
    with pytest.raises(StateError, match="state says 5"):
        state.restore(other.snapshot_bytes(), 1, 0, no_unseal)


class ForgetfulNotesView(NotesView):
    name = "forgetful"
    record_types: Mapping[str, int] = {"forgetful.add": 1}

    def forget_user(self, jid: str) -> None:
        self.notes = [n for n in self.notes if not n.startswith(jid)]


def test_account_delete_makes_views_forget_the_user() -> None:
    view = ForgetfulNotesView()
    state = State([view])
    state.apply("forgetful.add", 1, {"n": "a@example.org: hi"}, no_unseal)
    state.apply("forgetful.add", 1, {"n": "b@example.org: hi"}, no_unseal)
    state.apply("account.delete", 1, {"u": "a@example.org"}, no_unseal)
    assert view.notes == ["b@example.org: hi"]
