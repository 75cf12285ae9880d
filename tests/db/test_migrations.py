"""Migrations: the database is at head, and every migration can be applied and reverted on a fresh database."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db import migrate
from agentrt.db.engine import build_engine, get_engine
from agentrt.db.errors import DatabaseUnavailableError, MigrationError
from agentrt.db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
    upgrade_if_behind,
)
from agentrt.db.schema_version import at_packaged_head, head_of, packaged_head
from agentrt.db.settings import Settings
from tests.agents.cli.helpers import invoke


async def test_test_database_is_at_head() -> None:
    assert await current_revision(get_engine()) == head_revision()
    assert await upgrade_if_behind(get_engine()) is False
    assert await at_packaged_head(get_engine()) is True


def test_the_head_read_from_the_files_is_alembics() -> None:
    assert packaged_head() == head_revision()


def _versions_copy(tmp_path: Path) -> Path:
    versions = tmp_path / 'versions'
    shutil.copytree(MIGRATIONS_DIR / 'versions', versions, ignore=shutil.ignore_patterns('__pycache__'))
    return versions


def test_a_new_migration_is_the_new_head(tmp_path: Path) -> None:
    versions = _versions_copy(tmp_path)
    (versions / '9999_next.py').write_text(f"revision = '9999_next'\ndown_revision = {head_revision()!r}\n")
    assert head_of(versions) == '9999_next'


@pytest.mark.parametrize(
    'extra',
    [
        "revision = 'merge'\ndown_revision = ('a', 'b')\n",  # a merge: not read here
        'revision = REVISION\ndown_revision = None\n',  # not a literal
        "down_revision = '0001_foundation'\n",  # no revision line
        "revision = 'branch'\ndown_revision = '0001_foundation'\n",  # a second head
        "revision = 'orphan'\ndown_revision = 'not_a_revision'\n",  # a parent that is not there
    ],
    ids=['merge', 'not-literal', 'no-revision', 'two-heads', 'missing-parent'],
)
def test_files_that_do_not_say_the_head_for_certain_leave_it_to_alembic(tmp_path: Path, extra: str) -> None:
    versions = _versions_copy(tmp_path)
    (versions / '9999_extra.py').write_text(extra)
    assert head_of(versions) is None


async def test_upgrade_downgrade_upgrade_on_a_fresh_database(database: Settings) -> None:
    name = f'migrations_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {name}'))
    engine = build_engine(get_engine().url.set(database=name), database)
    try:
        assert await current_revision(engine) is None
        assert await at_packaged_head(engine) is False  # no alembic_version table
        assert await upgrade_if_behind(engine) is True
        assert await current_revision(engine) == head_revision()
        assert await at_packaged_head(engine) is True
        async with engine.begin() as conn:  # a database one migration behind
            await conn.execute(text("UPDATE alembic_version SET version_num = '0012_row_level_security'"))
        assert await at_packaged_head(engine) is False
        async with engine.begin() as conn:
            await conn.execute(text('UPDATE alembic_version SET version_num = :head'), {'head': head_revision()})
        await _downgrade_to_base(engine)
        assert await current_revision(engine) is None
        assert await at_packaged_head(engine) is False  # the table is there, empty
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS {name}'))


async def _downgrade_to_base(engine) -> None:
    from alembic import command

    def run(connection) -> None:
        config = alembic_config()
        config.attributes['connection'] = connection
        command.downgrade(config, 'base')

    async with engine.connect() as conn:
        await conn.run_sync(run)


async def test_a_failed_migration_shows_its_own_error_and_applies_nothing(
    database: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = tmp_path / 'migrations'
    shutil.copytree(MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns('__pycache__'))
    (migrations / 'versions' / '9999_broken.py').write_text(
        f"revision = '9999_broken'\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n"
        'from alembic import op\n\n\ndef upgrade():\n    op.execute("SELECT 1 / 0")\n\n\ndef downgrade():\n    pass\n'
    )
    monkeypatch.setattr(migrate, 'MIGRATIONS_DIR', migrations)
    name = f'migrations_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {name}'))
    engine = build_engine(get_engine().url.set(database=name), database)
    try:
        for _ in range(2):  # and again: the lock was released with the failed transaction
            with pytest.raises(MigrationError) as raised:
                await asyncio.wait_for(upgrade(engine), 30)
            message = str(raised.value)
            assert 'DivisionByZeroError: division by zero' in message
            assert 'current transaction is aborted' not in message and 'advisory' not in message
            assert 'Nothing was applied: the schema is still at empty' in message
            assert await current_revision(engine) is None
        url = engine.url.render_as_string(hide_password=False)
        result = await invoke('db', 'upgrade', env={'DATABASE_URL': url})
        assert result.exit_code == 5
        assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [f'error: {message}']
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE {name} WITH (FORCE)'))


async def _migrate_to(engine, revision: str, *, down: bool = False) -> None:
    from alembic import command

    def run(connection) -> None:
        config = alembic_config()
        config.attributes['connection'] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    async with engine.connect() as conn:
        await conn.run_sync(run)


_OLD_BUCKET = """
INSERT INTO usage_daily_rollups (day, account_id, agent_instance_id, model, requests, failed_requests,
    unpriced_requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,
    total_tokens, input_cost, output_cost, total_cost)
