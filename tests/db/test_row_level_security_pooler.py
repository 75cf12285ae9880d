"""Tenant isolation through a real PgBouncer in transaction mode (issue 17 with the pooler of issue 15): the role and
tenant ride on each transaction's BEGIN, transaction-local, so no client ever sees another's tenant."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import get_engine
from agentrt.db.models import Account
from agentrt.db.roles import FUNCTION_ROLES
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session
from agentrt.services.demo_data import MEDICAL_ACCOUNT, PRODUCE_ACCOUNT
from tests.pgbouncer import PooledDatabase

pytestmark = pytest.mark.usefixtures('demo_data')
_SLEEP = DriverStatement.of(text('SELECT pg_sleep(:s)'))
_SAMPLE = DriverStatement.of(text('SELECT account_id FROM directory_entries ORDER BY random() LIMIT 20'))


@pytest.fixture
async def pooled(pooled_database: PooledDatabase) -> AsyncIterator[PooledDatabase]:
    async with pooled_database.active():
        yield pooled_database


async def _no_connection_keeps_a_role_or_tenant() -> None:
    """Outside a transaction, the server connections PgBouncer hands out (asked 8 times) have no role or tenant set."""
    async with get_engine().connect() as connection:
        autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
        for _ in range(8):
            user, tenant = (
                await autocommit.execute(text("SELECT current_user, current_setting('app.account_id', true)"))
            ).one()
            assert user not in FUNCTION_ROLES and tenant in (None, '')


async def test_400_concurrent_transactions_of_two_tenants_see_no_foreign_row(pooled: PooledDatabase) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ids = dict((await session.execute(select(Account.slug, Account.id))).all())
    tenants = [ids[MEDICAL_ACCOUNT], ids[PRODUCE_ACCOUNT]]

    async def one(i: int) -> tuple[int, list[int]]:
        account = tenants[i % 2]
        if i % 4 >= 2:  # a turn's start and save: statements on the driver connection (prepared, no cache here)
            async with driver_transaction(account=account) as transaction:
                await transaction.fetch(_SLEEP, {'s': random.random() / 200})
                return account, [row[0] for row in await transaction.fetch(_SAMPLE, {})]
        async with get_read_only_session(account=account) as session:
            await session.execute(text('SELECT pg_sleep(:s)'), {'s': random.random() / 200})
            rows = await session.execute(text('SELECT account_id FROM directory_entries ORDER BY random() LIMIT 20'))
            return account, list(rows.scalars())

    results = await asyncio.gather(*(one(i) for i in range(400)))
    assert len(results) == 400 and all(len(rows) == 20 for _, rows in results)
    assert sum(row != account for account, rows in results for row in rows) == 0
    # Between transactions the server connections keep neither the role nor the tenant.
    await _no_connection_keeps_a_role_or_tenant()


_TENANTS = 12


async def test_tenants_interleaved_with_errors_and_cancellations_never_see_another_tenant(
    pooled: PooledDatabase,
) -> None:
    # 12 tenants' transactions interleaved on PgBouncer's 4 server connections, a third of them ending in an error
    # (a failed statement, an exception of the caller's) or cancelled mid-statement: every transaction that runs sees
    # only its own tenant (its setting, and `accounts` under the policy: its own row), whichever server connection
    # served the failed or cancelled one before it.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ids = list(
            (
                await session.execute(
                    text(
                        'INSERT INTO accounts (slug, name) SELECT $$t$$ || i, $$T$$ || i '
                        'FROM generate_series(1, :n) AS i RETURNING id'
                    ),
                    {'n': _TENANTS},
                )
            ).scalars()
        )
    seen: list[tuple[int, str, str, list[int]]] = []
    _WHO = text("SELECT current_user, current_setting('app.account_id', true), pg_sleep(:s)")

    async def one(i: int) -> None:
        account = ids[i % _TENANTS]
        kind = i % 6
        if kind == 0:  # a statement that fails mid-transaction
            with pytest.raises(Exception, match='division by zero'):
                async with get_db_session(account=account) as session:
                    await session.execute(text('SELECT 1 / 0'))
            return
        if kind == 1:  # the caller's own exception after a statement
            with pytest.raises(LookupError):
                async with get_db_session(account=account) as session:
                    await session.execute(_WHO, {'s': 0.001})
                    raise LookupError
            return
        if kind == 2:  # cancelled mid-statement

            async def sleeper() -> None:
                async with get_db_session(account=account) as session:
                    await session.execute(_WHO, {'s': 0.3})  # (bounded: a cancel PgBouncer does not pass on)

            task = asyncio.create_task(sleeper())
            await asyncio.sleep(random.random() / 50)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return
        async with get_read_only_session(account=account) as session:
            user, tenant, _ = (await session.execute(_WHO, {'s': random.random() / 200})).one()
            visible = list((await session.execute(select(Account.id))).scalars())
        seen.append((account, user, tenant, visible))

    await asyncio.gather(*(one(i) for i in range(360)))
    assert len(seen) == 180
    assert [row for row in seen if (row[1], row[2], row[3]) != ('agentrt_app', str(row[0]), [row[0]])] == []
    await _no_connection_keeps_a_role_or_tenant()
