"""The security monitor: rules over sliding windows, the address block list, and alerts.

Theory of operation. Connections and the admin server report what they see as
``record(kind, key)``: an authentication failure from an address and for an account, a refused
operator login, an inspection grant opened, a failed TLS handshake, a failed audit write.
`SecurityMonitor` (no trio, no clock: time is passed in) keeps, per rule and key, the times of
the latest events — at most the rule's threshold of them, so a count never needs more — and
says when a key reached its threshold within its window. That yields an `Alert`, at most once
per window for the same rule and key; a rule with a block (authentication failures per
address) also blocks the address for ``block_seconds``, whatever the rate limit of its alerts.
Tracked keys and blocked addresses are capped: the least recently seen are forgotten first.

Addresses are counted and blocked by group (`address_group`): an IPv4 address alone, an IPv6
address by its ``[monitor] ipv6_prefix`` network (default /64, what one host or one customer
line typically gets, so an attacker cannot step through the addresses of its own subnet), and
an IPv4-mapped IPv6 address as the IPv4 address it is.

`MonitorService` is the I/O side, owned by the node (app.py): it stamps events with
``trio.current_time()``, logs every alert as ``security.alert`` and hands it to the alert
command — ``[monitor] alert_command``, run without a shell, the alert as JSON on its stdin, killed
after ``alert_timeout`` seconds, at most ``max_alert_commands`` at a time; alerts that find the
small queue full are logged and dropped, never waited for. Alerts are rate limited node-wide
(``max_alerts_per_minute``): beyond it they are counted, not logged one by one or passed on, so
that a distributed attack cannot flood the log or page someone thousands of times; blocks are
set all the same. When an alert blocks an address, the node's block listeners hear of it (the
c2s layer ends the address's streams that have not authenticated yet).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from villaged.config import MonitorConfig

log = logging.getLogger("villaged.ops.monitor")

# Rule names: also the ``kind`` passed to ``record`` and the ``rule`` of an alert.
AUTH_FAILURES_PER_IP: Final = "auth_failures_per_ip"
AUTH_FAILURES_PER_ACCOUNT: Final = "auth_failures_per_account"
TOTP_FAILURES: Final = "totp_failures"
GRANTS: Final = "grants"
TLS_FAILURES: Final = "tls_failures"
AUDIT_WRITE_FAILURES: Final = "audit_write_failures"

#: The key of node-wide rules (every grant, every TLS failure counts together).
NODE_WIDE: Final = "node"
#: The summary alert raised when the node-wide alert rate limit starts holding alerts back.
ALERTS_SUPPRESSED: Final = "alerts_suppressed"
#: Rules whose alerts share the rate limit (their keys are addresses and accounts, which an
#: attacker can make many of); the others always alert.
RATE_LIMITED_RULES: Final = frozenset({AUTH_FAILURES_PER_IP, AUTH_FAILURES_PER_ACCOUNT})

#: Alerts waiting for the alert command; more are logged and dropped.
ALERT_QUEUE: Final = 16

#: The window of the node-wide alert rate limit, in seconds.
ALERT_RATE_WINDOW: Final = 60.0


def address_group(address: str, ipv6_prefix: int = 64) -> str:
    """The key an address is counted and blocked by: an IPv4 address itself, an IPv6 address's
    ``/ipv6_prefix`` network, an IPv4-mapped IPv6 address as IPv4; anything else unchanged."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


@dataclass(frozen=True, slots=True)
class Rule:
    """``threshold`` events for one key within ``window`` seconds raise an alert (and, with
    ``block_seconds``, block the key — an address — for that long)."""

    name: str
    threshold: int
    window: float
    block_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    key: str
    count: int
    window: float
    blocked_until: float | None = None  # monotonic time, when this alert blocked ``key``

    def as_json(self, wall_clock: float, block_seconds: float) -> dict[str, Any]:
        """What the alert command reads: stable field names, wall-clock time."""
        return {
            "event": "security.alert",
            "rule": self.rule,
            "key": self.key,
            "count": self.count,
            "window_s": self.window,
            "blocked_s": block_seconds if self.blocked_until is not None else None,
            "time": wall_clock,
        }


