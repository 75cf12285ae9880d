"""The queue's connections: an attempt cancelled mid-connect leaves no socket open (one that had not sent its startup
packet yet is a connection PostgreSQL's shutdown waits for, up to `authentication_timeout`: see `QueueConnection`)."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Generator
from typing import Any

import asyncpg
import psycopg
import pytest
from procrastinate import App
from psycopg import generators
from sqlalchemy.engine import make_url

from agentrt.db.engine import current_settings, get_engine
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.services.jobs import close_queue, jobs, open_queue
from agentrt.services.jobs._app import QueueConnection, queue_conninfo
from tests.agents.cli.helpers import invoke
from tests.pgbouncer import bouncer_for
from tests.private_database import PrivateDatabase
from tests.programs import run_program
from tests.services.jobs.helpers import queue_url


def _sockets() -> int:
    """The sockets this process has open."""
    count = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            count += os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return count


async def _cancelled_at_its_first_wait(connection_class: type[psycopg.AsyncConnection[Any]]) -> BaseException:
    """Cancel a connection attempt at its first wait for the server (its socket connected); return the
    `CancelledError`, kept as a task or a caller keeps it."""
    real = generators.connect
    task: asyncio.Task[Any] | None = None

    def connect(conninfo: str) -> Generator[Any, Any, Any]:
        attempt = real(conninfo)
        wait = next(attempt)
        assert task is not None
        task.cancel()
        while True:
            try:
                wait = attempt.send((yield wait))
            except StopIteration as done:
                return done.value

    generators.connect = connect  # not monkeypatch: it would keep `connect`, the task and the attempt till the end
    try:
        task = asyncio.create_task(connection_class.connect(queue_conninfo(current_settings(), get_engine().url)))
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
    finally:
        generators.connect = real
    return raised.value


async def test_a_cancelled_connection_attempt_closes_its_socket_at_once() -> None:
    before = _sockets()
    kept = await _cancelled_at_its_first_wait(QueueConnection)
    assert isinstance(kept, asyncio.CancelledError) and _sockets() == before
    # psycopg's own keeps the attempt's socket open as long as its exception is (what QueueConnection is for).
    also_kept = await _cancelled_at_its_first_wait(psycopg.AsyncConnection)
    assert isinstance(also_kept, asyncio.CancelledError) and _sockets() == before + 1


async def test_the_queue_and_its_worker_connect_with_it(queue: None) -> None:
    app = await open_queue()
    pool = app.connector.pool  # type: ignore[attr-defined]
    assert pool.connection_class is QueueConnection  # procrastinate's LISTEN connection is made with it too
    async with pool.connection() as connection:
        assert isinstance(connection, QueueConnection)


async def test_a_queue_whose_server_goes_away_as_it_opens_leaves_no_pool_running(
    queue: None, private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool opened, then its first query (the check for the job tables) failed: open_queue raised but left that
    # pool running, its connection tasks trying to reconnect; the next open_queue replaced it, and asyncio printed
    # "Task was destroyed but it is pending! task: <Task pending name='agentrt-jobs-worker-0' ...>" three times (seen in
    # `agentrt serve`'s log when PgBouncer was killed as a process queued its first jobs).
    real_open = jobs.open_async

    async def open_then_server_stops() -> App:
        opened = await real_open()
        await asyncio.to_thread(private_database.server.stop, 'fast')
        return opened

    async with private_database.active():
        monkeypatch.setattr(current_settings(), 'connect_timeout', 1)
        monkeypatch.setattr(jobs, 'open_async', open_then_server_stops)
        try:
            with pytest.raises(DatabaseUnavailableError, match='job queue cannot connect to PostgreSQL'):
                await open_queue()
            assert _queue_pool_tasks() == []
        finally:
            await asyncio.to_thread(private_database.server.ensure_running)
            await close_queue()


def _queue_pool_tasks() -> list[str]:
    """The tasks of a queue pool still running in this loop (psycopg names them after the pool)."""
    return sorted(task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith('agentrt-jobs'))


async def test_openings_that_wait_for_each_other_on_a_second_event_loop(database_url: str) -> None:
    """Two openings of the queue at once on one `asyncio.run`, then on the next (a script's turns, each queueing its
    jobs): the lock they queue on was one for the process, bound to the first loop that waited on it, and the second
    loop's waiter got asyncio's raw "RuntimeError: <Lock> is bound to a different event loop"."""
    script = textwrap.dedent(
        """
        import asyncio
        from agentrt.db.engine import init_database
        from agentrt.services.jobs import close_queue, open_queue

        async def two_openings(close):
            await init_database()
            opened = await asyncio.gather(open_queue(), open_queue(), return_exceptions=True)
            print([type(app).__name__ for app in opened])
            if close:
                await close_queue()

        asyncio.run(two_openings(close=False))  # ends without closing it, as a script's asyncio.run(simple_chat()) does
        asyncio.run(two_openings(close=True))
        """
    )
    done = await run_program('-c', script, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['App', 'App']"] * 2, done.stdout + done.stderr


async def test_a_space_in_the_urls_options_reaches_postgresql_as_a_space(database_url: str) -> None:
    # SQLAlchemy writes a space in a URL's query as `+` (a form's encoding), which libpq does not decode: README's own
    # `options=-c%20search_path%3Dapp` reached PostgreSQL as the parameter `+search_path`, and the queue never
    # connected (qa120). As the runtime's own connections (asyncpg) read the same URL.
    joined = '&' if '?' in database_url else '?'
    url = f'{database_url}{joined}options=-c%20application_name%3Dqueue_test'
    # A space in the password too: written as a space, libpq refused the URI ("unexpected spaces found"; qa124). The
    # test server trusts its connections: the password is parsed, not checked.
    url = make_url(url).set(password='a b').render_as_string(hide_password=False)  # encoded: a%20b
    settings = current_settings().model_copy(update={'queue_database_url': url})
    conninfo = queue_conninfo(settings, get_engine().url)
    async with await psycopg.AsyncConnection.connect(conninfo) as connection:
        row = await (await connection.execute('SHOW application_name')).fetchone()
    assert row == ('queue_test',)
    assert 'a b' not in queue_conninfo(settings, get_engine().url, hide_password=True)


async def test_the_embedded_servers_queue_connects_whatever_the_environments_ssl_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PGSSLMODE / PGSSLROOTCERT meant for another server: the engine's URL names sslmode=disable for the embedded
    # server's socket, but the queue's (libpq) read the environment, and `PGSSLROOTCERT=system` refused every mode but
    # verify-full ("weak sslmode ... may not be used with sslrootcert=system"): post-turn jobs dropped (QA).
    # As with no DATABASE_URL: the queue's URL made from the engine's (the suite's server, on its socket as the
    # embedded one is).
    settings = current_settings().model_copy(update={'database_url': None, 'queue_database_url': None})
    monkeypatch.setenv('PGSSLROOTCERT', 'system')
    for mode in ('require', 'disable', 'verify-ca'):
        monkeypatch.setenv('PGSSLMODE', mode)
        async with await psycopg.AsyncConnection.connect(queue_conninfo(settings, get_engine().url)) as connection:
            assert await (await connection.execute('SELECT 1')).fetchone() == (1,)


@pytest.mark.parametrize(
    'variable',
    [
        'PGGSSENCMODE=require',
        'PGCHANNELBINDING=require',
        'PGSSLNEGOTIATION=direct',
        'PGTARGETSESSIONATTRS=standby',
        'PGSSLMINPROTOCOLVERSION=TLSv9',
        'PGCONNECT_TIMEOUT=abc',
        'PGREQUIREAUTH=scram-sha-256',
        'PGREQUIREPEER=nobody',
        'PGOPTIONS=-c no_such.setting',
        'PGHOSTADDR=192.0.2.1',
    ],
)
async def test_the_embedded_servers_queue_connects_whatever_the_environments_libpq_settings(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Meant for another server, each failed every connection of the queue to the embedded server's socket
    # (`PGGSSENCMODE=require`: "GSSAPI encryption required but it is not supported over a local socket"): each turn
    # waited 10 s and its post-turn jobs were dropped, `agentrt worker --burst` ended "cannot connect" (QA).
    settings = current_settings().model_copy(update={'database_url': None, 'queue_database_url': None})
    monkeypatch.setenv(*variable.split('=', 1))
    conninfo = queue_conninfo(settings, get_engine().url)
    async with await psycopg.AsyncConnection.connect(conninfo) as connection:
        assert await (await connection.execute('SELECT 1')).fetchone() == (1,)


async def test_hosts_with_their_ports_in_the_query_reach_libpq_as_its_lists(database_url: str) -> None:
    # README's form for one host or several, `?host=db1:5432&host=db2:5432` (asyncpg's): libpq kept the last `host`
    # and read `db2:5432` as a host name, so the queue never connected (qa126). Here the first host is a socket
    # directory where nothing listens: libpq goes on to the next, as asyncpg does.
    url = make_url(database_url)  # the suite's: `...@/postgres?host=<socket directory>&port=<port>`
    socket_dir, port = url.query['host'], url.query['port']
    for hosts in ((f'{socket_dir}:{port}',), ('/nonexistent-socket-dir:5432', f'{socket_dir}:{port}')):
        queue = url.set(query={'host': hosts}).render_as_string(hide_password=False)
        settings = current_settings().model_copy(update={'queue_database_url': queue})
        conninfo = queue_conninfo(settings, get_engine().url)
        async with await psycopg.AsyncConnection.connect(conninfo) as connection:
            assert await (await connection.execute('SELECT 1')).fetchone() == (1,)


async def test_a_full_pgbouncer_in_front_of_the_queue_says_what_to_raise(database_url: str) -> None:
    # The queue's psycopg connections through a PgBouncer at its max_client_conn got only PgBouncer's words, in each
    # "trying again" warning and the last line, where the runtime's own connections say what to raise (qa174).
    bouncer = bouncer_for(get_engine().url, max_client_conn=1)
    bouncer.start()
    try:
        holder = await asyncpg.connect(bouncer.url())  # the one client connection it accepts
        try:
            env = {
                'DATABASE_URL': queue_url(database_url),
                'AGENTRT_QUEUE_DATABASE_URL': bouncer.url(),
                'DB_CONNECT_TIMEOUT': '3',
            }
            result = await invoke('worker', '--burst', env=env)
        finally:
            await holder.close()
    finally:
        bouncer.stop()
    assert result.exit_code == 3, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert line.startswith('error: the job queue cannot connect to PostgreSQL at postgresql://'), line
    advice = 'PgBouncer refused the connection: no more connections allowed (max_client_conn): it accepts fewer'
    assert advice in line and 'raise its max_client_conn to at least' in line, line
    assert line.endswith('or lower those pools (no connection could be made within DB_CONNECT_TIMEOUT)'), line
    warnings = [line for line in result.stderr.splitlines() if 'the job queue cannot connect to PostgreSQL (' in line]
    assert warnings and all(advice in warning for warning in warnings), result.stderr
