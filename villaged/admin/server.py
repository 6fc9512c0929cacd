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
from villaged.admin.grants import GrantBook, GrantError
from villaged.admin.protocol import (
    MAX_REQUEST_BYTES,
    FrameReader,
    ProtocolError,
    encode_frame,
    ok,
    refused,
)
from villaged.im.mam import PAYLOAD_RECORD, format_stamp, parse_stamp, unpack_stanza, unpack_with
from villaged.storage.errors import DecryptError, ShreddedError
from villaged.storage.records import Record
from villaged.storage.state import StateError
from villaged.xmpp import xml
from villaged.xmpp.jid import JID, JIDError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from pathlib import Path

    from villaged.im.messages import MessageStoreView
    from villaged.im.roster import RosterView
    from villaged.im.sessions import SessionRegistry
    from villaged.storage.store import Store

log = logging.getLogger("villaged.admin.server")

LOGIN_TIMEOUT_S: Final = 60.0
IDLE_TIMEOUT_S: Final = 900.0
WRITE_TIMEOUT_S: Final = 30.0
MAX_INSPECT_MESSAGES: Final = 500
READ_CHUNK: Final = 16 * 1024
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def wall_clock() -> float:
    """The time TOTP codes are checked against (a function, so tests can move it)."""
    return time.time()


class Operators(Protocol):
    """What the server needs of the operator store (villaged.admin.operators)."""

    def name_of_uid(self, uid: int) -> str | None: ...

    def login(self, name: str, code: str, now: float) -> tuple[bool, str]: ...

    def confirm(self, name: str, code: str, now: float) -> tuple[bool, str]: ...


class Audit(Protocol):
    """What the server needs of the audit log (villaged.admin.audit); blocking calls."""

    def append(self, record: Mapping[str, Any]) -> int: ...

    def checkpoint(self) -> str: ...

    def accesses_to(self, user: str) -> list[dict[str, Any]]: ...


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

    async def record(self, entry: Mapping[str, Any]) -> None:
        async with self.audit_lock:
            try:
                await trio.to_thread.run_sync(self.audit.append, dict(entry))
            except Exception as exc:
                log.error(
                    "audit log unavailable",
                    extra={"event": "admin.audit_failed", "error": str(exc), "security": True},
                )
                raise AuditUnavailableError(str(exc)) from exc

    async def checkpoint(self) -> None:
        async with self.audit_lock:
            await trio.to_thread.run_sync(self.audit.checkpoint)


