"""The admin socket end to end: a node in this process, the real Unix socket and SO_PEERCRED,
the `villaged admin` client code, TOTP codes from the enrolled secret, the real audit log."""

from __future__ import annotations

import io
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyotp
import pytest
import trio

from tests.net.rawclient import RawClient
from tests.nodes import RunningNode, start_node
from villaged.admin import node as admin_node
from villaged.admin import server as admin_server
from villaged.admin.audit import AuditLog, verify_log
from villaged.admin.client import AdminCommandError, _Session, run_command
from villaged.admin.operators import OperatorStore
from villaged.admin.transparency import NS_ACCESS
from villaged.cli import main
from villaged.ops.monitor import Rule
from villaged.storage import crypto
from villaged.xmpp.jid import JID

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

ALICE = "alice@localhost"
WHY = "the user asked support to look at a lost message"


class Operator:
    """An enrolled operator (this process's uid) and a clock its codes follow."""

    def __init__(self, secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.totp = pyotp.TOTP(secret)
        self.now = 1_900_000_000.0
        monkeypatch.setattr(admin_server, "wall_clock", lambda: self.now)

    def code(self) -> str:
        """A code of a step not used yet (the clock moves on 30 s)."""
        self.now += 30
        return str(self.totp.at(self.now))

    def codes(self) -> Iterator[str]:
        while True:
            yield self.code()


class Admin:
    def __init__(self, running: RunningNode, operator: Operator) -> None:
        self.running = running
        self.operator = operator
        self.socket = running.config.admin.socket

    async def run(self, op: str, **args: Any) -> Any:
        fresh = op in ("grant.request", "grant.approve")
        return await run_command(self.socket, op, args, self.operator.codes(), fresh)

    async def refused(self, op: str, **args: Any) -> str:
        with pytest.raises(AdminCommandError) as caught:
            await self.run(op, **args)
        return str(caught.value).split(":")[0]

    async def grant(self, jid: str = ALICE) -> str:
        result = await self.run(
            "grant.request", jid=jid, reason="user-support-request", justification=WHY, ticket="T-7"
        )
        grant_id: str = result["id"]
        return grant_id

    def audit(self) -> list[dict[str, Any]]:
        assert self.running.node.admin is not None
        log = self.running.node.admin.audit
        return list(log.log.records())  # type: ignore[attr-defined]


@pytest.fixture
async def admin(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Admin]:
    running = await start_node(nursery, tmp_path)
    config = running.config
    keyset = crypto.Keyset.load(config.storage.keyset)
    store = OperatorStore.open(config.storage.dir / "admin", keyset)
    secret, _ = store.enroll("ops1", os.getuid(), datetime.now(UTC).timestamp())
    yield Admin(running, Operator(secret, monkeypatch))
    nursery.cancel_scope.cancel()


async def test_status_sessions_and_the_audit_trail(admin: Admin) -> None:
    status = await admin.run("status")
    assert status["domain"] == "localhost"
    assert await admin.run("sessions") == []
    commands = [(r["command"], r["result"]) for r in admin.audit()]
    assert commands == [("login", "ok"), ("status", "ok"), ("login", "ok"), ("sessions", "ok")]
    assert all(r["operator"] == "ops1" and r["uid"] == os.getuid() for r in admin.audit())


async def test_nothing_runs_before_login(admin: Admin) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(admin.socket))
    async with trio.SocketStream(sock) as stream:
        session = _Session(stream)
        with pytest.raises(AdminCommandError, match="login-required"):
            await session.call("status", {})
    assert admin.audit()[-1]["result"] == "refused"


async def test_wrong_replayed_and_locked_out_logins(admin: Admin) -> None:
    good = admin.operator.code()
    assert await run_command(admin.socket, "status", {}, iter([good]), False)
    with pytest.raises(AdminCommandError, match="replayed"):  # the same step again
        await run_command(admin.socket, "status", {}, iter([good]), False)
    for _ in range(4):
        with pytest.raises(AdminCommandError, match="wrong-code"):
            await run_command(admin.socket, "status", {}, iter(["000000"]), False)
    # The replay and four wrong codes are five failures in a row: even a good code is refused.
    with pytest.raises(AdminCommandError, match="locked"):
        await run_command(admin.socket, "status", {}, iter([admin.operator.code()]), False)


async def test_an_unknown_uid_is_turned_away(admin: Admin) -> None:
    assert admin.running.node.admin is not None
    admin.running.node.admin.operators.store.remove("ops1")  # type: ignore[attr-defined]
    assert await admin.refused("status") == "unknown-uid"


