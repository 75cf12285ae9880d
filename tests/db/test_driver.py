"""`driver_transaction`: statements on the asyncpg connection keep what a session guarantees.

Role and tenant on the BEGIN (row-level security), commit or rollback, SQLAlchemy's statement events (counters,
tracing), a lost connection discarded, reported to `PoolHealth` and translated (so `retry_on_disconnect` repeats the
operation on a fresh one), a cancelled statement's connection discarded: the pool never gets a transaction back open.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import literal_column, select, text

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import get_engine
from agentrt.db.errors import ConfigError, DatabaseDisconnectedError
from agentrt.db.roles import APP_ROLE, AUTH_ROLE
from agentrt.db.session import Unscoped, get_db_session, retry_on_disconnect
from agentrt.db.transaction_setup import TransactionSetup
from agentrt.services.conversations import TurnClaim
from tests.factories import listening

WHO = DriverStatement.of(
    text("SELECT current_user, coalesce(current_setting('app.account_id', true), ''), pg_backend_pid()")
)
CLAIMED = DriverStatement.of(text('SELECT account_id FROM conversation_turns ORDER BY account_id'))
SETTINGS = DriverStatement.of(text("SELECT current_setting('transaction_read_only'), current_setting('lock_timeout')"))
SLEEP = DriverStatement.of(text('SELECT pg_sleep(:s)'))
DIVIDE = DriverStatement.of(text('SELECT 1 / :zero'))


async def _claim(transaction: Any, account_id: int, conversation_id: str = 'c') -> None:
    await TurnClaim.mint(account_id, conversation_id, lease_s=30).take(session=transaction)


async def _claimed_by() -> list[int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(text('SELECT account_id FROM conversation_turns ORDER BY account_id'))
        return list(rows.scalars())


async def _kill(pid: int) -> None:
    async with get_db_session(account=Unscoped.OWNER) as admin:
        await admin.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})


async def _sleeping() -> int:
    async with get_db_session(account=Unscoped.OWNER) as owner:
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
            "AND query LIKE 'SELECT pg_sleep($1)%'"
        )
        return int((await owner.execute(query)).scalar_one())


async def test_a_transaction_runs_as_its_tenant_commits_and_its_statements_are_seen(
    two_accounts: tuple[int, int],
) -> None:
    alpha, beta = two_accounts
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append(statement)

    with listening(('before_cursor_execute', before)):
        async with driver_transaction(account=alpha) as transaction:
            await _claim(transaction, alpha)
        async with driver_transaction(account=beta) as transaction:
            await _claim(transaction, beta)
            who = (await transaction.fetch(WHO, {}))[0]
            assert (who[0], who[1]) == (APP_ROLE, str(beta))
            assert [row[0] for row in await transaction.fetch(CLAIMED, {})] == [beta]  # alpha's row is not seen
    assert await _claimed_by() == sorted([alpha, beta])  # both committed
    assert len(seen) == 4 and 'INSERT INTO conversation_turns' in seen[0]
    async with driver_transaction(account=Unscoped.TENANT_LOOKUP) as transaction:
        assert (await transaction.fetch(WHO, {}))[0][:2] == (AUTH_ROLE, '')
    setup = TransactionSetup(read_only=True, lock_timeout_ms=1234)  # with the role and tenant, on the BEGIN
    async with driver_transaction(account=alpha, setup=setup) as transaction:
        assert (await transaction.fetch(WHO, {}))[0][:2] == (APP_ROLE, str(alpha))
        assert (await transaction.fetch(SETTINGS, {}))[0][:] == ('on', '1234ms')


async def test_a_failure_in_the_block_rolls_back_and_leaves_the_connection_clean(
    two_accounts: tuple[int, int],
) -> None:
    alpha, _ = two_accounts
    drivers = []
    with pytest.raises(RuntimeError, match='the caller failed'):
        async with driver_transaction(account=alpha) as transaction:
            drivers.append(transaction._driver)
            await _claim(transaction, alpha)
            raise RuntimeError('the caller failed')
    with pytest.raises(Exception, match='division by zero'):  # a statement's own error: the driver's
        async with driver_transaction(account=alpha) as transaction:
            drivers.append(transaction._driver)
            await _claim(transaction, alpha)
            await transaction.fetch(DIVIDE, {'zero': 0})
    assert await _claimed_by() == []
    assert all(not driver.is_closed() and not driver.is_in_transaction() for driver in drivers)
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_statement_goes_to_handle_error_as_in_a_session_and_still_raises_the_drivers_error(
    two_accounts: tuple[int, int],
) -> None:
    alpha, _ = two_accounts
    health: Any = get_engine().sync_engine.pool.agentrt_health  # type: ignore[attr-defined]
    generation = health.generation
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append(('before', context))

    def after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append(('after', context))

    def on_error(context: Any) -> Exception:
        seen.append(('error', context))
        return RuntimeError('a listener cannot swap the error')  # SQLAlchemy would raise this one; the driver not

    cursor_events = [('before_cursor_execute', before), ('after_cursor_execute', after)]
    for listeners in ([('handle_error', on_error)], [*cursor_events, ('handle_error', on_error)]):
        seen.clear()
        with listening(*listeners):
            with pytest.raises(asyncpg.DivisionByZeroError, match='division by zero') as raised:
                async with driver_transaction(account=alpha) as transaction:
                    await transaction.fetch(DIVIDE, {'zero': 0})
            async with driver_transaction(account=alpha) as transaction:  # a statement that succeeds: no error
                assert (await transaction.fetch(WHO, {}))[0][1] == str(alpha)
        kinds = [kind for kind, _ in seen]
        assert kinds == (['error'] if len(listeners) == 1 else ['before', 'error', 'before', 'after'])
        error = seen[kinds.index('error')][1]
        assert error.original_exception is raised.value and error.sqlalchemy_exception is None
        assert (error.statement, error.parameters, error.is_disconnect) == (DIVIDE.sql, [0], False)
        assert error.connection is not None and error.engine is get_engine().sync_engine
        if len(listeners) > 1:  # the context the cursor events got: where a tracing span waits to be ended
            assert error.execution_context is seen[0][1]
    assert health.generation == generation  # not a disconnect
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_lost_connection_is_discarded_reported_and_repeated_on_a_fresh_one(
    two_accounts: tuple[int, int],
) -> None:
    alpha, _ = two_accounts
    health: Any = get_engine().sync_engine.pool.agentrt_health  # type: ignore[attr-defined]
    generation, attempts, drivers = health.generation, [], []

    async def claim_once() -> int:
        async with driver_transaction(account=alpha) as transaction:
            attempts.append(1)
            drivers.append(transaction._driver)
            pid = (await transaction.fetch(WHO, {}))[0][2]
            if len(attempts) == 1:
                await _kill(pid)
            await _claim(transaction, alpha)
            return int(pid)

    with pytest.raises(DatabaseDisconnectedError, match='connection to PostgreSQL was lost'):
        await claim_once()
    assert drivers[0].is_closed() and health.generation == generation + 1  # reported once, not by handle_error too
    assert await _claimed_by() == []
    attempts.clear()
    await retry_on_disconnect(claim_once, what='test claim')
    assert len(attempts) == 2 and await _claimed_by() == [alpha]
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_cancelled_statement_discards_its_connection(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    drivers: list[Any] = []
    started = asyncio.Event()

    async def slow() -> None:
        async with driver_transaction(account=alpha) as transaction:
            drivers.append(transaction._driver)
            await _claim(transaction, alpha)
            started.set()
            await transaction.fetch(SLEEP, {'s': 30})

    task = asyncio.create_task(slow())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drivers[0].is_closed()  # its protocol state was unknown: never back in the pool
    assert await _sleeping() == 0  # and the server ended the statement (and its locks) rather than sleeping on
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await _claimed_by() == []
    async with driver_transaction(account=alpha) as transaction:  # the pool goes on
        assert (await transaction.fetch(WHO, {}))[0][1] == str(alpha)


def test_a_statement_compiles_once_with_numbered_parameters() -> None:
    statement = DriverStatement.of(text('SELECT :a, :b, :a, now()::text'))
    assert statement.sql == 'SELECT $1, $2, $1, now()::text' and statement.names == ('a', 'b')
    assert statement.args({'b': 2, 'a': 1, 'unused': 3}) == [1, 2]
    with pytest.raises(KeyError, match=r"\['b'\]"):  # a forgotten parameter is refused, not sent as NULL
        statement.args({'a': 1})
    limited = DriverStatement.of(select(literal_column('1')).limit(1))  # values the statement binds itself
    assert limited.args({}) == [1]


async def test_a_prepared_statement_lost_behind_a_pooler_discards_its_connection(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    health: Any = get_engine().sync_engine.pool.agentrt_health  # type: ignore[attr-defined]
    generation, drivers = health.generation, []
    with pytest.raises(ConfigError, match='set DB_POOLER=pgbouncer'):
        async with driver_transaction(account=alpha) as transaction:
            drivers.append(transaction._driver)
            await transaction.fetch(WHO, {})  # prepared, and cached by the connection
            # What a pooler in transaction mode does: the next transaction lands on a server connection that never
            # saw the statement. Here the server forgets it.
            await transaction._driver.execute('DEALLOCATE ALL')
            await transaction.fetch(WHO, {})
    # Its statement cache is wrong from then on: discarded (as a session's is, through `PoolHealth.on_error`), not
    # rolled back and handed to the next transaction to fail again.
    assert drivers[0].is_closed() and health.generation == generation + 1
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with driver_transaction(account=alpha) as transaction:  # the pool goes on
        assert (await transaction.fetch(WHO, {}))[0][1] == str(alpha)
