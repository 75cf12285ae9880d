"""`agentrt db ...`: a fresh embedded server, seed, status and bad input in-process; one run in a subprocess."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from agentrt.db.migrate import MIGRATION_LOCK_KEY
from agentrt.db.roles import FUNCTION_ROLES
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.status import TableRows, table_counts
from tests.agents.cli.helpers import invoke, run_cli, scratch_database
from tests.factories import ledger_record, write_ledger_row
from tests.services.jobs.helpers import PROCRASTINATE_TABLES, queue_url


async def test_status_in_a_subprocess_against_database_url(database_url: str) -> None:
    result = await asyncio.to_thread(run_cli, 'db', 'status', env={'DATABASE_URL': database_url})
    assert result.returncode == 0, result.stderr
    assert 'external (DATABASE_URL)' in result.stdout
    assert 'rows: llm_requests' in result.stdout and 'behind' not in result.stdout
    assert 'recycle 1800s' in result.stdout
    never = await invoke('db', 'status', env={'DATABASE_URL': database_url, 'DB_POOL_RECYCLE': '-1'})
    assert never.exit_code == 0 and 'recycle never' in never.stdout, never.stdout  # it said "recycle -1s"


async def test_status_masks_the_client_keys_password(database_url: str) -> None:
    # `sslpassword`, the client key's password, was printed in clear in the server row (and the queue's) (qa174).
    url = make_url(database_url).update_query_dict({'sslpassword': 'KEYSEKRET', 'sslmode': 'disable'})
    shown = url.render_as_string(hide_password=False)
    env = {'DATABASE_URL': shown, 'AGENTRT_BACKGROUND': 'queue', 'AGENTRT_QUEUE_DATABASE_URL': queue_url(shown)}
    result = await invoke('db', 'status', env=env)
    assert result.exit_code == 0, result.stderr
    assert 'KEYSEKRET' not in result.stdout + result.stderr
    assert result.stdout.count('sslpassword=***') == 2, result.stdout  # the server's URL and the queue's


async def test_seed_then_status_on_a_fresh_embedded_server(tmp_path: Path) -> None:
    env = {'AGENTRT_DATA_DIR': str(tmp_path / 'pgdata'), 'DATABASE_URL': ''}
    seeded = await invoke('db', 'seed', env=env)
    assert seeded.exit_code == 0, seeded.stderr
    assert 'embedded PostgreSQL: data in' in seeded.stderr
    assert 'upgrading to' in seeded.stderr
    assert '4,500 new directory entries' in seeded.stdout

    status = await invoke('db', 'status', env=env)
    assert status.exit_code == 0, status.stderr
    assert f'embedded (data in {tmp_path / "pgdata"})' in status.stdout
    assert 'rows: directory_entries' in status.stdout and '4,500' in status.stdout
    assert 'behind' not in status.stdout

    again = await invoke('db', 'seed', env=env)
    assert again.exit_code == 0 and '0 new directory entries' in again.stdout
    # Where the data lives is said at the directory's first use only; the routine start and stop of every later
    # command are not (`-v` shows them): each one-shot printed two INFO lines around its output.
    assert 'embedded PostgreSQL' not in status.stderr + again.stderr, status.stderr + again.stderr
    assert 'upgrading' not in again.stderr


async def test_malformed_database_url_is_a_usage_error() -> None:
    result = await invoke('db', 'status', env={'DATABASE_URL': 'mysql://root:hunter2@db/app'})
    assert result.exit_code == 2
    assert 'DATABASE_URL' in result.stderr
    assert 'hunter2' not in result.stderr + result.stdout


async def test_unreachable_server_exits_non_zero_quickly() -> None:
    env = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db', 'DB_CONNECT_TIMEOUT': '2'}
    result = await invoke('db', 'status', env=env)
    assert result.exit_code == 3
    assert '127.0.0.1:1' in result.stderr


async def test_a_login_postgresql_refuses_is_a_configuration_error_not_an_outage(database_url: str) -> None:
    # An unknown role or database in DATABASE_URL exited 3, "database unavailable": a script retrying on 3 (as for a
    # restart) retried a typo for ever. No wait changes it: exit 2, with what to fix.
    url = make_url(database_url)
    for changed, named, advice in (
        (url.set(username='no_such_role'), 'role "no_such_role" does not exist', 'user name and password'),
        (url.set(database='no_such_database'), 'database "no_such_database" does not exist', 'database name'),
    ):
        env = {'DATABASE_URL': changed.set(password='hunter2').render_as_string(hide_password=False)}
        result = await invoke('db', 'status', env=env)
        assert result.exit_code == 2, result.stderr
        line = result.stderr.strip()
        assert line.startswith('error: PostgreSQL at ') and 'refused the login' in line, line
        assert named in line and advice in line and 'DATABASE_URL' in line, line
        assert 'hunter2' not in result.stderr + result.stdout and 'Traceback' not in result.stderr


@pytest.mark.parametrize(
    ('options', 'said'),
    [
        (
            '-c statement_timeout=abc',
            'statement_timeout of DATABASE_URL (invalid value for parameter "statement_timeout"',
        ),
        (
            '-c nosuch_setting=1',
            'nosuch_setting of DATABASE_URL (unrecognized configuration parameter "nosuch_setting")',
        ),
        ('-c default_transaction_isolation=bogus', '"bogus"; Available values: serializable, repeatable read'),
    ],
    ids=['invalid value', 'unknown parameter', 'with its hint'],
)
async def test_a_server_setting_postgresql_refuses_is_a_configuration_error_naming_it(
    database_url: str, options: str, said: str
) -> None:
    # It was "cannot connect to PostgreSQL at ...: invalid value for parameter ..." with exit 3, an outage a script
    # waits out; no wait changes it.
    url = make_url(database_url).update_query_dict({'options': options})
    result = await invoke('db', 'status', env={'DATABASE_URL': url.render_as_string(hide_password=False)})
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith('error: PostgreSQL at ') and ' refused the server setting ' in line, line
    assert said in line and line.endswith('remove it from its options parameter (options=-c name=value)'), line
    assert 'cannot connect' not in line and 'Traceback' not in result.stderr


async def test_unknown_option_is_rejected() -> None:
    result = await invoke('db', 'status', '--bogus')
    assert result.exit_code == 2
    assert 'No such option' in result.stderr


async def test_a_login_role_without_the_runtimes_roles_is_a_usage_error_saying_what_to_grant(
    database_url: str, demo_data: None
) -> None:
    """`DATABASE_URL` names a user that neither owns the tables nor was granted the runtime's roles: one `error:` line
    saying what to grant (exit 2), not "internal error: ProgrammingError ... permission denied" (exit 70)."""
    login = f'agentrt_test_login_{uuid.uuid4().hex[:8]}'
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f"CREATE ROLE {login} LOGIN NOSUPERUSER PASSWORD 'pw'"))
    url = make_url(database_url).set(username=login, password='pw').render_as_string(hide_password=False)
    try:
        # `chat` with AGENTRT_AUTO_MIGRATE on (the default) reads the revision first: that was the internal error.
        for args, auto_migrate in (
            (('db', 'status'), 'false'),
            (('chat', '--account', 'acme-health', 'hello'), 'false'),
            (('chat', '--account', 'acme-health', 'hello'), 'true'),
            (('db', 'upgrade'), 'true'),
        ):
            result = await invoke(*args, env={'DATABASE_URL': url, 'AGENTRT_AUTO_MIGRATE': auto_migrate})
            assert result.exit_code == 2, (args, result.stderr)
            assert result.stderr.startswith('error: the login role of DATABASE_URL'), (args, result.stderr)
            assert f'GRANT {", ".join(FUNCTION_ROLES)} TO {login}' in result.stderr
            assert 'internal error' not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'DROP ROLE {login}'))


async def test_status_for_a_member_of_the_roles_that_does_not_own_the_tables(database_url: str) -> None:
    """A login role granted the runtime's roles, the tables migrated by another: everything is readable, procrastinate's
    tables too (migration 0016 grants them to agentrt_jobs; the status said "not readable by the login role" before,
    and earlier an error telling it to grant the roles it has)."""
    login = f'agentrt_test_member_{uuid.uuid4().hex[:8]}'
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f"CREATE ROLE {login} LOGIN NOSUPERUSER PASSWORD 'pw'"))
        await session.execute(text(f'GRANT {", ".join(FUNCTION_ROLES)} TO {login}'))
    url = make_url(database_url).set(username=login, password='pw').render_as_string(hide_password=False)
    try:
        result = await invoke('db', 'status', env={'DATABASE_URL': url})
        assert result.exit_code == 0, result.stderr
        assert 'not readable' not in result.stdout and 'permission denied' not in result.stdout, result.stdout
        assert re.search(r'job queue +│ +not used \(AGENTRT_BACKGROUND=inline\): \d+ waiting', result.stdout), (
            result.stdout
        )
        assert 'rows: accounts' in result.stdout and 'GRANT' not in result.stdout
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'REVOKE {", ".join(FUNCTION_ROLES)} FROM {login}'))
            await session.execute(text(f'DROP ROLE {login}'))


async def test_commands_on_a_schema_left_behind_say_to_upgrade_it(database_url: str) -> None:
    """With AGENTRT_AUTO_MIGRATE=false (a fleet migrated by one job) and the schema behind this version's, a command
    said "a value given is not valid for the database: role "agentrt_admin" does not exist" (or a missing table),
    exit 2 as if the operator had typed a wrong value."""
    async with scratch_database(database_url, 'behind') as behind:
        upgraded = await invoke('db', 'upgrade', '0005_ledger_recorded_at_index', env={'DATABASE_URL': behind})
        assert upgraded.exit_code == 0, upgraded.stderr
        for args in (('keys', 'list'), ('audit', 'list'), ('chat', '--account', 'acme-health', 'hello')):
            result = await invoke(*args, env={'DATABASE_URL': behind, 'AGENTRT_AUTO_MIGRATE': 'false'})
            assert result.exit_code == 2, (args, result.stderr)
            assert result.stderr.startswith('error: the database schema is at 0005_ledger_recorded_at_index'), (
                args,
                result.stderr,
            )
            assert 'agentrt db upgrade' in result.stderr and len(result.stderr.strip().splitlines()) == 1
        status = await invoke('db', 'status', env={'DATABASE_URL': behind, 'AGENTRT_AUTO_MIGRATE': 'false'})
        # A database never migrated is "at empty", as `agentrt db upgrade` says (it said "at none").
        async with scratch_database(database_url, 'never') as never:
            empty = await invoke('keys', 'list', env={'DATABASE_URL': never, 'AGENTRT_AUTO_MIGRATE': 'false'})
            assert empty.exit_code == 2 and empty.stderr.startswith('error: the database schema is at empty,'), (
                empty.stderr
            )
        assert status.exit_code == 0 and 'behind' in status.stdout, status.stderr
        assert 'job queue  missing (not migrated: `agentrt db upgrade`)' in _squeezed(status.stdout), status.stdout


async def test_status_during_an_upgrade_says_one_is_running_not_to_run_one(database_url: str) -> None:
    """`db status` while an upgrade ran said the schema was behind and to run `agentrt db upgrade`: a second one,
    which only waits for the first (QA)."""
    import asyncpg

    async with scratch_database(database_url, 'upgrading') as upgrading:
        env = {'DATABASE_URL': upgrading}
        assert (await invoke('db', 'upgrade', '0005_ledger_recorded_at_index', env=env)).exit_code == 0
        # The lock as a running upgrade holds it (migrations/env.py): transaction-level, until its COMMIT.
        migrator = await asyncpg.connect(make_url(upgrading).set(drivername='postgresql').render_as_string(False))
        try:
            async with migrator.transaction():
                pid = await migrator.fetchval('SELECT pg_backend_pid()')
                await migrator.execute('SELECT pg_advisory_xact_lock($1)', MIGRATION_LOCK_KEY)
                during = await invoke('db', 'status', env=env)
        finally:
            await migrator.close()
        after = await invoke('db', 'status', env=env)
    assert during.exit_code == 0, during.stderr
    migration = _row(during.stdout, 'migration')
    assert re.fullmatch(
        rf'0005_ledger_recorded_at_index \(an upgrade is running now, its PostgreSQL session: pid {pid}, since '
        r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+ s ago\): the schema is at this revision until it commits; wait '
        r'for it rather than starting another `agentrt db upgrade`, which would only wait for it\)',
        migration,
    ), migration
    assert 'behind' in _row(after.stdout, 'migration')  # once it has ended, as before


def _row(table: str, name: str) -> str:
    """The value of the row `name` of `db status`'s table."""
    return next(line.split('  ', 1)[1] for line in _squeezed(table).splitlines() if line.startswith(f'{name}  '))


