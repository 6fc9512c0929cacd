"""A service's background task for the length of an ``async with`` body.

Used where a context manager owns a private nursery (the log's writer, the store): the body's
own exception comes back as raised, not wrapped in an ExceptionGroup by that nursery, because
the background task only fails on a bug and callers should not have to know it exists.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine


@asynccontextmanager
async def running_in_background(
    run: Callable[..., Coroutine[Any, Any, None]], stop: Callable[[], None]
) -> AsyncIterator[None]:
    """Start ``run`` with ``nursery.start``; after the body, ``stop()`` makes it return."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            try:
                yield
            finally:
                stop()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
