"""A large conversation read's CPU work (its messages validated, dumped, encoded) off the event loop, in pieces.

One event loop serves every chat of a server process: a whole conversation of several hundred turns is megabytes of
JSON, and validating or dumping it on the loop held every other request for up to a second. The work runs in a
worker thread instead; but pydantic-core keeps the GIL for the whole of one call, so one call over the whole
conversation would still hold the loop out for most of its time. Each call takes a piece of at most `CHUNK_CHARS`
of JSON (milliseconds), and the loop gets the GIL back between two pieces.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from agentrt.services.thread_pools import ProcessThreadPool

T = TypeVar('T')
V = TypeVar('V')

READ_THREADS = 2
"""Reads made side by side: the work is CPU under the GIL, so more threads would only queue for it."""
CHUNK_CHARS = 64 * 1024
"""At most this much stored JSON per call into pydantic-core (a message larger than this is a piece alone)."""

_READERS = ProcessThreadPool(READ_THREADS, 'agentrt-conversation-read')


async def off_loop(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a worker thread of the conversation reads' own pool; its result.

    A pool of its own, not the loop's default executor: a burst of reads of long conversations must not hold up the
    other users of `asyncio.to_thread` (titles, the ledger's spool).
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_READERS.executor(), functools.partial(function, *args))


async def off_loop_taking(function: Callable[[V], T], value: V) -> T:
    """`function(value)` in a worker thread as `off_loop`, with the only reference to `value` taken along, so that a
    large value is freed there, not on the event loop (a whole conversation's messages take tens of milliseconds to
    free). The caller keeps no reference of its own: `coroutine = off_loop_taking(f, page); del page; await coroutine`.
    """
    box = [value]
    del value
    return await off_loop(_call_taking, function, box)


def _call_taking(function: Callable[[V], T], box: list[V]) -> T:
    return function(box.pop())


def pieces(sizes: Sequence[int], limit: int | None = None) -> Iterator[slice]:
    """Consecutive slices of `sizes`' indexes, each of at most `limit` (default `CHUNK_CHARS`) in total, or one item
    larger than that alone; none for no items."""
    limit = CHUNK_CHARS if limit is None else limit
    start, total = 0, 0
    for n, size in enumerate(sizes):
        if n > start and total + size > limit:
            yield slice(start, n)
            start, total = n, 0
        total += size
    if start < len(sizes):
        yield slice(start, len(sizes))
