"""Benchmark: chat throughput, latency and memory of a real villaged process over TLS.

Starts ``villaged run`` on a fresh development node under ``var/bench/c2s`` (loopback only),
logs in N pairs of users over STARTTLS with SCRAM-SHA-256, and has each user of a pair keep
``--window`` chat messages in flight to the other (closed loop) for ``--seconds``; or, with
``--rate R``, sends R messages/s in total on a fixed schedule (open loop). Latency is from
just before a message is written to when its recipient has parsed it. The client side is
deliberately thin (pre-serialized stanzas, the project's own parser) so that it does not
measure itself. With ``--idle K`` it also opens K more authenticated connections that stay
idle and reports the server's resident memory per idle connection. With ``--ws`` every client
connects over XMPP over WebSocket (RFC 7395, the TLS WebSocket listener) instead, framed with
wsproto, and the result says ``"transport": "websocket"``.

The last line on stdout is one JSON object::

    {"pairs": 50, "messages": ..., "delivered_per_s": ..., "p50_ms": ..., "p99_ms": ...,
     "lost": 0, "cpu_percent": {"server": ..., "bench": ...}, "rss_per_idle_connection_kib": ...}

``cpu_percent`` is the CPU time the server process and this client process used over the
exchange (100 = one core): a single villaged process runs on one core.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import ssl
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from villaged.config import load_config
from villaged.net.c2s import COMPACT_AFTER_S
from villaged.ops.provision import DEV_PORT_OFFSETS, init_dev
from villaged.storage.store import StoreOptions, open_store
from villaged.xmpp import xml

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
FRAMED_OPEN = b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>"
PORT_BASE = 25222  # below the ephemeral port range, so client sockets never hold it


def header() -> bytes:
    return (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
    )


class Client:
    """A minimal XMPP client: STARTTLS, SCRAM-SHA-256, bind, then raw stanzas."""

    ns = ""  # stanzas inherit jabber:client from the stream header

    def __init__(self, stream: trio.abc.Stream, tcp: trio.SocketStream) -> None:
        self.stream, self.tcp = stream, tcp
        self.parser = xml.StreamParser()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def restart(self) -> None:
        self.parser = xml.StreamParser()
        await self.stream.send_all(header())

    async def element(self) -> xml.ET.Element:  # type: ignore[name-defined]
        while True:
            event = self.parser.next_event()
            if isinstance(event, xml.StanzaReceived):
                return event.element
            if isinstance(event, xml.StreamClosed | xml.ConnectionClosed):
                raise EOFError("stream closed")
            if event is xml.NEED_DATA:
                self.parser.receive_data(bytes(await self.stream.receive_some(65536)))

    @classmethod
    async def login(cls, port: int, ca: ssl.SSLContext, user: str, password: str) -> Client:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(tcp, tcp)
        await tcp.send_all(header())
        await client.element()
        await tcp.send_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await client.element()
        client.stream = trio.SSLStream(tcp, ca, server_hostname="localhost")
        await client.restart()
        await client.element()
        await authenticate_and_bind(client, user, password)
        return client


class WsClient:
    """The same client over XMPP over WebSocket: one text message per element (wsproto for the
    framing, the project's framed parser for the XML)."""

    ns = " xmlns='jabber:client'"  # each message is a document of its own (RFC 7395 §3.3.3)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.parser = xml.FramedStreamParser()
        self.parts: list[str] = []  # of the text message being received
        self.send_lock = trio.Lock()  # the receiver answers pings while the sender sends

    async def send(self, data: bytes) -> None:
        frame = self.ws.send(TextMessage(data=data.decode()))
        async with self.send_lock:
            await self.stream.send_all(frame)

    async def restart(self) -> None:
        await self.send(FRAMED_OPEN)

    async def element(self) -> xml.ET.Element:  # type: ignore[name-defined]
        while True:
            event = self.parser.next_event()
            if isinstance(event, xml.StanzaReceived):
                return event.element
            if isinstance(event, xml.StreamClosed | xml.ConnectionClosed):
                raise EOFError("stream closed")
            if event is xml.NEED_DATA:
                await self._receive()

    async def _receive(self) -> None:
        data = bytes(await self.stream.receive_some(65536))
        if not data:
            raise EOFError("connection closed")
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    self.parser.receive_message("".join(self.parts))
                    self.parts = []
            elif isinstance(event, Ping):
                async with self.send_lock:
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, AcceptConnection):
                pass
            else:
                raise EOFError(f"WebSocket: {event}")

    @classmethod
    async def login(cls, port: int, ca: ssl.SSLContext, user: str, password: str) -> WsClient:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(trio.SSLStream(tcp, ca, server_hostname="localhost"))
        request = Request(host="localhost", target="/xmpp-websocket", subprotocols=["xmpp"])
        await client.stream.send_all(client.ws.send(request))
        while client.ws.state is ConnectionState.CONNECTING:
            await client._receive()
        await client.restart()
        await client.element()  # features (the <open/> before them is skipped)
        await authenticate_and_bind(client, user, password)
        return client


