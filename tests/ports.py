"""Free loopback ports for tests that start real listeners."""

from __future__ import annotations

import random
import socket


def free_port_base(count: int = 7, attempts: int = 200) -> int:
    """A base N such that N .. N+count-1 are all free on 127.0.0.1 right now."""
    for _ in range(attempts):
        base = random.randrange(20000, 32000 - count)  # below the ephemeral range
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no {count} consecutive free loopback ports after {attempts} attempts")
