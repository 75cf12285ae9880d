"""The pooler mode through a real PgBouncer 1.18 in transaction mode (4 server connections shared by the runtime's
10 client connections): timeouts set per transaction and really applied, detection, clear errors without the
mode, chats with parallel tools, the ledger's exactly-once, conversation compare-and-swap and migrations."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from agentrt.agents.simple_chat import simple_chat
from agentrt.db import migrate
from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import build_engine, connect_engine, get_engine, timeouts_in_force
from agentrt.db.errors import ConfigError, DatabaseDisconnectedError, DatabaseUnavailableError, MigrationError
from agentrt.db.failures import unavailable_error
from agentrt.db.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session, get_side_session
from agentrt.db.settings import Settings, parse_database_url
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.cli.helpers import invoke
from tests.conversation_races import assert_one_writer_wins
from tests.factories import ledger_rows
from tests.pgbouncer import PgBouncer, PooledDatabase, bouncer_for
from tests.private_database import CountingModel

_PLUS_ONE = DriverStatement.of(text('SELECT CAST(:i AS integer) + 1'))
_COUNT = DriverStatement.of(text('SELECT count(*) FROM accounts WHERE id > :i'))
CONFIGURED = {'statement_timeout': 30_000, 'lock_timeout': 10_000}


@pytest.fixture
async def pooled(pooled_database: PooledDatabase) -> AsyncIterator[PooledDatabase]:
    async with pooled_database.active():
        yield pooled_database


def _url(bouncer: PgBouncer, database: str | None = None) -> str:
    url = bouncer.url()
    return url if database is None else url.rsplit('/', 1)[0] + f'/{database}'


async def test_every_transaction_carries_its_timeouts_and_none_stays_on_the_server(pooled: PooledDatabase) -> None:
    assert pooled.settings.pooled and pooled.settings.statement_timeout_ms == CONFIGURED['statement_timeout']

    async def seen(kind: str) -> tuple[str, dict[str, int]]:
        opener = {'plain': get_db_session, 'read_only': get_read_only_session, 'side': get_side_session}[kind]
        async with opener(account=Unscoped.ADMIN) as session:
            in_force = await timeouts_in_force(session)
            await session.execute(text('SELECT pg_sleep(0.01)'))  # hold the server connection a moment
        return kind, in_force

    # 60 transactions of three kinds over 10 client and 4 server connections: each sees its own, none another's.
    results = await asyncio.gather(*(seen(('plain', 'read_only', 'side')[i % 3]) for i in range(60)))
    expected = {
        'plain': CONFIGURED,
        'read_only': CONFIGURED,
        'side': {'statement_timeout': 5000, 'lock_timeout': 2000},
    }
    assert all(in_force == expected[kind] for kind, in_force in results)
    # Outside a transaction the server connections still have the server's defaults: nothing was SET on them.
    async with get_engine().connect() as conn:
        autocommit = await conn.execution_options(isolation_level='AUTOCOMMIT')
        for _ in range(8):
            assert await timeouts_in_force(autocommit) == {'statement_timeout': 0, 'lock_timeout': 0}


async def test_the_timeouts_are_really_applied(database: Settings, pgbouncer: PgBouncer) -> None:
    tight = await PooledDatabase.create(pgbouncer, database, statement_timeout_ms=300, lock_timeout_ms=200)
    try:
        async with tight.active():
            started = time.monotonic()
            with pytest.raises(Exception) as raised:
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT pg_sleep(10)'))
            assert 'canceling statement due to statement timeout' in str(raised.value)
            assert time.monotonic() - started < 8  # 300 ms, with room for a loaded machine (2.5 s of 3 was tight)

            holder_has_lock, release = asyncio.Event(), asyncio.Event()

            async def hold() -> None:
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT pg_advisory_xact_lock(4242)'))
                    holder_has_lock.set()
                    await release.wait()

            holder = asyncio.create_task(hold())
            await holder_has_lock.wait()
            with pytest.raises(Exception) as raised:
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT pg_advisory_xact_lock(4242)'))
            assert 'canceling statement due to lock timeout' in str(raised.value)
            release.set()
            await holder
    finally:
        await tight.close()


async def test_pgbouncer_is_detected_whether_it_refuses_or_drops_the_timeouts(
    database: Settings, pgbouncer: PgBouncer
) -> None:
    dropping = bouncer_for(
        get_engine().url, ignore_startup_parameters='extra_float_digits,statement_timeout,lock_timeout'
    )
    dropping.start()
    try:
        for bouncer in (pgbouncer, dropping):
            settings = database.model_copy(update={'database_url': bouncer.url(), 'pooler': 'auto'})
            engine, in_force = await connect_engine(parse_database_url(bouncer.url()), settings)
            try:
                assert in_force.pooled
                async with engine.connect() as conn:
                    assert await timeouts_in_force(conn) == CONFIGURED
            finally:
                await engine.dispose()
            with pytest.raises(ConfigError, match='DB_POOLER=pgbouncer'):
                await connect_engine(parse_database_url(bouncer.url()), settings.model_copy(update={'pooler': 'none'}))
            # With both timeouts 0 (none) nothing was sent at connect for PgBouncer to refuse or drop: it went
            # undetected, and concurrent turns failed on "prepared statement ... already exists".
            untimed = settings.model_copy(update={'statement_timeout_ms': 0, 'lock_timeout_ms': 0})
            engine, in_force = await connect_engine(parse_database_url(bouncer.url()), untimed)
            try:
                assert in_force.pooled
                async with engine.connect() as conn:
                    assert await timeouts_in_force(conn) == {'statement_timeout': 0, 'lock_timeout': 0}
            finally:
                await engine.dispose()
        # Direct, with both timeouts 0: no pooler, and nothing set at connect (the role's defaults apply).
        direct = database.model_copy(update={'pooler': 'auto', 'statement_timeout_ms': 0, 'lock_timeout_ms': 0})
        engine, in_force = await connect_engine(get_engine().url, direct)
        try:
            assert not in_force.pooled
            async with engine.connect() as conn:
                assert await timeouts_in_force(conn) == {'statement_timeout': 0, 'lock_timeout': 0}
        finally:
            await engine.dispose()
    finally:
        dropping.stop()


async def test_prepared_statements_behind_the_pooler_without_the_mode_are_a_clear_error(
    database: Settings, pgbouncer: PgBouncer
) -> None:
    # No timeouts to give PgBouncer away, and the statement cache on: what a user gets with DB_POOLER=none.
    settings = database.model_copy(
        update={'pooler': 'none', 'statement_timeout_ms': 0, 'lock_timeout_ms': 0, 'database_url': pgbouncer.url()}
    )
    unpooled = await PooledDatabase.create(pgbouncer, settings, pooler='none')
    errors: list[BaseException] = []
    try:
        async with unpooled.active():

            async def one(i: int) -> None:
                if i % 2:  # statements on the driver connection (a turn's start and save) fail the same way
                    async with driver_transaction(account=Unscoped.ADMIN) as transaction:
                        await transaction.fetch(_PLUS_ONE, {'i': i})
                        await transaction.fetch(_COUNT, {'i': i})
                    return
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT :i + 1'), {'i': i})
                    await session.execute(text('SELECT count(*) FROM accounts WHERE id > :i'), {'i': i})

            for _ in range(20):
                outcomes = await asyncio.gather(*(one(i) for i in range(20)), return_exceptions=True)
                errors += [o for o in outcomes if isinstance(o, BaseException)]
                if errors:
                    break
    finally:
        await unpooled.close()
    assert errors, 'expected prepared statements to collide behind PgBouncer'
    assert all(isinstance(error, ConfigError) for error in errors), errors
    assert 'set DB_POOLER=pgbouncer' in str(errors[0]) and 'cannot connect' not in str(errors[0])


async def test_chats_with_parallel_tools_bill_each_request_exactly_once(
    demo_data: None, pooled: PooledDatabase
) -> None:
    model = CountingModel()

    async def one(index: int) -> None:
        await simple_chat(
            'Find cardiologists in Seattle', session_id=f'pooled-{index}', account='acme-health', model=model
        )

    results = await asyncio.gather(*(one(i) for i in range(30)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    await pooled.settle()  # the ledger rows and the post-turn work, through the pooler too
    rows = await ledger_rows()
    assert len(rows) == model.requests == 90
    assert all(row['status'] == 'complete' for row in rows)
    assert len({row['id'] for row in rows}) == len(rows)


async def test_conversation_compare_and_swap_has_one_winner(two_accounts: tuple[int, int], pooled: object) -> None:
    store = PostgresConversationStore(two_accounts[0])
    await assert_one_writer_wins(store, writers=12)


async def test_migrations_through_the_pooler_and_a_failed_one_leaves_no_lock(
    database: Settings,
    pgbouncer: PgBouncer,
    empty_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = database.model_copy(update={'database_url': _url(pgbouncer, empty_database), 'pooler': 'pgbouncer'})
    engine = build_engine(parse_database_url(_url(pgbouncer, empty_database)), settings)
    migrations = tmp_path / 'migrations'
    shutil.copytree(MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns('__pycache__'))
    (migrations / 'versions' / '9999_broken.py').write_text(
        f"revision = '9999_broken'\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n"
        'from alembic import op\n\n\ndef upgrade():\n    op.execute("SELECT 1 / 0")\n\n\ndef downgrade():\n    pass\n'
    )
    try:
        with monkeypatch.context() as patch:
            patch.setattr(migrate, 'MIGRATIONS_DIR', migrations)
            for _ in range(2):  # the second attempt would hang on a lock the first left on a server connection
                with pytest.raises(MigrationError, match='DivisionByZeroError'):
                    await asyncio.wait_for(upgrade(engine), 60)
        assert await current_revision(engine) is None
        direct = build_engine(get_engine().url.set(database=empty_database), database)
        try:
            async with direct.connect() as conn:
                held = await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        'AND database = (SELECT oid FROM pg_database WHERE datname = current_database())'
                    )
                )
                assert held.scalar_one() == 0
        finally:
            await direct.dispose()
        await asyncio.wait_for(upgrade(engine), 60)
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_migrations_use_the_direct_url_beside_a_pooled_one(
    pgbouncer: PgBouncer, empty_database: str, database_url: str
) -> None:
    """`agentrt db upgrade` with DATABASE_URL at the pooler migrates through DATABASE_MIGRATION_URL; `db status`
    shows the pooler mode it detected and the timeouts read back from the server."""
    direct = make_url(database_url).set(database=empty_database).render_as_string(hide_password=False)
    env = {'DATABASE_URL': pgbouncer.url(), 'DATABASE_MIGRATION_URL': direct, 'AGENTRT_AUTO_MIGRATE': 'false'}
    result = await invoke('db', 'upgrade', env=env)
    assert result.exit_code == 0, result.output
    assert f'schema: empty -> {head_revision()}' in result.stdout
    # The migration went to the direct URL's database (the pooled one is the suite's, already at head).
    engine = build_engine(parse_database_url(direct), Settings(database_url=direct))
    try:
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()

    status = await invoke('db', 'status', env={'DATABASE_URL': pgbouncer.url()})
    assert status.exit_code == 0, status.output
    assert 'pgbouncer, transaction mode (detected)' in status.stdout
    assert 'statement 30000 ms, lock 10000 ms' in status.stdout and 'not what was configured' not in status.stdout
    refused = await invoke('db', 'status', env={'DATABASE_URL': pgbouncer.url(), 'DB_POOLER': 'none'})
    assert refused.exit_code != 0 and 'set DB_POOLER=pgbouncer' in refused.stderr


async def _second_session_error(bouncer: PgBouncer, database: Settings) -> DatabaseUnavailableError:
    """What a second session gets through `bouncer` (started and stopped here) while a first one is in a transaction."""
    bouncer.start()
    try:
        pooled = await PooledDatabase.create(bouncer, database)
        try:
            async with pooled.active(), get_db_session(account=Unscoped.ADMIN) as first:
                await first.execute(text('SELECT 1'))
                with pytest.raises(DatabaseUnavailableError) as refused:
                    async with get_db_session(account=Unscoped.ADMIN) as second:
                        await second.execute(text('SELECT 1'))
        finally:
            await pooled.close()
    finally:
        bouncer.stop()
    return refused.value


async def test_pgbouncer_out_of_client_connections_is_said_so_not_a_lost_connection(database: Settings) -> None:
    # PgBouncer refuses a client over its max_client_conn at login (SQLSTATE 08P01); that was reported as "the
    # connection to PostgreSQL was lost ...; the operation did not complete (server restart, failover or a terminated
    # backend)", which sends an operator looking at PostgreSQL rather than at the pooler's limit and the pools' sizes.
    # The first session holds the one client connection PgBouncer accepts.
    refused = await _second_session_error(bouncer_for(get_engine().url, max_client_conn=1), database)
    assert not isinstance(refused, DatabaseDisconnectedError)
    message = str(refused)
    assert message.startswith('PgBouncer refused the connection: no more connections allowed (max_client_conn)')
    assert 'DB_POOL_SIZE' in message and 'DB_MAX_OVERFLOW' in message


async def test_pgbouncer_out_of_client_connections_at_start_up_says_what_to_raise() -> None:
    # A process starting while PgBouncer is full got PgBouncer's own words ("cannot connect to PostgreSQL at ...
    # (PgBouncer): no more connections allowed (max_client_conn)"), where a running one says what to raise (QA).
    bouncer = bouncer_for(get_engine().url, max_client_conn=1)
    bouncer.start()
    try:
        holder = await asyncpg.connect(bouncer.url())  # the one client connection it accepts
        try:
            result = await invoke('db', 'status', env={'DATABASE_URL': bouncer.url(), 'DB_POOLER': 'pgbouncer'})
        finally:
            await holder.close()
    finally:
        bouncer.stop()
    assert result.exit_code == 3, result.output
    assert f'cannot connect to PostgreSQL at 127.0.0.1:{bouncer.port}/' in result.stderr, result.stderr
    assert 'PgBouncer refused the connection: no more connections allowed (max_client_conn)' in result.stderr
    assert 'raise its max_client_conn to at least' in result.stderr and 'Traceback' not in result.output


async def test_pgbouncer_giving_up_on_a_server_connection_is_said_so(database: Settings) -> None:
    # A query that waited query_wait_timeout for one of PgBouncer's server connections (all busy, or PostgreSQL not
    # reachable) is closed with SQLSTATE 08P01: it was "the connection to PostgreSQL was lost ... (server restart,
    # failover or a terminated backend)".
    # The first session's transaction holds the one server connection.
    gave_up = await _second_session_error(bouncer_for(get_engine().url, pool_size=1, query_wait_timeout=1), database)
    assert isinstance(gave_up, DatabaseDisconnectedError)
    message = str(gave_up)
    assert message.startswith('PgBouncer gave up waiting for a server connection (query_wait_timeout)'), message
    assert 'default_pool_size' in message and 'server restart' not in message


async def test_pgbouncer_refusing_clients_while_its_logins_fail_is_said_so() -> None:
    # PostgreSQL stopped behind PgBouncer (serve --workers 3, a chat, db status): after its first failed login PgBouncer
    # refuses every client that needs a server connection for server_login_retry seconds, with SQLSTATE 08P01 and this
    # text. It was "the connection to PostgreSQL was lost (...); the operation did not complete (server restart,
    # failover or a terminated backend)": a DatabaseDisconnectedError, whose outcome is unknown, for an operation that
    # never reached PostgreSQL, and no word of PgBouncer or its setting.
    pgbouncer_said = asyncpg.ProtocolViolationError(
        'connection was closed in the middle of operation: server login has been failing, try again later '
        '(server_login_retry)'
    )
    wrapped = DBAPIError('SELECT 1', {}, pgbouncer_said)
    error = unavailable_error(wrapped)
    assert isinstance(error, DatabaseUnavailableError) and not isinstance(error, DatabaseDisconnectedError)
    message = str(error)
    assert message.startswith('PgBouncer cannot log in to PostgreSQL'), message
    assert 'server_login_retry' in message and 'not run' in message and 'terminated backend' not in message


async def test_a_login_pgbouncer_refuses_is_a_configuration_error_naming_what_to_check(database: Settings) -> None:
    # PgBouncer 1.18 refuses a wrong password (or user) and a database its [databases] does not list with SQLSTATE
    # 08P01 (a protocol violation, not PostgreSQL's 28P01 / 3D000): exit 3, "database unavailable", as for an outage.
    bouncer = bouncer_for(get_engine().url)
    bouncer.write_ini(
        [
            line.replace('auth_type = trust', 'auth_type = md5')
            for line in bouncer.ini_lines()
            if not line.startswith('* =')  # only the listed database
        ]
    )
    (bouncer.root / 'users.txt').write_text(f'"{bouncer.user}" "right-password"\n')
    bouncer.start()
    try:
        url = make_url(bouncer.url())
        for changed, said, advice in (
            (url.set(password='hunter2'), 'password authentication failed', 'check the user name and password'),
            (url.set(password='right-password', database='nodb'), 'no such database: nodb', 'database name'),
        ):
            env = {'DATABASE_URL': changed.render_as_string(hide_password=False), 'DB_POOLER': 'pgbouncer'}
            result = await invoke('db', 'status', env=env)
            assert result.exit_code == 2, result.stderr
            line = result.stderr.strip()
            assert 'refused the login: ' + said in line and advice in line and 'DATABASE_URL' in line, line
            assert 'hunter2' not in result.stderr + result.stdout and 'right-password' not in result.stderr
    finally:
        bouncer.stop()


@pytest.mark.parametrize(
    'driver_said',
    [
        asyncpg.exceptions._base.InternalClientError('cannot switch to state 15; another operation (2) is in progress'),
        asyncpg.InterfaceError('cannot perform operation: another operation is in progress'),
    ],
)
def test_a_connection_found_out_of_step_is_said_in_words(driver_said: Exception) -> None:
    # After a PgBouncer KILL (measured: `agentrt serve` behind PgBouncer, KILL and RESUME every 0.7 s under 4 turns at
    # once) a turn's 503 and the server's log said "the connection to PostgreSQL was lost (cannot switch to state 15;
    # another operation (2) is in progress)": asyncpg's protocol states, which tell an operator nothing.
    error = unavailable_error(DBAPIError('BEGIN;', {}, driver_said))
    assert isinstance(error, DatabaseDisconnectedError)
    message = str(error)
    assert message.startswith('the connection to PostgreSQL was lost (the server or a pooler ended it while'), message
    assert 'state' not in message and 'another operation' not in message, message


async def test_a_connection_refused_after_the_start_names_the_pooler_it_could_not_reach(database: Settings) -> None:
    # PgBouncer stopped under `serve --workers 3`: every turn was "cannot connect to PostgreSQL: [Errno 111] Connection
    # refused", naming neither the address nor the pooler (the start's own message names them).
    bouncer = bouncer_for(get_engine().url)
    bouncer.start()
    try:
        pooled = await PooledDatabase.create(bouncer, database)
    finally:
        bouncer.stop()
    try:
        async with pooled.active():
            # (a read finds its pooled connection closed and starts again on a new one: refused)
            with pytest.raises(DatabaseUnavailableError) as refused:
                async with get_read_only_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT 1'))
    finally:
        await pooled.close()
    message = str(refused.value)
    assert f'cannot connect to PostgreSQL at 127.0.0.1:{bouncer.port}/{bouncer.database} (PgBouncer): ' in message


def _readme_pgbouncer_ini() -> list[str]:
    """The ```ini block of README's section "Running several workers", as a user copies it."""
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    section = readme[readme.index('## Running several workers') :]
    section = section[: section.index('\n## ', 3)]
    return section[
        section.index('```ini\n') + len('```ini\n') : section.index('```', section.index('```ini\n') + 6)
    ].splitlines()


async def test_the_readme_pgbouncer_ini_runs_as_written(database: Settings) -> None:
    # The README's ini put comments after values (`default_pool_size = 10   ; ...`): PgBouncer 1.18 reads the whole
    # rest of the line as the value and refused to start ("invalid value ... for parameter default_pool_size").
    # Kept verbatim but for where it runs: the database's address, the port, and trust authentication (no password
    # here); its own files (log, pid) added.
    bouncer = bouncer_for(get_engine().url)
    ours = bouncer.ini_lines()
    own_keys = ('listen_port', 'auth_type', 'auth_file', 'logfile', 'pidfile', 'unix_socket_dir', 'admin_users')

    def key(line: str) -> str:
        return line.split('=', 1)[0].strip()

    readme = _readme_pgbouncer_ini()
    assert 'pool_mode = transaction' in readme and any(key(line) == 'server_login_retry' for line in readme)
    database_line = next(line for line in ours if line.startswith(f'{bouncer.database} = '))
    ini: list[str] = []
    for line in readme:
        if line.startswith('agents = '):
            ini.append(database_line)
        elif key(line) not in own_keys:
            ini.append(line)
        if line == '[pgbouncer]':
            ini += [line for line in ours if key(line) in own_keys]
    bouncer.write_ini(ini)
    try:
        bouncer.start()  # raises with PgBouncer's own message when it exits instead
        pooled = await PooledDatabase.create(bouncer, database)
        try:
            async with pooled.active(), get_db_session(account=Unscoped.ADMIN) as session:
                assert (await session.execute(text('SELECT 1'))).scalar_one() == 1
        finally:
            await pooled.close()
        assert 'FATAL' not in bouncer.log() and 'ERROR' not in bouncer.log()
    finally:
        bouncer.stop()


async def test_a_server_without_tls_under_sslmode_require_says_which_setting_asked_for_it(pgbouncer: PgBouncer) -> None:
    # PgBouncer with no client TLS configured refuses the SSL upgrade, as a PostgreSQL without ssl does: asyncpg's
    # "rejected SSL upgrade" alone named neither the setting asking for TLS nor what to change (qa177).
    for env in (
        {'DATABASE_URL': f'{pgbouncer.url()}?sslmode=require'},
        {'DATABASE_URL': pgbouncer.url(), 'PGSSLMODE': 'require'},
    ):
        result = await invoke('db', 'status', env={**env, 'DB_POOLER': 'pgbouncer', 'DB_CONNECT_TIMEOUT': '5'})
        assert result.exit_code == 3, result.output
        [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
        assert 'the server does not accept TLS connections (it rejected the SSL upgrade)' in line, line
        assert 'set sslmode=prefer or disable' in line and 'Traceback' not in result.output
