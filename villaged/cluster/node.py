"""A node's cluster side, wired: links, the Raft driver, the replicated store, session mirror.

This module owns the assembly of :mod:`villaged.cluster`'s parts for one running node, built
from ``[cluster]`` (app.py calls :meth:`ClusterNode.build` and runs :meth:`ClusterNode.run` in
the store's nursery, so the groups outlive every client connection): the mutual-TLS
:class:`~villaged.cluster.links.PeerLinks` and their listener, the
:class:`~villaged.cluster.driver.NodeDriver` with the meta group and every shard (this node
votes in the groups the placement gives it and is a learner of the others), the
:class:`~villaged.cluster.replicated.Replicator` the store writes through, and the session
mirror that makes other nodes' sessions routable here (wired by app.py). Application frames
from peers are dispatched by kind. As a group's leader it keeps the group's learners and
replaces members that came back as new incarnations (:mod:`villaged.cluster.identity`). It
also answers what operators ask: the status document (``villaged cluster status``, the
control socket's handlers) and whether the node can serve (every group has a leader).

Start-up order matters: the links come up first (a new cluster's membership is decided from
the peers' hellos), then the driver restores every group, the node applies what its log says
was committed (so a restarted node never serves older state than it acknowledged), and only
then does app.py open the client listeners.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from villaged.cluster import pki
from villaged.cluster.driver import DriverConfig, NodeDriver
from villaged.cluster.identity import Identity, IdentityError, decide, node_of, voter_id
from villaged.cluster.links import LinkConfig, Peer, PeerLinks
from villaged.cluster.placement import META_GROUP, Member, Placement, group_ids, place
from villaged.cluster.raft import Message, RaftError
from villaged.cluster.recover import RecoverError, load_fenced
from villaged.cluster.replicated import (
    MetaApplication,
    ReplicatedState,
    Replicator,
    ShardApplication,
)
from villaged.ops.control import ControlError
from villaged.storage.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from pathlib import Path

    from villaged.cluster.driver import GroupApplication
    from villaged.cluster.wire import AppFrame, Hello
    from villaged.config.model import Config
    from villaged.ops.control import Handler
    from villaged.storage.store import Store

__all__ = ["ClusterNode", "ClusterStartupError"]

log = logging.getLogger("villaged.cluster")

#: How long start-up waits to apply what the log says is committed before serving anyway.
CATCH_UP_SECONDS: Final = 60.0
#: A peer whose link to us stays down this long is gone: its sessions are dropped here.
PEER_GRACE_SECONDS: Final = 8.0  # longer than a link's reconnect backoff (5 s at most)
#: How often a leader looks for members that came back as new incarnations.
REPLACE_CHECK_SECONDS: Final = 1.0
#: How often the links' drop counters are checked (a dropped frame may have been soft state
#: that must be announced again).
RESYNC_CHECK_SECONDS: Final = 5.0
#: After an account deletion, how long to wait for more before shredding them all at once
#: (every group is snapshotted then: not at each of a burst of deletions).
SHRED_DELAY_SECONDS: Final = 2.0
SHRED_RETRY_SECONDS: Final = 60.0


class ClusterStartupError(Exception):
    """The cluster side cannot start (the message names the key or file at fault)."""


@dataclass
class FrameRoute:
    prefix: str
    handle: Callable[[str, AppFrame], None]


@dataclass
class ClusterNode:
    config: Config
    node_id: str
    driver: NodeDriver
    links: PeerLinks
    shared: ReplicatedState
    replicator: Replicator
    meta: MetaApplication
    routes: list[FrameRoute] = field(default_factory=list)
    on_link_up: list[Callable[[str], None]] = field(default_factory=list)
    on_peer_lost: list[Callable[[str], None]] = field(default_factory=list)
    rejected_frames: int = 0
    _nursery: trio.Nursery | None = None
    placement: Placement | None = None
    identity: Identity | None = None
    #: What each peer said in its latest hello: (incarnation, boot membership or None).
    hellos: dict[str, tuple[str, Mapping[str, str] | None]] = field(default_factory=dict)
    _hello_changed: trio.Event = field(default_factory=trio.Event)
    #: Accounts deleted (applied here) whose data keys may still be in this node's log.
    _unshredded: set[str] = field(default_factory=set)
    _shred_wanted: trio.Event = field(default_factory=trio.Event)
    shredded: int = 0  # accounts whose keys are gone from this node's log and snapshots
    #: Members a forced recovery left behind (villaged.cluster.recover): never taken back,
    #: their Raft messages dropped.
    fenced: frozenset[str] = frozenset()
    _fenced_heard: set[str] = field(default_factory=set)

    @property
    def directory(self) -> Path:
        return self.config.storage.dir / "cluster"

    @classmethod
    def build(cls, config: Config, store: Store) -> ClusterNode:
        cluster = config.cluster
        node_id = config.server.node
        members = [Member(n.id, n.zone, str(n.address)) for n in cluster.nodes]
        placement = place(members, shards=cluster.shards, replicas=cluster.replicas)
        # Every node holds every group: as one of its voters (placement) or as a learner, so
        # that any node serves any user from its own replica.
        hosted = group_ids(cluster.shards)
        shared = ReplicatedState(store.state, store.vault, cluster.shards)
        # Addresses may differ between nodes (NAT, proxies): ids and zones must not.
        meta = MetaApplication({m.node_id: m.zone for m in members})
        applications: dict[str, GroupApplication] = {}
        for group in hosted:
            applications[group] = meta if group == META_GROUP else ShardApplication(group, shared)
        try:
            server = pki.server_context(cluster.ca_file, cluster.cert_file, cluster.key_file)
            client = pki.client_context(cluster.ca_file, cluster.cert_file, cluster.key_file)
        except (OSError, ValueError) as exc:
            raise ClusterStartupError(
                f"{config.source}: cluster: cannot load ca_file/cert_file/key_file: {exc}"
            ) from None
        peers = {
            n.id: Peer(n.id, n.address.host, n.address.port)
            for n in cluster.nodes
            if n.id != node_id
        }
        try:
            identity = Identity.load_or_create(config.storage.dir / "cluster")
            fenced = load_fenced(config.storage.dir / "cluster")
        except (IdentityError, RecoverError, OSError) as exc:
            raise ClusterStartupError(f"storage.dir: {exc}") from None
        node: ClusterNode
        links = PeerLinks(
            node_id,
            f"{cluster.id}/{_shape_digest(config)}",
            peers,
            server_context=server,
            client_context=client,
            deliver=lambda message: node._deliver_raft(message),
            deliver_app=lambda peer, frame: node._dispatch(peer, frame),
            on_outbound_up=lambda peer: node._link_up(peer),
            on_inbound_lost=lambda peer: node._peer_lost(peer),
            hello=lambda: (identity.incarnation, node._boot()),
            on_hello=lambda hello: node._heard(hello),
            config=LinkConfig(),
        )
        driver = NodeDriver(
            voter_id(node_id, identity.incarnation),
            config.storage.dir / "cluster",
            links,
            dict.fromkeys(hosted, ()),  # decided at start (see villaged.cluster.identity)
            DriverConfig(
                tick_seconds=cluster.tick_ms / 1000,
                election_ticks=cluster.election_ticks,
                snapshot_every=cluster.snapshot_every,
            ),
            applications=applications,
        )
        replicator = Replicator(
            node_id,
            driver,
            shared,
            links.send_app,
            commit_timeout=cluster.commit_timeout,
            retry_interval=cluster.tick_ms / 1000,
        )
        node = cls(config, node_id, driver, links, shared, replicator, meta)
        node.placement = placement
        node.identity = identity
        node.fenced = fenced
        node.routes.append(FrameRoute("fwd.", replicator.receive))
        shared.on_delete.append(node._deleted)
        return node

    # --- running ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the cluster side until cancelled; started once this node has applied what its
        own log says was committed (or CATCH_UP_SECONDS passed)."""
        binds = self.config.listeners.cluster.bind or (self._member_address(),)
        listeners: list[trio.SocketListener] = []
        try:
            for endpoint in binds:
                listeners.extend(await trio.open_tcp_listeners(endpoint.port, host=endpoint.host))
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            raise ClusterStartupError(
                f"{self.config.source}: listeners.cluster.bind: cannot listen on {binds[0]}: "
                f"{exc.strerror or exc}"
            ) from None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.links.run, listeners)
            await self._decide_membership()
            await nursery.start(self.driver.run)
            await nursery.start(self.replicator.run)
            nursery.start_soon(self._keep_membership)
            nursery.start_soon(self._replace_lost_incarnations)
            nursery.start_soon(self._resync_after_drops)
            nursery.start_soon(self._shred_deleted)
            await self._catch_up()
            task_status.started()

    def _member_address(self) -> Any:
        member = self.config.cluster.member(self.node_id)
        assert member is not None  # the loader checked
        return member.address

    async def _catch_up(self) -> None:
        targets = {name: status.commit for name, status in self.driver.status().items()}
        self.shared.finish_loading()
        with trio.move_on_after(CATCH_UP_SECONDS) as scope:
            for group, commit in targets.items():
                if group == META_GROUP:
                    continue
                await self.shared.wait_applied(group, commit)
        if scope.cancelled_caught:
            log.warning(
                "serving before the shards caught up with their committed entries",
                extra={"event": "cluster.catch_up_timeout"},
            )
        # Users the start-up snapshots dropped whose keys the log did not bring back were
        # deleted (maybe by a snapshot installed meanwhile): their keys may be in old segments.
        candidates, self.shared.destroyed_at_start = self.shared.destroyed_at_start, set()
        vault = self.shared.vault
        gone = await trio.to_thread.run_sync(
            lambda: [user for user in sorted(candidates) if vault.export(user) is None]
        )
        for user in gone:
            self._deleted(user)
        log.info(
            "cluster joined",
            extra={"event": "cluster.started", "node": self.node_id, "groups": len(targets)},
        )

    # --- incarnations (villaged.cluster.identity) ---

    def _boot(self) -> dict[str, str] | None:
        identity = self.identity
        return None if identity is None else identity.advertised_boot

    def _deliver_raft(self, message: Message) -> None:
        if message.sender in self.fenced:
            return  # a member a forced recovery left behind (logged at its hello)
        self.driver.deliver(message)

    def _heard(self, hello: Hello) -> None:
        member = voter_id(hello.node_id, hello.incarnation)
        if member in self.fenced and member not in self._fenced_heard:
            self._fenced_heard.add(member)
            log.error(
                "a node came back with the data of a member a forced recovery left behind;"
                " it is not taken back: stop it and empty its data directory",
                extra={"event": "cluster.fenced_member", "member": member},
            )
        self.hellos[hello.node_id] = (hello.incarnation, hello.boot)
        self._hello_changed.set()
        self._hello_changed = trio.Event()

    async def _decide_membership(self) -> None:
        """Before any group starts: which voters this node's groups start with."""
        identity = self.identity
        placement = self.placement
        assert identity is not None
        assert placement is not None
        peers = frozenset(self.links.peers())
        waited = 0.0
        while not identity.decided:
            decision = decide(self.node_id, identity, self.hellos, peers)
            if decision is not None:
                boot, joiner = decision
                identity = self.identity = await trio.to_thread.run_sync(
                    partial(identity.decide, self.directory, boot=boot, joiner=joiner)
                )
                # Peers still deciding must hear it: they heard "undecided" when we linked.
                self.links.announce()
                log.info(
                    "joining a running cluster as a new incarnation"
                    if joiner
                    else "starting the cluster",
                    extra={
                        "event": "cluster.joiner" if joiner else "cluster.bootstrap",
                        "incarnation": identity.incarnation,
                    },
                )
                break
            with trio.move_on_after(10):
                await self._hello_changed.wait()
            waited += 10
            if waited % 60 == 0:
                log.warning(
                    "waiting to hear every node before starting the cluster",
                    extra={"event": "cluster.waiting", "heard": sorted(self.hellos)},
                )
        if identity.boot is not None:
            boot = identity.boot
            self.driver.set_bootstrap(
                {
                    group: [voter_id(node, boot[node]) for node in placement.replicas[group]]
                    for group in group_ids(placement.shards)
                }
            )

    async def _replace_lost_incarnations(self) -> None:
        """As leader of a group: every other node (at its current incarnation) is a learner of
        it, and a voter whose node came back as a new incarnation (an empty disk) is replaced,
        one single-server change at a time: the old member out, the new in."""
        placement = self.placement
        assert placement is not None
        while True:
            await trio.sleep(REPLACE_CHECK_SECONDS)
            for group, status in self.driver.status().items():
                if status.role.value != "leader":
                    continue
                hellos = self._unfenced_hellos()
                placed = placement.replicas[group]
                learners = _learners(placed, hellos, self.node_id)
                change = _membership_change(status.voters, placed, hellos, self.node_id)
                if change is not None and change[0] and not self.driver.caught_up(group, change[0]):
                    # It catches up as a learner first: added at once, an empty member could
                    # hold back every commit of a group of one or two voters until it has.
                    learners |= {change[0]}
                    change = None
                if learners != self.driver.learners(group):
                    await self.driver.set_learners(group, learners)
                if change is None:
                    continue
                add, remove = change
                try:
                    await self.driver.change_voters(group, add=add, remove=remove)
                except (RaftError, ValueError, KeyError) as exc:
                    log.debug("membership change deferred: %s", exc)
                    continue
                log.info(
                    "replacing a lost incarnation",
                    extra={
                        "event": "cluster.member_replaced",
                        "group": group,
                        "added": add,
                        "removed": remove,
                    },
                )

    def _unfenced_hellos(self) -> dict[str, tuple[str, Mapping[str, str] | None]]:
        return {
            node: hello
            for node, hello in self.hellos.items()
            if voter_id(node, hello[0]) not in self.fenced
        }

    async def _keep_membership(self) -> None:
        """Whoever leads the meta group commits the membership if none is yet."""
        while self.meta.committed is None:
            if self.driver.leader_node(META_GROUP) == self.node_id:
                try:
                    with trio.move_on_after(self.config.cluster.commit_timeout):
                        await self.driver.propose(META_GROUP, self.meta.proposal())
                except RaftError:
                    pass
            await trio.sleep(self.config.cluster.tick_ms / 1000 * 4)

    # --- frames and links ---

    def _dispatch(self, peer_id: str, frame: AppFrame) -> None:
        for route in self.routes:
            if frame.kind.startswith(route.prefix):
                route.handle(peer_id, frame)
                return
        self.rejected_frames += 1

    def _link_up(self, peer_id: str) -> None:
        for hook in self.on_link_up:
            hook(peer_id)

    def _peer_lost(self, peer_id: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._confirm_lost, peer_id)

    async def _confirm_lost(self, peer_id: str) -> None:
        await trio.sleep(PEER_GRACE_SECONDS)
        if self.links.inbound_linked(peer_id):
            return  # it came back (and announced itself again)
        log.info("peer gone", extra={"event": "cluster.peer_gone", "peer": peer_id})
        for hook in self.on_peer_lost:
            hook(peer_id)

    def drop_peers(self) -> None:
        """Forget every peer's soft state now (the node is stopping)."""
        for peer_id in self.links.peers():
            for hook in self.on_peer_lost:
                hook(peer_id)

    # --- crypto-shredding ---

    def _deleted(self, user: str) -> None:
        """``account.delete`` applied here: the vault's key is gone; the copy in the shard's
        log (its ``vault.key`` entry) goes at the next shred."""
        self._unshredded.add(user)
        self._shred_wanted.set()

    async def _shred_deleted(self) -> None:
        while True:
            await self._shred_wanted.wait()
            await trio.sleep(SHRED_DELAY_SECONDS)
            self._shred_wanted = trio.Event()
            users, self._unshredded = sorted(self._unshredded), set()
            if await self.driver.shred():
                self.shredded += len(users)
                log.info(
                    "deleted accounts' data keys are gone from this node's log",
                    extra={"event": "cluster.shredded", "accounts": len(users)},
                )
                continue
            self._unshredded.update(users)
            log.warning(
                "deleted accounts' data keys are still in this node's log (a group could not"
                " be compacted); trying again in a minute",
                extra={"event": "cluster.shred_incomplete", "accounts": len(users)},
            )
            await trio.sleep(SHRED_RETRY_SECONDS)
            self._shred_wanted.set()

    async def _resync_after_drops(self) -> None:
        seen = dict.fromkeys(self.links.peers(), 0)
        while True:
            await trio.sleep(RESYNC_CHECK_SECONDS)
            for peer, before in seen.items():
                now = self.links.dropped(peer)
                if now != before and self.links.connected(peer):
                    seen[peer] = now
                    self._link_up(peer)

    # --- the control socket (villaged user / villaged cluster status) ---

    def control_handlers(self, store: Store) -> dict[str, Handler]:
        domain = self.config.server.domain

        def user_of(args: Mapping[str, Any]) -> str:
            jid = args.get("jid")
            if not isinstance(jid, str):
                raise ControlError("'jid' is missing")
            try:
                return store.local_user(jid, domain)
            except StorageError as exc:
                raise ControlError(str(exc)) from None

        def password_of(args: Mapping[str, Any]) -> str:
            password = args.get("password")
            if not isinstance(password, str) or not password:
                raise ControlError("'password' is missing")
            return password

        async def account_change(
            args: Mapping[str, Any], change: Callable[[str], Awaitable[None]]
        ) -> str:
            jid = user_of(args)
            try:
                await change(jid)
            except StorageError as exc:
                raise ControlError(str(exc)) from None
            return jid

        async def add(args: Mapping[str, Any]) -> str:
            return await account_change(args, lambda jid: store.add_user(jid, password_of(args)))

        async def passwd(args: Mapping[str, Any]) -> str:
            async def change(jid: str) -> None:
                await store.catch_up(jid)  # a change made on another node is seen here
                await store.set_password(jid, password_of(args))

            return await account_change(args, change)

        async def delete(args: Mapping[str, Any]) -> str:
            async def change(jid: str) -> None:
                await store.catch_up(jid)
                await store.delete_user(jid)

            return await account_change(args, change)

        async def users(_: Mapping[str, Any]) -> list[str]:
            await trio.lowlevel.checkpoint()
            return store.users()

        async def status(_: Mapping[str, Any]) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            return self.status_document()

        return {
            "user.add": add,
            "user.passwd": passwd,
            "user.delete": delete,
            "user.list": users,
            "cluster.status": status,
        }

    # --- what operators see ---

    def has_quorum(self) -> bool:
        """Whether this node hears the leader of every group it replicates (RaftNode.in_touch):
        it can serve logins and reads for every user."""
        return all(self.driver.in_touch(group) for group in self.driver.status())

    def status_document(self) -> dict[str, Any]:
        cluster = self.config.cluster
        member = cluster.member(self.node_id)
        members = [
            {
                "id": n.id,
                "zone": n.zone,
                "address": str(n.address),
                "linked": True if n.id == self.node_id else self.links.connected(n.id),
            }
            for n in cluster.nodes
        ]
        groups = []
        by_number = sorted(self.driver.status().items(), key=lambda item: _group_order(item[0]))
        for name, status in by_number:
            groups.append(
                {
                    "group": name,
                    "role": status.role.value,
                    "term": status.term,
                    "leader": node_of(status.leader) if status.leader else None,
                    "commit": status.commit,
                    "applied": status.applied,
                    "last_index": status.last_index,
                    "snapshot_index": status.snapshot_index,
                    "voters": sorted(status.voters),
                    "lag": {node_of(m): lag for m, lag in status.follower_lag.items()},
                }
            )
        return {
            "node": self.node_id,
            "incarnation": self.identity.incarnation if self.identity is not None else None,
            "cluster": cluster.id,
            "zone": member.zone if member is not None else None,
            "membership_agreed": self.meta.agrees,
            "members": members,
            "groups": groups,
        }


