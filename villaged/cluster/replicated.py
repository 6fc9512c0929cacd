"""Replicated storage: a cluster node's records committed through their shard's Raft group.

This module owns the seam between the store (:mod:`villaged.storage.store`: records, views,
data keys) and the cluster (:mod:`villaged.cluster.driver`: Raft groups): which group a record
belongs to, the bytes of a group's log entries and snapshots, the application of committed
entries to the node's views, and the path of a write from ``Store.submit`` to "committed by a
majority and applied here".

Theory of operation
-------------------
**Ownership.** Every record belongs to one key: a bare JID (``"u"``) or, for the federation
queue, a domain (``"d"``). The key's shard (:func:`~villaged.cluster.placement.shard_of`) is the
group whose log holds the record. A record about two users -- a message archived for its
sender and its recipient, a subscription changing two rosters -- is split into one record per
shard (:func:`split_record`); each part commits on its own and the write is acknowledged only
when every part is. Since every record touches the users of one shard only, a user's view state
is a function of their shard's log alone: replicas applying the shards' entries in different
interleavings still agree on every user.

**Entries.** A DATA entry of a shard is a batch: ``msgpack({"f": 1, "r": [[type, version,
body], ...]})``. A node's writes to one shard are batched by one sender task per shard, so a
busy shard commits many records per entry, and a node's records reach their shard in the order
they were submitted. ``vault.key`` records carry a user's data key, wrapped by the cluster's
keyset (the same keyset file on every node): a user's key is committed to their shard before
anything sealed under it, and every replica stores it (first one wins, so two nodes making a
key at once agree on one). ``account.delete`` destroys the user's key on every replica.

**Applying.** The driver calls :meth:`ReplicatedState.apply_entry` in index order per group.
A record that no longer applies (a create for an account that exists, a payload sealed under a
key that lost the race, a malformed body) is skipped the same way on every replica and logged;
it never stops the node. Waiters on "group G has applied index I" are woken after each entry.

**Snapshots.** Each group's snapshot holds its users' part of every view plus their wrapped
keys. Views keep all users together, so a snapshot is cut from the whole view state by key
(``_SNAPSHOT_SHAPES`` says where the key is in each view's snapshot form) and restoring one
merges it into the others' state. At start the driver restores every group before the first
cycle; those restores are gathered and merged once (:meth:`ReplicatedState.finish_loading`).

**Writing.** :meth:`Replicator.submit` splits a record and queues the parts; it never waits.
The shard's sender task proposes the batch to the group's leader: directly when this node
leads, else as an ``fwd.propose`` frame to the leader (which proposes it and answers with
``fwd.done`` or ``fwd.fail``). "Not the leader" and "no leader yet" are retried until
``commit_timeout``; a proposal whose fate is unknown (a timeout, a lost leader) fails its
records, which are then never acknowledged. After the leader reports the entry committed, the
sender waits until this node has applied it, so a client reading right after its write sees it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from villaged.cluster.driver import NotLeaderError, ProposalDroppedError, ProposalLostError
from villaged.cluster.placement import shard_of
from villaged.cluster.raft import RaftError
from villaged.storage import crypto
from villaged.storage.errors import RecordTooLargeError, StorageError
from villaged.storage.records import Record
from villaged.storage.state import ACCOUNT_DELETE, State

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from villaged.cluster.driver import NodeDriver
    from villaged.cluster.raft import Entry
    from villaged.cluster.wire import AppFrame

__all__ = [
    "KEY_RECORD",
    "CommitFailedError",
    "MetaApplication",
    "ReplicatedState",
    "Replicator",
    "ShardApplication",
    "group_name",
    "split_record",
]

log = logging.getLogger("villaged.cluster")

ENTRY_FORMAT: Final = 1
SNAPSHOT_FORMAT: Final = 1
KEY_RECORD: Final = "vault.key"
#: Records of one shard per entry, and their encoded bytes (below the driver's entry limit).
MAX_BATCH_RECORDS: Final = 512
MAX_BATCH_BYTES: Final = 512 * 1024
#: One record alone: what fits a Raft entry (the driver's default 1 MiB) with its envelope.
MAX_RECORD_BYTES: Final = (1 << 20) - 4096
#: Forwarded proposals this node serves at once (as leader), over all peers.
MAX_FORWARDED: Final = 4096
#: Proposing processes whose last batch each group remembers (for retried proposals).
MAX_PROPOSERS_REMEMBERED: Final = 256

#: Record types whose body lists parts for several users, and the list's key.
_MULTI_PART: Final = {"message": "e", "roster.change": "c"}
#: Record types owned by a domain rather than a user.
_BY_DOMAIN: Final = frozenset({"s2s.queued", "s2s.done"})

#: Where the owner key sits in each view's snapshot form: "rows" (a list of lists, key first),
#: "items" (a list of keys), "map" (a dict by key), "maps" (a dict of such dicts).
_SNAPSHOT_SHAPES: Final = {
    "accounts": "rows",
    "account_status": "items",
    "messages": "maps",
    "roster": "map",
    "private": "rows",
    "vcards": "rows",
    "blocking": "rows",
    "s2s_queue": "rows",
}


class CommitFailedError(StorageError):
    """The record was not committed, or its fate is unknown: it must not be acknowledged."""


class _NoAnswerError(Exception):
    """A leader did not answer a forwarded request in time (it may be gone or cut off)."""


def group_name(shard: int) -> str:
    return f"shard-{shard}"


def record_owner(rtype: str, body: Mapping[str, Any]) -> str:
    """The key (bare JID or domain) a single-owner record belongs to."""
    key = body.get("d") if rtype in _BY_DOMAIN else body.get("u")
    if not isinstance(key, str) or not key:
        raise StorageError(f"a {rtype} record has no owner ('u' or 'd')")
    return key


def split_record(record: Record, shards: int) -> dict[int, Record]:
    """``record`` as one record per shard it touches (itself when it touches one)."""
    list_key = _MULTI_PART.get(record.type)
    if list_key is None:
        return {shard_of(record_owner(record.type, record.body), shards): record}
    parts: dict[int, list[Any]] = {}
    for part in record.body.get(list_key) or ():
        parts.setdefault(shard_of(record_owner(record.type, part), shards), []).append(part)
    if len(parts) == 1:
        return {next(iter(parts)): record}
    return {
        shard: Record(record.type, {**record.body, list_key: items}, record.version)
        for shard, items in parts.items()
    }


@dataclass(frozen=True, slots=True)
class BatchId:
    """Who proposed a batch: the node, its process's boot id, and the batch's sequence number
    in that process for that shard (1, 2, ...: one batch at a time, so in order)."""

    node: str
    boot: int
    seq: int


def encode_entry(records: Sequence[Record], batch: BatchId) -> bytes:
    data: bytes = msgpack.packb(
        {
            "f": ENTRY_FORMAT,
            "n": batch.node,
            "b": batch.boot,
            "s": batch.seq,
            "r": [[r.type, r.version, r.body] for r in records],
        },
        use_bin_type=True,
    )
    return data


def decode_entry(data: bytes) -> tuple[BatchId, list[tuple[str, int, dict[str, Any]]]]:
    """The batch in an entry; StorageError for anything else (whatever a peer sent)."""
    try:
        return _decode_entry(data)
    except (TypeError, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise StorageError(f"entry is not a batch: {exc}") from exc


def _decode_entry(data: bytes) -> tuple[BatchId, list[tuple[str, int, dict[str, Any]]]]:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(obj, dict) or obj.get("f") != ENTRY_FORMAT:
        raise StorageError("entry is not a batch of format 1")
    node, boot, seq = obj.get("n"), obj.get("b"), obj.get("s")
    if not isinstance(node, str) or not isinstance(boot, int) or not isinstance(seq, int):
        raise StorageError("entry has no batch id")
    out: list[tuple[str, int, dict[str, Any]]] = []
    for item in obj.get("r") or ():
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or not isinstance(item[2], dict)
        ):
            raise StorageError("entry holds a malformed record")
        out.append((item[0], item[1], item[2]))
    return BatchId(node, boot, seq), out


def _filter(shape: str, data: Any, keep: Callable[[str], bool]) -> Any:
    if shape == "rows":
        return [row for row in data or () if keep(row[0])]
    if shape == "items":
        return [key for key in data or () if keep(key)]
    if shape == "map":
        return {key: value for key, value in (data or {}).items() if keep(key)}
    return {name: _filter("map", inner, keep) for name, inner in (data or {}).items()}


def _merge(shape: str, ours: Any, theirs: Any) -> Any:
    if shape in ("rows", "items"):
        return [*(ours or ()), *(theirs or ())]
    if shape == "map":
        return {**(ours or {}), **(theirs or {})}
    names = set(ours or {}) | set(theirs or {})
    return {n: _merge("map", (ours or {}).get(n), (theirs or {}).get(n)) for n in names}


@dataclass
class _Applied:
    index: int = 0
    changed: trio.Event = field(default_factory=trio.Event)


class ReplicatedState:
    """The node's views (one :class:`State` for all the shards it hosts) fed by the shards'
    committed entries; see the module docstring."""

    def __init__(self, state: State, vault: crypto.UserKeyVault, shards: int) -> None:
        for view in state.views:
            if view.name not in _SNAPSHOT_SHAPES:
                raise ValueError(f"view {view.name!r} has no snapshot shape for a cluster")
        self.state = state
        self.vault = vault
        self.shards = shards
        self._applied: dict[str, _Applied] = {}
        self._loading: dict[str, bytes] | None = {}
        self.skipped = 0  # records that did not apply (the same on every replica)
        self.duplicates = 0  # batches applied before (a retried proposal)
        # Per group: the last batch applied from each proposing process (node, boot id).
        self._seen: dict[str, dict[tuple[str, int], int]] = {}
        self.on_delete: list[Callable[[str], None]] = []
        #: Users whose keys the snapshots restored at start did not hold (see _restore).
        self.destroyed_at_start: set[str] = set()

    # --- progress ---

    def applied(self, group: str) -> int:
        return self._applied.setdefault(group, _Applied()).index

    async def wait_applied(self, group: str, index: int) -> None:
        progress = self._applied.setdefault(group, _Applied())
        while progress.index < index:
            await progress.changed.wait()

    def applied_through(self, group: str, index: int) -> None:
        """Every entry of ``group`` through ``index`` is applied (no-op and membership entries
        included: a read barrier may wait for one of those)."""
        if index > self.applied(group):
            self._advance(group, index)

    def _advance(self, group: str, index: int) -> None:
        progress = self._applied.setdefault(group, _Applied())
        progress.index = index
        progress.changed.set()
        progress.changed = trio.Event()

    # --- the group's application ---

    def _in_group(self, group: str) -> Callable[[str], bool]:
        return lambda key: group_name(shard_of(key, self.shards)) == group

    def _unseal(self, rtype: str, user: str, record_id: str, envelope: Mapping[str, Any]) -> bytes:
        return crypto.unseal(self.vault, rtype, user, record_id, envelope)

    def apply_entry(self, group: str, entry: Entry) -> None:
        self.finish_loading()
        try:
            batch, records = decode_entry(entry.data)
        except (StorageError, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
            self.skipped += 1
            log.error(
                "skipped a malformed entry",
                extra={"event": "cluster.entry_skipped", "group": group, "error": str(exc)},
            )
            records = []
        else:
            if not self._first_time(group, batch):
                self.duplicates += 1
                records = []  # a proposal retried after its first copy committed too
        for rtype, version, body in records:
            self._apply_record(group, entry.index, rtype, version, body)
        self._advance(group, entry.index)

    def _first_time(self, group: str, batch: BatchId) -> bool:
        seen = self._seen.setdefault(group, {})
        key = (batch.node, batch.boot)
        if seen.get(key, 0) >= batch.seq:
            return False
        seen.pop(key, None)
        seen[key] = batch.seq  # newest last: the oldest processes are forgotten first
        while len(seen) > MAX_PROPOSERS_REMEMBERED:
            del seen[next(iter(seen))]
        return True

    def _apply_record(
        self, group: str, index: int, rtype: str, version: int, body: dict[str, Any]
    ) -> None:
        try:
            owner = record_owner(rtype, body) if rtype not in _MULTI_PART else None
            owners = (
                [owner]
                if owner is not None
                else [record_owner(rtype, part) for part in body.get(_MULTI_PART[rtype]) or ()]
            )
            mine = self._in_group(group)
            if not all(isinstance(o, str) and mine(o) for o in owners):
                raise StorageError(f"a {rtype} record of another shard in {group}")
            if rtype == KEY_RECORD:
                self._install_key(body)
                return
            self._check_sealed_keys(rtype, body)
            self.state.validate(rtype, version, body)
            self.state.apply(rtype, version, body, self._unseal)
        except Exception as exc:
            self.skipped += 1
            log.warning(
                "skipped a record that does not apply",
                extra={
                    "event": "cluster.record_skipped",
                    "group": group,
                    "index": index,
                    "type": rtype,
                    "error": str(exc),
                },
            )
            return
        if rtype == ACCOUNT_DELETE and owner is not None:
            self.vault.destroy(owner)  # crypto-shredding, on every replica
            for hook in self.on_delete:
                hook(owner)

    def _check_sealed_keys(self, rtype: str, body: Mapping[str, Any]) -> None:
        """Refuse a payload sealed under a data key the user does not have: two nodes made
        a key for a new user at once, and this record was sealed under the one that lost
        (skipped everywhere alike; its writer is told the account exists, see add_user)."""
        list_key = _MULTI_PART.get(rtype)
        parts = body.get(list_key) or () if list_key is not None else (body,)
        for part in parts:
            sealed, user = part.get("s"), part.get("u")
            if isinstance(sealed, dict) and isinstance(user, str) and "k" in sealed:
                keys = self.vault.export(user)
                if keys is not None and sealed["k"] not in keys:
                    raise StorageError(f"sealed under a data key {user} does not have")

    def _install_key(self, body: Mapping[str, Any], *, authoritative: bool = False) -> None:
        """Store a user's wrapped keys: from the log the first install wins (two nodes made a
        key at once); from a snapshot (``authoritative``) the snapshot's keys replace whatever
        this replica had (its key may be from a life of the account deleted since)."""
        user, rows = body.get("u"), body.get("w")
        if not isinstance(user, str) or not isinstance(rows, list) or not rows:
            raise StorageError("vault.key needs 'u' and 'w'")
        wrapped: dict[int, bytes] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)):
                raise StorageError("vault.key rows are [key id, wrapped key]")
            if not isinstance(row[1], bytes):
                raise StorageError("a wrapped key is bytes")
            wrapped[row[0]] = row[1]
        if authoritative:
            if self.vault.export(user) != wrapped:
                self.vault.destroy(user)
                self.vault.install(user, wrapped)
            return
        if user in self.state.accounts and self.vault.export(user) is None:
            raise StorageError(f"{user} exists without a key; refusing a late key")
        self.vault.install(user, wrapped)

    def snapshot_group(self, group: str) -> bytes:
        self.finish_loading()
        keep = self._in_group(group)
        views = {
            view.name: _filter(_SNAPSHOT_SHAPES[view.name], view.to_snapshot(), keep)
            for view in self.state.views
        }
        keys: dict[str, list[list[Any]]] = {}
        for user in self.vault.users():
            if keep(user):
                wrapped = self.vault.export(user) or {}
                keys[user] = [[key_id, blob] for key_id, blob in sorted(wrapped.items())]
        data: bytes = msgpack.packb(
            {
                "f": SNAPSHOT_FORMAT,
                "applied": self.applied(group),
                "seen": [[n, b, s] for (n, b), s in self._seen.get(group, {}).items()],
                "views": views,
                "keys": keys,
            },
            use_bin_type=True,
        )
        return data

    def restore_group(self, group: str, data: bytes) -> None:
        if self._loading is not None:
            self._loading[group] = data
            return
        self._restore({group: data}, installed=True)

    def finish_loading(self) -> None:
        """Merge the snapshots gathered while the driver restored its groups (once)."""
        if self._loading is None:
            return
        gathered, self._loading = self._loading, None
        if gathered:
            self._restore(gathered, installed=False)

    def _restore(self, snapshots: Mapping[str, bytes], *, installed: bool) -> None:
        """Replace the groups' parts of the views by ``snapshots``: this node's own at start
        (its log then replays what came after), or ``installed`` from a leader (this node had
        fallen behind the leader's log)."""
        decoded = {}
        for group, data in snapshots.items():
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False) if data else {}
            if obj and obj.get("f") != SNAPSHOT_FORMAT:
                raise StorageError(f"snapshot of {group} has an unknown format")
            decoded[group] = obj or {}
        owned = [self._in_group(group) for group in decoded]

        def elsewhere(key: str) -> bool:
            return not any(mine(key) for mine in owned)

        # Keys first: the views' restore unseals with them.
        present = {group: set(obj.get("keys") or {}) for group, obj in decoded.items()}
        for user in self.vault.users():
            if not elsewhere(user) and not any(user in keys for keys in present.values()):
                self.vault.destroy(user)  # deleted in the history the snapshot covers
                if installed:
                    # A deletion this node never applied: its log may still hold the key.
                    for hook in self.on_delete:
                        hook(user)
                else:
                    # At start a user made after the snapshot is missing too, until the log
                    # replays its key: the node checks again once it caught up.
                    self.destroyed_at_start.add(user)
        for obj in decoded.values():
            for user, rows in (obj.get("keys") or {}).items():
                self._install_key({"u": user, "w": rows}, authoritative=True)
        for view in self.state.views:
            shape = _SNAPSHOT_SHAPES[view.name]
            merged = _filter(shape, view.to_snapshot(), elsewhere)
            for obj in decoded.values():
                merged = _merge(shape, merged, (obj.get("views") or {}).get(view.name))
            view.restore(merged, self._unseal)
        for group, obj in decoded.items():
            self._seen[group] = {
                (str(row[0]), int(row[1])): int(row[2]) for row in obj.get("seen") or ()
            }
            applied = obj.get("applied", 0)
            self._advance(group, applied if isinstance(applied, int) else 0)


