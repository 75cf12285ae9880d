"""`LockPerLoop`: an `asyncio.Lock` for each event loop, for the module-level locks of a process that may run several.

An `asyncio.Lock` binds itself to the first event loop that waits on it: one lock for the whole process failed the
waiters of the next `asyncio.run` ("is bound to a different event loop"). Each loop gets its own lock instead, made
at its first use and dropped with the loop.
"""

from __future__ import annotations

import asyncio
import weakref


class LockPerLoop:
    """Call it (`async with lock():`) for the running event loop's lock."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def __call__(self) -> asyncio.Lock:
        """The running loop's lock, made if it has none yet."""
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock
