"""`agentrt db upgrade` as separate processes: two at once on one database, and one killed in the middle of its
migrations (SIGKILL: no handler runs), then run again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.engine import build_engine, get_engine
from agentrt.db.migrate import MIGRATION_LOCK_KEY, head_revision, upgrade
from agentrt.db.settings import Settings
from tests.agents.cli.helpers import ROOT, run_cli


def _env(database_url: str, name: str) -> dict[str, str]:
    return {'DATABASE_URL': make_url(database_url).set(database=name).render_as_string(False)}


async def _versions(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(text('SELECT version_num FROM alembic_version'))).scalars().all())


async def test_two_db_upgrades_at_once_both_succeed_and_the_second_says_it_had_nothing_to_do(
    database: Settings, database_url: str, empty_database: str
) -> None:
    env = _env(database_url, empty_database)
    first, second = await asyncio.gather(
        asyncio.to_thread(run_cli, 'db', 'upgrade', env=env), asyncio.to_thread(run_cli, 'db', 'upgrade', env=env)
    )
    for done in (first, second):
        assert done.returncode == 0, done.stderr
        assert 'Traceback' not in done.stderr and 'error' not in done.stderr.lower(), done.stderr
    head = head_revision()
    # One migrated the empty database; the other waited for its lock, then found nothing to do (it read `empty`
    # before waiting, and said "schema: empty -> head" as if it had migrated it too).
    said = sorted(done.stdout.strip() for done in (first, second))
    assert said == sorted([f'schema: empty -> {head}', f'schema already at {head}']), said
    engine = build_engine(get_engine().url.set(database=empty_database), database)
    try:
        assert await _versions(engine) == [head]
    finally:
        await engine.dispose()


async def test_a_db_upgrade_killed_mid_migration_leaves_the_old_revision_and_the_next_one_completes(
    database: Settings, database_url: str, empty_database: str
) -> None:
    engine = build_engine(get_engine().url.set(database=empty_database), database)
    try:
        await upgrade(engine, '0003_llm_ledger')
        # A long lock wait: the backend's end below is the lost client's, not the wait's (`lock_timeout`) ending it.
        env = {**os.environ, **_env(database_url, empty_database), 'DB_LOCK_TIMEOUT_MS': '120000'}
        async with engine.connect() as holder, holder.begin():
            # 0008 adds a column to llm_requests: the upgrade runs 0004 to 0007 in its transaction, then waits here.
            await holder.execute(text('LOCK TABLE llm_requests IN ACCESS SHARE MODE'))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                '-m',
                'agentrt.agents.cli',
                'db',
                'upgrade',
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                backend = await _waiting_on(engine, 'llm_requests', process)
                assert backend is not None, await process.communicate()
                query = text('SELECT query FROM pg_stat_activity WHERE pid = :pid')
                async with engine.connect() as conn:
                    blocked = (await conn.execute(query, {'pid': backend})).scalar_one()
                assert 'ADD COLUMN error_status_code' in blocked  # 0008's: 0004 to 0007 ran in its transaction
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)  # no handler, no rollback of its own: as `kill -9` does
                await process.communicate()
            assert process.returncode == -signal.SIGKILL
            # Still holding the lock it waits for: the killed client's backend notices its client is gone
            # (`client_connection_check_interval`, 1 s) and rolls back. It waited for the lock, holding the migration
            # lock and the ones its migrations took, until a statement of its own ended (QA: 22 s of a backfill).
            killed_at = time.monotonic()
            for _ in range(400):  # a poll, 20 s at most
                if not await _alive(engine, backend):
                    break
                await asyncio.sleep(0.05)
            assert time.monotonic() - killed_at < 10, "the killed migrator's backend outlived its client"
            assert not await _migration_locked(engine)
        assert await _versions(engine) == ['0003_llm_ledger']
        async with engine.connect() as conn:
            made = (await conn.execute(text("SELECT to_regclass('usage_daily_rollups') IS NOT NULL"))).scalar_one()
            columns = (
                await conn.execute(
                    text(
                        'SELECT count(*) FROM information_schema.columns'
                        " WHERE table_name = 'conversations' AND column_name = 'title'"
                    )
                )
            ).scalar_one()
        assert not made and columns == 0  # nothing of 0004 (a table, a column) was kept

        again = await asyncio.to_thread(run_cli, 'db', 'upgrade', env=_env(database_url, empty_database))
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f'schema: 0003_llm_ledger -> {head_revision()}'
        assert await _versions(engine) == [head_revision()]
    finally:
        await engine.dispose()


async def _alive(engine: AsyncEngine, backend: int) -> bool:
    async with engine.connect() as conn:
        query = text('SELECT count(*) FROM pg_stat_activity WHERE pid = :pid')
        return bool((await conn.execute(query, {'pid': backend})).scalar_one())


async def _migration_locked(engine: AsyncEngine) -> bool:
    """Whether a session holds the migration lock (`migrate.MIGRATION_LOCK_KEY`) on the engine's database."""
    async with engine.connect() as conn:
        # A lock taken at once, then given back at the transaction's end.
        return not (
            await conn.execute(text('SELECT pg_try_advisory_xact_lock(:key)'), {'key': MIGRATION_LOCK_KEY})
        ).scalar_one()


async def _waiting_on(engine: AsyncEngine, table: str, process: asyncio.subprocess.Process) -> int | None:
    """The pid of the backend waiting for a lock on `table` (the migration, blocked), or None if the process ended."""
    query = text(
        'SELECT l.pid FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation'
        ' WHERE NOT l.granted AND c.relname = :table AND l.database = (SELECT oid FROM pg_database'
        ' WHERE datname = current_database())'
    )
    for _ in range(1200):  # a poll: the process starts (imports, connect), then migrates until it blocks
        async with engine.connect() as conn:
            pid = (await conn.execute(query, {'table': table})).scalar_one_or_none()
        if pid is not None:
            return int(pid)
        if process.returncode is not None:
            return None
        await asyncio.sleep(0.05)
    return None
