"""The shard map and replica placement of a cluster: which Raft group holds a user, which nodes
replicate each group, and which single-server membership changes move a cluster from one
placement to the next. Pure computation (sans-I/O): no clock, no randomness, no sockets.

Theory of operation
-------------------
**Shards.** A bare JID maps to one of ``shards`` shards (default 16) by the first 8 bytes of the
SHA-256 of its UTF-8 form, big-endian, modulo ``shards`` (:func:`shard_of`). Python's ``hash()``
would not do: it is salted per process (``PYTHONHASHSEED``) and may change between Python
versions, and every node, process and release must agree forever on where a user lives. With
2**64 hash values the modulo bias for at most 4096 shards is below 2**-52.

**Groups.** Shard ``N`` is the Raft group ``"shard-N"``; the small ``"meta"`` group (which stores
the placement itself, see :func:`to_wire`) is placed exactly like a shard.

**Zones.** Each group has ``replicas`` voters (default 3). A group is *spread* when no zone holds
more than ``min(k, nodes in that zone)`` of its voters, ``k`` being the smallest cap the zones
allow at all. With at least ``replicas`` zones ``k`` is 1: the voters are in distinct zones, so
losing a zone costs each group at most one voter. With fewer zones it is best effort and this
module says so here: with 2 zones and 3 replicas every group has 2 voters in one zone and 1 in
the other (both zones always used), so losing the wrong zone loses that group's quorum; the load
balancing below makes each zone hold the majority of roughly half of the groups, not all of them.
With 1 zone there is nothing to spread.

**Balance.** Within the spread rule, replica counts per node are balanced: a greedy fill (fewest
zones used first, then least-loaded node, then node id) followed by a local search that moves one
replica from a node to one with at least 2 fewer until no such move keeps the group spread.
Guaranteed: within a zone counts differ by at most 1, and across all nodes by at most 1 when every
zone has one node. When zones have unequal node counts, global +-1 may be impossible (3 zones of
2, 2 and 1 nodes with 3 replicas: every group needs the lone node), and spreading wins.
Preferred leaders (the first voter of each group) are then balanced separately and optimally for
the chosen voter sets: leaders are shifted along chains of groups until no node leads at least 2
more groups than another node it could hand a leadership to, directly or by a chain (a
semi-matching with no cost-reducing path, which minimises the largest count).

**Determinism.** Members are sorted by node id and every tie is broken by node id or group order,
so the same member set gives the same placement in any order, on any node.

**Changes.** :func:`rebalanced` computes the balanced placement for a new member set that keeps
current voters wherever the rules allow: departed nodes are dropped, groups that break the (new)
spread rule or are too large shed surplus voters (the most loaded, never the leader first), holes
are filled, and only then does the local search move replicas, each move from a node to one with
at least 2 fewer (onto a joining node, say). :func:`rebalance` turns the difference into
:class:`Move` records, one voter added or removed at a time (Raft's single-server changes, which
need no joint consensus), adding before removing so that a group never has fewer voters than the
smaller of its start and end (so never fewer than ``replicas`` when both have that many). Among
pending removals a departed node goes first, then the one whose loss keeps the most live zones.
Moves of different groups are independent; those of one group must run in order, each committed
before the next.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_REPLICAS",
    "DEFAULT_SHARDS",
    "MAX_REPLICAS",
    "MAX_SHARDS",
    "META_GROUP",
    "WIRE_VERSION",
    "Member",
    "Move",
    "Placement",
    "apply_move",
    "from_wire",
    "group_ids",
    "group_of",
    "place",
    "rebalance",
    "rebalanced",
    "shard_of",
    "to_wire",
]

DEFAULT_SHARDS: Final = 16
DEFAULT_REPLICAS: Final = 3
MAX_SHARDS: Final = 4096
#: Raft groups beyond a handful of voters only slow commits down; this bounds the wire format.
MAX_REPLICAS: Final = 15
META_GROUP: Final = "meta"
WIRE_VERSION: Final = 1
#: A group may hold one voter more than ``MAX_REPLICAS`` between an add and its remove.
_MAX_VOTERS: Final = MAX_REPLICAS + 1
_MAX_NODE_ID: Final = 255


@dataclass(frozen=True, slots=True)
class Member:
    """A node of the cluster: its id, its failure domain (zone) and its peer ``host:port``."""

    node_id: str
    zone: str
    address: str

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        if not self.zone:
            raise ValueError(f"member {self.node_id!r} has an empty zone")
        host, sep, port = self.address.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                f"member {self.node_id!r} has address {self.address!r}, expected host:port"
            )


@dataclass(frozen=True, slots=True)
class Placement:
    """Which nodes replicate each group (``"meta"``, ``"shard-0"`` ...), preferred leader first.

    ``replicas`` is stored read-only in group order; equal placements compare equal.
    """

    shards: int
    replicas: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        _check_shards(self.shards)
        expected = group_ids(self.shards)
        if set(self.replicas) != set(expected):
            raise ValueError(
                f"a placement of {self.shards} shards needs exactly the groups "
                f"{META_GROUP!r} and 'shard-0'..'shard-{self.shards - 1}'"
            )
        ordered: dict[str, tuple[str, ...]] = {}
        for group in expected:
            voters = self.replicas[group]
            if not isinstance(voters, tuple) or not 0 < len(voters) <= _MAX_VOTERS:
                raise ValueError(f"group {group!r} needs a tuple of 1 to {_MAX_VOTERS} node ids")
            for node_id in voters:
                _check_node_id(node_id)
            if len(set(voters)) != len(voters):
                raise ValueError(f"group {group!r} lists a node twice: {voters!r}")
            ordered[group] = voters
        object.__setattr__(self, "replicas", MappingProxyType(ordered))

    def groups_on(self, node_id: str) -> tuple[str, ...]:
        """The groups ``node_id`` is a voter of, in group order."""
        return tuple(group for group, voters in self.replicas.items() if node_id in voters)


@dataclass(frozen=True, slots=True)
class Move:
    """One single-server membership change of ``group``: exactly one of ``add`` / ``remove``."""

    group: str
    add: str | None
    remove: str | None

    def __post_init__(self) -> None:
        if (self.add is None) == (self.remove is None):
            raise ValueError("a move adds one voter or removes one voter, not both or neither")


# --- shards -------------------------------------------------------------------------------------


def shard_of(bare_jid: str, shards: int = DEFAULT_SHARDS) -> int:
    """The shard of ``bare_jid``, which must already be prepared (PRECIS, lowercase domain):
    ``User@Example.org`` and ``user@example.org`` are different strings and may land apart."""
    _check_shards(shards)
    if not bare_jid:
        raise ValueError("empty JID")
    if "/" in bare_jid:
        # Neither a localpart nor a domainpart may contain "/": this is a full JID.
        raise ValueError(f"{bare_jid!r} has a resource; shards are keyed by bare JIDs")
    digest = hashlib.sha256(bare_jid.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def group_of(bare_jid: str, shards: int = DEFAULT_SHARDS) -> str:
    """The Raft group holding ``bare_jid``: ``"shard-N"``."""
    return f"shard-{shard_of(bare_jid, shards)}"


def group_ids(shards: int) -> tuple[str, ...]:
    """Every group of a placement in group order: ``"meta"``, then ``"shard-0"`` upwards."""
    _check_shards(shards)
    return (META_GROUP, *(f"shard-{n}" for n in range(shards)))


# --- placement ----------------------------------------------------------------------------------


def place(
    members: Sequence[Member], *, shards: int = DEFAULT_SHARDS, replicas: int = DEFAULT_REPLICAS
) -> Placement:
    """A balanced, spread placement of every group over ``members`` (order does not matter)."""
    _check_shards(shards)
    layout = _Layout(members, replicas)
    groups: dict[str, list[str]] = {group: [] for group in group_ids(shards)}
    layout.fill(groups)
    layout.improve(groups, {})
    return Placement(shards, layout.with_leaders(groups, {}))


def rebalanced(
    current: Placement, members: Sequence[Member], *, replicas: int = DEFAULT_REPLICAS
) -> Placement:
    """The balanced placement for ``members`` closest to ``current``: voters that are still
    members and still spread stay, and preferred leaders stay where they can."""
    layout = _Layout(members, replicas)
    leaders = {group: voters[0] for group, voters in current.replicas.items()}
    groups = {
        group: [n for n in voters if n in layout.zone_of]
        for group, voters in current.replicas.items()
    }
    layout.trim(groups, leaders)
    layout.fill(groups)
    layout.improve(groups, leaders)
    return Placement(current.shards, layout.with_leaders(groups, leaders))


def rebalance(
    current: Placement, members: Sequence[Member], *, replicas: int = DEFAULT_REPLICAS
) -> list[Move]:
    """The moves from ``current`` to :func:`rebalanced` (``current``, ``members``), group by
    group, adds before removes."""
    target = rebalanced(current, members, replicas=replicas)
    zone_of = {m.node_id: m.zone for m in members}
    return [
        move
        for group, start in current.replicas.items()
        for move in _group_moves(group, start, target.replicas[group], zone_of)
    ]


def apply_move(placement: Placement, move: Move) -> Placement:
    """``placement`` after ``move``: an added voter goes last; removing the preferred leader makes
    the next voter preferred."""
    voters = placement.replicas.get(move.group)
    if voters is None:
        raise ValueError(f"no group {move.group!r} in this placement")
    if move.add is not None:
        if move.add in voters:
            raise ValueError(f"{move.add!r} already votes in {move.group!r}")
        voters = (*voters, move.add)
    else:
        if move.remove not in voters:
            raise ValueError(f"{move.remove!r} is not a voter of {move.group!r}")
        voters = tuple(n for n in voters if n != move.remove)
    return Placement(placement.shards, {**placement.replicas, move.group: voters})


# --- wire ---------------------------------------------------------------------------------------


def to_wire(placement: Placement) -> dict[str, Any]:
    """``placement`` as a msgpack-able map (what the meta group stores)."""
    return {
        "version": WIRE_VERSION,
        "shards": placement.shards,
        "groups": {group: list(voters) for group, voters in placement.replicas.items()},
    }


def from_wire(data: object) -> Placement:
    """The :class:`Placement` in ``data`` (from :func:`to_wire`); ValueError if it is malformed."""
    if not isinstance(data, dict):
        raise ValueError("a placement is a map of exactly version, shards and groups")
    if data.get("version") != WIRE_VERSION:
        raise ValueError(f"unknown placement version {data.get('version')!r}")
    if set(data) != {"version", "shards", "groups"}:
        raise ValueError("a placement is a map of exactly version, shards and groups")
    shards, groups = data["shards"], data["groups"]
    if type(shards) is not int or not isinstance(groups, dict):
        raise ValueError("placement shards must be an integer and groups a map")
    replicas: dict[str, tuple[str, ...]] = {}
    for group, voters in groups.items():
        if not isinstance(group, str) or not isinstance(voters, list | tuple):
            raise ValueError(f"placement group {group!r} must map a name to a list of node ids")
        replicas[group] = tuple(voters)
    return Placement(shards, replicas)


# --- internals ----------------------------------------------------------------------------------


def _check_shards(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, not {shards}")


def _check_node_id(node_id: object) -> None:
    if not isinstance(node_id, str) or not 0 < len(node_id) <= _MAX_NODE_ID:
        raise ValueError(f"a node id is a string of 1 to {_MAX_NODE_ID} characters: {node_id!r}")


def _group_moves(
    group: str, start: tuple[str, ...], goal: tuple[str, ...], zone_of: Mapping[str, str]
) -> list[Move]:
    """One group's moves from ``start`` to ``goal``: each add is followed by a remove while the
    group has more voters than ``goal`` wants, so it never has fewer than ``start`` or ``goal``."""
    moves: list[Move] = []
    voters = list(start)
    removals = [n for n in start if n not in goal]

    def remove_one() -> None:
        victim = max(removals, key=lambda n: _removal_preference(n, voters, zone_of))
        removals.remove(victim)
        voters.remove(victim)
        moves.append(Move(group, None, victim))

    for node_id in goal:
        if node_id not in start:
            voters.append(node_id)
            moves.append(Move(group, node_id, None))
            if removals and len(voters) > len(goal):
                remove_one()
    while removals:
        remove_one()
    return moves


def _removal_preference(
    node_id: str, voters: list[str], zone_of: Mapping[str, str]
) -> tuple[bool, int, str]:
    """Higher is removed first: departed nodes, then the one whose loss keeps the most live
    zones among ``voters``, then the lowest node id (``max`` over a negated-order key)."""
    if node_id not in zone_of:
        return (True, 0, _descending(node_id))
    rest = {zone_of[n] for n in voters if n != node_id and n in zone_of}
    return (False, len(rest), _descending(node_id))


def _descending(text: str) -> str:
    # Turn max() into "lowest id wins" without a second pass: invert every code point.
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


class _Layout:
    """The member set of one computation and the rules every group must keep."""

    def __init__(self, members: Sequence[Member], replicas: int) -> None:
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
        ordered = sorted(members, key=lambda m: m.node_id)
        twice = sorted(n for n, count in Counter(m.node_id for m in ordered).items() if count > 1)
        if twice:
            raise ValueError(f"node ids listed more than once: {', '.join(twice)}")
        if len(ordered) < replicas:
            raise ValueError(
                f"{replicas} replicas need at least {replicas} members, not {len(ordered)}"
            )
        self.replicas = replicas
        self.nodes = tuple(m.node_id for m in ordered)
        self.zone_of = {m.node_id: m.zone for m in ordered}
        sizes = Counter(self.zone_of.values())
        # The smallest per-zone cap that still lets a group find `replicas` voters.
        cap = 1
        while sum(min(size, cap) for size in sizes.values()) < replicas:
            cap += 1
        self.zone_cap = {zone: min(size, cap) for zone, size in sizes.items()}

    def loads(self, groups: Mapping[str, list[str]]) -> dict[str, int]:
        loads = dict.fromkeys(self.nodes, 0)
        for voters in groups.values():
            for node_id in voters:
                loads[node_id] += 1
        return loads

    def trim(self, groups: dict[str, list[str]], leaders: Mapping[str, str]) -> None:
        """Drop voters from groups that break the spread rule or exceed ``replicas``: from an
        over-full zone first, then from a zone holding two; the leader last, the most loaded
        first."""
        loads = self.loads(groups)
        for group, voters in groups.items():
            while True:
                zones = Counter(self.zone_of[n] for n in voters)
                over = [
                    n for n in voters if zones[self.zone_of[n]] > self.zone_cap[self.zone_of[n]]
                ]
                if not over and len(voters) <= self.replicas:
                    break
                doubled = [n for n in voters if zones[self.zone_of[n]] > 1]
                pool = over or doubled or voters
                victim = max(
                    pool, key=lambda n: (n != leaders.get(group), loads[n], _descending(n))
                )
                voters.remove(victim)
                loads[victim] -= 1

    def fill(self, groups: dict[str, list[str]]) -> None:
        """Top every group up to ``replicas`` voters: a zone the group uses least, then the least
        loaded node. Always possible: the caps sum to at least ``replicas`` and each zone's cap is
        at most its node count."""
        loads = self.loads(groups)
        for voters in groups.values():
            while len(voters) < self.replicas:
                zones = Counter(self.zone_of[n] for n in voters)
                pick = min(
                    (
                        n
                        for n in self.nodes
                        if n not in voters
                        and zones[self.zone_of[n]] < self.zone_cap[self.zone_of[n]]
                    ),
                    key=lambda n: (zones[self.zone_of[n]], loads[n], n),
                )
                voters.append(pick)
                loads[pick] += 1

    def improve(self, groups: dict[str, list[str]], leaders: Mapping[str, str]) -> None:
        """Move single replicas from a node to one with at least 2 fewer while the group stays
        spread; each move lowers the sum of squared loads, so this ends. Groups the giving node
        does not lead are tried first (leaders stay put in a rebalance)."""
        loads = self.loads(groups)
        while (move := self._improving_move(groups, leaders, loads)) is not None:
            group, giver, taker = move
            voters = groups[group]
            voters[voters.index(giver)] = taker
            loads[giver] -= 1
            loads[taker] += 1

    def _improving_move(
        self, groups: Mapping[str, list[str]], leaders: Mapping[str, str], loads: Mapping[str, int]
    ) -> tuple[str, str, str] | None:
        by_load = sorted(self.nodes, key=lambda n: (loads[n], n))
        for giver in reversed(by_load):
            candidates = sorted(
                (g for g, voters in groups.items() if giver in voters),
                key=lambda g: leaders.get(g) == giver,
            )
            for taker in [n for n in by_load if loads[giver] - loads[n] >= 2]:
                for group in candidates:
                    if self._may_replace(groups[group], giver, taker):
                        return group, giver, taker
        return None

    def _may_replace(self, voters: list[str], giver: str, taker: str) -> bool:
        if taker in voters:
            return False
        zone = self.zone_of[taker]
        if zone == self.zone_of[giver]:
            return True
        zones = Counter(self.zone_of[n] for n in voters)
        # Stay under the cap, and never trade a zone the group holds once for one it holds.
        return zones[zone] < self.zone_cap[zone] and (
            zones[zone] == 0 or zones[self.zone_of[giver]] > 1
        )

    def with_leaders(
        self, groups: Mapping[str, list[str]], leaders: Mapping[str, str]
    ) -> dict[str, tuple[str, ...]]:
        """Each group's voters, preferred leader first and the rest by node id. Leaders start as
        in ``leaders`` (or the voter leading fewest so far) and are shifted along chains of
        groups until no node leads 2 more than a node reachable from it."""
        led = dict.fromkeys(self.nodes, 0)
        leader: dict[str, str] = {}
        for group, voters in groups.items():
            keep = leaders.get(group)
            if keep is not None and keep in voters:
                chosen = keep
            else:
                chosen = min(voters, key=lambda n: (led[n], n))
            leader[group] = chosen
            led[chosen] += 1
        while self._shift_one_leadership(groups, leader, led):
            pass
        return {
            group: (leader[group], *sorted(n for n in voters if n != leader[group]))
            for group, voters in groups.items()
        }

    def _shift_one_leadership(
        self, groups: Mapping[str, list[str]], leader: dict[str, str], led: dict[str, int]
    ) -> bool:
        led_by: dict[str, list[str]] = {n: [] for n in self.nodes}
        for group, node_id in leader.items():
            led_by[node_id].append(group)
        for start in sorted(self.nodes, key=lambda n: (-led[n], n)):
            # Breadth-first over "start leads g, and v is a voter of g": v could take g over.
            came_from: dict[str, tuple[str, str] | None] = {start: None}
            frontier = [start]
            while frontier:
                following: list[str] = []
                for node_id in frontier:
                    for group in led_by[node_id]:
                        for voter in groups[group]:
                            if voter in came_from:
                                continue
                            came_from[voter] = (group, node_id)
                            if led[voter] <= led[start] - 2:
                                self._shift_path(voter, came_from, leader, led)
                                return True
                            following.append(voter)
                frontier = following
        return False

    @staticmethod
    def _shift_path(
        end: str,
        came_from: Mapping[str, tuple[str, str] | None],
        leader: dict[str, str],
        led: dict[str, int],
    ) -> None:
        led[end] += 1
        step = came_from[end]
        while step is not None:
            group, previous = step
            leader[group] = end
            end = previous
            step = came_from[end]
        led[end] -= 1
