"""``villaged admin``: the operator's side of the admin socket.

Connects to ``[admin] socket`` of a running node, logs in with a TOTP code, runs one command
and prints its result as JSON. Codes are read from a prompt (without echo), or one per line
from standard input with ``--totp-stdin`` (for scripts). Opening or approving a grant needs a
second, *fresh* code: each 30-second step is accepted only once, so the prompt asks for the
next one.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from villaged.admin.grants import REASON_CODES
from villaged.admin.protocol import (
    MAX_RESPONSE_BYTES,
    FrameReader,
    ProtocolError,
    encode_frame,
    request,
)
from villaged.config import load_config

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

TIMEOUT_S: Final = 60.0


class AdminCommandError(Exception):
    """The node refused, or could not be reached; the message is the one line shown."""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    admin = with_config(
        sub.add_parser(
            "admin",
            help="run an operator command on a running node (TOTP login)",
            description="Run an operator command through the node's admin socket.",
        )
    )
    admin.add_argument(
        "--totp-stdin", action="store_true", help="read TOTP codes from stdin, one per line"
    )
    admin.set_defaults(func=cmd_admin)
    commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="node status")
    commands.add_parser("sessions", help="connected resources")
    commands.add_parser("federation", help="outbound s2s queues per remote domain")
    commands.add_parser("kick", help="end a user's sessions").add_argument("jid")
    user = commands.add_parser("user", help="disable or enable an account")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    user_sub.add_parser("disable", help="refuse its logins, end its sessions").add_argument("jid")
    user_sub.add_parser("enable", help="let it log in again").add_argument("jid")
    grant = commands.add_parser("grant", help="inspection grants")
    grant_sub = grant.add_subparsers(dest="grant_command", required=True, metavar="ACTION")
    p = grant_sub.add_parser("request", help="ask for a grant to inspect one user's data")
    p.add_argument("jid")
    p.add_argument("--reason", required=True, choices=REASON_CODES)
    p.add_argument("--justification", required=True, help="why, in at least 20 characters")
    p.add_argument("--ticket", required=True, help="the ticket or case reference")
    grant_sub.add_parser("approve", help="approve another operator's grant").add_argument("id")
    grant_sub.add_parser("list", help="open grants")
    grant_sub.add_parser("revoke", help="close one of your grants").add_argument("id")
    inspect = commands.add_parser("inspect", help="read a user's data under a grant")
    inspect_sub = inspect.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what in ("messages", "roster", "account"):
        p = inspect_sub.add_parser(what, help=f"the user's {what}")
        p.add_argument("jid")
        p.add_argument("--grant", required=True, metavar="ID")
        if what == "messages":
            p.add_argument("--with", dest="with_jid", metavar="JID")
            p.add_argument(
                "--since", metavar="TIME", help="XEP-0082 time, e.g. 2026-11-29T00:00:00Z"
            )


def cmd_admin(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    op, op_args, fresh = _request_of(args)
    codes = _stdin_codes() if args.totp_stdin else _prompted_codes()
    result = trio.run(run_command, config.admin.socket, op, op_args, codes, fresh)
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any], bool]:
    """(op, its arguments, whether it needs a fresh TOTP code)."""
    command = args.admin_command
    if command in ("status", "sessions", "federation"):
        return command, {}, False
    if command == "kick":
        return "kick", {"jid": args.jid}, False
    if command == "user":
        return f"user.{args.user_command}", {"jid": args.jid}, False
    if command == "grant":
        action = args.grant_command
        if action == "request":
            fields = {
                "jid": args.jid,
                "reason": args.reason,
                "justification": args.justification,
                "ticket": args.ticket,
            }
            return "grant.request", fields, True
        if action == "approve":
            return "grant.approve", {"grant": args.id}, True
        if action == "revoke":
            return "grant.revoke", {"grant": args.id}, False
        return "grant.list", {}, False
    fields = {"what": args.what, "jid": args.jid, "grant": args.grant}
    if args.what == "messages":
        fields.update({"with": args.with_jid or "", "since": args.since or ""})
    return "inspect", fields, False


def _stdin_codes() -> Iterator[str]:
    for line in sys.stdin:
        yield line.strip()
    raise AdminCommandError("stdin ended before the TOTP code that was needed")


def _prompted_codes() -> Iterator[str]:
    yield getpass.getpass("TOTP code: ").strip()
    while True:
        yield getpass.getpass("a new TOTP code (the next 30-second step): ").strip()


async def run_command(
    socket_path: Path, op: str, args: dict[str, Any], codes: Iterator[str], fresh: bool
) -> Any:
    """Log in, run ``op``, return its result; AdminCommandError on any refusal. Each exchange
    with the node is bounded by `TIMEOUT_S`; waiting for the operator's codes is not."""
    login_code = next(codes)
    try:
        with trio.fail_after(TIMEOUT_S):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(str(socket_path))
    except OSError as exc:
        raise AdminCommandError(
            f"cannot reach the admin socket {socket_path}: {exc.strerror or exc}"
            " (is the node running, and are you in its operators' group?)"
        ) from None
    except trio.TooSlowError:
        raise AdminCommandError(f"the admin socket {socket_path} does not answer") from None
    async with trio.SocketStream(sock) as stream:
        session = _Session(stream)
        await session.call("login", {"totp": login_code})
        if fresh:
            args = {**args, "totp": next(codes)}
        return await session.call(op, args)


class _Session:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(MAX_RESPONSE_BYTES)

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        try:
            with trio.fail_after(TIMEOUT_S):
                answer = await self._exchange(op, args)
        except trio.TooSlowError:
            raise AdminCommandError(f"no answer to {op} within {TIMEOUT_S:.0f} s") from None
        except ProtocolError as exc:
            raise AdminCommandError(f"the node answered garbage: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise AdminCommandError("the node closed the connection") from None
        if not answer.get("ok"):
            raise AdminCommandError(f"{answer.get('code')}: {answer.get('error')}")
        return answer.get("result")

    async def _exchange(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        await self.stream.send_all(encode_frame(request(op, **args)))
        while True:
            answer = self.reader.next_message()
            if answer is not None:
                return answer
            data = await self.stream.receive_some(64 * 1024)
            if not data:
                raise AdminCommandError("the node closed the connection")
            self.reader.receive_data(data)
