"""Free loopback ports for tests that start real listeners.

A range is free when it is picked, but nothing holds it until the test's servers bind, so two
ranges picked one after another (say a Prosody's and a villaged node's) could overlap. The
ranges handed out recently in this process are therefore never handed out again (the last
`REMEMBERED` of them: tests end and free theirs long before)."""

from __future__ import annotations

import random
import socket
from collections import deque
from typing import Final

REMEMBERED: Final = 64
_recent: deque[range] = deque(maxlen=REMEMBERED)


def free_port_base(count: int = 7, attempts: int = 200) -> int:
    """A base N such that N .. N+count-1 are all free on 127.0.0.1 right now, and overlap no
    range this process handed out recently."""
    for _ in range(attempts):
        base = random.randrange(20000, 32000 - count)  # below the ephemeral range
        wanted = range(base, base + count)
        if any(wanted.start < r.stop and r.start < wanted.stop for r in _recent):
            continue
        socks: list[socket.socket] = []
        try:
            for port in wanted:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _recent.append(wanted)
        return base
    raise RuntimeError(f"no {count} consecutive free loopback ports after {attempts} attempts")
