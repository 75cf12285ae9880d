"""The ledger's database writes: idempotent inserts of rows and contents, and the settlement of their budget holds,
in side-session transactions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.services.budgets import settle_ledger_rows
from agentrt.services.ledger._retry import is_transient_db_error

logger = logging.getLogger('agentrt.ledger')

SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]

# Core inserts on the tables (the ORM types `__table__` as a plain FromClause), executed with lists of row dicts.
LEDGER_INSERT = pg_insert(cast(Table, LLMRequestRow.__table__)).on_conflict_do_nothing(index_elements=['id'])
# The rows that were new: only those settle their budget holds.
LEDGER_RETURNING = LEDGER_INSERT.returning(LLMRequestRow.id, LLMRequestRow.account_id)
CONTENT_INSERT = pg_insert(cast(Table, LLMRequestContentRow.__table__)).on_conflict_do_nothing(
    index_elements=['request_id', 'kind']
)


def database_unavailable(exc: BaseException) -> bool:
    """True when a write failed because the database cannot be reached (now): spool it, don't drop it."""
    return is_transient_db_error(exc) or isinstance(exc, DatabaseNotInitializedError)


async def insert_rows(session_factory: SessionFactory, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Execute an `INSERT ... ON CONFLICT DO NOTHING` for `rows` in one side-session transaction."""
    async with session_factory() as session:
        await session.execute(statement, rows)


async def write_ledger_rows(
    session_factory: SessionFactory, rows: list[dict[str, Any]], contents: list[dict[str, Any]] | None = None
) -> int:
    """In one side-session transaction: insert `rows` (`ON CONFLICT DO NOTHING`), then `contents`, then settle the
    budget holds of the rows that were new (`settle_ledger_rows`, last, so window rows are locked only briefly).

    A row is new exactly once, so a retried write or a replayed spool line settles nothing twice. If settling fails
    for a reason other than the database being unavailable (a bug), the rows are written without it and the error
    is logged: a billing row is never lost to its budget (its hold is released by the sweeper when it expires).

    Returns:
        How many rows were new (the rest were already there).
    """
    try:
        return await _write(session_factory, rows, contents or [], settle=True)
    except _SettleFailed as failed:
        logger.error('ledger: budget holds of %d row(s) not settled; writing them without', len(rows), exc_info=failed)
        return await _write(session_factory, rows, contents or [], settle=False)


class _SettleFailed(Exception):
    """Settling failed inside the write (not because the database is unavailable)."""


async def _write(
    session_factory: SessionFactory, rows: list[dict[str, Any]], contents: list[dict[str, Any]], *, settle: bool
) -> int:
    if not rows:
        return 0
    async with session_factory() as session:
        result = await session.execute(LEDGER_RETURNING, rows)
        new = [(row.id, row.account_id) for row in result]
        if contents:
            await session.execute(CONTENT_INSERT, contents)
        billable = [request_id for request_id, account_id in new if account_id is not None]
        if settle and billable:
            try:
                await settle_ledger_rows(session, billable)
            except Exception as exc:
                if database_unavailable(exc):
                    raise
                raise _SettleFailed(f'{type(exc).__name__}: {exc}') from exc
        return len(new)
