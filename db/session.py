"""`get_db_session()`: one short-lived `AsyncSession` per operation, the only way code gets a session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, String, cast, func, literal, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from agentrt.db.engine import embedded_unreachable, get_engine, get_sessionmaker
from agentrt.db.errors import DatabaseDisconnectedError, DatabaseUnavailableError
from agentrt.db.failures import cannot_connect, lost_connection, not_answered, too_large, unavailable_error
from agentrt.db.roles import APP_ROLE, TENANT_SETTING, Account, Unscoped, scope_of
from agentrt.db.setup_failures import login_error, pooler_error, privilege_error
from agentrt.db.transaction_setup import SETUP_KEY, PreludeConnection, RetryingSession, TransactionSetup

__all__ = [
    'Account',
    'Unscoped',
    'enter_account',
    'entered_account',
    'entering_account',
    'get_db_session',
    'get_read_only_session',
    'get_side_session',
    'retry_on_disconnect',
    'scoped_connection',
]

T = TypeVar('T')

logger = logging.getLogger('agentrt.db')


_row_security = True


def set_row_security(enabled: bool) -> bool:
    """Whether sessions switch to their function role and set the tenant; returns the previous value.

    For `scripts/bench_rls.py` only, which measures a turn without it (as the superuser of the embedded server, with
    row-level security disabled on the tables): with it off, the login role runs everything, and a login role that
    is not a superuser sees no row of a table whose row-level security is forced.
    """
    global _row_security
    previous, _row_security = _row_security, enabled
    return previous


def row_security() -> bool:
    """Whether sessions switch to their function role and set the tenant (`set_row_security`)."""
    return _row_security


def scoped_setup(account: Account, setup: TransactionSetup | None = None) -> TransactionSetup:
    """`setup` (or none) plus the role and tenant of `account` (`agentrt.db.roles.scope_of`)."""
    base = setup or TransactionSetup()
    if not _row_security:
        return base
    role, account_id = scope_of(account)
    return replace(base, role=role, account_id=account_id)


@asynccontextmanager
async def get_db_session(*, account: Account, setup: TransactionSetup | None = None) -> AsyncIterator[AsyncSession]:
    """Open a session in a transaction that commits on clean exit and rolls back otherwise.

    The transaction is rolled back on an exception or a cancellation, and the session is always
    closed so its connection returns to the pool. Every call gets its own session, so it is safe to
    call from many tasks at once; never share the yielded session between tasks.

    Args:
        account: whose rows the session sees: an account id (the request role, `agentrt_app`, with the tenant set:
            row-level security shows it that account's rows only), or an `Unscoped` member naming the cross-account
            role (ledger writer, jobs, tenant lookup, operator). Required: a session without a tenant is a visible
            choice. Both are transaction-local and ride on the BEGIN (`TransactionSetup.role`, `.account_id`).
        setup: what the transaction sets before its first statement (read-only, timeouts), sent with its BEGIN: no
            extra round trip. A session with a setup also repeats its first statement once on a fresh connection
            when the pooled one was broken (`RetryingSession`).

    Yields:
        An `AsyncSession` bound to the process-wide engine.

    Raises:
        DatabaseDisconnectedError: the connection was lost while the block used it (restart, failover, killed
            backend); nothing of the block was committed, or the outcome of the commit is unknown.
        DatabaseUnavailableError: no connection could be made (server down or starting, pool exhausted).
        ConfigError: a prepared statement vanished behind a pooler (`DB_POOLER=pgbouncer` fixes it), or the login
            role lacks a privilege only its set-up can give (`privilege_error`).
        InvalidInputError: a value PostgreSQL cannot hold (SQLSTATE class 54: a text over 1 GB, a JSON value over
            256 MB; `field='value'`, from `db/failures.py`'s `too_large`); nothing was stored.
        TypeError: `account` is neither an account id nor an `Unscoped` member.
        ValueError: `account` is an integer out of the range of account ids (bigint).
    """
    scoped = scoped_setup(account, setup)
    session = get_sessionmaker()()
    session.info[SETUP_KEY] = scoped
    if setup is not None and isinstance(session, RetryingSession):
        session.retry_first_statement = True
    closed_from_outside = False
    try:
        yield session
        await session.commit()
    except BaseException as exc:
        # GeneratorExit: the generator is closed from outside, by the end of `asyncio.run()` (it closes the async
        # generators still open) while the task that opened the session may still be in a statement with it (one
        # started as the turns unwound): the clean-up then fails ("close() can't be called here; method
        # '_connection_for_bind()' is already in progress"), which the loop's end makes moot; said at DEBUG only.
        closed_from_outside = isinstance(exc, GeneratorExit)
        await _finish(session.rollback(), 'rollback', quiet=closed_from_outside)
        translated = translated_error(exc, scoped)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise
    finally:
        await _finish(session.close(), 'close', quiet=closed_from_outside)


def translated_error(exc: BaseException, setup: TransactionSetup, *, login: str | None = None) -> Exception | None:
    """The runtime's error for what a transaction run with `setup` raised (`db/failures.py`), or None: a prepared
    statement lost behind a pooler, a privilege the login role (`login`, the engine's user by default) lacks
    (`ConfigError`), the database unavailable, a value too large for PostgreSQL (`InvalidInputError`)."""
    translated = (
        pooler_error(exc)
        or login_error(exc)
        or privilege_error(exc, as_login_role=not setup.role, login=login or _login_role(), role=setup.role)
        or unavailable_error(exc)
        or too_large(exc)
    )
    if isinstance(translated, DatabaseUnavailableError) and (cannot_connect(exc) or lost_connection(exc)):
        embedded_unreachable()  # the embedded server may have stopped (a full disk): started again if so
    return translated


def _login_role() -> str | None:
    try:
        return get_engine().url.username
    except Exception:  # no engine (any more): the message names no role
        return None


_READ_ONLY = TransactionSetup(read_only=True)


async def enter_account(session: AsyncSession, account_id: int) -> None:
    """Make the session's transaction (and its later ones) the request role's for `account_id`.

    For a session opened with `Unscoped.TENANT_LOOKUP` that has just found its tenant (by API key or slug) and goes
    on in the same transaction as that account: one statement, transaction-local like the prelude.
    """
    if not _row_security:
        return
    entered_account(session, account_id)
    await session.execute(
        text(f"SELECT set_config('role', '{APP_ROLE}', true), set_config('{TENANT_SETTING}', :account, true)"),
        {'account': str(int(account_id))},
    )


def entering_account(account_id: ColumnElement[int] | InstrumentedAttribute[int]) -> list[ColumnElement[str]]:
    """Columns that, selected with the row that names the tenant, make the rest of the transaction that account's
    (the request role with its tenant), as `enter_account` does, in the same statement.

    The statement itself has been checked as the role that runs it; the next ones run as the request role. Call
    `entered_account()` with the account the row named. Nothing with row-level security off (benchmarks).
    """
    if not _row_security:
        return []
    return [
        func.set_config('role', literal(APP_ROLE), True),
        func.set_config(TENANT_SETTING, cast(account_id, String), True),
    ]


def entered_account(session: AsyncSession, account_id: int) -> None:
    """Record that the session's transaction is `account_id`'s now (`entering_account`): its later transactions
    begin so too."""
    info = session.info.get(SETUP_KEY) or TransactionSetup()
    if _row_security:
        session.info[SETUP_KEY] = replace(info, role=APP_ROLE, account_id=int(account_id))


@asynccontextmanager
async def scoped_connection(*, account: Account) -> AsyncIterator[AsyncConnection]:
    """A Core connection in one transaction as `account`'s role and tenant (the prelude rides on its BEGIN).

    For statements that skip the ORM session's bookkeeping (budget admission, the budget sweeper). Commits on clean
    exit, rolls back otherwise. Failures are translated as `get_db_session()` does.

    Raises:
        DatabaseUnavailableError: the database cannot be reached, or the connection was lost under the statement.
        ConfigError: a prepared statement vanished behind a pooler, or the login role lacks a privilege.
    """
    setup = scoped_setup(account)
    try:
        async with get_engine().connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            carries = issubclass(type(driver), PreludeConnection)
            if carries:
                driver.begin_as(setup)
            async with connection.begin():
                if not carries:  # an engine `build_engine` did not make: the same statements, one by one
                    for statement in setup.statements():
                        await connection.exec_driver_sql(statement)
                yield connection
    except Exception as exc:
        translated = translated_error(exc, setup)
        if translated is not None and translated is not exc:
            raise translated from exc
        raise


# `get_read_only_session` and `get_side_session` return `get_db_session`'s context manager rather than wrap it in an
# async generator of their own: `asyncio.run()` ending closes every async generator still open at once, and two nested
# ones, one closed while the other's clean-up ran, printed "RuntimeError: athrow(): asynchronous generator is already
# running" for a session still in use by a task started as the turns unwound (QA).


def get_read_only_session(*, account: Account) -> AbstractAsyncContextManager[AsyncSession]:
    """Like `get_db_session()`, inside a `READ ONLY` transaction: for tools that only read.

    The read-only mode rides on the transaction's BEGIN (no extra round trip). A connection found broken by the
    first statement (a server restarted since it was last used) is replaced and the statement run again, once:
    nothing had been read yet. `account` as for `get_db_session()`.
    """
    return get_db_session(account=account, setup=_READ_ONLY)


def get_side_session(
    *, account: Account, lock_timeout_ms: int = 2000, statement_timeout_ms: int = 5000
) -> AbstractAsyncContextManager[AsyncSession]:
    """A session for independent writers (titles and summaries, usage rollups, background work) with tight timeouts.
    The ledger writes its rows through `driver_transaction` (`agentrt.db.driver`), not here.

    The timeouts are transaction-local, so a side write can never wait forever on a lock its own
    caller holds in another session (PostgreSQL cannot see that deadlock); they ride on the transaction's BEGIN.
    Like `get_read_only_session()`, a connection found broken by the first statement is replaced once. `account` as
    for `get_db_session()`.
    """
    setup = TransactionSetup(lock_timeout_ms=int(lock_timeout_ms), statement_timeout_ms=int(statement_timeout_ms))
    return get_db_session(account=account, setup=setup)


async def retry_on_disconnect(operation: Callable[[], Awaitable[T]], *, what: str = 'database operation') -> T:
    """Run `operation`; if the connection is lost under it, run it once more, on a fresh connection.

    For operations that are safe to repeat: reads (tenant lookups, conversation loads) and writes whose retry is
    guarded (a compare-and-swap on a revision minted for the write). The operation opens its own session, and
    returns its result only when it is complete, so nothing of a failed attempt was used. After a lost connection
    the pool tests every connection of that generation before handing it out (`PoolHealth`), so the second attempt
    never gets another dead one. A server that is down fails the second attempt at once: no waiting.

    Not repeated: an operation whose server did not answer in time (`not_answered`).

    Raises:
        DatabaseDisconnectedError: the connection was lost twice, or the server did not answer.
        DatabaseUnavailableError: the server cannot be reached.
    """
    try:
        return await operation()
    except DatabaseDisconnectedError as exc:
        if not_answered(exc) is not None:
            raise  # the server did not answer: a repeat would wait for it again (`not_answered`)
        logger.info('%s: %s; repeating it on a fresh connection', what, exc)
    return await operation()


async def _finish(cleanup: Awaitable[None], what: str, *, quiet: bool = False) -> None:
    """Run a rollback or close to completion even if this task is cancelled again meanwhile.

    Without the shield a second cancellation (a timeout, a task group tearing down) would abandon the
    cleanup halfway and leave the connection checked out. A failing cleanup is logged, not raised, so
    the caller sees the error that caused it (a broken connection is invalidated by SQLAlchemy); at DEBUG when `quiet`.
    """
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        _log_failure(task, what, quiet)
        raise
    except Exception:
        _log_failure(task, what, quiet)


def _log_failure(task: asyncio.Future[None], what: str, quiet: bool) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.log(logging.DEBUG if quiet else logging.WARNING, 'session %s failed: %r', what, task.exception())
