"""Upgrades of a database in use: from every earlier revision, with rows written at each, to this version's head as
a process starting does it (`upgrade_if_behind`); the rows kept, and each tenant's shown to that tenant only once
row-level security (0012) covers them; two processes upgrading one database at once, one process two databases."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.engine import build_engine, get_engine
from agentrt.db.migrate import (
    MIGRATION_LOCK_KEY,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
    upgrade_if_behind,
)
from agentrt.db.settings import Settings
from tests.agents.cli.helpers import run_cli

REVISIONS = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()][::-1]
A, B = 1001, 1002

# What a user of each revision had written by then: two tenants' rows in the tables that revision made or changed.
WRITTEN_AT: dict[str, list[str]] = {
    '0001_foundation': [
        f"INSERT INTO accounts (id, slug, name) VALUES ({A}, 'old-a', 'Old A'), ({B}, 'old-b', 'Old B')",
        f"INSERT INTO agent_instances (id, account_id, slug, agent_type) VALUES (1, {A}, 'bot', 'directory_assistant'),"
        f" (2, {B}, 'bot', 'directory_assistant')",
        'INSERT INTO directory_entries (id, account_id, external_id, schema_name, name, category, city, search_text)'
        f" SELECT {A} + n, {A}, 'e' || n, 'medical_providers', 'Dr. Old', 'Cardiology', 'Seattle', 'dr old'"
        ' FROM generate_series(0, 1) AS n',
    ],
    '0002_conversations': [
        "INSERT INTO conversations (account_id, conversation_id, revision, record) SELECT a, 'chat-' || a, 'r1',"
        f" jsonb_build_object('owner', a) FROM unnest(ARRAY[{A}, {B}]) AS a",
        "INSERT INTO conversation_entries (id, account_id, kind, message) SELECT 'm-' || a, a, 'request',"
        f" jsonb_build_object('text', 'hello from ' || a) FROM unnest(ARRAY[{A}, {B}]) AS a",
    ],
    '0003_llm_ledger': [
        'INSERT INTO llm_requests (id, account_id, chat_session_id, model, streamed, input_tokens, output_tokens,'
        ' cache_read_tokens, cache_write_tokens, reasoning_tokens, total_tokens, usage_reported, latency_ms, status,'
        " success, started_at, finished_at) SELECT ('00000000-0000-0000-0000-' || lpad(a::text, 12, '0'))::uuid, a,"
        f" 'chat-' || a, 'gpt-4o', false, 10, 5, 0, 0, 0, 15, true, 12.5, 'complete', true, now(), now()"
        f' FROM unnest(ARRAY[{A}, {B}]) AS a',
        'INSERT INTO llm_request_contents (request_id, kind, body, size_bytes, truncated, redactions) SELECT id,'
        " 'prompt', '[]', 2, false, 0 FROM llm_requests",
    ],
    '0004_background': [
        "UPDATE conversations SET title = 'Old title ' || account_id",
        'INSERT INTO usage_daily_rollups (day, account_id, model, requests, failed_requests, unpriced_requests,'
        ' input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, total_tokens,'
        " input_cost, output_cost, total_cost) SELECT current_date, a, 'gpt-4o', 3, 1, 0, 30, 15, 0, 0, 0, 45, 0, 0,"
        f' 0 FROM unnest(ARRAY[{A}, {B}]) AS a',
    ],
    '0006_conversation_turns': [
        "INSERT INTO conversation_turns (account_id, conversation_id, claim_id, expires_at) SELECT a, 'chat-' || a,"
        f" 'old-claim', now() - interval '1 hour' FROM unnest(ARRAY[{A}, {B}]) AS a",
    ],
    '0007_api_keys': [
        "INSERT INTO api_keys (account_id, prefix, secret_hash) SELECT a, 'k' || a, '\\x00'::bytea"
        f' FROM unnest(ARRAY[{A}, {B}]) AS a',
    ],
    '0008_ledger_error_status_code': [
        f"UPDATE llm_requests SET status = 'error', success = false, error_status_code = 429 WHERE account_id = {B}",
    ],
    '0009_budgets': [
        f"INSERT INTO account_budgets (account_id, limit_usd, period) VALUES ({A}, 12.5, 'month')",
    ],
    '0010_ledger_trace_id': [f"UPDATE llm_requests SET trace_id = 'trace-' || account_id WHERE account_id = {A}"],
}

# Each tenant's rows after the upgrade, as the request role sees them with that tenant set.
PER_TENANT = {
    'accounts': 1,
    'agent_instances': 1,
    'conversations': 1,
    'conversation_entries': 1,
    'conversation_turns': 1,
    'llm_requests': 1,
    'llm_request_contents': 1,
    'usage_daily_rollups': 1,
    'api_keys': 0,  # the request role reads no key (the tenant lookup does)
}


def _written_by(revision: str) -> list[str]:
    return [sql for rev in REVISIONS[: REVISIONS.index(revision) + 1] for sql in WRITTEN_AT.get(rev, [])]


async def _tenant_counts(engine: AsyncEngine, account_id: int) -> dict[str, int]:
    counts = {}
    async with engine.connect() as conn, conn.begin():
        await conn.execute(
            text("SELECT set_config('role', 'agentrt_app', true), set_config('app.account_id', :a, true)"),
            {'a': str(account_id)},
        )
        for table in PER_TENANT:
            if table != 'api_keys':
                counts[table] = (await conn.execute(text(f'SELECT count(*) FROM {table}'))).scalar_one()
        counts['api_keys'] = 0
        directory = await conn.execute(text('SELECT count(*) FROM directory_entries'))
        counts['directory_entries'] = directory.scalar_one()
    return counts


@pytest.mark.parametrize('revision', REVISIONS[:-1])
async def test_a_database_at_an_earlier_revision_with_rows_upgrades_keeping_them(
    database: Settings, empty_database: str, revision: str
) -> None:
    engine = build_engine(get_engine().url.set(database=empty_database), database)
    try:
        for step in REVISIONS[: REVISIONS.index(revision) + 1]:
            await upgrade(engine, step)
            async with engine.begin() as conn:
                for sql in WRITTEN_AT.get(step, []):
                    await conn.execute(text(sql))
        async with engine.connect() as conn:
            before = {
                table: (await conn.execute(text(f'SELECT * FROM {table} ORDER BY 1'))).mappings().all()
                for table in ('accounts', 'conversations', 'conversation_entries', 'llm_requests')
                if (await conn.execute(text('SELECT to_regclass(:t)'), {'t': table})).scalar_one() is not None
            }

        assert await upgrade_if_behind(engine) is True  # what a process starting on it does
        assert await current_revision(engine) == head_revision()

        async with engine.connect() as conn:  # as the owner (a superuser here): every row, every value kept
            for table, rows in before.items():
                after = (await conn.execute(text(f'SELECT * FROM {table} ORDER BY 1'))).mappings().all()
                assert [{k: row[k] for k in rows[0]} for row in after] == rows if rows else not after, table
        written = _written_by(revision)
        if not written:
            return
        a, b = await _tenant_counts(engine, A), await _tenant_counts(engine, B)
        expected = {table: count for table, count in PER_TENANT.items() if any(table in sql for sql in written)}
        assert {table: a[table] for table in expected} == expected
        assert {table: b[table] for table in expected} == expected
        assert a['directory_entries'] == 2 and b['directory_entries'] == 0
        assert await _tenant_counts(engine, 999) == dict.fromkeys(a, 0)  # a tenant with no rows sees none
    finally:
        await engine.dispose()


async def test_two_processes_upgrading_one_database_at_once_both_succeed(
    database: Settings, database_url: str, empty_database: str
) -> None:
    # An operator's `db upgrade` and a command starting (auto-migrate) at once on a schema behind: the migrations'
    # transaction-level advisory lock makes one wait, then find the schema at head.
    engine = build_engine(get_engine().url.set(database=empty_database), database)
    try:
        await upgrade(engine, '0003_llm_ledger')
        env = {'DATABASE_URL': make_url(database_url).set(database=empty_database).render_as_string(False)}
        upgraded, listed = await asyncio.gather(
            asyncio.to_thread(run_cli, 'db', 'upgrade', env=env), asyncio.to_thread(run_cli, 'keys', 'list', env=env)
        )
        assert upgraded.returncode == 0 and 'error' not in upgraded.stderr, upgraded.stderr
        assert listed.returncode == 0 and 'error' not in listed.stderr, listed.stderr
        async with engine.connect() as conn:
            versions = (await conn.execute(text('SELECT version_num FROM alembic_version'))).scalars().all()
        assert versions == [head_revision()]
    finally:
        await engine.dispose()


async def test_two_databases_migrated_at_once_by_one_process_both_succeed(
    database: Settings, empty_database: str
) -> None:
    # Alembic keeps the running migration in module globals (`alembic.context`, `alembic.op`); two upgrades of one
    # event loop interleave at each statement (greenlets), so the second one's context replaced the first's:
    # "MigrationError: ... KeyError: 'script'" (an application migrating several databases with `asyncio.gather`).
    other = f'{empty_database}_b'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {other}'))
    engines = [build_engine(get_engine().url.set(database=name), database) for name in (empty_database, other)]
    try:
        done = await asyncio.gather(*(upgrade_if_behind(engine) for engine in engines), return_exceptions=True)
        assert done == [True, True]
        assert [await current_revision(engine) for engine in engines] == [head_revision()] * 2
    finally:
        for engine in engines:
            await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS {other} WITH (FORCE)'))


async def test_a_process_waits_for_another_ones_migration_longer_than_its_timeouts(
    database: Settings, empty_database: str
) -> None:
    # Another process's migration (a long backfill) held the migration lock: a process starting meanwhile waited at
    # most DB_LOCK_TIMEOUT_MS (10 s), then failed "PostgreSQL stopped waiting for a lock that another session holds",
    # exit 3, where README says concurrent migrations wait for each other. Its own statements keep their timeouts.
    url = get_engine().url.set(database=empty_database)
    quick = database.model_copy(update={'lock_timeout_ms': 200, 'statement_timeout_ms': 300})
    engine, holder = build_engine(url, quick), build_engine(url, database)
    try:
        async with holder.connect() as other, other.begin():
            await other.execute(text('SELECT pg_advisory_xact_lock(:key)'), {'key': MIGRATION_LOCK_KEY})
            migrating = asyncio.create_task(upgrade_if_behind(engine))
            for _ in range(600):  # a poll: until the migrator has waited past both its timeouts, or failed
                if migrating.done() or await _waited_past(holder, 0.5):
                    break
                await asyncio.sleep(0.05)
        assert await migrating is True
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
        await holder.dispose()


async def _waited_past(engine: AsyncEngine, seconds: float) -> bool:
    """Whether a backend of the database has waited for an advisory lock longer than `seconds` (a new transaction
    each time: a transaction sees one snapshot of `pg_stat_activity`)."""
    waited = text(
        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) WHERE l.locktype = 'advisory'"
        ' AND NOT l.granted AND a.datname = current_database()'
        ' AND clock_timestamp() - a.query_start > make_interval(secs => :seconds)'
    )
    async with engine.connect() as connection:
        return bool((await connection.execute(waited, {'seconds': seconds})).scalar_one())


async def test_a_process_whose_wait_ended_in_another_ones_migration_says_it_migrated_nothing(
    database: Settings, database_url: str, empty_database: str
) -> None:
    # Processes starting at once on a fresh data directory each said "upgrading to ...", and only one of them did.
    url = get_engine().url.set(database=empty_database)
    holder = build_engine(url, database)
    waiter_url = make_url(database_url).set(database=empty_database).render_as_string(hide_password=False)
    try:
        async with holder.connect() as other:
            await other.execute(text('SELECT pg_advisory_xact_lock(:key)'), {'key': MIGRATION_LOCK_KEY})
            # The waiter is another process: Alembic's context is one per process, so a second migration in this one
            # would have run in the waiting one's.
            waiter = await asyncio.create_subprocess_exec(
                sys.executable, '-c', _INIT_AND_LOG, env={**os.environ, 'DATABASE_URL': waiter_url},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            for _ in range(1200):  # a poll: until the other process waits for the lock this one holds
                if waiter.returncode is not None or await _waited_past(holder, 0.1):
                    break
                await asyncio.sleep(0.05)
            assert waiter.returncode is None
            # Migrated in the transaction holding the lock (its session takes it again), and committed: the waiter
            # then finds the schema at head.
            await other.run_sync(_migrate_holding_the_lock)
        output, _ = await asyncio.wait_for(waiter.communicate(), 120)
        said = output.decode().splitlines()
        head = head_revision()
        assert waiter.returncode == 0, said
        assert said[0] == f'database schema at empty, upgrading to {head}', said
        assert said[1].startswith('another process is migrating this database'), said
        assert said[2:] == [f'database schema at {head}: another process upgraded it meanwhile; nothing migrated here']
        assert await current_revision(holder) == head
    finally:
        await holder.dispose()


_INIT_AND_LOG = """
import asyncio, logging
from agentrt.db.engine import close_database, init_database
logging.basicConfig(level=logging.INFO, format='%(message)s')
logging.getLogger().handlers[0].addFilter(lambda record: record.name.split('.')[:2] == ['agentrt', 'db'])
async def main():
    await init_database()
    await close_database()
