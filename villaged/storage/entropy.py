"""Random bytes for values that become public once used: AES-GCM nonces and random ids.

A chat message needs half a dozen of them (two record ids, two nonces, two archive ids), and
each ``os.urandom`` call is a system call — costly enough under a sandboxing kernel to show in a
profile. `random_bytes` hands out slices of one 4 KiB ``os.urandom`` draw instead: the same
kernel CSPRNG output, fewer calls. Never use it for key material: the rest of the draw sits in
memory until it is handed out, which is harmless for a nonce (it is written next to the
ciphertext anyway) but not for a key.

Every slice is handed out once: a lock guards the position (worker threads wrap keys while the
event loop seals), and a forked child drops the parent's draw so the two never share nonces.
"""

from __future__ import annotations

import base64
import os
import threading
from typing import Final

POOL_BYTES: Final = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draw = b""
        self._position = 0

    def take(self, count: int) -> bytes:
        if count > POOL_BYTES:
            return os.urandom(count)
        with self._lock:
            start = self._position
            if start + count > len(self._draw):
                self._draw = os.urandom(POOL_BYTES)
                start = 0
            self._position = start + count
            return self._draw[start : start + count]

    def drop(self) -> None:
        self._draw = b""
        self._position = 0
        self._lock = threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.drop)


def random_bytes(count: int) -> bytes:
    """``count`` bytes from the kernel CSPRNG (for nonces and ids, not for keys)."""
    return _pool.take(count)


def random_token(count: int = 16) -> str:
    """``count`` random bytes as unpadded URL-safe base64 (``secrets.token_urlsafe``'s form)."""
    return base64.urlsafe_b64encode(_pool.take(count)).rstrip(b"=").decode("ascii")
