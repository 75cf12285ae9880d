"""`get_db_session()`: one short-lived `AsyncSession` per operation, the only way code gets a session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.engine import get_sessionmaker
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.failures import pooler_error, unavailable_error
from agentrt.db.transaction_setup import SETUP_KEY, RetryingSession, TransactionSetup

T = TypeVar('T')

logger = logging.getLogger('agentrt.db')


@asynccontextmanager
async def get_db_session(*, setup: TransactionSetup | None = None) -> AsyncIterator[AsyncSession]:
    """Open a session in a transaction that commits on clean exit and rolls back otherwise.

    The transaction is rolled back on an exception or a cancellation, and the session is always
    closed so its connection returns to the pool. Every call gets its own session, so it is safe to
    call from many tasks at once; never share the yielded session between tasks.

    Args:
        setup: what the transaction sets before its first statement (read-only, timeouts), sent with its BEGIN: no
            extra round trip. A session with a setup also repeats its first statement once on a fresh connection
            when the pooled one was broken (`RetryingSession`).

    Yields:
        An `AsyncSession` bound to the process-wide engine.

    Raises:
        DatabaseDisconnectedError: the connection was lost while the block used it (restart, failover, killed
            backend); nothing of the block was committed, or the outcome of the commit is unknown.
        DatabaseUnavailableError: no connection could be made (server down or starting, pool exhausted).
        ConfigError: a prepared statement vanished behind a pooler (`DB_STATEMENT_CACHE=false` fixes it).
    """
    session = get_sessionmaker()()
    if setup is not None:
        session.info[SETUP_KEY] = setup
        if isinstance(session, RetryingSession):
            session.retry_first_statement = True
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


_READ_ONLY = TransactionSetup(read_only=True)


@asynccontextmanager
async def get_read_only_session() -> AsyncIterator[AsyncSession]:
    """Like `get_db_session()`, inside a `READ ONLY` transaction: for tools that only read.

    The read-only mode rides on the transaction's BEGIN (no extra round trip). A connection found broken by the
    first statement (a server restarted since it was last used) is replaced and the statement run again, once:
    nothing had been read yet.
    """
    async with get_db_session(setup=_READ_ONLY) as session:
        yield session


@asynccontextmanager
async def get_side_session(
    *, lock_timeout_ms: int = 2000, statement_timeout_ms: int = 5000
) -> AsyncIterator[AsyncSession]:
    """A session for independent writers (billing, audit, background work) with tight timeouts.

    The timeouts are transaction-local, so a side write can never wait forever on a lock its own
    caller holds in another session (PostgreSQL cannot see that deadlock); they ride on the transaction's BEGIN.
    Like `get_read_only_session()`, a connection found broken by the first statement is replaced once.
    """
    setup = TransactionSetup(lock_timeout_ms=int(lock_timeout_ms), statement_timeout_ms=int(statement_timeout_ms))
    async with get_db_session(setup=setup) as session:
        yield session


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
