"""Incarnations: what a new node decides from its peers' hellos, and what a leader changes when
a member comes back as a new incarnation."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from villaged.cluster.identity import (
    Identity,
    IdentityError,
    decide,
    node_of,
    voter_id,
)
from villaged.cluster.node import _membership_change

if TYPE_CHECKING:
    from pathlib import Path

PEERS = frozenset({"n2", "n3"})


def test_names() -> None:
    assert voter_id("n1", "ab12") == "n1~ab12"
    assert node_of("n1~ab12") == "n1"
    assert node_of("n1") == "n1"


def test_a_new_directory_gets_an_incarnation_that_survives_restarts(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "cluster")
    assert not first.decided
    again = Identity.load_or_create(tmp_path / "cluster")
    assert again == first
    decided = first.decide(tmp_path / "cluster", boot={"n1": first.incarnation}, joiner=False)
    assert Identity.load_or_create(tmp_path / "cluster") == decided
    assert ((tmp_path / "cluster/identity.json").stat().st_mode & 0o777) == 0o600
    # Another directory is another incarnation.
    assert Identity.load_or_create(tmp_path / "other").incarnation != first.incarnation


def test_a_damaged_identity_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(IdentityError, match=r"identity\.json is damaged"):
        Identity.load_or_create(tmp_path)


def test_everyone_new_starts_once_every_peer_is_heard() -> None:
    me = Identity("aaaa")
    assert decide("n1", me, {"n2": ("bbbb", None)}, PEERS) is None
    boot, joiner = decide("n1", me, {"n2": ("bbbb", None), "n3": ("cccc", None)}, PEERS) or (
        None,
        True,
    )
    assert boot == {"n1": "aaaa", "n2": "bbbb", "n3": "cccc"}
    assert not joiner


def test_a_peer_that_started_with_us_is_followed() -> None:
    me = Identity("aaaa")
    boot = {"n1": "aaaa", "n2": "bbbb", "n3": "cccc"}
    assert decide("n1", me, {"n2": ("bbbb", boot)}, PEERS) == (boot, False)


def test_a_peer_that_knows_another_incarnation_of_us_makes_us_a_joiner() -> None:
    me = Identity("ffff")
    boot = {"n1": "aaaa", "n2": "bbbb", "n3": "cccc"}
    # It joins with the membership the cluster started with: its groups then know their
    # first voters (the logs it is sent from index 1 assume them; a snapshot it makes of that
    # prefix names them), and it still votes nowhere (its incarnation is not among them).
    assert decide("n1", me, {"n3": ("cccc", boot)}, PEERS) == (boot, True)
    other = {"n1": "eeee", "n2": "bbbb", "n3": "cccc"}
    assert decide("n1", me, {"n2": ("bbbb", boot), "n3": ("cccc", other)}, PEERS) == (None, True)
    joined = Identity("ffff", boot, joiner=True)
    assert joined.decided
    # It passes the boot on: a later joiner that hears only it learns the membership too.
    assert joined.advertised_boot == boot
    others = frozenset({"n1", "n3"})
    assert decide("n2", Identity("gggg"), {"n1": ("ffff", boot)}, others) == (boot, True)


def test_a_lost_incarnation_is_removed_then_the_new_one_added() -> None:
    voters = frozenset({"n1~a", "n2~b", "n3~c"})
    placed = ("n1", "n2", "n3")
    hellos = {"n2": ("b", None), "n3": ("new", None)}
    assert _membership_change(voters, placed, hellos, "n1") == ("", "n3~c")
    assert _membership_change(voters - {"n3~c"}, placed, hellos, "n1") == ("n3~new", "")
    assert _membership_change(voters - {"n3~c"} | {"n3~new"}, placed, hellos, "n1") is None
    # Nothing is known of a node not heard from: nothing changes.
    assert _membership_change(voters, placed, {}, "n1") is None


def test_after_a_forced_recovery_the_placed_come_back_and_an_unplaced_voter_goes() -> None:
    # n4 survived alone and was forced to be the one voter of a group placed on n1, n2, n3.
    placed = ("n1", "n2", "n3")
    hellos = {"n1": ("a", None), "n2": ("b", None), "n3": ("c", None)}
    voters = frozenset({"n4~d"})
    assert _membership_change(voters, placed, hellos, "n4") == ("n1~a", "")
    voters |= {"n1~a", "n2~b"}
    assert _membership_change(voters, placed, hellos, "n4") == ("n3~c", "")
    # Every placed node votes: n4 (not placed) goes, itself, last.
    voters |= {"n3~c", "n5~e"}
    assert _membership_change(voters, placed, hellos, "n4") == ("", "n5~e")
    assert _membership_change(voters - {"n5~e"}, placed, hellos, "n4") == ("", "n4~d")
    # Not before: while a placed node is missing, the unplaced voter keeps the quorum.
    assert _membership_change(frozenset({"n4~d", "n1~a"}), placed, {}, "n4") is None


def test_a_log_without_its_identity_or_an_identity_without_its_log_is_refused(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "cluster"
    identity = Identity.load_or_create(directory)
    identity.decide(directory, boot=None, joiner=True)
    assert Identity.load_or_create(directory).joiner  # decided, its (empty) log is there
    (directory / "wal").rmdir()
    # The log is gone but the identity says the node started: it would forget its votes.
    with pytest.raises(IdentityError, match=r"Raft log \(.*\) is gone"):
        Identity.load_or_create(directory)
    (directory / "wal").mkdir()
    (directory / "wal/00000000000000000001.seg").write_bytes(b"x")
    (directory / "identity.json").unlink()
    with pytest.raises(IdentityError, match="holds a Raft log but"):
        Identity.load_or_create(directory)


def test_a_joiner_peer_proves_the_cluster_runs() -> None:
    assert Identity("aaaa", None, joiner=True).advertised_boot == {}
    assert Identity("aaaa").advertised_boot is None
    me = Identity("ffff")
    # Every peer is a joiner (each lost its disk once): still a running cluster, never a
    # new one started from empty logs.
    assert decide("n1", me, {"n2": ("bbbb", {}), "n3": ("cccc", {})}, PEERS) == (None, True)


def test_conflicting_or_malformed_boots_are_not_followed() -> None:
    me = Identity("aaaa")
    one = {"n1": "aaaa", "n2": "bbbb", "n3": "cccc"}
    other = {"n1": "aaaa", "n2": "bbbb", "n3": "dddd"}
    assert decide("n1", me, {"n2": ("bbbb", one), "n3": ("dddd", other)}, PEERS) is None
    # A boot that does not list exactly the configured nodes proves only that it started.
    assert decide("n1", me, {"n2": ("bbbb", {"n1": "aaaa", "n2": "bbbb"})}, PEERS) == (
        None,
        True,
    )
    # A hello without an incarnation (an older node) changes no membership.
    voters = frozenset({"n1~a", "n2~b", "n3~c"})
    assert _membership_change(voters, ("n1", "n2", "n3"), {"n3": ("", None)}, "n1") is None
