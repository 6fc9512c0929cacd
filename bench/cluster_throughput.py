"""Benchmark: committed chat throughput and latency of a three-node villaged cluster.

Writes a dev cluster (``init_cluster``: nodes n1, n2, n3 in zones a, b, c) into a short
temporary directory under /tmp, on ports of a free range of 127.0.0.1, starts each node as a
real ``python -m villaged run`` process, waits until every node's ``/readyz`` answers 200, and
creates the accounts through the nodes' control sockets. Then, for each count of
``--clients`` (client *connections*: half senders, half recipients), it logs in pairs whose
sender and recipient are on *different* nodes (sender of pair i on node i mod 3, recipient on
the next node), so every message is committed by a majority of the recipient's shard (usually
led by a third node) before it is delivered through the session mirror. Each sender keeps
``--window`` messages in flight (closed loop), or, with ``--rate R``, all senders together send
R messages/s on a fixed schedule (open loop). Senders enable XEP-0198 stream management; after
the run each asks ``<r/>``, and the ``<a h/>`` answer (which counts a message once it is
durable and delivered) says which messages the cluster acknowledged. Every node is stopped at
the end (SIGTERM, then SIGKILL), also on an error or Ctrl-C.

Figures, after ``--warmup`` seconds of the same traffic: ``committed_per_s`` (messages
delivered to their recipient per second of the ``--seconds`` window), ``p50_ms``/``p99_ms``
(from just before a message is written to when its recipient has parsed it, for messages sent
in the window), ``lost`` (acknowledged by ``<a/>`` yet not delivered within ``--grace``
seconds), and ``cpu_percent`` (CPU time of each node and of this client process over the
window, 100 = one core). With ``--profile DIR`` each node runs under cProfile and writes
``DIR/nK.prof`` when it stops.

The last line on stdout is a JSON list, one object per client count::

    [{"clients": 20, "pairs": 10, "committed_per_s": ..., "p50_ms": ..., "p99_ms": ...,
      "lost": 0, ...}]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final

import trio
from c2s_throughput import Client, percentile, process_cpu_seconds, wait_ready

from villaged.config import load_config
from villaged.ops.control import call_control, control_socket_path
from villaged.ops.provision import DEV_PORT_OFFSETS, NODE_PORT_STRIDE, init_cluster

NODES: Final = 3
ZONES: Final = ("a", "b", "c")
PORT_BASE: Final = 28222  # below the ephemeral port range, like the other benchmarks
NS_SM: Final = "urn:xmpp:sm:3"
STOP_TIMEOUT_S: Final = 15.0


def say(text: str) -> None:
    print(f"cluster_throughput: {text}", file=sys.stderr, flush=True)


def ports_free(base: int) -> bool:
    """Whether every port the cluster would listen on is free on 127.0.0.1."""
    offsets = [offset for offset, _ in DEV_PORT_OFFSETS.values()]
    for k in range(NODES):
        for offset in offsets:
            with socket.socket() as probe:
                # As the listeners bind: a port that only has closed connections is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", base + NODE_PORT_STRIDE * k + offset))
                except OSError:
                    return False
    return True


def free_port_base(start: int) -> int:
    for base in range(start, start + 20 * 100, 100):
        if ports_free(base):
            return base
    raise RuntimeError(f"no free port range from {start} on 127.0.0.1")


@dataclass
class Node:
    id: str
    config: Path
    http_port: int
    c2s_port: int
    control: Path
    tls: ssl.SSLContext
    process: trio.Process | None = None

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid) if self.process else 0.0


def write_cluster(directory: Path, port_base: int) -> list[Node]:
    result = init_cluster(
        directory, nodes=NODES, zones=ZONES, port_base=port_base, now=datetime.now(UTC)
    )
    nodes = []
    for member in result.nodes:
        # Every bench client connects from 127.0.0.1; lift the per-address cap, log at info.
        text = member.config.read_text().replace('level = "debug"', 'level = "info"')
        member.config.write_text(text + "\n[c2s]\nmax_connections_per_ip = 100000\n")
        config = load_config(member.config)
        nodes.append(
            Node(
                id=member.id,
                config=member.config,
                http_port=member.port_base + DEV_PORT_OFFSETS["http"][0],
                c2s_port=member.port_base + DEV_PORT_OFFSETS["c2s"][0],
                control=control_socket_path(config),
                tls=ssl.create_default_context(cafile=str(config.tls.cert)),
            )
        )
    return nodes


async def start_nodes(nodes: list[Node], logs: list[IO[bytes]], profile: Path | None) -> None:
    for node in nodes:
        log = (node.config.parent / "villaged.log").open("ab")
        logs.append(log)
        python = [sys.executable]
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile / f"{node.id}.prof")]
        # Their own session: Ctrl-C reaches this process only, which stops them in order.
        node.process = await trio.lowlevel.open_process(
            [*python, "-m", "villaged", "run", "-c", str(node.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    say(f"started {', '.join(n.id for n in nodes)}; waiting for /readyz")
    with trio.fail_after(90):
        for node in nodes:
            assert node.process is not None
            await wait_ready(node.http_port, node.process)


async def stop_nodes(nodes: list[Node]) -> None:
    """SIGTERM every running node, then SIGKILL what still runs after STOP_TIMEOUT_S."""
    running = [n.process for n in nodes if n.process is not None and n.process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    with trio.move_on_after(STOP_TIMEOUT_S):
        for process in running:
            await process.wait()
    for process in running:
        if process.poll() is None:
            say(f"pid {process.pid} did not stop within {STOP_TIMEOUT_S:g} s: killing it")
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


async def create_accounts(nodes: list[Node], users: list[str]) -> None:
    """Every account through some node's control socket (a few at once: each is a commit)."""
    limiter = trio.CapacityLimiter(4)

    async def add(i: int, user: str) -> None:
        async with limiter:
            node = nodes[i % len(nodes)]
            args = {"jid": f"{user}@localhost", "password": f"{user}-pw"}
            await call_control(node.control, "user.add", args)

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for i, user in enumerate(users):
                nursery.start_soon(add, i, user)