class ShardApplication:
    """The :class:`~villaged.cluster.driver.GroupApplication` of one data shard."""

    def __init__(self, group: str, shared: ReplicatedState) -> None:
        self.group = group
        self.shared = shared

    def apply(self, entry: Entry) -> None:
        self.shared.apply_entry(self.group, entry)

    def restore(self, data: bytes) -> None:
        self.shared.restore_group(self.group, data)

    def applied_through(self, index: int) -> None:
        self.shared.applied_through(self.group, index)

    def snapshot(self) -> bytes:
        return self.shared.snapshot_group(self.group)


class MetaApplication:
    """The meta group: the membership every node agreed on. The first leader commits the
    member list it was configured with; a node configured with another list finds out (and
    says so loudly) instead of placing shards differently from its peers."""

    def __init__(self, members: Mapping[str, str]) -> None:
        self.configured = dict(members)
        self.committed: dict[str, str] | None = None
        self.applied = 0

    @property
    def agrees(self) -> bool | None:
        """Whether the committed membership is this node's (None: nothing committed yet)."""
        return None if self.committed is None else self.committed == self.configured

    def proposal(self) -> bytes:
        data: bytes = msgpack.packb({"members": self.configured}, use_bin_type=True)
        return data

    def apply(self, entry: Entry) -> None:
        self.applied = entry.index
        try:
            obj = msgpack.unpackb(entry.data, raw=False)
            members = obj["members"]
            if not isinstance(members, dict):
                raise TypeError("members is not a map")
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            log.error("bad meta entry", extra={"event": "cluster.meta_bad", "error": str(exc)})
            return
        if self.committed is None:
            self.committed = {str(k): str(v) for k, v in members.items()}
            if not self.agrees:
                log.critical(
                    "this node's [[cluster.nodes]] differ from the membership the cluster "
                    "committed; fix the config to match the other nodes",
                    extra={
                        "event": "cluster.membership_mismatch",
                        "configured": sorted(self.configured),
                        "committed": sorted(self.committed),
                    },
                )

    def restore(self, data: bytes) -> None:
        obj = msgpack.unpackb(data, raw=False) if data else {}
        members = obj.get("members")
        self.committed = dict(members) if isinstance(members, dict) else None

    def snapshot(self) -> bytes:
        data: bytes = msgpack.packb({"members": self.committed}, use_bin_type=True)
        return data


