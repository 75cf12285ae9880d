"""Test harness: one real PostgreSQL per test run, state reset before every test.

The server is the embedded one, started in a temporary directory, or the server in `DATABASE_URL`
when that is set (its runtime tables are truncated between tests: never point it at data you keep).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import logfire
import pydantic_ai.models
import pytest
import pytest_asyncio
from sqlalchemy import insert, text

from agentrt.agents.runtime import shutdown_runtime
from agentrt.db.engine import get_engine, init_database
from agentrt.db.models import Account, AgentInstance, Base, DirectoryEntry
from agentrt.db.session import get_db_session
from agentrt.db.settings import Settings
from agentrt.services.background import drain_supervisor
from agentrt.services.demo_data import seed_demo_data
from tests.pgbouncer import BINARY as PGBOUNCER_BINARY
from tests.pgbouncer import PgBouncer, PooledDatabase, bouncer_for
from tests.private_database import PrivateDatabase

# No test may reach a real model provider, and no span may leave the machine.
pydantic_ai.models.ALLOW_MODEL_REQUESTS = False
logfire.configure(send_to_logfire=False, console=False)

TEST_POOL_SIZE = 5
TEST_MAX_OVERFLOW = 5


def _test_settings(data_dir: Path) -> Settings:
    return Settings(
        database_url=os.environ.get('DATABASE_URL') or None,
        data_dir=data_dir,
        pool_size=TEST_POOL_SIZE,
        max_overflow=TEST_MAX_OVERFLOW,
        pool_timeout=30,
        model='demo',
    )


@pytest_asyncio.fixture(scope='session', autouse=True)
async def database() -> AsyncIterator[Settings]:
    """Start (or connect to) PostgreSQL once, migrated to head, for the whole run.

    The embedded server's data lives in a directory this run creates for itself, not under pytest's shared
    basetemp, which another run's clean-up may delete while this one is using it.
    """
    data_root = Path(tempfile.mkdtemp(prefix='agentrt-test-pg-'))
    # atexit runs handlers last-in first-out: registered before the server starts (whose stop handler comes
    # later), the directory goes only after the server has stopped.
    atexit.register(shutil.rmtree, data_root, ignore_errors=True)
    settings = _test_settings(data_root / 'data')
    await init_database(settings, migrate=True)
    if settings.uses_embedded:
        # A throwaway cluster: durability buys nothing here and costs seconds per run.
        async with get_engine().connect() as conn:
            await conn.execute(text('COMMIT'))
            await conn.execute(text('ALTER SYSTEM SET fsync = off'))
            await conn.execute(text('ALTER SYSTEM SET synchronous_commit = off'))
            await conn.execute(text('SELECT pg_reload_conf()'))
    yield settings
    await shutdown_runtime()


@pytest_asyncio.fixture(scope='session')
async def private_database(database: Settings) -> AsyncIterator[PrivateDatabase]:
    """A PostgreSQL of the run's own (with SSL when Debian's PostgreSQL 15 is installed), migrated and seeded, for
    what must not happen to the shared server: restarts, killed backends, SSL. Made on first use only."""
    private = await PrivateDatabase.create()
    yield private
    await private.close()


@pytest.fixture(scope='session')
def pgbouncer(database: Settings) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of the shared test server, with a budget of 4 server connections (so
    the runtime's 5 + 5 client connections share them, as behind a production pooler). `.ci/run` installs it; a run
    without it skips the pooler tests, except in CI where that is a failure."""
    if PGBOUNCER_BINARY is None:
        if os.environ.get('CI'):
            pytest.fail('pgbouncer is not installed: .ci/run installs it with apt')
        pytest.skip('pgbouncer is not installed (apt-get install pgbouncer)')
    bouncer = bouncer_for(get_engine().url, pool_size=4)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest_asyncio.fixture(scope='session')
async def pooled_database(database: Settings, pgbouncer: PgBouncer) -> AsyncIterator[PooledDatabase]:
    """The runtime on the shared server through `pgbouncer`, in the pooler mode (`DB_POOLER=pgbouncer`)."""
    pooled = await PooledDatabase.create(pgbouncer, database)
    yield pooled
    await pooled.close()


@pytest.fixture(scope='session')
def database_url(database: Settings) -> str:
    """A URL other processes (CLI and script tests) can use to reach the test server."""
    return get_engine().url.render_as_string(hide_password=False)


