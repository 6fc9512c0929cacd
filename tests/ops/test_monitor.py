"""The security monitor: sliding windows, bounded keys, blocks that expire, rate-limited alerts,
the alert command; and, end to end, a brute-forcing address blocked while another is not."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from tests.net.rawclient import RawClient, header
from tests.nodes import start_node
from villaged.config import MonitorConfig
from villaged.ops import monitor
from villaged.ops.monitor import (
    ALERT_QUEUE,
    Alert,
    MonitorService,
    Rule,
    SecurityMonitor,
    rules_from_config,
)
from villaged.xmpp import xml

if TYPE_CHECKING:
    from pathlib import Path


def _monitor(
    threshold: int = 3, window: float = 10, block: float = 0, keys: int = 100
) -> SecurityMonitor:
    return SecurityMonitor({"r": Rule("r", threshold, window, block)}, max_keys=keys)


# ----- the sans-I/O core ------------------------------------------------------------------


def test_only_events_within_the_window_count() -> None:
    m = _monitor(threshold=3, window=10)
    assert m.record("r", "k", 0) == []
    assert m.record("r", "k", 5) == []
    assert m.record("r", "k", 11) == []  # the event at 0 has left the window
    assert m.record("r", "k", 12) == [Alert("r", "k", 3, 10)]


def test_keys_are_counted_apart() -> None:
    m = _monitor(threshold=2)
    assert m.record("r", "a", 0) == []
    assert m.record("r", "b", 0) == []
    assert m.record("r", "a", 1) == [Alert("r", "a", 2, 10)]


def test_alerts_for_one_rule_and_key_come_once_per_window() -> None:
    m = _monitor(threshold=2, window=10)
    m.record("r", "k", 0)
    assert m.record("r", "k", 1) == [Alert("r", "k", 2, 10)]
    for now in range(2, 11):
        assert m.record("r", "k", now) == [], now
    assert m.record("r", "k", 11) == [Alert("r", "k", 2, 10)]
    assert m.record("r", "other", 11) == []  # another key has its own count and quiet time
    assert m.record("r", "other", 11) == [Alert("r", "other", 2, 10)]


def test_tracked_keys_are_capped_and_the_least_recently_seen_forgotten() -> None:
    m = _monitor(threshold=2, keys=2)
    m.record("r", "a", 0)
    m.record("r", "b", 0)
    m.record("r", "a", 0.5)  # a: 2 events, now the most recently seen
    m.record("r", "c", 1)  # forgets b
    assert m.record("r", "b", 2) == []  # b starts again from one
    assert m.record("r", "c", 2) == [Alert("r", "c", 2, 10)]


def test_a_block_holds_until_it_expires() -> None:
    m = _monitor(threshold=2, window=10, block=60)
    m.record("r", "10.0.0.1", 0)
    assert not m.is_blocked("10.0.0.1", 0)
    assert m.record("r", "10.0.0.1", 1) == [Alert("r", "10.0.0.1", 2, 10, blocked_until=61)]
    assert m.is_blocked("10.0.0.1", 1)
    assert m.is_blocked("10.0.0.1", 60.9)
    assert not m.is_blocked("10.0.0.2", 2)
    assert not m.is_blocked("10.0.0.1", 61)
    assert "10.0.0.1" not in m.blocked  # forgotten once expired


def test_a_block_is_extended_even_while_alerts_are_quiet() -> None:
    m = _monitor(threshold=2, window=10, block=5)
    m.record("r", "ip", 0)
    assert m.record("r", "ip", 1) != []
    assert m.record("r", "ip", 4) == []  # no second alert within the window...
    assert m.is_blocked("ip", 8)  # ...but the block runs from the latest failure


def test_blocked_addresses_are_capped() -> None:
    m = _monitor(threshold=1, window=10, block=100, keys=2)
    for n, ip in enumerate(("a", "b", "c")):
        m.record("r", ip, n)
    assert not m.is_blocked("a", 3)  # the oldest block gave way
    assert m.is_blocked("b", 3)
    assert m.is_blocked("c", 3)


def test_rules_follow_the_configuration() -> None:
    config = MonitorConfig(auth_failures_per_ip=7, auth_window=60, block_seconds=30)
    rules = rules_from_config(config)
    assert rules[monitor.AUTH_FAILURES_PER_IP] == Rule(monitor.AUTH_FAILURES_PER_IP, 7, 60, 30)
    assert rules[monitor.AUTH_FAILURES_PER_ACCOUNT].block_seconds == 0
    assert rules[monitor.TOTP_FAILURES] == Rule(monitor.TOTP_FAILURES, 5, 600)
    assert rules[monitor.GRANTS] == Rule(monitor.GRANTS, 10, 3600)
    assert rules[monitor.TLS_FAILURES] == Rule(monitor.TLS_FAILURES, 200, 60)
    assert rules[monitor.AUDIT_WRITE_FAILURES] == Rule(monitor.AUDIT_WRITE_FAILURES, 1, 60)


# ----- the service: logging and the alert command ------------------------------------------


def _recorder(tmp_path: Path, *, sleep_s: float = 0) -> tuple[str, Path]:
    """A tiny alert command that appends its stdin to a file (after ``sleep_s``)."""
    out = tmp_path / "alerts.jsonl"
    script = tmp_path / "alert.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"time.sleep({sleep_s})\n"
        "data = sys.stdin.read()\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(data)\n"
    )
    script.chmod(0o755)
    return str(script), out


def _read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _wait_for_lines(path: Path, count: int) -> list[dict[str, object]]:
    with trio.fail_after(10):
        # A real process writes the file: there is no event to wait on.
        while len(_read_lines(path)) < count:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return _read_lines(path)


async def test_an_alert_is_logged_and_given_to_the_command(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    script, out = _recorder(tmp_path)
    service = MonitorService(MonitorConfig(totp_failures=2, alert_command=(script, str(out))))
    await nursery.start(service.run)
    with caplog.at_level(logging.WARNING, "villaged.ops.monitor"):
        assert service.record(monitor.TOTP_FAILURES, "olga") == []
        (alert,) = service.record(monitor.TOTP_FAILURES, "olga")
    (logged,) = [r for r in caplog.records if getattr(r, "event", None) == "security.alert"]
    assert logged.__dict__["security"] is True
    assert (logged.__dict__["rule"], logged.__dict__["key"]) == ("totp_failures", "olga")
    assert logged.__dict__["count"] == 2
    assert logged.__dict__["window"] == 600
    (document,) = await _wait_for_lines(out, 1)
    assert document["event"] == "security.alert"
    assert document["rule"] == "totp_failures"
    assert document["key"] == "olga"
    assert document["count"] == 2
    assert document["window_s"] == 600
    assert document["blocked_s"] is None
    assert alert.blocked_until is None


async def test_an_alert_command_that_runs_too_long_is_killed(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    script, out = _recorder(tmp_path, sleep_s=60)
    config = MonitorConfig(grants_per_hour=1, alert_command=(script, str(out)), alert_timeout=1)
    service = MonitorService(config)
    await nursery.start(service.run)
    with caplog.at_level(logging.ERROR, "villaged.ops.monitor"):
        service.record(monitor.GRANTS, monitor.NODE_WIDE)
        with trio.fail_after(10):
            while not any(  # noqa: ASYNC110 - a real process ends; no event to wait on
                getattr(r, "event", None) == "security.alert_command_failed" for r in caplog.records
            ):
                await trio.sleep(0.05)
    (failed,) = [
        r for r in caplog.records if r.__dict__.get("event") == "security.alert_command_failed"
    ]
    assert failed.__dict__["error"] == "killed after 1 s"
    assert not out.exists()


async def test_a_command_that_cannot_run_is_logged(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-program")
    service = MonitorService(MonitorConfig(grants_per_hour=1, alert_command=(missing,)))
    await nursery.start(service.run)
    with caplog.at_level(logging.ERROR, "villaged.ops.monitor"):
        service.record(monitor.GRANTS, monitor.NODE_WIDE)
        with trio.fail_after(10):
            while not caplog.records:  # noqa: ASYNC110 - a real process fails to start
                await trio.sleep(0.01)
    assert caplog.records[0].__dict__["event"] == "security.alert_command_failed"
    assert "cannot run" in caplog.records[0].__dict__["error"]


async def test_alerts_beyond_the_queue_are_dropped_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = MonitorService(
        MonitorConfig(auth_failures_per_account=1, alert_command=("/bin/true",))
    )
    with caplog.at_level(logging.WARNING, "villaged.ops.monitor"):
        for n in range(ALERT_QUEUE + 2):  # nothing runs the commands: the queue fills up
            assert len(service.record(monitor.AUTH_FAILURES_PER_ACCOUNT, f"u{n}@x")) == 1
    events = [r.__dict__["event"] for r in caplog.records]
    assert events.count("security.alert") == ALERT_QUEUE + 2
    assert events.count("security.alert_dropped") == 2


async def test_without_an_alert_command_alerts_are_only_logged(autojump_clock: object) -> None:
    service = MonitorService(MonitorConfig(auth_failures_per_account=1))
    for n in range(ALERT_QUEUE + 2):
        service.record(monitor.AUTH_FAILURES_PER_ACCOUNT, f"u{n}@x")
    assert service._receive.statistics().current_buffer_used == 0


async def test_blocks_run_on_trio_time(autojump_clock: object) -> None:
    service = MonitorService(MonitorConfig(auth_failures_per_ip=2, block_seconds=30))
    service.record(monitor.AUTH_FAILURES_PER_IP, "192.0.2.1")
    assert not service.is_blocked("192.0.2.1")
    (alert,) = service.record(monitor.AUTH_FAILURES_PER_IP, "192.0.2.1")
    assert alert.as_json(0.0, 30)["blocked_s"] == 30
    assert service.is_blocked("192.0.2.1")
    await trio.sleep(29)
    assert service.is_blocked("192.0.2.1")
    await trio.sleep(1)
    assert not service.is_blocked("192.0.2.1")


@pytest.mark.parametrize(
    ("address", "prefix", "group"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("unknown", 64, "unknown"),
    ],
)
def test_addresses_are_grouped_v6_by_network(address: str, prefix: int, group: str) -> None:
    assert monitor.address_group(address, prefix) == group


async def test_an_ipv6_attacker_cannot_step_through_its_own_network(autojump_clock: object) -> None:
    service = MonitorService(MonitorConfig(auth_failures_per_ip=3, block_seconds=30))
    blocked: list[str] = []
    service.block_listeners.append(blocked.append)
    for n in range(3):
        service.record(monitor.AUTH_FAILURES_PER_IP, f"2001:db8:5:6::{n + 1:x}")
    assert blocked == ["2001:db8:5:6::/64"]
    assert service.is_blocked("2001:db8:5:6:ffff::77")
    assert not service.is_blocked("2001:db8:5:7::1")


async def test_alerts_are_rate_limited_node_wide_but_blocks_are_not(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    config = MonitorConfig(auth_failures_per_ip=1, block_seconds=600, max_alerts_per_minute=2)
    service = MonitorService(config)
    with caplog.at_level(logging.WARNING, "villaged.ops.monitor"):
        for n in range(5):
            assert len(service.record(monitor.AUTH_FAILURES_PER_IP, f"192.0.2.{n}")) == 1
        assert all(service.is_blocked(f"192.0.2.{n}") for n in range(5))
        rules = [r.__dict__["rule"] for r in caplog.records]
        assert rules == ["auth_failures_per_ip"] * 2 + ["alerts_suppressed"]  # one summary
        assert {r.__dict__["event"] for r in caplog.records} == {"security.alert"}
        # Node-wide rules are not held back: a grant alert still pages.
        grants = MonitorService(replace(config, grants_per_hour=1))
        grants._recent_alerts = service._recent_alerts
        caplog.clear()
        assert grants.record(monitor.GRANTS, monitor.NODE_WIDE)
        assert [r.__dict__["rule"] for r in caplog.records] == ["grants"]
        caplog.clear()
        await trio.sleep(60)
        service.record(monitor.AUTH_FAILURES_PER_IP, "192.0.2.99")
    resumed, alert = caplog.records
    assert resumed.__dict__["event"] == "security.alerts_resumed"
    assert resumed.__dict__["suppressed"] == 3
    assert (alert.__dict__["event"], alert.__dict__["key"]) == ("security.alert", "192.0.2.99")


# ----- end to end: brute force from one address ---------------------------------------------


async def _wrong_password(port: int, ca_file: Path) -> RawClient:
    client = await RawClient.connect(port, ca_file)
    with pytest.raises(PermissionError, match="not-authorized"):
        await client.login("alice", "guess")
    return client


async def _refused_at_once(port: int, ca_file: Path) -> None:
    client = await RawClient.connect(port, ca_file)
    try:
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send(header())
        assert await client.next() is None  # closed without a word
    finally:
        await client.aclose()


async def test_brute_force_blocks_the_address_and_alerts(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    script, out = _recorder(tmp_path)
    running = await start_node(
        nursery,
        tmp_path,
        extra_toml=(
            "[monitor]\nauth_failures_per_ip = 20\nauth_failures_per_account = 1000\n"
            f"block_seconds = 1\nalert_command = [{json.dumps(script)}, {json.dumps(str(out))}]"
        ),
    )
    port, ca = running.c2s, running.ca_file
    # Open on the same address: a logged-in session (a user behind the attacker's NAT) and a
    # stream that has not logged in yet (another of the attacker's attempts).
    neighbour = await RawClient.connect(port, ca)
    neighbour_jid = await neighbour.login("bob", "bob-password")
    waiting = await RawClient.connect(port, ca)
    await waiting.send(header())
    assert isinstance(await waiting.next(), xml.StreamOpened)
    for _ in range(19):
        await (await _wrong_password(port, ca)).aclose()
    assert not running.node.monitor.is_blocked("127.0.0.1")
    twentieth = await _wrong_password(port, ca)
    assert await twentieth.stream_error() == "policy-violation"  # sent away at once
    await twentieth.aclose()
    assert running.node.monitor.is_blocked("127.0.0.1")
    # The block ended the attempt still open; the logged-in session carries on.
    assert await waiting.stream_error() == "policy-violation"
    await waiting.aclose()
    await neighbour.send(b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    pong = await neighbour.element()
    assert (pong.get("type"), pong.get("id")) == ("result", "p1")
    assert neighbour_jid.startswith("bob@localhost/")
    await neighbour.aclose()

    (document,) = await _wait_for_lines(out, 1)
    assert document["rule"] == "auth_failures_per_ip"
    assert document["key"] == "127.0.0.1"
    assert document["count"] == 20
    assert document["blocked_s"] == 1

    with caplog.at_level(logging.WARNING, "villaged.net.c2s"):
        await _refused_at_once(port, ca)
    assert any(r.__dict__.get("event") == "c2s.blocked" for r in caplog.records)

    # Another host is unaffected: it logs in and chats.
    bob = await RawClient.connect(port, ca, local_address="127.0.0.2")
    carol = await RawClient.connect(port, ca, local_address="127.0.0.3")
    await bob.login("bob", "bob-password")
    carol_jid = await carol.login("carol", "carol-password")
    await bob.send(f"<message to='{carol_jid}' type='chat'><body>hi</body></message>".encode())
    got = await carol.element()
    assert got.tag == "{jabber:client}message"
    assert got.findtext("{jabber:client}body") == "hi"

    # The block expires: the address may log in again.
    await trio.sleep_until(running.node.monitor.core.blocked["127.0.0.1"])
    alice = await RawClient.connect(port, ca)
    assert await alice.login("alice", "alice-password")
    for client in (bob, carol, alice):
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_repeated_totp_failures_raise_an_alert(tmp_path: Path, nursery: trio.Nursery) -> None:
    from datetime import UTC, datetime

    from villaged.admin.client import AdminCommandError, run_command
    from villaged.admin.operators import OperatorStore
    from villaged.storage import crypto

    script, out = _recorder(tmp_path)
    running = await start_node(
        nursery,
        tmp_path,
        extra_toml=(
            "[monitor]\ntotp_failures = 3\n"
            f"alert_command = [{json.dumps(script)}, {json.dumps(str(out))}]"
        ),
    )
    config = running.config
    operators = OperatorStore.open(
        config.storage.dir / "admin", crypto.Keyset.load(config.storage.keyset)
    )
    operators.enroll("ops1", os.getuid(), datetime.now(UTC).timestamp())
    for _ in range(3):
        with pytest.raises(AdminCommandError, match="wrong-code"):
            await run_command(config.admin.socket, "status", {}, iter(["000000"]), False)
    (document,) = await _wait_for_lines(out, 1)
    assert (document["rule"], document["key"], document["count"]) == ("totp_failures", "ops1", 3)


async def test_a_surge_of_failed_tls_handshakes_raises_an_alert(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_node(
        nursery, tmp_path, extra_toml="[monitor]\ntls_failures_per_minute = 3"
    )
    with caplog.at_level(logging.WARNING, "villaged"):
        for n in range(3):
            # Plain text where a TLS ClientHello belongs (the direct-TLS port): the handshake
            # fails at once.
            stream = await trio.open_tcp_stream("127.0.0.1", running.c2s_tls)
            await stream.send_all(b"<?xml version='1.0'?><stream:stream>" + bytes([n]) * 64)
            with trio.fail_after(10):
                while await stream.receive_some(4096):
                    pass
            await stream.aclose()
        with trio.fail_after(10):
            while not _alerted(caplog):  # noqa: ASYNC110 - the node logs from its own task
                await trio.sleep(0.01)
    (alert,) = [r for r in caplog.records if r.__dict__.get("event") == "security.alert"]
    assert (alert.__dict__["rule"], alert.__dict__["count"]) == ("tls_failures", 3)
    nursery.cancel_scope.cancel()


def _alerted(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.__dict__.get("event") == "security.alert" for r in caplog.records)


async def test_logins_the_server_cannot_check_are_not_counted_as_guesses(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_node(
        nursery, tmp_path, extra_toml="[monitor]\nauth_failures_per_ip = 3\n"
    )
    # As on a cluster node cut off from the account's shard (villaged.net.c2s._credentials).
    monkeypatch.setattr(running.node.store, "in_touch", lambda user: False)
    for _ in range(5):
        client = await RawClient.connect(running.c2s, running.ca_file)
        with pytest.raises(PermissionError, match="temporary-auth-failure"):
            await client.login("alice", "alice-password")
        await client.aclose()
    assert not running.node.monitor.is_blocked("127.0.0.1")
    monkeypatch.undo()
    await (await _wrong_password(running.c2s, running.ca_file)).aclose()  # a guess counts
    client = await RawClient.connect(running.c2s, running.ca_file)
    await client.login("alice", "alice-password")
    await client.aclose()
