"""A child forked while the runtime runs (`multiprocessing`'s fork start method, `ProcessPoolExecutor` on Linux, a bare
`os.fork()`) starts a runtime of its own: the state the parent's runtime left in the module globals is forgotten.

What a fork copies is the parent's: its event loop, its pool's connections (the same sockets), its ledger writer, its
supervisor, its claims. The child refused every turn as "in use on another event loop" (the copied loop still said
it was running) and could not shut it down either (QA). Each module that holds such state registers a hook here
(`forget_in_child`) that drops it in the child; the next session there starts the runtime afresh on the child's loop.

What a hook drops is kept alive (`_left_by_parent`), never closed nor collected: a collected asyncpg connection aborts
its transport, which takes the parent's socket out of the epoll set the two processes share (the parent's connection
would then never hear its answers), and libpq (the job queue's psycopg pool) sends the server a goodbye that ends the
parent's session. Kept, the child's copies are only file descriptors, closed when the child exits.

Except the descriptors the parent holds a `flock` on (`close_in_child`): a child's copy kept the parent's lock for as
long as the child lived, so they are closed in the child at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import suppress

_left_by_parent: list[object] = []
"""What the hooks took from the parent's state, in a forked child: kept, never used, until the child exits."""


def forget_in_child(forget: Callable[[], Iterable[object]]) -> None:
    """Run `forget` in each child forked from this process, at once after the fork (before any other code of the
    child runs): it resets its module's state to that of a process whose runtime never started, and returns the
    objects it took out, which are kept alive untouched (the parent still uses what they stand for).

    `forget` must not take a lock another thread of the parent may have held at the fork (that thread does not exist
    in the child, and nothing would release it): it replaces such locks instead.
    """
    os.register_at_fork(after_in_child=lambda: _left_by_parent.extend(forget()))


_closed_in_child: dict[int, Callable[[], None] | None] = {}
"""Descriptors this process holds a `flock` on (by number), each with what forgets it in a forked child."""


def close_in_child(fd: int, forget: Callable[[], None] | None = None) -> None:
    """Have the descriptor `fd` closed in each child forked while it is open here (`close_here` ends that), and
    `forget` called there (to drop the parent's object's number for it).

    For a descriptor this process holds a `flock` on: the lock belongs to the open file, which a fork shares with the
    child, so it stood while any child lived, however long after this process ended. A killed process's journal was
    not replayed while an orphaned `ProcessPoolExecutor` worker lived on (qa189), and a replay lock so kept would have
    said "another replay is running" for as long. Closed in the child, the lock is this process's alone: the child never
    held it, nor unlocks it (closing one of two descriptors of a locked file releases nothing).
    """
    _closed_in_child[fd] = forget


def close_here(fd: int) -> None:
    """Close `fd`, which `close_in_child` named: no longer closed in a child forked from now on.

    Raises:
        OSError: closing it failed (it is not named any more all the same).
    """
    # Before the close: the number, once closed, may be another file's by the time a child would close it.
    _closed_in_child.pop(fd, None)
    os.close(fd)


def _closed_after_fork() -> None:
    for fd, forget in list(_closed_in_child.items()):
        with suppress(OSError):
            os.close(fd)
        if forget is not None:
            forget()
    _closed_in_child.clear()


os.register_at_fork(after_in_child=_closed_after_fork)