VALUES (:day, :account_id, NULL, :model, :requests, :failed, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
"""


@asynccontextmanager
async def _scratch_database(database: Settings, migrator: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty database of the test server, dropped afterwards. `owner`: a login role that owns
    the database and is no superuser (README "Tenant isolation"), member of the function roles, connects."""
    from agentrt.db.roles import FUNCTION_ROLES

    name = f'migrations_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    url = get_engine().url.set(database=name)
    async with admin.connect() as conn:
        if migrator == 'owner':
            await conn.execute(text(f'CREATE ROLE {name} LOGIN NOSUPERUSER'))
            await conn.execute(text(f'GRANT {", ".join(FUNCTION_ROLES)} TO {name}'))
            await conn.execute(text(f'CREATE DATABASE {name} OWNER {name}'))
            url = url.set(username=name)
        else:
            await conn.execute(text(f'CREATE DATABASE {name}'))
    engine = build_engine(url, database)
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))
            await conn.execute(text(f'DROP ROLE IF EXISTS {name}'))


@pytest.mark.parametrize('migrator', ['superuser', 'owner'])
async def test_0013_moves_rolled_up_cancellations_out_of_failed_and_back(database: Settings, migrator: str) -> None:
    """A rollup written before 0013 counted cancelled requests as failed: the upgrade moves the ones whose ledger
    rows it can see to `cancelled_requests` (a bucket at a time, its own rows only), the downgrade puts them back.
    `owner`: migrated by a login role that owns the tables and is no superuser (README "Tenant isolation"), so the
    backfill runs under the forced row-level security, through the role's membership of the cross-account roles."""
    from sqlalchemy import insert

    from agentrt.db.models.ledger import LLMRequestRow
    from tests.factories import ledger_record

    async with _scratch_database(database, migrator) as engine:
        await _migrate_to(engine, '0012_row_level_security')
        rows = [
            ledger_record(account_id=1, status=status, success=status == 'complete', model=model)
            for model, statuses in (
                ('gpt-4o-mini', ('complete', 'error', 'cancelled', 'cancelled', 'refused')),
                ('gpt-4o', ('cancelled',)),
            )
            for status in statuses
        ]
        # A rolled-up cancellation whose ledger row was deleted since: unknown now, it stays counted as failed.
        gone = ledger_record(account_id=1, status='cancelled', success=False, model='gpt-4o')
        day = rows[0].started_at.astimezone(UTC).date()
        async with engine.begin() as conn:
            # The rows as 0012 has them (`output_bound_usd` came with 0015).
            at_0012 = [{k: v for k, v in row.to_row().items() if k != 'output_bound_usd'} for row in [*rows, gone]]
            await conn.execute(insert(LLMRequestRow), at_0012)
            await conn.execute(text('INSERT INTO usage_rolled_up_requests (request_id) SELECT id FROM llm_requests'))
            await conn.execute(text('DELETE FROM llm_requests WHERE id = :id'), {'id': gone.id})
            # What the roll-up wrote before 0013: every unsuccessful request (not the refused) as failed.
            buckets = [('gpt-4o-mini', 4, 3), ('gpt-4o', 2, 2), ('never-cancelled', 1, 1)]
            for model, requests, failed in buckets:
                params = {'day': day, 'account_id': 1, 'model': model, 'requests': requests, 'failed': failed}
                await conn.execute(text(_OLD_BUCKET), params)
        counters = text('SELECT model, requests, failed_requests, cancelled_requests FROM usage_daily_rollups')

        await _migrate_to(engine, 'head')
        async with engine.connect() as conn:
            after = {row.model: tuple(row)[1:] for row in await conn.execute(counters)}
        assert after == {'gpt-4o-mini': (4, 1, 2), 'gpt-4o': (2, 1, 1), 'never-cancelled': (1, 1, 0)}

        await _migrate_to(engine, '0012_row_level_security', down=True)
        async with engine.connect() as conn:
            before = {
                row.model: tuple(row)[1:]
                for row in await conn.execute(text('SELECT model, requests, failed_requests FROM usage_daily_rollups'))
            }
            columns = await conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_daily_rollups'")
            )
            assert 'cancelled_requests' not in set(columns.scalars())
        assert before == {model: (requests, failed) for model, requests, failed in buckets}
        await _migrate_to(engine, 'head')
        assert await current_revision(engine) == head_revision()


