"""`agentrt worker` in this process (`invoke`): what its log shows. Its stops and faults, as separate processes, are in
tests/services/jobs/."""

from __future__ import annotations

import time

from click.testing import Result
from sqlalchemy import text
from sqlalchemy.engine import make_url

from agentrt.db.session import Unscoped, get_db_session
from tests.agents.cli.helpers import invoke
from tests.services.jobs.helpers import PROCRASTINATE_TABLES, queue_url

_ROLLUP = (
    "INSERT INTO procrastinate_jobs (queue_name, task_name, args) VALUES ('post_turn', 'agentrt.usage_rollup', :a)"
)


async def _one_job_queued(*, scheduled: bool = False) -> None:
    """A rollup job, the only one in the queue; `scheduled`: due now, as a deferral with a delay leaves it (the worker
    then reads its `scheduled_at`, a timestamptz)."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
        await session.execute(text(_ROLLUP), {'a': '{"account_id": 1}'})
        if scheduled:
            await session.execute(text('UPDATE procrastinate_jobs SET scheduled_at = now()'))


async def test_verbose_shows_each_job_and_how_it_ended(demo_data: None, database_url: str) -> None:
    # `agentrt -v worker` ("show debug logs") showed no line of the jobs it ran: procrastinate's lines were hidden.
    env = {'DATABASE_URL': queue_url(database_url)}
    await _one_job_queued()
    verbose = await invoke('-v', 'worker', '--burst', env=env)
    assert verbose.exit_code == 0, verbose.stderr[-2000:]
    assert 'Job agentrt.usage_rollup[1](account_id=1) ended with status: Success' in verbose.stderr, verbose.stderr
    await _one_job_queued()
    quiet = await invoke('worker', '--burst', env=env)
    assert quiet.exit_code == 0, quiet.stderr[-2000:]
    assert 'worker: queues' in quiet.stderr and 'ended with status' not in quiet.stderr, quiet.stderr


async def test_the_log_masks_the_client_keys_password(database_url: str) -> None:
    # "job queue open on postgresql://app:***@.../agents?sslpassword=KEYSEKRET..." (qa174).
    url = make_url(queue_url(database_url)).update_query_dict({'sslpassword': 'KEYSEKRET', 'sslmode': 'disable'})
    result = await invoke('worker', '--burst', env={'DATABASE_URL': url.render_as_string(hide_password=False)})
    assert result.exit_code == 0, result.stderr[-2000:]
    [opened] = [line for line in result.stderr.splitlines() if 'job queue open on' in line]
    assert 'sslpassword=***' in opened, opened
    assert 'KEYSEKRET' not in result.stdout + result.stderr


async def _refused_at_once(database_url: str, queue: str) -> Result:
    """`agentrt worker --burst` with the queue at `queue`, which its server refuses: exit 2, well within the 30 s of
    DB_CONNECT_TIMEOUT (not retried as an outage)."""
    env = {'DATABASE_URL': queue_url(database_url), 'AGENTRT_QUEUE_DATABASE_URL': queue, 'DB_CONNECT_TIMEOUT': '30'}
    started = time.monotonic()
    result = await invoke('worker', '--burst', env=env)
    assert time.monotonic() - started < 15
    assert result.exit_code == 2, result.stderr
    return result


async def test_a_queue_login_refused_is_one_configuration_line(database_url: str) -> None:
    # `AGENTRT_QUEUE_DATABASE_URL` with a wrong password, role or database: four warnings ("trying again") over
    # DB_CONNECT_TIMEOUT, then exit 3 "cannot connect", which a process manager answers by starting the worker again
    # for ever; DATABASE_URL's is one "refused the login" line naming the variable, exit 2 (QA).
    url = make_url(queue_url(database_url))
    for changed, named in (
        (url.set(database='agentrt_no_such_queue'), 'database "agentrt_no_such_queue" does not exist'),
        (url.set(username='agentrt_no_such_role'), 'role "agentrt_no_such_role" does not exist'),
    ):
        queue = changed.set(password='hunter2').render_as_string(hide_password=False)
        result = await _refused_at_once(database_url, queue)
        line = result.stderr.strip()
        assert line.startswith('error: PostgreSQL at ') and f'refused the login: {named}: check the ' in line, line
        assert 'in AGENTRT_QUEUE_DATABASE_URL' in line, line
        assert '\n' not in line and 'hunter2' not in result.stderr, result.stderr


async def test_a_server_setting_the_queues_server_refuses_is_one_configuration_line(database_url: str) -> None:
    # A bad value in `AGENTRT_QUEUE_DATABASE_URL`'s options: retried as an outage over DB_CONNECT_TIMEOUT, then exit 3,
    # where DATABASE_URL's is one line naming the setting, exit 2 (qa120).
    url = make_url(queue_url(database_url))
    queue = url.update_query_dict({'options': '-cstatement_timeout=abc'}).render_as_string(hide_password=False)
    result = await _refused_at_once(database_url, queue)
    line = result.stderr.strip()
    assert line.startswith('error: PostgreSQL at ') and 'refused the server setting statement_timeout of ' in line, line
    assert 'AGENTRT_QUEUE_DATABASE_URL (invalid value for parameter "statement_timeout": "abc")' in line, line
    assert '\n' not in line and 'trying again' not in result.stderr, result.stderr


async def test_the_queues_connections_pin_the_settings_psycopg_reads_rows_with(
    demo_data: None, database_url: str
) -> None:
    # libpq sends PGDATESTYLE as a server setting that no URL parameter overrides: with German the worker ended at its
    # first job (psycopg cannot parse "07.12.2026 23:05:26 UTC": an internal error, exit 70), the job left queued. With
    # PGCLIENTENCODING=SQL_ASCII psycopg read text as bytes, and each job failed "Task cannot be imported" (QA).
    for variable, value in (('PGDATESTYLE', 'German'), ('PGCLIENTENCODING', 'SQL_ASCII')):
        await _one_job_queued(scheduled=True)
        env = {'DATABASE_URL': queue_url(database_url), variable: value}
        result = await invoke('-v', 'worker', '--burst', env=env)
        assert result.exit_code == 0, f'{variable}={value}: {result.stderr[-2000:]}'
        assert 'agentrt.usage_rollup[1](account_id=1) ended with status: Success' in result.stderr, result.stderr


async def test_a_server_setting_libpq_sends_from_a_variable_is_refused_naming_the_variable(database_url: str) -> None:
    # PGTZ=Mars/Base: "refused the server setting TimeZone of DATABASE_URL ...: correct it or remove it from its
    # options parameter", which held none; PGGEQO=abc was retried as an outage until DB_CONNECT_TIMEOUT, then exit 3.
    for variable, value, said in (
        ('PGTZ', 'Mars/Base', 'invalid value for parameter "TimeZone": "Mars/Base"'),
        ('PGGEQO', 'abc', 'parameter "geqo" requires a Boolean value'),
        # Empty, libpq sends them all the same: PGTZ= was blamed on DATABASE_URL's options parameter (QA). An empty
        # PGDATESTYLE is sent too, and PostgreSQL takes it (the DateStyle stays as it was).
        ('PGTZ', '', 'invalid value for parameter "TimeZone": ""'),
        ('PGGEQO', '', 'parameter "geqo" requires a Boolean value'),
    ):
        env = {'DATABASE_URL': queue_url(database_url), variable: value, 'DB_CONNECT_TIMEOUT': '30'}
        started = time.monotonic()
        result = await invoke('worker', '--burst', env=env)
        assert time.monotonic() - started < 15
        assert result.exit_code == 2, result.stderr
        line = result.stderr.strip()
        assert line.startswith('error: PostgreSQL at ') and f'sends from {variable}={value!r} ({said})' in line, line
        assert line.endswith(f'correct {variable} or unset it') and 'options' not in line, line