@dataclass(slots=True)
class _Track:
    """One key of one rule: its latest event times and until when its alerts are quiet."""

    times: deque[float]
    quiet_until: float = float("-inf")


def rules_from_config(config: MonitorConfig) -> dict[str, Rule]:
    auth = config.auth_window
    return {
        rule.name: rule
        for rule in (
            Rule(AUTH_FAILURES_PER_IP, config.auth_failures_per_ip, auth, config.block_seconds),
            Rule(AUTH_FAILURES_PER_ACCOUNT, config.auth_failures_per_account, auth),
            Rule(TOTP_FAILURES, config.totp_failures, config.totp_window),
            Rule(GRANTS, config.grants_per_hour, 3600),
            Rule(TLS_FAILURES, config.tls_failures_per_minute, 60),
            # The audit log refusing a write is always worth a page (once a minute).
            Rule(AUDIT_WRITE_FAILURES, 1, 60),
        )
    }


@dataclass
class SecurityMonitor:
    """Sliding-window counters per rule and key, and the address block list. Sans-I/O."""

    rules: Mapping[str, Rule]
    max_keys: int = 10_000
    _tracks: dict[str, OrderedDict[str, _Track]] = field(default_factory=dict)
    _blocked: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def record(self, kind: str, key: str, now: float) -> list[Alert]:
        """One event of rule ``kind`` for ``key`` at ``now``; the alerts it raises (none
        or one)."""
        rule = self.rules[kind]
        tracks = self._tracks.setdefault(kind, OrderedDict())
        track = tracks.pop(key, None)
        if track is None:
            track = _Track(deque(maxlen=rule.threshold))
            while len(tracks) >= self.max_keys:
                tracks.popitem(last=False)  # the key seen least recently
        tracks[key] = track
        track.times.append(now)
        while track.times and track.times[0] <= now - rule.window:
            track.times.popleft()
        count = len(track.times)
        if count < rule.threshold:
            return []
        blocked_until = None
        if rule.block_seconds > 0:
            blocked_until = now + rule.block_seconds
            self._block(key, blocked_until)
        if now < track.quiet_until:
            return []
        track.quiet_until = now + rule.window
        return [Alert(rule.name, key, count, rule.window, blocked_until)]

    def is_blocked(self, address: str, now: float) -> bool:
        until = self._blocked.get(address)
        if until is None:
            return False
        if now >= until:
            del self._blocked[address]
            return False
        return True

    @property
    def blocked(self) -> Mapping[str, float]:
        """Blocked addresses and until when (monotonic); expired ones may linger until asked."""
        return self._blocked

    def _block(self, address: str, until: float) -> None:
        self._blocked.pop(address, None)
        while len(self._blocked) >= self.max_keys:
            self._blocked.popitem(last=False)  # the block set longest ago
        self._blocked[address] = until


