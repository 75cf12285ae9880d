"""A worker rides out a short loss of the queue's PostgreSQL (`AGENTRT_JOBS_OUTAGE_SECONDS`): a real server stopped and
started again under it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.db import engine
from agentrt.db.engine import current_settings
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.jobs import WorkerStop, close_queue, run_worker
from agentrt.services.jobs import _reconcile as reconcile_module
from tests.private_database import PrivateDatabase
from tests.services.jobs.helpers import PROCRASTINATE_TABLES

pytestmark = pytest.mark.usefixtures('queue')

_WAITING = 'waiting for it to come back'
_BACK = 'the job queue is back after'
_ATTEMPT = 'the job queue cannot connect to PostgreSQL'


class _HeldReconcile:
    """The periodic reconcile job, its first run held until `finish` is set; its later runs return at once."""

    def __init__(self) -> None:
        self.runs = 0
        self.started, self.finish = asyncio.Event(), asyncio.Event()

    async def __call__(self, **kwargs: Any) -> None:
        self.runs += 1
        if self.runs == 1:
            self.started.set()
            await self.finish.wait()


async def _empty_queue() -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:  # the worker defers the periodic reconcile: job 1
        await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))


async def _logged(caplog: pytest.LogCaptureFixture, words: str, after: str | None = None) -> None:
    """Until a line with `words` is logged (after the first line with `after`, when given)."""
    while True:
        messages = [r.getMessage() for r in caplog.records]
        start = next((i for i, m in enumerate(messages) if after in m), None) if after else -1
        if start is not None and any(words in m for m in messages[start + 1 :]):
            return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _running_worker(
    private_database: PrivateDatabase,
    monkeypatch: pytest.MonkeyPatch,
    stop: WorkerStop,
    *,
    connect_timeout: float,
    outage_seconds: float,
) -> AsyncIterator[asyncio.Future[None]]:
    """A worker on the private server's empty queue, stopped (and its queue closed) when the block ends."""
    worker: asyncio.Future[None] | None = None
    async with private_database.active():
        monkeypatch.setattr(current_settings(), 'connect_timeout', connect_timeout)
        monkeypatch.setattr(current_settings(), 'jobs_outage_seconds', outage_seconds)
        try:
            await _empty_queue()
            worker = asyncio.ensure_future(run_worker(concurrency=1, stop=stop))
            yield worker
        finally:
            await _stopped(worker, stop)
            await close_queue()


@contextlib.asynccontextmanager
async def _server_away(private_database: PrivateDatabase) -> AsyncIterator[None]:
    """The private server stopped ('fast') while the block runs, running again after it."""
    await asyncio.to_thread(private_database.server.stop, 'fast')
    try:
        yield
    finally:
        await asyncio.to_thread(private_database.server.ensure_running)


async def _stopped(worker: asyncio.Future[None] | None, stop: WorkerStop) -> None:
    if worker is not None and not worker.done():
        stop.request()
        stop.request()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(worker, 30)


async def test_a_worker_rides_out_a_restart_and_runs_again_the_job_whose_end_was_lost(
    private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker exited with code 3 at every restart of PostgreSQL; the job it was running stayed 'doing' until the
    # retry-stalled job of another worker found it, AGENTRT_JOBS_STALLED_SECONDS later.
    caplog.set_level(logging.INFO, logger='agentrt.jobs')
    caplog.set_level(logging.DEBUG, logger='psycopg.pool')  # its failed attempts are kept, at their level
    held = _HeldReconcile()
    monkeypatch.setattr(reconcile_module, 'reconcile_post_turn_work', held)
    stop = WorkerStop()
    async with _running_worker(private_database, monkeypatch, stop, connect_timeout=2, outage_seconds=120.0) as worker:
        await asyncio.wait_for(held.started.wait(), 30)
        async with _server_away(private_database):
            held.finish.set()  # the job ends with the server away: its end cannot be saved
            await asyncio.wait_for(_logged(caplog, _WAITING), 60)
            assert not worker.done()
            await asyncio.wait_for(_logged(caplog, _ATTEMPT, after=_WAITING), 60)  # the pool tried, and failed
        await asyncio.wait_for(_logged(caplog, _BACK), 60)
        while held.runs < 2:  # noqa: ASYNC110 - the job put back runs again
            await asyncio.sleep(0.05)
        stop.request()
        await asyncio.wait_for(worker, 30)  # returns: a stop, not an error
        async with get_db_session(account=Unscoped.OWNER) as session:
            jobs = (await session.execute(text('SELECT id, status FROM procrastinate_jobs ORDER BY id'))).all()
            workers = (await session.execute(text('SELECT count(*) FROM procrastinate_workers'))).scalar_one()
    assert [status for _, status in jobs if status == 'doing'] == []  # none left marked running
    assert 1 not in [job_id for job_id, _ in jobs]  # the held job ran again and succeeded (deleted as it ended)
    assert workers == 0  # neither the worker that lost the queue nor the one after it left a row
    messages = [r.getMessage() for r in caplog.records if r.name == 'agentrt.jobs']
    assert len([m for m in messages if _WAITING in m]) == 1
    # While it waits, the pool's failed attempts are not a warning each: the worker said it once.
    waiting = next(i for i, r in enumerate(caplog.records) if _WAITING in r.getMessage())
    back = next(i for i, r in enumerate(caplog.records) if _BACK in r.getMessage())
    between = caplog.records[waiting + 1 : back]
    assert [r.levelname for r in between if _ATTEMPT in r.getMessage()][:1] == ['DEBUG']
    assert [r.getMessage() for r in between if r.levelno >= logging.WARNING] == []
    [back_line] = [m for m in messages if _BACK in m]
    assert back_line.endswith('taking jobs again (1 job put back in the queue: how they ended was not saved)')


async def test_a_worker_whose_queue_stays_away_past_the_bound_stops_with_a_database_error(
    private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = WorkerStop()
    revivals: list[None] = []  # an embedded server is started again while the worker waits (none here: a no-op)
    monkeypatch.setattr(engine, 'embedded_unreachable', lambda: revivals.append(None))
    async with _running_worker(private_database, monkeypatch, stop, connect_timeout=1, outage_seconds=1.0) as worker:
        await asyncio.wait_for(_registered(), 30)
        async with _server_away(private_database):
            with pytest.raises(DatabaseUnavailableError, match='did not come back within AGENTRT_JOBS_OUTAGE_SECO'):
                await asyncio.wait_for(worker, 60)
    assert revivals, 'the worker asked for no revival of an embedded server while the queue was away (QA)'


async def test_a_worker_asked_to_stop_while_it_waits_for_the_queue_returns_at_once(
    private_database: PrivateDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger='agentrt.jobs')
    stop = WorkerStop()
    async with _running_worker(private_database, monkeypatch, stop, connect_timeout=1, outage_seconds=3600.0) as worker:
        await asyncio.wait_for(_registered(), 30)
        async with _server_away(private_database):
            await asyncio.wait_for(_logged(caplog, _WAITING), 60)
            stop.request()
            await asyncio.wait_for(worker, 30)  # returns (exit code 0 in the CLI), long before the bound


async def _registered() -> None:
    """Until a worker has its row in the table of workers (it runs)."""
    while True:
        async with get_db_session(account=Unscoped.OWNER) as session:
            if (await session.execute(text('SELECT count(*) FROM procrastinate_workers'))).scalar_one():
                return
        await asyncio.sleep(0.05)
