"""What a transaction sets before its first statement (read-only mode, timeouts): sent with its BEGIN, in one place.

A read-only session or a side session with tight timeouts used to spend a round trip (and a statement) on `SET
TRANSACTION READ ONLY` or `SELECT set_config(...)` before its first real statement: 7 of the 51 statements of a
demo turn. `TransactionSetup` describes the prelude and `begin_sql()` renders it; the runtime's asyncpg connections
(`PreludeConnection`, installed by `build_engine`) append it to the transaction's `BEGIN`, which the simple query
protocol sends as one message: zero extra round trips, zero extra statements.

This is the one place a transaction's prelude is built. Row-level security's role and tenant
(`set_config('role', ..., true)`, `set_config('app.account_id', ..., true)`: `agentrt.db.roles`) are part of it;
every session opener goes through `get_db_session(account=..., setup=...)`. Behind a transaction pooler
(`DB_POOLER=pgbouncer`) the connection's default timeouts are per-transaction too: `install_prelude(defaults=...)`
gives every transaction of the engine that prelude (also the ones opened without a session: migrations,
`engine.connect()`), and a session's own setup takes the timeouts it does not set from it (`with_defaults`).

The client waits for each answer at most the transaction's statement timeout plus `CLIENT_WAIT_MARGIN_SECONDS`
(`client_wait`): a server that stops answering (frozen, or behind a network that drops packets) cannot cancel its own
statement, and a turn waited for it without end. asyncpg's `command_timeout` bounds each operation; it is set per
transaction with the prelude (`PreludeConnection.begin_as`), and the wait that runs out is reported by
`agentrt.db.failures.StatementNotAnswered`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from sqlalchemy import Executable, Result, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from agentrt.db.failures import lost_connection
from agentrt.db.roles import TENANT_SETTING

logger = logging.getLogger('agentrt.db')

_ROLE_NAME = re.compile(r'[a-z_][a-z0-9_]{0,62}')

SETUP_KEY = 'agentrt_transaction_setup'
"""`Session.info` key of the session's `TransactionSetup`."""

CLIENT_WAIT_MARGIN_SECONDS = 5.0
"""How much longer than its statement timeout the client waits for a statement's answer (`client_wait`): the server's
own cancel ("canceling statement due to statement timeout") arrives first whenever the server is running."""


def client_wait(statement_timeout_ms: int) -> float | None:
    """The longest the client waits for one answer of a transaction whose `statement_timeout` is `statement_timeout_ms`
    (None: no statement timeout, no client-side bound either: `DB_STATEMENT_TIMEOUT_MS=0` for a long migration)."""
    if statement_timeout_ms <= 0:
        return None
    return statement_timeout_ms / 1000 + CLIENT_WAIT_MARGIN_SECONDS


