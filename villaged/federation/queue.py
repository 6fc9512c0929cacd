"""The durable outbound queues: stanzas for other domains, stored before anyone is told so.

A stanza a local user sends to another domain is sealed (under the sender's data key, like an
archived message) and appended to the log as ``s2s.queued`` before the sender's stream counts it
as handled (XEP-0198) — the same promise as for local messages: nothing acknowledged is lost,
whether the remote server is up, down, or the node is killed meanwhile. The view keeps one
queue per destination domain, in log order; the federation link for that domain sends them
in that order and, once the remote server has confirmed them, appends ``s2s.done`` naming them
(``"r": "sent"``). A stanza that could not be delivered before ``[federation] queue_deadline``
is bounced to its sender and recorded the same way (``"r": "bounced"``).

Record types owned here (applied by `OutboundQueueView`):

* ``s2s.queued`` v1 — ``{"u": sender's bare JID, "id": record id, "s": sealed payload,
  "d": destination domain, "t": µs since the epoch}``; the payload is ``mam.pack_payload``
  (the recipient's JID and the stanza, serialized as the client namespace);
* ``s2s.done`` v1 — ``{"d": destination domain, "ids": [record ids], "r": "sent" | "bounced"}``.

Deleting an account drops its queued stanzas (their key is destroyed with it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from villaged.storage.state import StateError, text

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from villaged.storage.state import Unseal

QUEUED_RECORD: Final = "s2s.queued"
DONE_RECORD: Final = "s2s.done"
DONE_RESULTS: Final = ("sent", "bounced")
#: Record ids one ``s2s.done`` may name.
MAX_DONE_IDS: Final = 1000


@dataclass(frozen=True, slots=True)
class QueuedStanza:
    """One stanza waiting for its domain: where it goes, whose key sealed it, and when."""

    domain: str
    user: str
    record_id: str
    sealed: Mapping[str, Any]
    stamp: int  # µs since the epoch

    def body(self) -> dict[str, Any]:
        """The ``s2s.queued`` body (to unseal it with the store)."""
        return {"u": self.user, "id": self.record_id, "s": self.sealed}


class OutboundQueueView:
    """Queued stanzas per destination domain, oldest first."""

    name = "s2s_queue"
    record_types: Mapping[str, int] = {QUEUED_RECORD: 1, DONE_RECORD: 1}

    def __init__(self) -> None:
        self._queues: dict[str, OrderedDict[str, QueuedStanza]] = {}

    # ----- reading ---------------------------------------------------------------------------

    def domains(self) -> list[str]:
        return sorted(self._queues)

    def count(self, domain: str) -> int:
        queue = self._queues.get(domain)
        return len(queue) if queue is not None else 0

    def counts(self) -> dict[str, int]:
        return {domain: len(queue) for domain, queue in sorted(self._queues.items())}

    def pending(self, domain: str, limit: int | None = None) -> list[QueuedStanza]:
        """The oldest ``limit`` stanzas for ``domain`` (all without a limit), in order."""
        queue = self._queues.get(domain)
        if queue is None:
            return []
        entries = iter(queue.values())
        if limit is None:
            return list(entries)
        return [entry for _, entry in zip(range(limit), entries, strict=False)]

    def __iter__(self) -> Iterator[QueuedStanza]:
        for queue in self._queues.values():
            yield from queue.values()

    # ----- applying --------------------------------------------------------------------------

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        text(body, "d")
        if rtype == QUEUED_RECORD:
            text(body, "u")
            text(body, "id")
            if not isinstance(body.get("s"), dict):
                raise StateError(f"{rtype} needs a sealed payload 's'")
            stamp = body.get("t")
            if type(stamp) is not int or stamp < 0:
                raise StateError(f"{rtype} needs a time 't' in µs")
        else:
            ids = body.get("ids")
            if (
                not isinstance(ids, list)
                or not 0 < len(ids) <= MAX_DONE_IDS
                or not all(isinstance(i, str) for i in ids)
            ):
                raise StateError(f"{rtype} needs 1 to {MAX_DONE_IDS} record ids in 'ids'")
            if body.get("r") not in DONE_RESULTS:
                raise StateError(f"{rtype} needs 'r' of {', '.join(DONE_RESULTS)}")

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        self.validate(rtype, body)
        domain = body["d"]
        if rtype == QUEUED_RECORD:
            entry = QueuedStanza(domain, body["u"], body["id"], body["s"], body["t"])
            self._queues.setdefault(domain, OrderedDict())[entry.record_id] = entry
            return
        queue = self._queues.get(domain)
        if queue is None:
            return
        for record_id in body["ids"]:
            queue.pop(record_id, None)
        if not queue:
            del self._queues[domain]

    def forget_user(self, jid: str) -> None:
        for domain in list(self._queues):
            queue = self._queues[domain]
            for record_id in [i for i, e in queue.items() if e.user == jid]:
                del queue[record_id]
            if not queue:
                del self._queues[domain]

    def to_snapshot(self) -> list[list[Any]]:
        return [[e.domain, e.user, e.record_id, dict(e.sealed), e.stamp] for e in self]

    def restore(self, data: Any, unseal: Unseal) -> None:
        self._queues = {}
        if not isinstance(data, list):
            if data is None:  # a snapshot from before this view existed
                return
            raise StateError("s2s_queue snapshot is not a list")
        for item in data:
            try:
                domain, user, record_id, sealed, stamp = item
            except (TypeError, ValueError):
                raise StateError("s2s_queue snapshot entry is malformed") from None
            body = {"d": domain, "u": user, "id": record_id, "s": sealed, "t": stamp}
            self.apply(QUEUED_RECORD, body, unseal)