async def serve_admin(
    ctx: AdminContext,
    path: Path,
    group: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the Unix socket ``path`` until cancelled; the socket file is removed then."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _remove_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o117)  # never, even for an instant, more than 0660
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
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


def _remove_stale_socket(path: Path) -> None:
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
            while True:
                timeout = IDLE_TIMEOUT_S if self.logged_in else LOGIN_TIMEOUT_S
                with trio.move_on_after(timeout):
                    message = await self._receive()
                    if message is None:
                        return
                    answer = await self._answer(message)
                    await self._send(answer)
                    continue
                await self._send(refused("timeout", "no request in time; closing"))
                return

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

    async def _send(self, message: dict[str, Any]) -> None:
        with (
            trio.move_on_after(WRITE_TIMEOUT_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.send_all(encode_frame(message))

    # ----- requests ------------------------------------------------------------------------

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op, args = message.get("op"), message.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            return refused("bad-request", "a request is {op: str, args: map}")
        command = COMMANDS.get(op)
        try:
            if command is None:
                await self._audit(op[:40], "refused", error="unknown command")
                return refused("unknown-command", f"no command {op[:40]!r}")
            if op != "login" and not self.logged_in:
                await self._audit(op, "refused", error="not logged in")
                return refused("login-required", "log in with a TOTP code first")
            return await command(self, args)
        except AuditUnavailableError as exc:
            return refused("audit-unavailable", f"the audit log cannot be written ({exc})")

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
                k: _printable(v) if isinstance(v, str) else v
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
        fields = {
            "scope": str(user) if user else None,
            "reason": reason[:64],
            "ticket": ticket[:200],
        }
        if user is None or user.resource or user.domain != self.ctx.domain or not user.local:
            await self._audit("grant.request", "refused", error="bad scope", **fields)
            return refused(
                "bad-scope", f"a grant covers one local account (user@{self.ctx.domain})"
            )
        confirmed, why = await self._fresh_totp(args)
        if not confirmed:
            await self._audit("grant.request", "refused", error=f"totp: {why}", **fields)
            return refused(why, f"a grant needs a fresh TOTP code: {why}")
        try:
            grant = self.ctx.grants.request(
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
        await self._audit(
            "grant.request",
            "pending" if grant.pending else "ok",
            grant=grant.id,
            justification=grant.justification,
            **fields,
        )
        if not grant.pending:
            await self._grant_opened(grant.id, str(user), reason, ticket)
        return ok(grant.describe(time.monotonic()))

    async def grant_approve(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        grant_id = str(args.get("grant", ""))[:64]
        confirmed, why = await self._fresh_totp(args)
        if not confirmed:
            await self._audit("grant.approve", "refused", grant=grant_id, error=f"totp: {why}")
            return refused(why, f"an approval needs a fresh TOTP code: {why}")
        try:
            grant = self.ctx.grants.approve(grant_id, self.operator, time.monotonic())
        except GrantError as exc:
            await self._audit("grant.approve", "refused", grant=grant_id, error=str(exc))
            return refused(exc.code, str(exc))
        await self._audit(
            "grant.approve", "ok", grant=grant.id, scope=grant.user, reason=grant.reason
        )
        await self._grant_opened(grant.id, grant.user, grant.reason, grant.ticket)
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
        try:
            grant = self.ctx.grants.use(grant_id, self.operator, str(user), time.monotonic())
        except GrantError as exc:
            await self._audit(command, "refused", scope=str(user), grant=grant_id, error=str(exc))
            return refused(exc.code, f"no inspection without a grant: {exc}")
        result: object
        if what == "messages":
            result = self._messages(str(user), args)
        elif what == "roster":
            result = self._roster(str(user))
        else:
            result = self._account(user)
        # The access is on record, with what it returned (its hash), before anything is sent.
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

    async def _grant_opened(self, grant_id: str, user: str, reason: str, ticket: str) -> None:
        log.warning(
            "inspection grant opened",
            extra={
                "event": "admin.grant_opened",
                "operator": self.operator,
                "user": user,
                "reason": reason,
                "security": True,
            },
        )
        await self.ctx.checkpoint()  # a signed statement covering the grant, at once
        if self.ctx.notify_users:
            notice = ET.Element(
                "{jabber:client}message", {"type": "headline", "from": self.ctx.domain}
            )
            ET.SubElement(notice, "{jabber:client}subject").text = "Operator access to your data"
            ET.SubElement(notice, "{jabber:client}body").text = (
                f"An operator of {self.ctx.domain} opened access to your data "
                f"(reason: {reason}, ticket: {ticket}). Ask the server for the list of accesses "
                "to see every one."
            )
            for session in self.ctx.sessions.of_user(JID.parse(user)):
                copy = ET.Element(notice.tag, dict(notice.attrib, to=str(session.jid)))
                copy.extend(list(notice))
                session.send(copy)

    def _messages(self, user: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        archive = self.ctx.messages.archives.of(user)
        if archive is None:
            return []
        with_jid = _jid(args.get("with"))
        since_text = args.get("since")
        since = parse_stamp(since_text) if isinstance(since_text, str) and since_text else None
        found: list[dict[str, Any]] = []
        for entry in archive.entries:
            if since is not None and entry.stamp < since:
                continue
            if with_jid is not None and entry.with_bare != str(with_jid.bare):
                continue
            body = {"u": user, "id": entry.record_id, "s": entry.sealed}
            try:
                payload = self.ctx.store.unseal_body(PAYLOAD_RECORD, body)
                stanza = xml.serialize(unpack_stanza(payload), default_ns=None).decode()
                correspondent = unpack_with(payload)
            except (ShreddedError, DecryptError, StateError):
                stanza, correspondent = "", entry.with_full
            found.append(
                {
                    "id": entry.id,
                    "stamp": format_stamp(entry.stamp),
                    "with": correspondent,
                    "stanza": stanza,
                }
            )
            if len(found) >= MAX_INSPECT_MESSAGES:
                break
        return found

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
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
