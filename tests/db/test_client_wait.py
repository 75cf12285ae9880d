"""The client's wait for an answer: a server that stops answering fails the operation in bounded time.

PostgreSQL's `statement_timeout` cannot fire in a server that is frozen (or behind a network that drops packets), and
turns waited for it without end. Each answer is now waited for at most the transaction's statement timeout plus a
margin (`client_wait`); a wait that runs out discards the connection and is reported as `DatabaseDisconnectedError`.
The backend is frozen with SIGSTOP, as a frozen server is (one backend: the rest of the test server keeps serving).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.db import transaction_setup
from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import build_engine, current_settings, get_engine
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.failures import StatementNotAnswered
from agentrt.db.session import Unscoped, get_db_session, get_side_session, retry_on_disconnect
from agentrt.db.settings import Settings
from agentrt.db.transaction_setup import TransactionSetup, client_wait, waiting_without_end

IN_USE_MARGIN = transaction_setup.CLIENT_WAIT_MARGIN_SECONDS
MARGIN = 0.4
"""The margin the tests wait past a statement timeout (5 s in use): the tests take a second, not six."""

PID = DriverStatement.of(text('SELECT pg_backend_pid()'))
ONE = DriverStatement.of(text('SELECT 1'))


@pytest.fixture(autouse=True)
def short_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transaction_setup, 'CLIENT_WAIT_MARGIN_SECONDS', MARGIN)


def _local_backend(pid: int) -> bool:
    """Whether `pid` is a PostgreSQL backend on this machine that this process may signal (the embedded server)."""
    try:
        if Path(f'/proc/{pid}/comm').read_text().strip() != 'postgres':
            return False
        os.kill(pid, 0)  # may this process signal it
    except OSError:
        return False
    return True


class Freezer:
    """Stops backends (SIGSTOP) on request: they read nothing and answer nothing, as a frozen server; all are
    thawed (SIGCONT) when the `with` block ends."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def freeze(self, pid: int) -> None:
        if not _local_backend(pid):
            pytest.skip(f'backend {pid} is not a local PostgreSQL process this test may stop (DATABASE_URL elsewhere)')
        self.pids.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


async def _gone(pid: int) -> bool:
    """Whether the backend `pid` has ended (its client closed the connection), waiting for it up to 5 s."""
    for _ in range(50):
        async with get_db_session(account=Unscoped.OWNER) as owner:
            found = await owner.execute(text('SELECT count(*) FROM pg_stat_activity WHERE pid = :pid'), {'pid': pid})
            if found.scalar_one() == 0:
                return True
        await asyncio.sleep(0.1)
    return False


def _health() -> Any:
    return get_engine().sync_engine.pool.agentrt_health  # type: ignore[attr-defined]


async def test_a_session_waits_its_statement_timeout_plus_the_margin_then_says_the_server_did_not_answer(
    clean_database: None,
) -> None:
    disconnects = _health().disconnects
    with Freezer() as freezer, pytest.raises(DatabaseDisconnectedError) as raised:
        # The wait and no more: the connection is terminated, not closed gracefully (2 s more for a frozen server).
        async with asyncio.timeout(MARGIN + 0.3 + 1):
            async with get_side_session(account=Unscoped.OWNER, statement_timeout_ms=300) as session:
                pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
                freezer.freeze(pid)
                await session.execute(text('SELECT 1'))
    message = str(raised.value)
    assert 'did not answer a statement within 0.7s' in message, message
    assert 'DB_STATEMENT_TIMEOUT_MS or its own, plus 0.4s' in message and 'did not complete' in message
    assert 'cannot connect' not in message and 'DB_CONNECT_TIMEOUT' not in message  # not said as a connect failure
    assert _health().disconnects == disconnects + 1  # the pool tests its other connections before handing them out
    assert await _gone(pid)  # the connection was discarded, not handed back to the pool
    async with get_db_session(account=Unscoped.OWNER) as session:  # the next operation gets a working one
        assert (await session.execute(text('SELECT 1'))).scalar_one() == 1


async def test_a_commit_that_is_not_answered_is_reported_with_its_outcome_unknown(clean_database: None) -> None:
    with Freezer() as freezer, pytest.raises(DatabaseDisconnectedError, match='whether it did is unknown'):
        async with asyncio.timeout(MARGIN + 0.3 + 1):
            async with get_side_session(account=Unscoped.OWNER, statement_timeout_ms=300) as session:
                pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
                freezer.freeze(pid)  # the block ends here: its COMMIT goes to the frozen backend
    assert await _gone(pid)


