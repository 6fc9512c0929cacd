"""A cluster of real `villaged run` processes on loopback for fault tests, with a fault proxy
(tests.cluster.proxy) on every directed link, and clients that keep sending with XEP-0198 acks.

Every node dials each peer through the proxy made for that (from, to) pair, so a test can cut
one node off from the others in both directions (``isolate``) without touching the rest.
Accounts are made through a node's control socket, as ``villaged user add`` does."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from tests.cluster.harness import NodeFiles, write_cluster
from tests.cluster.proxy import LinkProxy
from tests.federation.processes import stop
from tests.net.rawclient import RawClient
from tests.ports import free_port_base
from villaged.config import load_config
from villaged.ops.control import ControlError, call_control, control_socket_path

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

SM = "urn:xmpp:sm:3"
#: How long a node may take to start and see a leader in every group.
READY_S = 30.0


@dataclass
class RunningCluster:
    root: Path
    zones: Sequence[str]
    nursery: trio.Nursery
    extra_toml: str = ""
    files: dict[str, NodeFiles] = field(default_factory=dict)
    processes: dict[str, trio.Process] = field(default_factory=dict)
    proxies: dict[tuple[str, str], LinkProxy] = field(default_factory=dict)

    async def start(self) -> None:
        ids = [f"n{k}" for k in range(1, len(self.zones) + 1)]
        pairs = [(a, b) for a in ids for b in ids if a != b]
        # One free range for everything (node listeners, then the proxies): ranges picked
        # one after another could overlap, as none is bound until the processes start.
        per_node = 7
        base = free_port_base(per_node * len(ids) + len(pairs))
        first_proxy = base + per_node * len(ids)
        ports = {pair: first_proxy + k for k, pair in enumerate(pairs)}
        for node in write_cluster(
            self.root,
            self.zones,
            dial=lambda a, b, own: ports.get((a, b), own),
            extra_toml=self.extra_toml,
            port_bases=[base + per_node * k for k in range(len(ids))],
        ):
            self.files[node.node_id] = node
        for (source, target), port in ports.items():
            proxy = LinkProxy(("127.0.0.1", self.files[target].cluster), listen_port=port)
            await self.nursery.start(proxy.run)
            self.proxies[(source, target)] = proxy
        async with trio.open_nursery() as starting:
            for node_id in ids:
                starting.start_soon(self.start_node, node_id)
        await self.wait_ready(ids)

    async def start_node(self, node_id: str) -> None:
        node = self.files[node_id]
        with (node.directory / "villaged.log").open("ab") as log_file:
            self.processes[node_id] = await trio.lowlevel.open_process(
                [sys.executable, "-m", "villaged", "run", "-c", str(node.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, ids: Sequence[str]) -> None:
        """Until each node answers /readyz with 200 (serving: it hears every group's leader)."""
        with trio.fail_after(READY_S):
            for node_id in ids:
                while not await self.ready(node_id):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)

    async def ready(self, node_id: str) -> bool:
        process = self.processes[node_id]
        if process.poll() is not None:
            log = (self.files[node_id].directory / "villaged.log").read_text(errors="replace")
            raise AssertionError(f"{node_id} exited; the end of its log:\n{log[-3000:]}")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.files[node_id].http)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = b""
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(4096):
                    response += chunk
        return response.startswith(b"HTTP/1.1 200")

    def alive(self) -> list[str]:
        return [n for n, p in self.processes.items() if p.poll() is None]

    async def kill(self, node_id: str) -> None:
        process = self.processes[node_id]
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop_all(self) -> None:
        async with trio.open_nursery() as stopping:
            for process in self.processes.values():
                stopping.start_soon(stop, process)

    def isolate(self, node_id: str) -> None:
        """Cut every link to and from ``node_id`` (connections reset, connects refused)."""
        for (source, target), proxy in self.proxies.items():
            if node_id in (source, target):
                proxy.cut(reset=True)

    def mute(self, node_id: str) -> None:
        """Drop everything ``node_id`` sends to the others (one way: it still hears them)."""
        for (source, _target), proxy in self.proxies.items():
            if source == node_id:
                proxy.drop("forward")

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    async def control(self, node_id: str, cmd: str, **args: Any) -> Any:
        config = load_config(self.files[node_id].config)
        return await call_control(control_socket_path(config), cmd, args, timeout=20)

    async def add_users(self, users: Sequence[str]) -> None:
        for user in users:
            await self.control(
                self.alive()[0], "user.add", jid=f"{user}@localhost", password=f"{user}-password"
            )

    async def status(self, node_id: str) -> dict[str, Any]:
        document: dict[str, Any] = await self.control(node_id, "cluster.status")
        return document

    async def leader_of(self, group: str) -> str:
        """The leader of ``group`` as a live node reports it (waits for one)."""
        with trio.fail_after(15):
            while True:
                for node_id in self.alive():
                    try:
                        document = await self.status(node_id)
                    except ControlError:
                        continue
                    for entry in document["groups"]:
                        if entry["group"] == group and entry["leader"] in self.alive():
                            leader: str = entry["leader"]
                            return leader
                await trio.sleep(0.1)

    async def login(self, node_id: str, user: str, resource: str = "test") -> RawClient:
        node = self.files[node_id]
        client = await RawClient.connect(
            node.c2s + 1, node.directory / "tls/cert.pem", direct_tls=True
        )
        try:
            await client.login(user, f"{user}-password", starttls=False, resource=resource)
        except BaseException:
            await client.aclose()
            raise
        return client