def _group_order(group: str) -> tuple[int, str]:
    """``meta`` first, then ``shard-0``, ``shard-1`` ... in number order."""
    number = group.removeprefix("shard-")
    return (int(number) + 1, "") if number.isdigit() else (0, group)


def _membership_change(
    voters: frozenset[str],
    placed: Sequence[str],
    hellos: Mapping[str, tuple[str, Mapping[str, str] | None]],
    me: str,
) -> tuple[str, str] | None:
    """(add, remove) — one of them empty — bringing ``voters`` to the current incarnations of
    the ``placed`` nodes as heard in their hellos; None when nothing is to change."""
    hellos = {node: hello for node, hello in hellos.items() if hello[0]}  # no incarnation: skip
    for voter in sorted(voters):
        node = node_of(voter)
        current = hellos.get(node)
        if node != me and current is not None and voter != voter_id(node, current[0]):
            return "", voter  # an old incarnation: out first
    present = {node_of(v) for v in voters}
    for node in placed:
        current = hellos.get(node)
        if node not in present and current is not None:
            return voter_id(node, current[0]), ""
    if all(node in present for node in placed):
        # Every placed node votes: a voter that is not placed goes (a forced recovery made a
        # node that was only a learner the group's one voter), even this node, last.
        for voter in sorted(voters, key=lambda v: node_of(v) == me):
            if node_of(voter) not in placed:
                return "", voter
    return None


def _shape_digest(config: Config) -> str:
    """What every node must agree on, hashed into the links' hello: nodes configured with
    other shards, replicas or members (ids and zones) refuse to link rather than place users
    and voters differently."""
    cluster = config.cluster
    shape = {
        "shards": cluster.shards,
        "replicas": cluster.replicas,
        "members": sorted([n.id, n.zone] for n in cluster.nodes),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _learners(
    placed: Sequence[str],
    hellos: Mapping[str, tuple[str, Mapping[str, str] | None]],
    me: str,
) -> frozenset[str]:
    """The members a group's leader replicates to without their vote: every node heard from
    that is not one of the group's placed voters, at its current incarnation."""
    return frozenset(
        voter_id(node, incarnation)
        for node, (incarnation, _boot) in hellos.items()
        if node not in placed and node != me and incarnation
    )
