"""The `get_db_session()` contract, and the shared-session failure the runtime exists to avoid."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import async_sessionmaker

from agentrt.db.engine import build_engine, get_engine, pool_status
from agentrt.db.errors import ConfigError, DatabaseDisconnectedError, DatabaseUnavailableError, InvalidInputError
from agentrt.db.failures import unavailable_error
from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session, get_side_session, retry_on_disconnect
from agentrt.db.settings import Settings
from tests.conftest import TEST_MAX_OVERFLOW, TEST_POOL_SIZE
from tests.factories import past_its_deadlock_check


async def _count_accounts() -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(func.count()).select_from(Account))).scalar_one()


async def test_commits_on_clean_exit() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add(Account(slug='a', name='A'))
    assert await _count_accounts() == 1
    assert pool_status().checked_out == 0


async def test_rolls_back_on_exception() -> None:
    with pytest.raises(RuntimeError, match='boom'):
        async with get_db_session(account=Unscoped.ADMIN) as session:
            session.add(Account(slug='a', name='A'))
            await session.flush()
            raise RuntimeError('boom')
    assert await _count_accounts() == 0
    assert pool_status().checked_out == 0


async def test_rolls_back_and_returns_connection_on_cancellation() -> None:
    in_query = asyncio.Event()

    async def slow_insert() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            session.add(Account(slug='a', name='A'))
            await session.flush()
            in_query.set()
            await session.execute(text('SELECT pg_sleep(10)'))

    task = asyncio.create_task(slow_insert())
    await asyncio.wait_for(in_query.wait(), 5)
    await asyncio.sleep(0.1)
    assert pool_status().checked_out == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool_status().checked_out == 0
    assert await _count_accounts() == 0


async def test_many_concurrent_sessions_share_a_small_pool() -> None:
    assert TEST_POOL_SIZE + TEST_MAX_OVERFLOW < 100

    async def one(i: int) -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text('SELECT pg_sleep(0.01)'))
            session.add(Account(slug=f'acct-{i}', name=f'Account {i}'))

    await asyncio.gather(*(one(i) for i in range(100)))
    assert await _count_accounts() == 100
    assert pool_status().checked_out == 0


async def test_read_only_session_rejects_writes() -> None:
    with pytest.raises(Exception, match='read-only transaction'):
        async with get_read_only_session(account=Unscoped.ADMIN) as session:
            await session.execute(text("INSERT INTO accounts (slug, name) VALUES ('x', 'X')"))
    assert await _count_accounts() == 0


async def test_side_session_sets_transaction_local_timeouts() -> None:
    async with get_side_session(account=Unscoped.ADMIN, lock_timeout_ms=1234, statement_timeout_ms=4321) as session:
        lock = (await session.execute(text('SHOW lock_timeout'))).scalar_one()
        stmt = (await session.execute(text('SHOW statement_timeout'))).scalar_one()
    assert (lock, stmt) == ('1234ms', '4321ms')


async def test_one_shared_session_fails_under_concurrency(database: Settings) -> None:
    """Why the runtime exists: two tasks on one AsyncSession raise SQLAlchemy's isce error.

    The engine pings on every checkout (`pool_pre_ping=True`, as legacy apps commonly configure it), so the
    second task finds the session still provisioning its connection. Without that window the two queries
    would silently run one after another instead: a race either way.
    """
    engine = build_engine(get_engine().url, database.model_copy(update={'pool_pre_ping_idle': 0}))
    session = async_sessionmaker(engine)()
    try:
        results = await asyncio.gather(
            session.execute(text('SELECT pg_sleep(0.2)')),
            session.execute(text('SELECT pg_sleep(0.2)')),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors, 'sharing one AsyncSession between tasks should fail'
        assert any(
            isinstance(e, InvalidRequestError) and 'concurrent operations are not permitted' in str(e) for e in errors
        ), errors
    finally:
        try:
            await session.close()
        except Exception:
            # Closing a session that was used concurrently can itself fail; that is the point.
            await session.invalidate()
        await engine.dispose()


async def _kill_pooled_connections() -> None:
    """Terminate every idle backend of the pool, as a server restart or a failover does, and wait until they are
    gone, so the next checkout surely meets a dead connection (the pool's connections are closed without any of them
    being in use)."""
    # Two connections in the pool, so one is idle while the next session (on the other) kills it. Through
    # `get_db_session`, which replaces a dead connection at checkout: the pool may hold one an earlier call killed.
    async with get_db_session(account=Unscoped.ADMIN) as first, get_db_session(account=Unscoped.ADMIN) as second:
        for session in (first, second):
            assert (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
    async with get_db_session(account=Unscoped.OWNER) as admin:
        killed = (
            await admin.execute(
                # Materialized first: within one WHERE, PostgreSQL may call pg_terminate_backend before the
                # other conditions, on this very backend.
                text(
                    'WITH idle AS MATERIALIZED (SELECT pid FROM pg_stat_activity '
                    "WHERE application_name = 'agentrt' AND datname = current_database() AND pid <> pg_backend_pid() "
                    'AND state = :idle) '
                    'SELECT coalesce(array_agg(pid), ARRAY[]::int[]) FROM idle WHERE pg_terminate_backend(pid)'
                ),
                {'idle': 'idle'},
            )
        ).scalar_one()
        assert killed, 'the pool had no idle connection to lose'
        # pg_terminate_backend only signals: poll until the backends have exited, on this connection (the pool's
        # others may be the dying ones).
        for _ in range(500):
            await admin.execute(text('SELECT pg_stat_clear_snapshot()'))  # activity is read once per transaction
            alive = (
                await admin.execute(
                    text('SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)'), {'pids': list(killed)}
                )
            ).scalar_one()
            if not alive:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f'terminated backends still alive: {killed}')


async def test_a_lost_connection_is_one_clean_error_and_the_pool_stays_whole() -> None:
    with pytest.raises(DatabaseDisconnectedError, match='connection to PostgreSQL was lost'):
        async with get_db_session(account=Unscoped.ADMIN) as session:
            pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
            async with get_db_session(account=Unscoped.OWNER) as admin:
                await admin.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})
            await session.execute(text('SELECT 1'))
    assert pool_status().checked_out == 0
    assert await _count_accounts() == 0  # and the next session works


async def test_read_only_and_side_sessions_work_after_the_pool_lost_its_connections() -> None:
    for opener in (get_read_only_session, get_side_session):
        await _kill_pooled_connections()
        async with opener(
            account=Unscoped.ADMIN
        ) as session:  # a dead connection: replaced at checkout, or by starting again once
            assert (await session.execute(text('SELECT 1'))).scalar_one() == 1
    assert pool_status().checked_out == 0


async def test_retry_on_disconnect_repeats_once_and_no_more() -> None:
    calls: list[int] = []

    async def lost_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise DatabaseDisconnectedError('lost')
        return 'done'

    assert await retry_on_disconnect(lost_once) == 'done' and len(calls) == 2

    async def always_lost() -> str:
        calls.append(1)
        raise DatabaseDisconnectedError('lost')

    calls.clear()
    with pytest.raises(DatabaseDisconnectedError):
        await retry_on_disconnect(always_lost)
    assert len(calls) == 2

    async def down() -> str:
        calls.append(1)
        raise DatabaseUnavailableError('cannot connect')

    calls.clear()
    with pytest.raises(DatabaseUnavailableError):  # a server that is down is not waited for
        await retry_on_disconnect(down)
    assert len(calls) == 1


async def test_a_lock_or_statement_timeout_is_a_database_unavailable_error_naming_it() -> None:
    # Another session holds a lock the statement needs, longer than the lock timeout: PostgreSQL cancels the statement
    # (SQLSTATE 55P03). Not a bug of the caller's, not a lost connection: the database is too busy, said so.
    async with get_db_session(account=Unscoped.OWNER) as holder:
        await holder.execute(text('LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE'))
        with pytest.raises(DatabaseUnavailableError, match='lock that another session holds') as locked:
            async with get_read_only_session(account=Unscoped.ADMIN) as session:
                await session.execute(text("SET LOCAL lock_timeout = '50ms'"))
                await session.execute(select(func.count()).select_from(Account))
    assert 'DB_LOCK_TIMEOUT_MS' in str(locked.value) and not isinstance(locked.value, DatabaseDisconnectedError)
    # A statement longer than the statement timeout (57014).
    with pytest.raises(DatabaseUnavailableError, match='cancelled a statement') as slow:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text("SET LOCAL statement_timeout = '50ms'"))
            await session.execute(text('SELECT pg_sleep(5)'))
    assert 'DB_STATEMENT_TIMEOUT_MS' in str(slow.value) and 'SELECT' not in str(slow.value)
    assert pool_status().checked_out == 0
    assert await _count_accounts() == 0  # the connections were fine: the next session works


async def _two_accounts() -> tuple[int, int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        first, second = Account(slug='first', name='First'), Account(slug='second', name='Second')
        session.add_all([first, second])
        await session.flush()
        return first.id, second.id


_RENAME = text('UPDATE accounts SET name = name || :suffix WHERE id = :id')


async def test_a_deadlock_is_a_database_unavailable_error_saying_a_retry_helps() -> None:
    # Two sessions update the same two rows in opposite orders. The other session waits first, past its deadlock check;
    # this one closes the cycle, so PostgreSQL's check of this one (after deadlock_timeout, 1 s) ends its transaction
    # (SQLSTATE 40P01), and the other one goes on.
    first, second = await _two_accounts()
    this_has_first = asyncio.Event()

    async def other() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await this_has_first.wait()
            await session.execute(_RENAME, {'suffix': ' (other)', 'id': second})
            await session.execute(_RENAME, {'suffix': ' (other)', 'id': first})  # waits for this session

    running = asyncio.ensure_future(other())
    with pytest.raises(DatabaseUnavailableError, match='deadlock') as raised:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(_RENAME, {'suffix': ' (this)', 'id': first})
            this_has_first.set()
            await past_its_deadlock_check('UPDATE accounts')  # the other session, for `first`, holding `second`
            await session.execute(_RENAME, {'suffix': ' (this)', 'id': second})
    await running
    message = str(raised.value)
    assert 'retrying it normally succeeds' in message and 'UPDATE' not in message and '\n' not in message
    assert not isinstance(raised.value, DatabaseDisconnectedError)
    async with get_db_session(account=Unscoped.ADMIN) as session:  # rolled back: only the other's names
        names = (await session.execute(text('SELECT name FROM accounts ORDER BY id'))).scalars().all()
    assert names == ['First (other)', 'Second (other)']
    assert pool_status().checked_out == 0


async def test_a_serialization_failure_is_a_database_unavailable_error_saying_a_retry_helps() -> None:
    # A REPEATABLE READ transaction updates a row a concurrent transaction changed after its snapshot (40001). A
    # session's isolation level is the server's default (its prelude runs first), so the stale side is a connection
    # of the engine's, its error translated as a session translates it.
    first, _ = await _two_accounts()
    async with get_engine().connect() as connection:
        await connection.execution_options(isolation_level='REPEATABLE READ')
        async with connection.begin():
            await connection.execute(text('SELECT count(*) FROM accounts'))  # the snapshot is taken
            async with get_db_session(account=Unscoped.ADMIN) as concurrent:
                await concurrent.execute(_RENAME, {'suffix': ' (concurrent)', 'id': first})
            with pytest.raises(DBAPIError) as raised:
                await connection.execute(_RENAME, {'suffix': ' (stale)', 'id': first})
    translated = unavailable_error(raised.value)
    assert isinstance(translated, DatabaseUnavailableError) and not isinstance(translated, DatabaseDisconnectedError)
    message = str(translated)
    assert 'conflict with a concurrent one' in message and 'retrying it normally succeeds' in message
    assert 'could not serialize access' in message and 'UPDATE' not in message
    assert await _count_accounts() == 2


async def test_a_prepared_statement_lost_behind_a_pooler_says_how_to_fix_it() -> None:
    query = select(func.count()).select_from(Account)
    with pytest.raises(ConfigError) as raised:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(query)  # prepared, and cached by the connection
            # What a pooler in transaction mode does: the next transaction lands on a server connection that never
            # saw the statement. Here the server forgets it.
            await session.execute(text('DEALLOCATE ALL'))
            await session.execute(query)
    message = str(raised.value)
    assert 'set DB_POOLER=pgbouncer' in message and 'cannot connect' not in message
    assert 'pgbouncer with pool_mode set to "transaction"' in message  # asyncpg's own hint, kept
    assert '\n' not in message
    assert await _count_accounts() == 0  # that connection (and its stale cache) is gone; the pool works on


async def test_a_table_of_the_programs_own_refused_to_the_request_role_says_what_to_grant() -> None:
    """A program's tool opens `get_db_session(account=...)` on a table of its own: the session runs as `agentrt_app`,
    which has no right on it, and the caller got the driver's raw "permission denied for table ..." (then the same
    for the sequence of its id). Now each is a `ConfigError` naming the grant that fixes it; with them, it works."""
    table = f'program_notes_{uuid.uuid4().hex[:8]}'
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'CREATE TABLE {table} (id bigserial PRIMARY KEY, body text)'))
    try:
        with pytest.raises(ConfigError) as refused:
            async with get_db_session(account=1) as session:
                await session.execute(text(f'SELECT count(*) FROM {table}'))
        assert f'permission denied for table {table}' in str(refused.value)
        assert f'GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO agentrt_app' in str(refused.value)
        assert '\n' not in str(refused.value) and 'Tables of your own' in str(refused.value)
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'GRANT SELECT, INSERT ON {table} TO agentrt_app'))
        with pytest.raises(ConfigError) as refused:
            async with get_db_session(account=1) as session:
                await session.execute(text(f"INSERT INTO {table} (body) VALUES ('x')"))
        assert f'GRANT USAGE ON SEQUENCE {table}_id_seq TO agentrt_app' in str(refused.value)
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'GRANT USAGE ON SEQUENCE {table}_id_seq TO agentrt_app'))
        async with get_db_session(account=1) as session:
            await session.execute(text(f"INSERT INTO {table} (body) VALUES ('x')"))
            assert (await session.execute(text(f'SELECT count(*) FROM {table}'))).scalar_one() == 1
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'DROP TABLE {table}'))


async def test_one_of_the_runtimes_own_tables_refused_to_a_role_stays_an_internal_error() -> None:
    """The runtime's roles get what their code needs from the migrations: one refused its own table is a bug, not
    the program's set-up, and is not dressed as a grant to run."""
    with pytest.raises(DBAPIError, match='permission denied for table conversation_entries'):
        async with get_db_session(account=Unscoped.JOBS) as session:
            await session.execute(text('SELECT count(*) FROM conversation_entries'))