@contextlib.asynccontextmanager
async def running_cluster(
    root: Path, zones: Sequence[str], extra_toml: str = ""
) -> AsyncIterator[RunningCluster]:
    """A started cluster; every node process is stopped on the way out, whatever happened
    (SIGTERM, then SIGKILL: a failed test leaves no process behind)."""
    async with trio.open_nursery() as nursery:
        cluster = RunningCluster(root, zones, nursery, extra_toml)
        try:
            await cluster.start()
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()
            nursery.cancel_scope.cancel()


@dataclass
class AckedSender:
    """Sends ``to`` numbered messages (``<prefix><n>``) in bursts with ``<r/>``, through
    whichever of ``nodes`` accepts it (the next one when its node goes away): records each
    acknowledged body with the time its ack came."""

    cluster: RunningCluster
    user: str
    to: str
    nodes: list[str]
    prefix: str
    pause_s: float = 0.05
    acked: list[tuple[str, float]] = field(default_factory=list)
    sent: int = 0
    reconnects: int = 0

    async def run(self, stop: trio.Event, limit: int) -> None:
        turn = 0
        while not stop.is_set() and self.sent < limit:
            node_id = self.nodes[turn % len(self.nodes)]
            turn += 1
            if node_id not in self.cluster.alive():
                continue
            try:
                with trio.fail_after(10):
                    client = await self.cluster.login(node_id, self.user, f"s{turn}")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, EOFError, AssertionError):
                self.reconnects += 1
                await trio.sleep(0.2)
                continue
            try:
                await self._send_on(client, stop, limit)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, EOFError, AssertionError):
                self.reconnects += 1
            finally:
                with trio.move_on_after(1):
                    await client.aclose()

    async def _send_on(self, client: RawClient, stop: trio.Event, limit: int) -> None:
        await client.send(f"<enable xmlns='{SM}'/>".encode())
        with trio.fail_after(10):
            assert (await client.element()).tag == f"{{{SM}}}enabled"
        on_stream: list[str] = []
        handled = 0
        while not stop.is_set() and self.sent < limit:
            burst = []
            for _ in range(5):
                body = f"{self.prefix}{self.sent}"
                self.sent += 1
                burst.append(body)
            data = "".join(
                f"<message to='{self.to}' type='chat' id='{b}'><body>{b}</body></message>"
                for b in burst
            )
            await client.send(data.encode() + f"<r xmlns='{SM}'/>".encode())
            on_stream += burst
            with trio.fail_after(8):  # a write waits for its shard: through an election
                while handled < len(on_stream):
                    got = await client.element(within_s=8)
                    if got.tag == f"{{{SM}}}a":
                        h = int(got.get("h", "0"))
                        now = trio.current_time()
                        self.acked += [(b, now) for b in on_stream[handled:h]]
                        handled = max(handled, h)
                    assert got.get("type") != "error", "a message bounced"
            await trio.sleep(self.pause_s)
