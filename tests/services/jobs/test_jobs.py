"""Durable post-turn jobs (AGENTRT_BACKGROUND=queue) on the test PostgreSQL: queued by id after a turn, coalesced,
run by a worker; a worker killed mid-job (SIGKILL) has its job run again by another, counted once; a turn whose jobs
were never queued is repaired by reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import signal
import time
import uuid
from typing import Any

import psycopg
import pytest
from logfire.testing import CaptureLogfire
from procrastinate.exceptions import ConnectorException
from sqlalchemy import text

from agentrt.db.engine import current_settings, get_engine
from agentrt.db.errors import ConfigError, DatabaseUnavailableError
from agentrt.db.roles import FUNCTION_ROLES
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services import jobs as jobs_module
from agentrt.services.background import get_supervisor
from agentrt.services.jobs import _reconcile as reconcile_module
from agentrt.services.jobs import _tasks as tasks_module
from agentrt.services.jobs import _worker as worker_module
from agentrt.services.jobs import (
    close_queue,
    defer_summary,
    listens,
    reconcile_post_turn_work,
    retry_stalled_jobs,
    run_worker,
)
from agentrt.services.jobs._app import queue_unavailable
from tests.agents.cli.helpers import invoke
from tests.factories import ledger_rows
from tests.ports import free_port
from tests.private_database import PrivateDatabase
from tests.services.jobs.helpers import (
    PROCRASTINATE_TABLES,
    WorkerProcess,
    chat,
    queue_url,
    queued_jobs,
    rolled_up_requests,
    rollup_lock_held,
    title,
    titles_left_to_the_background,
    wait_for,
)

_WORKER_LOST_POSTGRESQL = r'(worker stopped by itself|job queue lost PostgreSQL).*AGENTRT_JOBS_OUTAGE_SECONDS is 0'
HEARTBEAT_S, STALLED_S = 0.25, 1.0  # the killed worker's AGENTRT_JOBS_HEARTBEAT_SECONDS and _STALLED_SECONDS


async def test_a_title_and_summary_stored_by_the_save_queue_no_job(queue: None) -> None:
    await chat('saved')
    assert await queued_jobs() == [('agentrt.usage_rollup', 'todo')]
    assert await title('saved')


async def test_turns_queue_their_jobs_once_and_a_worker_runs_them(queue: None, monkeypatch: pytest.MonkeyPatch) -> None:
    titles_left_to_the_background(monkeypatch)
    await chat('queued')
    await chat('queued')  # no summary due yet (every 5 turns), and the pending rollup covers this turn too
    assert await queued_jobs() == [('agentrt.conversation_summary', 'todo'), ('agentrt.usage_rollup', 'todo')]
    assert await title('queued') is None and await rolled_up_requests() == 0

    await run_worker(concurrency=2, burst=True)

    assert await title('queued')
    assert await rolled_up_requests() == len(await ledger_rows()) == 6
    assert await queued_jobs() == []  # succeeded jobs are deleted


async def test_a_login_role_that_does_not_own_the_tables_runs_the_queue(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue connects as its URL's login role and takes none of the runtime's roles. A login role that did not own
    # procrastinate's tables (migrated by another role), a member of the runtime's roles as README "Tenant isolation"
    # asks, had no right on them: every turn logged "queue post-turn jobs ... failed: ConnectorException: Database
    # error." and no worker could start. Migration 0016 grants them to agentrt_jobs, whose members inherit them.
    login = f'agentrt_test_queue_{uuid.uuid4().hex[:8]}'
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f"CREATE ROLE {login} LOGIN NOSUPERUSER PASSWORD 'pw'"))
        await session.execute(text(f'GRANT {", ".join(FUNCTION_ROLES)} TO {login}'))
    url = get_engine().url.set(username=login, password='pw').render_as_string(hide_password=False)
    monkeypatch.setattr(current_settings(), 'queue_database_url', queue_url(url))
    await close_queue()
    titles_left_to_the_background(monkeypatch)
    try:
        await chat('not-owner')
        assert await queued_jobs() == [('agentrt.conversation_summary', 'todo'), ('agentrt.usage_rollup', 'todo')]
        await run_worker(concurrency=2, burst=True)
        assert await title('not-owner') and await rolled_up_requests() == 3
        assert await queued_jobs() == []
        # Without those rights (a membership that does not inherit, a grant revoked), the error says what to grant,
        # not procrastinate's "Database error.", when a turn queues its jobs and when a worker starts.
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'REVOKE ALL ON {PROCRASTINATE_TABLES} FROM agentrt_jobs'))
        await close_queue()
        for refused in (defer_summary(1, 'not-owner-2'), run_worker(concurrency=1, burst=True)):
            with pytest.raises(ConfigError) as raised:
                await refused
            message = str(raised.value)
            assert message.startswith(f"the job queue's login role ({login}) was refused its tables (permission"), (
                message
            )
            assert f'GRANT agentrt_jobs TO {login}' in message and 'CONTEXT' not in message, message
    finally:
        await close_queue()
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(
                text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {PROCRASTINATE_TABLES} TO agentrt_jobs')
            )
            await session.execute(text(f'REVOKE {", ".join(FUNCTION_ROLES)} FROM {login}'))
            await session.execute(text(f'DROP ROLE {login}'))


async def test_each_job_a_worker_runs_is_one_span_its_failure_recorded_redacted(
    queue: None, capfire: CaptureLogfire, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `agentrt worker` made no span of a job: each of its statements was a trace of its own, with nothing to say
    # which job, conversation or account it was for, nor that the job failed.
    titles_left_to_the_background(monkeypatch)
    await chat('spanned')
    secret = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'

    async def fail(account_id: int, **kwargs: Any) -> None:
        raise RuntimeError(f'rollup failed, token={secret}')

    monkeypatch.setattr(tasks_module, 'roll_up_account_usage', fail)
    await run_worker(concurrency=2, burst=True)
    spans = {
        s.name: s
        for s in capfire.exporter.exported_spans
        if s.name.startswith('background task') and (s.attributes or {}).get('logfire.span_type') == 'span'
    }
    summary, rollup = spans['background task conversation summary'], spans['background task usage rollup']
    assert summary.attributes is not None and summary.attributes['gen_ai.conversation.id'] == 'spanned'
    assert summary.attributes['agentrt.job'] is True and summary.status.status_code.name == 'UNSET'
    statements = [
        s for s in capfire.exporter.exported_spans if s.parent and s.parent.span_id == summary.context.span_id
    ]
    assert statements  # its database work under it: the session's connection and statements
    assert rollup.status.status_code.name == 'ERROR' and '[REDACTED]' in (rollup.status.description or '')
    assert 'aB3dE5fG7hJ9' not in repr((rollup.status, [e.attributes for e in rollup.events]))


async def test_reconcile_queues_the_work_of_a_turn_saved_by_a_process_that_died_before_queueing(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def died(*args: Any, **kwargs: Any) -> None:
        return None  # the turn is saved; the process dies before its jobs are queued

    monkeypatch.setattr(jobs_module, 'defer_post_turn_work', died)
    titles_left_to_the_background(monkeypatch)
    await chat('orphan')
    assert await queued_jobs() == [] and await title('orphan') is None and await rolled_up_requests() == 0

    report = await reconcile_post_turn_work(idle_seconds=0)
    assert report.summaries_queued == 1 and report.rollup_buckets >= 1
    assert (await reconcile_post_turn_work(idle_seconds=0)).summaries_queued == 0  # already pending: not twice
    await run_worker(concurrency=2, burst=True)

    assert await title('orphan')
    assert await rolled_up_requests() == len(await ledger_rows()) == 3


async def test_reconcile_queues_a_summary_that_failed_for_good_again_a_day_later_not_at_every_run(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reconcile (every 5 minutes) queued a summary that failed every attempt again at each run: 288 failed jobs a day
    # per conversation whose summary always fails, kept for AGENTRT_JOBS_KEEP_FAILED_DAYS.
    async def died(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(jobs_module, 'defer_post_turn_work', died)
    titles_left_to_the_background(monkeypatch)
    await chat('always-fails')
    async with get_db_session(account=Unscoped.OWNER) as session:
        account_id = (
            await session.execute(text("SELECT account_id FROM conversations WHERE conversation_id = 'always-fails'"))
        ).scalar_one()
        args = json.dumps({'account_id': account_id, 'conversation_id': 'always-fails'})
        job_id = (
            await session.execute(
                text(
                    "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('post_turn', 'agentrt.conversation_summary', 0, "
                    'NULL, NULL, CAST(:args AS jsonb), NULL)::procrastinate_job_to_defer_v1]))[1]'
                ),
                {'args': args},
            )
        ).scalar_one()
        for status in ('doing', 'failed'):  # its last attempt failed a minute ago
            await session.execute(
                text('UPDATE procrastinate_jobs SET status = CAST(:s AS procrastinate_job_status) WHERE id = :id'),
                {'id': job_id, 's': status},
            )
        await session.execute(
            text("UPDATE procrastinate_events SET at = now() - interval '1 minute' WHERE job_id = :id"), {'id': job_id}
        )

    assert (await reconcile_post_turn_work(idle_seconds=0)).summaries_queued == 0
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(
            text("UPDATE procrastinate_events SET at = now() - interval '25 hours' WHERE job_id = :id"), {'id': job_id}
        )
    assert (await reconcile_post_turn_work(idle_seconds=0)).summaries_queued == 1  # a day on: tried again
    assert ('agentrt.conversation_summary', 'todo') in await queued_jobs()


async def rollup_running() -> bool:
    return ('agentrt.usage_rollup', 'doing') in await queued_jobs()


async def test_a_job_whose_worker_is_killed_mid_job_is_run_again_by_another_and_counted_once(
    queue: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles_left_to_the_background(monkeypatch)
    await chat('killed')  # queues a summary and a rollup
    # Hold the rollup's lock, so the first worker's rollup is mid-job (waiting inside its transaction) when killed.
    async with rollup_lock_held():
        first = WorkerProcess(
            database_url,
            '--concurrency',
            '1',
            env={'AGENTRT_JOBS_HEARTBEAT_SECONDS': str(HEARTBEAT_S), 'AGENTRT_JOBS_STALLED_SECONDS': str(STALLED_S)},
        )
        try:
            await wait_for(rollup_running, 60, 'the first worker to start the rollup')
            first.signal(signal.SIGKILL)
            assert await first.exit_code(10) == -signal.SIGKILL
        finally:
            first.kill()
        # Stalled once its worker's last heartbeat (at most HEARTBEAT_S before the kill) is STALLED_S old: polled for,
        # not waited out with a fixed sleep.
        async with asyncio.timeout(30):
            while not (retried := await retry_stalled_jobs(seconds_since_heartbeat=STALLED_S)):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert retried == 1

    # The other worker: `agentrt worker --burst`, in this process (the killed one above is the command's subprocess
    # run); the queue is the process's, so this test's hold on it is given up first.
    await close_queue()
    second = await invoke('worker', '--burst', env={'DATABASE_URL': queue_url(database_url)})
    assert second.exit_code == 0, second.stderr[-2000:]
    assert await queued_jobs() == []
    assert await rolled_up_requests() == len(await ledger_rows()) == 3  # each ledger row counted once
    assert await title('killed')


async def test_a_worker_whose_server_goes_away_stops_with_a_database_error_not_exit_0(
    queue: None, private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # procrastinate stops a worker, without raising, when its LISTEN connection fails and cannot be made again (a
    # restart, a failover): the worker then exited 0, so no process manager started it again and no job ran; or, with
    # the server still down as it left, with "internal error: ConnectorException: Database error.". The server stays
    # down until the worker has stopped: a listener that reconnects to a server back already goes on, as it should
    # (a `pg_ctl restart` here raced with it, and in CI the worker outlived the restart).
    async with private_database.active():
        monkeypatch.setattr(current_settings(), 'connect_timeout', 2)  # its last writes wait for the server that long
        monkeypatch.setattr(
            current_settings(), 'jobs_outage_seconds', 0.0
        )  # at once (riding it out: test_worker_outage)
        worker = asyncio.ensure_future(run_worker(concurrency=1))
        try:
            async with asyncio.timeout(30):
                while not (worker.done() or await _listening()):  # noqa: ASYNC110 - polled, not waited out
                    await asyncio.sleep(0.02)
            if worker.done():
                worker.result()  # raises what stopped it before the server went away
            try:
                await asyncio.to_thread(private_database.server.stop, 'fast')
                with pytest.raises(DatabaseUnavailableError, match=_WORKER_LOST_POSTGRESQL):
                    await asyncio.wait_for(worker, 30)
            finally:
                await asyncio.to_thread(private_database.server.ensure_running)
        finally:
            await _stopped(worker)
            await close_queue()
    # The error raised says it once: procrastinate's own lines for the failed side task ("Side task listener failed
    # with exception: Database error., stopping worker", "listener error: ConnectorException(...)", each with a
    # traceback under `--debug`) came before it.
    # A job running as the server went (the periodic retry-stalled job, when its minute comes up) fails with it, and
    # that is one line of its own, in the runtime's words ("job_error: the job queue lost PostgreSQL ..."): kept.
    procrastinates = [r for r in caplog.records if r.name.startswith('procrastinate') and r.levelno >= logging.WARNING]
    side_task_lines = [r.getMessage() for r in procrastinates if getattr(r, 'action', None) != 'job_error']
    assert side_task_lines == []
    assert all(r.exc_info is None and 'lost PostgreSQL' in r.getMessage() for r in procrastinates)


async def test_a_job_that_ends_while_postgresql_is_down_says_its_outcome_was_not_saved(
    queue: None, private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # procrastinate saves a job's outcome in the job's own task, which nothing awaits: with PostgreSQL gone at that
    # moment, asyncio printed "Task exception was never retrieved" and two tracebacks (seen in CI, where the periodic
    # reconcile ended as the restart test restarted the server).
    started, finish = asyncio.Event(), asyncio.Event()

    async def held(**kwargs: Any) -> None:
        started.set()
        await finish.wait()

    monkeypatch.setattr(reconcile_module, 'reconcile_post_turn_work', held)
    async with private_database.active():
        monkeypatch.setattr(current_settings(), 'connect_timeout', 2)  # each write with the server down waits for it
        monkeypatch.setattr(
            current_settings(), 'jobs_outage_seconds', 0.0
        )  # at once (riding it out: test_worker_outage)
        worker: asyncio.Future[None] | None = None
        try:
            async with get_db_session(account=Unscoped.OWNER) as session:  # the worker defers the periodic reconcile
                await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
            worker = asyncio.ensure_future(run_worker(concurrency=1))
            await asyncio.wait_for(started.wait(), 30)
            try:
                await asyncio.to_thread(private_database.server.stop, 'fast')
                finish.set()
                with pytest.raises(DatabaseUnavailableError, match=_WORKER_LOST_POSTGRESQL):
                    await asyncio.wait_for(worker, 30)
            finally:
                await asyncio.to_thread(private_database.server.ensure_running)
        finally:
            await _stopped(worker)
            await close_queue()
    gc.collect()  # an unretrieved task exception is reported as the task is collected

    assert 'never retrieved' not in caplog.text
    [warning] = [r.getMessage() for r in caplog.records if 'how it ended could not be saved' in r.getMessage()]
    assert warning.startswith('agentrt.reconcile[1] ran, but how it ended could not be saved: the job queue lost ')
    assert warning.endswith('; it goes back to the queue')


async def _stopped(worker: asyncio.Future[None] | None) -> None:
    """A worker the test did not see to its end (it failed first) is cancelled here, not left running into the next
    test with an exception nobody retrieves."""
    if worker is not None and not worker.done():
        worker.cancel()
        with contextlib.suppress(BaseException):
            await worker


async def _listening() -> bool:
    """Whether a worker's listener is connected (it has sent its LISTEN): the worker runs."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN %'")
        return bool((await session.execute(query)).scalar_one())


