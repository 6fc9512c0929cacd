"""What the real-server harnesses (Prosody, ejabberd) share: loopback, stopping a server process,
and telling whether it listens yet."""

from __future__ import annotations

import signal
from typing import Final

import trio

LOOPBACK: Final = "127.0.0.1"
#: A server gets this long to stop on SIGTERM, then it is killed (and waited for this long).
STOP_GRACE_S: Final = 5.0
KILL_WAIT_S: Final = 2.0


async def stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL if it has not gone after `STOP_GRACE_S`."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE_S):
        await process.wait()
        return
    process.kill()
    with trio.move_on_after(KILL_WAIT_S):
        await process.wait()


async def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port`` now."""
    try:
        stream = await trio.open_tcp_stream(LOOPBACK, port)
    except OSError:
        return False
    await stream.aclose()
    return True