async def test_a_schema_ahead_of_this_version_is_said_so_and_commands_run_on_it(database_url: str) -> None:
    """A newer agentrt migrated the database (a rolling upgrade, or a downgrade of the package): every command with
    the default AGENTRT_AUTO_MIGRATE failed with Alembic's "cannot migrate to 'head': Can't locate revision
    identified by '...'" (exit 2), and `db status` called the schema behind and said to run `db upgrade`, which
    failed the same way."""
    import asyncpg

    async with scratch_database(database_url, 'ahead') as ahead:
        assert (await invoke('db', 'upgrade', env={'DATABASE_URL': ahead})).exit_code == 0
        database = await asyncpg.connect(make_url(ahead).set(drivername='postgresql').render_as_string(False))
        try:
            await database.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_agentrt'")
        finally:
            await database.close()

        status = await invoke('db', 'status', env={'DATABASE_URL': ahead})
        assert status.exit_code == 0, status.stderr
        assert 'ahead' in status.stdout and 'behind' not in status.stdout and 'newer agentrt' in status.stdout

        upgraded = await invoke('db', 'upgrade', env={'DATABASE_URL': ahead})
        assert upgraded.exit_code == 2
        assert upgraded.stderr.startswith('error: the database schema is at 9999_from_a_newer_agentrt, a revision')
        assert 'newer agentrt migrated it' in upgraded.stderr and 'nothing was migrated' in upgraded.stderr
        assert len(upgraded.stderr.strip().splitlines()) == 1 and "Can't locate" not in upgraded.stderr

        for auto_migrate in ('true', 'false'):
            listed = await invoke('keys', 'list', env={'DATABASE_URL': ahead, 'AGENTRT_AUTO_MIGRATE': auto_migrate})
            assert listed.exit_code == 0, (auto_migrate, listed.stderr)