@pytest_asyncio.fixture(autouse=True)
async def clean_database(database: Settings) -> AsyncIterator[None]:
    """Empty every runtime table before each test; afterwards, let its background work finish."""
    names = ', '.join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    async with get_db_session() as session:
        await session.execute(text(f'TRUNCATE {names} RESTART IDENTITY CASCADE'))
    yield
    await drain_supervisor(30)


# The demo data, seeded once per run by `seed_demo_data()` and kept in a schema of its own: copying it back with
# INSERT ... SELECT inside the server takes a tenth of the time of seeding 4,500 rows again for each test.
_SNAPSHOT_SCHEMA = 'agentrt_test_demo_snapshot'
_DEMO_TABLES = (Account.__table__, AgentInstance.__table__, DirectoryEntry.__table__)


@pytest_asyncio.fixture(scope='session')
async def _demo_snapshot(database: Settings) -> AsyncIterator[None]:
    async with get_db_session() as session:
        names = ', '.join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
        await session.execute(text(f'TRUNCATE {names} RESTART IDENTITY CASCADE'))
        await seed_demo_data(session=session)
        await session.execute(text(f'DROP SCHEMA IF EXISTS {_SNAPSHOT_SCHEMA} CASCADE'))
        await session.execute(text(f'CREATE SCHEMA {_SNAPSHOT_SCHEMA}'))
        for table in _DEMO_TABLES:
            columns = _stored_columns(table)
            await session.execute(
                text(f'CREATE TABLE {_SNAPSHOT_SCHEMA}."{table.name}" AS SELECT {columns} FROM "{table.name}"')
            )
    yield
    async with get_db_session() as session:
        await session.execute(text(f'DROP SCHEMA {_SNAPSHOT_SCHEMA} CASCADE'))


def _stored_columns(table: Any) -> str:
    """The columns an INSERT may set: all but the generated ones (the search vector)."""
    return ', '.join(f'"{column.name}"' for column in table.columns if column.computed is None)


@pytest_asyncio.fixture
async def demo_data(clean_database: None, _demo_snapshot: None) -> None:
    """The seeded demo accounts, agents and directories: exactly the rows `seed_demo_data()` writes."""
    async with get_db_session() as session:
        for table in _DEMO_TABLES:
            columns = _stored_columns(table)
            await session.execute(
                text(f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM {_SNAPSHOT_SCHEMA}."{table.name}"')
            )
            # The ids were copied: move each identity on, as seeding would have.
            sequence = f"pg_get_serial_sequence('{table.name}', 'id')"
            await session.execute(text(f'SELECT setval({sequence}, (SELECT max(id) FROM "{table.name}"))'))


@pytest_asyncio.fixture
async def two_accounts(clean_database: None) -> tuple[int, int]:
    """Two accounts of their own, `alpha` and `beta` (no demo data): their ids."""
    async with get_db_session() as session:
        result = await session.execute(
            insert(Account).returning(Account.id),
            [{'slug': 'alpha', 'name': 'Alpha'}, {'slug': 'beta', 'name': 'Beta'}],
        )
        alpha, beta = result.scalars().all()
    return alpha, beta


class _AsyncioErrors(logging.Handler):
    """Collects what asyncio reports through logging rather than warnings: "Task was destroyed but it is
    pending", "Task exception was never retrieved", errors in callbacks. Any of them fails the run."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_asyncio_errors = _AsyncioErrors()
logging.getLogger('asyncio').addHandler(_asyncio_errors)


_PRIVATE_BASETEMP = pytest.StashKey[Path]()
_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give the run a temporary directory of its own unless `--basetemp` names one.

    pytest's default base (`/tmp/pytest-of-<user>/`) is shared: a run that starts later prunes old entries there,
    and would delete the data directory of a server this run still uses.
    """
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix='agentrt-pytest-')
        config.stash[_PRIVATE_BASETEMP] = Path(config.option.basetemp)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's own temporary directory (left in place when tests failed, to look at)."""
    private = config.stash.get(_PRIVATE_BASETEMP, None)
    if private is not None and config.stash.get(_PASSED, False):
        shutil.rmtree(private, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if asyncio logged a pending task, an unretrieved exception or a callback error."""
    gc.collect()  # destroyed-pending-task reports come from garbage collection
    if _asyncio_errors.messages:
        print('\nasyncio reported errors during the run:')
        for message in _asyncio_errors.messages:
            print(f'  - {message.splitlines()[0]}')
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_PASSED] = session.exitstatus == 0