async def test_a_driver_transaction_discards_the_connection_at_once_and_says_the_server_did_not_answer(
    clean_database: None,
) -> None:
    setup = TransactionSetup(statement_timeout_ms=300)
    drivers: list[Any] = []
    with Freezer() as freezer, pytest.raises(DatabaseDisconnectedError, match=r'within 0\.7s') as raised:
        async with asyncio.timeout(MARGIN + 0.3 + 1):
            async with driver_transaction(account=Unscoped.OWNER, setup=setup) as transaction:
                drivers.append(transaction._driver)
                pid = (await transaction.fetch(PID, {}))[0][0]
                freezer.freeze(pid)
                await transaction.fetch(ONE, {})
    assert type(raised.value.__cause__).__name__ == 'StatementNotAnswered'
    assert drivers[0].is_closed()
    assert await _gone(pid)
    assert get_engine().sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_each_transaction_waits_its_own_statement_timeout_and_the_connection_goes_back_to_the_default(
    clean_database: None,
) -> None:
    default = current_settings().statement_timeout_ms / 1000 + IN_USE_MARGIN  # as the engine's connections connected
    async with get_db_session(account=Unscoped.OWNER) as session:
        driver: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.waiting() == default
    async with get_side_session(account=Unscoped.OWNER, statement_timeout_ms=1500) as session:
        await session.execute(text('SELECT 1'))
        driver = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.waiting() == 1.5 + MARGIN
    assert driver.waiting() == default  # checked in: the next transaction on it waits the default again
    async with driver_transaction(account=Unscoped.OWNER, setup=TransactionSetup(statement_timeout_ms=0)) as tx:
        assert tx._driver.waiting() is None  # no statement timeout: no client-side bound either
    assert tx._driver.waiting() == default


async def test_without_a_statement_timeout_there_is_no_client_side_wait_and_the_migration_lock_waits_without_end(
    database: Settings, database_url: str
) -> None:
    from agentrt.db.database_url import parse_database_url

    assert client_wait(0) is None and client_wait(2_000) == 2 + MARGIN
    engine = build_engine(parse_database_url(database_url), database.model_copy(update={'statement_timeout_ms': 0}))
    try:
        async with engine.connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            assert driver.waiting() is None
    finally:
        await engine.dispose()
    async with get_engine().connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        before = driver.waiting()
        assert before is not None

        def lock_wait(sync_connection: Any) -> float | None:
            with waiting_without_end(sync_connection):
                return driver.waiting()  # type: ignore[no-any-return]

        assert await connection.run_sync(lock_wait) is None
        assert driver.waiting() == before


async def test_an_operation_whose_server_did_not_answer_is_not_repeated() -> None:
    # A repeat waited for a new connection's DB_CONNECT_TIMEOUT on top, and then hid the error behind "cannot connect".
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        try:
            raise StatementNotAnswered(8.0) from TimeoutError()
        except StatementNotAnswered as exc:
            raise DatabaseDisconnectedError('PostgreSQL did not answer a statement within 8s') from exc

    with pytest.raises(DatabaseDisconnectedError, match='did not answer'):
        await retry_on_disconnect(operation, what='a read')
    assert calls == 1


async def test_a_pooled_connection_that_does_not_answer_its_ping_is_replaced_after_the_margin_not_the_whole_wait(
    database: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A connection a firewall dropped while idle, or whose backend froze, held each checkout that found one for a
    # statement's whole wait (35 s by default; QA: a turn took 74 s on two of them). `SELECT 1` has nothing to time
    # out: the ping waits the margin alone, and the checkout goes on with a new connection.
    from agentrt.db.database_url import parse_database_url

    engine = build_engine(
        parse_database_url(database_url), database.model_copy(update={'pool_size': 1, 'max_overflow': 0})
    )
    health = engine.sync_engine.pool.agentrt_health  # type: ignore[attr-defined]
    try:
        async with engine.connect() as connection:
            pid = (await connection.execute(text('SELECT pg_backend_pid()'))).scalar_one()
            driver: Any = (await connection.get_raw_connection()).driver_connection
            assert driver.waiting() == database.statement_timeout_ms / 1000 + MARGIN  # a statement's whole wait
        with Freezer() as freezer:
            freezer.freeze(pid)
            health._disconnected()  # a disconnect elsewhere: the pooled connection is tested at its next checkout
            pings = health.pings
            async with asyncio.timeout(MARGIN + 3):
                async with engine.connect() as connection:
                    replaced = (await connection.execute(text('SELECT pg_backend_pid()'))).scalar_one()
                    new_driver: Any = (await connection.get_raw_connection()).driver_connection
        assert replaced != pid and health.pings == pings + 1
        assert driver.is_closed()  # terminated, not closed gracefully (2 s more for a frozen backend)
        assert new_driver.waiting() == database.statement_timeout_ms / 1000 + MARGIN  # the ping's wait was its own
        assert f'did not answer its ping (PostgreSQL did not answer within {MARGIN:g}s)' in caplog.text
        assert await _gone(pid)
    finally:
        await engine.dispose()
