"""Demo accounts for a development node (`villaged init --dev --demo-users`, used by `make run`).

Creates alice and bob with random passwords if they do not exist yet, and keeps their
passwords in DIR/demo-accounts.txt (mode 0600) so a developer can log in with any client.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Final

from villaged.config import load_config
from villaged.im.features import open_node_store

if TYPE_CHECKING:
    from pathlib import Path

DEMO_USERS: Final = ("alice", "bob")


async def ensure_demo_users(config_path: Path) -> list[str]:
    from villaged.ops.tlsfiles import write_private_file

    config = load_config(config_path)
    passwords_file = config_path.parent / "demo-accounts.txt"
    lines: list[str] = []
    async with open_node_store(config) as store:
        created: list[str] = []
        for local in DEMO_USERS:
            jid = f"{local}@{config.server.domain}"
            if jid in store.users():
                lines.append(f"kept    demo account {jid}")
                continue
            password = secrets.token_urlsafe(12)
            await store.add_user(jid, password)
            created.append(f"{jid} {password}\n")
            lines.append(f"created demo account {jid}")
    if created:
        old = passwords_file.read_text() if passwords_file.exists() else ""
        kept = [
            line
            for line in old.splitlines(keepends=True)
            if line.split(" ")[0] not in {entry.split(" ")[0] for entry in created}
        ]
        write_private_file(passwords_file, "".join(kept + created).encode())
        lines.append(f"demo passwords are in {passwords_file}")
    return lines
