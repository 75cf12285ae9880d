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
from agentrt.services.jobs import close_queue, defer_post_turn_work, defer_summary, open_queue
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


class _Records(logging.Handler):
    """The records that reach a handler, as its filters left them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
