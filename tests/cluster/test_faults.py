"""Real processes, real faults: three (or five) `villaged run` nodes in distinct zones on
loopback, every link through a fault proxy, clients sending with XEP-0198 acks while the test
SIGKILLs a follower, SIGKILLs a shard leader, cuts a leader off (both ways, or only what it
sends), kills a whole zone, wipes a node's disk, or loses two of three nodes for good (the
survivor is forced to carry on alone). After healing, every acknowledged message
is in the recipient's archive on every node, and the recipient's offline queue hands each one
over exactly once; writes resume within 5 s of a leader's loss."""

from __future__ import annotations

import collections
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from tests.cluster.running import AckedSender, RunningCluster, running_cluster
from tests.e2e.test_durability import archived_bodies
from tests.e2e.test_sm_durability import delivered as offline_flush
from villaged.cluster.placement import group_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


#: Messages per sender: below the recipient's offline queue bound (500).
LIMIT = 450
RESUME_S = 5.0


@pytest.fixture
async def short_root() -> AsyncIterator[Path]:
    # Unix socket paths (the control socket in each data dir) must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vc-") as root:
        yield Path(root)


async def check_delivered(cluster: RunningCluster, senders: Sequence[AckedSender]) -> None:
    """Every acked message is in the recipient's archive on every live node (each node reads
    its own replica) and is delivered exactly once; nothing is delivered twice."""
    for sender in senders:
        acked = {body for body, _ in sender.acked}
        assert acked, f"{sender.user} got no acknowledgement at all"
        user = sender.to.split("@")[0]
        for node_id in cluster.alive():
            client = await cluster.login(node_id, user, f"mam-{node_id}")
            with trio.fail_after(20):
                while True:  # a node that was down or cut off may still be catching up
                    counts = collections.Counter(
                        b for b in await archived_bodies(client) if b.startswith(sender.prefix)
                    )
                    if acked <= set(counts):
                        break
                    await trio.sleep(0.2)
            assert max(counts.values()) == 1, f"{node_id}: archived twice"
            await client.aclose()
        client = await cluster.login(cluster.alive()[0], user, "reader")
        flushed = [body for body, _ in await offline_flush(client)]
        delivered = [b for b in flushed if b.startswith(sender.prefix)]
        await client.aclose()
        assert len(delivered) == len(set(delivered)), "a message was delivered twice"
        assert acked <= set(delivered), f"lost: {sorted(acked - set(delivered))[:5]}"


def assert_resumed(sender: AckedSender, since: float) -> None:
    """The first ack after ``since`` (the fault) came within RESUME_S."""
    after = [t for _, t in sender.acked if t > since]
    assert after, "no write was acknowledged after the fault"
    resumed = min(after) - since
    print(f"writes resumed {resumed:.2f} s after the fault")
    assert resumed < RESUME_S, f"writes resumed after {resumed:.1f} s"


async def test_sigkill_a_follower_then_a_shard_leader(short_root: Path) -> None:
    async with running_cluster(short_root, ("a", "b", "c")) as cluster:
        await cluster.add_users(["alice", "bob", "carol", "dave"])
        leader = await cluster.leader_of(group_of("bob@localhost"))
        others = [n for n in cluster.alive() if n != leader]
        senders = [
            AckedSender(cluster, "alice", "bob@localhost", others, "a", pause_s=0.1),
            AckedSender(
                cluster, "carol", "dave@localhost", list(reversed(others)), "c", pause_s=0.1
            ),
        ]
        stop = trio.Event()
        async with trio.open_nursery() as sending:
            for sender in senders:
                sending.start_soon(sender.run, stop, LIMIT)
            await trio.sleep(1.5)
            # (a) a follower of bob's shard: the senders' writes go on.
            follower = others[1]
            await cluster.kill(follower)
            acked_before = len(senders[0].acked)
            await trio.sleep(1.5)
            assert len(senders[0].acked) > acked_before, "writes stopped with a follower gone"
            await cluster.start_node(follower)
            await cluster.wait_ready([follower])
            # (b) the leader of bob's shard.
            killed_at = trio.current_time()
            await cluster.kill(leader)
            await trio.sleep(RESUME_S + 1)
            assert_resumed(senders[0], killed_at)
            await cluster.start_node(leader)
            await cluster.wait_ready([leader])
            await trio.sleep(1)
            stop.set()
        await check_delivered(cluster, senders)


