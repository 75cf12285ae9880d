"""Queueing a turn's jobs (`services/jobs/_defer.py`) while the queue's PostgreSQL is away: the runtime's
`DatabaseUnavailableError`, so a server logs the task as one WARNING line (`OutageAsOneLine`) like any other
background task an outage stops, not procrastinate's `ConnectorException` with two chained tracebacks."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import text

from agentrt.db.engine import current_settings
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import OutageAsOneLine, get_supervisor
from agentrt.services.jobs import _defer, close_queue, defer_post_turn_work, defer_summary, open_queue
from tests.private_database import PrivateDatabase
from tests.services.jobs.helpers import PROCRASTINATE_TABLES


async def test_a_defer_while_postgresql_is_down_is_a_database_error_logged_as_one_line(
    queue: None, private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each turn's task was an ERROR with procrastinate's ConnectorException ("Database error.") chained to psycopg's
    # PoolTimeout or OperationalError: 2 tracebacks of ~60 lines per turn through an outage of PgBouncer.
    logged = _Records()
    logged.addFilter(OutageAsOneLine())  # what `agentrt serve` puts on its handlers
    monkeypatch.setattr(logging.getLogger('agentrt.background'), 'handlers', [logged])
    async with private_database.active():
        monkeypatch.setattr(current_settings(), 'connect_timeout', 1)  # the pool's wait for a connection
        try:
            async with get_db_session(account=Unscoped.OWNER) as session:
                await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
            await open_queue()
            await asyncio.to_thread(private_database.server.stop, 'fast')
            try:
                with pytest.raises(DatabaseUnavailableError, match=r'^the job queue cannot queue a job at .*127\.0'):
                    await defer_summary(1, 'conv-1')
                get_supervisor().spawn(
                    defer_post_turn_work, 1, 'conv-1', summarise=False, rollup_interval_s=0, name='queue post-turn jobs'
                )
                await get_supervisor().join()
            finally:
                await asyncio.to_thread(private_database.server.ensure_running)
        finally:
            await close_queue()
    [failed] = [r for r in logged.records if r.levelno >= logging.WARNING]
    assert failed.levelname == 'WARNING' and failed.exc_info is None and failed.exc_text is None
    assert failed.getMessage().startswith('background task queue post-turn jobs not done: database unavailable: ')


async def test_turns_finding_their_job_pending_leave_no_error_in_the_servers_log(
    queue: None, private_database: PrivateDatabase
) -> None:
    # Every turn queues its account's rollup; within the rollup's interval one is pending, and the insert of another
    # failed on the queueing lock's unique index: PostgreSQL logged an ERROR ("duplicate key value violates unique
    # constraint procrastinate_jobs_queueing_lock_idx_v1") for nearly every turn of a server in queue mode.
    log = private_database.server.root / 'log'
    async with private_database.active():
        try:
            async with get_db_session(account=Unscoped.OWNER) as session:
                await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
            logged_before = log.read_text(errors='replace').count('queueing_lock')
            # A server's turns at once (each looked before any inserted), then one after another.
            await asyncio.gather(
                *(defer_post_turn_work(1, 'conv-1', summarise=False, rollup_interval_s=60) for _ in range(8))
            )
            for _turn in range(6):
                await defer_post_turn_work(1, 'conv-1', summarise=True, rollup_interval_s=60)
                assert await defer_summary(1, 'conv-1') == 0  # pending since the first turn
            async with get_db_session(account=Unscoped.OWNER) as session:
                queued = await session.execute(
                    text("SELECT task_name, count(*) FROM procrastinate_jobs WHERE status = 'todo' GROUP BY 1")
                )
                assert {name: count for name, count in queued} == {
                    'agentrt.usage_rollup': 1,
                    'agentrt.conversation_summary': 1,
                }
        finally:
            await close_queue()
    assert log.read_text(errors='replace').count('queueing_lock') == logged_before


_NO_WORKER = 'no `agentrt worker` is running'


async def test_a_process_that_queues_jobs_with_no_worker_alive_says_so_once(
    queue: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server (or a chat) in queue mode with no worker queued every turn's jobs in silence: titles, summaries and
    # rollups never came, and nothing but `agentrt db status` said why.
    monkeypatch.setattr(_defer, '_workers', _defer._WorkersWatch())
    monkeypatch.setattr(_defer, 'WORKERS_CHECK_SECONDS', 0.0)  # every job looks
    caplog.set_level(logging.WARNING, logger='agentrt.jobs')
    for conversation_id in ('c-1', 'c-2'):
        await defer_post_turn_work(1, conversation_id, summarise=True, rollup_interval_s=0)
    [warning] = [r for r in caplog.records if _NO_WORKER in r.getMessage()]
    assert warning.levelname == 'WARNING' and 'AGENTRT_BACKGROUND=queue' in warning.getMessage()

    caplog.clear()
    async with get_db_session(account=Unscoped.OWNER) as session:  # a worker's heartbeat, just now
        await session.execute(text('INSERT INTO procrastinate_workers DEFAULT VALUES'))
    monkeypatch.setattr(_defer, '_workers', _defer._WorkersWatch())
    await defer_post_turn_work(1, 'c-3', summarise=True, rollup_interval_s=0)
    assert _NO_WORKER not in caplog.text


class _Records(logging.Handler):
    """The records that reach a handler, as its filters left them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