@pytest.mark.parametrize('migrator', ['superuser', 'owner'])
async def test_0019_queues_the_rows_never_rolled_up_and_every_new_one(database: Settings, migrator: str) -> None:
    """The roll-ups looked back by time, so a row none reached in time was never counted: the upgrade queues every
    row not counted yet (however old), the trigger each new one whoever writes it; the downgrade removes both."""
    from sqlalchemy import insert

    from agentrt.db.models.ledger import LLMRequestRow
    from tests.factories import ledger_record

    async with _scratch_database(database, migrator) as engine:
        await _migrate_to(engine, '0018_budget_charges')
        counted, old, recent = (ledger_record(account_id=1) for _ in range(3))
        async with engine.begin() as conn:
            rows = [row.to_row() for row in (counted, old, recent)]
            await conn.execute(insert(LLMRequestRow), rows)
            await conn.execute(
                text("UPDATE llm_requests SET recorded_at = now() - interval '400 days' WHERE id = :id"), {'id': old.id}
            )
            await conn.execute(
                text('INSERT INTO usage_rolled_up_requests (request_id) VALUES (:id)'), {'id': counted.id}
            )
        pending = text('SELECT request_id FROM usage_pending_requests')

        await _migrate_to(engine, 'head')
        async with engine.begin() as conn:
            assert set((await conn.execute(pending)).scalars()) == {old.id, recent.id}
            # Queued without a foreign-key check each: its lock on each ledger row (a row's `xmax`) and its lookup
            # made the backfill, which runs with the ledger write-locked, about 4 times longer (README "Sizing").
            locked = text('SELECT count(*) FROM llm_requests WHERE xmax <> 0 AND id IN (:old, :recent)')
            assert (await conn.execute(locked, {'old': old.id, 'recent': recent.id})).scalar_one() == 0
            new = ledger_record(account_id=2)
            await conn.execute(insert(LLMRequestRow), [new.to_row()])
            assert set((await conn.execute(pending)).scalars()) == {old.id, recent.id, new.id}

        await _migrate_to(engine, '0018_budget_charges', down=True)
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT to_regclass('usage_pending_requests')"))).scalar() is None
            await conn.execute(insert(LLMRequestRow), [ledger_record(account_id=2).to_row()])  # no trigger left
        await _migrate_to(engine, 'head')
        assert await current_revision(engine) == head_revision()