async def test_grants_scope_inspection_to_one_user(admin: Admin) -> None:
    assert await admin.refused("inspect", what="account", jid=ALICE, grant="none") == "no-grant"
    assert (
        await admin.refused(
            "grant.request", jid=ALICE, reason="curiosity", justification=WHY, ticket="T"
        )
        == "bad-reason"
    )
    assert (
        await admin.refused(
            "grant.request", jid=ALICE, reason="legal-request", justification="short", ticket="T"
        )
        == "bad-justification"
    )
    grant = await admin.grant()
    account = await admin.run("inspect", what="account", jid=ALICE, grant=grant)
    assert account["exists"]
    out_of_scope = await admin.refused("inspect", what="roster", jid="bob@localhost", grant=grant)
    assert out_of_scope == "out-of-scope"
    assert admin.running.node.admin is not None
    admin.running.node.admin.grants.lifetime = 0.2
    short = await admin.grant()
    await trio.sleep(0.3)
    assert await admin.refused("inspect", what="roster", jid=ALICE, grant=short) == "expired"
    granted = [r for r in admin.audit() if r["command"] == "grant.request" and r["result"] == "ok"]
    assert granted[0]["expires"] > granted[0]["t"]
    assert granted[0]["justification"] == WHY
    inspected = [r for r in admin.audit() if r["command"] == "inspect.account"]
    assert inspected[-1]["result"] == "ok"
    assert len(inspected[-1]["data_sha256"]) == 64
    assert "exists" not in str(inspected)  # the data itself is never in the log


async def test_two_person_rule_refuses_self_approval(admin: Admin) -> None:
    assert admin.running.node.admin is not None
    admin.running.node.admin.grants.two_person_rule = True
    grant = await admin.grant()
    assert await admin.refused("inspect", what="roster", jid=ALICE, grant=grant) == "pending"
    assert await admin.refused("grant.approve", grant=grant) == "self-approval"