asyncio.run(main())
"""


def _migrate_holding_the_lock(connection: Connection) -> None:
    config = alembic_config()
    config.attributes['connection'] = connection
    command.upgrade(config, 'head')


async def test_a_process_waiting_for_another_ones_migration_says_so(
    database: Settings, empty_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The wait lasts as long as the other migration does: a command said "upgrading to ..." and then nothing at all.
    url = get_engine().url.set(database=empty_database)
    engine, holder = build_engine(url, database), build_engine(url, database)
    try:
        async with holder.connect() as other, other.begin():
            pid = (await other.execute(text('SELECT pg_backend_pid()'))).scalar_one()
            await other.execute(text('SELECT pg_advisory_xact_lock(:key)'), {'key': MIGRATION_LOCK_KEY})
            with caplog.at_level(logging.WARNING, logger='agentrt.db'):
                migrating = asyncio.create_task(upgrade_if_behind(engine))
                for _ in range(600):  # a poll: until the migrator said it waits
                    if migrating.done() or caplog.records:
                        break
                    await asyncio.sleep(0.05)
                assert not migrating.done()
        assert await migrating is True
        [said] = [record.getMessage() for record in caplog.records]
        assert re.fullmatch(
            rf'another process is migrating this database \(its PostgreSQL session: pid {pid} \(agentrt\), since '
            r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+ s ago\)\): waiting for it to finish',
            said,
        ), said
    finally:
        await engine.dispose()
        await holder.dispose()
