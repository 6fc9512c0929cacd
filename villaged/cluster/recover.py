"""Forced recovery of a cluster that lost the majority of its voters for good.

When two of a shard's three voters are gone (their zones burnt down, their disks lost), the
shard can never commit again: Raft needs a majority, and a majority of the old membership no
longer exists. ``villaged cluster force-recover`` is the last resort. On a *stopped* surviving
node it appends to every group's log a membership entry naming this node alone, in a term
above any the group has seen, and records its own vote for that term. Started again, the node
is the only voter of every group: it elects itself, commits what its log holds (entries it
had but the lost majority may never have committed included), and serves on its own. The
other nodes then come back with **empty data directories**: each is a new incarnation that
the recovered leader adds back, one at a time, as their hellos arrive (villaged.cluster.node),
and that catches up by snapshot and log.

This is unsafe by nature and says so: acknowledged writes that reached only the lost nodes are
gone, and a lost node that comes back with its old data could form a majority of the old
membership with another one and accept writes that the recovered cluster never sees. Hence
the flag it requires, and the refusal while the node runs (the data directory's lock).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from villaged.cluster.driver import WAL_DIR, DriverConfig
from villaged.cluster.identity import Identity, IdentityError, voter_id
from villaged.cluster.placement import Member, group_ids, place
from villaged.cluster.raft import (
    Entry,
    EntryKind,
    HardState,
    RaftConfig,
    RaftNode,
    Ready,
    encode_voters,
)
from villaged.cluster.wal import LOG_DIR, NodeWal

if TYPE_CHECKING:
    from villaged.config import Config

__all__ = ["GroupRecovery", "RecoverError", "force_recover"]


class RecoverError(Exception):
    """The recovery cannot be done (the message says why and what to do)."""


@dataclass(frozen=True, slots=True)
class GroupRecovery:
    group: str
    voters_before: frozenset[str]
    term: int  # the term of the new membership entry
    index: int  # its index
    committed_before: int  # what the group had committed as far as this node knew


async def force_recover(config: Config) -> list[GroupRecovery]:
    """Make this (stopped) node the only voter of every group it hosts; see the module."""
    from villaged.storage.store import lock_directory

    cluster = config.cluster
    if not cluster.enabled:
        raise RecoverError(f"{config.source}: this node is not in a cluster ([cluster] enabled)")
    directory = config.storage.dir / "cluster"
    if not (directory / WAL_DIR / LOG_DIR).is_dir():
        raise RecoverError(f"{directory}: no Raft log here: nothing to recover from")
    lock = lock_directory(config.storage.dir)  # DataDirError while the node runs
    try:
        try:
            identity = Identity.load_or_create(directory)
        except (IdentityError, OSError) as exc:
            raise RecoverError(f"{directory}: {exc}") from None
        if identity.boot is None:
            raise RecoverError(
                f"{directory}: this node never knew how the cluster started (no boot membership"
                " in its identity): it holds no group to recover"
            )
        me = voter_id(config.server.node, identity.incarnation)
        members = [Member(n.id, n.zone, str(n.address)) for n in cluster.nodes]
        placement = place(members, shards=cluster.shards, replicas=cluster.replicas)
        boot = identity.boot
        limits = DriverConfig()  # as the node's driver opens it
        wal = await trio.to_thread.run_sync(
            partial(
                NodeWal.open,
                directory / WAL_DIR,
                max_entry_bytes=limits.max_entry_bytes,
                segment_bytes=limits.segment_bytes,
            )
        )
        done: list[GroupRecovery] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(wal.run)
            try:
                for group in group_ids(cluster.shards):
                    first_voters = {
                        voter_id(node, boot[node])
                        for node in placement.replicas[group]
                        if node in boot
                    }
                    recovery = await _recover_group(wal, group, me, first_voters)
                    if recovery is not None:
                        done.append(recovery)
            finally:
                wal.close()
        return done
    finally:
        os.close(lock)


async def _recover_group(
    wal: NodeWal, group: str, me: str, first_voters: set[str]
) -> GroupRecovery | None:
    state = await trio.to_thread.run_sync(wal.load, group)
    node = RaftNode.restore(
        RaftConfig(me, group),
        random.Random(0),  # (never ticked: no timeout is drawn for anything)
        hard_state=state.hard_state,
        snapshot=state.snapshot,
        entries=state.entries,
        voters=first_voters,
    )
    if node.voters == {me}:
        return None  # recovered before (or a group of one voter)
    term = node.term + 1
    index = node.last_index + 1
    entry = Entry(index, term, EntryKind.CONFIG, encode_voters({me}))
    hard_state = HardState(term, me, state.hard_state.commit)
    await wal.persist(group, Ready(hard_state, None, None, (entry,), (), (), None))
    return GroupRecovery(group, node.voters, term, index, node.commit)
