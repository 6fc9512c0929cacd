"""Operator access inside a running node: opens the operator store and the audit log, builds
the admin socket's context, serves the socket, signs audit checkpoints on a timer, and answers
users' access-transparency queries."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from villaged.admin import transparency
from villaged.admin.audit import AuditLog
from villaged.admin.grants import GrantBook
from villaged.admin.operators import LoginResult, OperatorStore
from villaged.admin.server import AdminContext, serve_admin, time_text
from villaged.storage import crypto

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from villaged.config import Config
    from villaged.im.handlers import HandlerRegistry
    from villaged.im.messages import MessageStoreView
    from villaged.im.roster import RosterView
    from villaged.im.sessions import SessionRegistry
    from villaged.storage.store import Store
    from villaged.xmpp.jid import JID

log = logging.getLogger("villaged.admin.node")

MAX_ACCESS_RECORDS = 10_000


@dataclass
class OperatorsAdapter:
    """The operator store as the admin server asks for it."""

    store: OperatorStore
    max_failures: int
    lockout_seconds: int

    def name_of_uid(self, uid: int) -> str | None:
        info = self.store.by_uid(uid)
        return info.name if info is not None else None

    def active(self, name: str, uid: int) -> bool:
        """Still enrolled under this uid, and enabled (checked before every command)."""
        info = self.store.by_uid(uid)
        return info is not None and info.name == name and info.enabled

    def login(self, name: str, code: str, now: float) -> tuple[bool, str]:
        return _outcome(
            self.store.login(
                name,
                code,
                now,
                max_failures=self.max_failures,
                lockout_seconds=self.lockout_seconds,
            )
        )

    def confirm(self, name: str, code: str, now: float) -> tuple[bool, str]:
        return _outcome(
            self.store.verify_code(
                name,
                code,
                now,
                max_failures=self.max_failures,
                lockout_seconds=self.lockout_seconds,
            )
        )


def _outcome(result: LoginResult) -> tuple[bool, str]:
    return result.ok, result.value.replace("_", "-")


@dataclass
class AuditAdapter:
    log: AuditLog

    def append(self, record: Mapping[str, Any]) -> int:
        return self.log.append(record)

    def checkpoint(self) -> str:
        return self.log.checkpoint()

    def accesses_to(self, user: str) -> list[dict[str, Any]]:
        # Filtered while scanning, so records about the user that are not accesses (kicks,
        # refusals) can never push real accesses out of the list.
        found: deque[dict[str, Any]] = deque(maxlen=MAX_ACCESS_RECORDS)
        for record in self.log.records():
            if transparency.is_access(record, user):
                found.append(record)
        return list(found)

    def close(self) -> None:
        self.log.close()


def open_admin(
    config: Config,
    store: Store,
    sessions: SessionRegistry,
    messages: MessageStoreView,
    roster: RosterView,
    handlers: HandlerRegistry,
) -> AdminContext:
    """Open the operator store and the audit log; register the transparency query."""
    admin = config.admin
    keyset = crypto.Keyset.load(config.storage.keyset)
    operators = OperatorStore.open(config.storage.dir / "admin", keyset)
    audit_log = AuditLog.open(
        config.storage.dir / "audit", f"villaged-audit/{config.server.domain}"
    )
    audit = AuditAdapter(audit_log)
    ctx = AdminContext(
        domain=config.server.domain,
        store=store,
        sessions=sessions,
        messages=messages,
        roster=roster,
        operators=OperatorsAdapter(operators, admin.max_login_failures, admin.lockout_seconds),
        audit=audit,
        grants=GrantBook(minutes=admin.grant_minutes, two_person_rule=admin.two_person_rule),
        notify_users=admin.notify_users,
    )

    async def accesses_to(user: str) -> list[dict[str, Any]]:
        # Reading needs no lock (appends never change what is already written), so users'
        # queries never hold up an operator's audit write.
        return await trio.to_thread.run_sync(audit.accesses_to, user)

    def created(user: str) -> str | None:
        account = store.state.accounts.get(user)
        if account is None or account.secrets is None:
            return None
        return time_text(account.secrets.created)

    transparency.register(handlers, accesses_to, since=created)
    handlers.account_features.add(transparency.NS_ACCESS)
    return ctx


async def serve_operator_access(
    ctx: AdminContext,
    config: Config,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin socket and the checkpoint timer, until cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, ctx, config.admin.socket, config.admin.group)
        nursery.start_soon(_checkpoints, ctx, config.admin.checkpoint_interval)
        task_status.started()


async def _checkpoints(ctx: AdminContext, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            await ctx.checkpoint()
        except Exception as exc:  # logged; the next tick tries again
            log.error(
                "audit checkpoint failed",
                extra={"event": "admin.checkpoint_failed", "error": str(exc), "security": True},
            )


def kicker(sessions: SessionRegistry) -> Callable[[JID], int]:
    def kick(jid: JID) -> int:
        targets = (
            [s for s in [sessions.get(jid)] if s is not None]
            if jid.resource
            else sessions.of_user(jid)
        )
        for session in targets:
            session.terminate("policy-violation", "disconnected by an operator")
        return len(targets)

    return kick
