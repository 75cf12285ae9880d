"""Tenant isolation through a real PgBouncer in transaction mode (issue 17 with the pooler of issue 15): the role and
tenant ride on each transaction's BEGIN, transaction-local, so no client ever sees another's tenant."""

from __future__ import annotations

import asyncio
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
    async with get_engine().connect() as connection:
        autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
        for _ in range(8):
            user, tenant = (
                await autocommit.execute(text("SELECT current_user, current_setting('app.account_id', true)"))
            ).one()
            assert user not in FUNCTION_ROLES and tenant in (None, '')