async def test_a_value_too_large_for_postgresql_is_an_invalid_input_error_naming_the_limit() -> None:
    # SQLSTATE class 54 ("program limit exceeded": a jsonb value over 256 MB in a turn's save) left the session as a
    # raw asyncpg error. `repeat` refuses a length over 1 GB before it allocates anything: the same class, cheaply.
    with pytest.raises(InvalidInputError, match='PostgreSQL cannot hold a value this large') as raised:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text("SELECT repeat('x', 1100000000)"))
    assert raised.value.field == 'value' and 'nothing of it was stored' in str(raised.value)
    assert 'requested length too large' in str(raised.value)
    assert pool_status().checked_out == 0


async def test_a_pool_that_stays_exhausted_is_said_with_its_wait_and_size_in_the_runtimes_words() -> None:
    pool_size, max_overflow = TEST_POOL_SIZE, TEST_MAX_OVERFLOW
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text('SELECT 1'))
            if pool_status().checked_out == pool_size + max_overflow:
                held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(pool_size + max_overflow)]
    pool: Any = get_engine().sync_engine.pool
    timeout = pool._timeout
    pool._timeout = 0.05
    try:
        await asyncio.wait_for(held.wait(), 10)
        with pytest.raises(DatabaseUnavailableError) as raised:
            async with get_db_session(account=Unscoped.ADMIN) as session:
                await session.execute(text('SELECT 1'))
    finally:
        pool._timeout = timeout
        release.set()
        await asyncio.gather(*holders)
    message = str(raised.value)
    assert message.startswith('no database connection became free within 0.05s (DB_POOL_TIMEOUT) while all ')
    assert f'(DB_POOL_SIZE {pool_size} + DB_MAX_OVERFLOW {max_overflow})' in message
    assert 'sqlalche.me' not in message and 'QueuePool' not in message


