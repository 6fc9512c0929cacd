"""The durable outbound queues as a view of the log: order per domain, removal, snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from villaged.federation.queue import (
    DONE_RECORD,
    MAX_DONE_IDS,
    QUEUED_RECORD,
    OutboundQueueView,
)
from villaged.storage.state import StateError


def never(*args: object) -> bytes:
    raise AssertionError("the queue never unseals while applying")


def queued(domain: str, record_id: str, user: str = "alice@a.test", t: int = 1) -> dict[str, Any]:
    return {"u": user, "id": record_id, "s": {"k": 1, "n": b"x", "c": b"y"}, "d": domain, "t": t}


def filled() -> OutboundQueueView:
    view = OutboundQueueView()
    for record_id, domain in [("1", "b.test"), ("2", "c.test"), ("3", "b.test"), ("4", "b.test")]:
        view.apply(QUEUED_RECORD, queued(domain, record_id), never)
    view.apply(QUEUED_RECORD, queued("c.test", "5", user="bob@a.test"), never)
    return view


def test_queues_keep_log_order_per_domain() -> None:
    view = filled()
    assert view.domains() == ["b.test", "c.test"]
    assert [e.record_id for e in view.pending("b.test")] == ["1", "3", "4"]
    assert [e.record_id for e in view.pending("b.test", 2)] == ["1", "3"]
    assert view.counts() == {"b.test": 3, "c.test": 2}
    assert view.pending("nowhere.test") == []
    assert view.count("nowhere.test") == 0


def test_done_removes_and_an_empty_domain_disappears() -> None:
    view = filled()
    view.apply(DONE_RECORD, {"d": "b.test", "ids": ["1", "3"], "r": "sent"}, never)
    assert [e.record_id for e in view.pending("b.test")] == ["4"]
    view.apply(DONE_RECORD, {"d": "b.test", "ids": ["4", "unknown"], "r": "bounced"}, never)
    view.apply(DONE_RECORD, {"d": "gone.test", "ids": ["9"], "r": "sent"}, never)
    assert view.domains() == ["c.test"]


def test_deleting_a_user_drops_their_stanzas() -> None:
    view = filled()
    view.forget_user("alice@a.test")
    assert view.counts() == {"c.test": 1}
    assert view.pending("c.test")[0].user == "bob@a.test"


def test_a_snapshot_restores_the_same_queues() -> None:
    view = filled()
    restored = OutboundQueueView()
    restored.restore(view.to_snapshot(), never)
    assert list(restored) == list(view)
    empty = OutboundQueueView()
    empty.restore(None, never)  # a snapshot from before federation
    assert empty.counts() == {}
    with pytest.raises(StateError):
        empty.restore({"not": "a list"}, never)
    with pytest.raises(StateError):
        empty.restore([["too", "short"]], never)


@pytest.mark.parametrize(
    ("rtype", "body"),
    [
        (QUEUED_RECORD, {**queued("b.test", "1"), "s": "not sealed"}),
        (QUEUED_RECORD, {**queued("b.test", "1"), "t": -1}),
        (QUEUED_RECORD, {**queued("b.test", "1"), "t": True}),
        (QUEUED_RECORD, {k: v for k, v in queued("b.test", "1").items() if k != "d"}),
        (DONE_RECORD, {"d": "b.test", "ids": [], "r": "sent"}),
        (DONE_RECORD, {"d": "b.test", "ids": [1], "r": "sent"}),
        (DONE_RECORD, {"d": "b.test", "ids": ["x"] * (MAX_DONE_IDS + 1), "r": "sent"}),
        (DONE_RECORD, {"d": "b.test", "ids": ["x"], "r": "lost"}),
    ],
)
def test_malformed_records_are_refused(rtype: str, body: dict[str, Any]) -> None:
    with pytest.raises(StateError):
        OutboundQueueView().validate(rtype, body)
