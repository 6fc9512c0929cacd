"""The admin socket: a local Unix socket through which enrolled operators run commands.

Theory of operation
-------------------
There is no TCP admin port. The node listens on ``[admin] socket`` (mode 0660, group
``[admin] group``); for each connection the kernel tells us the peer's uid and pid
(SO_PEERCRED), and the uid must belong to an enrolled, enabled operator. Nothing runs before
that operator logs in with a TOTP code (``login``); a connection that does not is closed after
`LOGIN_TIMEOUT_S`. Requests and answers are msgpack frames (`villaged.admin.protocol`), one
request answered before the next is read.

Every request — login, command, refusal — is a record in the audit log, written and fsynced
*before* the answer goes out; if the audit log cannot be written, the command is refused
(fail closed) and nothing is returned. Commands that read a user's data (``inspect …``) need an
open grant for exactly that user (`villaged.admin.grants`): the record of the access, with the
SHA-256 of the data returned (never the data), is durable before the data is sent. Opening a
grant writes a signed audit checkpoint and, by default, tells the user (a headline message to
their online resources); users can list accesses to their data over XMPP (`transparency`).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import socket
import stat
import struct
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgpack
import trio

from villaged import __version__
from villaged.admin.account_status import STATUS_RECORD
from villaged.admin.grants import Grant, GrantBook, GrantError
from villaged.admin.protocol import (
    MAX_REQUEST_BYTES,
    FrameReader,
    ProtocolError,
    encode_frame,
    ok,
    refused,
)
from villaged.im.mam import PAYLOAD_RECORD, format_stamp, parse_stamp, unpack_stanza, unpack_with
from villaged.ops import monitor
from villaged.storage.errors import DecryptError, KeyManagementError, ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError
from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from pathlib import Path

    from villaged.im.mam import ArchivedMessage
    from villaged.im.messages import MessageStoreView
    from villaged.im.roster import RosterView
    from villaged.im.sessions import SessionRegistry
    from villaged.ops.metrics import Metrics
    from villaged.ops.monitor import MonitorService
    from villaged.storage.store import Store

log = logging.getLogger("villaged.admin.server")

LOGIN_TIMEOUT_S: Final = 60.0
IDLE_TIMEOUT_S: Final = 900.0
WRITE_TIMEOUT_S: Final = 30.0
MAX_INSPECT_MESSAGES: Final = 500
READ_CHUNK: Final = 16 * 1024
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_CONNECTIONS: Final = 64
MAX_PER_UID: Final = 8
MAX_REFUSALS: Final = 10  # refused requests on one connection before it is closed
MAX_INSPECT_BYTES: Final = 16 * 1024 * 1024
#: Longest text kept per audit field (the log's schema limits; longer is cut, not refused).
_FIELD_LIMITS: Final = {"error": 1000, "justification": 2000, "ticket": 200, "scope": 3071}


def wall_clock() -> float:
    """The time TOTP codes are checked against (a function, so tests can move it)."""
    return time.time()


class Operators(Protocol):
    """What the server needs of the operator store (villaged.admin.operators)."""

    def name_of_uid(self, uid: int) -> str | None: ...

    def active(self, name: str, uid: int) -> bool: ...

    def login(self, name: str, code: str, now: float) -> tuple[bool, str]: ...

    def confirm(self, name: str, code: str, now: float) -> tuple[bool, str]: ...


class Audit(Protocol):
    """What the server needs of the audit log (villaged.admin.audit); blocking calls."""

    def append(self, record: Mapping[str, Any]) -> int: ...

    def checkpoint(self) -> str: ...

    def accesses_to(self, user: str) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class AuditUnavailableError(Exception):
    """The audit log could not record an access: the command is refused (fail closed)."""


@dataclass
class AdminContext:
    domain: str
    store: Store
    sessions: SessionRegistry
    messages: MessageStoreView
    roster: RosterView
    operators: Operators
    audit: Audit
    grants: GrantBook
    notify_users: bool = True
    kick: Callable[[JID], int] | None = None
    started: float = field(default_factory=time.monotonic)
    # One audit write at a time, in order (the log is append-only; threads would race).
    audit_lock: trio.Lock = field(default_factory=trio.Lock)
    connections: int = 0
    per_uid: dict[int, int] = field(default_factory=dict)
    metrics: Metrics | None = None  # the node's Prometheus metrics (app.py)
    monitor: MonitorService | None = None  # the node's security monitor (app.py)
    # Federation's outbound queues per destination domain (app.py, when [federation] is on).
    federation: Callable[[], Mapping[str, Mapping[str, object]]] | None = None

    def record_security(self, kind: str, key: str) -> None:
        if self.monitor is not None:
            self.monitor.record(kind, key)

    async def record(self, entry: Mapping[str, Any]) -> None:
        async with self.audit_lock:
            try:
                await trio.to_thread.run_sync(self.audit.append, dict(entry))
            except Exception as exc:
                if self.metrics is not None:
                    self.metrics.audit_record("failure")
                log.error(
                    "audit log unavailable",
                    extra={"event": "admin.audit_failed", "error": str(exc), "security": True},
                )
                self.record_security(monitor.AUDIT_WRITE_FAILURES, monitor.NODE_WIDE)
                raise AuditUnavailableError(str(exc)) from exc
            if self.metrics is not None:
                self.metrics.audit_record("success")

    async def checkpoint(self) -> None:
        async with self.audit_lock:
            try:
                await trio.to_thread.run_sync(self.audit.checkpoint)
            except Exception as exc:
                raise AuditUnavailableError(f"checkpoint: {exc}") from exc


async def serve_admin(
    ctx: AdminContext,
    path: Path,
    group: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the Unix socket ``path`` until cancelled; the socket file is removed then."""
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = trio.socket.from_stdlib_socket(plain)
    try:
        remove_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Never, even for an instant, more than 0660. The umask is the whole process's: the
        # bind is synchronous (no other task runs in between; trio's own bind would run in a
        # worker thread while the umask is changed) and the umask is back at once.
        old_umask = os.umask(0o117)
        try:
            plain.bind(str(path))  # a local socket file: no wait worth a thread
        finally:
            os.umask(old_umask)
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise OSError(f"no group {group!r} on this system") from None
            os.chown(path, -1, gid, follow_symlinks=False)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        log.info("admin socket listening", extra={"event": "admin.listening", "path": str(path)})
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await AdminConnection(ctx, stream).run()
            except Exception:
                log.exception("admin connection failed", extra={"event": "admin.failed"})

        await trio.serve_listeners(handler, [listener])
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # noqa: ASYNC240 - one unlink while stopping


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file a previous process left at ``path`` (OSError if it is anything
    else: never replace a file that is not a socket)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


