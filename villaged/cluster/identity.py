"""A cluster node's identity on its own disk: its incarnation, and the membership it started with.

This module owns ``<[storage] dir>/cluster/identity.json`` and the names Raft knows nodes by.

Theory of operation
-------------------
Raft is safe only if no voter ever forgets a vote. A node whose disk is lost (or replaced by an
empty one) has forgotten every vote it cast, so it must not come back as the same voter. Each
data directory therefore gets an *incarnation* (random, made when the directory is first used),
and Raft knows a node as ``<node id>~<incarnation>`` (:func:`voter_id`). A node that comes back
empty is a new voter: the leader of each of its groups replaces the old incarnation by the new
one (remove, then add: single-server membership changes) and catches it up by snapshot and log.
Nobody has to do anything by hand.

Which incarnations a cluster starts with is decided once, when every node is new: nodes tell
each other their incarnation in the link hello, together with the membership they started with
(``boot``), if any. An undecided node

* adopts a peer's ``boot`` that names this node's own incarnation (the others started while this
  one was still deciding);
* is a *joiner* when a peer's ``boot`` names another incarnation of this node (its disk was lost
  since): it starts its groups with no voters and waits to be added;
* otherwise, once it has heard every peer and none has started, starts the cluster with
  everyone's incarnation (every node hears the same set, so all decide the same).

The decision is written durably before any group starts, so a restart keeps it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from villaged.ops.tlsfiles import write_private_file

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["SEPARATOR", "Identity", "node_of", "voter_id"]

SEPARATOR: Final = "~"
FILE_NAME: Final = "identity.json"
FORMAT: Final = "villaged-cluster-identity 1"


def voter_id(node: str, incarnation: str) -> str:
    return f"{node}{SEPARATOR}{incarnation}"


def node_of(voter: str) -> str:
    """The node id of a Raft member id (``n1~ab12`` → ``n1``)."""
    return voter.partition(SEPARATOR)[0]


class IdentityError(Exception):
    """The identity file is unreadable (the message names it)."""


@dataclass(frozen=True, slots=True)
class Identity:
    incarnation: str
    #: The incarnation of every node when the cluster started (None: not decided yet).
    boot: Mapping[str, str] | None = None
    #: This incarnation joined a running cluster. Its ``boot`` is the membership the cluster
    #: started with, as its peers said (so its groups know their first voters, as the entries
    #: from index 1 assume), or None if no peer said one (its groups start without voters).
    joiner: bool = False

    @property
    def decided(self) -> bool:
        return self.boot is not None or self.joiner

    @property
    def advertised_boot(self) -> dict[str, str] | None:
        """What the hello says: the boot membership (a joiner's is the one it adopted), ``{}``
        for a joiner that heard none (the cluster runs all the same), None while undecided."""
        if self.boot is not None:
            return dict(self.boot)
        return {} if self.joiner else None

    @classmethod
    def load_or_create(cls, directory: Path) -> Identity:
        """The identity of the data directory's cluster side (``directory``, which also holds
        the Raft log in ``wal/``). A log without an identity, or a started identity without a
        log, is refused: the node would vote with votes it has forgotten."""
        path = directory / FILE_NAME
        wal = directory / "wal"
        has_log = wal.is_dir() and any(wal.iterdir())
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if has_log:
                raise IdentityError(
                    f"{wal} holds a Raft log but {path} is missing; restore it, or empty"
                    f" {directory} to rejoin as a new incarnation"
                ) from None
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            identity = cls(secrets.token_hex(4))
            identity.save(directory)
            return identity
        try:
            doc: Any = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError("unknown format")
            incarnation, boot, joiner = doc["incarnation"], doc.get("boot"), doc["joiner"]
            if not isinstance(incarnation, str) or not incarnation.isalnum():
                raise ValueError("bad incarnation")
            if boot is not None and not (
                isinstance(boot, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in boot.items())
            ):
                raise ValueError("bad boot")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"{path} is damaged: {exc}") from None
        identity = cls(incarnation, boot, bool(joiner))
        if identity.decided and not wal.is_dir():  # (``decide`` makes it first)
            raise IdentityError(
                f"{path} says this node has started but its Raft log ({wal}) is gone; remove"
                f" {directory} entirely to rejoin as a new incarnation"
            )
        return identity

    def decide(self, directory: Path, *, boot: Mapping[str, str] | None, joiner: bool) -> Identity:
        # The log's directory first: a decided identity without it means the log was lost.
        (directory / "wal").mkdir(mode=0o700, exist_ok=True)
        decided = Identity(self.incarnation, dict(boot) if boot is not None else None, joiner)
        decided.save(directory)
        return decided

    def save(self, directory: Path) -> None:
        doc = {
            "format": FORMAT,
            "incarnation": self.incarnation,
            "boot": dict(self.boot) if self.boot is not None else None,
            "joiner": self.joiner,
        }
        write_private_file(directory / FILE_NAME, json.dumps(doc, indent=1).encode())
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def decide(
    me: str,
    identity: Identity,
    hellos: Mapping[str, tuple[str, Mapping[str, str] | None]],
    peers: frozenset[str],
) -> tuple[Mapping[str, str] | None, bool] | None:
    """The start-up decision of an undecided node from the hellos heard so far (peer →
    (incarnation, advertised boot)): ``(boot, joiner)``, or None while it must wait.

    A peer that started the cluster with this incarnation is followed; any other started
    peer (its boot names another incarnation of this node, or it is a joiner itself: ``{}``)
    proves the cluster runs, so this node joins it. Boots that are malformed (not exactly the
    configured nodes, incarnations not alphanumeric) or that disagree are never followed."""
    nodes = peers | {me}
    boots = []
    started = False
    for _incarnation, boot in hellos.values():
        if boot is None:
            continue
        started = True
        if boot and set(boot) == nodes and all(i.isalnum() for i in boot.values()):
            boots.append(dict(boot))
    mine = [b for b in boots if b.get(me) == identity.incarnation]
    if mine:
        if any(b != mine[0] for b in boots):
            return None  # conflicting memberships: wait (the operator is told)
        return mine[0], False
    if started:
        # Join. The peers that started the cluster say how it started: a joiner's groups
        # start from that membership, like theirs (their logs from index 1 assume it).
        if boots and all(b == boots[0] for b in boots):
            return boots[0], True
        return None, True
    if peers <= set(hellos):
        everyone = {peer: hellos[peer][0] for peer in peers}
        everyone[me] = identity.incarnation
        return everyone, False
    return None