_ROLLUP_COUNTERS = (
    'requests, failed_requests, cancelled_requests, unpriced_requests, input_tokens, output_tokens, cache_read_tokens, '
    'cache_write_tokens, reasoning_tokens, total_tokens, input_cost, output_cost, total_cost'
)
_LEDGER_COUNTERS = """
    count(*), count(*) FILTER (WHERE r.status = 'error'), count(*) FILTER (WHERE r.status = 'cancelled'),
    count(*) FILTER (WHERE r.total_cost IS NULL), coalesce(sum(r.input_tokens), 0), coalesce(sum(r.output_tokens), 0),
    coalesce(sum(r.cache_read_tokens), 0), coalesce(sum(r.cache_write_tokens), 0), coalesce(sum(r.reasoning_tokens), 0),
    coalesce(sum(r.total_tokens), 0), coalesce(sum(r.input_cost), 0), coalesce(sum(r.output_cost), 0),
    coalesce(sum(r.total_cost), 0)
"""
_COUNTED_ROWS = """
FROM llm_requests AS r JOIN usage_rolled_up_requests AS m ON m.request_id = r.id WHERE r.status <> 'refused'
"""
# What a roll-up before 0021 wrote: one bucket per day, account, instance and model, the greatest name its label.
_BUCKETS_BEFORE_0021 = f"""
INSERT INTO usage_daily_rollups (day, account_id, agent_instance_id, model, account_slug, agent_instance_slug,
    agent_name, {_ROLLUP_COUNTERS})
SELECT (r.started_at AT TIME ZONE 'UTC')::date, r.account_id, r.agent_instance_id, r.model, max(r.account_slug),
    max(r.agent_instance_slug), max(r.agent_name), {_LEDGER_COUNTERS}
{_COUNTED_ROWS} GROUP BY 1, 2, 3, 4
"""


def _rows(result: Any) -> list[tuple[Any, ...]]:
    """Rows as tuples, in an order that does not depend on the scan's (NULLs compared as text)."""
    return sorted((tuple(row) for row in result), key=repr)