@pytest.mark.parametrize("fault", ["isolate", "mute"])
async def test_a_leader_cut_off_from_the_others(short_root: Path, fault: str) -> None:
    # "isolate": nothing passes either way. "mute": one way, the leader's messages are dropped
    # while the others' still reach it; it must not keep the group (check-quorum: it hears no
    # acknowledgement) and the others elect a new leader.
    async with running_cluster(short_root, ("a", "b", "c")) as cluster:
        await cluster.add_users(["alice", "bob"])
        leader = await cluster.leader_of(group_of("bob@localhost"))
        others = [n for n in cluster.alive() if n != leader]
        sender = AckedSender(cluster, "alice", "bob@localhost", others, "a", pause_s=0.05)
        stop = trio.Event()
        async with trio.open_nursery() as sending:
            sending.start_soon(sender.run, stop, LIMIT)
            await trio.sleep(1.5)
            cut_at = trio.current_time()
            getattr(cluster, fault)(leader)
            await trio.sleep(RESUME_S + 1)
            assert_resumed(sender, cut_at)
            assert await cluster.leader_of(group_of("bob@localhost")) != leader
            # Its copy of an account (a password changed or an account deleted meanwhile) may
            # be old, so it lets nobody log in, and /readyz says 503. Isolated, it hears no
            # leader; muted, it hears the new leaders but they never hear it, so they send it
            # no entries (a follower is probed first): it has none of their terms.
            with pytest.raises(PermissionError, match="temporary-auth-failure"):
                await cluster.login(leader, "alice", "cut-off")
            assert not await cluster.ready(leader)
            cluster.heal()
            await cluster.wait_ready([leader])  # its links come back (after their backoff)
            await trio.sleep(1)
            stop.set()
        # The old leader is a follower again and has every acknowledged message.
        await check_delivered(cluster, [sender])


async def test_losing_a_whole_zone_of_a_five_node_cluster(short_root: Path) -> None:
    async with running_cluster(short_root, ("a", "a", "b", "b", "c")) as cluster:
        await cluster.add_users(["alice", "bob"])
        zone_a = ["n1", "n2"]
        survivors = ["n3", "n4", "n5"]
        # Each shard has three voters, one per zone; the other two nodes follow it as
        # learners (so every node serves every user from its own replica).
        zone_of = dict(zip(["n1", "n2", "n3", "n4", "n5"], ("a", "a", "b", "b", "c"), strict=True))
        for group in (await cluster.status("n3"))["groups"]:
            voters = [v.split("~")[0] for v in group["voters"]]
            assert sorted(zone_of[v] for v in voters) == ["a", "b", "c"], group
        sender = AckedSender(cluster, "alice", "bob@localhost", survivors, "a", pause_s=0.05)
        stop = trio.Event()
        async with trio.open_nursery() as sending:
            sending.start_soon(sender.run, stop, LIMIT)
            await trio.sleep(1.5)
            lost_at = trio.current_time()
            for node_id in zone_a:
                await cluster.kill(node_id)
            await trio.sleep(RESUME_S + 1)
            assert_resumed(sender, lost_at)
            stop.set()
        await check_delivered(cluster, [sender])


