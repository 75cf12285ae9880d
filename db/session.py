"""`get_db_session()`: one short-lived `AsyncSession` per operation, the only way code gets a session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Executable, text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.engine import get_sessionmaker
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.failures import pooler_error, unavailable_error

T = TypeVar('T')

logger = logging.getLogger('agentrt.db')


@asynccontextmanager
async def get_db_session() -> AsyncIterator[AsyncSession]:
    """Open a session in a transaction that commits on clean exit and rolls back otherwise.

    The transaction is rolled back on an exception or a cancellation, and the session is always
    closed so its connection returns to the pool. Every call gets its own session, so it is safe to
    call from many tasks at once; never share the yielded session between tasks.

    Yields:
        An `AsyncSession` bound to the process-wide engine.

    Raises:
        DatabaseDisconnectedError: the connection was lost while the block used it (restart, failover, killed
            backend); nothing of the block was committed, or the outcome of the commit is unknown.
        DatabaseUnavailableError: no connection could be made (server down or starting, pool exhausted).
        ConfigError: a prepared statement vanished behind a pooler (`DB_STATEMENT_CACHE=false` fixes it).
    """
    session = get_sessionmaker()()
    try:
        yield session
        await session.commit()
    except BaseException as exc:
        await _finish(session.rollback(), 'rollback')
        translated = pooler_error(exc) or unavailable_error(exc)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise
    finally:
        await _finish(session.close(), 'close')


@asynccontextmanager
async def get_read_only_session() -> AsyncIterator[AsyncSession]:
    """Like `get_db_session()`, inside a `READ ONLY` transaction: for tools that only read.

    A connection found broken by the first statement (a server restarted since it was last used) is replaced and
    the transaction started again, once: nothing had been read yet.
    """
    async with _session_with_setup(text('SET TRANSACTION READ ONLY'), {}) as session:
        yield session


@asynccontextmanager
async def get_side_session(
    *, lock_timeout_ms: int = 2000, statement_timeout_ms: int = 5000
) -> AsyncIterator[AsyncSession]:
    """A session for independent writers (billing, audit, background work) with tight timeouts.

    The timeouts are transaction-local, so a side write can never wait forever on a lock its own
    caller holds in another session (PostgreSQL cannot see that deadlock). Like `get_read_only_session()`, a
    connection found broken by that first statement is replaced once.
    """
    setup = text("SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :stmt, true)")
    params = {'lock': f'{int(lock_timeout_ms)}ms', 'stmt': f'{int(statement_timeout_ms)}ms'}
    async with _session_with_setup(setup, params) as session:
        yield session


@asynccontextmanager
async def _session_with_setup(setup: Executable, params: dict[str, Any]) -> AsyncIterator[AsyncSession]:
    for attempt in (1, 2):
        set_up = False
        try:
            async with get_db_session() as session:
                await session.execute(setup, params)
                set_up = True
                yield session
                return
        except DatabaseDisconnectedError:
            if set_up or attempt == 2:
                raise
            logger.info('a pooled connection was found broken; starting the transaction again on a fresh one')


async def retry_on_disconnect(operation: Callable[[], Awaitable[T]], *, what: str = 'database operation') -> T:
    """Run `operation`; if the connection is lost under it, run it once more, on a fresh connection.

    For operations that are safe to repeat: reads (tenant lookups, conversation loads) and writes whose retry is
    guarded (a compare-and-swap on a revision minted for the write). The operation opens its own session, and
    returns its result only when it is complete, so nothing of a failed attempt was used. After a lost connection
    the pool tests every connection of that generation before handing it out (`PoolHealth`), so the second attempt
    never gets another dead one. A server that is down fails the second attempt at once: no waiting.

    Raises:
        DatabaseDisconnectedError: the connection was lost twice.
        DatabaseUnavailableError: the server cannot be reached.
    """
    try:
        return await operation()
    except DatabaseDisconnectedError as exc:
        logger.info('%s: %s; repeating it on a fresh connection', what, exc)
    return await operation()


async def _finish(cleanup: Awaitable[None], what: str) -> None:
    """Run a rollback or close to completion even if this task is cancelled again meanwhile.

    Without the shield a second cancellation (a timeout, a task group tearing down) would abandon the
    cleanup halfway and leave the connection checked out. A failing cleanup is logged, not raised, so
    the caller sees the error that caused it (a broken connection is invalidated by SQLAlchemy).
    """
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        _log_failure(task, what)
        raise
    except Exception:
        _log_failure(task, what)


def _log_failure(task: asyncio.Future[None], what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning('session %s failed: %r', what, task.exception())
