"""The ledger's database writes: idempotent inserts of rows and contents, and the settlement of their budget holds,
in one statement of a side transaction (the driver connection by default, `LLMRequestTracker`; a session or a Core
connection works too).

The statement is compiled once to the driver's SQL (`DriverStatement`) and run on the asyncpg connection of a pooled
connection (`driver_transaction`) with one array parameter per column: no ORM session, no SQLAlchemy statement or
result machinery per batch (issue 20: about 0.7 ms of the client's CPU a write on a Core connection), with the same
prelude, statement events, error translation and disconnect handling as a session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, TextClause, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from agentrt.db.driver import DriverStatement, DriverTransaction
from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.services.budgets import SETTLED_COLUMNS, settlement_ctes
from agentrt.services.ledger._record import ROW_FIELDS
from agentrt.services.ledger._retry import is_transient_db_error

logger = logging.getLogger('agentrt.ledger')

SessionFactory = Callable[[], AbstractAsyncContextManager[DriverTransaction | AsyncSession | AsyncConnection]]
"""Opens the writer's transaction, committed when the block ends cleanly: a `driver_transaction()` (the tracker's
own), a session or a Core connection."""

_REQUESTS = cast(Table, LLMRequestRow.__table__)
_CONTENTS = cast(Table, LLMRequestContentRow.__table__)
CONTENT_COLUMNS = ('request_id', 'kind', 'body', 'size_bytes', 'truncated', 'redactions')


def _columns(table: Table, names: tuple[str, ...], prefix: str) -> str:
    """`unnest`'s arguments: one array parameter per column, cast to the column's type."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialects are untyped
    return ', '.join(f'CAST(:{prefix}{name} AS {table.c[name].type.compile(dialect)}[])' for name in names)


_INSERT_CONTENTS = f"""INSERT INTO llm_request_contents ({', '.join(CONTENT_COLUMNS)})
    SELECT * FROM unnest({_columns(_CONTENTS, CONTENT_COLUMNS, 'c_')})
    ON CONFLICT (request_id, kind) DO NOTHING"""


def _write_statement(*, settle: bool) -> TextClause:
    """Insert the rows and their contents, each with `ON CONFLICT DO NOTHING`, and (with `settle`) settle the budget
    holds of the rows that were new; the number of new rows. One round trip whatever the number of rows: each column
    is one array parameter (so the text, and the server's prepared statement, are the same for every batch).

    The contents' foreign key is checked at the end of the statement, when the rows are in.
    """
    return text(f"""
WITH new AS (
    INSERT INTO llm_requests ({', '.join(ROW_FIELDS)})
    SELECT * FROM unnest({_columns(_REQUESTS, ROW_FIELDS, 'r_')})
    ON CONFLICT (id) DO NOTHING
    RETURNING {', '.join(SETTLED_COLUMNS)}
), contents AS (
    {_INSERT_CONTENTS}
){settlement_ctes('new') if settle else ''}
SELECT count(*) FROM new
""")


@dataclass(frozen=True)
class _Write:
    """A write statement: as SQLAlchemy runs it (a session or a Core connection) and as the driver runs it."""

    statement: TextClause
    driver: DriverStatement

    @classmethod
    def of(cls, statement: TextClause) -> _Write:
        """`statement`, and its compilation for the driver (once)."""
        return cls(statement, DriverStatement.of(statement))

    async def run(self, opened: DriverTransaction | AsyncSession | AsyncConnection, params: dict[str, Any]) -> int:
        """Run it in the transaction `opened` with `params` (by name); its one value (how many rows were new)."""
        if isinstance(opened, DriverTransaction):
            return int((await opened.fetch(self.driver, params))[0][0])
        return int((await opened.execute(self.statement, params)).scalar_one())


WRITE_AND_SETTLE = _Write.of(_write_statement(settle=True))
WRITE = _Write.of(_write_statement(settle=False))
INSERT_CONTENTS = _Write.of(text(f'WITH contents AS ({_INSERT_CONTENTS} RETURNING 1) SELECT count(*) FROM contents'))
_ROW_PARAMS = tuple((f'r_{name}', name) for name in ROW_FIELDS)
_CONTENT_PARAMS = tuple((f'c_{name}', name) for name in CONTENT_COLUMNS)


def database_unavailable(exc: BaseException) -> bool:
    """True when a write failed because the database cannot be reached (now): spool it, don't drop it."""
    return is_transient_db_error(exc) or isinstance(exc, DatabaseNotInitializedError)


async def insert_contents(session_factory: SessionFactory, contents: list[dict[str, Any]]) -> int:
    """Insert content rows (`ON CONFLICT DO NOTHING`) in one transaction of `session_factory` (the spool's replay,
    after their ledger rows); how many were new."""
    async with session_factory() as opened:
        return await INSERT_CONTENTS.run(opened, _content_params(contents))


async def write_ledger_rows(
    session_factory: SessionFactory, rows: list[dict[str, Any]], contents: list[dict[str, Any]] | None = None
) -> int:
    """In one statement of a transaction of `session_factory`: insert `rows` and `contents` (`ON CONFLICT DO
    NOTHING`), and settle the budget holds of the rows that were new (`settlement_ctes`).

    A row is new exactly once, so a retried write or a replayed spool line settles nothing twice. If the statement
    fails for a reason other than the database being unavailable, it is tried once without settling: when that
    works, settling was the problem (a bug), the rows are written without it and the error is logged, since a billing
    row is never lost to its budget (its hold is released by the sweeper when it expires); when it fails too, the
    rows (or contents) were, and that error is raised.

    Returns:
        How many rows were new (the rest were already there).
    """
    if not rows:
        return 0
    try:
        return await _write(session_factory, WRITE_AND_SETTLE, rows, contents or [])
    except Exception as exc:
        if database_unavailable(exc):
            raise
        settle_error = exc
    new = await _write(session_factory, WRITE, rows, contents or [])
    logger.error('ledger: budget holds of %d row(s) not settled; written without', len(rows), exc_info=settle_error)
    return new


def _content_params(contents: list[dict[str, Any]]) -> dict[str, Any]:
    return {param: [content[name] for content in contents] for param, name in _CONTENT_PARAMS}


async def _write(
    session_factory: SessionFactory, statement: _Write, rows: list[dict[str, Any]], contents: list[dict[str, Any]]
) -> int:
    params = {param: [row[name] for row in rows] for param, name in _ROW_PARAMS}
    params.update(_content_params(contents))
    async with session_factory() as opened:
        return await statement.run(opened, params)
