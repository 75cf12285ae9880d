"""`get_db_session()`: one short-lived `AsyncSession` per operation, the only way code gets a session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.engine import get_sessionmaker

logger = logging.getLogger('agentrt.db')


@asynccontextmanager
async def get_db_session() -> AsyncIterator[AsyncSession]:
    """Open a session in a transaction that commits on clean exit and rolls back otherwise.

    The transaction is rolled back on an exception or a cancellation, and the session is always
    closed so its connection returns to the pool. Every call gets its own session, so it is safe to
    call from many tasks at once; never share the yielded session between tasks.

    Yields:
        An `AsyncSession` bound to the process-wide engine.
    """
    session = get_sessionmaker()()
    try:
        yield session
        await session.commit()
    except BaseException:
        await _finish(session.rollback(), 'rollback')
        raise
    finally:
        await _finish(session.close(), 'close')


@asynccontextmanager
async def get_read_only_session() -> AsyncIterator[AsyncSession]:
    """Like `get_db_session()`, inside a `READ ONLY` transaction: for tools that only read."""
    async with get_db_session() as session:
        await session.execute(text('SET TRANSACTION READ ONLY'))
        yield session


@asynccontextmanager
async def get_side_session(
    *, lock_timeout_ms: int = 2000, statement_timeout_ms: int = 5000
) -> AsyncIterator[AsyncSession]:
    """A session for independent writers (billing, audit, background work) with tight timeouts.

    The timeouts are transaction-local, so a side write can never wait forever on a lock its own
    caller holds in another session (PostgreSQL cannot see that deadlock).
    """
    async with get_db_session() as session:
        await session.execute(
            text("SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :stmt, true)"),
            {'lock': f'{int(lock_timeout_ms)}ms', 'stmt': f'{int(statement_timeout_ms)}ms'},
        )
        yield session


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
