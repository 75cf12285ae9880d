"""The ledger's database writes: idempotent inserts of rows and contents in side-session transactions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.services.ledger._retry import is_transient_db_error

SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]

# Core inserts on the tables (the ORM types `__table__` as a plain FromClause), executed with lists of row dicts.
LEDGER_INSERT = pg_insert(cast(Table, LLMRequestRow.__table__)).on_conflict_do_nothing(index_elements=['id'])
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


async def insert_together(session_factory: SessionFactory, inserts: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    """Execute several `INSERT ... ON CONFLICT DO NOTHING` (statement, rows) in one side-session transaction, in
    order (ledger rows before the contents that reference them); empty row lists are skipped."""
    async with session_factory() as session:
        for statement, rows in inserts:
            if rows:
                await session.execute(statement, rows)


async def insert_ledger_counting(session_factory: SessionFactory, rows: list[dict[str, Any]]) -> int:
    """Insert ledger rows and return how many were new (the rest were already there)."""
    if not rows:
        return 0
    async with session_factory() as session:
        result = await session.execute(LEDGER_INSERT.values(rows).returning(LLMRequestRow.id))
        return len(result.all())
