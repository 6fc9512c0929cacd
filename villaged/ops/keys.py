"""Key-encryption keyset rotation (`villaged keys rotate`).

Rotation adds a new primary key to the keyset file (old keys stay, so everything sealed before
still opens) and re-wraps every user's data key and every operator's TOTP secret under it. The
data directory is locked for the duration, so this runs on a stopped node. If it is interrupted
after the keyset is saved, running it again finishes the re-wrap (the old key is still in the
keyset).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

from villaged.im.features import open_node_store
from villaged.ops.operators import rewrap_operator_secrets
from villaged.storage.store import StoreOptions

if TYPE_CHECKING:
    from villaged.config.model import Config


@dataclass(frozen=True, slots=True)
class RotationResult:
    primary_id: int
    key_count: int
    rewrapped: int


async def rotate_keys(config: Config) -> RotationResult:
    options = StoreOptions.from_config(config.storage)
    async with open_node_store(config) as store:  # holds the data directory lock throughout
        keyset = store.vault.keyset.rotated(datetime.now(UTC))
        await trio.to_thread.run_sync(keyset.save, options.keyset)
        store.vault.replace_keyset(keyset)
        rewrapped = await trio.to_thread.run_sync(store.vault.rewrap_all)
        await trio.to_thread.run_sync(rewrap_operator_secrets, config, keyset)
    return RotationResult(keyset.primary_id, len(keyset.key_ids), rewrapped)


@dataclass(frozen=True, slots=True)
class RetireResult:
    primary_id: int
    retired: tuple[int, ...]
    rewrapped: int


async def retire_old_keys(config: Config) -> RetireResult:
    """Drop every key-encryption key but the primary, after re-wrapping all data keys under it.

    This is what makes crypto-shredding reach copies of the vault: a data key destroyed
    today may survive in an old copy of ``vault/``, wrapped by an older key; once that key
    is retired here (and no copy of the old keyset is kept), the copy is useless.
    """
    options = StoreOptions.from_config(config.storage)
    async with open_node_store(config) as store:
        rewrapped = await trio.to_thread.run_sync(store.vault.rewrap_all)
        keyset = store.vault.keyset
        # Operators' TOTP secrets are wrapped by the keyset too: move them before keys go.
        await trio.to_thread.run_sync(rewrap_operator_secrets, config, keyset)
        retired = tuple(k for k in keyset.key_ids if k != keyset.primary_id)
        for key_id in retired:
            keyset = keyset.without(key_id)
        if retired:
            await trio.to_thread.run_sync(keyset.save, options.keyset)
            store.vault.replace_keyset(keyset)
    return RetireResult(keyset.primary_id, retired, rewrapped)
