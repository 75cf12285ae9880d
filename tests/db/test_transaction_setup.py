"""A transaction's prelude rides on its BEGIN: no extra statement, never leaking into another transaction; the first
statement of a session with a prelude is repeated once when its connection was lost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from agentrt.db.engine import pool_status
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session, get_side_session
from agentrt.db.transaction_setup import SETUP_KEY, PreludeConnection, SetupSession, TransactionSetup
from tests.factories import listening


@contextmanager
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    with listening(('before_cursor_execute', record)):
        yield seen


def test_the_prelude_is_rendered_from_integers_only() -> None:
    assert TransactionSetup().begin_sql() == ''
    assert TransactionSetup(read_only=True).begin_sql() == ' SET TRANSACTION READ ONLY;'
    setup = TransactionSetup(read_only=True, lock_timeout_ms=2000, statement_timeout_ms=5000)
    assert setup.begin_sql() == (
        " SET TRANSACTION READ ONLY; SELECT set_config('lock_timeout', '2000ms', true), "
        "set_config('statement_timeout', '5000ms', true);"
    )
    assert TransactionSetup(lock_timeout_ms=7).statements() == ["SELECT set_config('lock_timeout', '7ms', true)"]
    assert TransactionSetup(lock_timeout_ms=7, shared_lock=42).statements() == [
        "SELECT set_config('lock_timeout', '7ms', true), pg_advisory_xact_lock_shared(42)"  # waits at most 7 ms
    ]
    with pytest.raises(ValueError):
        TransactionSetup(lock_timeout_ms='1; DROP TABLE accounts').statements()  # type: ignore[arg-type]


async def test_read_only_and_timeouts_cost_no_statement_of_their_own() -> None:
    with statements() as seen:
        async with get_read_only_session(account=Unscoped.ADMIN) as session:
            read_only = (await session.execute(text('SHOW transaction_read_only'))).scalar_one()
        async with get_side_session(account=Unscoped.ADMIN, lock_timeout_ms=1234, statement_timeout_ms=4321) as session:
            query = text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
            timeouts = (await session.execute(query)).one()
    assert read_only == 'on' and tuple(timeouts) == ('1234ms', '4321ms')
    assert len(seen) == 2, seen


async def test_the_prelude_is_transaction_local_and_never_leaks() -> None:
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        driver = (await (await session.connection()).get_raw_connection()).driver_connection
        assert type(driver) is PreludeConnection
        await session.execute(text('SELECT 1'))
        assert driver.agentrt_prelude == ''  # consumed by the BEGIN
    # A session that began but ran nothing: its unsent prelude is dropped when the connection goes back.
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        driver = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.agentrt_prelude != ''
    assert driver.agentrt_prelude == ''
    # Every connection of the pool writes again in a plain session.
    async with asyncio.TaskGroup() as group:
        for _ in range(pool_status().size):
            group.create_task(_write_and_roll_back())


async def _write_and_roll_back() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SHOW transaction_read_only'))).scalar_one() == 'off'
        await asyncio.sleep(0.01)


async def test_an_engine_without_the_prelude_connection_runs_the_statements_instead(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        session = async_sessionmaker(engine, sync_session_class=SetupSession)()
        session.info[SETUP_KEY] = TransactionSetup(read_only=True, lock_timeout_ms=321)
        async with session:
            assert (await session.execute(text('SHOW transaction_read_only'))).scalar_one() == 'on'
            assert (await session.execute(text('SHOW lock_timeout'))).scalar_one() == '321ms'
    finally:
        await engine.dispose()


async def _kill(pid: int) -> None:
    async with get_db_session(account=Unscoped.OWNER) as admin:
        await admin.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})


async def test_a_first_statement_whose_connection_is_lost_runs_again_on_a_fresh_one() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
    # The first statement of the next read-only session waits on a lock: its backend is killed meanwhile.
    async with get_db_session(account=Unscoped.OWNER) as locker:
        await locker.execute(text('LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE'))

        async def read() -> tuple[int, int]:
            async with get_read_only_session(account=Unscoped.ADMIN) as session:
                count = (await session.execute(text('SELECT count(*) FROM accounts'))).scalar_one()
                return count, (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()

        reading = asyncio.create_task(read())
        blocked = await _wait_for_blocked_backend(locker)
        await _kill(blocked)
    count, served_by = await reading
    assert count == 0 and served_by != blocked and pid
    assert pool_status().checked_out == 0


async def test_a_later_statement_is_never_repeated() -> None:
    with pytest.raises(DatabaseDisconnectedError):
        async with get_read_only_session(account=Unscoped.ADMIN) as session:
            pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
            await _kill(pid)
            await session.execute(text('SELECT 1'))
    assert pool_status().checked_out == 0


async def _wait_for_blocked_backend(session: Any) -> int:
    for _ in range(500):
        await session.execute(text('SELECT pg_stat_clear_snapshot()'))
        pid = (
            await session.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database() "
                    "AND query LIKE 'SELECT count(*) FROM accounts%' AND pid <> pg_backend_pid()"
                )
            )
        ).scalar()
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError('the read never started')
