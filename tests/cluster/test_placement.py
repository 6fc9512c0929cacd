"""The shard map and replica placement: stable hashing, spread and balance, and the membership
changes that move a cluster from one placement to the next."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgpack
import pytest

from villaged.cluster.placement import (
    MAX_REPLICAS,
    MAX_SHARDS,
    META_GROUP,
    Member,
    Move,
    Placement,
    apply_move,
    from_wire,
    group_ids,
    group_of,
    place,
    rebalance,
    rebalanced,
    shard_of,
    to_wire,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


def member(node_id: str, zone: str) -> Member:
    return Member(node_id, zone, f"{node_id}.cluster.example:7400")


def members(layout: str) -> list[Member]:
    """``"a:z1 b:z2"`` → members a in zone z1 and b in zone z2."""
    return [member(*item.split(":")) for item in layout.split()]


def replica_counts(placement: Placement, nodes: Sequence[Member]) -> dict[str, int]:
    counts = Counter(n for voters in placement.replicas.values() for n in voters)
    return {m.node_id: counts[m.node_id] for m in nodes}


def leader_counts(placement: Placement, nodes: Sequence[Member]) -> dict[str, int]:
    counts = Counter(voters[0] for voters in placement.replicas.values())
    return {m.node_id: counts[m.node_id] for m in nodes}


def spread(counts: dict[str, int]) -> int:
    return max(counts.values()) - min(counts.values())


def assert_balanced_within_zones(placement: Placement, nodes: Sequence[Member]) -> None:
    counts = replica_counts(placement, nodes)
    for zone in {m.zone for m in nodes}:
        in_zone = {m.node_id: counts[m.node_id] for m in nodes if m.zone == zone}
        assert spread(in_zone) <= 1, (zone, in_zone)


def assert_distinct_zones(placement: Placement, nodes: Sequence[Member], replicas: int) -> None:
    zone_of = {m.node_id: m.zone for m in nodes}
    for group, voters in placement.replicas.items():
        assert len(voters) == replicas, group
        assert len({zone_of[n] for n in voters}) == replicas, (group, voters)


# --- shards -------------------------------------------------------------------------------------

#: Computed once with this module and frozen: a change here moves every user of a live cluster.
KNOWN_SHARDS = [
    ("alice@example.org", 16, 0),
    ("bob@example.org", 16, 13),
    ("carol@example.net", 16, 10),
    ("example.org", 16, 6),
    ("dave@xn--bcher-kva.example", 16, 8),
    ("élodie@example.org", 16, 0),
    ("alice@example.org", 4096, 2704),
    ("bob@example.org", 4096, 941),
    ("élodie@example.org", 4096, 1104),
    ("bob@example.org", 1, 0),
]


@pytest.mark.parametrize(("jid", "shards", "expected"), KNOWN_SHARDS)
def test_known_jids_map_to_known_shards(jid: str, shards: int, expected: int) -> None:
    assert shard_of(jid, shards) == expected
    assert group_of(jid, shards) == f"shard-{expected}"


def test_the_hash_is_the_documented_one() -> None:
    digest = hashlib.sha256("élodie@example.org".encode()).digest()
    assert shard_of("élodie@example.org", 4096) == int.from_bytes(digest[:8], "big") % 4096
    assert shard_of("alice@example.org") == shard_of("alice@example.org", 16)


def test_jids_spread_evenly_over_shards() -> None:
    counts = Counter(shard_of(f"user{n}@example.org", 16) for n in range(10_000))
    assert set(counts) == set(range(16))
    mean = 10_000 / 16
    assert all(0.8 * mean <= count <= 1.2 * mean for count in counts.values()), counts


@pytest.mark.parametrize(
    ("jid", "shards", "message"),
    [
        ("alice@example.org/phone", 16, "resource"),
        ("example.org/x", 16, "resource"),
        ("", 16, "empty"),
        ("alice@example.org", 0, "shards"),
        ("alice@example.org", MAX_SHARDS + 1, "shards"),
    ],
)
def test_shard_of_refuses(jid: str, shards: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shard_of(jid, shards)
    with pytest.raises(ValueError, match=message):
        group_of(jid, shards)


def test_group_ids() -> None:
    assert group_ids(3) == (META_GROUP, "shard-0", "shard-1", "shard-2")
    assert len(group_ids(MAX_SHARDS)) == MAX_SHARDS + 1


# --- place --------------------------------------------------------------------------------------


def test_three_nodes_in_three_zones_hold_everything() -> None:
    nodes = members("a:z1 b:z2 c:z3")
    placement = place(nodes)
    assert placement.shards == 16
    assert list(placement.replicas) == list(group_ids(16))
    assert all(set(voters) == {"a", "b", "c"} for voters in placement.replicas.values())
    assert spread(leader_counts(placement, nodes)) <= 1
    assert placement.groups_on("a") == group_ids(16)
    assert placement.groups_on("nobody") == ()


def test_five_nodes_in_three_zones() -> None:
    nodes = members("a:z1 b:z2 c:z3 d:z1 e:z2")
    placement = place(nodes)
    assert_distinct_zones(placement, nodes, 3)
    assert_balanced_within_zones(placement, nodes)
    # Every group needs the only node of z3: spread wins over global balance.
    assert replica_counts(placement, nodes) == {"a": 9, "b": 9, "c": 17, "d": 8, "e": 8}
    assert spread(leader_counts(placement, nodes)) <= 1


@pytest.mark.parametrize(
    "layout",
    [
        "a:z1 b:z2 c:z3 d:z4",
        "a:z1 b:z2 c:z3 d:z4 e:z5",
        "n1:z1 n2:z2 n3:z3 n4:z4 n5:z5 n6:z6 n7:z7",
        "a:z1 b:z2 c:z3 d:z4 e:z4 f:z1",
        "a:z1 b:z1 c:z2 d:z2 e:z3 f:z3",
    ],
)
def test_balanced_when_zones_allow(layout: str) -> None:
    nodes = members(layout)
    placement = place(nodes)
    assert_distinct_zones(placement, nodes, 3)
    assert spread(replica_counts(placement, nodes)) <= 1
    assert spread(leader_counts(placement, nodes)) <= 1


def test_two_zones_is_best_effort() -> None:
    nodes = members("a:z1 b:z2 c:z1 d:z2")
    placement = place(nodes)
    zone_of = {m.node_id: m.zone for m in nodes}
    majority: Counter[str] = Counter()
    for voters in placement.replicas.values():
        zones = Counter(zone_of[n] for n in voters)
        assert sorted(zones.values()) == [1, 2]  # both zones used, as spread as 3-in-2 can be
        majority[zones.most_common(1)[0][0]] += 1
    # Losing a zone loses the quorum of about half of the groups, not all of them.
    assert abs(majority["z1"] - majority["z2"]) <= 1
    assert spread(replica_counts(placement, nodes)) <= 1
    assert spread(leader_counts(placement, nodes)) <= 1


def test_a_lone_node_in_a_zone_joins_every_group() -> None:
    nodes = members("a:z1 b:z1 c:z2")
    placement = place(nodes)
    assert all(set(voters) == {"a", "b", "c"} for voters in placement.replicas.values())


def test_one_zone_and_five_replicas_of_larger_groups() -> None:
    nodes = members("a:z b:z c:z d:z e:z f:z g:z")
    placement = place(nodes, shards=64, replicas=5)
    assert all(len(voters) == 5 for voters in placement.replicas.values())
    assert spread(replica_counts(placement, nodes)) <= 1
    assert spread(leader_counts(placement, nodes)) <= 1


def test_five_replicas_over_three_zones_hold_at_most_two_per_zone() -> None:
    nodes = members("a:z1 b:z1 c:z2 d:z2 e:z3 f:z3")
    placement = place(nodes, shards=8, replicas=5)
    zone_of = {m.node_id: m.zone for m in nodes}
    for voters in placement.replicas.values():
        assert sorted(Counter(zone_of[n] for n in voters).values()) == [1, 2, 2]


def test_placement_ignores_member_order() -> None:
    nodes = members("a:z1 b:z2 c:z3 d:z1 e:z2")
    expected = place(nodes)
    for order in itertools.permutations(nodes):
        assert place(order) == expected


@pytest.mark.parametrize(
    ("nodes", "options", "message"),
    [
        (members("a:z1 b:z2 a:z3"), {}, "listed more than once: a"),
        (members("a:z1 b:z2"), {}, "at least 3 members, not 2"),
        (members("a:z1 b:z2 c:z3"), {"replicas": 0}, "replicas must be between"),
        (members("a:z1 b:z2 c:z3"), {"replicas": MAX_REPLICAS + 1}, "replicas must be between"),
        (members("a:z1 b:z2 c:z3"), {"shards": 0}, "shards must be between"),
        (members("a:z1 b:z2 c:z3"), {"shards": MAX_SHARDS + 1}, "shards must be between"),
    ],
)
def test_place_refuses(nodes: list[Member], options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        place(nodes, **options)


@pytest.mark.parametrize(
    ("node_id", "zone", "address", "message"),
    [
        ("", "z1", "h:1", "node id"),
        ("x" * 256, "z1", "h:1", "node id"),
        ("a", "", "h:1", "empty zone"),
        ("a", "z1", "host", "host:port"),
        ("a", "z1", ":7400", "host:port"),
        ("a", "z1", "host:port", "host:port"),
        ("a", "z1", "host:0", "host:port"),
        ("a", "z1", "host:65536", "host:port"),
    ],
)
def test_member_refuses(node_id: str, zone: str, address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Member(node_id, zone, address)


def test_member_accepts_ipv6() -> None:
    assert Member("a", "z1", "[2001:db8::1]:7400").address == "[2001:db8::1]:7400"


def test_placement_is_read_only_and_compares_by_value() -> None:
    placement = place(members("a:z1 b:z2 c:z3"), shards=2)
    with pytest.raises(TypeError):
        placement.replicas["meta"] = ("a",)  # type: ignore[index]
    shuffled = dict(reversed(list(placement.replicas.items())))
    assert Placement(2, shuffled) == placement
    assert list(Placement(2, shuffled).replicas) == list(group_ids(2))


# --- rebalance ----------------------------------------------------------------------------------


def walk(
    current: Placement, moves: list[Move], after: Sequence[Member], replicas: int
) -> Placement:
    """Apply ``moves`` one at a time, checking each group never has fewer voters (or live zones)
    than at both its start and its end; returns the final placement."""
    zone_of = {m.node_id: m.zone for m in after}
    target = rebalanced(current, after, replicas=replicas)

    def live_zones(voters: Sequence[str]) -> int:
        return len({zone_of[n] for n in voters if n in zone_of})

    placement = current
    for move in moves:
        placement = apply_move(placement, move)
        voters = placement.replicas[move.group]
        start, goal = current.replicas[move.group], target.replicas[move.group]
        assert len(voters) >= min(len(start), len(goal)), move
        assert live_zones(voters) >= min(live_zones(start), live_zones(goal)), move
    return placement


def check_rebalance(current: Placement, after: list[Member], replicas: int = 3) -> list[Move]:
    moves = rebalance(current, after, replicas=replicas)
    target = rebalanced(current, after, replicas=replicas)
    final = walk(current, moves, after, replicas)
    for group, voters in final.replicas.items():
        assert set(voters) == set(target.replicas[group])
        assert len(voters) == replicas
    assert_balanced_within_zones(target, after)
    assert spread(leader_counts(target, after)) <= 1
    # Each group's moves come in one run, groups in placement order.
    order = [move.group for move in moves]
    assert order == sorted(order, key=list(group_ids(current.shards)).index)
    return moves


def adds(moves: list[Move]) -> list[str]:
    return [move.add for move in moves if move.add is not None]


def removes(moves: list[Move]) -> list[str]:
    return [move.remove for move in moves if move.remove is not None]


def test_a_balanced_placement_needs_no_moves() -> None:
    nodes = members("a:z1 b:z2 c:z3 d:z1 e:z2")
    current = place(nodes)
    assert rebalance(current, list(reversed(nodes))) == []
    assert rebalanced(current, nodes) == current


def test_a_node_joins_in_a_new_zone() -> None:
    before = members("a:z1 b:z2 c:z3")
    after = [*before, member("d", "z4")]
    current = place(before)
    moves = check_rebalance(current, after)
    # The newcomer takes exactly its share (51 replicas over 4 nodes), one voter out per voter in.
    assert adds(moves) == ["d"] * 12
    assert Counter(removes(moves)) == {"a": 4, "b": 4, "c": 4}
    target = rebalanced(current, after)
    assert_distinct_zones(target, after, 3)
    assert spread(replica_counts(target, after)) <= 1
    # Preferred leaders stay where they were unless the newcomer needs some.
    moved = sum(target.replicas[g][0] != current.replicas[g][0] for g in current.replicas)
    assert moved <= leader_counts(target, after)["d"]


def test_a_node_joins_an_existing_zone() -> None:
    before = members("a:z1 b:z2 c:z3")
    after = [*before, member("d", "z1")]
    moves = check_rebalance(place(before), after)
    assert adds(moves) == ["d"] * 8
    assert removes(moves) == ["a"] * 8
    for add, remove in zip(moves[::2], moves[1::2], strict=True):
        assert add == Move(add.group, "d", None)
        assert remove == Move(add.group, None, "a")


def test_a_node_leaves_and_its_zone_keeps_a_node() -> None:
    before = members("a:z1 b:z2 c:z3 d:z1 e:z2")
    after = [m for m in before if m.node_id != "d"]
    current = place(before)
    moves = check_rebalance(current, after)
    assert removes(moves) == ["d"] * len(current.groups_on("d"))
    assert adds(moves) == ["a"] * len(current.groups_on("d"))
    for first, second in itertools.pairwise(moves):
        if first.add is not None:
            assert second == Move(first.group, None, "d")  # add before remove


def test_a_node_leaves_and_takes_its_zone() -> None:
    before = members("a:z1 b:z2 c:z3 d:z4")
    after = [m for m in before if m.node_id != "d"]
    current = place(before)
    moves = check_rebalance(current, after)
    assert set(removes(moves)) == {"d"}
    assert all(
        set(voters) == {"a", "b", "c"} for voters in rebalanced(current, after).replicas.values()
    )


def test_a_third_zone_appears_and_groups_spread_out() -> None:
    before = members("a:z1 b:z2 c:z1 d:z2")
    after = [*before, member("e", "z3")]
    current = place(before)
    check_rebalance(current, after)
    assert_distinct_zones(rebalanced(current, after), after, 3)


def test_a_dead_node_is_removed_before_a_live_one() -> None:
    # Going from 5 voters to 3 with one of them gone: the departed node goes first.
    before = members("a:z1 b:z2 c:z3 d:z4 e:z5")
    current = place(before, shards=4, replicas=5)
    after = [m for m in before if m.node_id != "e"]
    moves = check_rebalance(current, after, replicas=3)
    for group in current.replicas:
        group_removes = [m.remove for m in moves if m.group == group]
        assert group_removes[0] == "e"
        assert len(group_removes) == 2


def test_replicas_grow_and_shrink() -> None:
    nodes = members("a:z1 b:z2 c:z3 d:z4 e:z5")
    three = place(nodes, shards=4)
    grow = check_rebalance(three, nodes, replicas=5)
    assert removes(grow) == []
    five = rebalanced(three, nodes, replicas=5)
    shrink = check_rebalance(five, nodes, replicas=3)
    assert adds(shrink) == []


def test_shrinking_within_two_zones_keeps_both_zones() -> None:
    nodes = members("a:z1 b:z1 c:z1 d:z2 e:z2 f:z2")
    five = place(nodes, shards=4, replicas=5)
    three = rebalanced(five, nodes, replicas=3)
    zone_of = {m.node_id: m.zone for m in nodes}
    for voters in three.replicas.values():
        assert sorted(Counter(zone_of[n] for n in voters).values()) == [1, 2]
    check_rebalance(five, nodes, replicas=3)


def test_every_member_replaced() -> None:
    before = members("a:z1 b:z2 c:z3")
    after = members("x:z1 y:z2 z:z3")
    moves = check_rebalance(place(before), after)
    assert len(moves) == 2 * 3 * 17


def test_rebalance_refuses_like_place() -> None:
    current = place(members("a:z1 b:z2 c:z3"))
    with pytest.raises(ValueError, match="at least 3 members"):
        rebalance(current, members("a:z1 b:z2"))
    with pytest.raises(ValueError, match="listed more than once"):
        rebalanced(current, members("a:z1 b:z2 b:z3"))


def test_move_is_one_change() -> None:
    with pytest.raises(ValueError, match="not both or neither"):
        Move("meta", "a", "b")
    with pytest.raises(ValueError, match="not both or neither"):
        Move("meta", None, None)


def test_apply_move() -> None:
    current = place(members("a:z1 b:z2 c:z3"), shards=1)
    leader = current.replicas["meta"][0]
    grown = apply_move(current, Move("meta", "d", None))
    assert grown.replicas["meta"] == (*current.replicas["meta"], "d")
    shrunk = apply_move(grown, Move("meta", None, leader))
    assert shrunk.replicas["meta"] == tuple(n for n in grown.replicas["meta"] if n != leader)
    with pytest.raises(ValueError, match="no group"):
        apply_move(current, Move("shard-9", "d", None))
    with pytest.raises(ValueError, match="already votes"):
        apply_move(current, Move("meta", "a", None))
    with pytest.raises(ValueError, match="not a voter"):
        apply_move(current, Move("meta", None, "d"))


# --- wire ---------------------------------------------------------------------------------------


def test_wire_round_trip_through_msgpack() -> None:
    placement = place(members("a:z1 b:z2 c:z3 d:z1 e:z2"))
    data = msgpack.unpackb(msgpack.packb(to_wire(placement)))
    assert data["version"] == 1
    assert from_wire(data) == placement
    tuples = msgpack.unpackb(msgpack.packb(to_wire(placement)), use_list=False)
    assert from_wire(tuples) == placement


def wire(**changes: Any) -> dict[str, Any]:
    data = to_wire(place(members("a:z1 b:z2 c:z3"), shards=2))
    data.update(changes)
    return data


def groups(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = wire()["groups"]
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "exactly version, shards and groups"),
        ({"version": 1, "shards": 2}, "exactly version, shards and groups"),
        ({"shards": 2, "groups": {}}, "unknown placement version None"),
        (wire(extra=1), "exactly version, shards and groups"),
        (wire(version=2), "unknown placement version 2"),
        (wire(shards="2"), "shards must be an integer"),
        (wire(shards=True), "shards must be an integer"),
        (wire(shards=0), "shards must be between"),
        (wire(groups=[]), "groups a map"),
        (wire(groups={**groups(), 1: ["a"]}), "must map a name"),
        (wire(groups=groups(meta="a")), "must map a name"),
        (wire(groups={"meta": ["a"], "shard-0": ["a"]}), "exactly the groups"),
        (wire(groups=groups(extra=["a"])), "exactly the groups"),
        (wire(groups=groups(meta=[])), "1 to 16 node ids"),
        (wire(groups=groups(meta=[f"n{i}" for i in range(17)])), "1 to 16 node ids"),
        (wire(groups=groups(meta=["a", 7])), "node id"),
        (wire(groups=groups(meta=["a", ""])), "node id"),
        (wire(groups=groups(meta=["a", "b", "a"])), "lists a node twice"),
    ],
)
def test_from_wire_refuses(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_wire(data)


def test_placement_refuses_a_list_of_voters() -> None:
    with pytest.raises(ValueError, match="tuple"):
        Placement(1, {"meta": ("a",), "shard-0": ["a"]})  # type: ignore[dict-item]


@pytest.mark.parametrize("seed", range(4))
def test_random_topologies_keep_the_rules(seed: int) -> None:
    """Seeded random clusters, each changed by a join and/or a leave: spread, balance within
    zones, safe intermediate steps, and a rebalanced placement that needs no further moves."""
    rng = random.Random(seed)
    for trial in range(40):
        replicas = rng.choice([1, 2, 3, 3, 5])
        zones = rng.randint(1, 6)
        before = [
            member(f"n{i}", f"z{rng.randrange(zones)}") for i in range(rng.randint(replicas, 9))
        ]
        shards = rng.choice([1, 4, 16, 33])
        current = place(before, shards=shards, replicas=replicas)
        assert place(list(reversed(before)), shards=shards, replicas=replicas) == current
        assert_balanced_within_zones(current, before)
        if len({m.zone for m in before}) >= replicas:
            assert_distinct_zones(current, before, replicas)

        after = list(before)
        if rng.random() < 0.6 and len(after) > replicas:
            after.pop(rng.randrange(len(after)))
        if rng.random() < 0.6 or len(after) < replicas:
            after.append(member(f"new{trial}", f"z{rng.randrange(zones + 1)}"))
        check_rebalance(current, after, replicas)
        target = rebalanced(current, after, replicas=replicas)
        if len({m.zone for m in after}) >= replicas:
            assert_distinct_zones(target, after, replicas)
        assert rebalance(target, after, replicas=replicas) == []
