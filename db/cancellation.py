"""`undone_if_cancelled`, `finished_if_started`: a database operation whose commit a cancellation cannot leave
half-known.

A task cancelled while it awaits a COMMIT's reply does not know whether the server committed: with the reply in
flight, it usually did. For most operations that is harmless (a retry is idempotent), but an operation that takes
something the caller must give back (a conversation's claim, a budget hold) leaves it taken, with nobody to give it
back, until it expires (a claim's lease, a hold's TTL): the user's next turn on the conversation is refused as
concurrent, or the account's budget shows a hold no request has. So such an operation runs to its end in a task of its
own, shielded from the caller's cancellation; when the caller was cancelled meanwhile, what the operation took is
given back, and the cancellation goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar('T')


async def undone_if_cancelled(operation: Coroutine[Any, Any, T], undo: Callable[[T], Awaitable[None]]) -> T:
    """Await `operation` to its end even when the caller is cancelled meanwhile; if it was, `undo(result)` (when the
    operation succeeded, also to its end) and re-raise the cancellation.

    Raises:
        asyncio.CancelledError: the caller was cancelled (after the undo).
        Exception: what `operation` raised.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise  # the operation itself was cancelled: nothing it took is known
        await _to_the_end(task)
        if not task.cancelled() and task.exception() is None:
            await _to_the_end(asyncio.ensure_future(undo(task.result())))
        raise


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


async def _to_the_end(task: asyncio.Future[Any]) -> None:
    """Wait until `task` ends, through any cancellation of the caller meanwhile.

    anyio's cancel scopes (pydantic-ai runs a model request's hooks in one, Starlette a streamed response) cancel a
    task again at every await until the scope exits, so one wait would end at once and the operation would run on
    with nobody to undo it: a shielded scope keeps them out (the loop, without it, spun on their redeliveries).
    A plain asyncio cancellation still reaches the wait; the loop waits on.
    """
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
    if not task.cancelled():
        task.exception()  # retrieved: an undo that failed is the lease's or TTL's to end, not a log line per task
