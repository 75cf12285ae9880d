"""Two tenants' transactions at once on one pool: none ever runs as the other tenant, or carries its role or tenant on
to the next user of its connection, however it ends (committed, an error of the caller or of the server, cancelled
mid-statement, its backend terminated), through every way the runtime opens a transaction."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import get_engine
from agentrt.db.roles import APP_ROLE
from agentrt.db.session import (
    Unscoped,
    get_db_session,
    get_read_only_session,
    get_side_session,
    scoped_connection,
)

pytestmark = pytest.mark.usefixtures('demo_data')

WHO = (
    "SELECT current_user, current_setting('app.account_id', true), (SELECT count(*) FROM agent_instances),"
    ' pg_backend_pid()'
)
Probe = Callable[[str], Any]


@asynccontextmanager
async def _session(opener: Callable[..., AbstractAsyncContextManager[Any]], account: int) -> AsyncIterator[Probe]:
    async with opener(account=account) as session:

        async def run(sql: str) -> Any:
            return tuple((await session.execute(text(sql))).one())

        yield run


@asynccontextmanager
async def _driver(account: int) -> AsyncIterator[Probe]:
    async with driver_transaction(account=account) as transaction:

        async def run(sql: str) -> Any:
            return tuple((await transaction.fetch(DriverStatement.of(text(sql)), {}))[0])

        yield run


@asynccontextmanager
async def _core(account: int) -> AsyncIterator[Probe]:
    async with scoped_connection(account=account) as connection:

        async def run(sql: str) -> Any:
            return tuple((await connection.execute(text(sql))).one())

        yield run


OPENERS: dict[str, Callable[[int], AbstractAsyncContextManager[Probe]]] = {
    'session': lambda account: _session(get_db_session, account),
    'read_only': lambda account: _session(get_read_only_session, account),
    'side': lambda account: _session(get_side_session, account),
    'driver': _driver,
    'core': _core,
}
ENDINGS = ('commit', 'caller_error', 'server_error', 'cancelled', 'terminated')


async def _terminate(pid: int) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})


async def _one(opener: str, ending: str, account: int, seen: list[tuple[str, str, int, int]]) -> None:
    try:
        async with OPENERS[opener](account) as run:
            user, tenant, agents, pid = await run(WHO)
            seen.append((user, tenant, agents, account))
            await asyncio.sleep(0)  # the other tenant's transactions run meanwhile
            if ending == 'caller_error':
                raise LookupError('the caller failed')
            if ending == 'server_error':
                await run('SELECT 1 / 0')
            if ending == 'cancelled':
                async with asyncio.timeout(0.01):
                    await run('SELECT pg_sleep(5)')
            if ending == 'terminated':
                await _terminate(pid)
                await run('SELECT 1')
            user, tenant, agents, _ = await run(WHO)
            seen.append((user, tenant, agents, account))
    except Exception as exc:  # each ending's own error (a timeout, a lost connection...): what matters is after
        if ending == 'commit':
            raise AssertionError(f'{opener} failed without being made to: {exc!r}') from exc


async def test_two_tenants_at_once_never_see_each_other_however_their_transactions_end() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        accounts = list((await session.execute(text('SELECT id FROM accounts ORDER BY id'))).scalars())
    rng = random.Random(7)
    work = [(opener, ending, account) for opener in OPENERS for ending in ENDINGS for account in accounts] * 2
    rng.shuffle(work)
    seen: list[tuple[str, str, int, int]] = []
    for start in range(0, len(work), 8):  # eight at a time: more than the pool has idle, so connections go round
        await asyncio.gather(
            *(_one(opener, ending, account, seen) for opener, ending, account in work[start : start + 8])
        )
    assert seen and {(user, tenant, agents) for user, tenant, agents, _ in seen} == {
        (APP_ROLE, str(a), 1) for a in accounts
    }
    assert all(tenant == str(account) for _, tenant, _, account in seen)

    # Every connection the pool holds now: the login role, no tenant, outside any transaction.
    pool = get_engine().sync_engine.pool
    connections = [await get_engine().connect() for _ in range(pool.size())]  # type: ignore[attr-defined]
    try:
        for connection in connections:
            state = (
                await connection.exec_driver_sql("SELECT current_user, current_setting('app.account_id', true)")
            ).one()
            assert state[0] != APP_ROLE and state[1] in ('', None), state
            await connection.rollback()
    finally:
        for connection in connections:
            await connection.close()