@pytest.mark.parametrize('migrator', ['superuser', 'owner'])
async def test_0021_splits_each_bucket_by_agent_name_exactly_and_merges_them_back(
    database: Settings, migrator: str
) -> None:
    """Two agents on one instance, or agents without one, shared a bucket under the greatest name (QA): the upgrade
    splits each bucket into its names' buckets from the ledger rows it counted, every counted row in exactly one,
    the totals of each day, account, instance and model unchanged (what a deleted ledger row left stays under the old
    name), the marks and the queue untouched; the downgrade merges them back as they were."""
    from datetime import datetime
    from decimal import Decimal

    from sqlalchemy import insert

    from agentrt.db.models.ledger import LLMRequestRow
    from tests.factories import ledger_record

    started = datetime(2026, 3, 1, 12, tzinfo=UTC)
    shared = {'account_id': 1, 'account_slug': 'acme', 'agent_instance_id': 10, 'agent_instance_slug': 'helper'}
    own = {'account_id': 1, 'account_slug': 'acme'}  # agents of one's own: no instance

    def row(name: str | None, fields: dict[str, Any], status: str = 'complete', **more: Any) -> Any:
        return ledger_record(
            agent_name=name, started_at=started, status=status, success=status == 'complete', **fields, **more
        )

    counted = [
        row('simple_chat', shared, cost='0.25', input_tokens=100),
        row('simple_chat', shared, 'cancelled', input_tokens=7),
        row('zeta-bot', shared, cost='0.125', cache_read_tokens=3, reasoning_tokens=2),
        row('zeta-bot', shared, 'refused'),  # claimed, never counted: the request was not sent
        row('simple_chat', shared, model='gpt-4o', cost='1'),
        row('billing-bot', own, cost='0.5', input_cost=Decimal('0.2'), output_cost=Decimal('0.3')),
        row('alpha-bot', own, 'error'),
        row('alpha-bot', own, cost='0.75'),
        row(None, {}),  # no account, no agent
    ]
    gone = row('aardvark', shared, cost='2', input_tokens=1000)  # rolled up, its ledger row deleted since
    queued = row('alpha-bot', own, cost='4')  # not rolled up yet
    async with _scratch_database(database, migrator) as engine:
        await _migrate_to(engine, '0020_conversation_branches_index')
        async with engine.begin() as conn:
            await conn.execute(insert(LLMRequestRow), [r.to_row() for r in [*counted, gone, queued]])
            ids = [r.id for r in [*counted, gone]]
            await conn.execute(
                text('INSERT INTO usage_rolled_up_requests (request_id) SELECT unnest(CAST(:ids AS uuid[]))'),
                {'ids': ids},
            )
            await conn.execute(text('DELETE FROM usage_pending_requests WHERE request_id = ANY(:ids)'), {'ids': ids})
            await conn.execute(text(_BUCKETS_BEFORE_0021))
            await conn.execute(text('DELETE FROM llm_requests WHERE id = :id'), {'id': gone.id})
        buckets = text(
            'SELECT day, account_id, agent_instance_id, agent_name, model, account_slug, agent_instance_slug, '
            f'{_ROLLUP_COUNTERS} FROM usage_daily_rollups'
        )
        sums = ', '.join(f'sum({counter})' for counter in _ROLLUP_COUNTERS.split(', '))
        totals = text(  # per bucket of before 0021
            f'SELECT day, account_id, agent_instance_id, model, {sums} FROM usage_daily_rollups GROUP BY 1, 2, 3, 4'
        )
        marks = text(
            'SELECT (SELECT array_agg(request_id ORDER BY request_id) FROM usage_rolled_up_requests), '
            '(SELECT array_agg(request_id ORDER BY request_id) FROM usage_pending_requests)'
        )
        async with engine.connect() as conn:
            before, totals_before = _rows(await conn.execute(buckets)), _rows(await conn.execute(totals))
            marks_before = tuple((await conn.execute(marks)).one())
        assert len(before) == 4  # the instance's gpt-4o-mini and gpt-4o, the agents of one's own, no account's

        await _migrate_to(engine, 'head')
        async with engine.connect() as conn:
            after, totals_after = _rows(await conn.execute(buckets)), _rows(await conn.execute(totals))
            assert tuple((await conn.execute(marks)).one()) == marks_before
            # Every counted ledger row in the bucket of its name, and in no other.
            from_ledger = _rows(
                await conn.execute(
                    text(
                        "SELECT (r.started_at AT TIME ZONE 'UTC')::date, r.account_id, r.agent_instance_id, "
                        f'r.agent_name, r.model, max(r.account_slug), max(r.agent_instance_slug), {_LEDGER_COUNTERS} '
                        f'{_COUNTED_ROWS} GROUP BY 1, 2, 3, 4, 5'
                    )
                )
            )
        assert totals_after == totals_before
        names = [(bucket[3], bucket[4], bucket[7]) for bucket in after]
        assert sorted(names, key=repr) == sorted(
            [
                ('simple_chat', 'gpt-4o-mini', 2),
                ('zeta-bot', 'gpt-4o-mini', 2),  # its row, and the deleted row's rest under the old name
                ('simple_chat', 'gpt-4o', 1),
                ('billing-bot', 'gpt-4o-mini', 1),
                ('alpha-bot', 'gpt-4o-mini', 2),
                (None, 'gpt-4o-mini', 1),
            ],
            key=repr,
        )
        [zeta] = [bucket for bucket in after if bucket[3] == 'zeta-bot']
        assert [bucket for bucket in after if bucket is not zeta] == [
            bucket for bucket in from_ledger if bucket[3] != 'zeta-bot'
        ]
        [zeta_rows] = [bucket for bucket in from_ledger if bucket[3] == 'zeta-bot']
        rest = [a - b for a, b in zip(zeta[7:], zeta_rows[7:], strict=True)]
        assert rest == [1, 0, 0, 0, 1000, 5, 0, 0, 0, 15, 0, 0, Decimal('2')]  # the deleted row's, exactly

        await _migrate_to(engine, '0020_conversation_branches_index', down=True)
        async with engine.connect() as conn:
            assert _rows(await conn.execute(buckets)) == before
            assert tuple((await conn.execute(marks)).one()) == marks_before
        await _migrate_to(engine, 'head')
        assert await current_revision(engine) == head_revision()


