"""The chat turns started on each event loop and not ended yet, claim or not: what `shutdown_runtime()` waits for.

A turn in a task of its own created just before the shutdown is still starting (the database, admission, its claim):
waiting only for turns holding a claim (`claims_released`) let the runtime shut down under it, and the end of
`asyncio.run` cancel it, its conversation left claimed (QA). A turn counts from the first step of `open_turn` to the
end of its block: a counter, nothing more on a turn's path.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from agentrt.db.forks import forget_in_child


class _Turns:
    """One event loop's turns in progress, and the events of those waiting for none to be left."""

    def __init__(self) -> None:
        self.count = 0
        self.waiters: list[asyncio.Event] = []


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = weakref.WeakKeyDictionary()


@contextmanager
def turn_in_progress() -> Iterator[None]:
    """Count a turn of the running event loop while the block runs (however it ends)."""
    loop = asyncio.get_running_loop()
    turns = _by_loop.get(loop)
    if turns is None:
        turns = _by_loop[loop] = _Turns()
    turns.count += 1
    try:
        yield
    finally:
        turns.count -= 1
        if not turns.count:
            for waiter in turns.waiters:
                waiter.set()


async def turns_ended(timeout: float) -> int:  # noqa: ASYNC109 - a budget for the turns ending
    """Wait until no turn of this event loop is in progress, at most `timeout` seconds.

    Returns:
        How many are still in progress (0 when all ended in time).
    """
    turns = _by_loop.get(asyncio.get_running_loop())
    if turns is None or not turns.count:
        return 0
    waiter = asyncio.Event()
    turns.waiters.append(waiter)
    try:
        await asyncio.wait_for(waiter.wait(), timeout)
    except TimeoutError:
        pass
    finally:
        turns.waiters.remove(waiter)
    return turns.count


def _forget_the_parents() -> list[object]:
    """In a forked child, the turns in progress are the parent's: the child's shutdown must not wait for them."""
    global _by_loop
    left, _by_loop = _by_loop, weakref.WeakKeyDictionary()
    return [left]


forget_in_child(_forget_the_parents)
