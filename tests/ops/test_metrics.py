"""Prometheus metrics end to end: an in-process node, real TLS clients, and GET /metrics
scraped from the node's loopback HTTP listener and parsed as Prometheus does."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.net.rawclient import RawClient
from tests.nodes import start_node
from villaged import __version__
from villaged.admin.server import AuditUnavailableError
from villaged.ops.metrics import Metrics

if TYPE_CHECKING:
    from pathlib import Path

    from tests.nodes import RunningNode

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(node: RunningNode) -> Samples:
    """GET /metrics over HTTP; every sample by (name, labels)."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.node.status.http_ports[0])
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 200 "), status_line
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert headers["content-type"] == CONTENT_TYPE_LATEST.lower()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def logged_in(node: RunningNode, user: str, *, direct_tls: bool) -> RawClient:
    port = node.c2s_tls if direct_tls else node.c2s
    client = await RawClient.connect(port, node.ca_file, direct_tls=direct_tls)
    await client.login(user, f"{user}-password", resource="r", starttls=not direct_tls)
    await client.send(b"<presence/>")
    return client


async def test_counters_follow_logins_and_messages(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = await start_node(nursery, tmp_path)
    before = await scrape(node)
    assert value(before, "villaged_connections", transport="c2s") == 0
    assert value(before, "villaged_sessions") == 0

    alice = await logged_in(node, "alice", direct_tls=True)
    bob = await logged_in(node, "bob", direct_tls=False)
    await alice.send(b"<message to='bob@localhost' type='chat' id='m1'><body>hi</body></message>")
    while (got := await bob.element()).tag != "{jabber:client}message":
        pass
    assert got.get("id") == "m1"
    after = await scrape(node)

    assert value(after, "villaged_connections", transport="c2s") == 1
    assert value(after, "villaged_connections", transport="c2s_tls") == 1
    assert value(after, "villaged_connections", transport="websocket") == 0
    assert value(after, "villaged_sessions") == 2

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("villaged_auth_total", result="success") == 2
    assert moved("villaged_auth_total", result="failure") == 0
    assert moved("villaged_stanzas_total", direction="in", kind="message") == 1
    assert moved("villaged_stanzas_total", direction="in", kind="presence") == 2
    assert moved("villaged_stanzas_total", direction="out", kind="message") >= 1
    assert moved("villaged_storage_append_seconds_count") >= 1
    assert moved("villaged_storage_fsync_seconds_count") >= 1
    assert moved("villaged_storage_fsync_seconds_sum") > 0
    assert moved("villaged_log_last_index") >= 1
    python = platform.python_version()
    assert value(after, "villaged_build_info", version=__version__, python=python) == 1

    await alice.aclose()
    await bob.aclose()
    with trio.fail_after(10):
        await node.node.sessions.wait_empty()
    closed = await scrape(node)
    assert value(closed, "villaged_sessions") == 0
    assert value(closed, "villaged_connections", transport="c2s") == 0
    assert value(closed, "villaged_connections", transport="c2s_tls") == 0


async def test_a_failed_login_counts_as_an_auth_failure(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await start_node(nursery, tmp_path)
    before = await scrape(node)
    client = await RawClient.connect(node.c2s, node.ca_file)
    with pytest.raises(PermissionError, match="not-authorized"):
        await client.login("alice", "wrong-password")
    after = await scrape(node)
    await client.aclose()
    failures = value(after, "villaged_auth_total", result="failure")
    assert failures - value(before, "villaged_auth_total", result="failure") == 1
    assert value(after, "villaged_auth_total", result="success") == 0
    assert value(after, "villaged_sessions") == 0


async def test_audit_records_are_counted_by_result(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await start_node(nursery, tmp_path)
    admin = node.node.admin
    assert admin is not None
    appended: list[dict[str, object]] = []
    monkeypatch.setattr(admin.audit, "append", appended.append)
    await admin.record({"action": "test"})

    def broken(entry: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(admin.audit, "append", broken)
    with pytest.raises(AuditUnavailableError):
        await admin.record({"action": "test"})
    samples = await scrape(node)
    assert appended == [{"action": "test"}]
    assert value(samples, "villaged_audit_records_total", result="success") == 1
    assert value(samples, "villaged_audit_records_total", result="failure") == 1


def test_each_node_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second
    first.stanza_received("message")
    first.stanza_sent("{jabber:client}iq")
    first.stanza_sent("{urn:example}not-a-stanza")  # not counted, not an error
    families = {f.name: f for f in text_string_to_metric_families(first.render().decode())}
    stanzas = {
        (s.labels["direction"], s.labels["kind"]): s.value
        for s in families["villaged_stanzas"].samples
        if s.name == "villaged_stanzas_total"
    }
    assert stanzas[("in", "message")] == 1
    assert stanzas[("out", "iq")] == 1
    assert sum(stanzas.values()) == 2
    assert b'villaged_stanzas_total{direction="in",kind="message"} 0.0' in second.render()


async def test_backup_age_and_verification_are_reported(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    from villaged.cli import main

    backups = tmp_path / "backups"
    node = await start_node(nursery, tmp_path, extra_toml=f'[backup]\ndir = "{backups}"')
    watch = node.node.status.metrics.backup_watch
    assert watch is not None
    await watch.refresh()  # (it also runs every 30 s on its own)
    samples = await scrape(node)
    assert value(samples, "villaged_backup_age_seconds") == math.inf  # none yet: alert
    assert math.isnan(value(samples, "villaged_backup_last_verified_timestamp_seconds"))
    assert value(samples, "villaged_backups") == 0

    config = str(node.config.source)
    assert await trio.to_thread.run_sync(main, ["backup", "create", "-c", config]) == 0
    await watch.refresh()
    samples = await scrape(node)
    assert value(samples, "villaged_backups") == 1
    assert 0 <= value(samples, "villaged_backup_age_seconds") < 60
    assert math.isnan(value(samples, "villaged_backup_last_verified_timestamp_seconds"))

    verify = ["backup", "verify", str(backups), "-c", config]
    assert await trio.to_thread.run_sync(main, verify) == 0
    await watch.refresh()
    samples = await scrape(node)
    verified = value(samples, "villaged_backup_last_verified_timestamp_seconds")
    created = value(samples, "villaged_backup_last_created_timestamp_seconds")
    assert created <= verified
    nursery.cancel_scope.cancel()
