"""`driver_transaction()`: a hot path's few statements on the asyncpg connection under a pooled connection.

An `AsyncSession` costs the client about 0.5 ms of CPU per transaction, a Core connection about 0.45, the asyncpg
connection underneath about 0.3 (issue 20, `micro_tx.py`): the difference is SQLAlchemy's statement and result
machinery, which a turn's start and save and the ledger writer (a handful of fixed statements) do not need. What they
must keep is kept here:

- the connection comes from the engine's pool (its checkout events, `PoolHealth`'s pings);
- the transaction's role, tenant and prelude ride on its BEGIN, as for a session (`scoped_setup`, `PreludeConnection`);
- statements are prepared once per connection by asyncpg's statement cache (off in the pooler mode, as for sessions);
- SQLAlchemy's cursor events fire for each statement (statement counters, tracing spans), as if it had run them, and
  a failed statement goes to its `handle_error` listeners instead of `after_cursor_execute`, as SQLAlchemy does (a
  tracing span ends with an error status);
- failures are translated as a session's are (`translated_error`); a lost connection, one out of step with its server
  or with a prepared statement lost behind a pooler, or one whose server did not answer within the client's wait
  (`StatementNotAnswered`), is invalidated and reported to `PoolHealth`, so the pool tests its other connections
  before handing them out (a `retry_on_disconnect` gets a working one);
- the transaction always ends here (COMMIT, ROLLBACK, or the connection discarded): the pool never gets it back open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ClauseElement
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.base import ExceptionContextImpl
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util.concurrency import greenlet_spawn

from agentrt.db.engine import get_engine
from agentrt.db.failures import StatementNotAnswered, lost_connection, out_of_step
from agentrt.db.roles import Account
from agentrt.db.session import scoped_setup, translated_error
from agentrt.db.transaction_setup import PreludeConnection, TransactionSetup

__all__ = ['DriverStatement', 'DriverTransaction', 'driver_transaction']

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialects are untyped


@dataclass(frozen=True)
class DriverStatement:
    """A statement compiled once for the asyncpg driver: its SQL (`$1`...) and its parameters' names, in order.

    Built from a SQLAlchemy statement (`text()` or a `select()`), so the SQL is the one a session would send; values
    the statement carries itself (literals bound by SQLAlchemy) are kept as defaults.
    """

    sql: str
    names: tuple[str, ...]
    defaults: tuple[Any, ...]

    @classmethod
    def of(cls, statement: ClauseElement) -> DriverStatement:
        """Compile `statement` for asyncpg (numbered parameters; a name used twice is one parameter)."""
        compiled: Any = statement.compile(dialect=_DIALECT)  # a SQLCompiler: `positiontup` is its own
        names = tuple(compiled.positiontup or ())
        binds, values = compiled.binds, compiled.params  # by the names `positiontup` uses
        defaults = tuple(_REQUIRED if binds[name].required else values.get(name) for name in names)
        return cls(str(compiled), names, defaults)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for `params` (by name; a name not given takes the statement's own value).

        Raises:
            KeyError: a parameter the statement has no value of its own for is missing (as a session refuses it).
        """
        args = [params.get(name, default) for name, default in zip(self.names, self.defaults, strict=True)]
        if _REQUIRED in args:
            missing = [name for name, arg in zip(self.names, args, strict=True) if arg is _REQUIRED]
            raise KeyError(f'no value for the parameters {missing} of the statement {self.sql[:80]!r}')
        return args


_REQUIRED: Any = object()
"""A parameter's default when only the caller can give its value."""


class DriverTransaction:
    """The asyncpg connection of one transaction (`driver_transaction`), its statements seen by SQLAlchemy's events."""

    __slots__ = ('_driver', '_engine', '_event_connection', '_pooled')

    def __init__(self, engine: Engine, pooled: PoolProxiedConnection, driver: Any) -> None:
        self._engine = engine
        self._pooled = pooled
        self._driver = driver
        self._event_connection: Connection | None = None

    async def fetch(self, statement: DriverStatement, params: Mapping[str, Any]) -> list[Any]:
        """Run `statement` with `params`; its rows (asyncpg `Record`s: by position or by column name).

        A failed statement raises the driver's error, after SQLAlchemy's `handle_error` listeners saw it.
        """
        sql, args = statement.sql, statement.args(params)
        dispatch = self._engine.dispatch
        if not (dispatch.before_cursor_execute or dispatch.after_cursor_execute):
            try:  # free until something is raised (Python 3.11's exceptions)
                rows: list[Any] = await self._driver.fetch(sql, *args)
            except BaseException as exc:
                self._failed(exc, sql, args, None)
                raise
            return rows
        # Listeners (statement counters, tracing) get what SQLAlchemy gives them: a `Connection` on this pooled
        # connection (made only for them, never closed: the pool gets the connection back from `driver_transaction`)
        # and a context object of their own per statement.
        connection, context = self._events_connection(), _EventContext()
        for before in dispatch.before_cursor_execute:
            sql, args = before(connection, None, sql, args, context, False)
        try:
            rows = await self._driver.fetch(sql, *args)
        except BaseException as exc:
            # As SQLAlchemy does: a failed statement goes to `handle_error` (a tracing span ends there, with an
            # error status), not to `after_cursor_execute`.
            self._failed(exc, sql, args, context)
            raise
        for after in dispatch.after_cursor_execute:
            after(connection, None, sql, args, context, False)
        return rows

    def _events_connection(self) -> Connection:
        if self._event_connection is None:
            self._event_connection = Connection(self._engine, connection=self._pooled)
        return self._event_connection

    def _failed(self, exc: BaseException, sql: str, args: Any, context: _EventContext | None) -> None:
        """Show a failed statement to SQLAlchemy's `handle_error` listeners, as a session's failed statement is.

        They observe only: the caller gets the driver's error whatever they return, and the connection's fate is
        decided by `driver_transaction` (a lost one is reported to `PoolHealth` there, so its listener is skipped).
        """
        dialect = self._engine.dialect
        health = getattr(self._engine.pool, 'agentrt_health', None)
        listeners = [fn for fn in dialect.dispatch.handle_error if health is None or fn != health.on_error]
        if not listeners:
            return
        exiting = not isinstance(exc, Exception)  # a cancellation: the connection is discarded, as for SQLAlchemy
        error_context = ExceptionContextImpl(
            exception=exc,
            sqlalchemy_exception=None,  # the driver's error is raised as it is
            engine=self._engine,
            dialect=dialect,
            connection=self._events_connection(),
            cursor=None,
            statement=sql,
            parameters=args,
            context=cast(Any, context),
            is_disconnect=exiting or lost_connection(exc),
            invalidate_pool_on_disconnect=not exiting,
            is_pre_ping=False,
        )
        for listener in listeners:
            listener(error_context)