class PendingReplicated:
    """A record handed to :meth:`Replicator.submit`: ``wait`` returns once every part is
    committed by a majority and applied on this node."""

    __slots__ = ("_done", "_error", "_parts")

    def __init__(self, parts: int) -> None:
        self._parts = parts
        self._done = trio.Event()
        self._error: BaseException | None = None
        if parts == 0:
            self._done.set()

    def _part_done(self, error: BaseException | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._parts -= 1
        if self._parts <= 0 or error is not None:
            self._done.set()

    @property
    def index(self) -> int:
        return 0

    @property
    def durable(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> int:
        with trio.CancelScope(shield=True):  # like the local log: the outcome is learnt
            await self._done.wait()
        if self._error is not None:
            raise CommitFailedError(str(self._error)) from self._error
        return 0


@dataclass
class _Proposing:
    done: trio.Event = field(default_factory=trio.Event)
    result: tuple[int, int] = (0, 0)
    error: Exception | None = None


@dataclass
class _Outbox:
    group: str
    items: deque[tuple[Record, PendingReplicated]] = field(default_factory=deque)
    seq: int = 0
    wake: trio.Event = field(default_factory=trio.Event)


class Replicator:
    """This node's writes into the shards, and the forwarded proposals it serves as leader."""

    def __init__(
        self,
        node_id: str,
        driver: NodeDriver,
        shared: ReplicatedState,
        send_app: Callable[[str, str, Any], bool],
        *,
        commit_timeout: float = 10.0,
        retry_interval: float = 0.05,
    ) -> None:
        self.node_id = node_id
        self.driver = driver
        self.shared = shared
        self.shards = shared.shards
        self._send_app = send_app
        self.commit_timeout = commit_timeout
        self.retry_interval = retry_interval
        self._outboxes = {group_name(n): _Outbox(group_name(n)) for n in range(shared.shards)}
        self._ids = itertools.count(1)
        self._boot = secrets.randbits(62)
        #: How long one attempt waits before the batch is proposed again (it carries its
        #: batch id, so a copy that committed meanwhile is applied once).
        self.attempt_timeout = max(1.0, 20 * retry_interval)
        # Requests sent to leaders: id -> (the peer asked, its answer arrived, the answer).
        self._forwarded: dict[int, tuple[str, trio.Event, list[Any]]] = {}
        self._serving = 0
        self._proposing: dict[tuple[str, BatchId], _Proposing] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.rejected_frames = 0

    KINDS: Final = frozenset({"fwd.propose", "fwd.read", "fwd.done", "fwd.fail"})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for outbox in self._outboxes.values():
                    nursery.start_soon(self._send_loop, outbox)
                task_status.started()
        finally:
            self._stopped = True
            stopping = CommitFailedError("the node is stopping")
            for outbox in self._outboxes.values():
                while outbox.items:
                    outbox.items.popleft()[1]._part_done(stopping)

    # --- writing ---

    def submit(self, record: Record) -> PendingReplicated:
        """Queue ``record`` (split by shard); never waits. The caller validated it."""
        size = len(msgpack.packb(record.body, use_bin_type=True))
        if size > MAX_RECORD_BYTES:
            raise RecordTooLargeError(
                f"a {record.type} record of {size} bytes exceeds {MAX_RECORD_BYTES} bytes"
            )
        parts = split_record(record, self.shards)
        if self._stopped:
            pending = PendingReplicated(1)
            pending._part_done(CommitFailedError("the node is stopping"))
            return pending
        pending = PendingReplicated(len(parts))
        for shard, part in parts.items():
            outbox = self._outboxes[group_name(shard)]
            outbox.items.append((part, pending))
            outbox.wake.set()
        return pending

    async def commit(self, record: Record) -> None:
        await self.submit(record).wait()

    async def ensure_key(self, user: str) -> crypto.DataKey:
        """The user's data key, committed to their shard first if they have none."""
        key = self.shared.vault.cached_data_key(user)
        if key is None:
            key = await trio.to_thread.run_sync(self.shared.vault.existing_data_key, user)
        if key is not None:
            return key
        wrapped = self.shared.vault.new_wrapped(user)
        body = {"u": user, "w": [[key_id, blob] for key_id, blob in wrapped.items()]}
        await self.commit(Record(KEY_RECORD, body))
        key = await trio.to_thread.run_sync(self.shared.vault.existing_data_key, user)
        if key is None:
            raise CommitFailedError(f"the data key of {user} was not installed")
        return key

    def in_touch(self, key: str) -> bool:
        """Whether this node hears the leader of ``key``'s shard: its copy of the shard is
        current within an election timeout (see RaftNode.in_touch)."""
        return self.driver.in_touch(group_name(shard_of(key, self.shards)))

    async def catch_up(self, keys: Iterable[str]) -> None:
        """Wait until this node has applied everything its shards of ``keys`` (bare JIDs or
        domains) had committed when this was called: a read barrier (Raft's ReadIndex, minus
        the leadership check: enough for causality). A stanza that arrives from another node
        right after its sender's write reads that write here too."""
        groups = sorted({group_name(shard_of(key, self.shards)) for key in keys if key})
        deadline = trio.current_time() + self.commit_timeout
        for group in groups:
            index = await self._read_index(group, deadline)
            with trio.move_on_at(deadline):
                await self.shared.wait_applied(group, index)
                continue
            raise CommitFailedError(f"{group}: this node lags behind its leader")

    async def _read_index(self, group: str, deadline: float) -> int:
        while True:
            leader = self.driver.leader_node(group)
            if leader == self.node_id:
                index = self.driver.read_index(group)
                if index is not None:
                    return index
                await trio.sleep(self.retry_interval)  # a new leader: not yet caught up
                continue
            attempt = min(deadline, trio.current_time() + self.attempt_timeout)
            try:
                if leader is None:
                    raise NotLeaderError(None)
                return await self._ask(leader, "fwd.read", {"g": group}, group, attempt)
            except (NotLeaderError, _NoAnswerError):
                if trio.current_time() + self.retry_interval >= deadline:
                    raise CommitFailedError(f"{group} has no leader to read from") from None
                await trio.sleep(self.retry_interval)

    async def _send_loop(self, outbox: _Outbox) -> None:
        while True:
            if not outbox.items:
                outbox.wake = trio.Event()
                await outbox.wake.wait()
                continue
            batch: list[tuple[Record, PendingReplicated]] = []
            size = 0
            while outbox.items and len(batch) < MAX_BATCH_RECORDS:
                record_bytes = len(msgpack.packb(outbox.items[0][0].body, use_bin_type=True))
                if batch and size + record_bytes > MAX_BATCH_BYTES:
                    break  # the next batch starts with it
                batch.append(outbox.items.popleft())
                size += record_bytes
            error: BaseException | None = CommitFailedError("the node is stopping")
            try:
                outbox.seq += 1
                batch_id = BatchId(self.node_id, self._boot, outbox.seq)
                data = encode_entry([r for r, _ in batch], batch_id)
                await self._commit_batch(outbox.group, data)
                error = None
            except (CommitFailedError, RaftError, ValueError) as exc:
                error = exc
                log.warning(
                    "a batch was not committed",
                    extra={
                        "event": "cluster.commit_failed",
                        "group": outbox.group,
                        "records": len(batch),
                        "error": str(exc),
                    },
                )
            finally:
                for _, pending in batch:
                    pending._part_done(error)

    async def _commit_batch(self, group: str, data: bytes) -> None:
        """Propose ``data`` until a leader reports it committed; each attempt is bounded by
        ``attempt_timeout`` (a leader cut off or gone never answers), the whole by
        ``commit_timeout``. Proposing again is safe: the batch id makes a second copy a no-op.
        """
        deadline = trio.current_time() + self.commit_timeout
        while True:
            leader = self.driver.leader_node(group)
            attempt = min(deadline, trio.current_time() + self.attempt_timeout)
            index = None
            try:
                with trio.move_on_at(attempt):
                    if leader == self.node_id:
                        index, _term = await self.driver.propose(group, data)
                    elif leader is not None:
                        index = await self._forward(leader, group, data, attempt)
                    else:
                        raise NotLeaderError(None)
            except (NotLeaderError, ProposalDroppedError, ProposalLostError, _NoAnswerError):
                pass
            if index is not None:
                break
            if trio.current_time() + self.retry_interval >= deadline:
                raise CommitFailedError(f"{group} did not commit in time (leader: {leader})")
            await trio.sleep(self.retry_interval)
        # Committed by a majority: wait until it is applied here too (read your writes).
        with trio.move_on_at(deadline):
            await self.shared.wait_applied(group, index)
            return
        raise CommitFailedError(f"{group} committed index {index} but this node lags behind")

    async def _forward(self, leader: str, group: str, data: bytes, deadline: float) -> int:
        return await self._ask(leader, "fwd.propose", {"g": group, "d": data}, group, deadline)

    async def _ask(
        self, leader: str, kind: str, body: dict[str, Any], group: str, deadline: float
    ) -> int:
        """Send a request to ``leader``; the index it answers with (``fwd.done``)."""
        request_id = next(self._ids)
        done = trio.Event()
        reply: list[Any] = []
        self._forwarded[request_id] = (leader, done, reply)
        try:
            if not self._send_app(leader, kind, {**body, "id": request_id}):
                raise NotLeaderError(None)
            self.forwarded_out += 1
            with trio.move_on_at(deadline):
                await done.wait()
            if not reply:
                raise _NoAnswerError(f"{group}: no answer from the leader {leader} in time")
            kind, body = reply
            if kind == "fwd.done":
                index = body.get("i")
                if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                    raise CommitFailedError(f"{group}: the leader sent a bad index")
                return index
            code = body.get("e")
            if code in ("not-leader", "busy"):
                hint = body.get("l")
                raise NotLeaderError(hint if isinstance(hint, str) else None)
            raise CommitFailedError(f"{group}: the leader {leader} reports {code}")
        finally:
            del self._forwarded[request_id]

    # --- frames from peers ---

    def receive(self, peer_id: str, frame: AppFrame) -> None:
        body = frame.body
        if not isinstance(body, dict) or not isinstance(body.get("id"), int):
            self.rejected_frames += 1
            return
        if frame.kind == "fwd.read":
            group = body.get("g")
            if not isinstance(group, str):
                self.rejected_frames += 1
                return
            try:
                index = (
                    self.driver.read_index(group)
                    if self.driver.leader_node(group) == self.node_id
                    else None
                )
                answer: dict[str, Any] = (
                    {"id": body["id"], "i": index}
                    if index is not None
                    else {"id": body["id"], "e": "not-leader", "l": self.driver.leader_node(group)}
                )
            except (KeyError, RuntimeError):
                self._send_app(peer_id, "fwd.fail", {"id": body["id"], "e": "no-such-group"})
                return
            self._send_app(peer_id, "fwd.done" if "i" in answer else "fwd.fail", answer)
            return
        if frame.kind == "fwd.propose":
            group, data = body.get("g"), body.get("d")
            if not isinstance(group, str) or not isinstance(data, bytes):
                self.rejected_frames += 1
                return
            try:  # a peer proposes its own batches only, for the group they belong to
                batch, _records = decode_entry(data)
            except (StorageError, ValueError, msgpack.ExtraData, msgpack.FormatError):
                self.rejected_frames += 1
                return
            if batch.node != peer_id:
                self.rejected_frames += 1
                self._send_app(peer_id, "fwd.fail", {"id": body["id"], "e": "refused"})
                return
            if self._serving >= MAX_FORWARDED or self._nursery is None:
                self._send_app(peer_id, "fwd.fail", {"id": body["id"], "e": "busy"})
                return
            self._serving += 1
            self.forwarded_in += 1
            self._nursery.start_soon(self._serve_forwarded, peer_id, body["id"], group, data, batch)
            return
        waiting = self._forwarded.get(body["id"])
        if waiting is None:
            return  # answered too late: the proposer gave up
        asked, done, reply = waiting
        if asked != peer_id:
            self.rejected_frames += 1  # only the node asked may answer
            return
        reply[:] = [frame.kind, body]
        done.set()

    async def _propose_once(self, group: str, data: bytes, batch: BatchId) -> tuple[int, int]:
        """Propose a forwarded batch, or, when the same batch is already being proposed here
        (its sender retried while the first copy waits for its commit), wait for that one: a
        slow disk must not fill the log with copies of one batch."""
        key = (group, batch)
        first = self._proposing.get(key)
        if first is not None:
            await first.done.wait()
            if first.error is not None:
                raise first.error
            return first.result
        mine = self._proposing[key] = _Proposing()
        try:
            mine.result = await self.driver.propose(group, data)
            return mine.result
        except BaseException as exc:
            mine.error = exc if isinstance(exc, Exception) else ProposalLostError("cancelled")
            raise
        finally:
            del self._proposing[key]
            mine.done.set()

    async def _serve_forwarded(
        self, peer_id: str, request_id: int, group: str, data: bytes, batch: BatchId
    ) -> None:
        try:
            try:
                with trio.fail_after(self.commit_timeout):
                    index, term = await self._propose_once(group, data, batch)
            except NotLeaderError as exc:
                answer = {"id": request_id, "e": "not-leader", "l": exc.leader}
                self._send_app(peer_id, "fwd.fail", answer)
            except (KeyError, RuntimeError):
                self._send_app(peer_id, "fwd.fail", {"id": request_id, "e": "no-such-group"})
            except ProposalDroppedError:
                self._send_app(peer_id, "fwd.fail", {"id": request_id, "e": "busy"})
            except (ProposalLostError, RaftError, trio.TooSlowError, ValueError) as exc:
                self._send_app(peer_id, "fwd.fail", {"id": request_id, "e": type(exc).__name__})
            else:
                self._send_app(peer_id, "fwd.done", {"id": request_id, "i": index, "t": term})
        finally:
            self._serving -= 1