def peer_credentials(stream: trio.SocketStream) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


class AdminConnection:
    def __init__(self, ctx: AdminContext, stream: trio.SocketStream) -> None:
        self.ctx = ctx
        self.stream = stream
        self.reader = FrameReader(MAX_REQUEST_BYTES)
        self.pid, self.uid = peer_credentials(stream)
        self.operator: str | None = None  # the enrolled operator of this uid
        self.logged_in = False

    async def run(self) -> None:
        ctx = self.ctx
        if ctx.connections >= MAX_CONNECTIONS or ctx.per_uid.get(self.uid, 0) >= MAX_PER_UID:
            log.warning(
                "too many admin connections",
                extra={"event": "admin.too_many_connections", "uid": self.uid, "security": True},
            )
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()
            return
        ctx.connections += 1
        ctx.per_uid[self.uid] = ctx.per_uid.get(self.uid, 0) + 1
        try:
            await self._run()
        finally:
            ctx.connections -= 1
            left = ctx.per_uid[self.uid] - 1
            if left:
                ctx.per_uid[self.uid] = left
            else:
                del ctx.per_uid[self.uid]

    async def _run(self) -> None:
        async with self.stream:
            self.operator = await trio.to_thread.run_sync(self.ctx.operators.name_of_uid, self.uid)
            if self.operator is None:
                log.warning(
                    "admin connection from an unknown uid",
                    extra={"event": "admin.unknown_uid", "uid": self.uid, "security": True},
                )
                with contextlib.suppress(AuditUnavailableError):
                    await self._audit("connect", "refused", error="unknown uid")
                await self._send(refused("unknown-uid", f"uid {self.uid} is not an operator"))
                return
            login_deadline = trio.current_time() + LOGIN_TIMEOUT_S  # from connect, not re-armed
            refusals = 0
            while refusals < MAX_REFUSALS:
                deadline = (
                    trio.current_time() + IDLE_TIMEOUT_S if self.logged_in else login_deadline
                )
                message: dict[str, Any] | None = None
                with trio.move_on_at(deadline):
                    message = await self._receive()
                    if message is None:
                        return
                if message is None:
                    await self._send(refused("timeout", "no request in time; closing"))
                    return
                # Once read, a request runs to the end: a grant is either on record and in
                # effect or neither, whatever happens to the connection meanwhile.
                with trio.CancelScope(shield=True):
                    answer = await self._answer(message)
                if not answer.get("ok"):
                    refusals += 1
                if not await self._send(answer):
                    return
            await self._send(refused("too-many-refusals", "too many refused requests; closing"))

    async def _receive(self) -> dict[str, Any] | None:
        while True:
            try:
                message = self.reader.next_message()
            except ProtocolError as exc:
                await self._send(refused("protocol", str(exc)))
                return None
            if message is not None:
                return message
            try:
                data = await self.stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            try:
                self.reader.receive_data(data)
            except ProtocolError as exc:
                await self._send(refused("protocol", str(exc)))
                return None

    async def _send(self, message: dict[str, Any]) -> bool:
        """False if the answer could not be written whole (the connection is then closed)."""
        with trio.move_on_after(WRITE_TIMEOUT_S):
            try:
                await self.stream.send_all(encode_frame(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        return False

    # ----- requests ------------------------------------------------------------------------

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op, args = message.get("op"), message.get("args", {})
        try:
            if not isinstance(op, str) or not isinstance(args, dict):
                await self._audit("?", "refused", error="malformed request")
                return refused("bad-request", "a request is {op: str, args: map}")
            command = COMMANDS.get(op)
            if command is None:
                await self._audit(op[:40], "refused", error="unknown command")
                return refused("unknown-command", f"no command {op[:40]!r}")
            if op != "login":
                if not self.logged_in:
                    await self._audit(op, "refused", error="not logged in")
                    return refused("login-required", "log in with a TOTP code first")
                if not await self._still_an_operator():
                    self.logged_in = False
                    await self._audit(op, "refused", error="operator disabled or removed")
                    return refused("disabled", "this operator was disabled or removed")
            return await command(self, args)
        except AuditUnavailableError as exc:
            return refused("audit-unavailable", f"the audit log cannot be written ({exc})")
        except Exception as exc:  # a failure (a bug, a storage error): recorded, answered
            log.exception("admin command failed", extra={"event": "admin.command_failed"})
            with contextlib.suppress(AuditUnavailableError):
                await self._audit(str(op)[:40] or "?", "error", error=type(exc).__name__)
            return refused("internal-error", f"the command failed ({type(exc).__name__})")

    async def _still_an_operator(self) -> bool:
        """Disabling or removing an operator also ends what their open connections may do."""
        assert self.operator is not None
        return await trio.to_thread.run_sync(self.ctx.operators.active, self.operator, self.uid)

    async def _audit(self, command: str, result: str, **fields: Any) -> None:
        entry: dict[str, Any] = {
            "t": _now_text(),
            "kind": "login" if command == "login" else "command",
            "operator": self.operator or "",
            "uid": self.uid,
            "pid": self.pid,
            "command": command,
            "result": result,
        }
        entry.update(
            {
                k: _printable(v)[: _FIELD_LIMITS.get(k, 64)] if isinstance(v, str) else v
                for k, v in fields.items()
                if v is not None
            }
        )
        entry["command"] = _printable(command) or "?"
        await self.ctx.record(entry)

    # ----- commands ------------------------------------------------------------------------

    async def login(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        code = args.get("totp")
        if not isinstance(code, str):
            return refused("bad-request", "login needs 'totp'")
        accepted, why = await trio.to_thread.run_sync(
            self.ctx.operators.login, self.operator, code, wall_clock()
        )
        await self._audit("login", "ok" if accepted else "refused", error=None if accepted else why)
        if not accepted:
            log.warning(
                "operator login refused",
                extra={
                    "event": "admin.login_refused",
                    "operator": self.operator,
                    "reason": why,
                    "security": True,
                },
            )
            self.ctx.record_security(monitor.TOTP_FAILURES, self.operator)
            return refused(why, f"login refused: {why}")
        self.logged_in = True
        log.info("operator logged in", extra={"event": "admin.login", "operator": self.operator})
        return ok({"operator": self.operator})

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        result = {
            "version": __version__,
            "domain": self.ctx.domain,
            "sessions": len(self.ctx.sessions),
            "accounts": len(self.ctx.store.state.accounts),
            "log_last_index": self.ctx.store.log.last_index,
            "uptime_s": round(time.monotonic() - self.ctx.started),
        }
        await self._audit("status", "ok")
        return ok(result)

    async def sessions(self, args: dict[str, Any]) -> dict[str, Any]:
        result = sorted(str(s.jid) for s in self.ctx.sessions.all())
        await self._audit("sessions", "ok", data_sha256=_digest(result))
        return ok(result)

    async def federation(self, args: dict[str, Any]) -> dict[str, Any]:
        """Per remote domain: stanzas in its durable queue, ephemeral ones waiting, and the
        link's state (no content, no user names)."""
        result = self.ctx.federation() if self.ctx.federation is not None else {}
        await self._audit("federation", "ok")
        return ok({"enabled": self.ctx.federation is not None, "domains": result})

    async def kick(self, args: dict[str, Any]) -> dict[str, Any]:
        jid = _jid(args.get("jid"))
        if jid is None or self.ctx.kick is None:
            await self._audit("kick", "refused", error="bad jid")
            return refused("bad-request", "kick needs a valid 'jid'")
        await self._audit("kick", "ok", scope=str(jid))  # durable before it happens
        return ok({"ended": self.ctx.kick(jid)})

    async def user_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_disabled(args, disabled=True)

    async def user_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_disabled(args, disabled=False)

    async def _set_disabled(self, args: dict[str, Any], *, disabled: bool) -> dict[str, Any]:
        command = "user.disable" if disabled else "user.enable"
        user = _jid(args.get("jid"))
        if user is None or user.resource or str(user) not in self.ctx.store.state.accounts:
            await self._audit(command, "refused", error="no such account")
            return refused("no-such-account", "no local account with that JID")
        await self._audit(command, "ok", scope=str(user))  # on record before it takes effect
        await self.ctx.store.commit(Record(STATUS_RECORD, {"u": str(user), "disabled": disabled}))
        ended = 0
        if disabled and self.ctx.kick is not None:
            ended = self.ctx.kick(user)
        return ok({"jid": str(user), "disabled": disabled, "sessions_ended": ended})

    async def grant_request(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        user = _jid(args.get("jid"))
        reason = str(args.get("reason", ""))
        justification = str(args.get("justification", ""))
        ticket = str(args.get("ticket", ""))
        fields = {"scope": str(user) if user else None, "reason": reason, "ticket": ticket}
        if user is None or user.resource or user.domain != self.ctx.domain or not user.local:
            await self._audit("grant.request", "refused", error="bad scope", **fields)
            return refused(
                "bad-scope", f"a grant covers one local account (user@{self.ctx.domain})"
            )
        try:  # the request is checked before a TOTP step is spent on it
            grant = self.ctx.grants.prepare(
                self.operator,
                str(user),
                reason=reason,
                justification=justification,
                ticket=ticket,
                now=time.monotonic(),
            )
        except GrantError as exc:
            await self._audit("grant.request", "refused", error=str(exc), **fields)
            return refused(exc.code, str(exc))
        confirmed, why = await self._fresh_totp(args)
        if not confirmed:
            await self._audit("grant.request", "refused", error=f"totp: {why}", **fields)
            return refused(why, f"a grant needs a fresh TOTP code: {why}")
        # On record first; only then in effect (an audit failure leaves no grant behind).
        await self._audit(
            "grant.request",
            "pending" if grant.pending else "ok",
            grant=grant.id,
            justification=grant.justification,
            expires=time_text(time.time() + (grant.expires - grant.created)),
            **fields,
        )
        self.ctx.grants.add(grant)
        if not grant.pending:
            failure = await self._grant_opened(grant)
            if failure is not None:
                return failure
        return ok(grant.describe(time.monotonic()))

    async def grant_approve(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        grant_id = str(args.get("grant", ""))
        try:
            grant = self.ctx.grants.check_approval(grant_id, self.operator, time.monotonic())
        except GrantError as exc:
            await self._audit("grant.approve", "refused", grant=grant_id, error=str(exc))
            return refused(exc.code, str(exc))
        confirmed, why = await self._fresh_totp(args)
        if not confirmed:
            await self._audit("grant.approve", "refused", grant=grant_id, error=f"totp: {why}")
            return refused(why, f"an approval needs a fresh TOTP code: {why}")
        await self._audit(
            "grant.approve",
            "ok",
            grant=grant.id,
            scope=grant.user,
            reason=grant.reason,
            ticket=grant.ticket,
        )
        try:
            grant = self.ctx.grants.approve(grant_id, self.operator, time.monotonic())
        except GrantError as exc:  # it expired or was revoked while the record was written
            return refused(exc.code, str(exc))
        failure = await self._grant_opened(grant)
        if failure is not None:
            return failure
        return ok(grant.describe(time.monotonic()))

    async def grant_list(self, args: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        result = [g.describe(now) for g in self.ctx.grants.open_grants(now)]
        await self._audit("grant.list", "ok", data_sha256=_digest(result))
        return ok(result)

    async def grant_revoke(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        grant_id = str(args.get("grant", ""))[:64]
        try:
            grant = self.ctx.grants.revoke(grant_id, self.operator, time.monotonic())
        except GrantError as exc:
            await self._audit("grant.revoke", "refused", grant=grant_id, error=str(exc))
            return refused(exc.code, str(exc))
        await self._audit("grant.revoke", "ok", grant=grant.id, scope=grant.user)
        return ok(None)

    async def inspect(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        what = str(args.get("what", ""))[:16]
        user = _jid(args.get("jid"))
        grant_id = str(args.get("grant", ""))[:64]
        command = f"inspect.{what}"
        if what not in ("messages", "roster", "account") or user is None:
            await self._audit(command, "refused", error="bad request")
            return refused("bad-request", "inspect messages|roster|account needs a valid 'jid'")
        user = user.bare
        with_text, since_text = str(args.get("with") or ""), str(args.get("since") or "")
        with_jid = _jid(with_text) if with_text else None
        since: int | None = None
        try:
            if with_text and with_jid is None:
                raise ValueError(f"'with' is not a JID: {with_text[:80]!r}")
            since = parse_stamp(since_text) if since_text else None
        except ValueError as exc:  # never a silently wider read than was asked for
            await self._audit(command, "refused", scope=str(user), error=str(exc))
            return refused("bad-request", str(exc))
        try:
            grant = self.ctx.grants.use(grant_id, self.operator, str(user), time.monotonic())
        except GrantError as exc:
            await self._audit(command, "refused", scope=str(user), grant=grant_id, error=str(exc))
            return refused(exc.code, f"no inspection without a grant: {exc}")
        result: object
        if what == "messages":
            archive = self.ctx.messages.archives.of(str(user))
            entries = list(archive.entries) if archive is not None else []  # as of now
            result = await trio.to_thread.run_sync(
                self._messages, str(user), entries, with_jid, since
            )
        elif what == "roster":
            result = self._roster(str(user))
        else:
            result = self._account(user)
        # The access is on record, with what it returned (its hash), before anything is sent.
        # Inspections count with grants towards the monitor's "unusual number of accesses".
        self.ctx.record_security(monitor.GRANTS, monitor.NODE_WIDE)
        await self._audit(
            command,
            "ok",
            scope=str(user),
            grant=grant.id,
            reason=grant.reason,
            ticket=grant.ticket,
            data_sha256=_digest(result),
        )
        return ok(result)

    # ----- helpers -------------------------------------------------------------------------

    async def _fresh_totp(self, args: dict[str, Any]) -> tuple[bool, str]:
        assert self.operator is not None
        code = args.get("totp")
        if not isinstance(code, str):
            return False, "missing-totp"
        return await trio.to_thread.run_sync(
            self.ctx.operators.confirm, self.operator, code, wall_clock()
        )

    async def _grant_opened(self, grant: Grant) -> dict[str, Any] | None:
        """A grant is in effect: sign a checkpoint covering it and tell the user. If the
        checkpoint cannot be written, the grant is withdrawn and the refusal returned."""
        try:
            await self.ctx.checkpoint()  # a signed statement covering the grant, at once
        except AuditUnavailableError as exc:
            self.ctx.grants.remove(grant.id)
            with contextlib.suppress(AuditUnavailableError):
                await self._audit(
                    "grant.withdraw", "error", grant=grant.id, scope=grant.user, error=str(exc)
                )
            return refused("audit-unavailable", f"no signed checkpoint, no grant ({exc})")
        log.warning(
            "inspection grant opened",
            extra={
                "event": "admin.grant_opened",
                "operator": grant.operator,
                "user": grant.user,
                "reason": grant.reason,
                "security": True,
            },
        )
        self.ctx.record_security(monitor.GRANTS, monitor.NODE_WIDE)
        if self.ctx.notify_users:
            notice = ET.Element(
                "{jabber:client}message", {"type": "headline", "from": self.ctx.domain}
            )
            ET.SubElement(notice, "{jabber:client}subject").text = "Operator access to your data"
            ET.SubElement(notice, "{jabber:client}body").text = (
                f"An operator of {self.ctx.domain} opened access to your data "
                f"(reason: {grant.reason}, ticket: {grant.ticket}). Ask the server for the list"
                " of accesses to see every one."
            )
            for session in self.ctx.sessions.of_user(JID.parse(grant.user)):
                copy = ET.Element(notice.tag, dict(notice.attrib, to=str(session.jid)))
                copy.extend(list(notice))
                session.send(copy)
        return None

    def _messages(
        self,
        user: str,
        entries: list[ArchivedMessage],
        with_jid: JID | None,
        since: int | None,
    ) -> dict[str, Any]:
        """The archived messages that match, oldest first, at most `MAX_INSPECT_MESSAGES` and
        `MAX_INSPECT_BYTES` of stanzas ("truncated" says when there were more). A worker
        thread runs this on a copy of the archive's entry list."""
        found: list[dict[str, Any]] = []
        size = 0
        truncated = False
        for entry in entries:
            if since is not None and entry.stamp < since:
                continue
            if with_jid is not None and entry.with_bare != str(with_jid.bare):
                continue
            body = {"u": user, "id": entry.record_id, "s": entry.sealed}
            try:
                payload = self.ctx.store.unseal_body(PAYLOAD_RECORD, body)
                stanza = xml.serialize(unpack_stanza(payload), default_ns=None).decode()
                correspondent = unpack_with(payload)
            except (ShreddedError, DecryptError, StateError, KeyManagementError):
                stanza, correspondent = "", entry.with_full
            size += len(stanza) + len(correspondent) + 64
            if len(found) >= MAX_INSPECT_MESSAGES or size > MAX_INSPECT_BYTES:
                truncated = True
                break
            found.append(
                {
                    "id": entry.id,
                    "stamp": format_stamp(entry.stamp),
                    "with": correspondent,
                    "stanza": stanza,
                }
            )
        return {"messages": found, "truncated": truncated}

    def _roster(self, user: str) -> list[dict[str, Any]]:
        return [
            {
                "jid": str(e.jid),
                "name": e.name,
                "subscription": e.state.subscription,
                "ask": "subscribe" if e.state.pending_out else None,
                "groups": list(e.groups),
            }
            for e in self.ctx.roster.entries(user)
            if e.listed
        ]

    def _account(self, user: JID) -> dict[str, Any]:
        account = self.ctx.store.state.accounts.get(str(user))
        archive = self.ctx.messages.archives.of(str(user))
        return {
            "jid": str(user),
            "exists": account is not None,
            "created": (
                datetime.fromtimestamp(account.secrets.created, UTC).isoformat()
                if account is not None and account.secrets is not None
                else None
            ),
            "sessions": sorted(str(s.jid) for s in self.ctx.sessions.of_user(user)),
            "roster_items": sum(1 for e in self.ctx.roster.entries(str(user)) if e.listed),
            "archived_messages": len(archive.entries) if archive is not None else 0,
            "offline_messages": self.ctx.messages.offline.count(str(user)),
        }


COMMANDS: Final[
    dict[str, Callable[[AdminConnection, dict[str, Any]], Awaitable[dict[str, Any]]]]
] = {
    "login": AdminConnection.login,
    "status": AdminConnection.status,
    "sessions": AdminConnection.sessions,
    "federation": AdminConnection.federation,
    "kick": AdminConnection.kick,
    "user.disable": AdminConnection.user_disable,
    "user.enable": AdminConnection.user_enable,
    "grant.request": AdminConnection.grant_request,
    "grant.approve": AdminConnection.grant_approve,
    "grant.list": AdminConnection.grant_list,
    "grant.revoke": AdminConnection.grant_revoke,
    "inspect": AdminConnection.inspect,
}


def _jid(value: object) -> JID | None:
    if not isinstance(value, str) or not value or len(value) > 3071:
        return None
    try:
        return JID.parse(value)
    except JIDError:
        return None


def _printable(text: str) -> str:
    """What a client sent, fit for an audit record: control, format and surrogate characters
    (which the log refuses) become U+FFFD, so a hostile request is recorded, not lost."""
    return "".join(
        "\N{REPLACEMENT CHARACTER}" if unicodedata.category(c)[0] == "C" and c != "\n" else c
        for c in text
    )


def _digest(data: object) -> str:
    """SHA-256 of what an answer returned (its msgpack encoding), for the audit record."""
    return hashlib.sha256(msgpack.packb(data, use_bin_type=True)).hexdigest()


def _now_text() -> str:
    return time_text(time.time())


def time_text(seconds: float) -> str:
    """Audit record time: RFC 3339 UTC with milliseconds (sorts as text)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
