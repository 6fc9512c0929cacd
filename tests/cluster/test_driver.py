"""NodeDriver: three nodes in one trio run over an in-memory network, on real disks, MockClock."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import msgpack
import pytest
import trio
import trio.testing

from villaged.cluster.driver import (
    CAUGHT_UP_ENTRIES,
    DriverConfig,
    NodeDriver,
    NotLeaderError,
    ProposalDroppedError,
    ProposalLostError,
)
from villaged.cluster.raft import AppendEntries, Entry, EntryKind, Heartbeat, Message, Role

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

NODES = ("n1", "n2", "n3")
GROUPS = ("g1", "g2")
CONFIG = DriverConfig(tick_seconds=0.05, election_ticks=10)
TICKS = CONFIG.election_ticks


class ListApp:
    """A state machine that is the list of applied payloads."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.indexes: list[int] = []
        self.restores = 0

    def apply(self, entry: Entry) -> None:
        assert not self.indexes or entry.index > self.indexes[-1]
        self.items.append(entry.data)
        self.indexes.append(entry.index)

    def restore(self, data: bytes) -> None:
        self.items = list(msgpack.unpackb(data))
        self.indexes = []
        self.restores += 1

    def snapshot(self) -> bytes:
        packed: bytes = msgpack.packb(self.items)
        return packed


class MemoryNetwork:
    """Delivers each message straight into the target driver's inbox, unless a side is cut."""

    def __init__(self) -> None:
        self.drivers: dict[str, NodeDriver] = {}
        self.cut: set[str] = set()
        self.sent = 0

    def send(self, message: Message) -> None:
        self.sent += 1
        if message.sender in self.cut or message.to in self.cut:
            return
        driver = self.drivers.get(message.to)
        if driver is not None:
            driver.deliver(message)


class Cluster:
    """Three drivers with manual ticks: a tick is given only when every driver is idle, so the
    run depends on the order of events, not on how long the worker threads' fsyncs take (a
    mock clock that autojumps would otherwise race through election timeouts during each one).
    Waits are bounded in ticks; no ``fail_after`` (autojump would jump straight to it)."""

    def __init__(self, nursery: trio.Nursery, root: Path, config: DriverConfig = CONFIG) -> None:
        self.nursery = nursery
        self.root = root
        self.config = config
        self.network = MemoryNetwork()
        self.apps: dict[str, dict[str, ListApp]] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.stopped: dict[str, trio.Event] = {}
        self.seed = 0
        self.ticks = 0

    async def start(self, node_id: str) -> NodeDriver:
        apps = {g: ListApp() for g in GROUPS}
        self.apps[node_id] = apps
        self.seed += 1
        driver = NodeDriver(
            node_id,
            self.root / node_id,
            self.network,
            dict.fromkeys(GROUPS, NODES),
            self.config,
            applications=apps,
            rng=random.Random(self.seed),
            manual_ticks=True,
        )
        self.network.drivers[node_id] = driver
        await self.nursery.start(self._run, node_id, driver)
        return driver

    async def _run(
        self, node_id: str, driver: NodeDriver, *, task_status: trio.TaskStatus[None]
    ) -> None:
        stopped = self.stopped[node_id] = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self.scopes[node_id] = scope
                await driver.run(task_status=task_status)
        finally:
            stopped.set()

    async def stop(self, node_id: str) -> None:
        self.scopes[node_id].cancel()
        await self.stopped[node_id].wait()
        del self.network.drivers[node_id]

    def driver(self, node_id: str) -> NodeDriver:
        return self.network.drivers[node_id]

    async def quiesce(self) -> None:
        while True:
            for driver in list(self.network.drivers.values()):
                await driver.wait_idle()
            if all(d.idle for d in self.network.drivers.values()):
                return

    async def tick(self) -> None:
        await self.quiesce()
        await trio.sleep(self.config.tick_seconds)
        self.ticks += 1
        for driver in list(self.network.drivers.values()):
            driver.tick()

    async def until(self, predicate: Callable[[], bool], max_ticks: int) -> int:
        """Tick until ``predicate()`` holds at a quiet moment; returns the ticks it took."""
        for ticks in range(max_ticks + 1):
            await self.quiesce()
            if predicate():
                return ticks
            await self.tick()
        raise AssertionError(f"not reached within {max_ticks} ticks")

    def leader_now(self, group: str) -> NodeDriver | None:
        """The running driver that leads ``group`` as every running node agrees, if any."""
        drivers = list(self.network.drivers.values())
        leaders = [d for d in drivers if d.status()[group].role is Role.LEADER]
        if len(leaders) == 1 and all(d.leader(group) == leaders[0].node_id for d in drivers):
            return leaders[0]
        return None

    async def leader(self, group: str, max_ticks: int = 6 * TICKS) -> NodeDriver:
        await self.until(lambda: self.leader_now(group) is not None, max_ticks)
        leader = self.leader_now(group)
        assert leader is not None
        return leader

    async def propose(self, group: str, data: bytes, max_ticks: int = 6 * TICKS) -> None:
        for _ in range(max_ticks):
            leader = self.leader_now(group)
            if leader is not None:
                try:
                    await leader.propose(group, data)
                except (NotLeaderError, ProposalDroppedError, ProposalLostError):
                    pass
                else:
                    return
            await self.tick()
        raise AssertionError(f"{group}: no leader took {data!r} within {max_ticks} ticks")

    def converged(self, group: str, count: int) -> bool:
        """Every running node has applied exactly ``count`` items, the same ones."""
        lists = [self.apps[n][group].items for n in self.network.drivers]
        if not all(len(items) == count for items in lists):
            return False
        assert all(items == lists[0] for items in lists)
        return True