async def authenticate_and_bind(client: Client | WsClient, user: str, password: str) -> None:
    """SCRAM-SHA-256, the stream restart, bind and initial presence."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n={user},r={nonce}"
    token = base64.b64encode(f"n,,{first_bare}".encode()).decode()
    await client.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{token}</auth>".encode())
    server_first = base64.b64decode((await client.element()).text or "").decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored, auth_message, "sha256")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    final = base64.b64encode(f"{without_proof},p={proof.decode()}".encode()).decode()
    await client.send(f"<response xmlns='{SASL}'>{final}</response>".encode())
    success = await client.element()
    if not success.tag.endswith("success"):
        raise PermissionError(f"login of {user} failed")
    await client.restart()
    await client.element()
    await client.send(
        f"<iq{client.ns} type='set' id='b'>".encode()
        + b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>bench</resource></bind></iq>"
    )
    await client.element()
    await client.send(f"<presence{client.ns}/>".encode())


async def wait_ready(port: int, proc: trio.Process) -> None:
    with trio.fail_after(30):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"villaged exited with {proc.returncode}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            async with stream:
                await stream.send_all(
                    b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200"):
                return
            await trio.sleep(0.1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    directory = ROOT / "var" / "bench" / "c2s"
    shutil.rmtree(directory, ignore_errors=True)
    result = init_dev(directory, port_base=args.port_base, now=datetime.now(UTC))
    # Every bench client connects from 127.0.0.1; lift the per-address cap, and log at info.
    text = result.config.read_text().replace('level = "debug"', 'level = "info"')
    result.config.write_text(text + "\n[c2s]\nmax_connections_per_ip = 100000\n")
    config = load_config(result.config)
    users = [f"u{i}" for i in range(2 * args.pairs + args.idle)]
    print(f"c2s_throughput: creating {len(users)} accounts", file=sys.stderr)
    options = StoreOptions.from_config(config.storage)
    async with open_store(options) as store, trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(store.add_user, f"{user}@localhost", f"{user}-pw")
    ca = ssl.create_default_context(cafile=str(config.tls.cert))
    log_file = (directory / "node.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "villaged", "run", "-c", str(result.config)],
        stdout=log_file,
        stderr=log_file,
    )
    try:
        await wait_ready(args.port_base + 3, proc)
        clients: dict[str, Client | WsClient] = {}

        async def login(user: str) -> None:
            if args.ws:
                port = args.port_base + DEV_PORT_OFFSETS["websocket"][0]
                clients[user] = await WsClient.login(port, ca, user, f"{user}-pw")
            else:
                clients[user] = await Client.login(args.port_base, ca, user, f"{user}-pw")

        print("c2s_throughput: logging in", file=sys.stderr)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for user in users[: 2 * args.pairs]:
                    nursery.start_soon(login, user)
        cpu_before = process_cpu_seconds(proc.pid), process_cpu_seconds(os.getpid())
        began = trio.current_time()
        figures = await exchange(args, clients, users[: 2 * args.pairs])
        elapsed = trio.current_time() - began
        cpu_after = process_cpu_seconds(proc.pid), process_cpu_seconds(os.getpid())
        figures["cpu_percent"] = {
            name: round(100 * (after - before) / elapsed, 1)
            for name, before, after in zip(("server", "bench"), cpu_before, cpu_after, strict=True)
        }
        if args.ws:
            figures["transport"] = "websocket"
        if args.idle:
            before = rss_kib(proc.pid)
            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    for user in users[2 * args.pairs :]:
                        nursery.start_soon(login, user)
            # Idle means quiet: past the point where a quiet stream releases its parser.
            await trio.sleep(COMPACT_AFTER_S + 2)
            figures["rss_per_idle_connection_kib"] = round(
                (rss_kib(proc.pid) - before) / args.idle, 1
            )
        return figures
    finally:
        proc.terminate()
        with trio.move_on_after(15):
            await proc.wait()
        if proc.poll() is None:
            proc.kill()
        log_file.close()


async def exchange(
    args: argparse.Namespace, clients: dict[str, Client | WsClient], users: list[str]
) -> dict[str, object]:
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    counts = {"sent": 0, "received": 0}
    drained = trio.Event()
    stop_at = trio.current_time() + args.seconds
    interval = (2 * args.pairs) / args.rate if args.rate else 0.0

    async def sender(me: str, peer: str, window: trio.Semaphore, phase: float) -> None:
        client = clients[me]
        n = 0
        # Open loop: senders are spread evenly over one interval, so the total arrival rate is
        # steady rather than every sender firing in the same instant.
        next_at = trio.current_time() + phase * interval
        while trio.current_time() < stop_at:
            if interval:
                next_at += interval
                await trio.sleep_until(next_at)
            else:
                await window.acquire()
            n += 1
            mid = f"{me}-{n}"
            sent_at[mid] = time.perf_counter()
            counts["sent"] += 1
            await client.send(
                f"<message{client.ns} to='{peer}@localhost' type='chat' id='{mid}'>"
                f"<body>benchmark message {n} from {me}</body></message>".encode()
            )

    async def receiver(me: str, window: trio.Semaphore) -> None:
        client = clients[me]
        while True:
            element = await client.element()
            if not element.tag.endswith("}message") or element.get("type") == "error":
                continue
            mid = element.get("id") or ""
            started = sent_at.pop(mid, None)
            if started is not None:
                latencies.append((time.perf_counter() - started) * 1000)
                counts["received"] += 1
                window.release()
                if not sent_at and trio.current_time() >= stop_at:
                    drained.set()

    print(f"c2s_throughput: exchanging for {args.seconds}s", file=sys.stderr)
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        windows = {u: trio.Semaphore(args.window) for u in users}
        senders = len(users)
        for i, (a, b) in enumerate(zip(users[0::2], users[1::2], strict=True)):
            # a's window is released when b receives a's messages, and vice versa.
            nursery.start_soon(sender, a, b, windows[a], (2 * i) / senders)
            nursery.start_soon(sender, b, a, windows[b], (2 * i + 1) / senders)
            nursery.start_soon(receiver, b, windows[a])
            nursery.start_soon(receiver, a, windows[b])
        await trio.sleep_until(stop_at)
        with trio.move_on_after(5):  # drain what is in flight
            if sent_at:
                await drained.wait()
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - began
    return {
        "pairs": args.pairs,
        "mode": f"open loop {args.rate}/s" if args.rate else f"closed loop window {args.window}",
        "messages": counts["received"],
        "delivered_per_s": round(counts["received"] / max(elapsed, 1e-9), 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "lost": counts["sent"] - counts["received"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=10, help="messages in flight per sender")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: total messages/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=0, help="idle connections for memory")
    parser.add_argument("--port-base", type=int, default=PORT_BASE)
    parser.add_argument("--ws", action="store_true", help="clients over XMPP over WebSocket")
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
