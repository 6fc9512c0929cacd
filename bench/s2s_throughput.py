"""Benchmark: chat throughput and latency across two federated villaged processes.

Makes a throwaway CA, two development nodes of domains ``a.bench`` and ``b.bench`` under
``var/bench/s2s`` (loopback only, certificates from that CA, static ``[[federation.peers]]``
routes), starts both with ``villaged run``, logs in N senders on a.bench and N receivers on
b.bench (STARTTLS, SCRAM-SHA-256), and has each sender keep ``--window`` chat messages in
flight to its receiver (closed loop) for ``--seconds``. Every message crosses the s2s link:
sealed into a.bench's durable queue, sent, confirmed by the ping barrier, archived and
delivered at b.bench. Latency is from just before the sender writes a message to when its
recipient has parsed it.

The last line on stdout is one JSON object::

    {"pairs": 20, "messages": ..., "delivered_per_s": ..., "p50_ms": ..., "p99_ms": ...,
     "lost": 0}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import ssl
import sys
import time
from pathlib import Path

import trio
from c2s_throughput import authenticate_and_bind, percentile, wait_ready
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from villaged.config import load_config
from villaged.ops.provision import init_dev
from villaged.storage.store import StoreOptions, open_store
from villaged.xmpp import xml

ROOT = Path(__file__).resolve().parent.parent
BASES = {"a.bench": 26222, "b.bench": 27222}


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_pki(directory: Path) -> Path:
    """A CA and a server certificate per domain (dNSName = the domain); the CA file."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("s2s bench CA"))
        .issuer_name(_name("s2s bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for domain in BASES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(domain))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{domain}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = directory / f"{domain}.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
    return ca_file


def write_node(directory: Path, domain: str, ca_file: Path) -> Path:
    """A dev node of ``domain`` federating with the other bench domain."""
    result = init_dev(
        directory / domain, domain=domain, port_base=BASES[domain], now=dt.datetime.now(dt.UTC)
    )
    text = result.config.read_text().replace('level = "debug"', 'level = "info"')
    text = text.replace('cert = "tls/cert.pem"', f'cert = "{directory / (domain + ".crt")}"')
    text = text.replace('key = "tls/key.pem"', f'key = "{directory / (domain + ".key")}"')
    text += "\n[c2s]\nmax_connections_per_ip = 100000\n"
    text += f'\n[federation]\nenabled = true\nca_file = "{ca_file}"\n'
    for peer, base in BASES.items():
        if peer != domain:
            text += f'\n[[federation.peers]]\ndomain = "{peer}"\nhost = "127.0.0.1"\n'
            text += f"port = {base + 4}\n"
    result.config.write_text(text)
    return result.config


class Client:
    """STARTTLS, SCRAM-SHA-256, bind, then raw stanzas, for one domain."""

    ns = ""

    def __init__(self, stream: trio.abc.Stream, domain: str) -> None:
        self.stream, self.domain = stream, domain
        self.parser = xml.StreamParser()

    def header(self) -> bytes:
        return (
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams' "
            f"to='{self.domain}' version='1.0'>"
        ).encode()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def restart(self) -> None:
        self.parser = xml.StreamParser()
        await self.stream.send_all(self.header())

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
    async def login(cls, port: int, ca: ssl.SSLContext, jid: str) -> Client:
        user, domain = jid.split("@")
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(tcp, domain)
        await tcp.send_all(client.header())
        await client.element()
        await tcp.send_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await client.element()
        client.stream = trio.SSLStream(tcp, ca, server_hostname=domain)
        await client.restart()
        await client.element()
        await authenticate_and_bind(client, user, f"{user}-pw")  # type: ignore[arg-type]
        return client


async def run(args: argparse.Namespace) -> dict[str, object]:
    directory = ROOT / "var" / "bench" / "s2s"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    ca_file = make_pki(directory)
    configs = {domain: write_node(directory, domain, ca_file) for domain in BASES}
    senders = [f"s{i}@a.bench" for i in range(args.pairs)]
    receivers = [f"r{i}@b.bench" for i in range(args.pairs)]
    for domain, jids in (("a.bench", senders), ("b.bench", receivers)):
        options = StoreOptions.from_config(load_config(configs[domain]).storage)
        async with open_store(options) as store, trio.open_nursery() as nursery:
            for jid in jids:
                nursery.start_soon(store.add_user, jid, f"{jid.split('@')[0]}-pw")
    ca = ssl.create_default_context(cafile=str(ca_file))
    logs = {d: (directory / f"{d}.log").open("wb") for d in BASES}
    procs = {
        d: await trio.lowlevel.open_process(
            [sys.executable, "-m", "villaged", "run", "-c", str(configs[d])],
            stdout=logs[d],
            stderr=logs[d],
        )
        for d in BASES
    }
    try:
        for domain, proc in procs.items():
            await wait_ready(BASES[domain] + 3, proc)
        clients: dict[str, Client] = {}

        async def login(jid: str) -> None:
            clients[jid] = await Client.login(BASES[jid.split("@")[1]], ca, jid)

        print("s2s_throughput: logging in", file=sys.stderr)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for jid in senders + receivers:
                    nursery.start_soon(login, jid)
        return await exchange(args, clients, senders, receivers)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with trio.move_on_after(15):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
        for log in logs.values():
            log.close()


async def exchange(
    args: argparse.Namespace, clients: dict[str, Client], senders: list[str], receivers: list[str]
) -> dict[str, object]:
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    counts = {"sent": 0, "received": 0}
    stop_at = trio.current_time() + args.warmup + args.seconds
    measure_from = trio.current_time() + args.warmup

    async def sender(me: str, peer: str, window: trio.Semaphore) -> None:
        n = 0
        while trio.current_time() < stop_at:
            await window.acquire()
            n += 1
            mid = f"{me}-{n}"
            sent_at[mid] = time.perf_counter()
            counts["sent"] += 1
            await clients[me].send(
                f"<message to='{peer}' type='chat' id='{mid}'>"
                f"<body>benchmark message {n}</body></message>".encode()
            )

    async def receiver(me: str, window: trio.Semaphore) -> None:
        while True:
            element = await clients[me].element()
            if not element.tag.endswith("}message") or element.get("type") == "error":
                continue
            started = sent_at.pop(element.get("id") or "", None)
            if started is not None:
                if trio.current_time() >= measure_from:
                    latencies.append((time.perf_counter() - started) * 1000)
                    counts["received"] += 1
                window.release()

    print(f"s2s_throughput: {args.warmup}s warm-up, then {args.seconds}s", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        for me, peer in zip(senders, receivers, strict=True):
            window = trio.Semaphore(args.window)
            nursery.start_soon(sender, me, peer, window)
            nursery.start_soon(receiver, peer, window)
        await trio.sleep_until(stop_at)
        with trio.move_on_after(10):
            while sent_at:  # noqa: ASYNC110 - drain what is in flight
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return {
        "pairs": args.pairs,
        "messages": counts["received"],
        "delivered_per_s": round(counts["received"] / args.seconds, 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "lost": len(sent_at),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--window", type=int, default=10, help="messages in flight per sender")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