class MonitorService:
    """The node's security monitor: records events at the current (trio) time, logs alerts
    and runs the alert command for them (in `run`, a task of the serving nursery)."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.core = SecurityMonitor(rules_from_config(config), config.max_tracked_keys)
        self._send, self._receive = trio.open_memory_channel[Alert](ALERT_QUEUE)
        #: Called with the address group an alert has just blocked (app.py adds the c2s
        #: layer's). They must not raise and must not block.
        self.block_listeners: list[Callable[[str], None]] = []
        self._recent_alerts: deque[float] = deque(maxlen=config.max_alerts_per_minute)
        self._suppressed = 0

    def address_key(self, address: str) -> str:
        """The group ``address`` is counted and blocked by (see `address_group`)."""
        return address_group(address, self.config.ipv6_prefix)

    def record(self, kind: str, key: str) -> list[Alert]:
        """One security event; ``key`` is an address for `AUTH_FAILURES_PER_IP` (grouped
        here), an account, an operator or `NODE_WIDE` for the others."""
        if kind == AUTH_FAILURES_PER_IP:
            key = self.address_key(key)
        now = trio.current_time()
        alerts = self.core.record(kind, key, now)
        for alert in alerts:
            if alert.blocked_until is not None:
                for listener in self.block_listeners:
                    listener(alert.key)
            # Only the rules an attacker can multiply (one key per address or account) share
            # the rate limit; node-wide rules (grants, TOTP, TLS, the audit log) always page.
            if alert.rule not in RATE_LIMITED_RULES or self._within_rate(now):
                self._raise(alert)
        return alerts

    def is_blocked(self, address: str) -> bool:
        return self.core.is_blocked(self.address_key(address), trio.current_time())

    def _within_rate(self, now: float) -> bool:
        """Whether an alert at ``now`` may be logged and passed on (node-wide rate limit)."""
        recent = self._recent_alerts
        while recent and recent[0] <= now - ALERT_RATE_WINDOW:
            recent.popleft()
        if len(recent) == recent.maxlen:
            self._suppressed += 1
            if self._suppressed == 1:
                # Whoever is paged hears of it once: one summary alert, then silence.
                self._raise(Alert(ALERTS_SUPPRESSED, NODE_WIDE, len(recent), ALERT_RATE_WINDOW))
            return False
        recent.append(now)
        if self._suppressed:
            log.warning(
                "security alerts were held back",
                extra={
                    "event": "security.alerts_resumed",
                    "security": True,
                    "suppressed": self._suppressed,
                },
            )
            self._suppressed = 0
        return True

    def _raise(self, alert: Alert) -> None:
        log.warning(
            "security alert",
            extra={
                "event": "security.alert",
                "security": True,
                "rule": alert.rule,
                "key": alert.key,
                "count": alert.count,
                "window": alert.window,
                "blocked": alert.blocked_until is not None,
            },
        )
        if not self.config.alert_command:
            return
        try:
            self._send.send_nowait(alert)
        except trio.WouldBlock:
            log.error(
                "alert command busy; alert not passed on",
                extra={"event": "security.alert_dropped", "security": True, "rule": alert.rule},
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the alert command for queued alerts, a bounded number at a time, until
        cancelled."""
        slots = trio.Semaphore(self.config.max_alert_commands)
        async with trio.open_nursery() as commands, self._receive:
            task_status.started()
            async for alert in self._receive:
                await slots.acquire()
                commands.start_soon(self._run_command, alert, slots)

    async def _run_command(self, alert: Alert, slots: trio.Semaphore) -> None:
        try:
            document = alert.as_json(time.time(), self.config.block_seconds)
            payload = json.dumps(document).encode() + b"\n"
            argv = list(self.config.alert_command)
            with trio.move_on_after(self.config.alert_timeout) as deadline:
                try:
                    process = await trio.run_process(
                        argv,
                        stdin=payload,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        check=False,
                        deliver_cancel=_kill,
                        start_new_session=True,  # its own process group, killed as a whole
                    )
                except OSError as exc:
                    _command_failed(alert, f"cannot run {argv[0]}: {exc.strerror or exc}")
                    return
            if deadline.cancelled_caught:
                _command_failed(alert, f"killed after {self.config.alert_timeout} s")
            elif process.returncode != 0:
                _command_failed(alert, f"exit status {process.returncode}")
        finally:
            slots.release()


async def _kill(process: trio.Process) -> None:
    """Kill the command and everything it started (a shell's children, a curl)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()


def _command_failed(alert: Alert, reason: str) -> None:
    log.error(
        "alert command failed",
        extra={
            "event": "security.alert_command_failed",
            "security": True,
            "rule": alert.rule,
            "error": reason,
        },
    )
