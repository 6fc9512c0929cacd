"""Account administration on a stopped node's data directory (`villaged user …`)."""

from __future__ import annotations

import getpass
import sys
from typing import TYPE_CHECKING, TextIO

from villaged.im.features import open_node_store
from villaged.xmpp.scram import prepare_password

if TYPE_CHECKING:
    from villaged.config.model import Config


class PasswordInputError(ValueError):
    """No usable password was given."""


def read_new_password(stdin: TextIO | None = None) -> str:
    """A password from a prompt (asked twice) on a terminal, else the first line of stdin."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        if first != getpass.getpass("Repeat password: "):
            raise PasswordInputError("the passwords do not match")
        password = first
    else:
        line = stdin.readline(4096)
        if not line:
            raise PasswordInputError("no password on standard input")
        password = line.rstrip("\r\n")
    prepare_password(password)  # fail before touching the store
    return password


async def add_user(config: Config, jid: str, password: str) -> str:
    async with open_node_store(config) as store:
        canonical = store.local_user(jid, config.server.domain)
        await store.add_user(canonical, password)
        return canonical


async def set_password(config: Config, jid: str, password: str) -> str:
    async with open_node_store(config) as store:
        canonical = store.local_user(jid, config.server.domain)
        await store.set_password(canonical, password)
        return canonical


async def delete_user(config: Config, jid: str) -> str:
    async with open_node_store(config) as store:
        canonical = store.local_user(jid, config.server.domain)
        await store.delete_user(canonical)
        return canonical


async def list_users(config: Config) -> list[str]:
    async with open_node_store(config) as store:
        return store.users()