@dataclass
class Pair:
    """A sender on one node and its recipient on another; messages are numbered from 1."""

    index: int
    sender: Client
    recipient: Client
    window: trio.Semaphore
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    #: message number → when it was written, until its recipient has it
    outstanding: dict[int, float] = field(default_factory=dict)
    sent: int = 0
    #: ``h`` of the last <a/> the sender received
    acked: int = 0
    #: stanzas the sender received since <enabled/>, for the server's <r/>
    received: int = 0
    final_ack: trio.Event = field(default_factory=trio.Event)
    asked_final: bool = False
    #: probe messages sent (before the numbered ones: the first ``h`` counts them too)
    probes: int = 0
    probed: trio.Event = field(default_factory=trio.Event)

    async def send(self, data: bytes) -> None:
        async with self.send_lock:  # the sender's reader answers the server's <r/> too
            await self.sender.send(data)

    def message(self, mid: str) -> bytes:
        return (
            f"<message to='r{self.index}@localhost' type='chat' id='{mid}'>"
            f"<body>cluster benchmark message {mid}</body></message>"
        ).encode()


@dataclass
class Tally:
    measure_from: float
    stop_at: float
    latencies: list[float] = field(default_factory=list)
    committed: int = 0
    delivered: int = 0
    errors: int = 0


async def enable_sm(client: Client) -> None:
    await client.send(f"<enable xmlns='{NS_SM}'/>".encode())
    for _ in range(100):  # the initial presence's echo may come first
        element = await client.element()
        if element.tag == f"{{{NS_SM}}}enabled":
            return
        if element.tag == f"{{{NS_SM}}}failed":
            raise RuntimeError("stream management refused")
    raise RuntimeError("no <enabled/>")


