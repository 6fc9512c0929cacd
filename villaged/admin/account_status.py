"""Disabled accounts: an operator's ``user disable JID`` (durable, record ``account.status``).

A disabled account cannot log in (SASL fails as for a wrong password, and the node logs
``c2s.auth_disabled``); its data stays as it is, and ``user enable`` lets it in again. The
state is a view of the log like every other, so it survives restarts and replicates with the
rest; deleting the account forgets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from villaged.storage.state import StateError, text

if TYPE_CHECKING:
    from collections.abc import Mapping

    from villaged.storage.state import Unseal

STATUS_RECORD: Final = "account.status"  # {"u": bare JID, "disabled": bool}


class AccountStatusView:
    name = "account_status"
    record_types: Mapping[str, int] = {STATUS_RECORD: 1}

    def __init__(self) -> None:
        self.disabled: set[str] = set()

    def is_disabled(self, jid: str) -> bool:
        return jid in self.disabled

    def validate(self, rtype: str, body: Mapping[str, Any]) -> None:
        text(body, "u")
        if type(body.get("disabled")) is not bool:
            raise StateError(f"{rtype} needs 'disabled' true or false")

    def apply(self, rtype: str, body: Mapping[str, Any], unseal: Unseal) -> None:
        self.validate(rtype, body)
        if body["disabled"]:
            self.disabled.add(body["u"])
        else:
            self.disabled.discard(body["u"])

    def forget_user(self, jid: str) -> None:
        self.disabled.discard(jid)

    def to_snapshot(self) -> list[str]:
        return sorted(self.disabled)

    def restore(self, data: Any, unseal: Unseal) -> None:
        data = data or []  # (a snapshot from before this view existed has none)
        if not isinstance(data, list) or not all(isinstance(j, str) for j in data):
            raise StateError("account_status snapshot is not a list of JIDs")
        self.disabled = set(data)
