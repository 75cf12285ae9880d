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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

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
