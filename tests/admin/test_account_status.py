"""The disabled-accounts view: records, snapshots, deletion."""

from __future__ import annotations

from typing import Any

import pytest

from villaged.admin.account_status import STATUS_RECORD, AccountStatusView
from villaged.storage.state import StateError


def no_unseal(*args: Any) -> bytes:
    raise AssertionError("nothing here is sealed")


def test_disable_enable_snapshot_and_forget() -> None:
    view = AccountStatusView()
    view.apply(STATUS_RECORD, {"u": "a@x", "disabled": True}, no_unseal)
    view.apply(STATUS_RECORD, {"u": "b@x", "disabled": True}, no_unseal)
    view.apply(STATUS_RECORD, {"u": "b@x", "disabled": False}, no_unseal)
    assert view.is_disabled("a@x")
    assert not view.is_disabled("b@x")
    restored = AccountStatusView()
    restored.restore(view.to_snapshot(), no_unseal)
    assert restored.to_snapshot() == ["a@x"]
    restored.forget_user("a@x")
    assert restored.to_snapshot() == []
    restored.restore(None, no_unseal)  # a snapshot from before this view existed
    assert restored.to_snapshot() == []


@pytest.mark.parametrize("body", [{"u": "a@x"}, {"u": "a@x", "disabled": 1}, {"disabled": True}])
def test_malformed_records_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(StateError):
        AccountStatusView().validate(STATUS_RECORD, body)


def test_a_malformed_snapshot_is_refused() -> None:
    with pytest.raises(StateError):
        AccountStatusView().restore([1, 2], no_unseal)