async def test_a_side_or_read_only_session_is_the_one_async_generator_the_loops_end_closes() -> None:
    # `asyncio.run()` ending closes the async generators still open all at once: get_side_session's own, around
    # get_db_session's, printed "athrow(): asynchronous generator is already running" for a session a task started as
    # the turns unwound still used (QA: 1 run in 35). One generator per session now: get_db_session's.
    made: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def first(agen: AsyncGenerator[Any, Any]) -> None:
        made.append(agen.ag_code.co_name)
        if hooks.firstiter is not None:
            hooks.firstiter(agen)

    sys.set_asyncgen_hooks(firstiter=first, finalizer=hooks.finalizer)
    try:
        for opener in (get_side_session, get_read_only_session):
            async with opener(account=Unscoped.ADMIN) as session:
                assert (await session.execute(text('SELECT 1'))).scalar_one() == 1
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert made == ['get_db_session', 'get_db_session']


async def test_a_session_closed_by_the_loops_end_while_its_task_uses_it_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What `asyncio.run()`'s end does to a session a task started as the turns unwound is still in a statement with:
    # its generator closed from outside. The clean-up cannot run under the statement ("session close failed:
    # IllegalStateChangeError ... is already in progress", QA), and the loop's end makes it moot: DEBUG, not WARNING.
    opened = get_db_session(account=Unscoped.ADMIN)
    session = await opened.__aenter__()
    statement = asyncio.create_task(session.execute(text('SELECT pg_sleep(0.3)')))
    await asyncio.sleep(0.1)  # in its statement
    with caplog.at_level(logging.WARNING, logger='agentrt.db'):
        await opened.gen.aclose()  # as `loop.shutdown_asyncgens()` does
    assert 'session' not in caplog.text, caplog.text
    with contextlib.suppress(Exception):
        await statement
    await session.close()
    await _kill_pooled_connections()  # whatever the interrupted clean-up left on its connection
    assert await _count_accounts() == 0
