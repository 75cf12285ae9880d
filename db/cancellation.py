"""`undone_if_cancelled`, `finished_if_started`: a database operation whose commit a cancellation cannot leave
half-known.

A task cancelled while it awaits a COMMIT's reply does not know whether the server committed: with the reply in
flight, it usually did. For most operations that is harmless (a retry is idempotent), but an operation that takes
something the caller must give back (a conversation's claim, a budget hold) leaves it taken, with nobody to give it
back, until it expires (a claim's lease, a hold's TTL): the user's next turn on the conversation is refused as
concurrent, or the account's budget shows a hold no request has. So such an operation runs to its end in a task of its
own, shielded from the caller's cancellation; when the caller was cancelled meanwhile, what the operation took is
given back, and the cancellation goes on.

A server that does not answer holds such an operation for its statement's whole wait (`DB_STATEMENT_TIMEOUT_MS` plus
5 s: 35 s), and the caller's cancellation with it; a caller that cannot wait so long (a turn's start: a Ctrl-C, a
caller's timeout) bounds its wait (`wait_s`): past it the operation runs on in the background, still undone once it
ends, and the cancellation goes on now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar('T')


_left_running: set[asyncio.Future[Any]] = set()
"""The operations (and their undos) a cancelled caller stopped waiting for (`wait_s`), kept referenced until they end:
the event loop holds its tasks only weakly."""


async def undone_if_cancelled(
    operation: Coroutine[Any, Any, T],
    undo: Callable[[T], Awaitable[None]],
    *,
    wait_s: float | None = None,
    left: Callable[[asyncio.Future[Any]], None] | None = None,
) -> T:
    """Await `operation` to its end even when the caller is cancelled meanwhile; if it was, `undo(result)` (when the
    operation succeeded, also to its end) and re-raise the cancellation.

    Args:
        operation: what takes something to give back.
        undo: gives back what a successful `operation` took.
        wait_s: once the caller is cancelled, how long it waits for `operation` to end (None: as long as it runs);
            past it the operation and its undo run on in the background and the cancellation goes on at once.
        left: told the operation's task when the caller stops waiting for it (`wait_s`), for what an operation that
            fails may still have taken (a COMMIT sent to a server that did not answer).

    Raises:
        asyncio.CancelledError: the caller was cancelled (after the undo, or once `wait_s` is over).
        Exception: what `operation` raised.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise  # the operation itself was cancelled: nothing it took is known
        if not await _to_the_end(task, wait_s):
            _undone_when_it_ends(task, undo)
            if left is not None:
                left(task)
            raise
        if not task.cancelled() and task.exception() is None:
            await _to_the_end(asyncio.ensure_future(undo(task.result())))
        raise


def _undone_when_it_ends(task: asyncio.Task[T], undo: Callable[[T], Awaitable[None]]) -> None:
    """Keep `task` running after its caller went, and undo what it took once it ends (when it succeeded)."""
    _left_running.add(task)

    def ended(done: asyncio.Task[T]) -> None:
        _left_running.discard(done)
        if done.cancelled() or done.exception() is not None:  # retrieved: the caller went, nobody reads it
            return
        undoing = asyncio.ensure_future(undo(done.result()))
        _left_running.add(undoing)
        undoing.add_done_callback(_forgotten)

    task.add_done_callback(ended)


def _forgotten(task: asyncio.Future[Any]) -> None:
    _left_running.discard(task)
    if not task.cancelled():
        task.exception()  # an undo that failed is the lease's or TTL's to end, as in `_to_the_end`


async def finished_if_started(operation: Coroutine[Any, Any, T]) -> T:
    """Await `operation` to its end even when the caller is cancelled meanwhile, and return what it returned: once it
    started, what it writes stands, and the caller is told so rather than told it was cancelled.

    For a write the caller cannot undo and must know the fate of (a turn's save: cancelled while its COMMIT's reply
    was in flight, it was saved all the same, and a caller told "cancelled" sent the message again, twice in the
    history and billed twice). A cancellation before it started, or one that finds it failed, goes on as usual: the
    caller's `CancelledError` then still means it wrote nothing.

    Raises:
        asyncio.CancelledError: the caller was cancelled and the operation failed (or was itself cancelled).
        Exception: what `operation` raised, when the caller was not cancelled.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise
        await _to_the_end(task)
        if task.cancelled() or task.exception() is not None:
            raise
        return task.result()


async def _to_the_end(task: asyncio.Future[Any], wait_s: float | None = None) -> bool:
    """Wait until `task` ends (at most `wait_s` seconds when given), through any cancellation of the caller meanwhile;
    whether it ended.

    anyio's cancel scopes (pydantic-ai runs a model request's hooks in one, Starlette a streamed response) cancel a
    task again at every await until the scope exits, so one wait would end at once and the operation would run on
    with nobody to undo it: a shielded scope keeps them out (the loop, without it, spun on their redeliveries).
    A plain asyncio cancellation still reaches the wait; the loop waits on.
    """
    loop = asyncio.get_running_loop()
    deadline = None if wait_s is None else loop.time() + wait_s
    with anyio.CancelScope(shield=True):
        while not task.done():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait([task], timeout=left)
            except asyncio.CancelledError:
                continue
    if not task.cancelled():
        task.exception()  # retrieved: an undo that failed is the lease's or TTL's to end, not a log line per task
    return True