async def test_election_and_100_proposals_applied_in_order_everywhere(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        for node in NODES:
            await cluster.start(node)
        leaders = [await cluster.leader(g) for g in GROUPS]
        leader = leaders[0]
        results: list[tuple[int, int]] = []

        async def propose(n: int) -> None:
            results.append(await leader.propose("g1", b"m%03d" % n))

        async with trio.open_nursery() as proposers:
            for n in range(100):
                proposers.start_soon(propose, n)
        await cluster.until(lambda: cluster.converged("g1", 100), TICKS)
        assert len({index for index, _ in results}) == 100
        app = cluster.apps[leader.node_id]["g1"]
        assert sorted(app.items) == [b"m%03d" % n for n in range(100)]
        assert app.indexes == sorted(index for index, _ in results)  # applied in index order

        # g2 has its own leader and log.
        await cluster.propose("g2", b"other")
        await cluster.until(lambda: cluster.converged("g2", 1), TICKS)

        # Every group's writes of a cycle share one fdatasync: one WAL batch per cycle at most.
        for driver in cluster.network.drivers.values():
            assert driver._wal is not None
            assert 0 < driver._wal.log.batches_written <= driver.cycles

        # A follower refuses proposals and names the leader.
        follower = next(d for d in cluster.network.drivers.values() if d is not leader)
        with pytest.raises(NotLeaderError) as refused:
            await follower.propose("g1", b"x")
        assert refused.value.leader == leader.node_id
        await cluster.until(lambda: not any(leader.status()["g1"].follower_lag.values()), TICKS)
        status = leader.status()["g1"]
        assert status.role is Role.LEADER
        assert status.commit == status.applied
        assert set(status.follower_lag) == set(NODES) - {leader.node_id}
        assert follower.status()["g1"].follower_lag == {}
        nursery.cancel_scope.cancel()


async def test_failover_and_restart_from_disk(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        for node in NODES:
            await cluster.start(node)
        for n in range(10):
            await cluster.propose("g1", b"a%d" % n)
        old = (await cluster.leader("g1")).node_id
        await cluster.stop(old)
        # Within a few election timeouts (each 10-20 ticks; a split vote costs another one).
        taken = await cluster.until(lambda: cluster.leader_now("g1") is not None, 8 * TICKS)
        assert taken >= TICKS
        new = await cluster.leader("g1")
        assert new.node_id != old
        for n in range(10):
            await cluster.propose("g1", b"b%d" % n)
        await cluster.until(lambda: cluster.converged("g1", 20), TICKS)

        restarted = await cluster.start(old)  # from its disk only
        await cluster.until(lambda: cluster.converged("g1", 20), 2 * TICKS)
        assert restarted.leader("g1") == new.node_id
        nursery.cancel_scope.cancel()


async def test_a_lagging_node_catches_up_from_a_snapshot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        for node in NODES:
            await cluster.start(node)
        leader = await cluster.leader("g1")
        lagging = next(n for n in NODES if n != leader.node_id)
        await cluster.stop(lagging)
        for n in range(30):
            await cluster.propose("g1", b"s%d" % n)
        for driver in list(cluster.network.drivers.values()):
            assert await driver.compact("g1") > 20
            assert driver.status()["g1"].snapshot_index > 20
        await cluster.propose("g1", b"after")
        restarted = await cluster.start(lagging)
        await cluster.until(lambda: cluster.converged("g1", 31), 2 * TICKS)
        assert cluster.apps[lagging]["g1"].restores == 1
        assert restarted.status()["g1"].snapshot_index > 20
        nursery.cancel_scope.cancel()

    # The compacted logs reopen: a whole-cluster restart restores from snapshots.
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        for node in NODES:
            await cluster.start(node)
        await cluster.until(lambda: cluster.converged("g1", 31), 2 * TICKS)
        nursery.cancel_scope.cancel()


async def test_a_member_counts_as_caught_up_only_near_the_commit_index(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        for node in NODES:
            await cluster.start(node)
        leader = await cluster.leader("g1")
        lagging = next(n for n in NODES if n != leader.node_id)
        assert leader.caught_up("g1", lagging)
        assert not leader.caught_up("g1", "stranger")  # not replicated to at all
        await cluster.stop(lagging)
        for n in range(CAUGHT_UP_ENTRIES + 10):
            await cluster.propose("g1", b"c%d" % n)
        assert not leader.caught_up("g1", lagging)  # it would hold back commits as a voter
        await cluster.start(lagging)
        await cluster.until(lambda: leader.caught_up("g1", lagging), 2 * TICKS)
        nursery.cancel_scope.cancel()


async def test_leadership_transfer_and_automatic_snapshots(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = DriverConfig(snapshot_every=5, max_pending_proposals=2)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, config)
        for node in NODES:
            await cluster.start(node)
        leader = await cluster.leader("g1")
        target = next(n for n in NODES if n != leader.node_id)
        await leader.transfer_leadership("g1", target)
        await cluster.until(
            lambda: getattr(cluster.leader_now("g1"), "node_id", "") == target, TICKS
        )
        for n in range(12):
            await cluster.propose("g1", b"t%d" % n)
        await cluster.until(lambda: cluster.converged("g1", 12), TICKS)
        assert cluster.driver(target).status()["g1"].snapshot_index >= 5

        # Bounded waiting: with two proposals pending, a third is refused at once.
        new_leader = cluster.driver(target)
        async with trio.open_nursery() as proposers:
            proposers.start_soon(new_leader.propose, "g1", b"p1")
            proposers.start_soon(new_leader.propose, "g1", b"p2")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ProposalDroppedError):
                await new_leader.propose("g1", b"p3")
        with pytest.raises(KeyError):
            await new_leader.propose("nope", b"x")
        nursery.cancel_scope.cancel()


def test_group_names_must_be_safe_directory_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="safe directory"):
        NodeDriver("n1", tmp_path, MemoryNetwork(), {"../x": NODES}, applications={})
    with pytest.raises(ValueError, match="no application"):
        NodeDriver("n1", tmp_path, MemoryNetwork(), {"g1": NODES}, applications={})


async def test_bad_and_misrouted_messages_are_dropped_and_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = DriverConfig(max_inbox_messages=3)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, config)
        driver = await cluster.start("n1")
        await cluster.quiesce()
        not_contiguous = AppendEntries(
            "g1", "n2", "n1", 1, 0, 0, (Entry(1, 1, EntryKind.NOOP), Entry(3, 1, EntryKind.NOOP)), 0
        )
        driver.deliver(not_contiguous)
        driver.deliver(Heartbeat("nope", "n2", "n1", 1, 0))  # a group n1 does not host
        driver.deliver(Heartbeat("g1", "n2", "n9", 1, 0))  # for another node
        driver.deliver(Heartbeat("g1", "n2", "n1", 1, 0))  # the inbox is full
        assert driver.dropped_inbound == 1
        await cluster.quiesce()
        assert driver.rejected_inbound == 3
        assert driver.status()["g1"].last_index == 0
        # An entry over max_entry_bytes is refused before it reaches the log (written, it
        # would fail the write and every restart after it); the driver carries on.
        huge = Entry(1, 1, EntryKind.DATA, b"x" * (config.max_entry_bytes + 1))
        driver.deliver(AppendEntries("g1", "n2", "n1", 1, 0, 0, (huge,), 0))
        await cluster.quiesce()
        assert driver.rejected_inbound == 4
        assert driver.status()["g1"].last_index == 0
        nursery.cancel_scope.cancel()
    with pytest.raises(RuntimeError, match="not running"):
        await driver.propose("g1", b"x")