async def test_a_queue_server_that_cannot_be_reached_is_a_database_error(
    queue: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Was "internal error: PoolTimeout: pool initialization incomplete after 30.0 sec ... report it", after 30 s.
    settings = current_settings()
    monkeypatch.setattr(settings, 'queue_database_url', f'postgresql://postgres@127.0.0.1:{free_port()}/postgres')
    monkeypatch.setattr(settings, 'connect_timeout', 1)
    await close_queue()
    try:
        with pytest.raises(DatabaseUnavailableError, match=r'job queue cannot connect to PostgreSQL at .*127\.0\.0\.1'):
            await asyncio.wait_for(run_worker(concurrency=1, burst=True), 20)
    finally:
        await close_queue()
    # Each failed attempt was psycopg's four lines ("error connecting in 'pool-1': connection failed: ... Is the server
    # running on that host and accepting TCP/IP connections?"); now one line each, in the runtime's words.
    attempts = [r.getMessage() for r in caplog.records if r.name == 'psycopg.pool' and r.levelno >= logging.WARNING]
    assert attempts
    for attempt in attempts:
        assert attempt.startswith('the job queue cannot connect to PostgreSQL (connection failed: ')
        assert attempt.endswith('; trying again') and '\n' not in attempt


async def test_a_queue_database_that_does_not_exist_is_a_login_refused_at_once(
    queue: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The error line said "no connection could be made within DB_CONNECT_TIMEOUT (pool initialization incomplete
    # after 1.0 sec)": what was wrong (the database's name) only in the warnings above it. Then it was named, but as
    # an outage (DatabaseUnavailableError, exit 3), after DB_CONNECT_TIMEOUT of attempts, each a warning "trying
    # again": a process manager started the worker again and again. DATABASE_URL's is a ConfigError (exit 2) at once.
    settings = current_settings()
    missing = get_engine().url.set(database='agentrt_no_such_queue').render_as_string(hide_password=False)
    monkeypatch.setattr(settings, 'queue_database_url', queue_url(missing))
    monkeypatch.setattr(settings, 'connect_timeout', 30)
    await close_queue()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError) as raised:
            await asyncio.wait_for(run_worker(concurrency=1, burst=True), 60)
    finally:
        await close_queue()
    assert time.monotonic() - started < 10
    error = str(raised.value)
    assert re.fullmatch(
        r'PostgreSQL at \S+/agentrt_no_such_queue refused the login: database "agentrt_no_such_queue" does not '
        r'exist: check the database name in AGENTRT_QUEUE_DATABASE_URL, or create that database',
        error,
    ), error
    said = [r.getMessage() for r in caplog.records if r.name == 'psycopg.pool' and r.levelno >= logging.WARNING]
    assert not any('trying again' in line for line in said), said


@pytest.mark.parametrize('level', [logging.WARNING, logging.DEBUG])
async def test_a_queue_connection_postgresql_closed_is_no_warning_of_psycopgs(
    queue: None, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    # PostgreSQL or PgBouncer gone: psycopg warned "discarding closed connection: <QueueConnection [BAD] at 0x...>" for
    # each connection that came back broken, not in the runtime's words, beside the line of the failure itself.
    caplog.set_level(level, logger='psycopg.pool')
    pool = (await jobs_module.open_queue()).connector.pool  # type: ignore[attr-defined]
    with pytest.raises(psycopg.OperationalError):
        async with pool.connection() as connection:  # a connection in use when its server process ends
            pid = (await (await connection.execute('SELECT pg_backend_pid()')).fetchone())[0]  # type: ignore[index]
            async with get_db_session(account=Unscoped.OWNER) as session:
                ended = await session.execute(text('SELECT pg_terminate_backend(:pid, 10000)'), {'pid': pid})
                assert ended.scalar_one() is True
            await connection.execute('SELECT 1')
    notices = [r for r in caplog.records if r.name == 'psycopg.pool' and 'connection' in r.getMessage()]
    assert all(r.levelno < logging.WARNING for r in notices), [r.getMessage() for r in notices]
    dropped = [r.getMessage() for r in notices if 'closed' in r.getMessage()]
    if level == logging.DEBUG:
        assert dropped == ['the job queue dropped a connection PostgreSQL closed; a new one replaces it']
    else:
        assert dropped == []


@pytest.mark.parametrize('pooler', ['none', 'pgbouncer'])
def test_the_queue_losing_pgbouncer_says_pgbouncer(monkeypatch: pytest.MonkeyPatch, pooler: str) -> None:
    # A worker whose PgBouncer went away said "the job queue lost PostgreSQL at 127.0.0.1:6432/...": an operator
    # looked at PostgreSQL, which was fine.
    monkeypatch.setattr(current_settings(), 'pooler', pooler)
    lost = queue_unavailable(psycopg.OperationalError('server closed the connection unexpectedly'), 'lost PostgreSQL')
    assert lost is not None
    if pooler == 'pgbouncer':
        assert re.match(r'the job queue lost its database at \S+ \(PgBouncer\): server closed', str(lost)), str(lost)
    else:
        assert re.match(r'the job queue lost PostgreSQL at \S+: server closed', str(lost)), str(lost)


def test_a_queue_url_of_its_own_behind_a_pooled_database_url_is_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    # README's set-up: DATABASE_URL at PgBouncer, AGENTRT_QUEUE_DATABASE_URL at PostgreSQL itself. The worker's outage
    # warning said "(PgBouncer)" of the direct address, sending the operator to PgBouncer (QA).
    settings = current_settings()
    monkeypatch.setattr(settings, 'pooler', 'pgbouncer')
    monkeypatch.setattr(settings, 'database_url', 'postgresql://app:s3cret@127.0.0.1:6432/agents')
    monkeypatch.setattr(settings, 'queue_database_url', 'postgresql://app:s3cret@127.0.0.1:5432/agents')
    lost = queue_unavailable(psycopg.OperationalError('the database system is shutting down'), 'lost PostgreSQL')
    assert lost is not None and str(lost).startswith(
        'the job queue lost PostgreSQL at postgresql://app:***@127.0.0.1:5432'
    )
    assert 'PgBouncer' not in str(lost)


async def test_a_queue_database_without_the_job_tables_is_a_clear_error(
    queue: None, empty_database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # AGENTRT_QUEUE_DATABASE_URL naming another database than the runtime's (or one never migrated): the worker ended
    # with "internal error: ConnectorException: Database error. ... report it" (exit code 70), and every turn's
    # process logged "failed: ConnectorException: Database error." with a traceback.
    settings = current_settings()
    other = get_engine().url.set(database=empty_database).render_as_string(hide_password=False)
    monkeypatch.setattr(settings, 'queue_database_url', queue_url(other))
    await close_queue()
    expected = rf'job queue.*{empty_database}.* has no job tables .*agentrt db upgrade'
    try:
        with pytest.raises(ConfigError, match=expected):
            await asyncio.wait_for(run_worker(concurrency=1, burst=True), 20)
        await chat('no-job-tables')
        await get_supervisor().join()
    finally:
        await close_queue()
    [failure] = [r for r in caplog.records if 'queue post-turn jobs (conversation no-job-tables' in r.getMessage()]
    assert re.search(rf'ConfigError: .*{expected}', failure.exc_text or '')
    assert 'ConnectorException' not in caplog.text


async def test_reconcile_deletes_the_jobs_that_failed_for_good_after_some_days(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Succeeded jobs were deleted as they ended, failed ones never: a job failing every attempt (a bug, a row that
    # cannot be saved) added a row and its events to the queue's tables for ever; the periodic ones, every few minutes.
    monkeypatch.setattr(current_settings(), 'jobs_keep_failed_days', 7)
    ended = {}
    async with get_db_session(account=Unscoped.OWNER) as session:
        for name, status, days_ago in (
            ('old failed', 'failed', 8),
            ('old aborted', 'aborted', 8),
            ('recent failed', 'failed', 6),
            ('waiting', 'todo', 30),  # queued long ago and still to run: kept
        ):
            job_id = (
                await session.execute(
                    text(
                        "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('post_turn', 'agentrt.usage_rollup', 0, NULL, "
                        'NULL, CAST(:args AS jsonb), NULL)::procrastinate_job_to_defer_v1]))[1]'
                    ),
                    {'args': json.dumps({'account_id': len(ended) + 1})},
                )
            ).scalar_one()
            if status != 'todo':
                await session.execute(
                    text("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = :id"), {'id': job_id}
                )
                await session.execute(
                    text('UPDATE procrastinate_jobs SET status = CAST(:s AS procrastinate_job_status) WHERE id = :id'),
                    {'id': job_id, 's': status},
                )
            await session.execute(
                text('UPDATE procrastinate_events SET at = now() - make_interval(days => :days) WHERE job_id = :id'),
                {'id': job_id, 'days': days_ago},
            )
            ended[name] = job_id

    report = await reconcile_post_turn_work()

    assert report.jobs_deleted == 2
    async with get_db_session(account=Unscoped.OWNER) as session:
        left = set((await session.execute(text('SELECT id FROM procrastinate_jobs'))).scalars())
        events = set((await session.execute(text('SELECT DISTINCT job_id FROM procrastinate_events'))).scalars())
    assert left == events == {ended['recent failed'], ended['waiting']}
    monkeypatch.setattr(current_settings(), 'jobs_keep_failed_days', 0)  # kept until deleted by hand
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text("UPDATE procrastinate_events SET at = now() - interval '1 year'"))
    assert (await reconcile_post_turn_work()).jobs_deleted == 0


def test_a_queue_url_that_is_the_pooler_again_is_polled_not_listened_to() -> None:
    # AGENTRT_QUEUE_DATABASE_URL set to DATABASE_URL's pooler (a copied environment): the worker said "LISTEN", and its
    # LISTEN, lost as PgBouncer handed the server connection on, never woke it: jobs waited for the 5 s fallback poll.
    pooler, direct = 'postgresql://app@127.0.0.1:6432/agents', 'postgresql://app@db.internal:5432/agents'
    settings = current_settings().model_copy(update={'database_url': pooler, 'pooler': 'pgbouncer'})
    assert not listens(settings)
    assert not listens(settings.model_copy(update={'queue_database_url': pooler + '?sslmode=disable'}))
    assert listens(settings.model_copy(update={'queue_database_url': direct}))
    assert listens(settings.model_copy(update={'pooler': 'none', 'queue_database_url': pooler}))


async def test_a_job_whose_end_could_not_be_saved_goes_back_to_the_queue_while_its_worker_lives_on(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection lost as procrastinate saved how a job ended (a fast restart of PostgreSQL, a terminated backend)
    # left the job marked running; retry-stalled looks only at jobs of silent workers, so while its worker went on
    # beating it stayed so for good, and its lock (`rollup:<account>`) held back every later rollup of the account.
    manager = jobs_module.jobs.job_manager
    finish = manager.finish_job
    failed: list[int] = []

    async def lost_once(job: Any, **kwargs: Any) -> None:
        if not failed:
            failed.append(job.id)
            try:
                raise psycopg.OperationalError('server closed the connection unexpectedly')
            except psycopg.OperationalError as exc:
                raise ConnectorException from exc
        await finish(job=job, **kwargs)

    monkeypatch.setattr(manager, 'finish_job', lost_once)
    monkeypatch.setattr(current_settings(), 'jobs_heartbeat_seconds', 0.2)
    monkeypatch.setattr(worker_module, 'LISTEN_POLL_SECONDS', 0.2)  # a job put back is found at the next look
    await chat('end-not-saved')
    worker = asyncio.ensure_future(run_worker(concurrency=1))
    try:
        await wait_for(lambda: _ran_once_more(failed), 20, 'the job run again and its end saved')
        assert not worker.done()
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    assert await rolled_up_requests() == len(await ledger_rows())


async def _ran_once_more(failed: list[int]) -> bool:
    async with get_db_session(account=Unscoped.OWNER) as session:
        left = (await session.execute(text('SELECT count(*) FROM procrastinate_jobs'))).scalar_one()
    return bool(failed) and left == 0


async def test_a_worker_taken_for_dead_and_removed_registers_again_and_goes_on(
    queue: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker paused longer than AGENTRT_JOBS_STALLED_SECONDS (SIGSTOP, a suspended VM) had its row deleted by the
    # next worker to start; resumed, its next job broke the jobs' foreign key to that row and it ended with "internal
    # error: ConnectorException: Database error." (exit code 70).
    worker = asyncio.ensure_future(run_worker(concurrency=1))
    try:
        await wait_for(lambda: _workers_registered(1), 20, 'the worker registered')
        async with get_db_session(account=Unscoped.OWNER) as session:  # as a starting worker prunes a silent one
            await session.execute(text('DELETE FROM procrastinate_workers'))
        await chat('taken-for-dead')  # its rollup job wakes the worker
        await wait_for(lambda: _ran_once_more([0]), 20, 'the job run')
        assert not worker.done()
        assert await _workers_registered(1)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    assert 'was taken for dead' in caplog.text
    assert await rolled_up_requests() == len(await ledger_rows())


async def _workers_registered(count: int) -> bool:
    async with get_db_session(account=Unscoped.OWNER) as session:
        return (await session.execute(text('SELECT count(*) FROM procrastinate_workers'))).scalar_one() == count