class _EventContext:
    """Stands for SQLAlchemy's execution context in the cursor events of a driver statement (attributes only)."""


@asynccontextmanager
async def driver_transaction(
    *, account: Account, setup: TransactionSetup | None = None
) -> AsyncIterator[DriverTransaction]:
    """One transaction as `account`'s role and tenant on a pooled connection's asyncpg connection.

    `setup` (read-only, timeouts) rides on the BEGIN with the role and tenant, as for `get_db_session(setup=...)`
    (which also repeats a broken connection's first statement: here the caller's `retry_on_disconnect` does).

    Commits on clean exit, rolls back otherwise; a connection lost, or left in an unknown state (a cancellation
    mid-statement), is discarded instead. The connection is checked out of the pool itself (its events, pings and
    timeout), without a SQLAlchemy `Connection` around it.

    Raises:
        DatabaseDisconnectedError: the connection was lost under the block (nothing committed, or the commit's
            outcome unknown), as `get_db_session()` raises it.
        DatabaseUnavailableError: the database cannot be reached, or no connection became free in time.
        ConfigError: a prepared statement vanished behind a pooler (`DB_POOLER=pgbouncer` fixes it), or the login
            role lacks a privilege only its set-up can give (`privilege_error`).
    """
    setup = scoped_setup(account, setup)
    engine = get_engine().sync_engine
    try:
        pooled = await greenlet_spawn(engine.raw_connection)  # a checkout: may connect or ping (awaits inside)
        try:
            driver: Any = pooled.driver_connection
            try:
                if issubclass(type(driver), PreludeConnection):  # the prelude (and the pooler's defaults) on BEGIN
                    driver.begin_as(setup)
                    await driver.execute('BEGIN;')
                else:  # a plain asyncpg connection: the same prelude in the same message
                    await driver.execute('BEGIN;' + setup.begin_sql())
                yield DriverTransaction(engine, pooled, driver)
                await driver.execute('COMMIT;')
            except BaseException as exc:
                # The client's wait for an answer ran out (a server that stopped answering): said as such, and the
                # connection discarded (a ROLLBACK would wait for that server too).
                silent = StatementNotAnswered.of(exc, driver)
                await _abandon(engine, pooled, driver, silent or exc)
                if silent is not None:
                    raise silent from exc
                raise
        finally:
            # Back to the pool even when cancelled meanwhile (a checkin may close an overflow connection: awaits).
            await asyncio.shield(greenlet_spawn(pooled.close))
    except Exception as exc:
        translated = translated_error(exc, setup)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise


async def _abandon(engine: Engine, pooled: PoolProxiedConnection, driver: Any, exc: BaseException) -> None:
    """End a failed transaction: ROLLBACK on a connection that answered (a statement failed, the caller raised), else
    discard the connection (lost; out of step with its server, or with a prepared statement lost behind a pooler, as
    `PoolHealth.on_error` judges a session's; cancelled mid-statement: its protocol state is unknown)."""
    if isinstance(exc, Exception) and not _unusable(exc) and not driver.is_closed():
        try:
            await driver.execute('ROLLBACK;')
            return
        except Exception as failed:
            exc = failed
    if isinstance(exc, Exception) and (_unusable(exc) or driver.is_closed()):
        health = getattr(engine.pool, 'agentrt_health', None)
        if health is not None:
            health.lost(pooled)
        pooled.invalidate(exc)  # outside a greenlet SQLAlchemy terminates it at once: nothing to wait for
        return
    # Cancelled mid-statement: asyncpg is sending the server a cancel request; a graceful close (in a greenlet, up to
    # 2 s) lets it through, so the server ends the statement and its transaction's locks now, not when it completes.
    await greenlet_spawn(pooled.invalidate, exc if isinstance(exc, Exception) else None)


def _unusable(exc: BaseException) -> bool:
    """Whether the connection must not serve another transaction: lost, out of step (`out_of_step`), or its server
    did not answer in time (`StatementNotAnswered`)."""
    return lost_connection(exc) or out_of_step(exc) or isinstance(exc, StatementNotAnswered)