async def test_upgrade_to_a_revision_the_schema_is_past_or_to_nothing_says_so(database_url: str) -> None:
    # `db upgrade 0005_...` on a schema at head said "schema already at <head>" (a downgrade was asked for; Alembic's
    # upgrade to an ancestor does nothing); `db upgrade ''` was "migrating the schema from <head> to failed:
    # AssertionError: AssertionError", exit 5, as if a migration had failed.
    env = {'DATABASE_URL': database_url}
    past = await invoke('db', 'upgrade', '0005_ledger_recorded_at_index', env=env)
    assert past.exit_code == 0, past.stderr
    assert 'already past 0005_ledger_recorded_at_index' in past.stdout and 'never downgrades' in past.stdout
    empty = await invoke('db', 'upgrade', ' ', env=env)
    assert empty.exit_code == 2
    assert empty.stderr.startswith('error: no revision to migrate to') and 'AssertionError' not in empty.stderr


async def test_status_tells_the_background_mode_and_the_job_queue(database_url: str) -> None:
    """With AGENTRT_BACKGROUND=queue, jobs wait in PostgreSQL for `agentrt worker`: `db status` said nothing of the
    mode, of the queue's tables, of jobs piling up or of a worker being alive."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
        statuses = ('todo', 'todo', 'failed', 'succeeded', 'doing')  # the one doing: its worker is gone (none)
        await session.execute(
            text("INSERT INTO procrastinate_jobs (queue_name, task_name, status) VALUES ('post_turn', 'summary', :s)"),
            [{'s': status} for status in statuses],
        )
    try:
        env = {'DATABASE_URL': database_url, 'AGENTRT_BACKGROUND': 'queue'}
        queued = _squeezed((await invoke('db', 'status', env=env)).stdout)
        assert 'background  queue (AGENTRT_BACKGROUND): durable jobs run by `agentrt worker`' in queued, queued
        # A job a worker took and will never finish was counted as running: nothing runs it until a live worker does.
        stalled = '2 waiting, 0 running, 1 failed, 1 stalled (their worker is gone; a live worker runs them again)'
        assert f'job queue  {stalled}; no worker alive' in queued, queued
        async with get_db_session(account=Unscoped.OWNER) as session:
            worker = (
                await session.execute(text('INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id'))
            ).scalar_one()
            await session.execute(
                text("UPDATE procrastinate_jobs SET worker_id = :w WHERE status = 'doing'"), {'w': worker}
            )
        alive = _squeezed((await invoke('db', 'status', env=env)).stdout)
        assert 'job queue  2 waiting, 1 running, 1 failed; 1 worker alive' in alive, alive
        inline = _squeezed((await invoke('db', 'status', env={'DATABASE_URL': database_url})).stdout)
        assert 'background  inline (AGENTRT_BACKGROUND): in the process that ran the turn' in inline, inline
        # Jobs left from a time in queue mode: nothing runs them now; what does.
        left = 'not used (AGENTRT_BACKGROUND=inline): 2 waiting, 1 running, 1 failed; `agentrt worker --burst` runs'
        assert f'job queue  {left}' in inline, inline
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))


def _squeezed(table: str) -> str:
    """The rows of a two-column rich table as `name  value` lines (borders and padding dropped, a wrapped value's
    lines joined by a space)."""
    rows: list[list[str]] = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('│').split('│')]
        if len(cells) != 2:
            continue
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1][1] += ' ' + cells[1]
    return '\n'.join(f'{name}  {value}' for name, value in rows)


async def test_a_migration_url_without_database_url_is_refused(
    database_url: str, empty_database: str, tmp_path: Path
) -> None:
    # With the embedded server (DATABASE_URL unset), `db upgrade` migrated DATABASE_MIGRATION_URL's database and said
    # so, the embedded one left unmigrated: `agentrt chat` then said to run `db upgrade`, which said it was done.
    direct = make_url(database_url).set(database=empty_database).render_as_string(hide_password=False)
    env = {'DATABASE_URL': '', 'AGENTRT_DATA_DIR': str(tmp_path / 'pgdata'), 'DATABASE_MIGRATION_URL': direct}
    for command in (('db', 'upgrade'), ('db', 'seed')):  # `db seed` starts the runtime: its automatic migration
        result = await invoke(*command, env=env)
        assert result.exit_code == 2 and not result.stdout, result.stdout + result.stderr
        line = result.stderr.strip()
        assert line.startswith('error: invalid configuration: DATABASE_MIGRATION_URL is set but DATABASE_URL is not')
        assert 'unset DATABASE_MIGRATION_URL' in line and '\n' not in line, line
    assert not (tmp_path / 'pgdata').exists()  # refused before anything started


async def test_upgrade_with_a_migration_url_needs_only_that_one(database_url: str, empty_database: str) -> None:
    # It started the runtime on DATABASE_URL first: a migration job run before its pooler was up failed with
    # "cannot connect to PostgreSQL at <the pooler>" (exit 3), the direct URL it migrates through being there.
    direct = make_url(database_url).set(database=empty_database).render_as_string(hide_password=False)
    env = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/pooled', 'DATABASE_MIGRATION_URL': direct}
    result = await invoke('db', 'upgrade', env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith('schema: empty -> ')
    again = await invoke('db', 'upgrade', env=env)
    assert again.exit_code == 0 and again.stdout.startswith('schema already at '), again.stderr
    # Unreachable itself, it is the one named.
    gone = await invoke('db', 'upgrade', env={**env, 'DATABASE_MIGRATION_URL': 'postgresql://u:p@127.0.0.1:2/direct'})
    assert gone.exit_code == 3 and 'cannot connect to PostgreSQL at 127.0.0.1:2/direct' in gone.stderr, gone.stderr
    # A login it refuses names the variable to fix: the advice said "in DATABASE_URL", the one variable not in play.
    refused = make_url(direct).set(username='no_such_role').render_as_string(hide_password=False)
    wrong = await invoke('db', 'upgrade', env={**env, 'DATABASE_MIGRATION_URL': refused})
    assert wrong.exit_code == 2 and 'refused the login' in wrong.stderr, wrong.stderr
    assert 'in DATABASE_MIGRATION_URL' in wrong.stderr and 'DATABASE_URL' not in wrong.stderr, wrong.stderr


async def test_a_pooler_that_is_down_at_the_start_is_named_as_the_pooler() -> None:
    # In the pooler mode a running process says "(PgBouncer)" after the address; the start's check did not, so a pooler
    # that was down read as PostgreSQL refusing connections (qa122). The direct migration URL is not the pooler.
    env = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/pooled', 'DB_POOLER': 'pgbouncer'}
    result = await invoke('db', 'status', env=env)
    assert result.exit_code == 3 and 'cannot connect to PostgreSQL at 127.0.0.1:1/pooled (PgBouncer): ' in result.stderr
    direct = {**env, 'DATABASE_MIGRATION_URL': 'postgresql://u:p@127.0.0.1:2/direct'}
    gone = await invoke('db', 'upgrade', env=direct)
    assert gone.exit_code == 3 and 'cannot connect to PostgreSQL at 127.0.0.1:2/direct: ' in gone.stderr, gone.stderr


async def test_status_gives_a_large_tables_estimate_and_counts_the_others(database_url: str) -> None:
    # `db status` counted every row of every table (2.4 s at a year of ledger): a table the planner puts at
    # `exact_below` rows or more (100k by default) is given the planner's estimate, marked as one.
    for _ in range(3):
        await write_ledger_row(ledger_record())
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('ANALYZE llm_requests'))  # reltuples: 3
        estimated = await table_counts(session=session, exact_below=3)
        counted = await table_counts(session=session)
    assert estimated['llm_requests'] == TableRows(3, estimated=True)
    assert counted['llm_requests'] == TableRows(3) and not any(c.estimated for c in counted.values() if c)
    shown = [str(TableRows(n, estimated=True)) for n in (150_000, 1_234_567, 2_400_000_000)]
    assert shown == ['~150k', '~1.2M', '~2.4B']
    assert str(TableRows(4500)) == '4,500'
    status = await invoke('db', 'status', env={'DATABASE_URL': database_url})
    assert status.exit_code == 0, status.stderr
    assert re.search(r'rows: llm_requests\W+3\b', status.stdout), status.stdout