async def test_a_node_whose_disk_is_lost_rejoins_and_catches_up(short_root: Path) -> None:
    # Small snapshots: the new node gets most of its shards' state by InstallSnapshot.
    async with running_cluster(short_root, ("a", "b", "c"), "snapshot_every = 100") as cluster:
        await cluster.add_users(["alice", "bob"])
        sender = AckedSender(cluster, "alice", "bob@localhost", ["n1", "n2"], "a", pause_s=0)
        await sender.run(trio.Event(), LIMIT)
        before = await cluster.status("n3")
        await cluster.kill("n3")
        shutil.rmtree(cluster.files["n3"].directory / "data")  # the disk is gone
        await cluster.start_node("n3")
        await cluster.wait_ready(["n3"])
        after = await cluster.status("n3")
        assert after["incarnation"] != before["incarnation"]
        # Every group replaces n3's old member by the new one, with no one's help.
        with trio.fail_after(30):
            while True:
                groups = (await cluster.status("n1"))["groups"]
                members = {v for g in groups for v in g["voters"] if v.startswith("n3~")}
                if members == {f"n3~{after['incarnation']}"}:
                    break
                await trio.sleep(0.2)
        # bob's shard reached n3 as a snapshot (its log had been compacted) plus the log after.
        bobs = group_of("bob@localhost")
        with trio.fail_after(10):
            while True:
                mine = {g["group"]: g for g in (await cluster.status("n3"))["groups"]}[bobs]
                if mine["snapshot_index"] > 0 and mine["applied"] >= mine["commit"] > 0:
                    break
                await trio.sleep(0.2)
        await check_delivered(cluster, [sender])


async def test_a_survivor_forced_to_carry_on_alone_after_losing_both_others(
    short_root: Path,
) -> None:
    async with running_cluster(short_root, ("a", "b", "c")) as cluster:
        await cluster.add_users(["alice", "bob", "carol"])
        # (alice sends on n1, which acknowledges only what it applied: it has every one.)
        sender = AckedSender(cluster, "alice", "bob@localhost", ["n1"], "a", pause_s=0)
        await sender.run(trio.Event(), 50)
        command = [sys.executable, "-m", "villaged", "cluster", "force-recover"]
        command += ["-c", str(cluster.files["n1"].config)]
        running = await trio.run_process(
            [*command, "--majority-lost"], capture_stderr=True, check=False
        )
        assert running.returncode != 0
        assert b"in use by another villaged process" in running.stderr
        # n2 and n3 are gone for good (two zones): no group can commit any more.
        await cluster.kill("n2")
        await cluster.kill("n3")
        await cluster.kill("n1")
        refused = await trio.run_process(command, capture_stderr=True, check=False)
        assert refused.returncode != 0
        assert b"--majority-lost" in refused.stderr
        done = await trio.run_process([*command, "--majority-lost"], capture_stdout=True)
        assert b"17 groups recovered" in done.stdout
        await cluster.start_node("n1")
        await cluster.wait_ready(["n1"])
        # Alone, it commits: alice's next messages are acknowledged.
        after = AckedSender(cluster, "alice", "carol@localhost", ["n1"], "b", pause_s=0)
        await after.run(trio.Event(), 20)
        # n3 comes back with its old data (its old incarnation): fenced, never taken back.
        await cluster.start_node("n3")
        log = cluster.files["n1"].directory / "villaged.log"
        with trio.fail_after(20):
            while b"cluster.fenced_member" not in log.read_bytes():  # noqa: ASYNC110 - a file
                await trio.sleep(0.2)
        await trio.sleep(2)
        groups = (await cluster.status("n1"))["groups"]
        assert all(len(g["voters"]) == 1 and g["role"] == "leader" for g in groups)
        await cluster.kill("n3")
        # The others come back with empty data directories and are voters again.
        for node_id in ("n2", "n3"):
            shutil.rmtree(cluster.files[node_id].directory / "data")
            await cluster.start_node(node_id)
        await cluster.wait_ready(["n2", "n3"])
        with trio.fail_after(60):
            while True:
                groups = (await cluster.status("n1"))["groups"]
                if all(len(g["voters"]) == 3 for g in groups):
                    break
                await trio.sleep(0.5)
        await check_delivered(cluster, [sender, after])