async def log_in(nodes: list[Node], pairs: int) -> list[Pair]:
    senders: dict[int, Client] = {}
    recipients: dict[int, Client] = {}

    async def one(i: int, role: str) -> None:
        # Sender of pair i on node i mod 3, its recipient on the next node.
        node = nodes[(i + (role == "r")) % len(nodes)]
        user = f"{role}{i}"
        client = await Client.login(node.c2s_port, node.tls, user, f"{user}-pw")
        if role == "s":
            await enable_sm(client)
            senders[i] = client
        else:
            recipients[i] = client

    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            for i in range(pairs):
                nursery.start_soon(one, i, "s")
                nursery.start_soon(one, i, "r")
    return [
        Pair(index=i, sender=senders[i], recipient=recipients[i], window=trio.Semaphore(0))
        for i in range(pairs)
    ]


async def read_recipient(pair: Pair, tally: Tally) -> None:
    while True:
        element = await pair.recipient.element()
        if not element.tag.endswith("}message") or element.get("type") == "error":
            continue
        mid = element.get("id") or ""
        if mid.startswith("probe"):
            pair.probed.set()
            continue
        started = pair.outstanding.pop(int(mid), None) if mid.isdigit() else None
        if started is None:
            continue
        now = trio.current_time()
        tally.delivered += 1
        if tally.measure_from <= now < tally.stop_at:
            tally.committed += 1
        if started >= tally.measure_from:
            tally.latencies.append((now - started) * 1000)
        pair.window.release()


async def read_sender(pair: Pair, tally: Tally) -> None:
    while True:
        element = await pair.sender.element()
        if element.tag == f"{{{NS_SM}}}a":
            pair.acked = int(element.get("h") or 0)
            if pair.asked_final:
                pair.final_ack.set()
            continue
        if element.tag == f"{{{NS_SM}}}r":
            await pair.send(f"<a xmlns='{NS_SM}' h='{pair.received}'/>".encode())
            continue
        pair.received += 1
        mid = element.get("id") or ""
        failed = element.get("type") == "error" and mid.isdigit()
        if failed and pair.outstanding.pop(int(mid), None) is not None:
            tally.errors += 1
            pair.window.release()


async def probe(pair: Pair) -> None:
    """Until a message reaches the recipient: its session is mirrored to the sender's node."""
    for attempt in range(20):
        await pair.send(pair.message(f"probe{attempt}"))
        pair.probes += 1
        with trio.move_on_after(1.0):
            await pair.probed.wait()
            return
    raise RuntimeError(f"pair {pair.index}: no probe message delivered in 20 s")


async def drive(pair: Pair, tally: Tally, interval: float, phase: float) -> None:
    """Send until ``stop_at`` (every ``interval`` s, or whenever the window allows), then ask
    for the final <a/>."""
    next_at = trio.current_time() + phase * interval
    while True:
        if interval:
            next_at += interval
            await trio.sleep_until(min(next_at, tally.stop_at))
        else:
            with trio.move_on_at(tally.stop_at):
                await pair.window.acquire()
        if trio.current_time() >= tally.stop_at:
            break
        pair.sent += 1
        pair.outstanding[pair.sent] = trio.current_time()
        await pair.send(pair.message(str(pair.sent)))
    pair.asked_final = True
    await pair.send(f"<r xmlns='{NS_SM}'/>".encode())