async def test_a_migration_that_waits_too_long_for_a_table_lock_says_who_holds_it(
    database: Settings, empty_database: str
) -> None:
    # A session left idle in its transaction after reading the ledger holds a lock migration 0015's ALTER TABLE waits
    # for. After DB_LOCK_TIMEOUT_MS the upgrade said only "PostgreSQL stopped waiting for a lock that another session
    # holds (...): the operation did not complete; retry once that session has finished": not that the migration was
    # what waited, for how long, on which session, nor that nothing was applied.
    url = get_engine().url.set(database=empty_database)
    quick = database.model_copy(update={'lock_timeout_ms': 200})
    engine, holder = build_engine(url, quick), build_engine(url, database)
    try:
        await _migrate_to(engine, '0014_conversations_created_index')
        async with holder.connect() as other, other.begin():
            pid = (await other.execute(text('SELECT pg_backend_pid()'))).scalar_one()
            await other.execute(text('SELECT count(*) FROM llm_requests'))
            with pytest.raises(DatabaseUnavailableError) as raised:
                await asyncio.wait_for(upgrade(engine), 30)
            message = str(raised.value)
            result = await invoke(
                'db',
                'upgrade',
                env={'DATABASE_URL': url.render_as_string(hide_password=False), 'DB_LOCK_TIMEOUT_MS': '200'},
            )
        assert message.startswith(
            'migrating the schema from 0014_conversations_created_index to head waited for a lock on a table that '
            'another session holds, and gave up after 200ms (DB_LOCK_TIMEOUT_MS): nothing was applied: the schema is '
            f'still at 0014_conversations_created_index; held by pid {pid} (agentrt), idle in transaction for '
        )
        assert message.endswith(
            f" s, on llm_requests (SELECT pg_terminate_backend({pid}) ends it): end or finish that session's "
            'transaction, or raise DB_LOCK_TIMEOUT_MS for the migration; then run the command again (or `agentrt db '
            'upgrade`)'
        )
        assert await current_revision(engine) == '0014_conversations_created_index'
        assert result.exit_code == 3  # README: a statement given up on (a lock timeout)
        errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
        assert len(errors) == 1 and f'held by pid {pid} (agentrt), idle in transaction' in errors[0], result.stderr
        assert 'Traceback' not in result.stderr
    finally:
        await engine.dispose()
        await holder.dispose()


async def test_a_migration_cut_off_by_the_statement_timeout_says_which_setting_to_raise(
    database: Settings, empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long migration (a backfill of a large ledger) ran out of DB_STATEMENT_TIMEOUT_MS and said "PostgreSQL cancelled
    # a statement (...): the operation did not complete; retry once the database is less busy": the same migration
    # fails again however idle the database; the setting to raise is what helps (README says so).
    packaged = head_revision()
    migrations = tmp_path / 'migrations'
    shutil.copytree(MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns('__pycache__'))
    (migrations / 'versions' / '9999_slow.py').write_text(
        f"revision = '9999_slow'\ndown_revision = {packaged!r}\nbranch_labels = None\ndepends_on = None\n"
        'from alembic import op\n\n\ndef upgrade():\n    op.execute("SELECT pg_sleep(5)")\n\n\n'
        'def downgrade():\n    pass\n'
    )
    url = get_engine().url.set(database=empty_database)
    engine = build_engine(url, database)
    try:
        await upgrade(engine)  # to the packaged head, with the suite's timeouts
    finally:
        await engine.dispose()
    monkeypatch.setattr(migrate, 'MIGRATIONS_DIR', migrations)
    engine = build_engine(url, database.model_copy(update={'statement_timeout_ms': 300}))
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            await asyncio.wait_for(upgrade(engine), 30)
        assert str(raised.value) == (
            f'migrating the schema from {packaged} to head took longer than a statement may (300ms, '
            f'DB_STATEMENT_TIMEOUT_MS) and was cancelled: nothing was applied: the schema is still at '
            f'{packaged}. A migration of a large table can take that long: raise DB_STATEMENT_TIMEOUT_MS for '
            'it (0: no limit, e.g. `DB_STATEMENT_TIMEOUT_MS=0 agentrt db upgrade`), then run the command again'
        )
        assert await current_revision(engine) == packaged
    finally:
        await engine.dispose()
