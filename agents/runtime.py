"""Process lifecycle for programs embedding the runtime: tracing set-up and a clean shutdown.

`async with agentrt_runtime():` does both around a block; `configure_observability()` (from
`agentrt.agents.observability`: spans go nowhere unless the environment asks) and `shutdown_runtime()` are the two
halves for programs that manage their own lifecycle (a web server's start-up and shutdown hooks). `runtime_block()` is
the count both `agentrt_runtime()` and `create_app()`'s lifespan take part in: the last block open shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from agentrt.agents.observability import configure_observability, flush_spans
from agentrt.agents.turns_in_progress import turns_ended
from agentrt.db.engine import check_event_loop, close_database, init_database
from agentrt.db.errors import check_seconds
from agentrt.services.background import drain_supervisor
from agentrt.services.conversations import claims_released
from agentrt.services.ledger import LLMRequestTracker, existing_request_tracker

__all__ = ['agentrt_runtime', 'configure_observability', 'runtime_block', 'shutdown_runtime']

logger = logging.getLogger('agentrt.ledger')
turns_logger = logging.getLogger('agentrt.conversations')  # beside `claims_released`'s line of the turns holding one


@dataclass
class _OpenBlocks:
    """The blocks open on one event loop (`runtime_block`)."""

    count: int = 0
    release_embedded_server: bool = False
    """One of them asked to let go of the embedded server at the end: a server's lifespan, whose process a signal
    ends (no exit hook), so the last block does it whichever it is."""


_open_blocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _OpenBlocks] = weakref.WeakKeyDictionary()
"""`runtime_block()`s open (`agentrt_runtime()`, `create_app()`'s lifespan), by event loop: the last to end shuts the
runtime down."""


async def shutdown_runtime(
    timeout: float = 10.0,  # noqa: ASYNC109 - a budget for draining, not a wait
    *,
    release_embedded_server: bool = False,
) -> None:
    """Let the chat turns of this event loop still in progress finish (those still starting too, not yet holding
    their conversation: a task created just before this call) and release their conversations, finish background work,
    flush the ledger, close the pool and send the spans still buffered; call it once before the event loop ends.

    Args:
        timeout: seconds for the whole clean-up: turns still running end (then their conversations stay claimed
            until their leases expire, or for a turn on this host until the process has ended; a release the database
            does not answer is not retried in the background), background tasks finish before they are cancelled, and
            the ledger's flush (given at least `LEDGER_CLOSE_SECONDS`; what a database that does not answer leaves
            unwritten stays in the journal for the next start).
        release_embedded_server: also let go of the embedded PostgreSQL now (the last process using it stops it),
            for a process that may end by a signal rather than a normal exit (a uvicorn server or worker).

    Raises:
        InvalidInputError: `timeout` is not a finite number of seconds, 0 or more (nothing is shut down).
        ConfigError: the runtime is in use on another event loop, running in another thread (nothing is shut down).
    """
    check_seconds(timeout, 'timeout')
    # The runtime of another thread's running event loop is not this loop's to shut down: its pool, ledger writer
    # and claims work on that loop.
    check_event_loop()
    # One budget for the whole clean-up: turns ending, background work, the ledger's flush (each took `timeout` of its
    # own: a frozen database held serve's stop 3 x 10 s past its --shutdown-seconds; QA).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Turns first, before the pool closes under them: those still starting (a task created just before this call,
    # before its claim: it was cancelled by the loop's end, its conversation left claimed; QA), those running, those
    # ending (a server's requests cancelled as it stops); then their claims released, their cancelled requests
    # handed to the ledger.
    await asyncio.sleep(0)  # a turn's task created just before this call takes its first step: it counts from there
    running = await turns_ended(max(deadline - loop.time(), 0.0))
    holding = await claims_released(max(deadline - loop.time(), 0.0))  # says those holding their conversations
    if running > holding:  # the others were still starting (the database, admission, their claims): said here
        turns_logger.warning(
            '%d turn(s) still starting at shutdown (a database that does not answer?); cut off when the event loop '
            'ends: a conversation one of them claims meanwhile stays claimed until its lease expires, or until this '
            'process has ended for a turn on this host',
            running - holding,
        )
    await drain_supervisor(max(deadline - loop.time(), 0.0))
    if 'agentrt.services.jobs' in sys.modules:  # the queue was used (AGENTRT_BACKGROUND=queue): close its pool
        await sys.modules['agentrt.services.jobs'].close_queue()
    # Never made here: making it reads the settings, and invalid ones raised again, from the `finally` of
    # `agentrt_runtime` whose start they had failed, as if the shutdown had failed.
    if (tracker := existing_request_tracker()) is not None:
        await _ledger_closed(tracker, max(deadline - loop.time(), LEDGER_CLOSE_SECONDS))
    await close_database(release_embedded_server=release_embedded_server)
    await flush_spans()


LEDGER_CLOSE_SECONDS = 2.0
"""The least time the ledger's flush is given at a stop, whatever is left of `timeout` (a flush takes milliseconds
when the database answers: `timeout=0`, no wait for turns, must not leave every held row to the next start)."""


async def _ledger_closed(tracker: LLMRequestTracker, seconds: float) -> None:
    """Flush the ledger, for at most `seconds` more: a database that does not answer (frozen, not down) held
    a server's stop 75-150 s in the writer's retries, past any process manager's patience (QA). What is not written
    by then stays in the process's journal of held rows, which the next start (or `agentrt ledger replay`) writes; rows
    held in memory because the spool refused them too (a full disk) are reported lost, each logged (`aclose`)."""
    try:
        async with asyncio.timeout(seconds):
            await tracker.aclose()
    except TimeoutError:
        logger.warning(
            'ledger: rows not written within %g s of the stop (the database does not answer); they stay in the '
            'journal beside the spool, written by the next start or `agentrt ledger replay`',
            seconds,
        )


@asynccontextmanager
async def agentrt_runtime(*, shutdown_timeout: float = 10.0) -> AsyncIterator[None]:
    """Run a block with the runtime up: tracing configured (`configure_observability()`), the database started
    (and migrated if behind).

    On the way out, even after an error, the runtime is shut down as `shutdown_runtime()` does: background work
    drained, the ledger flushed, the pool closed. Use it around the part of a program that chats. Blocks may nest or
    overlap on one event loop (a library's helper inside an application's block, a `create_app()` lifespan run
    inside one or around one: `runtime_block()`): the runtime is shut down when the last of them ends, not under the
    others.

    Args:
        shutdown_timeout: seconds for the clean-up at the end, as `shutdown_runtime`'s `timeout`.

    Raises:
        InvalidInputError: `shutdown_timeout` is not a finite number of seconds, 0 or more (nothing was started).
        ConfigError: a setting is invalid, or the runtime is in use on another event loop running in another thread.
        DatabaseUnavailableError, EmbeddedPostgresError: no database.
    """
    check_seconds(shutdown_timeout, 'shutdown_timeout')  # at the start: it failed only at the end, the work done
    configure_observability()
    async with runtime_block(shutdown_timeout=shutdown_timeout):
        await init_database()
        yield


@asynccontextmanager
async def runtime_block(
    *, shutdown_timeout: float = 10.0, release_embedded_server: bool = False
) -> AsyncIterator[None]:
    """Count a block among those the runtime is up for on this event loop; the last of them to end, even by an
    error, shuts the runtime down (`shutdown_runtime()`). Starts nothing: the block starts the runtime its own way.

    `agentrt_runtime()` is one; so is `create_app()`'s lifespan, so a program may run the app's lifespan inside an
    `agentrt_runtime()` block of its own, or the other way round, and keep the runtime up to the end of the outer one.

    Args:
        shutdown_timeout: seconds for the clean-up, when this block is the last to end (`shutdown_runtime`'s
            `timeout`).
        release_embedded_server: let go of the embedded PostgreSQL at the end of the last block, whichever it is
            (`shutdown_runtime`'s argument): for a server's lifespan, whose process a signal ends.

    Raises:
        InvalidInputError: `shutdown_timeout` is not a finite number of seconds, 0 or more (nothing counted).
        ConfigError: the runtime is in use on another event loop running in another thread (nothing counted).
    """
    check_seconds(shutdown_timeout, 'shutdown_timeout')
    check_event_loop()  # refused before the `finally` below would shut down another thread's runtime
    loop = asyncio.get_running_loop()
    blocks = _open_blocks.setdefault(loop, _OpenBlocks())
    blocks.count += 1
    blocks.release_embedded_server |= release_embedded_server
    try:
        yield
    finally:
        # A nested block's end shut the runtime down under the block around it: its sessions then failed while its
        # turns quietly started the runtime again (QA); so did the end of a `create_app()` lifespan run inside an
        # `agentrt_runtime()` block (QA).
        blocks.count -= 1
        if not blocks.count:
            del _open_blocks[loop]
            await shutdown_runtime(shutdown_timeout, release_embedded_server=blocks.release_embedded_server)