def alerts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The (rule, key) of every security alert logged."""
    return [
        (r.__dict__["rule"], r.__dict__["key"])
        for r in caplog.records
        if r.__dict__.get("event") == "security.alert"
    ]


async def test_inspection_fails_closed_when_the_audit_log_cannot_be_written(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    grant = await admin.grant()
    assert admin.running.node.admin is not None
    audit = admin.running.node.admin.audit

    def disk_full(record: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "append", disk_full)
    with pytest.raises(AdminCommandError, match="audit-unavailable") as caught:
        await admin.run("inspect", what="account", jid=ALICE, grant=grant)
    assert "exists" not in str(caught.value)
    # The security monitor pages someone: a failed audit write always raises an alert.
    assert ("audit_write_failures", "node") in alerts(caplog)


async def test_an_unusual_number_of_grants_raises_an_alert(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    core = admin.running.node.monitor.core
    core.rules = {**core.rules, "grants": Rule("grants", 3, 3600)}  # the node's rule, lowered
    for _ in range(2):
        await admin.grant()
    assert alerts(caplog) == []
    await admin.grant()
    assert alerts(caplog) == [("grants", "node")]


async def test_the_user_sees_the_access_and_is_told(admin: Admin) -> None:
    running = admin.running
    alice = await RawClient.connect(running.c2s, running.ca_file)
    await alice.login("alice", "alice-password", resource="r")
    await alice.send(b"<presence/>")
    grant = await admin.grant()
    notice = await alice.element()
    assert notice.get("type") == "headline"
    assert "user-support-request" in (notice.findtext("{jabber:client}body") or "")
    await admin.run("inspect", what="messages", jid=ALICE, grant=grant)
    await alice.send(f"<iq type='get' id='a1'><accesses xmlns='{NS_ACCESS}'/></iq>".encode())
    for _ in range(10):
        answer = await alice.element()
        if answer.get("id") == "a1":
            break
    accesses = answer.findall(f"{{{NS_ACCESS}}}accesses/{{{NS_ACCESS}}}access")
    assert [(a.get("action"), a.get("operator"), a.get("ticket")) for a in accesses] == [
        ("grant.request", "ops1", "T-7"),
        ("inspect.messages", "ops1", "T-7"),
    ]
    await alice.aclose()
    # And the log the answer came from verifies.
    report = verify_log(running.config.storage.dir / "audit")
    assert report.size == len(admin.audit())
    assert report.checkpoints_checked >= 1  # the grant was followed by a signed checkpoint


async def test_a_disabled_account_cannot_log_in_until_enabled(admin: Admin) -> None:
    running = admin.running
    alice = await RawClient.connect(running.c2s, running.ca_file)
    await alice.login("alice", "alice-password", resource="r")
    result = await admin.run("user.disable", jid=ALICE)
    assert result == {"jid": ALICE, "disabled": True, "sessions_ended": 1}
    assert await alice.stream_error() == "policy-violation"
    again = await RawClient.connect(running.c2s, running.ca_file)
    with pytest.raises(PermissionError, match="not-authorized"):
        await again.login("alice", "alice-password")
    assert await admin.refused("user.disable", jid="nobody@localhost") == "no-such-account"
    await admin.run("user.enable", jid=ALICE)
    third = await RawClient.connect(running.c2s, running.ca_file)
    assert await third.login("alice", "alice-password") == "alice@localhost/test"
    for client in (alice, again, third):
        await client.aclose()
    assert [r["command"] for r in admin.audit() if r.get("scope") == ALICE] == [
        "user.disable",
        "user.enable",
    ]


async def test_hostile_text_in_a_request_is_recorded_not_lost(admin: Admin) -> None:
    assert await admin.refused("no\x00such\u202ecommand") == "unknown-command"
    record = admin.audit()[-1]
    assert record["result"] == "refused"
    assert record["command"] == "no\ufffdsuch\ufffdcommand"


async def test_the_admin_command_line_with_codes_on_stdin(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = admin.operator.code()
    monkeypatch.setattr(sys, "stdin", io.StringIO(code + "\n"))
    config = str(admin.running.config.source)
    status = ["admin", "-c", config, "--totp-stdin", "status"]
    assert await trio.to_thread.run_sync(main, status) == 0
    assert json.loads(capsys.readouterr().out)["domain"] == "localhost"
    monkeypatch.setattr(sys, "stdin", io.StringIO(code + "\n"))  # the same step again
    with pytest.raises(SystemExit):
        await trio.to_thread.run_sync(main, status)
    assert "villaged: error: replayed" in capsys.readouterr().err


async def open_session(admin: Admin) -> tuple[trio.SocketStream, _Session]:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(admin.socket))
    stream = trio.SocketStream(sock)
    session = _Session(stream)
    await session.call("login", {"totp": admin.operator.code()})
    return stream, session


async def test_a_grant_the_audit_log_did_not_record_is_never_in_effect(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert admin.running.node.admin is not None
    audit = admin.running.node.admin.audit
    real_append = audit.append

    def refuse_grants(record: Any) -> int:
        if record.get("command") == "grant.request" and record.get("result") == "ok":
            raise OSError(28, "No space left on device")
        return real_append(record)

    monkeypatch.setattr(audit, "append", refuse_grants)
    assert (
        await admin.refused(
            "grant.request", jid=ALICE, reason="legal-request", justification=WHY, ticket="L-1"
        )
        == "audit-unavailable"
    )
    assert await admin.run("grant.list") == []


async def test_a_grant_without_a_signed_checkpoint_is_withdrawn(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert admin.running.node.admin is not None
    audit = admin.running.node.admin.audit

    def cannot_sign() -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "checkpoint", cannot_sign)
    assert (
        await admin.refused(
            "grant.request", jid=ALICE, reason="legal-request", justification=WHY, ticket="L-2"
        )
        == "audit-unavailable"
    )
    assert await admin.run("grant.list") == []
    assert admin.audit()[-3]["command"] == "grant.withdraw"


async def test_inspection_filters_are_checked_and_applied(admin: Admin) -> None:
    running = admin.running
    alice = await RawClient.connect(running.c2s, running.ca_file)
    await alice.login("alice", "alice-password", resource="r")
    for to, body in (("bob@localhost", "to bob"), ("carol@localhost", "to carol")):
        await alice.send(f"<message to='{to}' type='chat'><body>{body}</body></message>".encode())
    await alice.send(b"<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
    while (await alice.element()).get("id") != "p":
        pass
    await alice.aclose()
    grant = await admin.grant()
    args = {"what": "messages", "jid": ALICE, "grant": grant}
    everything = await admin.run("inspect", **args)
    assert len(everything["messages"]) == 2
    assert not everything["truncated"]
    only_bob = await admin.run("inspect", **args, **{"with": "bob@localhost"})
    assert [m["with"] for m in only_bob["messages"]] == ["bob@localhost"]
    assert await admin.refused("inspect", **args, **{"with": "bob@@localhost"}) == "bad-request"
    assert await admin.refused("inspect", **args, since="yesterday") == "bad-request"
    later = await admin.run("inspect", **args, since="2999-01-01T00:00:00Z")
    assert later["messages"] == []


async def test_long_text_in_a_refusal_is_recorded_cut_short(admin: Admin) -> None:
    grant = await admin.grant()
    far = "x" * 1000 + "@localhost"
    assert await admin.refused("inspect", what="roster", jid=far, grant=grant) == "out-of-scope"
    assert len(admin.audit()[-1]["error"]) <= 1000


async def test_too_many_refusals_close_the_connection_and_removal_takes_effect(
    admin: Admin,
) -> None:
    stream, session = await open_session(admin)
    async with stream:
        for _ in range(9):
            with pytest.raises(AdminCommandError, match="unknown-command"):
                await session.call("nope", {})
        with pytest.raises(AdminCommandError, match="unknown-command"):
            await session.call("nope", {})
        with pytest.raises(AdminCommandError):  # the tenth refusal was the last answer
            await session.call("status", {})
    stream, session = await open_session(admin)
    async with stream:
        assert admin.running.node.admin is not None
        admin.running.node.admin.operators.store.disable("ops1")  # type: ignore[attr-defined]
        with pytest.raises(AdminCommandError, match="disabled"):
            await session.call("status", {})


async def test_a_stream_that_authenticated_before_a_disable_cannot_bind(admin: Admin) -> None:
    running = admin.running
    alice = await RawClient.connect(running.c2s, running.ca_file)
    await alice.login("alice", "alice-password", bind=False)
    await admin.run("user.disable", jid=ALICE)
    await alice.send(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert await alice.stream_error() == "not-authorized"
    assert running.node.sessions.of_user(JID("alice", "localhost")) == []
    await alice.aclose()


def test_the_access_list_cannot_be_crowded_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_node, "MAX_ACCESS_RECORDS", 3)
    log = AuditLog.open(tmp_path / "audit", "villaged-audit/localhost")
    base = {"t": "2026-11-29T18:00:00.000Z", "kind": "command", "operator": "ops1"}
    log.append({**base, "command": "inspect.messages", "result": "ok", "scope": ALICE})
    for _ in range(20):  # records about alice that are not accesses
        log.append({**base, "command": "kick", "result": "ok", "scope": ALICE})
    log.append({**base, "command": "inspect.roster", "result": "refused", "scope": ALICE})
    accesses = admin_node.AuditAdapter(log).accesses_to(ALICE)
    assert [r["command"] for r in accesses] == ["inspect.messages"]
    log.close()


async def test_federation_queues_are_visible_to_operators(admin: Admin) -> None:
    assert await admin.run("federation") == {"enabled": False, "domains": {}}
    assert admin.running.node.admin is not None
    admin.running.node.admin.federation = lambda: {"b.test": {"queued": 3}}
    assert await admin.run("federation") == {"enabled": True, "domains": {"b.test": {"queued": 3}}}
    assert [r["command"] for r in admin.audit()].count("federation") == 2


async def test_a_new_holder_of_a_jid_does_not_see_the_former_accounts_accesses(
    admin: Admin,
) -> None:
    running = admin.running
    grant = await admin.grant()
    await admin.run("inspect", what="account", jid=ALICE, grant=grant)
    store = running.node.store
    await trio.sleep(1.01)  # account times are whole seconds
    await store.set_password(ALICE, "a new password")  # the same account: still listed
    account = store.state.accounts.get(ALICE)
    assert account is not None
    assert account.secrets is not None
    created = account.secrets.created

    async def listed(password: str) -> list[str]:
        alice = await RawClient.connect(running.c2s, running.ca_file)
        await alice.login("alice", password, resource="r")
        await alice.send(f"<iq type='get' id='a1'><accesses xmlns='{NS_ACCESS}'/></iq>".encode())
        for _ in range(10):
            answer = await alice.element()
            if answer.get("id") == "a1":
                break
        await alice.aclose()
        return [a.get("action", "") for a in answer.iter(f"{{{NS_ACCESS}}}access")]

    assert await listed("a new password") == ["grant.request", "inspect.account"]
    await store.delete_user(ALICE)
    await trio.sleep(1.01)
    await store.add_user(ALICE, "alice-password")
    new = store.state.accounts.get(ALICE)
    assert new is not None
    assert new.secrets is not None
    assert new.secrets.created > created
    assert await listed("alice-password") == []