async def measure(args: argparse.Namespace, nodes: list[Node], clients: int) -> dict[str, object]:
    pairs = clients // 2
    interval = pairs / args.rate if args.rate else 0.0
    say(f"{clients} clients ({pairs} pairs): logging in")
    connected = await log_in(nodes, pairs)
    try:
        tally = Tally(measure_from=0.0, stop_at=0.0)
        async with trio.open_nursery() as nursery:
            for pair in connected:
                nursery.start_soon(read_recipient, pair, tally)
                nursery.start_soon(read_sender, pair, tally)
            with trio.fail_after(30):
                async with trio.open_nursery() as probes:
                    for pair in connected:
                        probes.start_soon(probe, pair)
            for pair in connected:
                pair.window = trio.Semaphore(args.window)
            mode = f"open loop {args.rate:g}/s" if args.rate else f"window {args.window}"
            say(f"{mode}: {args.warmup:g} s warm-up, then {args.seconds:g} s")
            tally.measure_from = trio.current_time() + args.warmup
            tally.stop_at = tally.measure_from + args.seconds
            for i, pair in enumerate(connected):
                nursery.start_soon(drive, pair, tally, interval, i / pairs)
            await trio.sleep_until(tally.measure_from)
            cpu_before = cpu_snapshot(nodes)
            await trio.sleep_until(tally.stop_at)
            cpu_after = cpu_snapshot(nodes)
            with trio.move_on_after(args.grace):
                while any(p.outstanding or not p.final_ack.is_set() for p in connected):  # noqa: ASYNC110 - bounded drain
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        for pair in connected:
            await trio.aclose_forcefully(pair.sender.stream)
            await trio.aclose_forcefully(pair.recipient.stream)
    lost = sum(sum(1 for n in p.outstanding if n <= p.acked - p.probes) for p in connected)
    return {
        "clients": clients,
        "pairs": pairs,
        "clients_are": "connections: half senders, half recipients on another node",
        "mode": mode,
        "rate": args.rate or None,
        "committed_per_s": round(tally.committed / args.seconds, 1),
        "p50_ms": round(percentile(tally.latencies, 0.50), 2),
        "p99_ms": round(percentile(tally.latencies, 0.99), 2),
        "lost": lost,
        "sent": sum(p.sent for p in connected),
        "acked": sum(max(0, p.acked - p.probes) for p in connected),
        "delivered": tally.delivered,
        "undelivered": sum(len(p.outstanding) for p in connected),
        "errors": tally.errors,
        "cpu_percent": {
            name: round(100 * (cpu_after[name] - cpu_before[name]) / args.seconds, 1)
            for name in cpu_after
        },
    }


def cpu_snapshot(nodes: list[Node]) -> dict[str, float]:
    snapshot = {node.id: node.cpu_seconds() for node in nodes}
    snapshot["bench"] = process_cpu_seconds(os.getpid())
    return snapshot


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    counts = [int(c) for c in args.clients.split(",")]
    if any(c < 2 or c % 2 for c in counts):
        raise SystemExit("--clients: even numbers of at least 2 (senders and recipients)")
    directory = Path(tempfile.mkdtemp(prefix="vcb", dir="/tmp"))  # Unix sockets: keep it short
    nodes: list[Node] = []
    logs: list[IO[bytes]] = []
    stopped: list[bool] = []
    try:
        port_base = free_port_base(args.port_base)
        nodes = write_cluster(directory, port_base)
        say(f"cluster in {directory}, ports {port_base}…{port_base + 2 * NODE_PORT_STRIDE + 6}")
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def cancel_on_signal() -> None:
                    async for _ in signals:
                        say("SIGTERM: stopping")
                        stopped.append(True)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_on_signal)
                await start_nodes(nodes, logs, args.profile)
                most = max(counts) // 2
                say(f"creating {2 * most} accounts")
                await create_accounts(nodes, [f"{r}{i}" for i in range(most) for r in "sr"])
                results = []
                for clients in counts:
                    results.append(await measure(args, nodes, clients))
                    say(json.dumps(results[-1]))
                nursery.cancel_scope.cancel()
        if stopped:
            raise SystemExit("cluster_throughput: stopped by SIGTERM")
        return results
    finally:
        with trio.CancelScope(shield=True):
            await stop_nodes(nodes)
        for log in logs:
            log.close()
        if args.keep:
            say(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", default="20", help="comma-separated client connection counts (even)"
    )
    parser.add_argument("--window", type=int, default=10, help="messages in flight per sender")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: total messages/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=10.0, help="drain time after the run")
    parser.add_argument("--port-base", type=int, default=PORT_BASE)
    parser.add_argument("--profile", metavar="DIR", help="run the nodes under cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the cluster directory")
    args = parser.parse_args()
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    interrupted = False
    try:
        results = trio.run(run, args)
    except* KeyboardInterrupt:
        interrupted = True  # the nodes are stopped by then (run's finally)
    if interrupted:
        sys.exit("cluster_throughput: interrupted")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
