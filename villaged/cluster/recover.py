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
gone. Hence the flag it requires, and the refusal while the node runs (the data directory's
lock). The lost members are *fenced* (``fenced.json`` beside the log): the recovered node never
takes them back and drops their Raft messages, so a lost node that returns with its old data
(and its old incarnation) cannot pull the recovered groups back into the old membership; it
is logged, to be wiped. Run it on one survivor only, the most up to date (each group's last
index and term are printed).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from villaged.cluster.driver import WAL_DIR, DriverConfig
from villaged.cluster.identity import FILE_NAME as IDENTITY_FILE
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
    from pathlib import Path

    from villaged.config import Config

__all__ = ["FENCED_FILE", "GroupRecovery", "RecoverError", "force_recover", "load_fenced"]

#: The members a forced recovery left behind, in the node's cluster directory.
FENCED_FILE: Final = "fenced.json"


class RecoverError(Exception):
    """The recovery cannot be done (the message says why and what to do)."""


@dataclass(frozen=True, slots=True)
class GroupRecovery:
    group: str
    voters_before: frozenset[str]
    term: int  # the term of the new membership entry
    index: int  # its index
    committed_before: int  # what the group had committed as far as this node knew
    last_term_before: int  # the term of its last entry before (compare survivors by it)


def load_fenced(directory: Path) -> frozenset[str]:
    """The members fenced off by forced recoveries of this node (none if it never had one)."""
    try:
        doc = json.loads((directory / FENCED_FILE).read_text())
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError) as exc:
        raise RecoverError(f"{directory / FENCED_FILE}: unreadable: {exc}") from None
    members = doc.get("fenced") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise RecoverError(f"{directory / FENCED_FILE}: 'fenced' is not a list of members")
    return frozenset(members)


def _save_fenced(directory: Path, members: frozenset[str]) -> None:
    path = directory / FENCED_FILE
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"fenced": sorted(members)}, indent=1).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def force_recover(config: Config) -> list[GroupRecovery]:
    """Make this (stopped) node the only voter of every group it hosts; see the module."""
    from villaged.storage.store import lock_directory

    cluster = config.cluster
    if not cluster.enabled:
        raise RecoverError(f"{config.source}: this node is not in a cluster ([cluster] enabled)")
    directory = config.storage.dir / "cluster"
    if not (directory / WAL_DIR / LOG_DIR).is_dir():
        raise RecoverError(f"{directory}: no Raft log here: nothing to recover from")
    if not (directory / IDENTITY_FILE).is_file():
        raise RecoverError(f"{directory}: no {IDENTITY_FILE} beside the Raft log: not recoverable")
    lock = lock_directory(config.storage.dir)  # DataDirError while the node runs
    try:
        try:
            identity = Identity.load_or_create(directory)  # (it exists: only loaded)
        except (IdentityError, OSError) as exc:
            raise RecoverError(f"{directory}: {exc}") from None
        if not identity.decided:
            raise RecoverError(f"{directory}: this node never joined its cluster: nothing here")
        me = voter_id(config.server.node, identity.incarnation)
        members = [Member(n.id, n.zone, str(n.address)) for n in cluster.nodes]
        placement = place(members, shards=cluster.shards, replicas=cluster.replicas)
        boot = identity.boot or {}  # (a joiner that heard none started its groups without)
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
        readies: dict[str, Ready] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(wal.run)
            try:
                for group in group_ids(cluster.shards):
                    first_voters = {
                        voter_id(node, boot[node])
                        for node in placement.replicas[group]
                        if node in boot
                    }
                    planned = await _plan_group(wal, group, me, first_voters)
                    if planned is not None:
                        done.append(planned[0])
                        readies[group] = planned[1]
                fenced = load_fenced(directory) | {
                    voter for item in done for voter in item.voters_before if voter != me
                }
                # Fenced first: a crash before the log is written leaves only a harmless fence
                # (the command is run again); the reverse could start unfenced.
                await trio.to_thread.run_sync(_save_fenced, directory, fenced)
                await wal.persist_many(readies)  # every group at once (one batch)
            finally:
                wal.close()
        return done
    finally:
        os.close(lock)


async def _plan_group(
    wal: NodeWal, group: str, me: str, first_voters: set[str]
) -> tuple[GroupRecovery, Ready] | None:
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
    last_term = node.term_at(node.last_index) or 0
    recovery = GroupRecovery(group, node.voters, term, index, node.commit, last_term)
    return recovery, Ready(hard_state, None, None, (entry,), (), (), None)