@dataclass(frozen=True)
class TransactionSetup:
    """What a transaction needs before its first statement.

    Attributes:
        read_only: `SET TRANSACTION READ ONLY`: the transaction cannot write.
        lock_timeout_ms: transaction-local `lock_timeout` (None: the connection's default).
        statement_timeout_ms: transaction-local `statement_timeout` (None: the connection's default).
        role: the role the transaction runs as (`SET LOCAL ROLE`, `agentrt.db.roles`); None: the login role.
        account_id: the tenant (`app.account_id`) for row-level security; set (empty when None) whenever `role` is.
        shared_lock: a transaction-level advisory lock taken in shared mode (`pg_advisory_xact_lock_shared`) before
            the first statement, so that statement's snapshot follows whoever held it exclusively (the ledger writer
            and a budget window's creation: `agentrt.services.budgets`); None: none.
    """

    read_only: bool = False
    lock_timeout_ms: int | None = None
    statement_timeout_ms: int | None = None
    role: str | None = None
    account_id: int | None = None
    shared_lock: int | None = None

    def statements(self) -> list[str]:
        """The prelude as SQL statements, in order. Values are formatted integers, never caller text: the simple
        query protocol that carries them with BEGIN takes no parameters."""
        statements = ['SET TRANSACTION READ ONLY'] if self.read_only else []
        timeouts = (('lock_timeout', self.lock_timeout_ms), ('statement_timeout', self.statement_timeout_ms))
        settings = [f"set_config('{name}', '{int(value)}ms', true)" for name, value in timeouts if value is not None]
        settings[:0] = self._scope_settings()
        if self.shared_lock is not None:  # after the timeouts: `lock_timeout` bounds the wait
            settings.append(f'pg_advisory_xact_lock_shared({int(self.shared_lock)})')
        if settings:
            statements.append('SELECT ' + ', '.join(settings))
        return statements

    def _scope_settings(self) -> list[str]:
        """Role and tenant, transaction-local (`set_config(..., true)` is `SET LOCAL`): never a session `SET`, which
        a transaction pooler would pass on to other clients. The tenant is set, empty, even without one, so a value
        left on the server connection by anyone else is never used."""
        if self.role is None:
            return []
        if not _ROLE_NAME.fullmatch(self.role):
            raise ValueError(f'not a role name agentrt uses: {self.role!r}')
        tenant = '' if self.account_id is None else str(int(self.account_id))
        return [f"set_config('role', '{self.role}', true)", f"set_config('{TENANT_SETTING}', '{tenant}', true)"]

    def begin_sql(self) -> str:
        """The prelude appended to `BEGIN;` (empty when there is nothing to set)."""
        return ''.join(f' {statement};' for statement in self.statements())

    # Pooler mode (DB_POOLER=pgbouncer): the timeouts a direct connection gets at connect, set per transaction.
    def with_defaults(self, defaults: TransactionSetup | None) -> TransactionSetup:
        """This setup, with each timeout it leaves to the connection taken from `defaults` (the connection's
        `default_setup`: the pooler mode's per-transaction timeouts)."""
        if defaults is None:
            return self
        return replace(
            self,
            lock_timeout_ms=defaults.lock_timeout_ms if self.lock_timeout_ms is None else self.lock_timeout_ms,
            statement_timeout_ms=(
                defaults.statement_timeout_ms if self.statement_timeout_ms is None else self.statement_timeout_ms
            ),
        )


_open_connections: weakref.WeakSet[PreludeConnection] = weakref.WeakSet()
"""Every connection the runtime opened and has not collected, for `close_connections_of` (a closed loop's)."""


def close_connections_of(loop: asyncio.AbstractEventLoop) -> int:
    """Close at once the runtime's connections that belong to `loop`, an event loop that has ended (closed) or is
    ending (the running one, at `asyncio.run`'s end); return how many. A loop that is merely idle is left alone: its
    tasks may still run on it, and closing their connections under them broke them with tracebacks (QA).

    No goodbye to the server and no wait for it: a connection's socket is closed, so the server ends its session and
    lets go of what it held. The ways it was left open (QA): a loop closed with its tasks pending (a sync wrapper's
    `new_event_loop()`, `run_until_complete(...)`, `close()`) kept its tasks' connections checked out, which no loop
    can close the asyncio way ("attached to a different loop", "Event loop is closed"): about 3 server backends a call
    until the server refused every client; and a graceful close at a loop's end waited on a server that did not answer
    (72 s). On the running loop the connection is aborted the asyncio way too (`terminate`); on a closed one, its
    transport is marked closed (no ResourceWarning when it is collected).
    """
    running = asyncio._get_running_loop()
    if not loop.is_closed() and loop is not running:
        return 0
    closed = 0
    for connection in list(_open_connections):
        if connection._loop is not loop or connection._aborted:
            continue
        transport = connection._transport
        if not loop.is_closed():
            connection.terminate()
        sock = getattr(transport, '_sock', None)  # asyncio's selector transports (the only kind asyncpg gets here)
        if sock is not None:
            sock.close()
            if loop.is_closed():
                transport._sock = None
        connection._aborted = True
        _open_connections.discard(connection)
        closed += 1
    return closed


class PreludeConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection that sends the pending transaction prelude in the same message as the next `BEGIN`.

    asyncpg starts a transaction with `execute('BEGIN;')` (the simple query protocol, which runs several statements
    in one message); the prelude rides along. It is set by the session that is about to begin (`after_begin`) and
    consumed by that BEGIN, or cleared when the connection goes back to the pool, so it never reaches another
    transaction.
    """

    __slots__ = ('agentrt_default_prelude', 'agentrt_default_setup', 'agentrt_default_wait', 'agentrt_prelude')

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _open_connections.add(self)
        self.agentrt_prelude = ''
        # Pooler mode: what every transaction on this connection sets when its session sets nothing else
        # (`install_prelude(defaults=...)`); None on a direct connection, whose timeouts are set at connect.
        self.agentrt_default_setup: TransactionSetup | None = None
        self.agentrt_default_prelude = ''
        # The wait for an answer of a transaction that sets no statement timeout of its own: the engine's
        # `command_timeout` (`build_engine`: `client_wait` of DB_STATEMENT_TIMEOUT_MS).
        self.agentrt_default_wait: float | None = self.waiting()

    def begin_as(self, setup: TransactionSetup) -> None:
        """Make the next `BEGIN` carry `setup`'s prelude (its timeouts completed from the connection's defaults), and
        wait for each answer of that transaction at most `client_wait` of its statement timeout."""
        self.agentrt_prelude = setup.with_defaults(self.agentrt_default_setup).begin_sql()
        statement_timeout_ms = setup.statement_timeout_ms
        self.set_wait(self.agentrt_default_wait if statement_timeout_ms is None else client_wait(statement_timeout_ms))

    def set_wait(self, seconds: float | None) -> None:
        """Wait at most `seconds` for each answer from now on (None: without end).

        asyncpg reads `command_timeout` from the connection's configuration at each operation (asyncpg 0.32,
        `protocol._get_timeout_impl`); it has no setter, so the configuration (a named tuple) is replaced.
        """
        config: Any = self._config  # type: ignore[has-type]  # asyncpg's, untyped
        if config.command_timeout != seconds:
            self._config = config._replace(command_timeout=seconds)  # type: ignore[misc]  # asyncpg's slot

    def waiting(self) -> float | None:
        """The longest this connection now waits for an answer, in seconds (None: without end)."""
        config: Any = self._config
        seconds: float | None = config.command_timeout
        return seconds

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 (asyncpg's)
        """asyncpg's `execute`; a `BEGIN` without arguments carries the pending prelude (or the default one).

        A prelude PostgreSQL refuses (the login role may not take the transaction's role: "permission denied to set
        role") fails after its BEGIN ran, and neither asyncpg nor SQLAlchemy knows a transaction is open: it is rolled
        back here, else the connection would go back to the pool inside an aborted transaction, and every later
        transaction on it would fail ("current transaction is aborted"), even once the cause was fixed.
        """
        if args or not query.startswith('BEGIN'):
            status: str = await super().execute(query, *args, timeout=timeout)
            return status
        prelude, self.agentrt_prelude = self.agentrt_prelude or self.agentrt_default_prelude, ''
        try:
            status = await super().execute(query + prelude, timeout=timeout)
        except asyncpg.PostgresError:
            if prelude and not self.is_closed():
                try:
                    await super().execute('ROLLBACK')
                except Exception:  # the connection broke meanwhile: the pool discards it
                    logger.debug('ROLLBACK after a refused transaction prelude failed', exc_info=True)
                else:
                    # asyncpg keeps a transaction whose start failed as the connection's current one, so the next
                    # transaction would start a SAVEPOINT outside any block: none is open any more.
                    self._top_xact = None  # type: ignore[misc]  # asyncpg.Connection's slot, untyped
            raise
        return status


class RetryingSession(AsyncSession):
    """The runtime's `AsyncSession`. With `retry_first_statement` set, a transaction's first statement that finds its
    pooled connection broken (a server restarted since the connection was last used) runs once more on a fresh one.

    Safe whatever the statement is: it was the transaction's first, nothing of the transaction was committed or
    returned to the caller, and the rollback discards the broken connection. Read-only and side sessions set it
    (their prelude used to be the statement that found the connection broken; it now rides on the BEGIN).
    """

    retry_first_statement = False

    async def execute(  # the overloads of AsyncSession.execute, passed through
        self, statement: Executable, params: Any = None, **kwargs: Any
    ) -> Result[Any]:
        """`AsyncSession.execute`, repeated once on a fresh connection as described above."""
        if not self.retry_first_statement or self.in_transaction():
            return await super().execute(statement, params, **kwargs)
        self.retry_first_statement = False
        try:
            return await super().execute(statement, params, **kwargs)
        except Exception as exc:
            if not lost_connection(exc):
                raise
            logger.info(
                'the connection was lost at the first statement of a transaction; starting it again on a fresh one'
            )
        await self.rollback()
        return await super().execute(statement, params, **kwargs)


class SetupSession(Session):
    """The sync session class behind the runtime's `AsyncSession`s: applies `info[SETUP_KEY]` as each transaction
    begins."""


@event.listens_for(SetupSession, 'after_begin')
def _apply_setup(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    setup: TransactionSetup | None = session.info.get(SETUP_KEY)
    if setup is None:
        return
    driver: Any = connection.connection.driver_connection
    if _carries_prelude(driver):
        driver.begin_as(setup)
        return
    # An engine that was not built by `build_engine` (another driver class): the same statements, one by one.
    for statement in setup.statements():
        connection.exec_driver_sql(statement)


def install_prelude(engine: AsyncEngine, *, defaults: TransactionSetup | None = None) -> None:
    """Drop a prelude left unsent (a session that began but ran nothing), and a transaction's own client-side wait,
    when its connection is checked in; with `defaults`, give every transaction of the engine that prelude when its
    session sets nothing else.

    `build_engine` calls it, and connects with `connection_class=PreludeConnection`; the pooler mode passes its
    per-transaction timeouts as `defaults`.
    """
    event.listen(engine.sync_engine, 'checkin', _clear_prelude)
    if defaults is not None and defaults.statements():
        default_prelude = defaults.begin_sql()

        def set_defaults(dbapi_connection: Any, record: Any) -> None:
            driver: Any = getattr(dbapi_connection, 'driver_connection', None)
            if _carries_prelude(driver):
                driver.agentrt_default_setup, driver.agentrt_default_prelude = defaults, default_prelude

        event.listen(engine.sync_engine, 'connect', set_defaults)


def _clear_prelude(dbapi_connection: Any, record: Any) -> None:
    driver: Any = getattr(dbapi_connection, 'driver_connection', None)
    if _carries_prelude(driver):
        driver.agentrt_prelude = ''
        driver.set_wait(driver.agentrt_default_wait)


@contextmanager
def waiting_without_end(connection: Connection) -> Iterator[None]:
    """Wait for the answers of the statements run on `connection` in the block without a client-side bound: for a
    statement that waits as long as another process's work takes (the migration lock), its statement timeout lifted
    for it (`migrations/env.py`)."""
    with driver_waiting(connection.connection.driver_connection, None):
        yield


@contextmanager
def driver_waiting(driver: Any, seconds: float | None) -> Iterator[None]:
    """`driver` (an asyncpg connection) waits at most `seconds` for each answer in the block (None: without end),
    then as long as before; a driver that is not a `PreludeConnection` as it does. A connection closed in the block
    (terminated for not answering) keeps what it had."""
    if not _carries_prelude(driver):
        yield
        return
    before = driver.waiting()
    driver.set_wait(seconds)
    try:
        yield
    finally:
        if not driver.is_closed():
            driver.set_wait(before)


def _carries_prelude(driver: Any) -> bool:
    # Not isinstance: asyncpg's connection metaclass answers True for every asyncpg connection.
    return issubclass(type(driver), PreludeConnection)
